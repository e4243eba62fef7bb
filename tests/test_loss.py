"""loss.py against the paper's equations written as loops, open_clip, and a real 2-process run."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.testing import assert_close

from loss import KD_MODES, distill_loss, feature_kd_loss, kd_weight

B, D, D_T = 5, 8, 12  # batch, student width, teacher width
TEACHER_KEYS = ("teacher_image_features", "teacher_text_features", "teacher_logit_scale")


def make_batch(seed=0, n=B, dtype=torch.float64):
    """Unit-norm student and teacher embeddings (paired rows correlated) and both logit scales."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, D, generator=g, dtype=dtype)
    text = image + torch.randn(n, D, generator=g, dtype=dtype)
    teacher_image = torch.randn(n, D_T, generator=g, dtype=dtype)
    teacher_text = teacher_image + 0.7 * torch.randn(n, D_T, generator=g, dtype=dtype)
    unit = [F.normalize(x, dim=-1) for x in (image, text, teacher_image, teacher_text)]
    scales = torch.tensor(9.0, dtype=dtype), torch.tensor(40.0, dtype=dtype)
    return dict(
        image_features=unit[0],
        text_features=unit[1],
        logit_scale=scales[0],
        teacher_image_features=unit[2],
        teacher_text_features=unit[3],
        teacher_logit_scale=scales[1],
    )


def student(batch):
    return batch["image_features"], batch["text_features"], batch["logit_scale"]


def teacher(batch):
    return tuple(batch[key] for key in TEACHER_KEYS)


def clip_loss(batch):
    return distill_loss(student(batch), mode="none")["loss"]


def kd_parts(batch, tau_kd, smoothing=0.0):
    """Eq. 6's unweighted parts (diag, off) of logit KD, whose sum is Eq. 3: the coupled mode's logged terms."""
    out = distill_loss(
        student(batch), teacher(batch), "coupled", weight=1.0, tau_kd=tau_kd, smoothing=smoothing
    )
    return out["kd_diag"], out["kd_off"]


def naive(batch, mode, weight, tau_kd=5.0, smoothing=0.0):
    """Eq. 1-7 as loops over rows i and columns j on Python floats: the parts and the total."""
    img, txt = batch["image_features"].tolist(), batch["text_features"].tolist()
    t_img, t_txt = batch["teacher_image_features"].tolist(), batch["teacher_text_features"].tolist()
    s, s_t, n = float(batch["logit_scale"]), float(batch["teacher_logit_scale"]), len(img)

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    clip = diag = off = 0.0
    for rows, cols, t_rows, t_cols in (
        (img, txt, t_img, t_txt),
        (txt, img, t_txt, t_img),
    ):  # image->text, text->image
        for i in range(n):
            z = [s * dot(rows[i], cols[j]) for j in range(n)]  # student logits, native scale
            z_t = [s_t * dot(t_rows[i], t_cols[j]) / tau_kd for j in range(n)]  # teacher, softened
            log_sum = math.log(sum(math.exp(v) for v in z))
            t_sum = sum(math.exp(v) for v in z_t)
            clip -= (z[i] - log_sum) / (2 * n)
            for j in range(n):
                p = (1 - smoothing) * math.exp(z_t[j]) / t_sum + smoothing / n
                term = -p * (z[j] - log_sum) / (2 * n)  # -p_ij log q_ij, mean of rows, directions
                if j == i:
                    diag += term
                else:
                    off += term
    if mode == "none":
        return dict(loss=clip, clip=clip)
    kd = weight * (diag + off) if mode == "coupled" else diag + weight * off
    return dict(loss=clip + kd, clip=clip, kd_diag=diag, kd_off=off)


# step, total_steps, w0, r and the weight by hand: 2 (1 - 0.25 * 1.4) = 1.3; at S 2 * -0.4 = -0.8.
SCHEDULES = [(25, 100, 2.0, -0.4, 1.3), (100, 100, 2.0, -0.4, -0.8), (0, 100, 1.0, 0.1, 1.0)]


@pytest.mark.parametrize("mode", ["none", "coupled", "selective"])
@pytest.mark.parametrize("step,total_steps,w0,r,weight", SCHEDULES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_every_mode_matches_naive_loops(mode, step, total_steps, w0, r, weight, smoothing):
    batch = make_batch(seed=step)
    scheduled = kd_weight(step, total_steps, w0, r)
    assert scheduled == pytest.approx(weight)  # the weight by hand
    out = distill_loss(
        student(batch), teacher(batch), mode, scheduled, tau_kd=5.0, smoothing=smoothing
    )
    for key, value in naive(batch, mode, weight, tau_kd=5.0, smoothing=smoothing).items():
        assert_close(out[key], torch.tensor(value, dtype=torch.float64), msg=key)
    assert out.keys() == naive(batch, mode, weight).keys()  # the mode's own terms, nothing else


def test_kd_parts_match_naive_loops_at_another_temperature():
    batch = make_batch(seed=3)
    diag, off = kd_parts(batch, tau_kd=2.0, smoothing=0.1)
    expected = naive(batch, "coupled", 1.0, tau_kd=2.0, smoothing=0.1)
    assert_close(diag, torch.tensor(expected["kd_diag"], dtype=torch.float64))
    assert_close(off, torch.tensor(expected["kd_off"], dtype=torch.float64))


def test_diag_plus_off_is_the_coupled_cross_entropy():
    batch = make_batch(seed=1)
    diag, off = kd_parts(batch, tau_kd=5.0)
    (img, txt, s), (t_img, t_txt, s_t) = student(batch), teacher(batch)

    def h(teacher, student):  # Eq. 2-3 for one direction
        return -((teacher / 5.0).softmax(1) * student.log_softmax(1)).sum(1).mean()

    coupled = (
        h(s_t * t_img @ t_txt.T, s * img @ txt.T) + h(s_t * t_txt @ t_img.T, s * txt @ img.T)
    ) / 2
    assert_close(diag + off, coupled)
    assert diag > 0.1 and off > 0.1  # both parts carry weight: the split is not trivial


def test_selective_beta_one_equals_coupled_lambda_one():
    batch = make_batch(seed=2)
    batch["image_features"].requires_grad_(True)
    selective = distill_loss(student(batch), teacher(batch), mode="selective", weight=1.0)
    coupled = distill_loss(student(batch), teacher(batch), mode="coupled", weight=1.0)
    assert_close(selective["loss"], coupled["loss"])
    grads = [
        torch.autograd.grad(out["loss"], batch["image_features"])[0] for out in (selective, coupled)
    ]
    assert_close(grads[0], grads[1])


def test_no_kd_is_open_clips_clip_loss():
    from open_clip.loss import ClipLoss  # imported here so that test collection stays fast

    batch = make_batch(seed=5, dtype=torch.float32)
    out = distill_loss(student(batch), mode="none")
    assert_close(out["loss"], ClipLoss()(*student(batch)))
    assert_close(out["clip"], out["loss"])
    assert out.keys() == {"loss", "clip"}


def test_static_kd_at_unit_temperature_matches_open_clip_distill():
    """open_clip's DistillClipLoss distill term is (H_image + H_text) / 2 with teacher rows
    softmax(S_T) and student rows log_softmax(S_S): our diag + off at tau_kd = 1."""
    from open_clip.loss import DistillClipLoss

    batch = make_batch(seed=6, dtype=torch.float32)
    contrastive, distill = DistillClipLoss()(*student(batch), *teacher(batch))
    diag, off = kd_parts(batch, tau_kd=1.0)
    assert_close(diag + off, distill)
    assert_close(clip_loss(batch), contrastive)
    static = distill_loss(student(batch), teacher(batch), mode="coupled", weight=1.0, tau_kd=1.0)
    assert_close(static["loss"], contrastive + distill)


def off_diagonal_logit_gradient(z, p):
    """d/dz_ik of -sum_{j != i} p_ij log q_ij = q_ik sum_{j != i} p_ij - p_ik [k != i]; (n, n)."""
    off_p = p * (1 - torch.eye(len(z), dtype=p.dtype))
    return z.softmax(1) * off_p.sum(1, keepdim=True) - off_p


def test_repulsion_negates_and_rescales_only_the_off_diagonal_gradient():
    batch = make_batch(seed=7)
    img, txt, s = student(batch)
    img.requires_grad_(True), txt.requires_grad_(True)
    t_img, t_txt, s_t = teacher(batch)
    # Eq. 6 off-diagonal gradient on the student logits of each direction (mean over 2B rows),
    # carried to img and txt through S = s img txt^txt and its transpose.
    g_image = off_diagonal_logit_gradient(s * img @ txt.T, (s_t * t_img @ t_txt.T / 5.0).softmax(1))
    g_text = off_diagonal_logit_gradient(s * txt @ img.T, (s_t * t_txt @ t_img.T / 5.0).softmax(1))
    g_image, g_text = g_image.detach() / (2 * B), g_text.detach() / (2 * B)
    g_off = s * (g_image + g_text.T) @ txt.detach(), s * (g_image.T + g_text) @ img.detach()
    diag_grads = []
    for step, beta in ((25, 1.3), (100, -0.8)):  # beta0 = 2, r = -0.4: attraction, then repulsion
        scheduled = kd_weight(step, 100, 2.0, -0.4)
        assert scheduled == pytest.approx(beta)
        out = distill_loss(student(batch), teacher(batch), "selective", weight=scheduled)
        weighted_off = out["loss"] - out["clip"] - out["kd_diag"]
        grads = torch.autograd.grad(weighted_off, (img, txt), retain_graph=True)
        for got, expected in zip(grads, g_off):
            assert_close(got, beta * expected)  # so at beta = -0.8: -0.8 / 1.3 times attraction
        diag_grads.append(torch.autograd.grad(out["kd_diag"], (img, txt)))
    for repelled, attracted in zip(*diag_grads):
        assert_close(repelled, attracted)


def test_weight_schedule():
    S, w0, r = 140, 2.0, -0.4
    assert kd_weight(0, S, w0, r) == pytest.approx(w0)
    assert kd_weight(S, S, w0, r) == pytest.approx(w0 * r)
    assert kd_weight(S / (1 - r), S, w0, r) == pytest.approx(0.0, abs=1e-12)  # t = 100
    assert kd_weight(99, S, w0, r) > 0 > kd_weight(101, S, w0, r)
    assert kd_weight(2 * S, S, w0, r) == kd_weight(S, S, w0, r)  # constant beyond S
    assert kd_weight(-5, S, w0, r) == pytest.approx(w0)  # t/S clamped below as well
    assert kd_weight(70, S, 1.0, 1.0) == 1.0  # r = 1: static KD
    # SPEC 3: beta0 = 2, r = -0.4 over 20 epochs ends at -0.8 and crosses zero at epoch 14.3;
    # the paper's r = -0.8 crosses near epoch 11.
    assert kd_weight(20, 20, 2.0, -0.4) == pytest.approx(-0.8)
    assert kd_weight(14.28, 20, 2.0, -0.4) > 0 > kd_weight(14.29, 20, 2.0, -0.4)
    assert kd_weight(11.1, 20, 2.0, -0.8) > 0 > kd_weight(11.2, 20, 2.0, -0.8)
    with pytest.raises(ValueError, match="total_steps"):
        kd_weight(1, 0, 1.0, 0.1)


def test_feature_kd_matches_hand_reference():
    batch = make_batch(seed=8)
    projected = torch.randn(B, D_T, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    total = 0.0
    for row, teacher_row in zip(projected.tolist(), batch["teacher_image_features"].tolist()):
        norm = math.sqrt(sum(x * x for x in row))
        total += sum((x / norm - t) ** 2 for x, t in zip(row, teacher_row))
    got = feature_kd_loss(projected, batch["teacher_image_features"])
    assert_close(got, torch.tensor(total / (B * D_T), dtype=torch.float64))


def test_teacher_gets_no_gradient_and_bad_inputs_fail_early():
    batch = make_batch(seed=10)
    for key in ("image_features", "teacher_image_features", "teacher_text_features"):
        batch[key].requires_grad_(True)
    projected = batch["image_features"] @ torch.ones(D, D_T, dtype=torch.float64)
    out = distill_loss(student(batch), teacher(batch), mode="coupled", weight=1.0)
    (out["loss"] + feature_kd_loss(projected, batch["teacher_image_features"])).backward()
    assert batch["image_features"].grad is not None
    assert batch["teacher_image_features"].grad is None
    assert batch["teacher_text_features"].grad is None
    with pytest.raises(ValueError, match="'selectiv'"):
        distill_loss(student(batch), teacher(batch), mode="selectiv")
    for missing in (None, (None, None, None)):
        with pytest.raises(ValueError, match="'coupled' needs the teacher"):
            distill_loss(student(batch), missing, mode="coupled")


# ---- data parallelism: 2 gloo processes against one process on the concatenated batch ----

WORLD = 2


def student_step(rank, world):
    """A tiny student on this rank's rows of a 2B batch: selective repulsive KD with smoothing and
    feature KD. Returns the loss and the gradients of each parameter and local text embedding."""
    torch.manual_seed(0)  # same parameters and data on every rank; float64 so 1e-5 means something
    f64 = dict(dtype=torch.float64)
    encoder, projection = torch.nn.Linear(5, D, **f64), torch.nn.Linear(D, D_T, **f64)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0), **f64))
    pixels, text = torch.randn(B * WORLD, 5, **f64), torch.randn(B * WORLD, D, **f64)
    teacher = make_batch(seed=11, n=B * WORLD)
    rows = slice(rank * B * WORLD // world, (rank + 1) * B * WORLD // world)
    text = text[rows].clone().requires_grad_(True)
    image_features = F.normalize(encoder(pixels[rows]), dim=-1)
    teacher_out = (
        teacher["teacher_image_features"][rows],
        teacher["teacher_text_features"][rows],
        teacher["teacher_logit_scale"],
    )
    student_out = (image_features, F.normalize(text, dim=-1), log_scale.exp())
    beta = kd_weight(90, 100, 2.0, -0.4)
    out = distill_loss(student_out, teacher_out, "selective", beta, smoothing=0.1)
    kd_feat = 2000 * feature_kd_loss(projection(image_features), teacher_out[0])
    (out["loss"] + kd_feat).backward()
    params = [*encoder.named_parameters("encoder"), *projection.named_parameters("projection")]
    return dict(
        loss=(out["loss"] + kd_feat).detach(),
        log_scale=log_scale.grad,
        text=text.grad,
        **{name: p.grad for name, p in params},
    )


def gloo_worker(rank, store, results):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.save(student_step(rank, WORLD), f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_on_the_whole_batch(tmp_path):
    # fork, not spawn: the workers need not import torch again (seconds on a 2-core machine)
    mp.start_processes(
        gloo_worker,
        args=(str(tmp_path / "store"), str(tmp_path)),
        nprocs=WORLD,
        start_method="fork",
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    single = student_step(0, 1)
    assert (ranks[0]["loss"] - single["loss"]).abs() > 1e-3  # a rank alone sees only its rows
    # The rank mean of the losses and parameter gradients (DDP's gradient average) is the single
    # process's; all_gather's backward makes each local embedding gradient W times the single one.
    for name, expected in single.items():
        if name == "text":
            got = torch.cat([r[name] for r in ranks]) / WORLD
        else:
            got = sum(r[name] for r in ranks) / WORLD
        assert_close(got, expected, atol=1e-5, rtol=0, msg=name)


def cosine_feature_kd(weight, logits, teacher, tau_kd, smoothing, projected):
    """A KD mode written outside loss.py: weight * (1 - cosine of the projected student and teacher image rows)."""
    distance = 1 - F.cosine_similarity(projected, teacher[0], dim=-1).mean()
    return weight * distance, {"kd_cos": distance}


COSINE_MODE = dict(
    loss=cosine_feature_kd, schedule=kd_weight, weight="gamma0", w0=3.0, projected=True
)


def test_a_mode_added_from_outside_is_scheduled_and_reports_its_own_terms(monkeypatch):
    monkeypatch.setitem(KD_MODES, "cosine", COSINE_MODE)
    batch = make_batch(seed=12)
    projected = torch.randn(
        B, D_T, generator=torch.Generator().manual_seed(13), dtype=torch.float64
    )
    # weight 3 (1 - 0.3 * 1.5) = 1.65, by hand
    weight = COSINE_MODE["schedule"](30, 100, 3.0, -0.5)
    assert weight == pytest.approx(1.65)
    out = distill_loss((*student(batch), projected), teacher(batch), mode="cosine", weight=weight)
    rows = zip(projected.tolist(), batch["teacher_image_features"].tolist())
    cosines = [sum(p * t for p, t in zip(a, b)) / math.sqrt(sum(p * p for p in a)) for a, b in rows]
    distance = 1 - sum(cosines) / B  # the teacher rows are unit-norm
    assert out.keys() == {"loss", "clip", "kd_cos"}
    assert_close(out["kd_cos"], torch.tensor(distance, dtype=torch.float64))
    assert_close(out["loss"], clip_loss(batch) + 1.65 * distance)
