"""The paper's Table 3 on the demo: every KD schedule over several seeds with one demo teacher, then the mean and
standard deviation of each row and metric, and the paper's Figure 2 (KD weight per step, zero-shot Avg per epoch).

    python -m tools.sweep                                   # 8 rows x 3 seeds on data/demo, about 40 minutes on 2 cores
    python -m tools.sweep --rows=no_kd,selective --seeds=0,1 --out_dir=out/small_sweep

Each run is `python train.py` with the row's flags (below), `--seed=S` and the same `--teacher_ckpt`; the first
run trains the demo teacher when none is given. An interrupted sweep continues where it stopped: a finished run (its
ckpt.pt holds its last epoch, whose evaluation log.jsonl records) is not run again, an unfinished one is resumed
(--resume=True). Every row reports its best epoch by Avg, as the demo and the paper select.
Writes out_dir/sweep.json (every run's metrics, the means and standard deviations) and out_dir/figure2.png.
"""

import json
import os
import subprocess
import sys

import numpy as np
import torch

import configurator

# ------------------------------------------------------------------ settings: --key=value
out_dir = "out/sweep"  # one folder per row and seed, sweep.json, figure2.png
rows = ""  # comma-separated names from ROWS; '' = all, in the paper's order
seeds = "0,1,2"  # comma-separated seeds
teacher_ckpt = ""  # the teacher of every run; '' = the demo teacher, trained by the first run
train_flags = ""  # further train.py flags for every run, space-separated (e.g. "--epochs=6 --data_dir=data/big")
DEFAULTS = configurator.settings(globals())

ROWS = {  # paper Table 3, as train.py flags (--r is the paper's r, Eq. 5 and 7)
    "no_kd": "--mode=none",
    "static": "--mode=coupled --lambda0=1 --r=1",
    "static_feature": "--mode=coupled --lambda0=1 --r=1 --feature_kd=2000",
    "positive_decay": "--mode=coupled --lambda0=1 --r=0.1",
    "full_decay": "--mode=coupled --lambda0=1 --r=0",
    "confidence_penalty": "--mode=coupled --lambda0=1 --r=0.1 --smoothing=0.1",
    "coupled_repulsive": "--mode=coupled --lambda0=1 --r=-0.8",
    "selective": "--mode=selective --beta0=2 --r=-0.8",
}
METRICS = {
    "F1-5": ("five_planes", "f1"),
    "F1-3": ("brain_subplanes", "f1"),
    "HC18 %": ("hc18", "validity"),
    "F1-all": ("f1_all",),
    "Avg": ("avg",),
}


def finished(folder):
    """True when a run's ckpt.pt holds its last epoch and log.jsonl that epoch's evaluation (train.py writes ckpt.pt
    before evaluating and the evaluation's record last); a best.pt alone may be an early epoch's."""
    try:
        checkpoint = torch.load(
            os.path.join(folder, "ckpt.pt"), map_location="cpu", weights_only=True, mmap=True
        )
        with open(os.path.join(folder, "log.jsonl")) as f:
            evaluated = {record["epoch"] for record in map(json.loads, f) if "eval" in record}
    except (
        Exception
    ):  # missing or unreadable: train.py starts it, or its --resume=True says what is wrong
        return False
    return (
        checkpoint["epoch"] == checkpoint["config"]["epochs"]
        and checkpoint["epoch"] - 1 in evaluated
    )


def run(row, seed, config, teacher):
    """One train.py run -> its folder: started, resumed when it has a ckpt.pt, skipped when finished."""
    folder = os.path.join(config["out_dir"], row, f"seed{seed}")
    if not finished(folder):
        flags = [
            *ROWS[row].split(),
            f"--seed={seed}",
            f"--out_dir={folder}",
            *config["train_flags"].split(),
        ]
        flags += [f"--teacher_ckpt={teacher}"] if teacher else []
        flags += ["--resume=True"] if os.path.exists(os.path.join(folder, "ckpt.pt")) else []
        print(f"== {row}, seed {seed}: python train.py {' '.join(flags)}", flush=True)
        train = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py"
        )
        if subprocess.run([sys.executable, train, *flags]).returncode != 0:
            raise SystemExit(
                f"sweep.py: the run {row}, seed {seed} in {folder} failed: its error is above"
            )
    return folder


def read_run(folder):
    """The best epoch's metrics, the KD weight per logged step and the Avg per evaluated epoch of a run."""
    best = torch.load(os.path.join(folder, "best.pt"), map_location="cpu", weights_only=True)[
        "metrics"
    ]
    records = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
    weights = [(r["step"], r["weight"]) for r in records if "weight" in r]
    epochs = [r["eval"]["avg"] for r in records if "avg" in r.get("eval", {})]
    return {
        "best": {name: pick(best, path) for name, path in METRICS.items()},
        "weights": weights,
        "avg": epochs,
    }


def pick(metrics, path):
    value = metrics
    for key in path:
        value = value[key]
    return value


def summarise(runs):
    """{row: {metric: (mean, std over seeds)}}; std is the sample standard deviation (ddof 1), None
    with one seed (strict JSON has no NaN)."""
    table = {}
    for row, by_seed in runs.items():
        values = {name: np.array([r["best"][name] for r in by_seed.values()]) for name in METRICS}
        table[row] = {
            n: (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None)
            for n, v in values.items()
        }
    return table


def print_table(table, seeds):
    print(
        f"\n{'row (mean +- std over seeds ' + ','.join(map(str, seeds)) + ')':<36}"
        + "".join(f"{n:>16}" for n in METRICS)
    )
    for row, metrics in table.items():
        digits = {n: 1 if n == "HC18 %" else 3 for n in metrics}
        cells = [
            f"{m:.{digits[n]}f} +- " + ("n/a" if s is None else f"{s:.{digits[n]}f}")
            for n, (m, s) in metrics.items()
        ]
        print(f"{row:<36}" + "".join(f"{c:>16}" for c in cells))


def figure2(runs, path):
    """Left: the KD weight (lambda or beta) per step of each row; right: the zero-shot Avg per epoch, the mean over
    seeds with a +- std band (the paper's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for row, by_seed in runs.items():
        first = next(iter(by_seed.values()))
        left.plot(*zip(*first["weights"]), label=row)
        avg = np.array([r["avg"] for r in by_seed.values()])  # (seeds, epochs)
        epochs, mean, std = (
            np.arange(1, avg.shape[1] + 1),
            avg.mean(0),
            avg.std(0, ddof=1 if len(avg) > 1 else 0),
        )
        right.plot(epochs, mean, "o-", markersize=3, label=row)
        right.fill_between(epochs, mean - std, mean + std, alpha=0.15)
    left.axhline(0, color="grey", linewidth=0.5)
    left.set(xlabel="step", ylabel="KD weight (lambda or beta)", title="KD weight")
    right.set(
        xlabel="epoch", ylabel="zero-shot Avg", title="Zero-shot Avg (mean +- std over seeds)"
    )
    right.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    with configurator.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(arguments):
    config = configurator.configure(dict(DEFAULTS), arguments)
    chosen = [r for r in config["rows"].split(",") if r] or list(ROWS)
    unknown = [r for r in chosen if r not in ROWS]
    if unknown:
        raise SystemExit(
            f"--rows: unknown row {unknown[0]!r}; expected {configurator.one_of(unknown[0], ROWS)}"
        )
    seed_list = [configurator.parse("seeds", s, 0) for s in config["seeds"].split(",")]
    teacher = config["teacher_ckpt"]
    runs = {row: {} for row in chosen}
    for seed in seed_list:
        for row in sorted(
            chosen, key=lambda r: r != "selective"
        ):  # a KD row first: it trains the demo teacher
            folder = run(row, seed, config, teacher)
            trained = os.path.join(folder, "demo_teacher", "ckpt.pt")
            teacher = teacher or (trained if os.path.exists(trained) else "")
            runs[row][seed] = read_run(folder)
    runs = {row: runs[row] for row in chosen}  # the paper's order
    table = summarise(runs)
    print_table(table, seed_list)
    os.makedirs(config["out_dir"], exist_ok=True)
    summary = {"config": config, "teacher_ckpt": teacher, "table": table, "runs": runs}
    configurator.write_atomic(
        os.path.join(config["out_dir"], "sweep.json"), json.dumps(summary, indent=1)
    )
    figure2(runs, os.path.join(config["out_dir"], "figure2.png"))
    print(f"wrote {config['out_dir']}/sweep.json and figure2.png")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
