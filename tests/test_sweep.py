"""sweep.py: the table against numpy, Figure 2 drawn, train.py called as a user would call it."""

import json
import subprocess

import numpy as np
import pytest
import torch

import sweep


def fake_run(folder, seed, offset):
    """What train.py leaves in a run's folder: best.pt with its metrics, log.jsonl with weights and evaluations."""
    folder.mkdir(parents=True)
    metrics = {
        "five_planes": {"f1": 0.8 + offset + 0.01 * seed},
        "brain_subplanes": {"f1": 0.5 + 0.02 * seed},
        "hc18": {"validity": 50.0 + seed},
        "f1_all": 0.7 + offset,
        "avg": 0.6 + offset + 0.03 * seed,
    }
    torch.save({"metrics": metrics, "model": {}}, folder / "best.pt")
    records = [{"step": s, "weight": 2.0 - 0.5 * s} for s in range(1, 5)]
    records += [{"epoch": e, "eval": {"avg": 0.5 + 0.1 * e + offset}} for e in range(3)]
    (folder / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records))


def test_table_json_and_figure_from_finished_runs(tmp_path, monkeypatch):
    for row, offset in (("no_kd", 0.0), ("selective", 0.05)):
        for seed in (0, 1, 2):
            fake_run(tmp_path / row / f"seed{seed}", seed, offset)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("finished runs must not run again"))
    table = sweep.main([f"--out_dir={tmp_path}", "--rows=no_kd,selective", "--teacher_ckpt=t.pt"])
    avg = np.array([0.65 + 0.03 * s for s in range(3)])
    assert table["selective"]["Avg"] == pytest.approx((avg.mean(), avg.std(ddof=1)))
    assert table["no_kd"]["HC18 %"] == pytest.approx((51.0, 1.0))
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert list(saved["table"]) == ["no_kd", "selective"] and saved["runs"]["no_kd"]["0"]["avg"] == [0.5, 0.6, 0.7]
    assert (tmp_path / "figure2.png").stat().st_size > 10_000


def test_missing_runs_call_train_py_with_the_rows_flags(tmp_path, monkeypatch):
    calls = []

    def train(command, check):
        calls.append(command)
        folder = next(a.split("=", 1)[1] for a in command if a.startswith("--out_dir="))
        fake_run(tmp_path / folder, 0, 0.0)

    monkeypatch.setattr(subprocess, "run", train)
    monkeypatch.chdir(tmp_path)
    sweep.main(["--out_dir=s", "--rows=no_kd,selective", "--seeds=0", "--train_flags=--epochs=2"])
    selective, no_kd = calls  # the KD row runs first: with no --teacher_ckpt it trains the demo teacher
    assert selective[2:] == [
        "--mode=selective",
        "--beta0=2",
        "--r=-0.8",
        "--seed=0",
        "--out_dir=s/selective/seed0",
        "--epochs=2",
    ]
    assert no_kd[2:5] == ["--mode=none", "--seed=0", "--out_dir=s/no_kd/seed0"]
    saved = (tmp_path / "s" / "sweep.json").read_text()  # strict JSON: one seed has no standard deviation, not NaN
    table = json.loads(saved, parse_constant=lambda c: pytest.fail(f"{c} in sweep.json"))["table"]
    assert table["selective"]["Avg"][1] is None
    with pytest.raises(SystemExit, match="unknown rows \\['nokd'\\]"):
        sweep.main(["--rows=nokd"])
