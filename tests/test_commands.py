"""Every command, given a user's mistake, says what is wrong in one line, with no traceback, before any model loads.

The commands run as subprocesses (the process boundary is the point: the exit status, what reaches the
terminal), all started at once so the suite waits for the slowest. Adding a command is one line in MISTAKES.
The evaluation sets' rows of issue 23 are checked through evaluate.main in-process (train.py's own check:
tests/test_train.py)."""

import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import protocol
from model import create_model
from tools import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")  # a file that exists, named where a folder is expected
MISTAKES = {  # a command line (after `python`) with a user's mistake -> what its one line says
    "train.py --grad_clip=-1": "--grad_clip=-1.0: expected 0 (off) or a positive gradient norm",
    "evaluate.py out/best.pt --device=gpu": "--device=gpu: expected '' (automatic) or one of cpu, cuda, cuda:N, mps",
    "-m tools.analysis out/best.pt --device=gpu": "--device=gpu: expected '' (automatic) or one of cpu,",
    "export.py nowhere.pt": "export.py: checkpoint not found: nowhere.pt",
    "-m tools.cache --teacher_ckpt=t.pt --train_data=x --out_dir=y --device=cuda:x": "--device=cuda:x: expected ''",
    "-m tools.sweep --rows=selectve": "--rows: unknown name 'selectve'; expected one of no_kd, static, ",
    "-m tools.bench --benchmarks=stepp": "--benchmarks: expected names from ['step', ",
    "-m tools.synthetic --width=0": "--width=0: expected at least 16 pixels",
    "predict.py nowhere.pt scans/ --pixel_size=1e9": "predict.py: --pixel_size=1000000000.0: expected a pixel size",
    "-m tools.scans scans/ --pixel_size=0": "scans.py: --pixel_size=0.0: expected a pixel size in mm",
    "-m tools.prepare pairs.csv --out_dir=shards --shard_size=0": "--shard_size=0: expected a positive number",
    f"predict.py nowhere.pt scans/ --out_dir={README}": f"predict.py: --out_dir={README}: {README} is a file, not",
    f"predict.py nowhere.pt scans/ --save_frames={README}/x": f"--save_frames={README}/x: {README} is a file, not",
    f"evaluate.py nowhere.pt --task=t/ --out_dir={README}": f"evaluate.py: --out_dir={README}: {README} is a file",
    # before: a FileExistsError traceback, in analysis.py after all the work
    f"export.py nowhere.pt --out_dir={README}": f"export.py: --out_dir={README}: {README} is a file",
    f"-m tools.quantize nowhere.pt --out_dir={README}/x": f"quantize: --out_dir={README}/x: {README} is a file",
    f"-m tools.analysis nowhere.pt --out_dir={README}": f"analysis.py: --out_dir={README}: {README} is a file",
    f"train.py --out_dir={README}": f"train.py: --out_dir={README}: {README} is a file",
    # before: 'bogus' ran and was recorded as the split; --batch_size=0 encoded a whole task in one batch
    "evaluate.py x.pt --task=t/ --eval_split=bogus": "--eval_split='bogus': expected one of all, select, report",
    "evaluate.py x.pt --task=t/ --batch_size=0": "--batch_size=0: expected at least 1",
}


def command(line):
    """'train.py --x=1' -> the script's path and its arguments; '-m tools.sweep ...' stays a module run."""
    words = line.split()
    return words if words[0] == "-m" else [os.path.join(ROOT, words[0]), *words[1:]]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Every command of MISTAKES, run at once in an empty folder -> {command line: (exit status, stdout, stderr)}."""
    folder = tmp_path_factory.mktemp("commands")
    # `-m tools.NAME` as from the root
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    running = {
        line: subprocess.Popen(
            [sys.executable, *command(line)],
            cwd=folder,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in MISTAKES
    }
    results = {
        line: (process.wait(timeout=300), *process.communicate())
        for line, process in running.items()
    }
    assert not os.listdir(folder), "a refused command wrote something"
    return results


@pytest.mark.parametrize("line", MISTAKES)
def test_a_mistake_is_one_line_without_a_traceback(finished, line):
    status, stdout, stderr = finished[line]
    assert status == 1 and "Traceback" not in stdout + stderr, stderr[-2000:]
    assert len(stderr.strip().splitlines()) == 1 and MISTAKES[line] in stderr, stderr


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """A tiny benchmark and a demo student's checkpoint, the NaN-weighted one beside it."""
    root = tmp_path_factory.mktemp("benchmark")
    synthetic.generate(
        str(root / "data"), n_train=4, n_planes=42, n_hc18=6, width=64, height=48, shard_size=4
    )
    student = create_model("demo_student").state_dict()
    torch.save({"model": student, "model_name": "demo_student"}, root / "student.pt")
    student["visual.bn1.running_var"][0] = float("nan")
    torch.save({"model": student, "model_name": "demo_student"}, root / "nan.pt")
    return root


def evaluate_refusal(benchmark, checkpoint="student.pt"):
    arguments = [
        str(benchmark / checkpoint),
        f"--planes_dir={benchmark / 'data' / 'planes'}",
        "--device=cpu",
    ]
    with pytest.raises(SystemExit) as refused:
        evaluate.main(
            [
                *arguments,
                f"--hc18_dir={benchmark / 'data' / 'hc18'}",
                f"--out_dir={benchmark / 'out'}",
            ]
        )
    assert "\n" not in str(refused.value)
    return str(refused.value)


def test_evaluate_refuses_a_checkpoint_with_a_nan_statistic_naming_it(benchmark):
    """Before: plane p=nan and GA 15w0d for every scan, exit status 0."""
    assert evaluate_refusal(benchmark, "nan.pt") == (
        f"evaluate.py: {benchmark / 'nan.pt'}: visual.bn1.running_var holds NaN or inf values (a diverged run, or a "
        "damaged file)"
    )


@pytest.mark.parametrize(
    "csv_name, edit, message",
    [  # before: counted twice (n = 24 for 12 images); Avg nan, exit status 0; KeyError: 'pooled_accuracy'
        (
            protocol.PLANES_CSV,
            lambda lines: lines + lines[5:6],
            "rows 6 and 44 list the same image 'Patient",
        ),
        (
            protocol.HC18_CSV,
            lambda lines: lines + lines[1:2],
            "rows 2 and 8 list the same image '000_HC.png'",
        ),
        (
            protocol.HC18_CSV,
            lambda lines: lines[:2] + ["001_HC.png,12,180"] + lines[3:],
            "'12' is not a number in [0.01",
        ),
        (
            protocol.PLANES_CSV,
            lambda lines: lines[:1],
            "split 'all': no image to evaluate (0 rows read)",
        ),
        (
            protocol.HC18_CSV,
            lambda lines: (
                lines[:1]
                + [
                    f"{line.rsplit(',', 1)[0]},{float(line.rsplit(',', 1)[1]) / 10}"
                    for line in lines[1:]
                ]
            ),
            "6 heads, none within the protocol's 100-342 mm (all under 50: the column must be in mm, not cm)",
        ),
    ],
)
def test_evaluate_refuses_duplicate_empty_or_out_of_range_evaluation_sets(
    benchmark, csv_name, edit, message
):
    folder = benchmark / "data" / ("planes" if csv_name == protocol.PLANES_CSV else "hc18")
    original = (folder / csv_name).read_text()
    (folder / csv_name).write_text("\n".join(edit(original.splitlines())) + "\n")
    try:
        refused = evaluate_refusal(benchmark)
    finally:
        (folder / csv_name).write_text(original)
    assert "evaluate.py: " in refused and message in refused, refused


def file_size_limit():
    """In the child: a write past 1 KiB fails (EFBIG) as on a full disk, instead of a SIGXFSZ kill."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 10, 1 << 10))


def test_a_full_disk_is_one_line_naming_the_folder(benchmark, tmp_path):
    """Before: each ended with a traceback, predict.py with a new JSON beside an old CSV."""
    rng = np.random.default_rng(0)
    scans, out, shards, frames = (tmp_path / name for name in ("scans", "out", "shards", "frames"))
    scans.mkdir()
    for i in range(4):  # each image and the predictions of all four are past the limit
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(scans / f"{i}.png")
        (scans / f"{i}.txt").write_text("a caption")
    left = "(File too large); the folder is left as it was"
    commands = {  # arguments -> the last line of stderr
        (f"{ROOT}/predict.py", str(benchmark / "student.pt"), str(scans), f"--out_dir={out}"): (
            f"predict.py: {out}: cannot write the predictions {left}"
        ),
        ("-m", "tools.prepare", str(scans), f"--out_dir={shards}"): (
            f"prepare.py: {shards}: cannot write the shards {left}"
        ),
        ("-m", "tools.scans", str(scans), f"--save_frames={frames}"): (
            f"scans.py: {frames}: cannot write the frames (File too large)"
        ),
    }
    environment = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1"
    )
    for arguments, message in commands.items():
        done = subprocess.run(
            [sys.executable, *arguments],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            preexec_fn=file_size_limit,
            timeout=300,
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == message  # progress bars come before it
    # nothing half-written
    assert sorted(os.listdir(tmp_path)) == ["frames", "scans"] and not os.listdir(frames)
