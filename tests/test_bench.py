"""bench.py: the FLOP count against a hand count, and every benchmark's figures at a tiny size (never timed)."""

import json
import os

import pytest
import torch

from export import ImageEncoder, example_images
from model import create_model
from tools import bench, synthetic


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_flops_match_hand_count():
    """tiny_vit: 48 px, patch 16 -> 9 patches + class token, width 64, 2 blocks, 2 heads, head 64x64."""
    net = create_model("tiny_vit").eval()
    tokens, width = 10, 64
    # linears + attention
    block = tokens * width * (3 * width + width + 2 * 4 * width) + 2 * tokens * tokens * width
    macs = 9 * width * (3 * 16 * 16) + 2 * block + width * 64
    assert bench.count_flops(ImageEncoder(net), example_images(net, batch=1)) == 2 * macs


def test_latency_loader_hc18_and_step_figures(tmp_path):
    synthetic.write_hc18(str(tmp_path / "hc18"), 0, 3)
    # the int8 student calibrates on 6, checks 2
    synthetic.write_planes(str(tmp_path / "planes"), 0, 8, 160, 120)
    synthetic.write_scans(str(tmp_path / "scans"), 0)
    arguments = [
        "--benchmarks=latency,loader,hc18,prompts,predict",
        "--prompt_count=8",
        f"--cine={tmp_path / 'scans' / 'sweep'}",
        "--student=demo_student",
        "--teacher=tiny_vit",
        "--runs=2",
        "--warmup=0",
        "--threads=1",
        "--loader_samples=4",
        f"--calibration={tmp_path / 'planes' / 'Images'}",
        f"--hc18_dir={tmp_path / 'hc18'}",
        f"--out_dir={tmp_path}",
    ]
    results = bench.main(arguments)
    rows = results["latency"]
    onnx_rows = [
        (row, "onnxruntime", threads)
        for row in ("teacher as trained", "student reparameterised", "student int8")
        for threads in sorted({1, os.cpu_count()})  # one thread, and one per core
    ]
    assert [(r["row"], r["runtime"], r["threads"]) for r in rows] == [
        ("teacher as trained", "pytorch", 1),
        ("student as trained", "pytorch", 1),
        ("student reparameterised", "pytorch", 1),
        *onnx_rows,
    ]
    for row in rows:
        assert row["ms"]["runs"] == 2 and row["ms"]["median"] > 0 and row["flops"] > 0
    assert [r["teacher_over_row"] for r in rows if r["row"] == "teacher as trained"] == [1.0] * 3
    by_row = {(r["row"], r["threads"]): r for r in rows if r["runtime"] == "onnxruntime"}
    fp32, int8 = by_row["student reparameterised", 1], by_row["student int8", 1]
    # the same graph in int8 weights
    assert 0 < int8["mb"] < fp32["mb"] / 3 and int8["flops"] == fp32["flops"]
    assert int8["agreement"]["images"] == 2 and int8["agreement"]["calibration_images"] == 6
    assert 0.9 < int8["agreement"]["cosine_min"] <= int8["agreement"]["cosine_mean"] < 1
    loader = {(r["pipeline"], r["views"]): r["samples_per_cpu_s"] for r in results["loader"]}
    assert set(loader) == {("torchvision", 2), ("torchvision", 1), ("data.py", 2), ("data.py", 1)}
    assert all(rate > 0 for rate in loader.values())
    assert results["hc18"]["identical"] and results["hc18"]["per_image"]["prompts"] == 3 * 875
    prompts = results["prompts"]
    # demo_student's text tower: 48 tokens, width 96, 2 layers, the pooled token projected to 96
    tokens, width = 48, 96
    block = tokens * width * (3 * width + width + 2 * 4 * width) + 2 * tokens * tokens * width
    assert prompts["flops_per_prompt"] == 2 * (2 * block + width * 96)
    assert prompts["prompts"] == 8 and prompts["prompts_per_s"] > 0
    assert prompts["floor_10000_minutes"] == pytest.approx(
        10_000 * prompts["flops_per_prompt"] / prompts["matmul_flops_per_s"] / 60
    )
    assert prompts["classes_10000_minutes"] == pytest.approx(10_000 / prompts["prompts_per_s"] / 60)
    predicted = results["predict"]
    assert predicted["frames"] == 24 and predicted["frames_per_s"] > 0  # the sweep's 24 frames
    assert (
        min(predicted[k] for k in ("first_run_seconds", "second_run_seconds", "imports_seconds"))
        > 0
    )
    assert predicted["eager_batch32_frames_per_s"] > 0 and predicted["batch_size"] == 32
    assert predicted["onnx_encoder_batch8_frames_per_s"] > 0 and predicted["matmul_flops_per_s"] > 0
    # the FLOPs a frame are those of the reparameterised student's latency row, counted at the same size
    assert predicted["encoder_flops_per_frame"] == fp32["flops"]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["machine"]["cores"] >= 1 and len(saved["latency"]) == 3 + len(onnx_rows)
    config = dict(bench.DEFAULTS, steps=1, device="cpu", dtype="float32", threads=1)
    # in this process, one step
    seconds, peak, imports = bench.step_seconds("demo", True, 4, config)
    assert seconds > 0 and peak >= imports > 0


def test_bad_flags_are_named():
    with pytest.raises(SystemExit, match="--benchmarks: expected names from"):
        bench.main(["--benchmarks=speed"])
    with pytest.raises(SystemExit, match="--configs: unknown configuration 'huge'"):
        bench.main(["--benchmarks=step", "--configs=huge"])


def test_the_timed_step_reads_the_paper_recipe_from_train_py():
    """The README's recipe (paper Sec. 3.6): AdamW lr 1e-5, betas (0.9, 0.98), eps 1e-6, weight decay 0.1,
    batch 512 x 2 accumulation steps, 500 warm-up steps, 20 epochs, fp16, tau_kd 5, r -0.8, gradients
    clipped at 1."""
    recipe = bench.paper_recipe()
    expected = dict(
        learning_rate=1e-5,
        beta1=0.9,
        beta2=0.98,
        eps=1e-6,
        weight_decay=0.1,
        batch_size=512,
        grad_accum=2,
        warmup_steps=500,
        epochs=20,
        dtype="float16",
        tau_kd=5.0,
        r=-0.8,
    )
    assert {key: recipe[key] for key in expected} == expected and recipe["grad_clip"] == 1.0
    assert recipe["student"] == "mobilefetalclip" and recipe["teacher"] == "fetalclip"
