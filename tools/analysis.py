"""The paper's analyses of a trained model (Sec. 5): the linear probe (Table 5), the embedding geometry
(Table 4), teacher-student logit agreement, and the figures (t-SNE of the brain sub-planes, HC18 predicted
GA against true HC, the KD weight and zero-shot Avg over training: Figures 2-3).

    python -m tools.analysis out/best.pt                                   # out/best_analysis/: JSON + three plots
    python -m tools.analysis out/best.pt --teacher_ckpt=out/demo_teacher/best.pt --teacher=demo_teacher
    python -m tools.analysis out/best.pt --probe=my_labels/                # the linear probe on your labelled scans

The features come from evaluate.zero_shot(..., details=True) on the same Planes DB and HC18 folders. --probe
reads a folder with one sub-folder per class (scans.labelled): images and single frames give one item per
view; a folder of clips follows the paper's CHD probe (Table 5): 16 evenly spaced frames per clip (and
view), their features concatenated. Cross-validated: 5 folds x 5 seeds (sklearn's StratifiedGroupKFold),
each fold tested once, the next fold validating (best epoch), the rest training; folds by patient when the
folder holds patients.csv (file, patient), else by file; AUROC for two classes, macro F1 otherwise;
Student-t 95% CI over the 25 runs."""

import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

import configurator
import data
from evaluate import Task, encode_task, plain, zero_shot
from model import load_model
from protocol import BRAIN_SUBPLANES, GA_DAYS, PLANE_TO_CLASS, ga_quantile, macro_f1
from tools import scans, synthetic

# ------------------------------------------------------------------ settings: --key=value
DEMO = synthetic.layout(configurator.DEMO_DIR)  # the demo's folders (python -m tools.synthetic)
DEFAULTS = {
    "ckpt": "",  # the checkpoint to analyse: the one positional argument
    "model": "",  # model.py name; '' = the name the checkpoint stores
    "planes_dir": DEMO["planes_dir"],  # Planes DB folder
    "hc18_dir": DEMO["hc18_dir"],  # HC18 folder
    "teacher": "fetalclip",  # model.py name of the teacher, for the logit agreement
    "teacher_ckpt": "",  # the teacher's checkpoint; '' = no logit agreement
    "train_log": "",  # train.py's log.jsonl for the dynamics plot; '' = log.jsonl beside the checkpoint
    "out_dir": "",  # '' = <checkpoint folder>/<checkpoint stem>_analysis
    "probe_epochs": 50,  # linear-probe epochs (the rest of FetalCLIP's recipe: PROBE_RECIPE)
    "probe_seeds": 5,  # x 5 patient-disjoint folds
    # your labelled scans (one sub-folder per class, optional patients.csv): run the linear probe on them
    "probe": "",
    "probe_frames": 16,  # frames per clip when every file of --probe is a clip (the paper's CHD probe)
    "device": "",  # '' = cuda, else mps, else cpu
    "batch_size": 64,
    "num_workers": 0,
}
PROBE_FOLDS = 5  # patient-disjoint folds of the probe on a labelled folder (FetalCLIP's recipe)

# ------------------------------------------------------------------ analyses


def student_t_ci(values, confidence=0.95):
    """-> (mean, low, high), the Student-t interval of the mean over independent runs."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), math.nan, math.nan
    half = (
        stats.t.ppf((1 + confidence) / 2, len(values) - 1)
        * values.std(ddof=1)
        / math.sqrt(len(values))
    )
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)


# FetalCLIP's linear probe: one Linear layer trained by AdamW at this learning rate and weight decay on
# mini-batches of this size, keeping the epoch with the best validation loss (how many epochs:
# --probe_epochs)
PROBE_RECIPE = {"lr": 3e-4, "weight_decay": 0.01, "batch_size": 64}


def _fit_probe(features, labels, fit, val, n_classes, seed, epochs, recipe):
    torch.manual_seed(seed)
    probe = torch.nn.Linear(features.shape[1], n_classes)
    optimizer = torch.optim.AdamW(
        probe.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"]
    )

    def snapshot():
        return {k: v.clone() for k, v in probe.state_dict().items()}

    best_loss, best_state = math.inf, snapshot()
    for _ in range(epochs):
        for batch in torch.from_numpy(fit)[torch.randperm(len(fit))].split(recipe["batch_size"]):
            loss = F.cross_entropy(probe(features[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            val_loss = F.cross_entropy(probe(features[val]), labels[val]).item()
        if val_loss < best_loss or not len(val):  # the epoch with the best validation loss
            best_loss, best_state = val_loss, snapshot()
    probe.load_state_dict(best_state)
    return probe


def linear_probe(
    features,
    labels,
    groups,
    is_train,
    folds=5,
    seeds=5,
    epochs=50,
    recipe=PROBE_RECIPE,
):
    """Macro F1 of one linear layer on frozen L2-normalised features (FetalCLIP's probe recipe).
    Per seed the training patients (`groups`) are dealt into `folds` disjoint folds; each fold
    validates once while the others train; every run is tested on the rows with is_train False."""
    features = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=-1)
    labels, groups = torch.as_tensor(np.asarray(labels), dtype=torch.long), np.asarray(groups)
    train, test = np.flatnonzero(is_train), np.flatnonzero(~np.asarray(is_train, dtype=bool))
    f1s = []
    for seed in range(seeds):
        patients = np.random.default_rng(seed).permutation(np.unique(groups[train]))
        fold_of = {p: i % folds for i, p in enumerate(patients)}
        fold = np.array([fold_of[g] for g in groups[train]])
        for k in range(folds):
            probe = _fit_probe(
                features,
                labels,
                train[fold != k],
                train[fold == k],
                int(labels.max()) + 1,
                seed,
                epochs,
                recipe,
            )
            with torch.no_grad():
                f1s.append(macro_f1(probe(features[test]).argmax(1).numpy(), labels[test].numpy()))
    mean, low, high = student_t_ci(f1s)
    return {"f1": mean, "ci_low": low, "ci_high": high, "runs": len(f1s)}


def cross_validated_probe(features, labels, groups, folds=PROBE_FOLDS, seeds=5, epochs=50):
    """The probe on data without a split: per seed, StratifiedGroupKFold deals the groups into `folds`; each
    fold is tested once, the next one validates, the rest train -> AUROC (two classes) or macro F1, mean and
    Student-t CI."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    features = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=-1)
    labels, groups = np.asarray(labels), np.asarray(groups)
    two = len(np.unique(labels)) == 2
    scores = []
    for seed in range(seeds):
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        parts = [test for _, test in splitter.split(features, labels, groups)]
        for k, test in enumerate(parts):
            val = parts[(k + 1) % folds]
            fit = np.concatenate([p for i, p in enumerate(parts) if i not in (k, (k + 1) % folds)])
            probe = _fit_probe(
                features,
                torch.as_tensor(labels),
                fit,
                val,
                int(labels.max()) + 1,
                seed,
                epochs,
                PROBE_RECIPE,
            )
            with torch.no_grad():
                probs = probe(features[test]).softmax(-1).numpy()
            if two and len(np.unique(labels[test])) == 2:
                scores.append(roc_auc_score(labels[test], probs[:, 1]))
            elif not two:
                scores.append(macro_f1(probs.argmax(1), labels[test]))
    mean, low, high = student_t_ci(scores)
    return {
        "metric": "auroc" if two else "f1",
        "value": mean,
        "ci_low": max(low, 0.0),  # both metrics lie in [0, 1]; so does their interval
        "ci_high": min(high, 1.0),
        "runs": len(scores),  # folds scored: an AUROC needs both classes in the test fold
        "folds": folds * seeds,
    }


def probe_items(net, folder, frames, batch_size, device):
    """A labelled folder -> (features (N, D), or (N, frames * D) when every file is a clip, labels, groups, how)."""
    classes = sorted(
        p.name for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    files, labels, skipped, ignored = scans.labelled(folder, classes)
    counts = {}
    for path, kind in files:
        try:
            counts[path] = scans.count_frames(path, kind)
        except scans.Unreadable as why:
            skipped.append((path, str(why)))
    kept = [i for i, (path, _) in enumerate(files) if path in counts]
    task = Task(
        Path(folder).name, {}, [files[i] for i in kept], [labels[i] for i in kept], skipped, ignored
    )
    clips = all(count > 1 for count in counts.values())
    features, labels, where, skipped = encode_task(
        net, task, batch_size, device, frames if clips else 0
    )
    if not len(labels):
        reasons = "; ".join(f"{path}: {why}" for path, why in skipped[:3])
        raise ValueError(
            f"--probe={folder}: no readable scans ({len(skipped)} skipped; first: {reasons})"
        )
    if clips:
        features, labels, where = concatenated_clips(features, labels, where, frames)
    groups, by = probe_groups(folder, [path for path, *_ in where])
    mode = (
        f"clips, {frames} frames each, features concatenated"
        if clips
        else "one item per view of each frame"
    )
    return features, labels, groups, dict(classes=classes, mode=mode, folds_by=by, skipped=skipped)


def concatenated_clips(features, labels, where, frames):
    """Per clip and view: the features of `frames` evenly spaced frames (repeated in a shorter clip),
    concatenated (the paper's CHD probe) -> ((clips, frames * D), (clips,), [(path, region)])."""
    rows_of = {}
    for i, (path, _, region) in enumerate(where):
        rows_of.setdefault((path, region), []).append(i)
    picks = [
        rows[j]
        for rows in rows_of.values()
        for j in np.linspace(0, len(rows) - 1, frames).round().astype(int)
    ]
    first = [rows[0] for rows in rows_of.values()]
    return features[picks].reshape(len(rows_of), -1), labels[first], list(rows_of)


def probe_groups(folder, paths):
    """Each item's group: its patient from folder/patients.csv (columns file, patient; files relative to the
    folder), else its file."""
    table = Path(folder) / "patients.csv"
    if not table.is_file():
        return np.array(paths), "file"
    patients = {}
    for line, row in enumerate(data.read_csv(str(table), ",", ("file", "patient")), start=2):
        path = os.path.normpath(os.path.join(folder, row["file"]))
        if patients.get(path, row["patient"]) != row["patient"]:
            raise ValueError(
                f"{table}, row {line}: {row['file']} is listed again with another patient"
            )
        patients[path] = row["patient"]
    missing = sorted({p for p in paths if os.path.normpath(p) not in patients})
    if missing:
        raise ValueError(
            f"{table}: no patient for {len(missing)} files, e.g. {os.path.relpath(missing[0], folder)}"
        )
    return np.array([patients[os.path.normpath(p)] for p in paths]), "patient (patients.csv)"


def geometry(features, labels, t=2.0, block=1024):
    """Embedding geometry of L2-normalised features: participation ratio (sum l)^2 / sum l^2 and
    Rank95 of the covariance spectrum, silhouette (sklearn, euclidean), mean cosine over ordered
    pairs i != j of the same / of different classes, uniformity log mean exp(-t |xi - xj|^2)."""
    from sklearn.metrics import silhouette_score

    x, labels = (
        F.normalize(torch.as_tensor(features, dtype=torch.float64), dim=-1),
        np.asarray(labels),
    )
    variances = torch.linalg.eigvalsh(torch.cov(x.T)).clamp(min=0).flip(0)  # descending
    rank95 = (
        int(
            torch.searchsorted(
                variances.cumsum(0) / variances.sum(), torch.tensor(0.95, dtype=x.dtype)
            )
        )
        + 1
    )
    classes = np.unique(labels)
    counts = np.array([np.sum(labels == c) for c in classes])
    class_sums = [x[torch.from_numpy(labels == c)].sum(0) for c in classes]
    # sum of cos over same-class pairs, diagonal incl.
    within = sum(float(s @ s) for s in class_sums)
    total = float(x.sum(0) @ x.sum(0))
    near = 0.0  # sum over i != j of exp(-t |xi - xj|^2)
    for start in range(0, len(x), block):
        kernel = torch.exp(-t * (2 - 2 * x[start : start + block] @ x.T).clamp(min=0))
        near += float(kernel.sum() - kernel.diagonal(offset=start).sum())
    n = len(x)
    return {
        "participation_ratio": float(variances.sum() ** 2 / (variances**2).sum()),
        "rank95": min(rank95, len(variances)),
        "silhouette": float(silhouette_score(x.numpy(), labels))
        if 1 < len(classes) < n
        else math.nan,
        "intra_cosine": (within - n) / float(np.sum(counts * (counts - 1))),
        "inter_cosine": (total - within) / float(n * n - np.sum(counts**2)),
        "uniformity": math.log(near / (n * (n - 1))),
    }


def mean_entropy(logits):
    """The mean over rows of the softmax entropy of (N, C) logits."""
    return float(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean())


def logit_agreement(student_logits, teacher_logits):
    """Mean softmax entropy of each model's zero-shot logits (N, C) and the mean per-image Spearman
    correlation between the student's and the teacher's class rankings."""
    with warnings.catch_warnings():  # a constant row has no ranking: NaN, skipped by nanmean
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        rho = [
            stats.spearmanr(s, t).statistic
            for s, t in zip(student_logits.numpy(), teacher_logits.numpy())
        ]
    return {
        "entropy_student": mean_entropy(student_logits),
        "entropy_teacher": mean_entropy(teacher_logits),
        "spearman": float(np.nanmean(rho)) if rho else math.nan,
    }


def _figure(path, draw, size=(5, 4)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size)
    draw(fig)
    fig.tight_layout()
    with configurator.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)
    return str(path)


def plot_tsne(features, labels, names, path):
    from sklearn.manifold import TSNE

    xy = TSNE(
        2,
        init="pca",
        random_state=0,
        perplexity=min(30, len(features) - 1),
        method="barnes_hut" if len(features) > 500 else "exact",
    ).fit_transform(features.numpy())

    def draw(fig):
        ax = fig.gca()
        for c, name in enumerate(names):
            ax.scatter(*xy[labels == c].T, s=6, label=name)
        ax.set(title="Brain sub-planes (t-SNE)", xticks=[], yticks=[])
        ax.legend(markerscale=2)

    return _figure(path, draw)


def plot_hc18(true_hc, hc, path):
    def draw(fig):
        ax, days = fig.gca(), np.arange(GA_DAYS[0], GA_DAYS[-1] + 1)
        for curve, colour, label in (
            ("q500", "k", "median"),
            ("q025", "darkorange", "2.5% / 97.5%"),
            ("q975", "darkorange", None),
        ):
            ax.plot(
                ga_quantile(days, curve),
                days,
                "-" if curve == "q500" else "--",
                color=colour,
                label=label,
            )
        for mask, colour, name in (
            (hc["is_valid"], "royalblue", "valid"),
            (hc["kept"] & ~hc["is_valid"], "red", "invalid"),
        ):
            ax.scatter(
                true_hc[mask],
                hc["pred_days"][mask],
                s=10,
                color=colour,
                edgecolor="k",
                linewidth=0.3,
                label=name,
            )
        ax.set(
            xlabel="True HC (mm)",
            ylabel="Predicted GA (days)",
            title=f"HC18 validity {hc['validity']:.1f}%",
        )
        ax.legend(frameon=False)

    return _figure(path, draw)


def plot_dynamics(log_path, path):
    """From train.py's log.jsonl: the KD weight ('weight') per step and the zero-shot Avg per epoch."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    steps = [r for r in records if "weight" in r and "step" in r]
    epochs = [r for r in records if "avg" in r.get("eval", {})]

    def draw(fig):
        left, right = fig.subplots(1, 2)
        left.plot([r["step"] for r in steps], [r["weight"] for r in steps])
        left.axhline(0, color="grey", linewidth=0.5)
        left.set(xlabel="step", ylabel="KD weight (lambda or beta)", title="KD weight")
        right.plot([r["epoch"] + 1 for r in epochs], [r["eval"]["avg"] for r in epochs], "o-")
        right.set(xlabel="epoch", ylabel="Avg", title="Zero-shot Avg")

    return _figure(path, draw, size=(9, 3.5))


def analyse(details, out_dir, teacher_details=None, log_path="", probe_epochs=50, probe_seeds=5):
    """All analyses from zero_shot(..., details=True) output -> dict (plots written to out_dir)."""
    rows, features = details["planes_rows"], details["planes_features"]
    views = list(PLANE_TO_CLASS) + ["Other"]
    groups = np.array([str(r["patient"]) for r in rows])
    is_train = np.array([bool(int(r["train"])) for r in rows])
    five, sub = np.array([r["five"] for r in rows]), np.array([r["sub"] for r in rows])
    out, brain = {}, sub >= 0
    out["probe_6view"] = linear_probe(
        features,
        [views.index(r["plane"]) for r in rows],
        groups,
        is_train,
        epochs=probe_epochs,
        seeds=probe_seeds,
    )
    out["probe_brain"] = linear_probe(
        features[brain],
        sub[brain],
        groups[brain],
        is_train[brain],
        epochs=probe_epochs,
        seeds=probe_seeds,
    )
    out["geometry_5planes"] = geometry(features[five >= 0], five[five >= 0])
    if teacher_details is not None:
        out["logits_5planes"] = logit_agreement(
            details["five_planes_logits"][five >= 0],
            teacher_details["five_planes_logits"][five >= 0],
        )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    out["plots"] = [
        plot_tsne(features[brain], sub[brain], BRAIN_SUBPLANES, Path(out_dir) / "tsne_brain.png"),
        plot_hc18(details["hc18_true"], details["hc18"], Path(out_dir) / "hc18_ga.png"),
    ]
    if log_path and Path(log_path).is_file():
        out["plots"].append(plot_dynamics(log_path, Path(out_dir) / "training_dynamics.png"))
    return out


def probe_folder(net, config, device):
    """--probe: the cross-validated linear probe on the user's labelled folder -> its results."""
    features, labels, groups, how = probe_items(
        net, config["probe"], config["probe_frames"], config["batch_size"], device
    )
    if len(np.unique(labels)) < 2 or len(np.unique(groups)) < 5:
        raise ValueError(
            f"--probe={config['probe']}: a 5-fold probe needs two classes and 5 {how['folds_by']}s or more"
        )
    for label in np.unique(labels):  # else most test folds lack the class: an AUROC of 1 or 2 folds
        held = len(np.unique(groups[labels == label]))
        if held < PROBE_FOLDS:
            raise ValueError(
                f"--probe={config['probe']}: class {how['classes'][label]!r} has {held} {how['folds_by']}s; a "
                f"{PROBE_FOLDS}-fold probe needs {PROBE_FOLDS} or more per class, one in each test fold"
            )
    result = cross_validated_probe(
        features, labels, groups, seeds=config["probe_seeds"], epochs=config["probe_epochs"]
    )
    print(
        f"probe on {config['probe']} ({how['mode']}; {len(labels)} items, folds by {how['folds_by']}): "
        f"{result['metric']} {result['value']:.3f} (95% CI {result['ci_low']:.3f}-{result['ci_high']:.3f}, "
        f"{result['runs']} of {result['folds']} folds scored)"
    )
    return {"probe": dict(result, items=len(labels), **how)}


def main(arguments):
    config = configurator.configure(dict(DEFAULTS), arguments, positional="ckpt")
    if not config["ckpt"]:
        raise SystemExit(
            "usage: python -m tools.analysis CKPT [--teacher_ckpt=FILE --probe=DIR --key=value ...]"
        )
    device, ckpt = configurator.pick_device(config["device"]), Path(config["ckpt"])
    kwargs = dict(
        batch_size=config["batch_size"],
        device=device,
        num_workers=config["num_workers"],
        details=True,
    )
    out_dir = Path(config["out_dir"] or ckpt.parent / f"{ckpt.stem}_analysis")
    try:
        configurator.check_folder(out_dir, "--out_dir")  # before the work, not after it
        net = load_model(str(ckpt), config["model"]).to(device).eval()
        if config["probe"]:
            results = probe_folder(net, config, device)
        else:
            details = zero_shot(net, config["planes_dir"], config["hc18_dir"], **kwargs)["_details"]
            teacher = None
            if config["teacher_ckpt"]:
                teacher_net = (
                    load_model(config["teacher_ckpt"], config["teacher"]).to(device).eval()
                )
                teacher = zero_shot(
                    teacher_net, config["planes_dir"], config["hc18_dir"], **kwargs
                )["_details"]
            log = config["train_log"] or ckpt.parent / configurator.LOG
            results = analyse(
                details, out_dir, teacher, log, config["probe_epochs"], config["probe_seeds"]
            )
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"analysis.py: {error}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    configurator.write_atomic(out_dir / "analysis.json", json.dumps(plain(results), indent=1))
    print(json.dumps(plain(results), indent=1))
    print(f"wrote {out_dir}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
