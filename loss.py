"""MobileFetalCLIP losses: CLIP (Eq. 1), logit KD (Eq. 2-3), Selective Repulsive KD (Eq. 4-7).

    student = (image_features, text_features, logit_scale)  # and teacher: open_clip's CLIP outputs
    beta = kd_weight(step, total_steps, w0=2.0, r=-0.8)  # Eq. 7
    out = distill_loss(student, teacher, mode="selective", weight=beta, tau_kd=5.0)
    out["loss"].backward()  # also in out: "clip" and the mode's terms ("kd_diag", "kd_off")
    distill_loss(student, mode="none")["loss"]  # the CLIP loss alone (Eq. 1)

Embeddings are L2-normalised (B, D); logit scales already exponentiated (open_clip's names). With
torch.distributed, each of W ranks scores its B rows against the N = W * B columns of all ranks (the
student gathered with gradient, the teacher without): the mean of the rank losses is one process's loss
on the whole batch, and after DDP's gradient average so is each parameter's gradient.
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


def _kd(logits, teacher, tau_kd, smoothing):
    """Eq. 3 split per Eq. 6 into (diag, off): sums over j, mean over rows and both directions."""
    with torch.no_grad():  # frozen teacher: gathered and scored without gradient
        p = (torch.stack(_logits(*teacher)[:2]) / tau_kd).softmax(-1)  # (2, B, N) Eq. 2
        p = (1 - smoothing) * p + smoothing / p.shape[-1]  # confidence penalty, eps = smoothing
    h = -p * torch.stack(logits[:2]).log_softmax(-1)  # (2, B, N) terms of H(p, q), student T = 1
    diagonal = F.one_hot(logits[2], h.shape[-1]).bool()  # (B, N) True where j == i
    return h[:, diagonal].mean(), h.masked_fill(diagonal, 0).sum(-1).mean()


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


# A KD mode is one entry (add yours here or as loss.KD_MODES["name"] = dict(...)). loss(weight, logits,
# teacher, tau_kd, smoothing, projected) -> (KD term, its parts to log); schedule(t, S, w0, r) -> weight;
# weight names train.py's setting for w0, w0 its default; projected: it reads the student's projection.
KD_MODES = {
    "none": dict(loss=None, schedule=None, weight="", w0=0.0, projected=False),  # CLIP alone, Eq. 1
    "coupled": dict(loss=coupled, schedule=kd_weight, weight="lambda0", w0=1.0, projected=False),
    "selective": dict(loss=selective, schedule=kd_weight, weight="beta0", w0=2.0, projected=False),
}


def distill_loss(student, teacher=None, mode="selective", weight=0.0, tau_kd=5.0, smoothing=0.0):
    """-> dict: tensors loss and clip, and the mode's parts. student: (image_features, text_features,
    logit_scale) and, for a projected mode, its image features through the trained Linear(D, D_T) (B, D_T);
    teacher: its three, or None without KD; weight: the mode's schedule at this step (lambda or beta)."""
    if mode not in KD_MODES:
        raise ValueError(f"distill_loss: mode must be one of {tuple(KD_MODES)}, got {mode!r}")
    kd_loss = KD_MODES[mode]["loss"]
    if kd_loss and (teacher is None or any(x is None for x in teacher)):
        raise ValueError(f"distill_loss: mode {mode!r} needs the teacher's three outputs")
    logits = _logits(*student[:3])
    per_image, per_text, labels = logits
    clip = (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2  # Eq. 1
    if kd_loss is None:
        return dict(loss=clip, clip=clip)
    projected = student[3] if len(student) > 3 else None
    kd, parts = kd_loss(weight, logits, teacher, tau_kd, smoothing, projected)
    return dict(loss=clip + kd, clip=clip, **parts)


def feature_kd_loss(projected_image_features, teacher_image_features):
    """The feature-KD baseline (paper Table 3, weighted 2000 there): MSE of the L2-normalised projection of
    the student's image features (B, D_T) and the teacher's, which get no gradient."""
    normalised = F.normalize(projected_image_features, dim=-1)
    return F.mse_loss(normalised, teacher_image_features.detach())
