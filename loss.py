"""MobileFetalCLIP losses: CLIP (Eq. 1), logit KD (Eq. 2-3), Selective Repulsive KD (Eq. 4-7).

    out = distill_loss(image_features, text_features, logit_scale,  # student
                       teacher_image_features, teacher_text_features, teacher_logit_scale,
                       mode="selective", step=step, total_steps=S, w0=2.0, r=-0.8)
    out["loss"].backward()  # also in out: "clip", "weight" and the mode's terms ("kd_diag", "kd_off")

Embeddings are L2-normalised (B, D); logit scales already exponentiated (open_clip's names).
With torch.distributed and W > 1 ranks, each rank scores its B rows against the N = W * B
columns of all ranks (student gathered with gradient, teacher without) and returns the mean over
its rows, so the mean of the rank losses is the whole-batch loss of one process. all_gather's
backward sums all ranks' gradients into the owner of the rows: a rank's embedding gradient is W
times the single-process one, and DDP's averaging gives each parameter the single-process gradient.
"""

import torch
import torch.distributed.nn  # all_gather with a backward pass
import torch.nn.functional as F


def _gather(features):  # (B, D) -> (N, D): rows of all ranks in rank order, and this rank's offset
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    return torch.cat(dist.nn.functional.all_gather(features)), dist.get_rank() * len(features)


def _logits(image_features, text_features, logit_scale):
    """This rank's rows, all columns: logits_per_image, logits_per_text (B, N), labels (B,)."""
    all_image_features, offset = _gather(image_features)  # (N, D)
    all_text_features, _ = _gather(text_features)  # (N, D)
    logits_per_image = logit_scale * image_features @ all_text_features.T  # (B, N)
    logits_per_text = logit_scale * text_features @ all_image_features.T  # (B, N)
    labels = torch.arange(len(image_features), device=image_features.device) + offset  # (B,)
    return logits_per_image, logits_per_text, labels


def _clip(per_image, per_text, labels):  # Eq. 1: symmetric cross-entropy of the (B, N) logits
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def _kd(logits, teacher, tau_kd, smoothing):
    """Eq. 3 split per Eq. 6 into (diag, off): sums over j, mean over rows and both directions."""
    with torch.no_grad():  # frozen teacher: gathered and scored without gradient
        p = (torch.stack(_logits(*teacher)[:2]) / tau_kd).softmax(-1)  # (2, B, N) Eq. 2
        p = (1 - smoothing) * p + smoothing / p.shape[-1]  # confidence penalty, eps = smoothing
    h = -p * torch.stack(logits[:2]).log_softmax(-1)  # (2, B, N) terms of H(p, q), student T = 1
    diagonal = F.one_hot(logits[2], h.shape[-1]).bool()  # (B, N) True where j == i
    return h[:, diagonal].mean(), h.masked_fill(diagonal, 0).sum(-1).mean()


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric CLIP loss (Eq. 1): mean of the image->text and text->image cross-entropies."""
    return _clip(*_logits(image_features, text_features, logit_scale))


def kd_weight(step, total_steps, w0, r):
    """lambda(t) (Eq. 5) or beta(t) (Eq. 7): w0 * (1 - (t/S)(1 - r)), t/S clamped to [0, 1]."""
    if total_steps <= 0:
        raise ValueError(f"kd_weight: total_steps must be positive, got {total_steps}")
    return w0 * (1 - min(max(step / total_steps, 0.0), 1.0) * (1 - r))  # r < 0: repulsion


def coupled(weight, logits, teacher, tau_kd, smoothing, projected):
    """Eq. 4-5: lambda(t) (diag + off), the static and decaying KD baselines."""
    diag, off = _kd(logits, teacher, tau_kd, smoothing)
    return weight * (diag + off), dict(kd_diag=diag, kd_off=off)


def selective(weight, logits, teacher, tau_kd, smoothing, projected):
    """Eq. 6-7: diag + beta(t) off, the true pairs always attracted, the off-diagonal repelled once beta < 0."""
    diag, off = _kd(logits, teacher, tau_kd, smoothing)
    return diag + weight * off, dict(kd_diag=diag, kd_off=off)


# A KD mode, one entry (add yours here, or from outside: loss.KD_MODES["name"] = dict(...)): loss(weight,
# logits, teacher, tau_kd, smoothing, projected) -> (KD term, its parts to log); schedule(t, S, w0, r) ->
# weight (None: 0); weight: train.py's setting for w0, w0 its default; projected: it reads the student's
# image features through a trained Linear(D, D_T) (projected (B, D_T), else None).
KD_MODES = {
    "none": dict(loss=None, schedule=None, weight="", w0=0.0, projected=False),  # CLIP alone, Eq. 1
    "coupled": dict(loss=coupled, schedule=kd_weight, weight="lambda0", w0=1.0, projected=False),
    "selective": dict(loss=selective, schedule=kd_weight, weight="beta0", w0=2.0, projected=False),
}


def distill_loss(
    image_features,
    text_features,
    logit_scale,
    teacher_image_features=None,
    teacher_text_features=None,
    teacher_logit_scale=None,
    mode="selective",
    step=0,
    total_steps=1,
    w0=2.0,
    r=-0.8,
    tau_kd=5.0,
    smoothing=0.0,
    projected_image_features=None,
    feat_weight=2000.0,
):
    """-> dict: tensors loss and clip, the float weight (the mode's schedule at step; 0.0 without one) and
    the mode's parts. Feature KD (paper Table 3), in any mode: given projected_image_features (B, D_T) and
    feat_weight > 0, loss adds kd_feat = feat_weight * MSE(L2-normalised projection,
    teacher_image_features)."""
    teacher = (teacher_image_features, teacher_text_features, teacher_logit_scale)
    projected = projected_image_features
    if mode not in KD_MODES:
        raise ValueError(f"distill_loss: mode must be one of {tuple(KD_MODES)}, got {mode!r}")
    entry, feature_kd = KD_MODES[mode], projected is not None and feat_weight > 0
    if (entry["loss"] or feature_kd) and any(x is None for x in teacher):
        raise ValueError(f"distill_loss: mode {mode!r} (or feature KD) needs all teacher_* inputs")
    logits = _logits(image_features, text_features, logit_scale)
    clip, weight, kd, parts = _clip(*logits), 0.0, 0.0, {}
    if entry["schedule"]:
        weight = entry["schedule"](step, total_steps, w0, r)
    if entry["loss"]:
        kd, parts = entry["loss"](weight, logits, teacher, tau_kd, smoothing, projected)
    loss = clip + kd
    if feature_kd:
        normalised = F.normalize(projected, dim=-1)  # (B, D_T)
        parts["kd_feat"] = feat_weight * F.mse_loss(normalised, teacher_image_features.detach())
        loss = loss + parts["kd_feat"]
    return dict(loss=loss, clip=clip, weight=weight, **parts)
