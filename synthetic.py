"""A synthetic fetal-ultrasound benchmark in the real file formats, for the built-in demo (nanoGPT's
data/<name>/prepare.py role): WebDataset pretraining shards, a Planes-DB folder and an HC18 folder.

    python synthetic.py                          # writes data/demo: shards/ planes/ hc18/
    python synthetic.py --out_dir=data/big --seed=1 --n_train=20000

train.py runs `generate` itself when its data_dir is missing. Everything written is a function of the seed.
"""

import functools
import io
import math
import os
import sys
import tarfile
import time

import numpy as np
from PIL import Image, ImageFilter

import configurator
from data import HC18_COLUMNS, HC18_CSV, PLANES_COLUMNS, PLANES_CSV
from evaluate import ga_quantile

# ------------------------------------------------------------------ settings: --key=value
out_dir = "data/demo"  # output folder
seed = 0  # everything written is a function of this seed
n_train = 3000  # pretraining image-caption pairs
n_planes = 300  # Planes DB images
n_hc18 = 150  # HC18 images (800x540)
width = 256  # shard and Planes DB image width
height = 192  # ... and height
shard_size = 500  # pairs per shard
caption_input_size = 48  # model input size the captions' pixel spacings refer to (demo models: 48)

# pixel spacings (mm per pixel of a 48-px model input (the demo models)) the scans are drawn at; few distinct values
# keep the per-spacing GA prompts of the HC18 evaluation cheap
SPACING_GRID = (0.8, 0.95, 1.15, 1.4, 1.65, 2.0, 2.4, 2.85, 3.45, 4.15, 5.0, 6.0, 7.0)
PLANES = {
    "brain": "Fetal brain",
    "abdomen": "Fetal abdomen",
    "heart": "Fetal thorax",
    "femur": "Fetal femur",
    "cervix": "Maternal cervix",
    "spine": "Other",
    "kidney": "Other",
}
SUBPLANES = ("trans-thalamic", "trans-cerebellum", "trans-ventricular")
# Planes DB rows cycle through this pattern: (kind, Brain_plane); '' = brain without a named sub-plane
PLANES_PATTERN = (
    [("brain", s) for s in SUBPLANES * 2]
    + [("brain", "")]
    + [(k, None) for k in ("abdomen", "heart", "femur", "cervix") for _ in range(3)]
    + [("spine", None), ("kidney", None)]
)
# pretraining mix: (kind, sub-plane, probability)
TRAIN_MIX = [
    ("brain", "trans-thalamic", 0.16),
    ("brain", "trans-cerebellum", 0.12),
    ("brain", "trans-ventricular", 0.12),
    ("abdomen", None, 0.12),
    ("heart", None, 0.12),
    ("femur", None, 0.12),
    ("cervix", None, 0.12),
    ("spine", None, 0.06),
    ("kidney", None, 0.06),
]
# caption parts, in the wording of the protocol prompts and GA templates (zero_shot_prompts.json)
SUBJECTS = {
    "brain": ["the fetal brain", "the developing fetal brain", "fetal brain structures", "the fetal head and brain"],
    "abdomen": [
        "the fetal abdomen",
        "the fetal abdominal area",
        "fetal abdominal structures",
        "the developing fetal abdomen",
    ],
    "heart": [
        "the fetal heart",
        "the four-chamber view of the fetal heart",
        "fetal cardiac structures",
        "the developing fetal heart",
    ],
    "femur": [
        "the fetal femur",
        "the developing fetal femur",
        "the fetal femur and its bone length",
        "fetal femur skeletal development",
    ],
    "cervix": ["the cervix", "the maternal cervix", "the cervical region", "the cervix and its length"],
    "spine": ["the fetal spine", "the vertebral alignment of the fetal spine", "the developing fetal spine"],
    "kidney": ["the fetal kidney", "the developing fetal kidney", "fetal renal structures"],
}
SUBPLANE_DETAILS = {
    "trans-thalamic": [
        "in a transverse plane through the thalamus",
        "in the thalamic (transverse) view",
        "with clear visualization of the thalami",
    ],
    "trans-cerebellum": [
        "in a transverse plane through the cerebellum",
        "showing the butterfly-shaped cerebellum",
        "with a transverse section of the cerebellum",
    ],
    "trans-ventricular": [
        "in a transverse plane through the ventricles",
        "in the brain ventricular view",
        "with the lateral ventricles in view",
    ],
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
GA_PHRASES = [
    "at {w} weeks and {d} days gestation",
    "at {w} weeks, {d} days of gestation",
    "at {w} weeks and {d} days gestational age",
]
SPACING_PHRASES = [
    "with a pixel spacing of {p} mm/pixel",
    "with an image pixel spacing of {p} mm/pixel",
    "at a pixel spacing of {p} mm/pixel",
]


def hc_median(days):
    """Median head circumference (mm) at a gestational age in days (the protocol's q500 curve)."""
    return float(ga_quantile(days, "q500"))


def ellipse_perimeter(a, b):
    """Ramanujan's second approximation."""
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def make_caption(rng, kind, subplane, ga_days=-1, spacing=-1.0):
    """A caption in the wording of the protocol prompts; GA and spacing in the GA templates' form."""
    pick = lambda options: options[rng.integers(len(options))]
    subject = pick(SUBJECTS[kind]) + (" " + pick(SUBPLANE_DETAILS[subplane]) if subplane else "")
    text = pick(OPENERS).format(subject)
    if ga_days >= 0:
        text += " " + pick(GA_PHRASES).format(w=ga_days // 7, d=ga_days % 7)
    if spacing > 0:
        text += ", " + pick(SPACING_PHRASES).format(p=f"{spacing:.2f}")
    return text + pick(CLOSERS)


def pick_spacing(rng, kind, hc):
    """A grid spacing at which the structure's half-length (the head's semi-major axis for fetal
    anatomy, ~17 mm for the cervix) is 17-28% of the image's long side."""
    half = 17.5 if kind == "cervix" else hc / ellipse_perimeter(1.0, 0.8)  # mm
    fits = [g for g in SPACING_GRID if 0.17 <= half / (g * 64) <= 0.28]
    return float(rng.choice(fits or [min(SPACING_GRID, key=lambda g: abs(half / (g * 64) - 0.22))]))


def _frame(x, y, cx, cy, theta):
    """Image coordinates in a shape's frame: u along the angle theta, v across it."""
    c, s = math.cos(theta), math.sin(theta)
    return (x - cx) * c + (y - cy) * s, (y - cy) * c - (x - cx) * s


def _ell(u, v, a, b, du=0.0, dv=0.0):
    """Normalised radius of the ellipse with semi-axes (a, b) centred at (du, dv): < 1 inside."""
    return np.sqrt(np.square((u - du) * (1 / a)) + np.square((v - dv) * (1 / b)))


@functools.lru_cache(maxsize=8)
def _grid(width, height, apex_y):
    """Pixel coordinates, and depth and beam angle from a probe apex at (width/2, apex_y)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return x, y, np.hypot(x - width / 2, y - apex_y), np.arctan2(x - width / 2, y - apex_y)


def draw_anatomy(tissue, x, y, rng, kind, subplane, hc, px):
    """Paint one structure into the echogenicity map (0 black .. 1 bright). hc (mm) sizes the
    fetal anatomy; px = pixels per mm."""
    h, w = tissue.shape
    theta = rng.uniform(-0.5, 0.5) + (rng.choice([0, math.pi]) if kind != "femur" else 0)
    u, v = _frame(x, y, w * rng.uniform(0.46, 0.54), h * rng.uniform(0.48, 0.55), theta)
    line = max(1.0, 0.8 * px)  # thin bright echoes, >= 1 pixel
    if kind == "brain":  # head: skull, brain, midline, then the sub-plane's structures
        a = hc / ellipse_perimeter(1.0, 0.8) * px
        b = 0.8 * a
        r = _ell(u, v, a, b)
        skull = 1.5 * px / a  # 3 mm thick, centred on the measured ellipse (r = 1)
        tissue[r < 1.25], tissue[r < 1 + skull], tissue[r < 1 - skull] = 0.06, 0.95, 0.22
        tissue[(abs(v) < line) & (abs(u) < 0.92 * a)] = 0.6
        if subplane:  # cavum septi pellucidi
            tissue[(abs(v) < 0.06 * b) & (u > -0.45 * a) & (u < -0.3 * a)] = 0.04
        if subplane == "trans-thalamic":
            for side in (-1, 1):
                tissue[_ell(u, v, 0.17 * a, 0.1 * b, 0.02 * a, side * 0.12 * b) < 1] = 0.11
        elif subplane == "trans-cerebellum":
            tissue[_ell(u, v, 0.1 * a, 0.2 * b, 0.72 * a) < 1] = 0.04  # cisterna magna
            for side in (-1, 1):
                tissue[_ell(u, v, 0.11 * a, 0.13 * b, 0.52 * a, side * 0.13 * b) < 1] = 0.5
            tissue[(abs(v) < 0.05 * b) & (abs(u - 0.52 * a) < 0.08 * a)] = 0.65  # vermis
        elif subplane == "trans-ventricular":
            for side, dark, plexus in ((1, 0.05, 0.75), (-1, 0.14, 0.45)):  # far ventricle clearer
                tissue[_ell(u, v, 0.32 * a, 0.09 * b, 0.35 * a, side * 0.3 * b) < 1] = dark
                tissue[_ell(u, v, 0.2 * a, 0.055 * b, 0.42 * a, side * 0.3 * b) < 1] = plexus
    elif kind in ("abdomen", "heart"):  # round trunk, spine at the back
        a = (0.15 if kind == "abdomen" else 0.12) * hc * px  # AC ~ 0.95 HC, thorax ~ 0.8 AC
        b = rng.uniform(0.88, 0.96) * a
        r = _ell(u, v, a, b)
        tissue[r < 1.2], tissue[r < 1.05], tissue[r < 1] = 0.07, 0.65, 0.38 if kind == "abdomen" else 0.48
        if kind == "abdomen":
            tissue[_ell(u, v, 0.26 * a, 0.17 * b, -0.2 * a, -0.3 * b) < 1] = 0.03  # stomach bubble
            tissue[_ell(u, v, 0.3 * a, 0.06 * b, 0.05 * a, 0.15 * b) < 1] = 0.05  # umbilical vein
        else:  # ribs, then a four-chamber heart: chambers split by the septum and AV valves
            ring = np.nonzero((r > 0.95) & (r < 1.08))
            ribs = np.sin(7 * np.arctan2(v[ring], u[ring])) > 0.5
            tissue[ring[0][ribs], ring[1][ribs]] = 0.95
            hu, hv = _frame(u, v, -0.15 * a, -0.05 * b, math.pi / 4)
            hr = _ell(hu, hv, 0.5 * a, 0.42 * a)
            tissue[hr < 1] = 0.58
            tissue[(hr < 0.8) & (abs(hu) > 0.05 * a) & (abs(hv) > 0.04 * a)] = 0.04
        for du, dv in ((0.75, 0), (0.62, 0.13), (0.62, -0.13)):
            tissue[_ell(u, v, 0.07 * a, 0.07 * a, du * a, dv * b) < 1] = 0.95
    elif kind == "femur":  # bright bone with an acoustic shadow, in the thigh
        half, thick = 0.1 * hc * px, max(1.5, 1.6 * px)  # femur length ~ 0.2 HC
        tissue[_ell(u, v, 1.4 * half, 0.6 * half) < 1.3] = 0.07
        tissue[_ell(u, v, 1.4 * half, 0.6 * half) < 1] = 0.32
        tissue[(v > thick) & (abs(u) < half)] *= 0.3
        tissue[((abs(u) < half) & (abs(v) < thick)) | (np.hypot(abs(u) - half, v) < 1.3 * thick)] = 1.0
    elif kind == "cervix":  # pear-shaped cervix with the bright canal and its dark mucosa
        a = rng.uniform(14, 21) * px
        b = rng.uniform(0.6, 0.8) * a
        tissue[_ell(u, v, a, b) < 1] = 0.5
        tissue[(abs(v) < 0.18 * b) & (abs(u) < 0.9 * a)] = 0.16
        tissue[(abs(v) < line) & (abs(u) < 0.85 * a)] = 0.85
    elif kind == "spine":  # two rows of vertebrae under the skin line
        step, dot = 0.03 * hc * px, max(1.2, 0.012 * hc * px)
        tissue[abs(v) < 0.14 * hc * px] = 0.3
        tissue[abs(v + 0.14 * hc * px) < line] = 0.75
        near = (np.abs(u - np.round(u / step) * step) < dot) & (abs(u) < 0.3 * hc * px)
        tissue[near & ((abs(abs(v) - 0.05 * hc * px)) < dot)] = 0.95
    elif kind == "kidney":  # cortex, bright sinus, dark pelvis
        a = 0.055 * hc * px
        r = _ell(u, v, a, 0.6 * a)
        tissue[r < 1.08], tissue[r < 1] = 0.55, 0.25
        tissue[_ell(u, v, 0.55 * a, 0.25 * a) < 1] = 0.7
        tissue[_ell(u, v, 0.2 * a, 0.12 * a) < 1] = 0.05


def render_scan(rng, kind, subplane, hc, mm_per_px, width, height):
    """One B-mode-like scan (H, W) uint8: anatomy to scale in a sector on black, with speckle.
    Drawn at ~320 px wide (speckle cells of 1-3 pixels), then upsampled."""
    grain = max(1, round(width / 320))
    w, h = -(-width // grain), -(-height // grain)
    apex = 0.02 if kind == "cervix" else -0.08  # transvaginal: a wide fan from the top
    x, y, depth, _ = _grid(w, h, apex * h)
    coarse = rng.uniform(0.25, 0.5, (4, 6)).astype(np.float32)  # slowly varying tissue
    tissue = np.array(Image.fromarray(coarse, "F").resize((w, h), Image.BICUBIC), dtype=np.float32)
    draw_anatomy(tissue, x, y, rng, kind, subplane, hc, 1 / (mm_per_px * grain))
    tissue = Image.fromarray(np.clip(tissue * 255, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)
    speckle = rng.rayleigh(math.sqrt(2 / math.pi), (h, w)).astype(np.float32)  # Rayleigh amplitude, mean 1
    r0, r1 = 0.12 * h, rng.uniform(1.0, 1.08) * h
    gain = np.exp((depth - r0) * (-0.5 / (r1 - r0)))  # attenuation with depth
    image = np.clip(np.asarray(tissue, dtype=np.float32) * speckle * gain * (1.15 / 1.2 / 255), 0, 1)
    image = Image.fromarray(GAMMA[(image * 255).astype(np.uint8)]).resize((width, height), Image.BILINEAR)
    _, _, depth, angle = _grid(width, height, apex * height)
    half_angle = rng.uniform(0.9, 1.05) if kind == "cervix" else rng.uniform(0.55, 0.7)
    fov = (abs(angle) < half_angle) & (depth > r0 * grain) & (depth < r1 * grain)
    return np.asarray(image) * fov.astype(np.uint8)


GAMMA = (255 * (np.arange(256) / 255) ** 0.8).astype(np.uint8)  # mild log-compression look


def _encode(array, fmt):
    buffer = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    else:
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # speckle barely compresses
    return buffer.getvalue()


def _tar_add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # fixed metadata: same seed, same bytes
    tar.addfile(info, io.BytesIO(payload))


def write_shards(out, seed, n, width, height, shard_size, input_size):
    """Pretraining pairs: shards/train-NNNNNN.tar with <key>.jpg + <key>.txt, keys %08d."""
    os.makedirs(out, exist_ok=True)
    kinds, weights = [(k, s) for k, s, _ in TRAIN_MIX], [p for _, _, p in TRAIN_MIX]
    for first in range(0, n, shard_size):
        with tarfile.open(os.path.join(out, f"train-{first // shard_size:06d}.tar"), "w") as tar:
            for i in range(first, min(first + shard_size, n)):
                rng = np.random.default_rng([seed, 0, i])
                kind, subplane = kinds[rng.choice(len(kinds), p=weights)]
                days = int(rng.integers(14 * 7, 39 * 7))
                hc = hc_median(days) * math.exp(rng.normal(0, 0.03))
                grid = pick_spacing(rng, kind, hc)
                with_ga = rng.random() < (0.7 if kind == "brain" else 0.3)
                caption = make_caption(
                    rng,
                    kind,
                    subplane,
                    days if with_ga else -1,
                    grid * 64 / input_size if with_ga and kind == "brain" else -1,
                )
                image = render_scan(rng, kind, subplane, hc, grid * 64 / max(width, height), width, height)
                _tar_add(tar, f"{i:08d}.jpg", _encode(image, "jpg"))
                _tar_add(tar, f"{i:08d}.txt", caption.encode())


def write_planes(out, seed, n, width, height):
    """Planes-DB format: FETAL_PLANES_DB_data.csv (';') + Images/<Image_name>.png, ~5 images a
    patient, patients with Patient_num % 5 == 0 in the test split (Train 0)."""
    os.makedirs(os.path.join(out, "Images"), exist_ok=True)
    lines, patients = [";".join(PLANES_COLUMNS)], math.ceil(n / 5)
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        kind, subplane = PLANES_PATTERN[i % len(PLANES_PATTERN)]
        hc = hc_median(int(rng.integers(18 * 7, 39 * 7))) * math.exp(rng.normal(0, 0.03))
        mm_per_px = pick_spacing(rng, kind, hc) * 64 / max(width, height)
        image = render_scan(rng, kind, subplane, hc, mm_per_px, width, height)
        patient = i % patients + 1  # a patient's images span several planes
        name = f"Patient{patient:05d}_Plane{i // patients + 1}_1_of_1"
        Image.fromarray(image).save(os.path.join(out, "Images", name + ".png"), compress_level=1)
        brain_plane = "Not A Brain" if subplane is None else subplane.capitalize() if subplane else "Other"
        operator = ("Op. 1", "Op. 2", "Op. 3", "Other")[patient % 4]
        machine = ("Voluson E6", "Voluson S10", "Aloka")[patient % 3]
        train = str(int(patient % 5 != 0))
        lines.append(";".join([name, str(patient), PLANES[kind], brain_plane, operator, machine, train]))
    with open(os.path.join(out, PLANES_CSV), "w", newline="") as f:
        f.write("\n".join(lines) + "\n")


def write_hc18(out, seed, n):
    """HC18 format: 800x540 trans-thalamic heads whose circumference follows q500 at their GA."""
    os.makedirs(os.path.join(out, "training_set"), exist_ok=True)
    lines = [",".join(HC18_COLUMNS)]
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        hc = hc_median(int(rng.integers(13 * 7, 40 * 7))) * math.exp(rng.normal(0, 0.03))  # some outside 100-342
        pixel_size = pick_spacing(rng, "brain", hc) * 64 / 800
        image = render_scan(rng, "brain", "trans-thalamic", hc, pixel_size, 800, 540)
        Image.fromarray(image).save(os.path.join(out, "training_set", f"{i:03d}_HC.png"), compress_level=1)
        lines.append(f"{i:03d}_HC.png,{pixel_size:.10f},{hc:.2f}")
    with open(os.path.join(out, HC18_CSV), "w", newline="") as f:
        f.write("\n".join(lines) + "\n")


def layout(out_dir):
    """Where generate writes each part, as train.py's settings name them."""
    return dict(
        train_data=os.path.join(out_dir, "shards"),
        planes_dir=os.path.join(out_dir, "planes"),
        hc18_dir=os.path.join(out_dir, "hc18"),
    )


def generate(
    out_dir="data/demo",
    seed=0,
    n_train=3000,
    n_planes=300,
    n_hc18=150,
    width=256,
    height=192,
    shard_size=500,
    caption_input_size=48,
):
    """Write the synthetic benchmark: out/shards, out/planes, out/hc18 (deterministic in seed)."""
    start = time.time()
    folders = layout(out_dir)
    write_shards(folders["train_data"], seed, n_train, width, height, shard_size, caption_input_size)
    write_planes(folders["planes_dir"], seed, n_planes, width, height)
    write_hc18(folders["hc18_dir"], seed, n_hc18)
    print(
        f"wrote {out_dir}: {n_train} pairs in {math.ceil(n_train / shard_size)} shards, {n_planes} Planes DB "
        f"images, {n_hc18} HC18 images in {time.time() - start:.1f} s"
    )


if __name__ == "__main__":
    generate(**configurator.configure(configurator.settings(globals()), sys.argv[1:]))
