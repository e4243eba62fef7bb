"""The paper's Table 3 on the demo: KD schedules over several seeds and students, all distilling from one
demo teacher; the mean and standard deviation of each student, row and metric, selective - static KD paired
per seed, the paper's Figure 2 (KD weight per step, zero-shot Avg per epoch) and Avg against the
teacher-student capacity gap.

    python -m tools.sweep                                   # 8 rows x 3 seeds on data/demo with demo_student
    python -m tools.sweep --students=demo_student,demo_student_12x,demo_student_26x,demo_student_60x \\
        --rows=no_kd,static,selective --seeds=0,1,2,3,4 --out_dir=out/gap   # the capacity-gap curve (README)
    python -m tools.sweep ... --train=False                 # the same, tabulating only the runs that have finished

Each run is `python train.py` with the row's flags (below), `--student=NAME`, `--seed=S` and the same
`--teacher_ckpt`. Without --teacher_ckpt the sweep trains the demo teacher of every seed as `python
train.py` does (the CLIP loss alone, teacher_epochs) into out_dir/demo_teacher/seedS, and every run distils
from the one of teacher_seed; the others are trained to show that each seed's teacher learns (their
five-plane F1 is printed). An interrupted sweep continues where it stopped: a finished run (its ckpt.pt
holds its last epoch, whose evaluation log.jsonl records) is not run again, an unfinished one is resumed
(--resume=True). Every row reports its best epoch by Avg, as the demo and the paper select; a teacher its
last epoch, the checkpoint the runs distil from. Writes out_dir/sweep.json (every run's metrics, the means,
standard deviations and paired differences), out_dir/figure2.png (the first student) and out_dir/gap.png;
the same seeds on the same machine give the same files. """

import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from scipy import stats

import configurator
import model

# ------------------------------------------------------------------ settings: --key=value
DEFAULTS = {
    # out_dir/STUDENT/ROW/seedS per run, demo_teacher/seedS, sweep.json, figure2.png, gap.png
    "out_dir": "out/sweep",
    "students": "demo_student",  # comma-separated model.py names, each distilled from the same teacher
    "rows": "",  # comma-separated names from ROWS; '' = all, in the paper's order
    "seeds": "0,1,2",  # comma-separated seeds
    "teacher": "demo_teacher",  # model.py name of the teacher (the numerator of the visual capacity gap)
    # the teacher of every run; '' = the demo teacher of teacher_seed, trained by the sweep
    "teacher_ckpt": "",
    "teacher_seed": 0,  # the seed whose demo teacher every run distils from
    # epochs of each demo teacher: train.py's demo_teacher_epochs, so it is the demo's own teacher
    "teacher_epochs": 7,
    # further train.py flags for every run, space-separated (e.g. "--epochs=6 --data_dir=data/big")
    "train_flags": "",
    # False: run nothing, tabulate the finished runs and list the others (a sweep still running, cut short)
    "train": True,
}

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
PAIRED = ("selective", "static")  # the paper's claim: selective beats static KD (Table 3)


def setting_of(flag):
    """'--beta0=2' -> 'beta0'."""
    return flag.removeprefix("--").split("=")[0]


# train.py settings the sweep sets itself (every row's, a seed's, where a run lives) or reads its runs by:
# not for --train_flags, where the later flag would win and every row or seed would be the same run
ROW_SETTINGS = sorted({setting_of(flag) for flags in ROWS.values() for flag in flags.split()})
SWEEP_SETS = (
    *ROW_SETTINGS,
    "student",
    "teacher",
    "teacher_ckpt",
    "seed",
    "out_dir",
    "resume",
    "eval_every",
    "max_steps",
)


def finished(folder):
    """True when a run's ckpt.pt holds its last epoch and log.jsonl that epoch's evaluation (train.py writes
    ckpt.pt before evaluating and the evaluation's record last); a best.pt alone may be an early epoch's."""
    try:
        checkpoint = torch.load(
            os.path.join(folder, configurator.CHECKPOINT),
            map_location="cpu",
            weights_only=True,
            mmap=True,
        )
        evaluated = {record["epoch"] for record in read_log(folder) if "eval" in record}
    # missing or unreadable: train.py starts it, or its --resume=True says what is wrong
    except Exception:
        return False
    return (
        checkpoint["epoch"] == checkpoint["config"]["epochs"]
        and checkpoint["epoch"] - 1 in evaluated
    )


def read_log(folder):
    with open(os.path.join(folder, configurator.LOG)) as f:
        return [json.loads(line) for line in f]


def check_train_flags(train_flags):
    """--train_flags may not set what the sweep sets: refused before any run, naming the flag."""
    for flag in train_flags.split():
        key = setting_of(flag)
        if key in SWEEP_SETS:
            raise SystemExit(
                f"sweep.py: --train_flags sets --{key}, which the sweep sets itself or reads its runs by "
                f"({', '.join(SWEEP_SETS)}); --rows, --seeds, --teacher_ckpt and --teacher_epochs choose them"
            )


def run(folder, flags, about, config):
    """One train.py run in `folder`: started, resumed when it has a ckpt.pt, skipped when finished; with
    --train=False an unfinished run is not started and gives None."""
    if finished(folder):
        return folder
    if not config["train"]:
        print(f"not finished: {about} ({folder})")
        return None
    flags = [*flags, f"--out_dir={folder}"]
    flags += (
        ["--resume=True"] if os.path.exists(os.path.join(folder, configurator.CHECKPOINT)) else []
    )
    print(f"== {about}: python train.py {' '.join(flags)}", flush=True)
    train = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
    start = time.time()
    if subprocess.run([sys.executable, train, *flags]).returncode != 0:
        raise SystemExit(f"sweep.py: the run {about} in {folder} failed: its error is above")
    print(f"== {about}: {time.time() - start:.0f} s", flush=True)
    return folder


def run_teacher(seed, config):
    """The demo teacher of `seed`, trained as train.py trains it (the CLIP loss alone) -> its folder."""
    folder = os.path.join(config["out_dir"], "demo_teacher", f"seed{seed}")
    flags = ["--mode=none", f"--student={config['teacher']}", f"--seed={seed}"]
    flags += [*config["train_flags"].split(), f"--epochs={config['teacher_epochs']}"]
    return run(folder, flags, f"{config['teacher']}, seed {seed}", config)


def run_student(student, row, seed, config, teacher_path):
    folder = os.path.join(config["out_dir"], student, row, f"seed{seed}")
    flags = [*ROWS[row].split(), f"--student={student}", f"--teacher={config['teacher']}"]
    flags += [f"--seed={seed}", *config["train_flags"].split(), f"--teacher_ckpt={teacher_path}"]
    return run(folder, flags, f"{student}, {row}, seed {seed}", config)


def read_run(folder):
    """The best epoch's metrics, the KD weight per logged step and the Avg per evaluated epoch of a run."""
    best = torch.load(
        os.path.join(folder, configurator.BEST), map_location="cpu", weights_only=True
    )["metrics"]
    records = read_log(folder)
    weights = [(r["step"], r["weight"]) for r in records if "weight" in r]
    epochs = [r["eval"]["avg"] for r in records if "avg" in r.get("eval", {})]
    return {
        "best": {name: pick(best, path) for name, path in METRICS.items()},
        "weights": weights,
        "avg": epochs,
    }


def read_teacher(folder):
    """A teacher's metrics at its last epoch: its ckpt.pt, the weights every run distils from."""
    last = [r["eval"] for r in read_log(folder) if "eval" in r][-1]
    return {name: pick(last, path) for name, path in METRICS.items()}


def pick(metrics, path):
    value = metrics
    for key in path:
        value = value[key]
    return value


def visual_gap(teacher_name, student_name):
    """Teacher image-tower parameters / student image-tower parameters (the paper's 304M / 11.4M = 26.7x)."""
    towers = [model.shapes_of(name)[1].visual for name in (teacher_name, student_name)]
    teacher_params, student_params = [sum(p.numel() for p in t.parameters()) for t in towers]
    return teacher_params / student_params


def summarise(by_row):
    """{row: {metric: (mean, std over seeds)}} of one student; std is the sample standard deviation (ddof
    1), None with one seed (strict JSON has no NaN)."""
    table = {}
    for row, by_seed in by_row.items():
        values = {name: np.array([r["best"][name] for r in by_seed.values()]) for name in METRICS}
        table[row] = {
            n: (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None)
            for n, v in values.items()
        }
    return table


def paired_difference(by_row):
    """{metric: (mean, low, high)} of selective - static over the seeds both ran: the mean per-seed
    difference and its 95 % t interval (n - 1 degrees of freedom); low and high None with one seed."""
    better, baseline = (by_row[row] for row in PAIRED)
    shared = [seed for seed in better if seed in baseline]
    difference = {}
    for name in METRICS:
        d = np.array([better[s]["best"][name] - baseline[s]["best"][name] for s in shared])
        if len(d) < 2:
            difference[name] = (float(d.mean()), None, None)
            continue
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        difference[name] = (float(d.mean()), float(d.mean() - half), float(d.mean() + half))
    return difference


def cell(name, mean, spread):
    """'0.812 +- 0.031' (HC18 % to one decimal); spread a std, or an interval (low, high), or None."""
    digits = 1 if name == "HC18 %" else 3
    if spread is None:
        return f"{mean:.{digits}f} +- n/a"
    if isinstance(spread, tuple):
        return f"{mean:+.{digits}f} [{spread[0]:+.{digits}f}, {spread[1]:+.{digits}f}]"
    return f"{mean:.{digits}f} +- {spread:.{digits}f}"


def print_table(summary, seeds):
    print(
        f"\n{'student, row: mean +- std over seeds ' + ','.join(map(str, seeds)):<44}"
        + "".join(f"{n:>24}" for n in METRICS)
    )
    for student, entry in summary.items():
        print(f"{student} (visual gap {entry['gap']:.1f}x)")
        for row, metrics in entry["table"].items():
            cells = [cell(n, m, s) for n, (m, s) in metrics.items()]
            label = f"{row} (seeds {','.join(map(str, entry['seeds'][row]))})"
            print(f"  {label:<42}" + "".join(f"{c:>24}" for c in cells))
        if "paired" in entry:
            cells = [
                cell(n, m, None if low is None else (low, high))
                for n, (m, low, high) in entry["paired"].items()
            ]
            label = f"{PAIRED[0]} - {PAIRED[1]}, 95 % t interval"
            print(f"  {label:<42}" + "".join(f"{c:>24}" for c in cells))


def print_five_plane_f1(teachers, runs):
    """Every seed's five-plane F1: each demo teacher (last epoch) and each run (best epoch)."""
    print("\nfive-plane F1 per seed")
    for seed, metrics in teachers.items():
        print(f"  {'demo teacher of seed ' + str(seed):<42}{metrics['F1-5']:.3f}")
    for student, by_row in runs.items():
        for row, by_seed in by_row.items():
            values = " ".join(f"{r['best']['F1-5']:.3f}" for r in by_seed.values())
            print(f"  {student + ', ' + row:<42}{values}")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    with configurator.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    fig.clf()


def figure2(by_row, path):
    """Left: the KD weight (lambda or beta) per step of each row; right: the zero-shot Avg per epoch, the
    mean over seeds with a +- std band (the paper's Figure 2), for one student."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for row, by_seed in by_row.items():
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
    save_figure(fig, path)
    plt.close(fig)


def gap_figure(summary, teacher_avg, path):
    """Best-epoch Avg against the visual capacity gap (log x): one line per row, the mean over seeds with
    its +- std band, and the teacher's Avg as a horizontal line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    entries = sorted(summary.values(), key=lambda entry: entry["gap"])
    gaps = np.array([entry["gap"] for entry in entries])
    for row in dict.fromkeys(row for entry in entries for row in entry["table"]):
        # all, once every run finished
        present = [entry for entry in entries if row in entry["table"]]
        gap = np.array([entry["gap"] for entry in present])
        mean = np.array([entry["table"][row]["Avg"][0] for entry in present])
        std = np.array([entry["table"][row]["Avg"][1] or 0.0 for entry in present])
        ax.plot(gap, mean, "o-", markersize=4, label=row)
        ax.fill_between(gap, mean - std, mean + std, alpha=0.15)
    if teacher_avg is not None:
        ax.axhline(teacher_avg, color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xscale("log")
    ax.set_xticks(gaps, [f"{g:.1f}x" for g in gaps])
    ax.minorticks_off()
    ax.set(
        xlabel="visual capacity gap (teacher / student image-tower parameters)",
        ylabel="zero-shot Avg (best epoch)",
        title="Avg against the capacity gap (mean +- std over seeds)",
    )
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def names(config, key, accepted):
    """The comma-separated names of setting `key`, each one of `accepted`, or a one-line error."""
    chosen = [name for name in config[key].split(",") if name]
    for name in chosen:
        if name not in accepted:
            raise SystemExit(
                f"--{key}: unknown name {name!r}; expected {configurator.one_of(name, accepted)}"
            )
    return chosen


def summarise_students(runs, config):
    """{student: {gap, seeds per row, table, paired (when both PAIRED rows share a seed)}}."""
    summary = {}
    for student, by_row in runs.items():
        entry = {"gap": visual_gap(config["teacher"], student)}
        entry["seeds"] = {row: list(by_seed) for row, by_seed in by_row.items()}
        entry["table"] = summarise(by_row)
        if all(row in by_row for row in PAIRED) and by_row[PAIRED[0]].keys() & by_row[PAIRED[1]]:
            entry["paired"] = paired_difference(by_row)
        summary[student] = entry
    return summary


def run_all(student_list, chosen, seed_list, config):
    """Every run, seed after seed: the demo teacher of teacher_seed first (unless --teacher_ckpt), then each
    student and row, then that seed's own demo teacher -> ({student: {row: {seed: run}}}, {seed: teacher
    metrics}, the teacher's path); runs not finished (--train=False) are left out, and so are students and
    rows left empty."""
    teacher_path, teachers, demo = config["teacher_ckpt"], {}, not config["teacher_ckpt"]
    if demo:  # the one demo teacher, first: every run distils from it
        seed = config["teacher_seed"]
        teacher_path = os.path.join(
            config["out_dir"], "demo_teacher", f"seed{seed}", configurator.CHECKPOINT
        )
        if not run_teacher(seed, config):
            return {}, {}, teacher_path
        teachers[seed] = read_teacher(os.path.dirname(teacher_path))
    runs = {student: {row: {} for row in chosen} for student in student_list}
    for seed in seed_list:
        for student in student_list:
            for row in chosen:
                folder = run_student(student, row, seed, config, teacher_path)
                if folder:
                    runs[student][row][seed] = read_run(folder)
        own = run_teacher(seed, config) if demo and seed not in teachers else None
        if own:  # each seed's demo teacher, for the record: does it learn as the teacher above did?
            teachers[seed] = read_teacher(own)
    runs = {
        s: {r: by_seed for r, by_seed in by_row.items() if by_seed} for s, by_row in runs.items()
    }
    return {s: by_row for s, by_row in runs.items() if by_row}, teachers, teacher_path


def main(arguments):
    config = configurator.configure(dict(DEFAULTS), arguments)
    student_list = names(config, "students", model.MODEL_CONFIGS)
    chosen = names(config, "rows", ROWS) or list(ROWS)
    names(config, "teacher", model.MODEL_CONFIGS)
    seed_list = [configurator.parse("seeds", s, 0) for s in config["seeds"].split(",")]
    check_train_flags(config["train_flags"])
    if not student_list:
        raise SystemExit("--students: expected at least one model.py name")
    if not config["teacher_ckpt"] and config["teacher"] != "demo_teacher":
        raise SystemExit(f"--teacher={config['teacher']} needs --teacher_ckpt=PATH")
    runs, teachers, teacher_path = run_all(student_list, chosen, seed_list, config)
    if not runs:
        raise SystemExit(f"sweep.py: no run in {config['out_dir']} has finished yet")
    summary = summarise_students(runs, config)
    print_table(summary, seed_list)
    print_five_plane_f1(teachers, runs)
    teacher_avg = teachers[config["teacher_seed"]]["Avg"] if teachers else None
    result = {
        "config": config,
        "teacher_ckpt": teacher_path,
        "teachers": teachers,
        "summary": summary,
        "runs": runs,
    }
    os.makedirs(config["out_dir"], exist_ok=True)
    configurator.write_atomic(
        os.path.join(config["out_dir"], "sweep.json"), json.dumps(result, indent=1)
    )
    figure2(next(iter(runs.values())), os.path.join(config["out_dir"], "figure2.png"))
    gap_figure(summary, teacher_avg, os.path.join(config["out_dir"], "gap.png"))
    print(f"wrote {config['out_dir']}/sweep.json, figure2.png and gap.png")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
