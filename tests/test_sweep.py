"""sweep.py: the table against numpy, Figure 2 drawn, train.py called as a user would call it."""

import json
import subprocess

import numpy as np
import pytest
import torch

from tools import sweep


def fake_run(folder, seed, offset, epochs=3, done=3):
    """What train.py leaves in a run's folder after `done` of its `epochs`: best.pt with its metrics, ckpt.pt with its
    epoch count and settings, log.jsonl with weights and evaluations."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {
        "five_planes": {"f1": 0.8 + offset + 0.01 * seed},
        "brain_subplanes": {"f1": 0.5 + 0.02 * seed},
        "hc18": {"validity": 50.0 + seed},
        "f1_all": 0.7 + offset,
        "avg": 0.6 + offset + 0.03 * seed,
    }
    torch.save({"metrics": metrics, "model": {}}, folder / "best.pt")
    torch.save({"epoch": done, "config": {"epochs": epochs}, "model": {}}, folder / "ckpt.pt")
    records = [{"step": s, "weight": 2.0 - 0.5 * s} for s in range(1, 5)]
    records += [{"epoch": e, "eval": {"avg": 0.5 + 0.1 * e + offset}} for e in range(done)]
    (folder / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records))


def test_table_json_and_figure_from_finished_runs(tmp_path, monkeypatch):
    for row, offset in (("no_kd", 0.0), ("selective", 0.05)):
        for seed in (0, 1, 2):
            fake_run(tmp_path / row / f"seed{seed}", seed, offset)
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: pytest.fail("finished runs must not run again")
    )
    table = sweep.main([f"--out_dir={tmp_path}", "--rows=no_kd,selective", "--teacher_ckpt=t.pt"])
    avg = np.array([0.65 + 0.03 * s for s in range(3)])
    assert table["selective"]["Avg"] == pytest.approx((avg.mean(), avg.std(ddof=1)))
    assert table["no_kd"]["HC18 %"] == pytest.approx((51.0, 1.0))
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert list(saved["table"]) == ["no_kd", "selective"] and saved["runs"]["no_kd"]["0"][
        "avg"
    ] == [0.5, 0.6, 0.7]
    assert (tmp_path / "figure2.png").stat().st_size > 10_000


def test_missing_runs_call_train_py_with_the_rows_flags(tmp_path, monkeypatch):
    calls = []

    def train(command, **kwargs):
        calls.append(command)
        folder = next(a.split("=", 1)[1] for a in command if a.startswith("--out_dir="))
        fake_run(tmp_path / folder, 0, 0.0)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", train)
    monkeypatch.chdir(tmp_path)
    sweep.main(["--out_dir=s", "--rows=no_kd,selective", "--seeds=0", "--train_flags=--epochs=2"])
    selective, no_kd = (
        calls  # the KD row runs first: with no --teacher_ckpt it trains the demo teacher
    )
    assert selective[2:] == [
        "--mode=selective",
        "--beta0=2",
        "--r=-0.8",
        "--seed=0",
        "--out_dir=s/selective/seed0",
        "--epochs=2",
    ]
    assert no_kd[2:5] == ["--mode=none", "--seed=0", "--out_dir=s/no_kd/seed0"]
    saved = (
        tmp_path / "s" / "sweep.json"
    ).read_text()  # strict JSON: one seed has no standard deviation, not NaN
    table = json.loads(saved, parse_constant=lambda c: pytest.fail(f"{c} in sweep.json"))["table"]
    assert table["selective"]["Avg"][1] is None
    with pytest.raises(
        SystemExit,
        match="--rows: unknown row 'nokd'; expected one of no_kd, .* \\(did you mean 'no_kd'",
    ):
        sweep.main(["--rows=nokd"])


def test_a_run_is_finished_only_when_its_last_epoch_is_and_an_unfinished_one_is_resumed(
    tmp_path, monkeypatch
):
    """Killed after its first best.pt (1 of 4 epochs), or during its last epoch's evaluation (ckpt.pt at 4 of 4, no
    record of it): both resumed, never counted as finished; a run with no ckpt.pt starts; a failed run is one line."""
    fake_run(tmp_path / "static" / "seed0", 0, 0.0, epochs=4, done=1)
    fake_run(tmp_path / "no_kd" / "seed0", 0, 0.0, epochs=4, done=4)
    (tmp_path / "no_kd" / "seed0" / "log.jsonl").write_text('{"epoch": 0, "eval": {"avg": 0.5}}\n')
    fake_run(tmp_path / "full_decay" / "seed0", 0, 0.0)  # finished
    calls = []

    def train(command, **kwargs):
        calls.append(command)
        folder = next(a.split("=", 1)[1] for a in command if a.startswith("--out_dir="))
        fake_run(tmp_path / folder, 0, 0.0, epochs=4, done=4)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", train)
    monkeypatch.chdir(tmp_path)
    sweep.main(
        [
            "--out_dir=.",
            "--rows=no_kd,static,full_decay,selective",
            "--seeds=0",
            "--teacher_ckpt=t.pt",
        ]
    )
    resumed = {c[c.index("--seed=0") + 1].split("/")[1]: "--resume=True" in c for c in calls}
    assert resumed == {"selective": False, "no_kd": True, "static": True}  # full_decay was finished
    monkeypatch.setattr(
        subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 1)
    )
    with pytest.raises(
        SystemExit, match="sweep.py: the run selective, seed 1 in ./selective/seed1 failed"
    ):
        sweep.main(["--out_dir=.", "--rows=selective", "--seeds=1"])
