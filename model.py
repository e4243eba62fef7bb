"""The FetalCLIP teacher and the MobileFetalCLIP student, built from timm towers, and every checkpoint format.

    model = create_model("mobilefetalclip")              # FastViT-MCi0 + 12-layer text tower, 74.9M
    load_checkpoint(model, "mobile_fetal_clip_weights.pt")   # open_clip, the release's, Apple's or our own files
    image_features, text_features, logit_scale = model(images, tokens)
    save_open_clip(model, "student.pt", official=True)   # a file the official release loads strictly

Image towers come from `timm.create_model` (never with pretrained weights: every weight is loaded from a local
file). The only thing timm lacks is the CLIP text tower, written here once for both models with open_clip's
parameter names, so open_clip checkpoints load by name.
Imports no other file of this project (torch and timm only): copy it into yours.
About 580 lines, past the ~500 of a file users copy: one concern, the models and the files that hold them; the
checkpoint formats (second half) are what makes the towers load the real FetalCLIP, release and MobileCLIP2
weights.
"""

import copy
import difflib
import functools
import math
import os
import re
import zipfile
from collections import OrderedDict

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import fastvit, vision_transformer

CONTEXT_LENGTH = 117  # FetalCLIP's text context, teacher and student alike (MobileCLIP2 ships 77: resized on load)

# about: what it is, for messages; image: timm model name + kwargs; text: width/layers/heads; causal: text
# attention mask or none. A file is identified by the name it stores, or by its keys and shapes fitting
# exactly one entry (held_model_name), so registering a model is one entry here.
MODEL_CONFIGS = {
    # FetalCLIP: open_clip CLIP, ViT-L/14 with exact GELU, causal text tower, 427.6M.
    "fetalclip": dict(
        about="the FetalCLIP teacher (ViT-L/14)",
        image="vit_large_patch14_clip_224",
        image_kwargs={},
        image_size=224,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        embed_dim=768,
        text_width=768,
        text_layers=12,
        text_heads=12,
        causal=True,
    ),
    # MobileFetalCLIP (paper Sec. 3.6): open_clip CustomTextCLIP "MobileCLIP2-S0", context 117, 74.9M.
    "mobilefetalclip": dict(
        about="a MobileFetalCLIP student (FastViT-MCi0)",
        image="fastvit_mci0",
        image_kwargs={},
        image_size=256,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        embed_dim=512,
        text_width=512,
        text_layers=12,
        text_heads=8,
        causal=False,
    ),
    # Demo pair for the built-in synthetic benchmark, chosen to train from scratch on a 2-core CPU. A
    # 48-token context holds every protocol prompt (the longest GA prompt is 45 tokens). Teacher:
    # ResNet-10-T (a convnet learns from scratch on a few thousand pairs; a small ViT does not within the
    # demo's minutes) and a causal text tower. Sizes of both demo models: the README's model table.
    "demo_teacher": dict(
        about="the demo teacher",
        image="resnet10t",
        image_kwargs={},
        image_size=56,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        embed_dim=128,
        text_width=128,
        text_layers=4,
        text_heads=4,
        causal=True,
        context_length=48,
    ),
    # Student: ResNet-10-T at about half width (cheaper per step than the teacher's tower) and a bidirectional
    # text tower: in a trial of equal minutes it learned the planes better than MobileNetV3-Small,
    # MobileNetV4-Conv-Small and RegNetX-200MF did.
    "demo_student": dict(
        about="a demo student",
        image="resnet10t",
        image_kwargs=dict(channels=(32, 64, 128, 240), stem_width=16),
        image_size=56,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        embed_dim=96,
        text_width=96,
        text_layers=2,
        text_heads=4,
        causal=False,
        context_length=48,
    ),
    # LayerNorm only (no BatchNorm statistics that differ per process): the multi-process tests.
    "tiny_vit": dict(
        about="the tests' tiny ViT",
        image="vit_base_patch16_clip_224",
        image_kwargs=dict(img_size=48, patch_size=16, embed_dim=64, depth=2, num_heads=2),
        image_size=48,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        embed_dim=64,
        text_width=64,
        text_layers=1,
        text_heads=2,
        causal=True,
        context_length=48,
    ),
}
# Students along the capacity gap (tools/sweep.py): demo_student's ResNet-10-T at narrower widths (the stem
# half the first stage, as in demo_student and the teacher), so that the demo teacher's image tower has
# 11.7x, 26.7x (the paper's 304M / 11.4M, Sec. 3.6) and 59.5x their visual parameters; demo_student's gap is
# 4.3x. The text tower and embedding stay demo_student's: the gap the paper measures is the image towers',
# and changing one tower keeps the sweep's x axis one variable.
MODEL_CONFIGS["demo_student_12x"] = dict(
    MODEL_CONFIGS["demo_student"],
    about="a demo student at the 12x visual gap",
    image_kwargs=dict(channels=(16, 32, 64, 160), stem_width=8),
)
MODEL_CONFIGS["demo_student_26x"] = dict(
    MODEL_CONFIGS["demo_student"],
    about="a demo student at the paper's 26.7x visual gap",
    image_kwargs=dict(channels=(16, 24, 48, 96), stem_width=8),
)
MODEL_CONFIGS["demo_student_60x"] = dict(
    MODEL_CONFIGS["demo_student"],
    about="a demo student at the 60x visual gap",
    image_kwargs=dict(channels=(8, 16, 32, 64), stem_width=4),
)
VOCAB_SIZE = 49408


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block with open_clip's parameter names (ln_1, attn, ln_2, mlp.c_fc/c_proj)."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, 4 * width)),
                    ("gelu", nn.GELU()),  # exact GELU, not QuickGELU: FetalCLIP and MobileCLIP2
                    ("c_proj", nn.Linear(4 * width, width)),
                ]
            )
        )

    def forward(self, x, attn_mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """CLIP text tower for both models: causal mask (FetalCLIP) or none at all (MobileCLIP2).

    Pools at the first end token, found as the argmax of the ids (49407 is the largest id).
    """

    def __init__(self, width, layers, heads, embed_dim, causal, context_length=CONTEXT_LENGTH):
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB_SIZE, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = nn.ModuleDict(
            {
                "resblocks": nn.ModuleList(
                    ResidualAttentionBlock(width, heads) for _ in range(layers)
                )
            }
        )
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        mask = (
            torch.full((context_length, context_length), float("-inf")).triu(1) if causal else None
        )
        self.register_buffer("attn_mask", mask, persistent=False)
        self.init_weights(width, layers)

    def init_weights(self, width, layers):
        # open_clip's initialisation, so the demo teacher trains from scratch as CLIP does
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, tokens):  # (B, L) -> (B, D)
        if self.attn_mask is not None and not (
            torch.jit.is_tracing() or torch.compiler.is_compiling()
        ):
            # causal: nothing after the last end token reaches it, so the padding goes, (B, L) -> (B, L')
            # with L' <= L: the same output, faster (an exported graph keeps all L positions)
            tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # (B, L, W)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        for block in self.transformer.resblocks:
            x = block(x, attn_mask=mask)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, W)
        return pooled @ self.text_projection


class CLIP(nn.Module):
    """A timm image tower, our text tower and a learnable temperature stored as a log."""

    def __init__(self, name):
        super().__init__()
        cfg = MODEL_CONFIGS[name]
        self.name, self.embed_dim = name, cfg["embed_dim"]
        self.context_length = context_length_of(name)
        self.image_size, self.image_mean, self.image_std = (
            cfg["image_size"],
            cfg["mean"],
            cfg["std"],
        )
        self.visual = timm.create_model(
            cfg["image"], pretrained=False, num_classes=cfg["embed_dim"], **cfg["image_kwargs"]
        )
        if self.is_vit:  # open_clip's ViT projects without a bias; timm's converter would add zeros
            self.visual.head = nn.Linear(self.visual.embed_dim, cfg["embed_dim"], bias=False)
        self.text = TextTransformer(
            cfg["text_width"],
            cfg["text_layers"],
            cfg["text_heads"],
            cfg["embed_dim"],
            cfg["causal"],
            self.context_length,
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def is_vit(self):
        """True when open_clip stores this image tower as its own ViT (`CLIP`), else as a timm trunk."""
        return isinstance(self.visual, vision_transformer.VisionTransformer)

    def encode_image(self, images):  # (B, 3, S, S) -> (B, D), unnormalised as in open_clip
        return self.visual(images)

    def encode_text(self, tokens):  # (B, L) -> (B, D), unnormalised
        return self.text(tokens)

    def forward(self, images, tokens):
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        return image_features, text_features, self.logit_scale.exp()


def context_length_of(name):
    """The text positions a model reads: its entry's context_length, else FetalCLIP's."""
    return MODEL_CONFIGS[name].get("context_length", CONTEXT_LENGTH)


def one_of_the_models(name):
    """'one of fetalclip, ... (did you mean X?)': what a model name is expected to be, for one-line errors."""
    close = difflib.get_close_matches(str(name).lower(), list(MODEL_CONFIGS), n=1)
    return f"one of {', '.join(MODEL_CONFIGS)}" + (
        f" (did you mean {close[0]!r}?)" if close else ""
    )


def create_model(name):
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; expected {one_of_the_models(name)}")
    return CLIP(name)


@functools.cache
def shapes_of(name):
    """{our key: shape} of model `name`, built on the meta device (no memory, no initialisation), and the model."""
    with torch.device("meta"):
        net = create_model(name)
    return {k: v.shape for k, v in net.state_dict().items()}, net


def reparameterize(model):
    """An inference copy with FastViT's branches fused by timm (same outputs, fewer parameters)."""
    return timm.utils.reparameterize_model(copy.deepcopy(model).eval())


# ------------------------------------------------------------------ checkpoint formats
# open_clip ViT <-> timm ViT names; timm's own converter does open_clip -> timm, this is the inverse.
TIMM_TO_OPEN_CLIP_VIT = [
    (r"^patch_embed\.proj\.", "conv1."),
    (r"^norm_pre\.", "ln_pre."),
    (r"^norm\.", "ln_post."),
    (r"^blocks\.", "transformer.resblocks."),
    (r"\.norm1\.", ".ln_1."),
    (r"\.norm2\.", ".ln_2."),
    (r"\.attn\.qkv\.", ".attn.in_proj_"),
    (r"\.attn\.proj\.", ".attn.out_proj."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
]
# timm FastViT -> Apple's MCi module names (the release's trunk): the inverse of the renames in timm's
# fastvit.checkpoint_filter_fn; the flat `network.N` indices are added by to_apple_mci.
TIMM_TO_APPLE_MCI = [
    (r"^stem\.", "patch_embed."),
    (r"conv_kxk", "rbr_conv"),
    (r"conv_scale", "rbr_scale"),
    (r"\.identity\.", ".rbr_skip."),
    (r"large_conv", "lkb_origin"),
    (r"\.mlp\.", ".convffn."),
    # Apple's MobileOneBlock has its own SE (reduce, expand); its large-kernel downsampling uses timm's
    # (fc1, fc2)
    (r"^final_conv\.se\.fc1\.", "conv_exp.se.reduce."),
    (r"^final_conv\.se\.fc2\.", "conv_exp.se.expand."),
    (r"^final_conv\.", "conv_exp."),
    (r"(layer_scale(_\d)?)\.gamma$", r"\1"),
    (r"^head\.fc\.", "head."),
]
# Apple's MobileCLIP text encoder -> open_clip names (MobileCLIP2's own release format).
APPLE_TO_OPEN_CLIP_TEXT = [
    (r"^embedding_layer\.", "token_embedding."),
    (r"^final_layer_norm\.", "ln_final."),
    (r"^positional_embedding\.pos_embed\.pos_embed$", "positional_embedding"),
    (r"^projection_layer$", "text_projection"),
    (r"^transformer\.(\d+)\.", r"transformer.resblocks.\1."),
    (r"\.pre_norm_mha\.0\.", ".ln_1."),
    (r"\.pre_norm_mha\.1\.qkv_proj\.", ".attn.in_proj_"),
    (r"\.pre_norm_mha\.1\.out_proj\.", ".attn.out_proj."),
    (r"\.pre_norm_ffn\.0\.", ".ln_2."),
    (r"\.pre_norm_ffn\.1\.", ".mlp.c_fc."),
    (r"\.pre_norm_ffn\.4\.", ".mlp.c_proj."),
]
TEXT_KEYS = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
)


def rename(state_dict, rules):
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def with_prefix(state_dict, prefix, strip=""):
    """Keys starting with `strip`, re-prefixed by `prefix`."""
    return {prefix + k[len(strip) :]: v for k, v in state_dict.items() if k.startswith(strip)}


def read_checkpoint(path):
    """The file's tensors and metadata; never runs code (`weights_only=True`)."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: a folder, not a checkpoint file (give the .pt file inside it)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty (an interrupted copy or save?)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickles with code, truncated files, or not a torch file at all
        raise ValueError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({why_not_loaded(path, error)})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(checkpoint).__name__}")
    return checkpoint


def why_not_loaded(path, error):
    """torch.load's refusal in one line of our own: its messages run to paragraphs and advise
    weights_only=False, which would run the file's code."""
    needs_code = re.search(r"(?:Unsupported global: |unsupported )GLOBAL (\S+)", str(error))
    if needs_code:
        return (
            f"it holds a Python object, {needs_code.group(1)}, that only running code can rebuild"
        )
    with open(path, "rb") as file:
        head = file.read(8)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        return "an incomplete zip archive: an interrupted copy or save?"
    if not head.startswith((b"PK", b"\x80")):  # a zip archive, or an old torch file (a pickle)
        return f"not a torch file: it starts with {head!r}"
    if "Weights only load failed" in str(error):
        return "it holds more than tensors and plain types, and only running code can rebuild it"
    return str(error).strip().splitlines()[0][:200]


def unwrap_state_dict(checkpoint):
    """A bare state dict from this project's checkpoints ("model"), the release trainer's envelope
    ("state_dict", beside optimizer and scheduler states), open_clip's, or a bare one; DDP `module.`
    removed."""
    state_dict = checkpoint.get("model", checkpoint.get("state_dict", checkpoint))
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(
            "the file holds no state dict of tensors (bare, or under 'model' or 'state_dict')"
        )
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def trunk_to_timm(trunk, visual):
    """A FastViT trunk in Apple's MCi names (MobileCLIP2, the release) -> timm's, by timm's own converter."""
    return (
        fastvit.checkpoint_filter_fn(trunk, visual)
        if isinstance(visual, fastvit.FastVit)
        else trunk
    )


def to_our_keys(state_dict, model):
    """Convert open_clip (CLIP or CustomTextCLIP, with a timm or an Apple MCi trunk), Apple MobileCLIP or our
    own keys to ours."""
    if any(k.startswith(("image_encoder.", "text_encoder.")) for k in state_dict):  # Apple
        text = rename(with_prefix(state_dict, "", "text_encoder."), APPLE_TO_OPEN_CLIP_TEXT)
        pos = "positional_embedding"
        if pos in text:  # Apple stores it as (1, 1, L, W)
            text[pos] = text[pos].reshape(-1, text[pos].shape[-1])
        trunk = trunk_to_timm(with_prefix(state_dict, "", "image_encoder.model."), model.visual)
        rest = {k: v for k, v in state_dict.items() if k == "logit_scale"}
        return {**with_prefix(trunk, "visual."), **with_prefix(text, "text."), **rest}
    out = {
        k: v for k, v in state_dict.items() if not k.startswith(("visual.", "text.") + TEXT_KEYS)
    }
    out.update({"text." + k: v for k, v in state_dict.items() if k.startswith(TEXT_KEYS)})  # CLIP
    out.update(with_prefix(state_dict, "text.", "text."))  # CustomTextCLIP and ours
    visual = with_prefix(state_dict, "", "visual.")
    if "class_embedding" in visual:  # open_clip's own ViT -> timm, by timm's converter
        visual = vision_transformer.checkpoint_filter_fn(
            with_prefix(visual, "visual."), model.visual
        )
        visual.pop("head.bias", None)  # timm adds zeros; open_clip has no bias
    # open_clip TimmModel: timm's or the release's Apple names
    elif any(k.startswith("trunk.") for k in visual):
        visual = trunk_to_timm(with_prefix(visual, "", "trunk."), model.visual)
    out.update(with_prefix(visual, "visual."))
    return out


def resize_text_positions(state_dict, context_length):
    """MobileCLIP2 has 77 text positions; FetalCLIP uses 117: 1-D linear, align_corners=False."""
    key = "text.positional_embedding"
    positions = state_dict.get(key)
    if positions is not None and positions.shape[0] != context_length:
        resized = F.interpolate(
            positions.T[None].float(), size=context_length, mode="linear", align_corners=False
        )
        state_dict[key] = resized[0].T.to(positions.dtype).contiguous()
    return state_dict


def state_dict_of(path, checkpoint):
    try:
        return unwrap_state_dict(checkpoint)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def fits(state_dict, name):
    """True when a file's state dict, converted to our keys for model `name`, has exactly its keys and
    shapes (the text positions may differ in number: load_checkpoint resizes them)."""
    shapes, net = shapes_of(name)
    try:
        ours = to_our_keys(state_dict, net)
    except Exception:  # a converter (timm's) that cannot map these keys onto this model's tower
        return False
    resized = {"text.positional_embedding"}
    return ours.keys() == shapes.keys() and all(
        ours[k].shape == shapes[k] or k in resized and ours[k].shape[1:] == shapes[k][1:]
        for k in ours
    )


def held_model_name(path, checkpoint):
    """The model a file holds: the name it stores (this project's files), else the one configuration its
    keys and shapes fit exactly; never guessed from one width. Several or none: an error listing the
    candidates."""
    stored = checkpoint.get("model_name", "")
    if stored:
        if not isinstance(stored, str) or stored not in MODEL_CONFIGS:
            raise ValueError(
                f"{path} stores model_name {stored!r}, not {one_of_the_models(stored)}"
            )
        return stored
    state_dict = state_dict_of(path, checkpoint)
    matches = [name for name in MODEL_CONFIGS if fits(state_dict, name)]
    if len(matches) == 1:
        return matches[0]
    fit = (
        f"fits {' and '.join(matches)} alike"
        if matches
        else "fits no model's keys and shapes exactly"
    )
    names = ", ".join(MODEL_CONFIGS)
    raise ValueError(
        f"{path} stores no model name and {fit}: name it (--model=NAME, a teacher --teacher=NAME): {names}"
    )


def first_non_finite(state_dict):
    """The first key whose float tensor holds NaN or inf, else ''. A finite sum proves every element finite
    (NaN and inf propagate through it); only when a sum is not finite, perhaps by overflow alone, are its
    elements read one by one: one pass of additions instead of a boolean copy of every tensor."""
    floats = {k: v for k, v in state_dict.items() if v.is_floating_point()}
    if not floats or torch.stack([v.sum().float() for v in floats.values()]).isfinite().all():
        return ""
    return next((k for k, v in floats.items() if not v.isfinite().all()), "")


def load_checkpoint(model, path, checkpoint=None):
    """Load any supported checkpoint into `model`; every key must be accounted for, every float tensor
    finite. `checkpoint`: the file's content when the caller has read it already (read_checkpoint), so a 1.7
    GB teacher is read once. A file that is another model (its stored name, or its keys and shapes) is
    refused, naming it."""
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    raw = state_dict_of(path, checkpoint)
    held = checkpoint.get("model_name", "")
    # what its keys and shapes prove, when they are not this model's
    if not held and not fits(raw, model.name):
        held = next((name for name in MODEL_CONFIGS if fits(raw, name)), "")
    if held and held != model.name:
        about = (
            f"{MODEL_CONFIGS[held]['about']} ({held!r})"
            if held in MODEL_CONFIGS
            else f"model {held!r}"
        )
        raise ValueError(f"{path} holds {about}, not the {model.name!r} model expected here")
    state_dict = resize_text_positions(to_our_keys(raw, model), model.context_length)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not fit model {model.name!r}: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)}, "
                f"model {model.name!r} expects {tuple(expected[key].shape)}"
            )
    bad = first_non_finite(raw)
    if bad:  # weights and BatchNorm statistics alike; named as the file names it
        raise ValueError(
            f"{path}: {bad} holds NaN or inf values (a diverged run, or a damaged file)"
        )
    model.load_state_dict(state_dict)
    return model


def load_model(path, name="", checkpoint=None, trainable=False):
    """Build the model a checkpoint holds (held_model_name) and load it; `name` overrides what the file says.
    In eval mode and frozen (a forward pass moves no BatchNorm statistic, nothing collects gradients) unless
    trainable=True."""
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    net = load_checkpoint(create_model(name or held_model_name(path, checkpoint)), path, checkpoint)
    return net if trainable else net.eval().requires_grad_(False)


def to_apple_mci(trunk, visual):
    """timm FastViT keys -> Apple's MCi keys as the release writes them (its `fastvit_mci0` is Apple's class).
    Apple's `network` is flat: per stage its downsampling, its positional embedding, then its blocks."""
    renamed, index = rename(trunk, TIMM_TO_APPLE_MCI), 0
    for s, stage in enumerate(visual.stages):
        parts = [
            ("downsample.proj", "proj", stage.downsample),
            ("pos_emb.pos_enc", "pe", stage.pos_emb),
            ("blocks", "", stage.blocks),
        ]
        for timm_part, apple_part, module in parts:
            if isinstance(module, nn.Identity):
                continue
            old, new = (
                f"stages.{s}.{timm_part}.",
                f"network.{index}." + (apple_part + "." if apple_part else ""),
            )
            renamed = {
                new + k[len(old) :] if k.startswith(old) else k: v for k, v in renamed.items()
            }
            index += 1
    # timm's converter must give the trunk back
    back = fastvit.checkpoint_filter_fn(dict(renamed), visual)
    if set(back) != set(trunk) or any(back[k] is not trunk[k] for k in trunk):
        raise ValueError(
            "Apple MCi names do not convert back to timm's: this timm version renames differently"
        )
    return renamed


def save_open_clip(model, path, official=False):
    """Write a state dict that open_clip loads strictly: `CLIP` for ViT towers, `CustomTextCLIP` otherwise.
    official=True writes a FastViT trunk under Apple's MCi names, as the official MobileFetalCLIP release's
    model (Apple's class registered as timm's fastvit_mci0) has them, so its evaluation and app load it strictly."""
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    text = with_prefix(state_dict, "", "text.")
    visual = with_prefix(state_dict, "", "visual.")
    if official and not isinstance(model.visual, fastvit.FastVit):
        raise ValueError(
            f"official=True writes the release's FastViT-MCi student; {model.name!r} is not one"
        )
    if model.is_vit:
        visual = rename(visual, TIMM_TO_OPEN_CLIP_VIT)
        visual["class_embedding"] = visual.pop("cls_token").reshape(-1)
        visual["positional_embedding"] = visual.pop("pos_embed")[0]
        visual["proj"] = visual.pop("head.weight").T.contiguous()
        out = {**with_prefix(visual, "visual."), **text}
    else:
        trunk = to_apple_mci(visual, model.visual) if official else visual
        out = {**with_prefix(trunk, "visual.trunk."), **with_prefix(text, "text.")}
    out["logit_scale"] = state_dict["logit_scale"]
    temporary = f"{path}.{os.getpid()}.tmp"  # written whole, then renamed: never half a file
    torch.save(out, temporary)
    os.replace(temporary, path)
