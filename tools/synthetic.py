"""Synthetic fetal-ultrasound benchmark in the real file formats: the data of the CPU demo (python train.py).

    python -m tools.synthetic                                  # writes data/demo: shards/ planes/ hc18/ scans/
    python -m tools.synthetic --out_dir=data/big --seed=1 --n_train=20000
    python -m tools.synthetic --grid=assets/synthetic.png         # one scan per class and GA, as the models see it

Every file is a function of --seed (same seed, byte-identical files):
  shards/train-NNNNNN.tar   WebDataset pretraining pairs <key>.jpg + <key>.txt
  planes/                   FETAL_PLANES_DB format: the five planes, the three brain sub-planes and 'Other'
  hc18/                     HC18 format: 800x540 trans-thalamic heads, pixel size and head circumference
  scans/                    a clinic's export for predict.py: a DICOM cine (regions), an MP4, a 16-bit PNG

Scans are B-mode-like: a sector on black, Rayleigh speckle, depth attenuation, anatomy drawn to scale in mm
through the pixel spacing, and a random image quality that fades the inner structures (low-quality scans are
ambiguous, as real ones are). What a sonographer reads is drawn where a sonographer reads it. Planes: head
(skull ellipse, falx), abdomen (round trunk, stomach bubble, umbilical vein, spine, few ribs), thorax (rib
ring, four-chamber heart), femur (bright diaphysis, acoustic shadow), cervix (transvaginal fan, canal);
spine and kidney are 'Other'. Sub-planes: trans-thalamic (paired hypoechoic thalami beside the third
ventricle), trans-cerebellum (hemispheres joined by the bright vermis, the cisterna magna behind),
trans-ventricular (anechoic lateral ventricles, echogenic choroid plexus); the cavum septi pellucidi in all
three. GA: the head circumference follows protocol.GA_CURVES q500 (3% spread); the skull ossifies, the
Sylvian fissure deepens from 18 weeks, sulci appear from 23, the ventricle/hemisphere ratio falls (0.58 at
14 weeks, 0.31 at 32), the transcerebellar diameter grows ~1 mm a week; each fetus looks +- ~1 week older.
Captions use the protocol's wording (zero_shot_prompts.json): plane and sub-plane phrases, and for GA either
the five GA templates verbatim or the same facts in other words; spacings are mm per model-input pixel."""

import io
import math
import os
import sys
import time

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw, ImageFilter

import configurator
import data
import protocol
from model import MODEL_CONFIGS
from protocol import PROMPTS, ga_quantile

# ------------------------------------------------------------------ settings: --key=value, read by the command
DEFAULTS = {
    "out_dir": configurator.DEMO_DIR,  # output folder
    "seed": 0,  # every file written is a function of this seed
    "n_train": 3000,  # pretraining pairs
    "n_planes": 300,  # Planes DB images
    "n_hc18": 150,  # HC18 images (800x540)
    "width": 160,  # shard and Planes DB image width
    "height": 120,  # ... and height
    "shard_size": 500,  # pairs per shard
    "input_size": MODEL_CONFIGS["demo_student"][
        "image_size"
    ],  # the input the captions' spacings refer to
    "grid": "",  # a PNG path: draw one scan per class (rows) and GA (columns) there instead, as in the README
}
DEMO_INPUT = DEFAULTS["input_size"]

ZOOMS = (0.75, 1.5, 3.0, 6.0)  # mm per model-input pixel: depth presets a factor 2 apart
# structure half-length / image long side at the preset chosen (0.2 to 0.4 as size varies)
FILL = 0.28
SUBPLANES = ("trans-thalamic", "trans-cerebellum", "trans-ventricular")
PLANES = {  # kind: its Planes DB plane
    "brain": "Fetal brain",
    "abdomen": "Fetal abdomen",
    "heart": "Fetal thorax",
    "femur": "Fetal femur",
    "cervix": "Maternal cervix",
    "spine": "Other",
    "kidney": "Other",
    "profile": "Other",
    "lips_nose": "Other",
}
# Planes DB rows cycle through this: (kind, sub-plane); "" = a brain plane without a name ('Other')
PLANES_PATTERN = (
    ("brain", "trans-thalamic"),
    ("brain", "trans-cerebellum"),
    ("brain", "trans-ventricular"),
    ("brain", "trans-thalamic"),
    ("brain", "trans-cerebellum"),
    ("brain", "trans-ventricular"),
    ("brain", ""),
    ("abdomen", None),
    ("abdomen", None),
    ("abdomen", None),
    ("heart", None),
    ("heart", None),
    ("heart", None),
    ("femur", None),
    ("femur", None),
    ("femur", None),
    ("cervix", None),
    ("cervix", None),
    ("cervix", None),
    ("spine", None),
    ("kidney", None),
)
TRAIN_MIX = {  # (kind, sub-plane): share of the pretraining pairs
    ("brain", "trans-thalamic"): 0.24,
    ("brain", "trans-cerebellum"): 0.2,
    ("brain", "trans-ventricular"): 0.2,
    ("abdomen", None): 0.07,
    ("heart", None): 0.07,
    ("femur", None): 0.05,
    ("cervix", None): 0.05,
    ("spine", None): 0.03,
    ("kidney", None): 0.03,
    ("profile", None): 0.03,
    ("lips_nose", None): 0.03,
}
SUBJECTS = {
    "brain": [
        "the fetal brain",
        "the developing fetal brain",
        "fetal brain structures",
        "the fetal head",
    ],
    "abdomen": ["the fetal abdomen", "the fetal abdominal area", "fetal abdominal structures"],
    "heart": [
        "the fetal heart",
        "the four-chamber view of the fetal heart",
        "fetal cardiac structures",
    ],
    "femur": [
        "the fetal femur",
        "the developing fetal femur",
        "the fetal femur and its bone length",
    ],
    "cervix": ["the cervix", "the maternal cervix", "the cervical region"],
    "spine": ["the fetal spine", "the vertebral alignment of the fetal spine"],
    "kidney": ["the fetal kidney", "fetal renal structures"],
    "profile": ["the fetal profile", "the fetal profile and facial features"],
    "lips_nose": ["the fetal lips and nose", "the lips and nose"],
}
VIEWS = {
    "trans-thalamic": [
        "the brain thalamic (transverse) view",
        "the transverse view of the brain thalamus",
        "the brain thalamic region in a transverse plane",
        "the thalamus in a transverse view",
    ],
    "trans-cerebellum": [
        "the cerebellum, highlighting its typical butterfly shape",
        "the cerebellum",
        "the transverse view of the cerebellum",
        "the transverse section of the brain cerebellum",
    ],
    "trans-ventricular": [
        "the brain ventricles",
        "the brain ventricular view",
        "the brain ventricular region",
        "the brain's transverse view, emphasizing the ventricular system",
    ],
}
VIEW_OPENERS = [
    "Transverse fetal ultrasound image focusing on {}.",
    "Fetal ultrasound image emphasizing {}.",
    "Ultrasound image highlighting {}.",
    "Fetal ultrasound image showcasing {}.",
    "Transverse fetal ultrasound highlighting {}.",
]
SENTENCES = {
    "trans-thalamic": ["The thalamic (transverse) view.", "Transverse view of the thalamus."],
    "trans-cerebellum": ["Transverse view of the cerebellum.", "The butterfly-shaped cerebellum."],
    "trans-ventricular": ["The brain ventricular view.", "Transverse view of the ventricles."],
}
OPENERS = [
    "Ultrasound image focusing on {}",
    "Detailed ultrasound scan of {}",
    "Fetal ultrasound image showing {}",
    "Clear ultrasound of {}",
    "Focused ultrasound highlighting {}",
    "Ultrasound scan showcasing {}",
]
CLOSERS = [
    ", highlighting anatomical structures.",
    ", emphasizing structural details.",
    ".",
    " with detailed visualization.",
    ", showcasing its development.",
]
GA_WORDS = ["at {w} weeks and {d} days gestation", "at {w} weeks, {d} days of gestation"]


def hc_median(days):
    """Median head circumference (mm) at a GA in days: the protocol's q500 curve."""
    return float(ga_quantile(days, "q500"))


def ellipse_perimeter(a, b):
    """Ramanujan's second approximation."""
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def make_caption(rng, kind, subplane, days=-1, spacing=-1.0):
    """A caption in the protocol's wording. A brain scan with GA takes a GA template verbatim (spacing
    included) or states the GA in other words (no spacing), then a short sub-plane sentence where the
    48-token context has room; without GA a sub-plane is named as the sub-plane prompts name it."""

    def pick(options):
        return options[rng.integers(len(options))]

    if kind == "brain" and days >= 0 and spacing > 0 and rng.random() < 0.5:
        template = pick(PROMPTS["ga_templates"])
        text = template.format(weeks=days // 7, day=days % 7, pixel_spacing=f"{spacing:.2f}")
        return text + (" " + pick(SENTENCES[subplane]) if subplane and len(template) < 180 else "")
    if subplane and days < 0 and rng.random() < 0.4:  # in the words of the sub-plane prompts
        return pick(VIEW_OPENERS).format(pick(VIEWS[subplane]))
    text = pick(OPENERS).format(pick(SUBJECTS[kind]))
    if days >= 0:
        text += " " + pick(GA_WORDS).format(w=days // 7, d=days % 7)
    return text + pick(CLOSERS) + (" " + pick(SENTENCES[subplane]) if subplane else "")


def pick_zoom(half_mm, input_size=DEMO_INPUT):
    """The depth preset (spacing, mm per input pixel) that frames a structure of this half-length best."""
    return min(ZOOMS, key=lambda z: abs(math.log(half_mm / (z * input_size * FILL))))


def maturity(rng, days):
    """Apparent GA in weeks: the true GA plus this fetus's maturity jitter."""
    return days / 7 + rng.normal(0, 0.7)


def _ell(u, v, a, b, du=0.0, dv=0.0):
    """Normalised radius of the ellipse with semi-axes (a, b) centred at (du, dv): < 1 inside."""
    return np.sqrt(np.square((u - du) / a) + np.square((v - dv) / b))


def _fade(tissue, mask, value, q):
    """Paint an inner structure at contrast q (image quality) against what is under it."""
    tissue[mask] += q * (value - tissue[mask])


def draw_head(t, u, v, a, px, weeks, subplane, q):
    """Skull, brain and the sub-plane's structures; a = semi-major axis (px), u points to the occiput."""
    b, mature = 0.8 * a, np.clip((weeks - 13) / 27, 0, 1)
    r, line = _ell(u, v, a, b), max(0.6, 0.5 * px)
    # skull half-thickness (r units): 1 mm at 13 weeks, 3.6 at 40
    half = (0.5 + 1.3 * mature) * px / a
    t[r < 1.3], t[r < 1 + half], t[r < 1 - half] = 0.04, 0.25 + 0.7 * mature, 0.12 + 0.1 * mature
    inner, angle = 1 - half, np.arctan2(v / b, u / a)
    sylvian = np.clip((weeks - 15) / 18, 0, 1) * 0.32  # depth of the Sylvian fissure (r units)
    t[(abs(u + 0.1 * a) < line + 0.03 * a) & (r > inner - sylvian) & (r < inner)] = 0.7
    folds = np.clip((weeks - 20) / 20, 0, 1)  # cortical sulci: more and deeper with GA
    t[(np.cos((8 + 16 * folds) * angle) > 0.85) & (r > inner - 0.25 * folds) & (r < inner)] = 0.45
    t[(abs(v) < line) & (abs(u) < inner * a)] = 0.55  # falx
    # cavum septi pellucidi
    _fade(t, (abs(v) < 0.07 * b) & (u > -0.5 * a) & (u < -0.32 * a), 0.03, q)
    if subplane == "trans-thalamic":
        for side in (-1, 1):
            _fade(t, _ell(u, v, 0.24 * a, 0.15 * b, 0.0, side * 0.16 * b) < 1, 0.04, q)
        _fade(t, (abs(v) < line) & (abs(u) < 0.16 * a), 0.02, q)  # third ventricle
    elif subplane == "trans-cerebellum":
        rh = (weeks + 0.4 * max(weeks - 24, 0)) / 4 * px  # hemisphere radius: TCD / 4
        cisterna = (5 + 4 * mature) * px
        uc = inner * a - cisterna - rh
        _fade(t, (_ell(u, v, cisterna + rh, 1.5 * rh, uc) < 1) & (u > uc) & (r < inner), 0.02, q)
        for side in (-1, 1):
            _fade(t, _ell(u, v, rh, rh, uc, side * 0.95 * rh) < 1, 0.7, q)
            _fade(t, _ell(u, v, 0.7 * rh, 0.7 * rh, uc, side * 0.95 * rh) < 1, 0.45, q)
        _fade(t, (abs(v) < 0.3 * rh) & (abs(u - uc) < 0.8 * rh), 0.7, q)  # vermis
    elif subplane == "trans-ventricular":
        ratio = 0.3 + 0.28 * math.exp(-(weeks - 14) / 6)  # ventricle / hemisphere width
        for side in (-1, 1):
            dv, hv = side * (0.08 + ratio) / 2 * b, (ratio - 0.08) / 2 * b
            _fade(t, _ell(u, v, 0.5 * a, hv, 0.1 * a, dv) < 1, 0.03, q)
            _fade(t, _ell(u, v, 0.22 * a, 0.75 * hv, 0.33 * a, dv) < 1, 0.72, q)  # choroid plexus


def draw_body(t, u, v, rng, kind, hc, px, q):
    """Everything but the head. hc (mm) sizes the fetal anatomy; px = pixels per mm."""
    line = max(0.6, 0.5 * px)
    if kind in ("abdomen", "heart"):
        _draw_trunk(t, u, v, kind, hc, px, q)
    elif kind == "femur":  # bright diaphysis in the thigh, shadow beneath
        half, thick = 0.1 * hc * px, max(1.0, 1.6 * px)
        t[_ell(u, v, 1.4 * half, 0.6 * half) < 1.3] = 0.05
        t[_ell(u, v, 1.4 * half, 0.6 * half) < 1] = 0.32
        t[(v > thick) & (abs(u) < half)] *= 1 - 0.7 * q
        t[((abs(u) < half) & (abs(v) < thick)) | (np.hypot(abs(u) - half, v) < 1.3 * thick)] = 0.95
    elif kind == "cervix":  # pear-shaped cervix, dark mucosa around the bright canal
        a = rng.uniform(14, 21) * px
        t[_ell(u, v, a, 0.7 * a) < 1] = 0.5
        _fade(t, (abs(v) < 0.13 * a) & (abs(u) < 0.9 * a), 0.15, q)
        _fade(t, (abs(v) < line) & (abs(u) < 0.85 * a), 0.85, q)
    elif kind == "spine":  # skin line, two rows of ossification centres
        step, dot, width = 0.03 * hc * px, max(1.0, 0.012 * hc * px), 0.14 * hc * px
        t[abs(v) < width] = 0.3
        t[abs(v + width) < line] = 0.75
        near = (np.abs(u - np.round(u / step) * step) < dot) & (abs(u) < 0.3 * hc * px)
        t[near & (abs(abs(v) - 0.05 * hc * px) < dot)] = 0.95
    elif kind == "kidney":  # cortex, bright sinus, dark pelvis
        a = 0.055 * hc * px
        t[_ell(u, v, a, 0.6 * a) < 1.08], t[_ell(u, v, a, 0.6 * a) < 1] = 0.55, 0.25
        _fade(t, _ell(u, v, 0.55 * a, 0.25 * a) < 1, 0.7, q)
        _fade(t, _ell(u, v, 0.2 * a, 0.12 * a) < 1, 0.05, q)
    elif kind in ("profile", "lips_nose"):
        _draw_face(t, u, v, kind, hc, px, q, line)


def _draw_trunk(t, u, v, kind, hc, px, q):
    """Round trunk with the spine at the back: the abdomen (stomach, umbilical vein) or the thorax (heart)."""
    a = (0.15 if kind == "abdomen" else 0.13) * hc * px
    r, angle = _ell(u, v, a, 0.92 * a), np.arctan2(v, u)
    t[r < 1.25], t[r < 1.06], t[r < 1] = (
        0.05,
        0.6,
        0.33 if kind == "abdomen" else 0.48,
    )  # liver; echogenic lungs
    ribs = (
        (r > 0.93)
        & (r < 1.08)
        & (np.sin(7 * angle) > 0.6)
        & (abs(angle) > 0.4)
        & (abs(angle) < 2.4)
    )
    _fade(t, ribs, 0.9, q)  # the lower ribs show in the abdominal plane too
    if kind == "abdomen":
        _fade(t, _ell(u, v, 0.27 * a, 0.18 * a, -0.2 * a, -0.3 * a) < 1, 0.03, q)  # stomach
        _fade(t, _ell(u, v, 0.32 * a, 0.06 * a, 0.05 * a, 0.18 * a) < 1, 0.05, q)  # umbilical vein
    else:  # four chambers split by the septum and the valves, the heart turned 45 degrees
        c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)
        hu, hv = (
            (u + 0.15 * a) * c + (v + 0.05 * a) * s,
            (v + 0.05 * a) * c - (u + 0.15 * a) * s,
        )
        hr = _ell(hu, hv, 0.5 * a, 0.42 * a)
        _fade(t, hr < 1, 0.68, q)
        _fade(t, (hr < 0.82) & (abs(hu) > 0.06 * a) & (abs(hv) > 0.05 * a), 0.04, q)
    for du, dv in ((0.78, 0), (0.64, 0.14), (0.64, -0.14)):  # vertebra: body and two laminae
        t[_ell(u, v, 0.075 * a, 0.075 * a, du * a, dv * a) < 1] = 0.95


def _draw_face(t, u, v, kind, hc, px, q, line):
    """The fetal face: a mid-sagittal profile or the coronal lips and nose."""
    if kind == "profile":  # mid-sagittal face: forehead, nose, lips and chin against the fluid
        s = 0.22 * hc * px
        bumps = sum(
            h * np.exp(-np.square((u - c * s) / (w * s)))
            for h, c, w in ((0.22, -0.05, 0.08), (0.1, 0.2, 0.05), (0.08, 0.32, 0.05))
        )
        surface, near = s * (0.15 * np.square(u / s) - bumps), abs(u) < 0.7 * s
        t[near & (v < surface) & (v > surface - 0.4 * s)] = 0.04
        t[near & (v >= surface)] = 0.38
        _fade(t, near & (abs(v - surface) < line), 0.8, q)  # skin
        # frontal bone
        _fade(t, (abs(v - surface - 0.12 * s) < line) & (u < -0.12 * s) & near, 0.9, q)
    elif kind == "lips_nose":  # coronal: upper lip and the nostrils
        s = 0.22 * hc * px
        t[_ell(u, v, 0.5 * s, 0.35 * s) < 1.2], t[_ell(u, v, 0.5 * s, 0.35 * s) < 1] = 0.04, 0.4
        _fade(t, abs(_ell(u, v, 0.3 * s, 0.12 * s, 0, 0.12 * s) - 1) < 0.15, 0.85, q)
        for side in (-1, 1):
            _fade(t, _ell(u, v, 0.07 * s, 0.06 * s, side * 0.12 * s, -0.1 * s) < 1, 0.03, q)


def render_scan(
    rng, kind, subplane, hc, mm_per_px, width, height, days=200, pose=None, quality=None
):
    """One scan (height, width) uint8, drawn ~160 px wide (speckle of one such pixel), then upsampled. pose:
    (x, y, angle) of the structure as fractions of the image and radians; quality in [0, 1] (both default:
    drawn from rng)."""
    grain = max(1, round(width / 160))
    w, h = -(-width // grain), -(-height // grain)
    apex = 0.02 if kind == "cervix" else -0.1  # transvaginal: a wide fan from the top
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    depth, beam = np.hypot(x - w / 2, y - apex * h), np.arctan2(x - w / 2, y - apex * h)
    coarse = rng.uniform(0.2, 0.45, (4, 6)).astype(np.float32)  # slowly varying tissue
    t = np.array(Image.fromarray(coarse, "F").resize((w, h), Image.BICUBIC), dtype=np.float32)
    cx, cy, theta = pose or (
        rng.uniform(0.45, 0.55),
        rng.uniform(0.48, 0.56),
        rng.uniform(-0.4, 0.4) + (rng.choice([0, math.pi]) if kind != "femur" else 0),
    )
    c, s = math.cos(theta), math.sin(theta)
    u, v = (x - cx * w) * c + (y - cy * h) * s, (y - cy * h) * c - (x - cx * w) * s
    px, q = (
        1 / (mm_per_px * grain),
        rng.uniform(0.0, 1.0) if quality is None else quality,
    )  # image quality
    if kind == "brain":
        draw_head(
            t,
            u,
            v,
            hc / ellipse_perimeter(1.0, 0.8) * px,
            px,
            maturity(rng, days),
            subplane,
            0.27 + 0.73 * q,
        )
    else:
        draw_body(t, u, v, rng, kind, hc, px, 0.12 + 0.88 * q)
    t = Image.fromarray(np.clip(t * 255, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)
    r0, r1 = 0.12 * h, rng.uniform(1.0, 1.1) * h
    # attenuation with depth
    gain = rng.uniform(0.9, 1.1) * np.exp((depth - r0) * (-0.5 / (r1 - r0)))
    if rng.random() < 0.3:  # acoustic shadow of a bone outside the plane (a limb, a rib)
        band = (abs(beam - rng.uniform(-0.6, 0.6)) < rng.uniform(0.05, 0.15)) & (
            depth > rng.uniform(0.3, 0.6) * h
        )
        gain = gain * np.where(band, 0.3, 1.0)
    image = (
        np.asarray(t, dtype=np.float32) * rng.rayleigh(math.sqrt(2 / math.pi), (h, w)) * gain / 255
    )
    image = (255 * np.clip(image, 0, 1) ** 0.8).astype(np.uint8)  # mild log compression
    half_angle = rng.uniform(0.9, 1.05) if kind == "cervix" else rng.uniform(0.75, 0.85)
    image = image * ((abs(beam) < half_angle) & (depth > r0) & (depth < r1))
    return (
        np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        if grain > 1
        else image
    )


def _sample(rng, kind, days, input_size, width, height):
    """Size a scan of `kind` at GA `days`: (hc mm, spacing mm per input px, mm per image px)."""
    hc = hc_median(days) * math.exp(rng.normal(0, 0.03))
    half = 17.5 if kind == "cervix" else hc / ellipse_perimeter(1.0, 0.8)
    zoom = pick_zoom(half, input_size)
    return hc, zoom, zoom * input_size / max(width, height)


def encode(image, fmt):
    """A scan as JPEG (the shards) or PNG bytes (the Planes DB and HC18 files are PNG)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(
        buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1})
    )
    return buffer.getvalue()


def write_png(image, path):
    with open(path, "wb") as f:
        f.write(encode(image, "PNG"))


def write_shards(out, seed, n, width, height, shard_size, input_size=DEMO_INPUT):
    """Pretraining pairs: train-NNNNNN.tar holding <key>.jpg + <key>.txt, keys %08d."""
    os.makedirs(out, exist_ok=True)
    kinds, weights = list(TRAIN_MIX), np.array(list(TRAIN_MIX.values())) / sum(TRAIN_MIX.values())
    for first in range(0, n, shard_size):
        with wds.TarWriter(
            os.path.join(out, f"train-{first // shard_size:06d}.tar"), encoder=False, mtime=0
        ) as sink:
            for i in range(first, min(first + shard_size, n)):
                rng = np.random.default_rng([seed, 0, i])
                kind, subplane = kinds[rng.choice(len(kinds), p=weights)]
                days = int(rng.integers(14 * 7, 40 * 7))
                hc, zoom, mm_per_px = _sample(rng, kind, days, input_size, width, height)
                with_ga = rng.random() < (0.75 if kind == "brain" else 0.2)
                caption = make_caption(
                    rng,
                    kind,
                    subplane,
                    days if with_ga else -1,
                    zoom if with_ga and kind == "brain" else -1,
                )
                image = render_scan(rng, kind, subplane, hc, mm_per_px, width, height, days)
                sink.write(
                    {"__key__": f"{i:08d}", "jpg": encode(image, "JPEG"), "txt": caption.encode()}
                )


def write_planes(out, seed, n, width, height, input_size=DEMO_INPUT):
    """Planes DB: FETAL_PLANES_DB_data.csv (';') + Images/<Image_name>.png, ~5 images a patient; patients
    with Patient_num % 5 == 0 are the test split (Train 0)."""
    os.makedirs(os.path.join(out, "Images"), exist_ok=True)
    lines, patients = [";".join(protocol.PLANES_COLUMNS)], math.ceil(n / 5)
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        kind, subplane = PLANES_PATTERN[i % len(PLANES_PATTERN)]
        days = int(rng.integers(18 * 7, 39 * 7))
        hc, _, mm_per_px = _sample(rng, kind, days, input_size, width, height)
        image = render_scan(rng, kind, subplane, hc, mm_per_px, width, height, days)
        patient = i % patients + 1  # a patient's images span several planes
        name = f"Patient{patient:05d}_Plane{i // patients + 1}_1_of_1"
        write_png(image, os.path.join(out, "Images", name + ".png"))
        brain_plane = (
            "Not A Brain" if subplane is None else subplane.capitalize() if subplane else "Other"
        )
        lines.append(
            ";".join(
                [
                    name,
                    str(patient),
                    PLANES[kind],
                    brain_plane,
                    ("Op. 1", "Op. 2", "Op. 3", "Other")[patient % 4],
                    ("Voluson E6", "Voluson S10", "Aloka")[patient % 3],
                    str(int(patient % 5 != 0)),
                ]
            )
        )
    with open(os.path.join(out, protocol.PLANES_CSV), "w", newline="") as f:
        f.write("\n".join(lines) + "\n")


def write_hc18(out, seed, n, input_size=DEMO_INPUT):
    """HC18: 800x540 trans-thalamic heads at GA 13-40 weeks (some fall outside the protocol's 100-342 mm)."""
    os.makedirs(os.path.join(out, "training_set"), exist_ok=True)
    lines = [",".join(protocol.HC18_COLUMNS)]
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        days = int(rng.integers(13 * 7, 40 * 7))
        hc, _, pixel_size = _sample(rng, "brain", days, input_size, 800, 540)
        image = render_scan(rng, "brain", "trans-thalamic", hc, pixel_size, 800, 540, days)
        write_png(image, os.path.join(out, "training_set", f"{i:03d}_HC.png"))
        lines.append(f"{i:03d}_HC.png,{pixel_size:.10f},{hc:.2f}")
    with open(os.path.join(out, protocol.HC18_CSV), "w", newline="") as f:
        f.write("\n".join(lines) + "\n")


def write_scans(out, seed, days=170):
    """A clinic's export folder for predict.py: sweep.dcm, a cine sweeping brain -> abdomen -> femur as an
    ultrasound scanner writes it (RGB frames, a calibrated 2D tissue region above a spectral Doppler strip,
    no file extension needed), loop.mp4 of the cervix (PyAV) and head16.png, a 16-bit PNG of a head."""
    import av
    import pydicom

    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng([seed, 5])
    # one depth for the whole sweep
    hc, _, mm_per_px = _sample(rng, "brain", days, DEMO_INPUT, 320, 240)
    # (frames, rows, columns, RGB): the tissue over a strip
    frames = np.zeros((24, 300, 320, 3), np.uint8)
    for i, kind in enumerate(["brain"] * 8 + ["abdomen"] * 8 + ["femur"] * 8):
        pose = (0.5 + 0.03 * math.sin(i), 0.52, 0.15 * math.cos(i / 3))  # the probe moves a little
        frames[i, :240] = render_scan(
            rng, kind, "trans-thalamic", hc, mm_per_px, 320, 240, days, pose, 0.8
        )[..., None]
        trace = 240 + (30 + 20 * np.sin(np.arange(320) / 9 + i)).astype(int)  # a Doppler-like trace
        frames[i, trace, np.arange(320)] = 200
    dataset = pydicom.Dataset()
    regions = [
        (1, 1, 0, 0, 319, 239, mm_per_px / 10),
        (3, 3, 0, 240, 319, 299, 0.0),
    ]  # (format, type, box, cm)
    dataset.SequenceOfUltrasoundRegions = [ultrasound_region(*region) for region in regions]
    dataset.update(
        dict(
            Modality="US", PhotometricInterpretation="RGB", SamplesPerPixel=3, PlanarConfiguration=0
        )
    )
    dataset.update(
        dict(Rows=300, Columns=320, BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0)
    )
    dataset.update(dict(NumberOfFrames=24, FrameTime=40.0, PixelData=frames.tobytes()))
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
    dataset.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(seed)])
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.update(
        dict(MediaStorageSOPClassUID=dataset.SOPClassUID, TransferSyntaxUID="1.2.840.10008.1.2.1")
    )
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.save_as(os.path.join(out, "sweep"), enforce_file_format=True)
    with av.open(os.path.join(out, "loop.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for _ in range(8):
            scan = render_scan(rng, "cervix", None, hc, 0.4, 160, 120, days, quality=0.8)
            container.mux(
                stream.encode(
                    av.VideoFrame.from_ndarray(np.repeat(scan[..., None], 3, -1), "rgb24")
                )
            )
        container.mux(stream.encode())
    head = render_scan(rng, "brain", "trans-cerebellum", hc, mm_per_px, 320, 240, days, quality=0.8)
    Image.fromarray(head.astype(np.uint16) * 257).save(os.path.join(out, "head16.png"))


def ultrasound_region(spatial_format, data_type, x0, y0, x1, y1, delta_cm):
    """One item of SequenceOfUltrasoundRegions (DICOM PS3.3 C.8.5.5): its kind, inclusive pixel box, cm per pixel."""
    import pydicom

    box = dict(
        RegionLocationMinX0=x0,
        RegionLocationMinY0=y0,
        RegionLocationMaxX1=x1,
        RegionLocationMaxY1=y1,
    )
    units = 3 if delta_cm else 0  # cm, or none
    physical = dict(
        PhysicalUnitsXDirection=units, PhysicalUnitsYDirection=units, PhysicalDeltaX=delta_cm
    )
    region = pydicom.Dataset()
    region.update(
        dict(
            RegionSpatialFormat=spatial_format,
            RegionDataType=data_type,
            RegionFlags=0,
            **box,
            **physical,
        )
    )
    region.PhysicalDeltaY = delta_cm
    return region


def layout(out_dir):
    """Where generate writes each part, as train.py's settings name them (scans: predict.py's demo input)."""
    return dict(
        train_data=os.path.join(out_dir, "shards"),
        planes_dir=os.path.join(out_dir, "planes"),
        hc18_dir=os.path.join(out_dir, "hc18"),
        scans=os.path.join(out_dir, "scans"),
    )


def generate(
    out_dir=DEFAULTS["out_dir"],
    seed=DEFAULTS["seed"],
    n_train=DEFAULTS["n_train"],
    n_planes=DEFAULTS["n_planes"],
    n_hc18=DEFAULTS["n_hc18"],
    width=DEFAULTS["width"],
    height=DEFAULTS["height"],
    shard_size=DEFAULTS["shard_size"],
    input_size=DEMO_INPUT,
):
    """Write the benchmark: out_dir/shards, out_dir/planes, out_dir/hc18 (deterministic in seed). All or
    nothing: it is written into a temporary folder renamed to out_dir at the end, since train.py generates
    data_dir only when it is missing (a generation killed half-way must not be taken for a finished one)."""
    start = time.time()
    with configurator.atomic_path(out_dir) as tmp:
        folders = layout(tmp)
        write_shards(folders["train_data"], seed, n_train, width, height, shard_size, input_size)
        write_planes(folders["planes_dir"], seed, n_planes, width, height, input_size)
        write_hc18(folders["hc18_dir"], seed, n_hc18, input_size)
        write_scans(folders["scans"], seed)
    print(
        f"wrote {out_dir}: {n_train} pairs in {math.ceil(n_train / shard_size)} shards, {n_planes} Planes DB "
        f"images, {n_hc18} HC18 images, a DICOM cine, a clip and a 16-bit PNG in {time.time() - start:.1f} s"
    )


def draw_grid(path, seed=0, weeks=(16, 22, 28, 34), size=DEMO_INPUT, scale=2):
    """One scan per class (rows) and GA (columns) at the models' input size, enlarged `scale` times."""
    rows = [("brain", s) for s in SUBPLANES] + [
        (k, None) for k in ("abdomen", "heart", "femur", "cervix", "spine")
    ]
    cell, label = size * scale, 120
    sheet = Image.new("L", (label + cell * len(weeks), 14 + cell * len(rows)), 255)
    pen = ImageDraw.Draw(sheet)
    for j, week in enumerate(weeks):
        pen.text((label + j * cell + 4, 1), f"{week} weeks", fill=0)
    for i, (kind, subplane) in enumerate(rows):
        pen.text((4, 14 + i * cell + cell // 2 - 6), subplane or f"{PLANES[kind]} ({kind})", fill=0)
        for j, week in enumerate(weeks):
            rng = np.random.default_rng([seed, 4, i, j])
            hc, _, mm_per_px = _sample(rng, kind, week * 7, size, 160, 120)
            scan = Image.fromarray(
                render_scan(rng, kind, subplane, hc, mm_per_px, 160, 120, week * 7, quality=0.8)
            )
            scan = (
                data.pad_to_square(scan)
                .resize((size, size), Image.BICUBIC)
                .resize((cell, cell), Image.NEAREST)
            )
            sheet.paste(scan, (label + j * cell, 14 + i * cell))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sheet.save(path, optimize=True)
    print(f"wrote {path}")


def main(arguments):
    settings = configurator.configure(dict(DEFAULTS), arguments)
    sizes = [
        (k, settings[k] >= 16, "at least 16 pixels") for k in ("width", "height", "input_size")
    ]
    counts = [
        (k, settings[k] >= 1, "at least 1") for k in ("n_train", "n_planes", "n_hc18", "shard_size")
    ]
    configurator.refuse(settings, [("seed", settings["seed"] >= 0, "0 or more"), *sizes, *counts])
    grid_path = settings.pop("grid")
    if grid_path:
        draw_grid(grid_path, settings["seed"], size=settings["input_size"])
        return
    with configurator.user_errors("synthetic.py"):  # out_dir is replaced as a whole
        configurator.check_replaceable(
            settings["out_dir"], "--out_dir", layout("").values(), "synthetic.py"
        )
    generate(**settings)


if __name__ == "__main__":
    main(sys.argv[1:])
