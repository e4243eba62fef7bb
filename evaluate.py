"""Zero-shot evaluation with the FetalCLIP protocol (FetalCLIP, Maani et al. 2025; paper Sec. 4), and predictions
on your own scans. analysis.py holds the paper's further analyses (Tables 4-5, Figures 2-3).

    python evaluate.py out/best.pt                                   # table + out/best_zeroshot.json
    python evaluate.py mobile_fetal_clip_weights.pt --planes_dir=FETAL_PLANES_DB --hc18_dir=HC18
    python evaluate.py out/best.pt --images=my_scans/ --pixel_size=0.12   # planes, sub-plane, GA per scan
    python evaluate.py out/best.pt --eval_split=report               # held-out patients only (see README)

Metrics are the release's (its evaluation/zero_shot.py): over the classes present in the labels, `f1` is the mean
per-class F1, `accuracy` / `top2` / `top3` the mean per-class top-k recall (torchmetrics Accuracy(average="none")
averaged over present classes: a balanced accuracy); `pooled_accuracy` / `pooled_top2` / `pooled_top3` are the
fraction of all images instead. A prediction of one of the four absent five-plane classes only counts as a miss.
HC18 reports the validity rate over 100-342 mm heads (`n`, of `n_images`; `excluded` outside that range), its
bootstrap 95% CI and Spearman(predicted GA, true HC), reported as 0.0 when the prediction is constant (there is no
ranking to correlate) or n <= 2, as the release does, so tables compare.

JSON layout: five_planes.{f1, accuracy, top2, top3, pooled_*, n, per_class.<name>.{f1, recall, n}},
brain_subplanes.{same}, hc18.{validity, valid, n, n_images, excluded, ci_low, ci_high, spearman, text_encodings},
f1_all, avg, split.

On a CPU most of the time goes to the 875 GA prompts per distinct pixel spacing; on the demo the real-size student
takes minutes on 2 cores, on a GPU seconds (progress bars show both stages).
"""

import json
import math
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats
from tqdm import tqdm

import configurator
import data
from model import load_model

# ------------------------------------------------------------------ settings: --key=value
ckpt = ""  # the checkpoint to evaluate: the one positional argument
model = ""  # model.py name; '' = the name the checkpoint stores (or the one its keys show)
planes_dir = "data/demo/planes"  # Planes DB folder (the demo's is written by python synthetic.py)
hc18_dir = "data/demo/hc18"  # HC18 folder
eval_split = "all"  # 'all' = the published protocol; 'select' / 'report' = patient-disjoint 20 / 80 parts
images = ""  # your own scans instead of the benchmark: image files or folders, comma-separated
pixel_size = -1.0  # mm per pixel of those scans (as HC18's 'pixel size(mm)'); > 0 adds a GA estimate
out_dir = ""  # where the JSON / CSV go; '' = beside the checkpoint
device = ""  # '' = cuda, else mps, else cpu
batch_size = 64
num_workers = 0  # image-loading processes
cache_text = True  # GA prompts encoded once per distinct pixel spacing; False = per image, as the release
DEFAULTS = configurator.settings(globals())

PROMPTS = json.loads(Path(__file__).with_name("zero_shot_prompts.json").read_text())
FIVE_PLANES = list(PROMPTS["five_planes"])  # class index = key order (9 classes)
BRAIN_SUBPLANES = list(PROMPTS["brain_subplanes"])  # 3 classes
PLANE_TO_CLASS = {
    "Fetal brain": "brain",
    "Fetal abdomen": "abdomen",
    "Fetal thorax": "heart",
    "Fetal femur": "femur",
    "Maternal cervix": "cervix",
}  # 'Other' is dropped
BRAIN_DROPPED = {"Not A Brain", "Other"}
GA_DAYS = np.array([7 * weeks + day for weeks in range(14, 39) for day in range(7)])  # 98..272
# HC (mm) quantile curves over GA (FetalCLIP release, INTERGROWTH-style fit): exp(poly3(days / 7))
GA_CURVES = {
    "q025": (1.59317517131532, 0.29459800552433, -7.3860372566707e-3, 6.56951770216148e-5),
    "q500": (2.09924879247164, 0.253373656106037, -6.05647816678282e-3, 5.14256072059917e-5),
    "q975": (2.50074069629423, 0.220067854715719, -4.93623111462443e-3, 3.89066000946519e-5),
}
HC_MIN, HC_MAX, TOP_N, BOOTSTRAP = 100.0, 342.0, 15, 10_000

# ------------------------------------------------------------------ protocol: metrics on arrays


def per_class_scores(predictions, labels):
    """{class: (f1, recall, n)} over the classes present in `labels`. A prediction of an absent
    class is only a miss for the true class: it is nobody's false positive that counts."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    scores = {}
    for c in np.unique(labels):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        scores[c.item()] = (2 * tp / (2 * tp + fp + fn), tp / (tp + fn), int(tp + fn))  # F1 = 0 if tp = 0
    return scores


def macro_f1(predictions, labels):
    """Macro F1 over the classes present in `labels` (= sklearn f1_score(labels=present))."""
    return float(np.mean([f1 for f1, _, _ in per_class_scores(predictions, labels).values()]))


def classification_metrics(probs, labels, class_names):
    """probs (N, C) softmax over all C prompt classes, labels (N,) class indices -> the release's metrics."""
    if not len(labels):
        return {"f1": math.nan, "accuracy": math.nan, "top2": math.nan, "top3": math.nan, "n": 0, "per_class": {}}
    ranked = np.argsort(-probs, axis=1, kind="stable")  # ties: lower class index first
    per_class = per_class_scores(ranked[:, 0], labels)
    out = {"f1": float(np.mean([s[0] for s in per_class.values()]))}
    for k, name in ((1, "accuracy"), (2, "top2"), (3, "top3")):
        hit = (ranked[:, :k] == labels[:, None]).any(1)  # (N,) the true class among the k best
        out[name] = float(np.mean([hit[labels == c].mean() for c in per_class]))  # per class, then averaged
        out[f"pooled_{name}"] = float(hit.mean())
    out["n"] = int(len(labels))
    out["per_class"] = {
        class_names[c]: {"f1": float(f1), "recall": float(r), "n": n} for c, (f1, r, n) in per_class.items()
    }
    return out


def ga_quantile(days, curve="q500"):
    """HC in mm at gestational age `days` on one of the GA_CURVES."""
    b0, b1, b2, b3 = GA_CURVES[curve]
    w = np.asarray(days, dtype=np.float64) / 7
    return np.exp(b0 + b1 * w + b2 * w**2 + b3 * w**3)


def ga_prediction(scores, top_n=TOP_N):
    """(n, 175) -> (n,) predicted days: the median index among the top_n highest scores.
    The released code sorts [index, score] pairs by score descending with Python's stable sort,
    so equal scores keep index order (the lower index ranks higher, also at the top_n cut-off),
    then re-sorts the kept pairs by index and takes position top_n // 2 (= 7)."""
    top = np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :top_n]
    return GA_DAYS[np.sort(top, axis=1)[:, top_n // 2]]  # the release indexes days with 98 + index


def ga_validity(scores, true_hc):
    """scores (n, 175) template-averaged over GA days 98..272, true_hc (n,) mm -> dict. Bootstrap:
    numpy default_rng(42), 10,000 resamples of the kept images, percentiles 2.5 / 97.5."""
    scores, true_hc = np.asarray(scores), np.asarray(true_hc, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(GA_DAYS) or len(true_hc) != len(scores):
        raise ValueError(
            f"ga_validity: expected scores (n, {len(GA_DAYS)}) and true_hc (n,), got {scores.shape} and {true_hc.shape}"
        )
    pred_days = ga_prediction(scores)
    kept = (true_hc >= HC_MIN) & (true_hc <= HC_MAX)  # inclusive bounds
    is_valid = kept & (ga_quantile(pred_days, "q025") <= true_hc) & (true_hc <= ga_quantile(pred_days, "q975"))
    hits, n = is_valid[kept], int(kept.sum())
    ci_low = ci_high = math.nan
    if n:
        draws = np.random.default_rng(42).integers(0, n, size=(BOOTSTRAP, n))
        ci_low, ci_high = np.percentile(100 * hits[draws].mean(1), [2.5, 97.5])
    spearman = 0.0  # a constant prediction has no ranking: 0.0, as the release reports it
    if n > 2 and np.ptp(pred_days[kept]) > 0:
        spearman = stats.spearmanr(pred_days[kept], true_hc[kept]).statistic
    return {
        "validity": float(100 * hits.mean()) if n else math.nan,
        "valid": int(hits.sum()),
        "n": n,
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "spearman": float(spearman),
        "pred_days": pred_days,
        "kept": kept,
        "is_valid": is_valid,
    }


# ------------------------------------------------------------------ encoding


class Images(torch.utils.data.Dataset):
    """Image files -> (normalised tensor, original max(W, H)); an unreadable file is an error naming it."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = Image.open(self.paths[i]).convert("RGB")
        except Exception as error:  # PIL raises several types for unreadable files
            raise ValueError(f"{self.paths[i]}: not a readable image ({error})") from None
        return self.transform(image), max(image.size)  # original size, before pad-to-square


@torch.no_grad()
def encode_images(model, paths, batch_size=64, device="cpu", num_workers=0):
    """-> (N, D) L2-normalised float32 CPU features and the (N,) original max(W, H) of each image."""
    transform = data.eval_transform(model.image_size, model.image_mean, model.image_std)
    dataset = Images(list(paths), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    features, sides = [], []
    for images, max_sides in tqdm(loader, desc="images", unit="batch", leave=False):
        features.append(F.normalize(model.encode_image(images.to(device)).float(), dim=-1).cpu())
        sides += max_sides.tolist()
    return (torch.cat(features) if features else torch.zeros(0, model.embed_dim)), sides


@torch.no_grad()
def encode_prompts(model, prompts, device="cpu"):
    tokens = data.tokenize(prompts, context_length=model.context_length).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1).cpu()  # (P, D)


def class_embeddings(model, prompts_by_class, device="cpu"):
    """Encode each prompt, L2-normalise, average per class, re-normalise -> (C, D)."""
    return F.normalize(
        torch.stack([encode_prompts(model, p, device).mean(0) for p in prompts_by_class.values()]), dim=-1
    )


def ga_text_features(model, spacing, device="cpu"):
    """(5, 175, D): each GA template over weeks 14..38 x days 0..6, one template per batch as the
    release does, so cached and per-image features are bit-identical."""
    return torch.stack(
        [
            encode_prompts(
                model,
                [
                    template.replace("{weeks}", str(weeks))
                    .replace("{day}", str(day))
                    .replace("{pixel_spacing}", spacing)
                    for weeks in range(14, 39)
                    for day in range(7)
                ],
                device,
            )
            for template in PROMPTS["ga_templates"]
        ]
    )


def ga_spacing(side, pixel_size, image_size):
    """The GA prompts' pixel spacing: mm per pixel of the model input, `%.2f` (the image is padded to a square
    of its longer side `side`, then resized to image_size)."""
    return f"{side / image_size * pixel_size:.2f}"


def ga_scores(model, image_features, spacings, cache_text=True, device="cpu"):
    """image_features (n, D), spacings n '%.2f' strings -> ((n, 175) float32 scores, prompts encoded).
    The GA text features depend on the image only through its spacing string, so cache_text=True
    encodes them once per distinct string; cache_text=False re-encodes them per image (release)."""
    cache, encoded, scores = {}, 0, []
    for feature, spacing in zip(tqdm(image_features, desc="GA prompts", unit="image", leave=False), spacings):
        if not cache_text or spacing not in cache:
            cache[spacing] = ga_text_features(model, spacing, device).flatten(0, 1)  # (875, D)
            encoded += cache[spacing].shape[0]
        text = cache[spacing] if cache_text else cache.pop(spacing)
        # 100 * img @ txt.T per image, averaged over the 5 templates: (1, 875) -> (175,)
        scores.append((100.0 * feature[None] @ text.T).view(len(PROMPTS["ga_templates"]), -1).mean(0))
    return torch.stack(scores).numpy() if scores else np.zeros((0, len(GA_DAYS)), np.float32), encoded


# ------------------------------------------------------------------ datasets and the zero-shot benchmark


def select_split(patient, split):
    """'all' = the published protocol; 'select' / 'report' = a patient-disjoint 20 / 80 split, fixed
    by a hash of the patient id, for choosing checkpoints on data the report never sees."""
    if split == "all":
        return True
    if split not in ("select", "report"):
        raise ValueError(f"eval_split must be 'all', 'select' or 'report', got {split!r}")
    return (zlib.crc32(str(patient).encode()) % 5 == 0) == (split == "select")


def require(folder, csv_name, what):
    if not (Path(folder) / csv_name).is_file():
        raise FileNotFoundError(
            f"{what}: {Path(folder) / csv_name} not found. Generate the synthetic benchmark with "
            f"`python synthetic.py` (writes data/demo/planes and data/demo/hc18), or point "
            f"--planes_dir / --hc18_dir at the real {what} folder."
        )


def planes_rows(planes_dir, split="all", include_other=False):
    """Planes DB rows with 'five' / 'brain' class indices (-1 where the protocol drops the row). A split with no row
    of either task (a header-only file, an --eval_split that leaves none) is an error naming the folder."""
    require(planes_dir, data.PLANES_CSV, "Planes DB")
    rows, read = [], data.read_planes_db(planes_dir)
    for row in read:
        plane, brain, where = row["plane"], row["brain_plane"], f"{row['csv']}, row {row['row']}"
        if plane != "Other" and plane not in PLANE_TO_CLASS:
            raise ValueError(f"{where}: unknown Plane {plane!r}, expected one of {list(PLANE_TO_CLASS)} or Other")
        if brain not in BRAIN_DROPPED and brain.lower() not in BRAIN_SUBPLANES:
            raise ValueError(f"{where}: unknown Brain_plane {brain!r}, expected {BRAIN_SUBPLANES} or {BRAIN_DROPPED}")
        five = FIVE_PLANES.index(PLANE_TO_CLASS[plane]) if plane in PLANE_TO_CLASS else -1
        sub = BRAIN_SUBPLANES.index(brain.lower()) if brain not in BRAIN_DROPPED else -1
        if select_split(row["patient"], split) and (five >= 0 or sub >= 0 or include_other):
            rows.append(dict(row, five=five, sub=sub))
    if not any(r["five"] >= 0 or r["sub"] >= 0 for r in rows):
        raise ValueError(f"Planes DB {planes_dir}, split {split!r}: no image to evaluate ({len(read)} rows read)")
    return rows


def require_tasks(rows, planes_dir, split):
    """Both tasks have images (five planes, brain sub-planes), else F1-all and Avg are undefined (nan)."""
    for label, task in (("five", "five-plane"), ("sub", "brain sub-plane")):
        if not any(r[label] >= 0 for r in rows):
            raise ValueError(f"Planes DB {planes_dir}, split {split!r}: no {task} image (its F1 and Avg would be nan)")


def hc18_rows(hc18_dir, split="all"):
    """HC18 rows of the split; none, or none within the protocol's HC_MIN-HC_MAX mm (a column in cm), is an error."""
    require(hc18_dir, data.HC18_CSV, "HC18")
    # HC18 names images <subject>_HC.png, <subject>_2HC.png, ...: the prefix is the subject
    rows = [row for row in data.read_hc18(hc18_dir) if select_split(row["filename"].split("_")[0], split)]
    heads, where = [row["hc"] for row in rows], f"HC18 {Path(hc18_dir) / data.HC18_CSV}, split {split!r}"
    if not any(HC_MIN <= hc <= HC_MAX for hc in heads):  # also when the split is empty
        unit = " (all under 50: the column must be in mm, not cm)" if heads and max(heads) < 50 else ""
        raise ValueError(f"{where}: {len(rows)} heads, none within the protocol's {HC_MIN:.0f}-{HC_MAX:.0f} mm{unit}")
    return rows


def zero_shot(
    model, planes_dir, hc18_dir, batch_size=64, device="cpu", split="all", cache_text=True, num_workers=0, details=False
):
    """Five planes, brain sub-planes and HC18 (FetalCLIP's protocol) -> nested dict (module docstring). The model
    must already be on `device`; its train/eval mode is restored. details=True adds the features
    and per-image predictions under '_details' (not JSON-serialisable; used by the analyses)."""
    was_training = model.training
    model.eval()
    rows = planes_rows(planes_dir, split, include_other=details)
    hc_rows = hc18_rows(hc18_dir, split)
    features, _ = encode_images(model, [r["path"] for r in rows], batch_size, device, num_workers)
    results, extra = {"split": split}, {"planes_rows": rows, "planes_features": features}
    for key, prompts, label in (
        ("five_planes", PROMPTS["five_planes"], "five"),
        ("brain_subplanes", PROMPTS["brain_subplanes"], "sub"),
    ):
        labels = np.array([r[label] for r in rows], dtype=np.int64)
        logits = 100.0 * features @ class_embeddings(model, prompts, device).T  # (N, C)
        mask = labels >= 0
        results[key] = classification_metrics(logits[mask].softmax(-1).numpy(), labels[mask], list(prompts))
        extra[key + "_logits"] = logits
    hc_features, sides = encode_images(model, [r["path"] for r in hc_rows], batch_size, device, num_workers)
    spacings = [ga_spacing(side, r["pixel_size"], model.image_size) for side, r in zip(sides, hc_rows)]
    scores, encoded = ga_scores(model, hc_features, spacings, cache_text, device)
    hc = ga_validity(scores, [r["hc"] for r in hc_rows])
    results["hc18"] = {k: hc[k] for k in ("validity", "valid", "n", "ci_low", "ci_high", "spearman")}
    results["hc18"].update(n_images=len(hc_rows), excluded=len(hc_rows) - hc["n"], text_encodings=encoded)
    results["f1_all"] = (5 * results["five_planes"]["f1"] + 3 * results["brain_subplanes"]["f1"]) / 8
    results["avg"] = (results["f1_all"] + hc["validity"] / 100) / 2
    if details:
        results["_details"] = dict(
            extra,
            hc18=hc,
            hc18_true=np.array([r["hc"] for r in hc_rows]),
            hc18_scores=scores,
            hc18_features=hc_features,
        )
    model.train(was_training)
    return results


def summary(results):
    """One line: the protocol's five figures."""
    parts = [f"F1-5 {results['five_planes']['f1']:.3f}", f"F1-3 {results['brain_subplanes']['f1']:.3f}"]
    parts += [f"HC18 {results['hc18']['validity']:5.1f}%", f"F1-all {results['f1_all']:.3f}"]
    return " | ".join(parts + [f"Avg {results['avg']:.3f}"])


def format_table(results):
    lines = []
    for key, title in (("five_planes", "Five planes"), ("brain_subplanes", "Brain sub-planes")):
        r = results[key]
        lines += [f"{title} (n={r['n']})", f"  {'class':<20} {'F1':>7} {'recall':>7} {'n':>6}"]
        lines += [f"  {name:<20} {c['f1']:7.4f} {c['recall']:7.4f} {c['n']:6d}" for name, c in r["per_class"].items()]
        lines += [
            f"  {'macro':<20} {r['f1']:7.4f} {r['accuracy']:7.4f}",
            f"  accuracy {r['accuracy']:.4f} | top-2 {r['top2']:.4f} | top-3 {r['top3']:.4f} (per class, "
            f"averaged) | pooled {r['pooled_accuracy']:.4f} / {r['pooled_top2']:.4f} / {r['pooled_top3']:.4f}",
        ]
    h = results["hc18"]
    lines += [
        f"HC18 validity {h['validity']:.2f}% ({h['valid']}/{h['n']}; {h['excluded']} of {h['n_images']} images "
        f"outside {HC_MIN:.0f}-{HC_MAX:.0f} mm excluded), 95% CI [{h['ci_low']:.2f}, {h['ci_high']:.2f}], "
        f"Spearman {h['spearman']:.4f}",
        f"F1-all {results['f1_all']:.4f} | Avg {results['avg']:.4f} | split {results['split']}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ your own scans (--images)


def image_paths(spec):
    """'a.png,scans/' -> the image files, folders expanded (sorted); a missing path is an error naming it."""
    paths = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if os.path.isdir(item):
            paths += sorted(str(p) for p in Path(item).iterdir() if p.suffix.lower() in Image.registered_extensions())
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"--images: {item} is neither an image file nor a folder")
    if not paths:
        raise FileNotFoundError(f"--images={spec}: no image files found")
    return paths


@torch.no_grad()
def predict(model, paths, pixel_size=-1.0, batch_size=64, device="cpu", num_workers=0):
    """Per image: the five-plane probabilities (top 3), the brain sub-plane when the plane is brain, and with a
    pixel size (mm/pixel) the GA estimate of the HC18 protocol (its prompts, the top-15 median rule)."""
    model.eval()
    features, sides = encode_images(model, paths, batch_size, device, num_workers)
    plane_probs = (100.0 * features @ class_embeddings(model, PROMPTS["five_planes"], device).T).softmax(-1)
    brain_probs = (100.0 * features @ class_embeddings(model, PROMPTS["brain_subplanes"], device).T).softmax(-1)
    days = [None] * len(paths)
    if pixel_size > 0:
        spacings = [ga_spacing(side, pixel_size, model.image_size) for side in sides]
        days = ga_prediction(ga_scores(model, features, spacings, device=device)[0]).tolist()
    rows = []
    for path, planes, brain, ga in zip(paths, plane_probs, brain_probs, days):
        top = planes.topk(3)
        row = {
            "image": path,
            **{f"plane{k + 1}": FIVE_PLANES[int(i)] for k, i in enumerate(top.indices)},
            **{f"p{k + 1}": round(float(p), 4) for k, p in enumerate(top.values)},
        }
        is_brain = FIVE_PLANES[int(top.indices[0])] == "brain"
        row["subplane"] = BRAIN_SUBPLANES[int(brain.argmax())] if is_brain else ""
        row["p_subplane"] = round(float(brain.max()), 4) if is_brain else ""
        row["ga"] = f"{ga // 7}w{ga % 7}d" if ga is not None else ""
        row["ga_days"] = ga if ga is not None else ""
        rows.append(row)
    return rows


def write_predictions(rows, out_dir, stem):
    """Print the table; write <stem>_predictions.csv and .json into out_dir -> their paths."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    for row in [dict(zip(columns, columns))] + rows:
        print("  ".join(f"{str(row[c]):<{widths[c]}}" for c in columns))
    csv_path, json_path = Path(out_dir) / f"{stem}_predictions.csv", Path(out_dir) / f"{stem}_predictions.json"
    with open(csv_path, "w", newline="") as f:
        writer = data.csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=1))
    print(f"wrote {csv_path} and {json_path}")
    return csv_path, json_path


# ------------------------------------------------------------------ command line


def plain(obj):
    """JSON-ready copy: numpy scalars -> Python, NaN -> null, '_' keys dropped."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (np.generic, float)):
        obj = obj.item() if isinstance(obj, np.generic) else obj
        return None if isinstance(obj, float) and math.isnan(obj) else obj
    return obj


def run(config):
    """The command line's work -> what it wrote or computed."""
    if not config["ckpt"]:
        raise FileNotFoundError("no checkpoint given: python evaluate.py CKPT [--key=value ...]")
    device, ckpt = configurator.pick_device(config["device"]), Path(config["ckpt"])
    out_dir = Path(config["out_dir"] or ckpt.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = load_model(str(ckpt), config["model"]).to(device).eval()
    print(f"{ckpt}: {net.name} on {device}")
    batching = dict(batch_size=config["batch_size"], device=device, num_workers=config["num_workers"])
    if config["images"]:
        rows = predict(net, image_paths(config["images"]), config["pixel_size"], **batching)
        return write_predictions(rows, out_dir, ckpt.stem)
    kwargs = dict(batching, split=config["eval_split"], cache_text=config["cache_text"])
    results = zero_shot(net, config["planes_dir"], config["hc18_dir"], **kwargs)
    print(format_table(results))
    out_json = out_dir / f"{ckpt.stem}_zeroshot.json"
    configurator.write_atomic(out_json, json.dumps(plain(results), indent=1))
    print(f"wrote {out_json}")
    return results


def main(arguments):
    config = configurator.configure(dict(DEFAULTS), arguments, positional="ckpt")
    try:
        return run(config)
    except (FileNotFoundError, ValueError) as error:  # the user's files: one line, no traceback
        raise SystemExit(f"evaluate.py: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
