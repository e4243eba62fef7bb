"""The FetalCLIP zero-shot protocol's data sets and metrics, without a model (FetalCLIP, Maani et al. 2025;
paper Sec. 4): its prompts, the Planes DB and HC18 readers and checks, the patient splits, the release's
metrics and the GA rule. evaluate.py applies them to a model. Run it to check a copy of the data sets before
a long run:

    python protocol.py --planes_dir=FETAL_PLANES_DB --hc18_dir=HC18    # rows, classes, splits; every image decoded

Metrics are the release's (its evaluation/zero_shot.py): over the classes present in the labels, `f1` is the
mean per-class F1, `accuracy` / `top2` / `top3` the mean per-class top-k recall (torchmetrics
Accuracy(average="none") averaged over present classes: a balanced accuracy); `pooled_accuracy` /
`pooled_top2` / `pooled_top3` are the fraction of all images instead. A prediction of one of the four absent
five-plane classes only counts as a miss. HC18 reports the validity rate over 100-342 mm heads (`n`, of
`n_images`; `excluded` outside that range), its bootstrap 95% CI and Spearman(predicted GA, true HC),
reported as 0.0 when the prediction is constant (there is no ranking to correlate) or n <= 2, as the release
does, so tables compare."""

import concurrent.futures
import json
import math
import os
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import stats

import configurator
from data import read_csv

DEFAULTS = {  # python protocol.py --key=value
    "planes_dir": "",  # Planes DB folder to check
    "hc18_dir": "",  # HC18 folder to check
    "eval_split": "all",  # 'all' = the published protocol; 'select' / 'report' = patient-disjoint 20 / 80 parts
}

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
SCALE = 100.0  # zero-shot logits are SCALE * img @ txt.T (cosines), FetalCLIP's fixed scale

# ------------------------------------------------------------------ the data sets' files

PLANES_CSV = "FETAL_PLANES_DB_data.csv"
PLANES_COLUMNS = (
    "Image_name",
    "Patient_num",
    "Plane",
    "Brain_plane",
    "Operator",
    "US_Machine",
    "Train ",
)
HC18_CSV = "training_set_pixel_size_and_HC.csv"
HC18_COLUMNS = ("filename", "pixel size(mm)", "head circumference (mm)")
PIXEL_SIZE_RANGE_MM = (
    0.01,
    5.0,
)  # a plausible B-mode pixel size in mm: HC18's CSV and --pixel_size


def check_pixel_size(value, what):
    """A pixel size in mm that is positive, finite and plausible, or ValueError naming `what`."""
    low, high = PIXEL_SIZE_RANGE_MM
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(
            f"{what}={value!r}: expected a pixel size in mm between {low:g} and {high:g}"
        )
    return value


def _number(path, line, column, text, kind, positive=False, within=None):
    """A CSV cell as an int or float; positive=True also refuses 0, negatives, nan and inf (sizes, spacings);
    within=(low, high) refuses what lies outside (and nan)."""
    expected = (
        "an integer" if kind is int else "a positive finite number" if positive else "a number"
    )
    try:
        value = kind(text)
    except ValueError:
        value = None
    refused = value is None or positive and not (math.isfinite(value) and value > 0)
    if refused or within and not within[0] <= value <= within[1]:
        expected = f"a number in [{within[0]}, {within[1]}]" if within else expected
        raise ValueError(f"{path}, row {line}: column {column!r} = {text!r} is not {expected}")
    return value


def _existing(path):
    """An image file that exists and whose header PIL reads (fast: nothing is decoded; see decode_all)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        Image.open(path).close()
    except Exception as error:  # PIL raises several types for files it cannot identify
        raise ValueError(f"{path}: not a readable image ({error})") from None
    return path


def decode_all(paths):
    """Decode every pixel of every image (a truncated PNG has a good header), one thread per CPU (PIL
    releases the GIL while decoding); the first failure in `paths` order is an error naming the file."""

    def failure(path):
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as error:  # PIL raises several types for damaged files
            return f"{path}: not a readable image ({error})"

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        first = next(filter(None, pool.map(failure, paths)), None)
    if first:
        raise ValueError(first)


def _unique(path, rows, key):
    """A second row for one image would count it twice: refused, naming both rows."""
    first = {}
    for row in rows:
        if first.setdefault(row[key], row["row"]) != row["row"]:
            raise ValueError(
                f"{path}, rows {first[row[key]]} and {row['row']} list the same image {row[key]!r}"
            )
    return rows


def read_planes_db(root):
    """FETAL_PLANES_DB (';'-separated) -> [{path, image_name, patient, plane, brain_plane, operator,
    us_machine, train, csv, row}], one per row, in file order (row: the line number in csv, for messages);
    an image listed twice is an error."""
    path = os.path.join(root, PLANES_CSV)
    rows = []
    for line, row in enumerate(read_csv(path, ";", PLANES_COLUMNS), start=2):
        record = dict(
            image_name=row["Image_name"],
            plane=row["Plane"],
            brain_plane=row["Brain_plane"],
            csv=path,
        )
        record.update(operator=row["Operator"], us_machine=row["US_Machine"], row=line)
        record["path"] = _existing(os.path.join(root, "Images", row["Image_name"] + ".png"))
        record["patient"] = _number(path, line, "Patient_num", row["Patient_num"], int)
        record["train"] = _number(path, line, "Train ", row["Train "], int) == 1
        rows.append(record)
    return _unique(path, rows, "image_name")


def read_hc18(root):
    """HC18 training set -> [{path, filename, pixel_size (mm/px), hc (mm), csv, row}], in file order. The
    pixel size must lie in PIXEL_SIZE_RANGE_MM, the head circumference be a positive finite number (the
    protocol filters its range later); a filename listed twice is an error."""
    path = os.path.join(root, HC18_CSV)
    rows = []
    for line, row in enumerate(read_csv(path, ",", HC18_COLUMNS), start=2):
        record = dict(filename=row["filename"], csv=path, row=line)
        record["path"] = _existing(os.path.join(root, "training_set", row["filename"]))
        size, hc = row["pixel size(mm)"], row["head circumference (mm)"]
        record["pixel_size"] = _number(
            path, line, "pixel size(mm)", size, float, within=PIXEL_SIZE_RANGE_MM
        )
        record["hc"] = _number(path, line, "head circumference (mm)", hc, float, positive=True)
        rows.append(record)
    return _unique(path, rows, "filename")


# ------------------------------------------------------------------ splits and rows


# --eval_split: 'all' = the published protocol; 'select' / 'report' = patient-disjoint 20 / 80 parts
SPLITS = ("all", "select", "report")


def select_split(patient, split):
    """'all' = the published protocol; 'select' / 'report' = a patient-disjoint 20 / 80 split, fixed
    by a hash of the patient id, for choosing checkpoints on data the report never sees."""
    if split == "all":
        return True
    if split not in SPLITS:
        raise ValueError(f"eval_split must be 'all', 'select' or 'report', got {split!r}")
    return (zlib.crc32(str(patient).encode()) % 5 == 0) == (split == "select")


def require(folder, csv_name, what):
    if not (Path(folder) / csv_name).is_file():
        raise FileNotFoundError(
            f"{what}: {Path(folder) / csv_name} not found. Generate the synthetic benchmark with "
            f"`python -m tools.synthetic` (writes data/demo/planes and data/demo/hc18), or point "
            f"--planes_dir / --hc18_dir at the real {what} folder."
        )


def planes_rows(planes_dir, split="all", include_other=False):
    """Planes DB rows with 'five' / 'brain' class indices (-1 where the protocol drops the row). A split
    with no row of either task (a header-only file, an --eval_split that leaves none) is an error naming the
    folder."""
    require(planes_dir, PLANES_CSV, "Planes DB")
    rows, read = [], read_planes_db(planes_dir)
    for row in read:
        plane, brain, where = row["plane"], row["brain_plane"], f"{row['csv']}, row {row['row']}"
        if plane != "Other" and plane not in PLANE_TO_CLASS:
            raise ValueError(
                f"{where}: unknown Plane {plane!r}, expected one of {list(PLANE_TO_CLASS)} or Other"
            )
        if brain not in BRAIN_DROPPED and brain.lower() not in BRAIN_SUBPLANES:
            raise ValueError(
                f"{where}: unknown Brain_plane {brain!r}, expected {BRAIN_SUBPLANES} or {BRAIN_DROPPED}"
            )
        five = FIVE_PLANES.index(PLANE_TO_CLASS[plane]) if plane in PLANE_TO_CLASS else -1
        sub = BRAIN_SUBPLANES.index(brain.lower()) if brain not in BRAIN_DROPPED else -1
        if select_split(row["patient"], split) and (five >= 0 or sub >= 0 or include_other):
            rows.append(dict(row, five=five, sub=sub))
    if not any(r["five"] >= 0 or r["sub"] >= 0 for r in rows):
        raise ValueError(
            f"Planes DB {planes_dir}, split {split!r}: no image to evaluate ({len(read)} rows read)"
        )
    return rows


def require_tasks(rows, planes_dir, split):
    """Both tasks have images (five planes, brain sub-planes), else F1-all and Avg are undefined (nan)."""
    for label, task in (("five", "five-plane"), ("sub", "brain sub-plane")):
        if not any(r[label] >= 0 for r in rows):
            raise ValueError(
                f"Planes DB {planes_dir}, split {split!r}: no {task} image (its F1 and Avg would be nan)"
            )


def hc18_rows(hc18_dir, split="all"):
    """HC18 rows of the split; none, or none within the protocol's HC_MIN-HC_MAX mm (a column in cm), is an error."""
    require(hc18_dir, HC18_CSV, "HC18")
    # HC18 names images <subject>_HC.png, <subject>_2HC.png, ...: the prefix is the subject
    rows = [
        row for row in read_hc18(hc18_dir) if select_split(row["filename"].split("_")[0], split)
    ]
    heads, where = [row["hc"] for row in rows], f"HC18 {Path(hc18_dir) / HC18_CSV}, split {split!r}"
    if not any(HC_MIN <= hc <= HC_MAX for hc in heads):  # also when the split is empty
        unit = (
            " (all under 50: the column must be in mm, not cm)" if heads and max(heads) < 50 else ""
        )
        raise ValueError(
            f"{where}: {len(rows)} heads, none within the protocol's {HC_MIN:.0f}-{HC_MAX:.0f} mm{unit}"
        )
    return rows


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
        scores[c.item()] = (
            2 * tp / (2 * tp + fp + fn),
            tp / (tp + fn),
            int(tp + fn),
        )  # F1 = 0 if tp = 0
    return scores


def macro_f1(predictions, labels):
    """Macro F1 over the classes present in `labels` (= sklearn f1_score(labels=present))."""
    return float(np.mean([f1 for f1, _, _ in per_class_scores(predictions, labels).values()]))


def bootstrap_f1(predictions, labels, draws=BOOTSTRAP, chunk=500):
    """95% CI of the macro F1 (classes present in each resample), as HC18's: numpy default_rng(42), `draws`
    resamples of the items, percentiles 2.5 / 97.5."""
    predictions, labels, rng, values = (
        np.asarray(predictions),
        np.asarray(labels),
        np.random.default_rng(42),
        [],
    )
    for start in range(0, draws, chunk):
        picks = rng.integers(0, len(labels), size=(min(chunk, draws - start), len(labels)))
        drawn_predictions, drawn_labels = predictions[picks], labels[picks]  # (chunk, N)
        f1 = []
        for c in np.unique(labels):
            tp = ((drawn_predictions == c) & (drawn_labels == c)).sum(1)
            # false positives + false negatives
            wrong = ((drawn_predictions == c) != (drawn_labels == c)).sum(1)
            present = (drawn_labels == c).any(1)
            f1.append(np.where(present, 2 * tp / np.maximum(2 * tp + wrong, 1), np.nan))
        values.append(np.nanmean(np.stack(f1), axis=0))
    low, high = np.percentile(np.concatenate(values), [2.5, 97.5])
    return float(low), float(high)


def classification_metrics(probs, labels, class_names):
    """probs (N, C) softmax over all C prompt classes, labels (N,) class indices -> the release's metrics,
    and the bootstrap 95% CI of the macro F1 (f1_ci_low, f1_ci_high)."""
    if not len(labels):
        return {
            "f1": math.nan,
            "accuracy": math.nan,
            "top2": math.nan,
            "top3": math.nan,
            "n": 0,
            "per_class": {},
        }
    ranked = np.argsort(-probs, axis=1, kind="stable")  # ties: lower class index first
    per_class = per_class_scores(ranked[:, 0], labels)
    out = {"f1": float(np.mean([s[0] for s in per_class.values()]))}
    out["f1_ci_low"], out["f1_ci_high"] = bootstrap_f1(ranked[:, 0], labels)
    for k, name in ((1, "accuracy"), (2, "top2"), (3, "top3")):
        hit = (ranked[:, :k] == labels[:, None]).any(1)  # (N,) the true class among the k best
        # per class, then averaged
        out[name] = float(np.mean([hit[labels == c].mean() for c in per_class]))
        out[f"pooled_{name}"] = float(hit.mean())
    out["n"] = int(len(labels))
    out["per_class"] = {
        class_names[c]: {"f1": float(f1), "recall": float(r), "n": n}
        for c, (f1, r, n) in per_class.items()
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
    is_valid = (
        kept
        & (ga_quantile(pred_days, "q025") <= true_hc)
        & (true_hc <= ga_quantile(pred_days, "q975"))
    )
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


# ------------------------------------------------------------------ command line


def main(arguments):
    config = configurator.configure(dict(DEFAULTS), arguments)
    if not (config["planes_dir"] or config["hc18_dir"]):
        raise SystemExit(
            "usage: python protocol.py --planes_dir=FETAL_PLANES_DB --hc18_dir=HC18 [--eval_split=all]"
        )
    split = config["eval_split"]
    with configurator.user_errors("protocol.py"):
        if config["planes_dir"]:
            rows = planes_rows(config["planes_dir"], split)
            require_tasks(rows, config["planes_dir"], split)
            decode_all([row["path"] for row in rows])
            for key, classes in (("five", FIVE_PLANES), ("sub", BRAIN_SUBPLANES)):
                counts = {classes[c]: sum(r[key] == c for r in rows) for c in range(len(classes))}
                print(f"Planes DB, split {split}: {sum(counts.values())} images {counts}")
        if config["hc18_dir"]:
            rows = hc18_rows(config["hc18_dir"], split)
            decode_all([row["path"] for row in rows])
            kept = sum(HC_MIN <= r["hc"] <= HC_MAX for r in rows)
            print(
                f"HC18, split {split}: {len(rows)} images, {kept} with heads of {HC_MIN:.0f}-{HC_MAX:.0f} mm"
            )
    print("every row read and every image decoded")


if __name__ == "__main__":
    main(sys.argv[1:])
