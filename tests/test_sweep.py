"""sweep.py: the table and the paired differences against numpy and scipy, the figures drawn, train.py
called as a user would call it, one demo teacher for every student."""

import ast
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from tools import sweep

ROW_OFFSET = {"demo_teacher": 0.15, "no_kd": 0.0, "static": 0.02, "selective": 0.05}
STUDENT_OFFSET = {"demo_teacher": 0.0, "demo_student": 0.1, "demo_student_60x": 0.0}


def fake_run(folder, seed, offset, epochs=3, done=3):
    """What train.py leaves in a run's folder after `done` of its `epochs`: best.pt with its metrics,
    ckpt.pt with its epoch count and settings, log.jsonl with weights and evaluations (the last one's
    metrics are best.pt's)."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {
        "five_planes": {"f1": 0.8 + offset + 0.01 * seed},
        "brain_subplanes": {"f1": 0.5 + 0.02 * seed},
        "hc18": {"validity": 50.0 + seed},
        "f1_all": 0.7 + offset,
        "avg": 0.6 + offset + 0.03 * seed + 0.01 * seed**2 * offset,
    }
    torch.save({"metrics": metrics, "model": {}}, folder / "best.pt")
    torch.save({"epoch": done, "config": {"epochs": epochs}, "model": {}}, folder / "ckpt.pt")
    records = [{"step": s, "weight": 2.0 - 0.5 * s} for s in range(1, 5)]
    records += [{"epoch": e, "eval": {"avg": 0.5 + 0.1 * e + offset}} for e in range(done - 1)]
    records += [{"epoch": done - 1, "eval": metrics}]
    (folder / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records))


def fake_train(root, calls, epochs=3):
    """subprocess.run as train.py: records the command and leaves a finished run whose metrics follow its flags."""

    def train(command, **kwargs):
        calls.append(command)
        flags = dict(a[2:].split("=", 1) for a in command[2:])
        offset = ROW_OFFSET[
            "demo_teacher" if flags["student"] == "demo_teacher" else folder_row(flags)
        ]
        offset += STUDENT_OFFSET[flags["student"]]
        fake_run(root / flags["out_dir"], int(flags["seed"]), offset, epochs, epochs)
        return subprocess.CompletedProcess(command, 0)

    return train


def folder_row(flags):
    return Path(flags["out_dir"]).parent.name


def test_students_rows_and_the_paired_difference_against_numpy_and_scipy(tmp_path, monkeypatch):
    """Two tiny students, two rows, three seeds and their teachers, from finished runs: each cell's mean and
    std, selective - static per seed with its 95 % t interval written out by hand, both figures, nothing run
    again; a second call writes the same bytes."""
    for seed in (0, 1, 2):
        fake_run(tmp_path / "demo_teacher" / f"seed{seed}", seed, 0.15)
        for student in ("demo_student", "demo_student_60x"):
            for row in ("static", "selective"):
                offset = ROW_OFFSET[row] + STUDENT_OFFSET[student]
                fake_run(tmp_path / student / row / f"seed{seed}", seed, offset)
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: pytest.fail("finished runs must not run again")
    )
    arguments = [
        f"--out_dir={tmp_path}",
        "--students=demo_student,demo_student_60x",
        "--rows=static,selective",
    ]
    summary = sweep.main(arguments)
    seeds = np.arange(3)
    avg = {  # fake_run's Avg by hand
        row: 0.6
        + (ROW_OFFSET[row] + 0.1)
        + 0.03 * seeds
        + 0.01 * seeds**2 * (ROW_OFFSET[row] + 0.1)
        for row in ("static", "selective")
    }
    table = summary["demo_student"]["table"]
    assert table["selective"]["Avg"] == pytest.approx(
        (avg["selective"].mean(), avg["selective"].std(ddof=1))
    )
    assert table["static"]["HC18 %"] == pytest.approx((51.0, 1.0))
    d = avg["selective"] - avg["static"]
    half = stats.t.ppf(0.975, 2) * np.sqrt(((d - d.mean()) ** 2).sum() / 2) / np.sqrt(3)
    mean, low, high = summary["demo_student"]["paired"]["Avg"]
    assert (mean, low, high) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))
    assert low < mean < high and half > 0
    assert summary["demo_student"]["paired"]["F1-3"] == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    assert summary["demo_student"]["gap"] == pytest.approx(4_988_152 / 1_163_388)
    assert summary["demo_student_60x"]["gap"] == pytest.approx(4_988_152 / 83_867)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["teachers"]["1"]["F1-5"] == pytest.approx(0.96)  # the last epoch's metrics
    assert saved["teacher_ckpt"] == str(tmp_path / "demo_teacher" / "seed0" / "ckpt.pt")
    assert saved["runs"]["demo_student"]["static"]["0"]["avg"] == pytest.approx([0.62, 0.72, 0.72])
    figures = {
        name: (tmp_path / name).read_bytes() for name in ("sweep.json", "figure2.png", "gap.png")
    }
    assert len(figures["gap.png"]) > 10_000 and len(figures["figure2.png"]) > 10_000
    sweep.main(arguments)
    assert figures == {name: (tmp_path / name).read_bytes() for name in figures}


def test_missing_runs_train_one_teacher_then_every_student_from_it(tmp_path, monkeypatch, capsys):
    """Two tiny students, two rows, one seed: the demo teacher of teacher_seed first (train.py's own teacher flags),
    then each student and row distilling from it; one seed has no std and no interval (strict JSON, no NaN);
    --train=False tabulates what finished and names every run that did not."""
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_train(tmp_path, calls, epochs=2))
    monkeypatch.chdir(tmp_path)
    arguments = [
        "--out_dir=s",
        "--students=demo_student,demo_student_60x",
        "--rows=no_kd,selective",
    ]
    sweep.main([*arguments, "--seeds=1", "--teacher_seed=1", "--train_flags=--epochs=2"])
    assert [c[2:] for c in calls[:2]] == [
        [
            "--mode=none",
            "--student=demo_teacher",
            "--seed=1",
            "--epochs=2",
            "--epochs=7",
            "--out_dir=s/demo_teacher/seed1",
        ],
        [
            "--mode=none",
            "--student=demo_student",
            "--teacher=demo_teacher",
            "--seed=1",
            "--epochs=2",
            "--teacher_ckpt=s/demo_teacher/seed1/ckpt.pt",
            "--out_dir=s/demo_student/no_kd/seed1",
        ],
    ]
    folders = [c[-1] for c in calls[2:]]
    assert folders == [
        "--out_dir=s/demo_student/selective/seed1",
        "--out_dir=s/demo_student_60x/no_kd/seed1",
        "--out_dir=s/demo_student_60x/selective/seed1",
    ]
    assert all("--teacher_ckpt=s/demo_teacher/seed1/ckpt.pt" in c for c in calls[1:])
    saved = (tmp_path / "s" / "sweep.json").read_text()
    summary = json.loads(saved, parse_constant=lambda c: pytest.fail(f"{c} in sweep.json"))[
        "summary"
    ]
    assert summary["demo_student"]["table"]["selective"]["Avg"][1] is None
    assert "paired" not in summary["demo_student"]  # no static row
    calls.clear()
    sweep.main([*arguments, "--seeds=0", "--teacher_seed=1", "--rows=static,selective"])
    assert [c[-1] for c in calls if "demo_teacher/" in c[-1]] == ["--out_dir=s/demo_teacher/seed0"]
    saved = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert saved["summary"]["demo_student"]["paired"]["Avg"][1:] == [None, None]
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: pytest.fail("--train=False runs nothing")
    )
    partial = [*arguments, "--train=False", "--rows=no_kd,static", "--seeds=0,1,2"]
    summary = sweep.main(partial)
    assert summary["demo_student"]["seeds"] == {"no_kd": [1], "static": [0]}
    assert "paired" not in summary["demo_student"]
    missing = [line for line in capsys.readouterr().out.splitlines() if "not finished" in line]
    # each student's no_kd seeds 0 and 2 and static seeds 1 and 2, the demo teacher of seed 2
    assert len(missing) == 2 * (2 + 2) + 1
    assert (
        "not finished: demo_student_60x, static, seed 2 (s/demo_student_60x/static/seed2)"
        in missing
    )
    with pytest.raises(SystemExit, match="sweep.py: no run in t has finished yet"):
        sweep.main(["--out_dir=t", "--train=False"])


def test_names_are_checked_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        SystemExit,
        match="--rows: unknown name 'nokd'; expected one of no_kd, .* \\(did you mean 'no_kd'",
    ):
        sweep.main(["--rows=nokd"])
    with pytest.raises(SystemExit, match="--students: unknown name 'demo_studnt'; expected one of"):
        sweep.main(["--students=demo_student,demo_studnt"])
    with pytest.raises(SystemExit, match="--teacher=fetalclip needs --teacher_ckpt=PATH"):
        sweep.main(["--teacher=fetalclip"])
    # before: the later flag won, so every row (or seed) was the same run under its own label; and
    # --eval_every=0 ended in a traceback after the first run
    for flag in ("--mode=coupled", "--seed=5", "--eval_every=0", "--max_steps=3"):
        with pytest.raises(
            SystemExit, match=f"--train_flags sets {flag.split('=')[0]}, which the sweep"
        ):
            sweep.main([f"--train_flags=--epochs=2 {flag}"])
    assert os.listdir(tmp_path) == []  # refused before any run


def test_the_teachers_epochs_are_train_pys():
    """The sweep's demo teachers are the demo's own: teacher_epochs is train.py's demo_teacher_epochs."""
    tree = ast.parse(Path(sweep.__file__).parents[1].joinpath("train.py").read_text())
    defaults = {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    assert ast.literal_eval(defaults["demo_teacher_epochs"]) == sweep.DEFAULTS["teacher_epochs"]


def test_a_run_is_finished_only_when_its_last_epoch_is_and_an_unfinished_one_is_resumed(
    tmp_path, monkeypatch
):
    """Killed after its first best.pt (1 of 4 epochs), or during its last epoch's evaluation (ckpt.pt at 4
    of 4, no record of it): both resumed, never counted as finished; a run with no ckpt.pt starts; a failed
    run is one line."""
    student = tmp_path / "demo_student"
    fake_run(student / "static" / "seed0", 0, 0.0, epochs=4, done=1)
    fake_run(student / "no_kd" / "seed0", 0, 0.0, epochs=4, done=4)
    (student / "no_kd" / "seed0" / "log.jsonl").write_text('{"epoch": 0, "eval": {"avg": 0.5}}\n')
    fake_run(student / "full_decay" / "seed0", 0, 0.0, epochs=4, done=4)  # finished
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_train(tmp_path, calls, epochs=4))
    monkeypatch.chdir(tmp_path)
    sweep.main(
        [
            "--out_dir=.",
            "--rows=no_kd,static,full_decay,selective",
            "--seeds=0",
            "--teacher_ckpt=t.pt",
        ]
    )
    resumed = {
        c[-2 if "--resume=True" in c else -1].split("/")[2]: "--resume=True" in c for c in calls
    }
    assert resumed == {"selective": False, "no_kd": True, "static": True}  # full_decay was finished
    monkeypatch.setattr(
        subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 1)
    )
    with pytest.raises(
        SystemExit,
        match="sweep.py: the run demo_student, selective, seed 1 in ./demo_student/selective/seed1 failed",
    ):
        sweep.main(["--out_dir=.", "--rows=selective", "--seeds=1", "--teacher_ckpt=t.pt"])
