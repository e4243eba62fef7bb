"""Test fixture: the official MobileFetalCLIP release's student model and checkpoint envelope.

Reproduces, without importing the release, what numanai/MobileFetalCLIP builds and saves:

* ``src/mobile_fetal_clip/models/mci_registry.py`` (+ ``mobileone.py``, ``replknet.py``): Apple's MCi0 FastViT,
  which the release registers under timm's name ``fastvit_mci0`` (replacing timm's own class). The module tree and
  parameter/buffer names below are Apple's, so ``state_dict()`` keys equal the release's
  (``patch_embed.0.rbr_conv.0.conv.weight``, ``network.N...``, ``conv_exp...``, ``head.weight/bias``).
  Only the training-mode (multi-branch) structure is written: re-parameterisation / ``inference_mode``, dropout and
  drop-path (all 0.0 in the release config) and Apple's weight-init details are left out.
* ``src/mobile_fetal_clip/models/factory.py`` + ``configs/model/mobileclip2_s0_fetal.json``: open_clip builds a
  ``CustomTextCLIP`` whose ``TimmModel`` vision tower calls ``timm.create_model("fastvit_mci0", ...)``.
* ``src/mobile_fetal_clip/training/trainer.py`` (``_save_checkpoint``): the ``{"epoch", "state_dict", "optimizer",
  "scheduler", "global_step"}`` envelope, with AdamW param groups and the cosine-warmup ``LambdaLR``.
"""

import contextlib
import json
import math

import open_clip
import torch
import torch.nn.functional as F
from timm.layers import SqueezeExcite
from timm.models import _registry
from torch import nn

RELEASE_CONFIG = json.loads("""{
    "embed_dim": 512,
    "vision_cfg": {"timm_model_name": "fastvit_mci0", "timm_model_pretrained": false, "timm_pool": "avg",
                   "timm_proj": null, "timm_drop": 0.0, "timm_drop_path": 0.0, "image_size": 256},
    "text_cfg": {"context_length": 117, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                 "no_causal_mask": true}
}""")  # configs/model/mobileclip2_s0_fetal.json less "custom_text": true (we call CustomTextCLIP directly)


def _conv_bn(cin, cout, k, stride=1, groups=1):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class SEBlock(nn.Module):
    def __init__(self, c, rd_ratio=0.0625):
        super().__init__()
        self.reduce = nn.Conv2d(c, int(c * rd_ratio), 1)
        self.expand = nn.Conv2d(int(c * rd_ratio), c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class MobileOneBlock(nn.Module):
    def __init__(
        self, cin, cout, k, stride=1, groups=1, use_se=False, use_act=True, use_scale=True, n_conv=1
    ):
        super().__init__()
        self.se = SEBlock(cout) if use_se else nn.Identity()
        self.activation = nn.GELU() if use_act else nn.Identity()
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_conv = (
            nn.ModuleList(_conv_bn(cin, cout, k, stride, groups) for _ in range(n_conv))
            if n_conv
            else None
        )
        self.rbr_scale = _conv_bn(cin, cout, 1, stride, groups) if k > 1 and use_scale else None

    def forward(self, x):
        branches = [self.rbr_skip, self.rbr_scale, *(self.rbr_conv or [])]
        return self.activation(self.se(sum(b(x) for b in branches if b is not None)))


class ReparamLargeKernelConv(nn.Module):
    def __init__(self, cin, cout, k, stride, groups, small_kernel=3, use_se=False):
        super().__init__()
        self.activation = nn.GELU()
        # timm's SE, as in replknet.py
        self.se = SqueezeExcite(cout, rd_ratio=0.25) if use_se else nn.Identity()
        self.lkb_origin = _conv_bn(cin, cout, k, stride, groups)
        self.small_conv = _conv_bn(cin, cout, small_kernel, stride, groups)

    def forward(self, x):
        return self.activation(self.se(self.lkb_origin(x) + self.small_conv(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cin, cout, use_se):
        super().__init__()
        large = ReparamLargeKernelConv(cin, cout, 7, 2, cin, 3, use_se)
        self.proj = nn.Sequential(large, MobileOneBlock(cout, cout, 1))

    def forward(self, x):
        return self.proj(x)


class RepMixer(nn.Module):
    def __init__(self, dim, k=3):
        super().__init__()
        self.norm = MobileOneBlock(
            dim, dim, k, groups=dim, use_act=False, use_scale=False, n_conv=0
        )
        self.mixer = MobileOneBlock(dim, dim, k, groups=dim, use_act=False)
        self.layer_scale = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class ConvFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.conv = _conv_bn(dim, dim, 7, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.conv(x))))


class RepCPE(nn.Module):
    def __init__(self, dim, spatial_shape=(7, 7)):
        super().__init__()
        self.pe = nn.Conv2d(dim, dim, spatial_shape, 1, spatial_shape[0] // 2, groups=dim)

    def forward(self, x):
        return self.pe(x) + x


class MHSA(nn.Module):
    def __init__(self, dim, head_dim=32):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(x.flatten(2).transpose(1, 2)).reshape(
            b, h * w, 3, c // self.head_dim, self.head_dim
        )
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return self.proj(out).transpose(1, 2).reshape(b, c, h, w)


class RepMixerBlock(nn.Module):
    def __init__(self, dim, mlp_ratio=3.0):
        super().__init__()
        self.token_mixer = RepMixer(dim)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.layer_scale * self.convffn(x)


class AttentionBlock(nn.Module):
    def __init__(self, dim, mlp_ratio=3.0):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = MHSA(dim)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))
        self.layer_scale_2 = nn.Parameter(1e-5 * torch.ones(dim, 1, 1))

    def forward(self, x):
        x = x + self.layer_scale_1 * self.token_mixer(self.norm(x))
        return x + self.layer_scale_2 * self.convffn(x)


class FastViT(nn.Module):
    """Apple's MCi0 (``mci_registry.mci0``): layers (2, 6, 10, 2), dims (64, 128, 256, 512), mlp ratio 3, SE
    in the last two downsamples, RepCPE + attention in the last stage, ``conv_exp`` to 1024, ``gap``,
    ``head``.

    Like the release, extra timm kwargs (``global_pool``, ``pretrained_cfg``, ...) are accepted and ignored.
    """

    def __init__(self, num_classes=1000, drop_path_rate=0.0, **kwargs):
        super().__init__()
        assert not drop_path_rate, "drop-path is not implemented in this fixture"
        layers, dims = (2, 6, 10, 2), (64, 128, 256, 512)
        self.num_classes, self.num_features = num_classes, 2 * dims[-1]
        self.patch_embed = nn.Sequential(
            MobileOneBlock(3, dims[0], 3, 2),
            MobileOneBlock(dims[0], dims[0], 3, 2, dims[0]),
            MobileOneBlock(dims[0], dims[0], 1),
        )
        network = []
        for i, (n, dim) in enumerate(zip(layers, dims)):
            if i == 3:
                network.append(RepCPE(dim))
            network.append(
                nn.Sequential(
                    *((AttentionBlock if i == 3 else RepMixerBlock)(dim) for _ in range(n))
                )
            )
            if i < 3:
                network.append(PatchEmbed(dim, dims[i + 1], use_se=i >= 1))
        self.network = nn.ModuleList(network)
        self.conv_exp = MobileOneBlock(dims[-1], self.num_features, 3, groups=dims[-1], use_se=True)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        x = self.patch_embed(x)
        for block in self.network:
            x = block(x)
        return self.gap(self.conv_exp(x)).flatten(1)

    def forward(self, x):
        return self.head(self.forward_features(x))


@contextlib.contextmanager
def apple_fastvit_mci0():
    """Temporarily point timm's ``fastvit_mci0`` entrypoint at Apple's class (as the release's import does);
    timm's own entrypoint is restored on exit."""
    old = _registry._model_entrypoints["fastvit_mci0"]
    _registry._model_entrypoints["fastvit_mci0"] = lambda pretrained=False, **kwargs: FastViT(
        **kwargs
    )
    try:
        yield
    finally:
        _registry._model_entrypoints["fastvit_mci0"] = old


def release_model(context_length: int = 117, seed: int = 0) -> open_clip.CustomTextCLIP:
    """The release's student: ``open_clip.CustomTextCLIP(**RELEASE_CONFIG)`` with Apple's MCi0 as
    ``visual.trunk``, built deterministically from ``seed`` without touching the global RNG.

    BatchNorm running stats and affine params, layer scales and the trunk head bias are randomised so that a
    conversion which drops or misroutes any of them changes the outputs. Returned in eval mode."""
    cfg = {
        **RELEASE_CONFIG,
        "text_cfg": {**RELEASE_CONFIG["text_cfg"], "context_length": context_length},
    }
    with torch.random.fork_rng(devices=[]), apple_fastvit_mci0():
        torch.manual_seed(seed)
        model = open_clip.CustomTextCLIP(**cfg)
        with torch.no_grad():
            for name, t in model.visual.trunk.named_parameters():
                if "layer_scale" in name:
                    t.uniform_(0.05, 0.2)
            for m in model.visual.trunk.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0.0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.1)
            model.visual.trunk.head.bias.normal_(0.0, 0.1)
    return model.eval()


def release_checkpoint(
    model: nn.Module, kind: str = "trainer", epoch: int = 0, global_step: int = 1
) -> dict:
    """What the release writes for ``model``. ``kind``:

    * ``"trainer"``: ``_save_checkpoint``'s envelope ``{"epoch": epoch + 1, "state_dict", "optimizer", "scheduler",
      "global_step"}``; the optimizer is the trainer's two-group AdamW (lr 1e-5, wd 0.1, betas (0.9, 0.98), eps 1e-6)
      after one real ``step()`` and the scheduler its cosine-warmup ``LambdaLR`` after one ``step()``. The first step
      runs at warmup lr 0, exactly as in the release, so ``model``'s weights are unchanged.
    * ``"module"``: the same envelope with DDP-wrapped keys (``module.`` + key). The release's trainer unwraps before
      saving, but its ``load_pretrained_weights`` strips ``module.``, so such files are accepted by the release.
    * ``"bare"``: just ``model.state_dict()``.
    """
    if kind == "bare":
        return model.state_dict()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # trainer._setup_optimizer's split
            skip = p.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "logit_scale", "norm"))
            (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    warmup, total = 500, 10_000

    def lr_lambda(step):  # training/scheduler.py cosine_warmup_scheduler
        if step < warmup:
            return step / max(1, warmup)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    gen = torch.Generator().manual_seed(0)
    for p in decay + no_decay:  # synthetic gradients (the trainer's come from a backward pass)
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state_dict = model.state_dict()
    if kind == "module":
        state_dict = {f"module.{k}": v for k, v in state_dict.items()}
    elif kind != "trainer":
        raise ValueError(f"unknown kind {kind!r}")
    return {
        "epoch": epoch + 1,
        "state_dict": state_dict,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "global_step": global_step,
    }
