"""configurator.py: the one command line of every script."""

import os
from pathlib import Path

import pytest
import torch

from configurator import (
    atomic_path,
    choice,
    configure,
    parse,
    pick_device,
    refuse,
    settings,
    write_atomic,
)


def test_overrides_take_the_default_type_presets_and_one_positional():
    config = configure(
        {"seed": 0, "scale": 1.5, "out": "x", "bench": False},
        ["--seed=3", "--scale=2", "--out=a=b", "--bench"],
    )
    assert (
        config == {"seed": 3, "scale": 2.0, "out": "a=b", "bench": True}
        and type(config["scale"]) is float
    )
    assert configure({"out": "x"}, ["--out=123"]) == {"out": "123"}  # a string stays a string
    assert configure({"ckpt": "", "fast": True}, ["--fast=0", "a.pt"], positional="ckpt") == {
        "ckpt": "a.pt",
        "fast": False,
    }
    presets = {"big": {"seed": 7, "scale": 9.0}}
    assert configure({"seed": 0, "scale": 1.5}, ["--seed=1", "--preset=big"], presets) == {
        "seed": 1,
        "scale": 9.0,
    }  # the preset first, the explicit flag wins wherever it stands
    with pytest.raises(
        SystemExit, match="unknown config key 'sed' \\(did you mean 'seed'\\?\\); valid keys: seed"
    ):
        configure({"seed": 0}, ["--sed=1"])
    # nothing close: no guess
    with pytest.raises(SystemExit, match="unknown config key 'xyz'; valid keys: seed"):
        configure({"seed": 0}, ["--xyz=1"])
    with pytest.raises(SystemExit, match="--seed=1.5: expected int"):
        configure({"seed": 0}, ["--seed=1.5"])
    with pytest.raises(
        SystemExit, match="--preset=small: unknown preset; expected one of \\['big'\\]"
    ):
        configure({"seed": 0}, ["--preset=small"], presets)
    with pytest.raises(SystemExit, match="unexpected arguments \\['a.pt'\\]; expected --key=value"):
        configure({"seed": 0}, ["a.pt"])
    with pytest.raises(SystemExit, match="--out needs a value"):
        configure({"out": "x"}, ["--out"])


def test_settings_are_the_lower_case_scalars_in_order():
    namespace = {
        "out_dir": "x",
        "epochs": 4,
        "lr": 1e-3,
        "resume": False,
        "CONSTANT": 3,
        "_private": 1,
        "helper": print,
        "shape": (1, 2),
    }
    assert list(settings(namespace)) == ["out_dir", "epochs", "lr", "resume"]


def test_parse_accepts_an_int_for_a_float_and_names_bad_values():
    assert parse("beta0", "2", 2.0) == 2.0 and type(parse("beta0", "2", 2.0)) is float
    assert parse("resume", "True", False) is True and parse("resume", "0", True) is False
    with pytest.raises(SystemExit, match="--resume=yes: expected bool"):
        parse("resume", "yes", False)


def test_pick_device_accepts_only_devices_this_machine_has():
    assert pick_device("cpu") == "cpu"
    assert pick_device("") in ("cuda", "mps", "cpu")
    for device in ("gpu", "cuda:x", "cpu:0", "CUDA"):
        with pytest.raises(
            SystemExit,
            match=f"--device={device}: expected '' \\(automatic\\) or one of cpu, cuda, ",
        ):
            pick_device(device)
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 on a machine without one)
    with pytest.raises(
        SystemExit, match=f"--device={missing}: not on this machine \\(torch finds "
    ):
        pick_device(missing)


def test_rules_are_refused_in_one_line_each_with_the_closest_name():
    config = {"mode": "selectiv", "lr": float("nan"), "clip": float("-inf"), "epochs": 0}
    rules = [
        choice("mode", config["mode"], ("none", "selective")),
        ("lr", config["lr"] > 0, "a positive number"),
    ]
    rules += [
        ("clip", config["clip"] >= 0, "0 or more"),
        ("epochs", config["epochs"] > 0, "at least 1"),
    ]
    with pytest.raises(SystemExit) as refused:
        refuse(config, rules)
    # nan and inf: one line each, not a second for the rule they break
    assert str(refused.value).splitlines() == [
        "--lr=nan: expected a finite number",
        "--clip=-inf: expected a finite number",
        "--mode='selectiv': expected one of none, selective (did you mean 'selective'?)",
        "--epochs=0: expected at least 1",
    ]
    refuse({"epochs": 2}, [("epochs", True, "at least 1")])  # nothing broken: nothing happens


def test_atomic_writes_leave_the_old_file_or_the_new_one_never_half(tmp_path):
    path = tmp_path / "result.json"
    write_atomic(path, '{"old": 1}')
    with pytest.raises(RuntimeError, match="killed"), atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write('{"new": ')  # half written when the crash comes
        raise RuntimeError("killed")
    assert path.read_text() == '{"old": 1}' and sorted(p.name for p in tmp_path.iterdir()) == [
        "result.json"
    ]
    write_atomic(path, b'{"new": 2}')
    assert path.read_text() == '{"new": 2}'
    folder = tmp_path / "model.mlpackage"  # Core ML files are folders
    for version in ("a", "b"):
        with atomic_path(folder) as tmp:
            os.makedirs(tmp)
            (Path(tmp) / "weights.bin").write_text(version)
    assert (folder / "weights.bin").read_text() == "b" and len(list(tmp_path.iterdir())) == 2
