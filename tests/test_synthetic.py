"""synthetic.py: the demo benchmark is deterministic, written in the real formats, and carries the cues a
sonographer reads (head size in mm through the spacing, sub-plane structures, maturity), so that a few steps
of CLIP training on it lift a model above chance."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import data
import evaluate
import loss
import protocol
from model import create_model
from tools import synthetic

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
TINY = dict(n_train=7, n_planes=42, n_hc18=3, width=64, height=48, shard_size=4)


def files_of(folder):
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, names in os.walk(folder)
        for f in names
    }


def test_generator_is_deterministic(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        synthetic.generate(str(tmp_path / name), seed=seed, **TINY)
    a, b, c = (files_of(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_a_generation_killed_half_way_leaves_nothing_to_reuse(tmp_path, monkeypatch):
    """train.py generates data_dir only when it is missing: a generation that stops in its HC18 part (after
    the shards and the Planes DB) must leave no data_dir, or a later run would take the half for the
    benchmark."""

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_hc18", killed)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(str(tmp_path / "demo"), **TINY)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    synthetic.generate(str(tmp_path / "demo"), **TINY)
    assert sorted(os.listdir(tmp_path / "demo")) == ["hc18", "planes", "scans", "shards"]
    assert len(os.listdir(tmp_path)) == 1


def test_an_out_dir_holding_other_files_is_refused_not_replaced(tmp_path):
    """Before: --out_dir=my_data replaced the whole folder, the user's files with it."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    sizes = [f"--{k}={v}" for k, v in TINY.items()]
    with pytest.raises(
        SystemExit, match="did not write \\(notes.txt\\), and it is replaced as a whole"
    ):
        synthetic.main([f"--out_dir={tmp_path / 'mine'}", *sizes])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    with pytest.raises(SystemExit, match="notes.txt is a file, not a folder"):
        synthetic.main([f"--out_dir={tmp_path / 'mine' / 'notes.txt'}", *sizes])
    synthetic.main([f"--out_dir={tmp_path / 'demo'}", *sizes])
    synthetic.main([f"--out_dir={tmp_path / 'demo'}", *sizes])  # its own folder: replaced
    assert sorted(os.listdir(tmp_path / "demo")) == ["hc18", "planes", "scans", "shards"]


def test_generator_writes_the_real_formats(tmp_path):
    synthetic.generate(str(tmp_path), seed=0, **TINY)
    rows = protocol.read_planes_db(tmp_path / "planes")
    assert len(rows) == 42
    assert {r["plane"] for r in rows} == {
        "Fetal brain",
        "Fetal abdomen",
        "Fetal thorax",
        "Fetal femur",
        "Maternal cervix",
        "Other",
    }
    brain = [r["brain_plane"] for r in rows if r["plane"] == "Fetal brain"]
    assert sorted(set(brain)) == [
        "Other",
        "Trans-cerebellum",
        "Trans-thalamic",
        "Trans-ventricular",
    ]
    assert {r["brain_plane"] for r in rows if r["plane"] != "Fetal brain"} == {"Not A Brain"}
    assert {r["train"] for r in rows} == {True, False}
    assert (
        Image.open(rows[0]["path"]).size == (64, 48) and Image.open(rows[0]["path"]).format == "PNG"
    )
    hc18 = protocol.read_hc18(tmp_path / "hc18")
    assert len(hc18) == 3 and all(Image.open(r["path"]).size == (800, 540) for r in hc18)
    assert all(80 < r["hc"] < 360 and 0.02 < r["pixel_size"] < 0.6 for r in hc18)
    urls = synthetic.layout(str(tmp_path))["train_data"]
    assert len(data.expand_urls(urls)) == 2 and data.count_samples(urls) == 7
    batches = list(data.train_loader(urls, (32, *IMAGENET), (24, *CLIP), 7))
    assert len(batches) == 1 and batches[0][0].shape == (7, 3, 32, 32)


def test_ga_curve_matches_the_protocol():
    # the protocol's q500, computed here from its printed coefficients
    def q500(d):
        return math.exp(
            2.09924879247164
            + 0.253373656106037 * d / 7
            - 6.05647816678282e-3 * (d / 7) ** 2
            + 5.14256072059917e-5 * (d / 7) ** 3
        )

    for days in (98, 140, 203, 266):
        assert synthetic.hc_median(days) == pytest.approx(q500(days), rel=1e-12)


def skull_trace(image, centre, radii, fluid=24, run=12):
    """Measure a head as a sonographer would: along rays from a point inside it, the first stretch of
    amniotic fluid (run dark samples of the smoothed image), then the brightest point just inside it (the
    skull); radii median-filtered over neighbouring rays and low-passed. Returns the trace's perimeter and
    centre (pixels)."""
    smooth = np.asarray(
        Image.fromarray(image).filter(ImageFilter.GaussianBlur(3)), dtype=np.float32
    )
    angles = np.linspace(0, 2 * math.pi, 360, endpoint=False)
    xs = (
        (centre[0] + np.cos(angles)[:, None] * radii)
        .round()
        .astype(int)
        .clip(0, image.shape[1] - 1)
    )
    ys = (
        (centre[1] + np.sin(angles)[:, None] * radii)
        .round()
        .astype(int)
        .clip(0, image.shape[0] - 1)
    )
    ring, back = [], len(radii) // 6
    for profile in smooth[ys, xs]:
        edge = int(np.argmax(np.convolve(profile < fluid, np.ones(run), "valid") == run))
        ring.append(radii[max(edge - back, 0) + profile[max(edge - back, 0) : edge + 1].argmax()])
    ring = np.median(np.stack([np.roll(ring, k) for k in range(-10, 11)]), axis=0)
    # an off-centre ellipse is smooth in angle
    ring = np.fft.irfft(np.fft.rfft(ring)[:6], n=len(ring))
    points = np.stack([np.cos(angles) * ring, np.sin(angles) * ring], 1)
    perimeter = np.linalg.norm(points - np.roll(points, 1, axis=0), axis=1).sum()
    return perimeter, (centre[0] + points[:, 0].mean(), centre[1] + points[:, 1].mean())


def test_hc18_heads_measure_what_the_csv_says(tmp_path):
    """The skull traced on the written 800x540 PNGs (rays searched from 0.4 to 1.6 times the CSV's semi-axis,
    from the image centre, then from the trace's centre), through the CSV's pixel size, gives the CSV's head
    circumference within a few percent. Heads whose skull leaves the sector are skipped; acoustic shadows
    across a skull (as in real scans) cost the tracer a few percent on some heads."""
    synthetic.write_hc18(str(tmp_path), 0, 24)
    ratios = []
    for row in protocol.read_hc18(tmp_path):
        image = np.asarray(Image.open(row["path"]).convert("L"))
        # b = 0.8 a (approx.)
        a = row["hc"] / row["pixel_size"] / (math.pi * 1.8 * (1 + 3 * (1 / 9) ** 2 / 10))
        if a > 250:  # the skull's top or sides outside the sector
            continue
        radii = np.arange(0.4 * a, 1.6 * a, 1.0)
        perimeter, centre = skull_trace(image, skull_trace(image, (400, 270), radii)[1], radii)
        ratios.append(perimeter * row["pixel_size"] / row["hc"])
    ratios = np.array(ratios)
    assert len(ratios) >= 12 and abs(np.median(ratios) - 1) < 0.02, ratios.round(3)
    assert np.mean(abs(ratios - 1) < 0.03) >= 0.75 and abs(ratios - 1).max() < 0.1, ratios.round(3)


def input_sized_mean(kind, subplane, weeks, n=12):
    """Mean of n scans (same pose, fresh speckle and quality) at the demo models' input size."""
    days, size = weeks * 7, synthetic.DEMO_INPUT
    total = np.zeros((size, size), np.float32)
    for i in range(n):
        rng = np.random.default_rng([7, i])
        hc = synthetic.hc_median(days)
        mm_per_px = synthetic.pick_zoom(hc / synthetic.ellipse_perimeter(1, 0.8)) * size / 160
        scan = synthetic.render_scan(
            rng, kind, subplane, hc, mm_per_px, 160, 160, days, pose=(0.5, 0.5, 0.0)
        )
        total += np.asarray(Image.fromarray(scan).resize((size, size), Image.BOX), dtype=np.float32)
    return total / n


def test_each_sub_plane_shows_its_structures_at_the_input_size():
    """Pose fixed (occiput to the right), averaged over quality and speckle, at the models' input size: the
    thalami dark beside the midline, the lateral ventricles dark further forward with the bright choroid
    plexus behind, the cerebellum bright near the occiput, each only in its own sub-plane."""
    scans = {
        s[6:]: input_sized_mean("brain", s, 26) for s in synthetic.SUBPLANES
    }  # thalamic, cerebellum, ...
    half_mm = synthetic.hc_median(26 * 7) / synthetic.ellipse_perimeter(1, 0.8)
    a, centre = (
        half_mm / synthetic.pick_zoom(half_mm),
        synthetic.DEMO_INPUT / 2,
    )  # semi-major axis, input px

    def at(u, v):  # each scan's value at (u, v) in semi-axes from the centre
        return {
            s: scan[round(centre + v * 0.8 * a), round(centre + u * a)] for s, scan in scans.items()
        }

    thalamus, ventricle, choroid, cerebellum = (
        at(0, 0.16),
        at(-0.3, 0.21),
        at(0.33, 0.21),
        at(0.6, 0.15),
    )
    assert thalamus["thalamic"] < 0.75 * thalamus["cerebellum"]
    assert ventricle["ventricular"] < 0.75 * min(ventricle["thalamic"], ventricle["cerebellum"])
    assert choroid["ventricular"] > 1.5 * max(choroid["thalamic"], choroid["cerebellum"])
    assert cerebellum["cerebellum"] > 1.5 * max(cerebellum["thalamic"], cerebellum["ventricular"])


def test_the_brain_matures_with_gestational_age():
    """Skull brighter and thicker, ventricles narrower relative to the head, cerebellum larger in head units
    (clean canvas, full contrast)."""
    size, a = 400, 150.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = x - size / 2, y - size / 2

    def head(weeks, subplane):
        tissue = np.zeros((size, size), np.float32)
        synthetic.draw_head(tissue, u, v, a, a / 60, weeks, subplane, 1.0)  # a 60 mm semi-axis
        return tissue

    young, old = head(18, ""), head(36, "")

    def ring(t):  # pixels of the skull's value
        return (t == t[size // 2, size // 2 + int(a)]).sum()

    assert old[size // 2, size // 2 + int(a)] > young[size // 2, size // 2 + int(a)] + 0.3
    assert ring(old) > 1.5 * ring(young)
    # within the brain
    inside = slice(size // 2 - int(0.6 * 0.8 * a), size // 2 + int(0.6 * 0.8 * a))

    def width(t):  # anechoic ventricles crossed by a vertical line
        return (t[inside, size // 2 - 15] < 0.05).sum()

    assert width(head(16, "trans-ventricular")) > 1.3 * width(head(34, "trans-ventricular"))

    def bright(t):  # cerebellar hemispheres and vermis (and the Sylvian fissure)
        return (t >= 0.69).sum()

    assert bright(head(34, "trans-cerebellum")) - bright(head(34, "")) > 2 * (
        bright(head(20, "trans-cerebellum")) - bright(head(20, ""))
    )


def test_captions_follow_the_protocols_wording():
    days, spacing = 22 * 7 + 3, 1.5
    captions = [
        synthetic.make_caption(np.random.default_rng(i), "brain", "trans-thalamic", days, spacing)
        for i in range(40)
    ]
    verbatim = {
        t.format(weeks=22, day=3, pixel_spacing="1.50") for t in protocol.PROMPTS["ga_templates"]
    }
    # a GA template, spacing included
    assert any(any(c.startswith(t) for t in verbatim) for c in captions)
    assert all("22 weeks" in c for c in captions)
    assert "heart" in synthetic.make_caption(np.random.default_rng(0), "heart", None)
    views = [
        synthetic.make_caption(np.random.default_rng(i), "brain", "trans-cerebellum")
        for i in range(20)
    ]
    assert all("cerebellum" in c for c in views)


def five_plane_f1(model, planes_dir):
    """The protocol's five-plane zero-shot macro F1 (prompt-averaged class embeddings, argmax over 9 classes)."""
    rows = [r for r in protocol.planes_rows(planes_dir) if r["five"] >= 0]
    with torch.no_grad():
        features, _ = evaluate.encode_images(model.eval(), [r["path"] for r in rows])
        classes = evaluate.class_embeddings(model, protocol.PROMPTS["five_planes"])
    model.train()
    return protocol.macro_f1((features @ classes.T).argmax(1).numpy(), [r["five"] for r in rows])


def clip_training_lift(folder, seed):
    """A tiny benchmark (seed `seed`) and ~150 steps of CLIP training from scratch (torch seed `seed`) ->
    the demo teacher's five-plane zero-shot F1 before and after."""
    synthetic.generate(
        folder,
        seed=seed,
        n_train=768,
        n_planes=105,
        n_hc18=1,
        width=96,
        height=72,
        shard_size=384,
    )
    folders = synthetic.layout(folder)
    torch.manual_seed(seed)
    model = create_model("demo_teacher")
    before = five_plane_f1(model, folders["planes_dir"])
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    steps = 6 * 768 // 32

    def warmup_then_cosine(
        step,
    ):  # train.py's schedule: the last steps settle instead of oscillating
        return min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_then_cosine)
    view = (model.image_size, model.image_mean, model.image_std)
    for epoch in range(6):
        batches = data.train_loader(
            folders["train_data"], view, None, 32, epoch=epoch, context_length=model.context_length
        )
        for images, _, tokens in batches:
            optimiser.zero_grad()
            loss.distill_loss(model(images, tokens), mode="none")["loss"].backward()
            optimiser.step()
            schedule.step()
    return before, five_plane_f1(model, folders["planes_dir"])


def test_a_few_steps_of_clip_training_lift_a_model_above_chance(tmp_path):
    """The five-plane zero-shot F1 rises from chance (about 0.2 with nine prompt classes) to well above it."""
    before, after = clip_training_lift(str(tmp_path), seed=0)
    # Float kernels differ between CPUs and 144 steps amplify the difference. Measured over seeds 0-4 (each
    # seed's benchmark and initialisation): after 0.48-0.96 on this project's AVX-512 Xeon and 0.40-0.94
    # with PyTorch, MKL and oneDNN held to AVX2 (ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2,
    # ONEDNN_MAX_CPU_ISA=AVX2), seed 0 0.480 and 0.404; before 0.05-0.11; chance about 0.2. With a constant
    # learning rate (no cosine decay) one seed stayed at chance (0.23). The bound 0.3 sits 0.10 under the
    # lowest measured, more than seed 0 moved between the two kernel sets (0.08)
    assert before < 0.3 and after > 0.3, (before, after)


def test_the_readme_grid_is_one_scan_per_class_and_age(tmp_path):
    synthetic.draw_grid(str(tmp_path / "grid.png"), weeks=(20, 30), size=32, scale=1)
    assert Image.open(tmp_path / "grid.png").size == (120 + 2 * 32, 14 + 8 * 32)


def test_the_demo_scans_read_as_a_clinics_export(tmp_path):
    import pydicom

    from tools import scans

    synthetic.write_scans(str(tmp_path), seed=0)
    found, ignored, skipped = scans.find([str(tmp_path)])
    assert [os.path.basename(p) for p, _ in found] == [
        "head16.png",
        "loop.mp4",
        "sweep",
    ] and not ignored + skipped
    views = {os.path.basename(p): list(scans.read(p, kind)) for p, kind in found}
    # (24, 300, 320, 3): the tissue above a Doppler strip
    stored = pydicom.dcmread(tmp_path / "sweep").pixel_array
    # the strip is left out
    assert len(views["sweep"]) == 24 and all(v.region == 0 for v in views["sweep"])
    assert np.array_equal(np.asarray(views["sweep"][9].image), stored[9, :240])
    assert (
        views["sweep"][0].pixel_size_mm > 0
        and views["sweep"][0].spacing_source == "ultrasound region 0"
    )
    assert len(views["loop.mp4"]) == 8 and views["head16.png"][0].pixels == "16-bit / 257"
