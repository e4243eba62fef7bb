"""Zero-shot evaluation with the FetalCLIP protocol (FetalCLIP, Maani et al. 2025; paper Sec. 4). predict.py applies
a model to your own scans; analysis.py holds the paper's further analyses (Tables 4-5, Figures 2-3).

    python evaluate.py out/best.pt                                   # table + out/best_zeroshot.json
    python evaluate.py mobile_fetal_clip_weights.pt --planes_dir=FETAL_PLANES_DB --hc18_dir=HC18
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

import dataclasses
import json
import math
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
import scans
from model import load_model

# ------------------------------------------------------------------ settings: --key=value
ckpt = ""  # the checkpoint to evaluate: the one positional argument
model = ""  # model.py name; '' = the name the checkpoint stores (or the one its keys show)
planes_dir = ""  # Planes DB folder; '' = the demo's (data/demo/planes, python synthetic.py) unless --task is given
hc18_dir = ""  # HC18 folder; '' = the demo's (data/demo/hc18) unless --task is given
task = ""  # your labelled scans: task folders (one sub-folder per class + prompts.json), comma-separated
prompts = ""  # the tasks' prompts JSON {class: [prompt, ...]}; '' = each task folder's prompts.json
eval_split = "all"  # 'all' = the published protocol; 'select' / 'report' = patient-disjoint 20 / 80 parts
out_dir = ""  # where the JSON goes; '' = beside the checkpoint
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
DEMO_FOLDERS = {"planes_dir": "data/demo/planes", "hc18_dir": "data/demo/hc18"}  # synthetic.layout("data/demo")

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


def bootstrap_f1(predictions, labels, draws=BOOTSTRAP, chunk=500):
    """95% CI of the macro F1 (classes present in each resample), as HC18's: numpy default_rng(42), `draws` resamples
    of the items, percentiles 2.5 / 97.5."""
    predictions, labels, rng, values = np.asarray(predictions), np.asarray(labels), np.random.default_rng(42), []
    for start in range(0, draws, chunk):
        picks = rng.integers(0, len(labels), size=(min(chunk, draws - start), len(labels)))
        drawn_predictions, drawn_labels = predictions[picks], labels[picks]  # (chunk, N)
        f1 = []
        for c in np.unique(labels):
            tp = ((drawn_predictions == c) & (drawn_labels == c)).sum(1)
            wrong = ((drawn_predictions == c) != (drawn_labels == c)).sum(1)  # false positives + false negatives
            present = (drawn_labels == c).any(1)
            f1.append(np.where(present, 2 * tp / np.maximum(2 * tp + wrong, 1), np.nan))
        values.append(np.nanmean(np.stack(f1), axis=0))
    low, high = np.percentile(np.concatenate(values), [2.5, 97.5])
    return float(low), float(high)


def classification_metrics(probs, labels, class_names):
    """probs (N, C) softmax over all C prompt classes, labels (N,) class indices -> the release's metrics, and the
    bootstrap 95% CI of the macro F1 (f1_ci_low, f1_ci_high)."""
    if not len(labels):
        return {"f1": math.nan, "accuracy": math.nan, "top2": math.nan, "top3": math.nan, "n": 0, "per_class": {}}
    ranked = np.argsort(-probs, axis=1, kind="stable")  # ties: lower class index first
    per_class = per_class_scores(ranked[:, 0], labels)
    out = {"f1": float(np.mean([s[0] for s in per_class.values()]))}
    out["f1_ci_low"], out["f1_ci_high"] = bootstrap_f1(ranked[:, 0], labels)
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
            image = Image.open(self.paths[i])
            image.load()
            image = data.to_8bit(image)[0]  # 'L' or 'RGB', 16-bit scaled, not clipped
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


def ga_scores(model, image_features, spacings, cache_text=True, device="cpu", text_cache=None):
    """image_features (n, D), spacings n '%.2f' strings -> ((n, 175) float32 scores, prompts encoded).
    The GA text features depend on the image only through its spacing string, so cache_text=True
    encodes them once per distinct string (kept in `text_cache` across calls when given); cache_text=False
    re-encodes them per image (release)."""
    cache, encoded, scores = {} if text_cache is None else text_cache, 0, []
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


def check_sets(planes_dir="", hc18_dir="", task_folders="", prompts="", split="all"):
    """Every evaluation set that is given, checked before anything runs: each row, each image decoded (a truncated
    PNG has a good header), both Planes DB tasks present -> the user's tasks (read_tasks)."""
    planes = planes_rows(planes_dir, split) if planes_dir else []
    if planes_dir:
        require_tasks(planes, planes_dir, split)
    data.decode_all([row["path"] for row in planes + (hc18_rows(hc18_dir, split) if hc18_dir else [])])
    return read_tasks(task_folders, prompts)


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


# ------------------------------------------------------------------ tasks: labelled scans and prompts per class
# A zero-shot classification task is its prompts per class (every class a candidate, class index = key order) and
# its labelled items. The protocol's two are read from Planes DB (PLANES_TASKS); a user's task is a folder.

PLANES_TASKS = {"five_planes": "five", "brain_subplanes": "sub"}  # name (its PROMPTS key) -> planes_rows' class key


@dataclasses.dataclass
class Task:
    """A user's task: its prompts and scans.labelled(folder): every view of a file carries the file's class."""

    name: str
    prompts: dict  # {class: [prompt, ...]}
    files: list  # [(path, kind)] as scans.find gives them
    labels: list  # the class index of each file
    skipped: list  # [(path, reason)]: scans that could not be read
    ignored: list  # [(path, reason)]: files that are not scans


def read_prompts(path):
    """{class: [prompt, ...]} from a JSON file, checked: two classes or more, each with non-empty prompts."""
    try:
        prompts = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: prompts file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(prompts, dict) or len(prompts) < 2:
        raise ValueError(f"{path}: expected a JSON object {{class: [prompt, ...]}} with two classes or more")
    for name, texts in prompts.items():
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) and t.strip() for t in texts)):
            raise ValueError(f"{path}: class {name!r} needs a non-empty list of prompt strings")
    return prompts


def read_task(folder, prompts=""):
    """A task folder -> Task, its prompts from `prompts` or folder/prompts.json. A class without a folder stays a
    candidate: predicting it is a miss, as the protocol's absent planes."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"task {folder}: not a folder")
    classes = read_prompts(prompts or Path(folder) / "prompts.json")
    return Task(Path(folder).name, classes, *scans.labelled(folder, list(classes)))


def read_tasks(folders, prompts=""):
    """'a/,b/' -> [Task], names made unique (a second 'scans' becomes 'scans-2')."""
    tasks, names = [], set()
    for folder in filter(None, (f.strip() for f in folders.split(","))):
        task = read_task(folder, prompts)
        base, n = task.name, 1
        while task.name in names:
            n += 1
            task.name = f"{base}-{n}"
        names.add(task.name)
        tasks.append(task)
    return tasks


@torch.no_grad()
def encode_task(model, task, batch_size=64, device="cpu", frames=0):
    """-> (N, D) L2-normalised features of every view, (N,) labels, [(path, frame, region)] per view, and the files
    skipped (task.skipped and those that failed now; views read before a failure are kept). frames > 0 keeps that many
    evenly spaced frames of each file (a clip's, the CHD probe's 16)."""
    transform = data.eval_transform(model.image_size, model.image_mean, model.image_std)
    features, labels, where, batch, skipped = [], [], [], [], list(task.skipped)

    def flush():
        images = torch.stack([transform(view.image) for view, _ in batch]).to(device)
        features.append(F.normalize(model.encode_image(images).float(), dim=-1).cpu())
        labels.extend(label for _, label in batch)
        where.extend((view.file, view.frame, view.region) for view, _ in batch)
        batch.clear()

    for (path, kind), label in zip(tqdm(task.files, desc=task.name, unit="file", leave=False), task.labels):
        try:
            indices = scans.evenly_spaced(scans.count_frames(path, kind), frames) if frames > 0 else None
            for view in scans.read(path, kind, indices=indices):
                batch.append((view, label))
                if len(batch) == batch_size:
                    flush()
        except scans.Unreadable as why:
            skipped.append((path, str(why)))
    if batch:
        flush()
    stacked = torch.cat(features) if features else torch.zeros(0, model.embed_dim)
    return stacked, np.array(labels, dtype=np.int64), where, skipped


def classify(model, features, labels, prompts, device="cpu"):
    """Zero-shot: 100 * img @ cls.T over every class of `prompts` -> (metrics, logits (N, C))."""
    logits = 100.0 * features @ class_embeddings(model, prompts, device).T  # (N, C)
    return classification_metrics(logits.softmax(-1).numpy(), labels, list(prompts)), logits


def task_results(model, tasks, batch_size, device):
    """{task name: metrics + the files skipped and ignored} for the user's tasks."""
    results = {}
    for task in tasks:
        features, labels, _, skipped = encode_task(model, task, batch_size, device)
        results[task.name] = classify(model, features, labels, task.prompts, device)[0]
        results[task.name].update(files=len(task.files), skipped=skipped, ignored=task.ignored)
    return results


def zero_shot(
    model,
    planes_dir="",
    hc18_dir="",
    batch_size=64,
    device="cpu",
    split="all",
    cache_text=True,
    num_workers=0,
    details=False,
    tasks=(),
):
    """The protocol (the five planes and brain sub-planes of planes_dir, HC18 of hc18_dir; each where given) and the
    user's `tasks` -> nested dict (module docstring). The model must already be on `device`; its train/eval mode is
    restored. details=True adds features and logits under '_details' (not JSON; used by the analyses)."""
    was_training = model.training
    model.eval()
    results, extra = {"split": split}, {}
    if planes_dir:
        extra = planes_results(model, planes_dir, results, batch_size, device, split, num_workers, details)
    if hc18_dir:
        extra.update(hc18_results(model, hc18_dir, results, batch_size, device, split, cache_text, num_workers))
    if planes_dir and hc18_dir:
        results["f1_all"] = (5 * results["five_planes"]["f1"] + 3 * results["brain_subplanes"]["f1"]) / 8
        results["avg"] = (results["f1_all"] + results["hc18"]["validity"] / 100) / 2
    if tasks:
        results["tasks"] = task_results(model, tasks, batch_size, device)
    results["selection"] = dict(zip(("value", "rule"), selection_score(results)))
    if details:
        results["_details"] = extra
    model.train(was_training)
    return results


def planes_results(model, planes_dir, results, batch_size, device, split, num_workers, details):
    """The protocol's Planes DB tasks into `results` -> what the analyses need."""
    rows = planes_rows(planes_dir, split, include_other=details)
    features, _ = encode_images(model, [r["path"] for r in rows], batch_size, device, num_workers)
    extra = {"planes_rows": rows, "planes_features": features}
    for name, key in PLANES_TASKS.items():
        labels, prompts = np.array([r[key] for r in rows], dtype=np.int64), PROMPTS[name]
        logits = 100.0 * features @ class_embeddings(model, prompts, device).T  # (N, C), "Other" rows too
        mask = labels >= 0
        results[name] = classification_metrics(logits[mask].softmax(-1).numpy(), labels[mask], list(prompts))
        extra[name + "_logits"] = logits
    return extra


def hc18_results(model, hc18_dir, results, batch_size, device, split, cache_text, num_workers):
    """HC18's GA validity into `results` -> what the analyses need."""
    hc_rows = hc18_rows(hc18_dir, split)
    hc_features, sides = encode_images(model, [r["path"] for r in hc_rows], batch_size, device, num_workers)
    spacings = [ga_spacing(side, r["pixel_size"], model.image_size) for side, r in zip(sides, hc_rows)]
    scores, encoded = ga_scores(model, hc_features, spacings, cache_text, device)
    hc = ga_validity(scores, [r["hc"] for r in hc_rows])
    results["hc18"] = {k: hc[k] for k in ("validity", "valid", "n", "ci_low", "ci_high", "spearman")}
    results["hc18"].update(n_images=len(hc_rows), excluded=len(hc_rows) - hc["n"], text_encodings=encoded)
    true_hc = np.array([r["hc"] for r in hc_rows])
    return dict(hc18=hc, hc18_true=true_hc, hc18_scores=scores, hc18_features=hc_features)


def selection_score(results):
    """(value, rule) by which train.py keeps best.pt: the protocol's Avg (paper Sec. 3.6) when both its data sets
    are evaluated, else F1-all (Planes DB alone), else HC18 validity / 100, else the mean macro F1 of the user's
    tasks; NaN when nothing was evaluated."""
    if "avg" in results:
        return results["avg"], "Avg"
    if "five_planes" in results:
        return (5 * results["five_planes"]["f1"] + 3 * results["brain_subplanes"]["f1"]) / 8, "F1-all"
    if "hc18" in results:
        return results["hc18"]["validity"] / 100, "HC18 validity"
    if results.get("tasks"):
        return float(np.mean([t["f1"] for t in results["tasks"].values()])), "mean task F1"
    return math.nan, "nothing evaluated"


def summary(results):
    """One line: the protocol's figures and each task's macro F1, as far as they were evaluated."""
    parts = []
    if "five_planes" in results:
        parts += [f"F1-5 {results['five_planes']['f1']:.3f}", f"F1-3 {results['brain_subplanes']['f1']:.3f}"]
    if "hc18" in results:
        parts.append(f"HC18 {results['hc18']['validity']:5.1f}%")
    if "avg" in results:
        parts += [f"F1-all {results['f1_all']:.3f}", f"Avg {results['avg']:.3f}"]
    parts += [f"{name} F1 {task['f1']:.3f}" for name, task in results.get("tasks", {}).items()]
    return " | ".join(parts)


def task_table(title, r):
    lines = [f"{title} (n={r['n']})", f"  {'class':<20} {'F1':>7} {'recall':>7} {'n':>6}"]
    lines += [f"  {name:<20} {c['f1']:7.4f} {c['recall']:7.4f} {c['n']:6d}" for name, c in r["per_class"].items()]
    return lines + [
        f"  {'macro':<20} {r['f1']:7.4f} {r['accuracy']:7.4f}  F1 95% CI [{r['f1_ci_low']:.4f}, {r['f1_ci_high']:.4f}]",
        f"  accuracy {r['accuracy']:.4f} | top-2 {r['top2']:.4f} | top-3 {r['top3']:.4f} (per class, "
        f"averaged) | pooled {r['pooled_accuracy']:.4f} / {r['pooled_top2']:.4f} / {r['pooled_top3']:.4f}",
    ]


def format_table(results):
    lines = []
    for key, title in (("five_planes", "Five planes"), ("brain_subplanes", "Brain sub-planes")):
        lines += task_table(title, results[key]) if key in results else []
    if "hc18" in results:
        h = results["hc18"]
        lines.append(
            f"HC18 validity {h['validity']:.2f}% ({h['valid']}/{h['n']}; {h['excluded']} of {h['n_images']} images "
            f"outside {HC_MIN:.0f}-{HC_MAX:.0f} mm excluded), 95% CI [{h['ci_low']:.2f}, {h['ci_high']:.2f}], "
            f"Spearman {h['spearman']:.4f}"
        )
    if "avg" in results:
        lines.append(f"F1-all {results['f1_all']:.4f} | Avg {results['avg']:.4f} | split {results['split']}")
    for name, task in results.get("tasks", {}).items():
        lines += task_table(f"Task {name}", task)
        lines += [f"  skipped {path}: {why}" for path, why in task["skipped"]]
        lines += [f"  ignored {len(task['ignored'])} files that are not scans"] if task["ignored"] else []
    return "\n".join(lines)


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
    demo = {} if config["task"] else DEMO_FOLDERS  # the protocol runs on the demo's data unless tasks are named
    planes_dir, hc18_dir = (config[k] or demo.get(k, "") for k in ("planes_dir", "hc18_dir"))
    tasks = check_sets(planes_dir, hc18_dir, config["task"], config["prompts"], config["eval_split"])
    batching = dict(batch_size=config["batch_size"], device=device, num_workers=config["num_workers"])
    kwargs = dict(batching, split=config["eval_split"], cache_text=config["cache_text"], tasks=tasks)
    results = zero_shot(net, planes_dir, hc18_dir, **kwargs)
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
