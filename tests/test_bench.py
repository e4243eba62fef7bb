"""bench.py: the FLOP count against a hand count, and every benchmark's figures at a tiny size (never timed)."""

import json

import pytest
import torch

import bench
import synthetic
from export import ImageEncoder, example_images
from model import create_model


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_flops_match_hand_count():
    """tiny_vit: 48 px, patch 16 -> 9 patches + class token, width 64, 2 blocks, 2 heads, head 64x64."""
    net = create_model("tiny_vit").eval()
    tokens, width = 10, 64
    block = tokens * width * (3 * width + width + 2 * 4 * width) + 2 * tokens * tokens * width  # linears + attention
    macs = 9 * width * (3 * 16 * 16) + 2 * block + width * 64
    assert bench.count_flops(ImageEncoder(net), example_images(net, batch=1)) == 2 * macs


def test_latency_loader_hc18_and_step_figures(tmp_path):
    synthetic.write_hc18(str(tmp_path / "hc18"), 0, 3)
    arguments = [
        "--benchmarks=latency,loader,hc18",
        "--student=demo_student",
        "--teacher=tiny_vit",
        "--runs=2",
        "--warmup=0",
        "--threads=1",
        "--loader_samples=4",
        f"--hc18_dir={tmp_path / 'hc18'}",
        f"--out_dir={tmp_path}",
    ]
    results = bench.main(arguments)
    rows = results["latency"]
    assert [(r["row"], r["runtime"]) for r in rows] == [
        ("teacher as trained", "pytorch"),
        ("teacher as trained", "onnxruntime"),
        ("student as trained", "pytorch"),
        ("student reparameterised", "pytorch"),
        ("student reparameterised", "onnxruntime"),
    ]
    for row in rows:
        assert row["ms"]["runs"] == 2 and row["ms"]["median"] > 0 and row["flops"] > 0
    assert rows[0]["teacher_over_row"] == 1.0
    loader = {(r["pipeline"], r["views"]): r["samples_per_cpu_s"] for r in results["loader"]}
    assert set(loader) == {("torchvision", 2), ("torchvision", 1), ("data.py", 2), ("data.py", 1)}
    assert all(rate > 0 for rate in loader.values())
    assert results["hc18"]["identical"] and results["hc18"]["per_image"]["prompts"] == 3 * 875
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["machine"]["cores"] >= 1 and len(saved["latency"]) == 5
    config = dict(bench.DEFAULTS, steps=1, device="cpu", dtype="float32", threads=1)
    seconds, peak, imports = bench.step_seconds("demo", True, 4, config)  # in this process, one step
    assert seconds > 0 and peak >= imports > 0


def test_bad_flags_are_named():
    with pytest.raises(SystemExit, match="--benchmarks: expected names from"):
        bench.main(["--benchmarks=speed"])
    with pytest.raises(SystemExit, match="--configs: unknown configuration 'huge'"):
        bench.main(["--benchmarks=step", "--configs=huge"])
