"""synthetic.py: the demo benchmark is deterministic, written in the real formats, and drawn to scale."""

import math
import os

import numpy as np
import pytest
from PIL import Image

import data
import synthetic

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


def test_generator_output_reads_back(tmp_path):
    synthetic.generate(str(tmp_path), seed=0, **TINY)
    rows = data.read_planes_db(tmp_path / "planes")
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
    assert len(brain) == 14 and sorted(set(brain)) == [
        "Other",
        "Trans-cerebellum",
        "Trans-thalamic",
        "Trans-ventricular",
    ]
    assert {r["brain_plane"] for r in rows if r["plane"] != "Fetal brain"} == {"Not A Brain"}
    assert {r["train"] for r in rows} == {True, False} and len({r["patient"] for r in rows}) == 9
    assert Image.open(rows[0]["path"]).size == (64, 48)
    hc18 = data.read_hc18(tmp_path / "hc18")
    assert len(hc18) == 3 and all(Image.open(r["path"]).size == (800, 540) for r in hc18)
    assert all(80 < r["hc"] < 360 and 0.05 < r["pixel_size"] < 0.6 for r in hc18)
    urls = synthetic.layout(str(tmp_path))["train_data"]
    assert len(data.expand_urls(urls)) == 2 and data.count_samples(urls) == 7
    batches = list(data.train_loader(urls, (32, *IMAGENET), (24, *CLIP), 7))
    assert len(batches) == 1 and batches[0][0].shape == (7, 3, 32, 32)


def test_ga_curve_matches_the_protocol():
    # the protocol's q500, computed here from its printed coefficients
    q500 = lambda d: math.exp(
        2.09924879247164
        + 0.253373656106037 * d / 7
        - 6.05647816678282e-3 * (d / 7) ** 2
        + 5.14256072059917e-5 * (d / 7) ** 3
    )
    for days in (98, 140, 203, 266):
        assert synthetic.hc_median(days) == pytest.approx(q500(days), rel=1e-12)
    assert 95 < synthetic.hc_median(98) < 105 and 320 < synthetic.hc_median(266) < 340


def test_head_is_drawn_to_scale():
    """The drawn head's mid-skull ellipse has the requested circumference at the pixel spacing."""
    y, x = np.mgrid[0:540, 0:800].astype(np.float32)
    for hc, mm_per_px in ((180.0, 0.2), (300.0, 0.3)):
        tissue = np.full((540, 800), -1.0, np.float32)  # sentinel: untouched
        synthetic.draw_anatomy(tissue, x, y, np.random.default_rng(0), "brain", "", hc, 1 / mm_per_px)
        outer = ((tissue != -1) & (tissue != np.float32(0.06))).sum()  # skull and inside
        inner = outer - (tissue == np.float32(0.95)).sum()  # inside the skull
        a = math.sqrt((outer + inner) / 2 / (math.pi * 0.8))  # mid-skull semi-major axis, b = 0.8 a
        t = np.linspace(0, 2 * math.pi, 100001)  # perimeter by numerical integration
        perimeter = np.trapezoid(np.hypot(a * np.sin(t), 0.8 * a * np.cos(t)), t)
        assert perimeter * mm_per_px == pytest.approx(hc, rel=0.02)


def test_captions_follow_protocol_wording():
    rng = np.random.default_rng(0)
    caption = synthetic.make_caption(rng, "brain", "trans-thalamic", ga_days=22 * 7 + 3, spacing=1.4)
    assert "22 weeks" in caption and "3 days" in caption and "1.40 mm/pixel" in caption and "brain" in caption
    assert "heart" in synthetic.make_caption(rng, "heart", None)
