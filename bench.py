"""Training-step benchmark: samples per second and peak memory of train.py's optimiser step, for the
demo pair and the real-size pair (FetalCLIP -> MobileFetalCLIP), with the live teacher and with the
teacher-embedding cache (`python data.py cache`, `train.py --teacher_cache`).

    python bench.py                                  # CPU fp32: demo at batch 64, real size at batch 8
    python bench.py --configs=paper --batch_size=8 --steps=5
    python bench.py --device=cuda --dtype=bfloat16 --configs=paper --batch_size=256

Synthetic tensors and random weights (nothing to download): this times the models, the loss and the
optimiser, not the loader (`python data.py --bench` times that). Each measurement runs in a fresh
process, so its peak memory (resident set on CPU, allocated on CUDA) is that configuration's alone.
"""
import math
import multiprocessing
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import data
from loss import distill_loss
from model import MODEL_CONFIGS, create_model

CONFIGS = {"demo": ("demo_student", "demo_teacher", 64), "paper": ("mobilefetalclip", "fetalclip", 8)}
configs = "demo,paper"  # comma-separated names from CONFIGS
batch_size = 0  # 0 = each configuration's own (demo 64, paper 8)
steps = 5  # timed optimiser steps, after one warm-up step; their median is reported
device = "cpu"
dtype = "float32"  # float32 | bfloat16 | float16 (autocast, as train.py --dtype)
threads = 0  # torch threads; 0 = torch's default
seed = 0


def random_batch(net, size, batch):
    return torch.randn(batch, 3, size, size), torch.randint(1, 49407, (batch, net.context_length))


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(name, cached, batch, steps, device, dtype, threads):
    """One process: seconds per optimiser step, peak memory and the memory the imports alone took (GiB)."""
    imports = peak_rss_gib()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    student_name, teacher_name, _ = CONFIGS[name]
    student = create_model(student_name).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1,
                                  fused=device.split(":")[0] in ("cuda", "cpu"))  # as train.py
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device.split(":")[0], getattr(torch, dtype))
    student_images, tokens = (t.to(device) for t in random_batch(student, student.image_size, batch))
    if cached:  # what the cache hands the loss: unit vectors stored in fp16 and a scale; no teacher in memory
        dim = MODEL_CONFIGS[teacher_name]["embed_dim"]
        stored = [F.normalize(torch.randn(batch, dim, device=device), dim=-1).half().float() for _ in "it"]
        stored.append(torch.tensor(1 / 0.07, device=device))
    else:
        teacher = create_model(teacher_name).to(device).eval().requires_grad_(False)
        teacher_images = torch.randn(batch, 3, teacher.image_size, teacher.image_size, device=device)
    timings = []
    for step in range(steps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            if cached:
                teacher_out = stored
            else:  # the frozen teacher first, without gradients, as in train.py
                with torch.no_grad():
                    teacher_out = teacher(teacher_images, tokens)
            parts = distill_loss(*student(student_images, tokens), *teacher_out, mode="selective", step=step,
                                 total_steps=100, w0=2.0, r=-0.8, tau_kd=5.0)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            student.logit_scale.clamp_(0, math.log(100))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    seconds = statistics.median(timings[1:])  # a shared machine's hiccups move a mean, not a median
    if device.startswith("cuda"):
        return seconds, torch.cuda.max_memory_allocated() / 2**30, 0.0
    return seconds, peak_rss_gib(), imports


def main(arguments):
    config = data.apply_overrides(dict(configs=configs, batch_size=batch_size, steps=steps, device=device,
                                       dtype=dtype, threads=threads), arguments)
    names = config["configs"].split(",")
    for name in names:
        if name not in CONFIGS:
            raise SystemExit(f"--configs: unknown configuration {name!r}; expected names from {sorted(CONFIGS)}")
    if config["steps"] < 1:
        raise SystemExit(f"--steps={config['steps']}: expected at least 1")
    context = multiprocessing.get_context("spawn")  # a fresh process per measurement: its own peak memory
    print(f"{'config':<8} {'teacher':<8} {'batch':>5} {'s/step':>8} {'samples/s':>10} {'peak GiB':>9} "
          f"{'(imports)':>9}")
    results = {}
    for name in names:
        batch = config["batch_size"] or CONFIGS[name][2]
        for cached in (False, True):
            with context.Pool(1) as pool:
                seconds, peak, imports = pool.apply(measure, (name, cached, batch, config["steps"], config["device"],
                                                     config["dtype"], config["threads"]))
            results[name, cached] = seconds
            print(f"{name:<8} {'cache' if cached else 'live':<8} {batch:>5} {seconds:>8.3f} {batch / seconds:>10.1f} "
                  f"{peak:>9.2f} {imports:>9.2f}", flush=True)
        print(f"{name}: the cache makes a step {results[name, False] / results[name, True]:.1f}x faster")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
