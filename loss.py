"""MobileFetalCLIP losses: CLIP (Eq. 1), logit KD (Eq. 2-3), Selective Repulsive KD (Eq. 4-7).

    out = distill_loss(image_features, text_features, logit_scale,  # student
                       teacher_image_features, teacher_text_features, teacher_logit_scale,
                       mode="selective", step=step, total_steps=S, w0=2.0, r=-0.4)
    out["loss"].backward()  # also in out: "clip", "kd_diag", "kd_off", "kd_feat", "weight"

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

KD_MODES = ("none", "coupled", "selective")  # distill_loss's modes: CLIP alone, Eq. 4-5, Eq. 6-7


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


def _clip(logits_per_image, logits_per_text, labels):  # Eq. 1, symmetric cross-entropy
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


def _kd(logits, teacher_features, tau_kd, smoothing):
    """Eq. 3 split per Eq. 6 into (diag, off): sums over j, mean over rows and both directions."""
    with torch.no_grad():  # frozen teacher: gathered and scored without gradient
        p = (torch.stack(_logits(*teacher_features)[:2]) / tau_kd).softmax(-1)  # (2, B, N) Eq. 2
        p = (1 - smoothing) * p + smoothing / p.shape[-1]  # confidence penalty, eps = smoothing
    h = -p * torch.stack(logits[:2]).log_softmax(-1)  # (2, B, N) terms of H(p, q), student T = 1
    diagonal = F.one_hot(logits[2], h.shape[-1]).bool()  # (B, N) True where j == i
    return h[:, diagonal].mean(), h.masked_fill(diagonal, 0).sum(-1).mean()


def clip_loss(image_features, text_features, logit_scale):
    """Symmetric CLIP loss (Eq. 1): mean of the image->text and text->image cross-entropies."""
    return _clip(*_logits(image_features, text_features, logit_scale))


def kd_loss(image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
            teacher_logit_scale, tau_kd=5.0, smoothing=0.0):  # fmt: skip
    """Logit KD (Eq. 3) as its two unweighted parts (diag, off) of Eq. 6; diag + off is Eq. 3."""
    teacher = (teacher_image_features, teacher_text_features, teacher_logit_scale)
    return _kd(_logits(image_features, text_features, logit_scale), teacher, tau_kd, smoothing)


def kd_weight(step, total_steps, w0, r):
    """lambda(t) (Eq. 5) or beta(t) (Eq. 7): w0 * (1 - (t/S)(1 - r)), t/S clamped to [0, 1]."""
    if total_steps <= 0:
        raise ValueError(f"kd_weight: total_steps must be positive, got {total_steps}")
    return w0 * (1 - min(max(step / total_steps, 0.0), 1.0) * (1 - r))  # r < 0: repulsion


def distill_loss(image_features, text_features, logit_scale, teacher_image_features=None, teacher_text_features=None,
                 teacher_logit_scale=None, mode="selective", step=0, total_steps=1, w0=1.0, r=1.0, tau_kd=5.0,
                 smoothing=0.0, projected_image_features=None, feat_weight=2000.0):  # fmt: skip
    """A mode's loss and its parts: tensors loss, clip, kd_diag, kd_off, kd_feat (0 when unused)
    and the float weight = kd_weight(step, total_steps, w0, r) (0.0 for "none").
        "none":      loss = clip                                   (Eq. 1)
        "coupled":   loss = clip + lambda(t) * (kd_diag + kd_off)  (Eq. 4-5)
        "selective": loss = clip + kd_diag + beta(t) * kd_off      (Eq. 6-7)
    Feature KD, in any mode: projected_image_features (B, D_T) are the student's image features
    through the caller's Linear(D, D_T); kd_feat = feat_weight * MSE(L2-normalised projection,
    teacher_image_features) is added to loss."""
    teacher = (teacher_image_features, teacher_text_features, teacher_logit_scale)
    if mode not in KD_MODES:
        raise ValueError(f"distill_loss: mode must be one of {KD_MODES}, got {mode!r}")
    if (mode != "none" or projected_image_features is not None) and any(x is None for x in teacher):
        raise ValueError(f"distill_loss: mode {mode!r} (or feature KD) needs all teacher_* inputs")
    logits = _logits(image_features, text_features, logit_scale)
    clip = _clip(*logits)
    diag = off = feat = clip.new_zeros(())
    weight = 0.0 if mode == "none" else kd_weight(step, total_steps, w0, r)
    if mode != "none":
        diag, off = _kd(logits, teacher, tau_kd, smoothing)
    if projected_image_features is not None:  # the static + feature KD baseline (paper Table 3)
        student = F.normalize(projected_image_features, dim=-1)  # (B, D_T)
        feat = feat_weight * F.mse_loss(student, teacher_image_features.detach())
    kd = weight * (diag + off) if mode == "coupled" else diag + weight * off  # 0 for "none"
    return dict(
        loss=clip + kd + feat, clip=clip, kd_diag=diag, kd_off=off, kd_feat=feat, weight=weight
    )
