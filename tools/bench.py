"""Every timing of the project, printed as figures (tests never time anything):

    python -m tools.bench                                   # every benchmark on this CPU
    python -m tools.bench --benchmarks=step --device=cuda --dtype=bfloat16 --configs=paper --batch_size=256
    python -m tools.bench --benchmarks=latency              # the paper's Table 2 on this machine, with the int8 student
    python -m tools.bench --benchmarks=loader,hc18

- step: samples/s and peak memory of train.py's optimiser step (teacher forward without gradients, student forward
  and backward, the selective loss, clipping, fused AdamW) for the demo and the real-size pair, with the live
  teacher and from the teacher cache; random tensors and weights, each configuration in a fresh process so its
  peak memory (resident set on CPU, allocated on CUDA) is its own; one warm-up step, then the median.
  By multiply-adds the real-size step is 6.7x cheaper from the cache (teacher 91.2 G per sample, student forward and
  backward about 16 G); measured it is 2.8-3.0x on a 2-core Xeon and 3.6x on a 2-core EPYC: FastViT's backward runs
  2-3.5x slower in PyTorch's default NCHW layout than in channels-last, which crashes PyTorch 2.14's CPU backward.
- loader: coupled two-view samples (800x540 grayscale PNG -> student 256 px + teacher 224 px) and one-view
  samples (the --teacher_cache path) per CPU-second of one thread, next to the plain torchvision pipeline.
- latency: image encoders at batch 1 (paper Table 2): parameters, FLOPs by torch's FlopCounterMode (a multiply-add
  counts 2, the paper's GMACs are half), median latency in PyTorch, and in onnxruntime at one thread and at one
  per core, with the ONNX file's size: the teacher, the reparameterised student and its int8 copy (quantize.py,
  calibrated on --calibration images; its cosine and zero-shot agreement with the fp32 file on held-out ones);
  random weights.
- hc18: the HC18 GA prompts encoded once per distinct pixel spacing vs once per image (the release's procedure).
- prompts: class prompts at scale (predict.py --prompts, evaluate.py --task) through --student's text tower at its
  full context: prompts/s, the FLOPs of one prompt, and the floor this CPU's own matrix-multiply rate sets.
- predict: predict.py end to end on a cine loop with the real-size student: first run, second run (its caches
  warm), steady-state frames/s, beside the eager encoder alone at batch 32 in the same run (see bench_predict).
Figures go to out_dir/bench.json with the machine they were measured on.
"""

import ast
import functools
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

import configurator
import data
import protocol
from loss import KD_MODES, distill_loss, kd_weight
from model import MODEL_CONFIGS, create_model, reparameterize
from tools import synthetic

# ------------------------------------------------------------------ settings: --key=value
DEMO = synthetic.layout(configurator.DEMO_DIR)  # the demo's folders (python -m tools.synthetic)
DEFAULTS = {
    "benchmarks": "step,loader,latency,hc18,prompts,predict",  # which to run, comma-separated
    "configs": "demo,paper",  # step: model pairs from CONFIGS, comma-separated
    "batch_size": 0,  # step: 0 = each configuration's own (demo 64, paper 8); predict: 0 = predict.py's
    "steps": 5,  # step: timed optimiser steps after one warm-up step; the median is reported
    "device": "cpu",
    "dtype": "float32",  # step: float32 | bfloat16 | float16 (autocast, as train.py --dtype)
    # torch threads; 0 = torch's default (onnxruntime runs at one thread and at one per core)
    "threads": 0,
    # latency: timed batch-1 calls per row (the median is reported), after `warmup` untimed ones
    "runs": 50,
    "warmup": 5,
    # latency: also time the teacher, the reparameterised student and its int8 copy through onnxruntime
    "onnx": True,
    # latency: images the int8 student calibrates on (quantize.py; '' = the demo Planes DB images)
    "calibration": "",
    # latency: at most this many of them (every 4th is held out for the agreement)
    "calibration_images": 64,
    "student": "mobilefetalclip",  # latency: model.py names of the two image encoders
    "teacher": "fetalclip",
    "loader_samples": 64,  # loader: samples per timed pass (three passes, the median is reported)
    # hc18: the folder whose GA prompts are timed (python -m tools.synthetic writes it)
    "hc18_dir": DEMO["hc18_dir"],
    # predict: the cine loop (DICOM or clip) whose frames are predicted
    "cine": os.path.join(DEMO["scans"], "sweep"),
    "prompt_count": 256,  # prompts: class prompts encoded by --student's text tower (timed)
    "out_dir": "bench",  # bench.json
    "seed": 0,
}

CONFIGS = {
    "demo": ("demo_student", "demo_teacher", 64),
    "paper": ("mobilefetalclip", "fetalclip", 8),
}
PAPER_TABLE_2 = {
    "student": {"gmacs": 1.2, "latency_ms": 1.6},
    "teacher": {"gmacs": 38.9, "latency_ms": 37.6},
}

# ------------------------------------------------------------------ step


def paper_recipe():
    """train.py's settings under --preset=paper, read from its source (a script runs when imported): the
    recipe of the step timed here is the one train.py trains with, written once. Its literal module-level
    settings only."""
    tree = ast.parse(Path(__file__).resolve().parent.parent.joinpath("train.py").read_text())
    settings = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                settings[node.targets[0].id] = ast.literal_eval(node.value)
            # computed (configurator.DEMO_DIR, the config ...): not part of the recipe
            except ValueError:
                continue
    return settings | settings["PRESETS"]["paper"]


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def teacher_outputs(teacher_name, cached, batch, tokens, device):
    """A function giving the loss its teacher inputs: the live frozen teacher on random images, or what the
    cache hands it (unit vectors stored in fp16 and a scale; no teacher in memory)."""
    if cached:
        dim = MODEL_CONFIGS[teacher_name]["embed_dim"]
        image_features, text_features = (
            F.normalize(torch.randn(batch, dim, device=device), dim=-1).half().float()
            for _ in ("image", "text")
        )
        scale = torch.tensor(1 / 0.07, device=device)

        def cached_teacher():
            return image_features, text_features, scale

        return cached_teacher
    teacher = create_model(teacher_name).to(device).eval().requires_grad_(False)
    images = torch.randn(batch, 3, teacher.image_size, teacher.image_size, device=device)

    @torch.no_grad()
    def live_teacher():  # first, without gradients, as in train.py
        return teacher(images, tokens)

    return live_teacher


def step_seconds(name, cached, batch, config):
    """One process: seconds per optimiser step, peak memory and the memory the imports alone took (GiB)."""
    imports, device = peak_rss_gib(), config["device"]
    torch.manual_seed(config["seed"])
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    student_name, teacher_name, _ = CONFIGS[name]
    student = create_model(student_name).to(device)
    recipe = paper_recipe()
    optimizer = torch.optim.AdamW(
        student.parameters(),
        recipe["learning_rate"],
        betas=(recipe["beta1"], recipe["beta2"]),
        eps=recipe["eps"],
        weight_decay=recipe["weight_decay"],
        fused=device.split(":")[0] in ("cuda", "cpu"),  # as train.py
    )
    autocast = nullcontext()
    if config["dtype"] != "float32":
        autocast = torch.autocast(device.split(":")[0], getattr(torch, config["dtype"]))
    images = torch.randn(batch, 3, student.image_size, student.image_size, device=device)
    tokens = torch.randint(1, data.EOT, (batch, student.context_length), device=device)
    teacher = teacher_outputs(teacher_name, cached, batch, tokens, device)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    timings = []
    for step in range(config["steps"] + 1):
        synchronize()
        start = time.perf_counter()
        with autocast:
            beta = kd_weight(step, 100, KD_MODES["selective"]["w0"], recipe["r"])
            parts = distill_loss(
                student(images, tokens), teacher(), weight=beta, tau_kd=recipe["tau_kd"]
            )
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), recipe["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            student.logit_scale.clamp_(0, math.log(100))
        synchronize()
        timings.append(time.perf_counter() - start)
    seconds = statistics.median(timings[1:])  # a shared machine's hiccups move a mean, not a median
    if device.startswith("cuda"):
        return seconds, torch.cuda.max_memory_allocated() / 2**30, 0.0
    return seconds, peak_rss_gib(), imports


def bench_step(config):
    names = config["configs"].split(",")
    for name in names:
        if name not in CONFIGS:
            raise SystemExit(
                f"--configs: unknown configuration {name!r}; expected names from {sorted(CONFIGS)}"
            )
    # a fresh process per measurement: its own peak memory
    context = multiprocessing.get_context("spawn")
    print(
        f"{'config':<8} {'teacher':<8} {'batch':>5} {'s/step':>8} {'samples/s':>10} {'peak GiB':>9} {'(imports)':>9}"
    )
    rows = []
    for name in names:
        batch = config["batch_size"] or CONFIGS[name][2]
        for cached in (False, True):
            with context.Pool(1) as pool:
                seconds, peak, imports = pool.apply(step_seconds, (name, cached, batch, config))
            rows.append(
                dict(
                    config=name,
                    teacher="cache" if cached else "live",
                    batch=batch,
                    seconds=seconds,
                    samples_per_s=batch / seconds,
                    peak_gib=peak,
                    imports_gib=imports,
                )
            )
            print(
                f"{name:<8} {rows[-1]['teacher']:<8} {batch:>5} {seconds:>8.3f} {batch / seconds:>10.1f} "
                f"{peak:>9.2f} {imports:>9.2f}",
                flush=True,
            )
        print(
            f"{name}: the cache makes a step {rows[-2]['seconds'] / rows[-1]['seconds']:.1f}x faster"
        )
    return rows


# ------------------------------------------------------------------ loader


def torchvision_views(square, params, views):
    """The straightforward PIL / torchvision pipeline: per view a bicubic resize of the padded square, the
    affine, the jitter in the drawn order, to tensor, normalise. The reference the loader is measured
    against."""
    import torchvision.transforms.functional as TF

    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    out = []
    for size, mean, std in views:
        view = TF.center_crop(
            TF.resize(square, size, interpolation=TF.InterpolationMode.BICUBIC), size
        )
        translate = [t * size for t in params["translate"]]
        view = TF.affine(
            view,
            angle=params["angle"],
            translate=translate,
            scale=1.0,
            shear=[0.0, 0.0],
            interpolation=TF.InterpolationMode.BILINEAR,
        )
        for i in params["order"]:
            view = adjust[i](view, params["factors"][i])
        tensor = TF.to_tensor(view)
        out.append(
            TF.normalize(tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor, mean, std)
        )
    return out


def write_scans(folder, n, seed):
    """n 800x540 grayscale PNG scans (HC18's size) as WebDataset samples -> the shard's path."""
    from tools import synthetic

    url = os.path.join(folder, "bench-000000.tar")
    with wds.TarWriter(url, encoder=False) as sink:
        for i in range(n):
            rng = np.random.default_rng([seed, 3, i])
            scan = synthetic.render_scan(rng, "brain", "trans-thalamic", 250, 0.2, 800, 540)
            sink.write(
                {"__key__": f"{i:08d}", "png": synthetic.encode(scan, "PNG"), "txt": b"a scan"}
            )
    return url


def samples_per_cpu_second(url, views, make_views, passes=3):
    """Decode + coupled views of every sample, one thread: the median over passes of samples / process time."""
    # read once: only decoding and the views are timed
    raw = list(wds.tarfile_samples([{"url": url}]))
    rates = []
    for epoch in range(passes):
        start = time.process_time()
        for sample in raw:
            image, _, _ = data.decode_sample(sample)
            make_views(
                data.pad_to_square(image), data.augment_params(0, epoch, sample["__key__"]), views
            )
        rates.append(len(raw) / (time.process_time() - start))
    return statistics.median(rates)


def bench_loader(config):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        return loader_rows(config)
    finally:
        torch.set_num_threads(threads)


def loader_rows(config):
    student, teacher = (MODEL_CONFIGS[name] for name in ("mobilefetalclip", "fetalclip"))
    student_view = (student["image_size"], student["mean"], student["std"])
    teacher_view = (teacher["image_size"], teacher["mean"], teacher["std"])
    with tempfile.TemporaryDirectory() as folder:
        url = write_scans(folder, config["loader_samples"], config["seed"])
        rows = [
            dict(
                pipeline=name,
                views=len(views),
                samples_per_cpu_s=samples_per_cpu_second(url, views, make),
            )
            for name, make in (("torchvision", torchvision_views), ("data.py", data.coupled_views))
            for views in ([student_view, teacher_view], [student_view])
        ]
    print("loader: 800x540 grayscale PNG -> 256 px (+ 224 px), one thread, samples per CPU-second")
    for row in rows:
        print(f"  {row['pipeline']:<12} {row['views']} view(s) {row['samples_per_cpu_s']:8.1f}")
    by = {(r["pipeline"], r["views"]): r["samples_per_cpu_s"] for r in rows}
    print(
        f"  data.py vs torchvision, two views: {by['data.py', 2] / by['torchvision', 2]:.2f}x; data.py one view vs "
        f"two views: {by['data.py', 1] / by['data.py', 2]:.2f}x"
    )
    return rows


# ------------------------------------------------------------------ latency (paper Table 2)


def count_flops(module, inputs):
    """FLOPs of one call (a multiply-add counts 2). torch's counter has no formula for the CPU kernel of
    scaled_dot_product_attention (timm's fused attention), so it gets the same formula as the GPU kernels,
    nor for nn.MultiheadAttention's fused inference path (the text towers), counted here by hand."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def multi_head_attention(query, key, value, *args, out_shape=None, **kwargs):
        """Shapes (B, T, W) of the queries, (B, S, W) of the keys: the q, k, v and output projections
        (4 T W^2 multiply-adds) and the scores and their weighted sum (2 T S W)."""
        batch, tokens, width = query
        return 2 * batch * (4 * tokens * width * width + 2 * tokens * key[1] * width)

    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention,
        torch.ops.aten._native_multi_head_attention: multi_head_attention,
    }
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.inference_mode(), counter:
        module(inputs)
    return counter.get_total_flops()


def latency_ms(call, warmup, runs):
    """Median and 10th / 90th percentile of `runs` timed calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - start))
    p10, p90 = np.percentile(times, [10, 90])
    return {"median": statistics.median(times), "p10": float(p10), "p90": float(p90), "runs": runs}


def encoder_row(label, name, encoder, images):
    """What a latency row says of an image encoder before it is timed: parameters and FLOPs."""
    flops = count_flops(encoder, images)
    return dict(
        row=label, model=name, params=sum(p.numel() for p in encoder.parameters()), flops=flops
    )


def pytorch_row(about, encoder, images, config):
    with torch.inference_mode():
        ms = latency_ms(lambda: encoder(images), config["warmup"], config["runs"])
    print(f"  {about['row']}: pytorch {ms['median']:.1f} ms", flush=True)
    return dict(about, runtime="pytorch", threads=torch.get_num_threads(), ms=ms)


def onnxruntime_rows(about, path, images, config):
    """The ONNX file at `path`, batch 1, at one thread and at one per core: its size and latency rows."""
    from export import onnx_session

    rows, feed = [], {"image": images.numpy()}
    for threads in sorted({1, os.cpu_count()}):
        session = onnx_session(path, threads)
        ms = latency_ms(
            functools.partial(session.run, None, feed), config["warmup"], config["runs"]
        )
        rows.append(
            dict(
                about, runtime="onnxruntime", threads=threads, mb=os.path.getsize(path) / 1e6, ms=ms
            )
        )
        print(
            f"  {about['row']}: onnxruntime {threads} thread(s) {ms['median']:.1f} ms", flush=True
        )
    return rows


def int8_student(fused, fp32_path, folder, config):
    """The reparameterised student through quantize.py, calibrated on --calibration images -> (its ONNX
    file, int8 vs fp32 agreement on the held-out images). Random weights: a trained student's agreement is
    export.py's to measure."""
    from tools import quantize

    spec = config["calibration"] or quantize.DEMO_CALIBRATION
    calibration, held_out = quantize.calibration_split(
        quantize.image_files(spec), config["calibration_images"]
    )
    path = Path(folder) / "student_int8.onnx"
    quantize.quantize_onnx(fp32_path, path, calibration, fused)
    encoders = {"fp32": quantize.onnx_encoder(fp32_path), "int8": quantize.onnx_encoder(path)}
    return path, dict(
        quantize.agreement(encoders, held_out, fused), calibration_images=len(calibration)
    )


def onnx_rows(encoders, inputs, about, fused, config):
    """The teacher, the reparameterised student and its int8 copy as ONNX files of batch 1, as the Core ML file."""
    from export import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        files = {}
        for label in ("teacher as trained", "student reparameterised"):
            path = Path(folder) / f"{len(files)}.onnx"
            files[label] = export_onnx(
                encoders[label], inputs[label], path, "image", ["image_features"], False
            )
        files["student int8"], agreement = int8_student(
            fused, files["student reparameterised"], folder, config
        )
        about["student int8"] = dict(
            about["student reparameterised"], row="student int8", agreement=agreement
        )
        inputs["student int8"] = inputs["student reparameterised"]
        return [
            row
            for label, path in files.items()
            for row in onnxruntime_rows(about[label], path, inputs[label], config)
        ]


def bench_latency(config):
    from export import ImageEncoder

    torch.manual_seed(config["seed"])
    teacher, student = (create_model(config[name]).eval() for name in ("teacher", "student"))
    fused = reparameterize(student)
    names = {
        "teacher as trained": "teacher",
        "student as trained": "student",
        "student reparameterised": "student",
    }
    encoders = dict(zip(names, (ImageEncoder(teacher), ImageEncoder(student), ImageEncoder(fused))))
    rows, about, inputs = [], {}, {}
    for label, encoder in encoders.items():
        name = config[names[label]]
        size = MODEL_CONFIGS[name]["image_size"]
        inputs[label] = torch.randn(
            1, 3, size, size, generator=torch.Generator().manual_seed(config["seed"])
        )
        about[label] = encoder_row(label, name, encoder, inputs[label])
        rows.append(pytorch_row(about[label], encoder, inputs[label], config))
    return print_latency(
        rows + (onnx_rows(encoders, inputs, about, fused, config) if config["onnx"] else [])
    )


def print_latency(rows):
    """The table, each row's median against the teacher's in the same runtime and thread count -> rows."""
    print(
        f"image encoders, batch 1\n{'':<24}{'runtime':<12}{'threads':>7}{'params':>12}{'GMACs':>7}{'MB':>8}"
        f"{'ms median':>11}{'p10-p90':>16}{'teacher/row':>13}"
    )
    for r in rows:
        same = [t for t in rows if (t["runtime"], t["threads"]) == (r["runtime"], r["threads"])]
        # the teacher comes first
        r["teacher_over_row"] = same[0]["ms"]["median"] / r["ms"]["median"]
        mb = f"{r['mb']:.1f}" if "mb" in r else ""
        print(
            f"{r['row']:<24}{r['runtime']:<12}{r['threads']:>7}{r['params']:>12,}{r['flops'] / 2e9:>7.2f}{mb:>8}"
            f"{r['ms']['median']:>11.1f}{r['ms']['p10']:>8.1f}-{r['ms']['p90']:<7.1f}{r['teacher_over_row']:>13.1f}"
        )
    agreement = next((r["agreement"] for r in rows if "agreement" in r), None)
    if agreement:
        print(
            f"student int8 vs reparameterised (onnxruntime), {agreement['images']} held-out images: cosine mean "
            f"{agreement['cosine_mean']:.4f}, min {agreement['cosine_min']:.4f}; zero-shot top-1 agreement five planes "
            f"{agreement['five_planes_top1_agreement']:.3f}, brain {agreement['brain_subplanes_top1_agreement']:.3f}"
        )
    s, t = PAPER_TABLE_2["student"], PAPER_TABLE_2["teacher"]
    print(
        f"paper (Core ML fp16, iPhone 16 Pro): student {s['gmacs']} GMACs {s['latency_ms']} ms, teacher "
        f"{t['gmacs']} GMACs {t['latency_ms']} ms: {t['latency_ms'] / s['latency_ms']:.1f}x latency"
    )
    return rows


# ------------------------------------------------------------------ HC18 GA prompts


def bench_hc18(config):
    """Wall clock and prompts encoded: GA text cached per spacing string vs re-encoded per image (untrained
    demo_student: the text tower's cost does not depend on its weights)."""
    import evaluate

    torch.manual_seed(config["seed"])
    net = create_model("demo_student").eval()
    rows = protocol.hc18_rows(config["hc18_dir"])
    features, sides = evaluate.encode_images(net, [r["path"] for r in rows])
    spacings = [
        evaluate.ga_spacing(side, r["pixel_size"], net.image_size) for side, r in zip(sides, rows)
    ]
    runs = {}
    for cache_text in (True, False):
        start = time.perf_counter()
        scores, encoded = evaluate.ga_scores(net, features, spacings, cache_text)
        runs[cache_text] = dict(seconds=time.perf_counter() - start, prompts=encoded, scores=scores)
    fast, slow = runs[True], runs[False]
    identical = bool(np.array_equal(fast.pop("scores"), slow.pop("scores")))
    print(
        f"HC18 GA scores, {len(rows)} images, {len(set(spacings))} distinct spacing strings: cached "
        f"{fast['seconds']:.1f} s / {fast['prompts']} prompts, per image {slow['seconds']:.1f} s / {slow['prompts']} "
        f"prompts ({slow['seconds'] / fast['seconds']:.1f}x), scores identical: {identical}"
    )
    return dict(cached=fast, per_image=slow, identical=identical)


# ------------------------------------------------------------------ class prompts at scale


def bench_prompts(config):
    """`prompt_count` class prompts through evaluate.encode_prompts with --student's text tower (random
    weights: the cost does not depend on them) at its full context: the real student's tower has no mask,
    so its padding cannot be trimmed without changing its output. Beside the measured prompts/s: the FLOPs
    of one prompt (FlopCounterMode) and this machine's fp32 matrix-multiply rate, whose quotient is a floor
    no fp32 path on this CPU can beat. Both are projected to 10,000 classes of one prompt each."""
    import evaluate

    torch.manual_seed(config["seed"])
    net = create_model(config["student"]).eval().to(config["device"])
    prompts = [
        f"Ultrasound image of fetal structure number {i}." for i in range(config["prompt_count"])
    ]
    one = data.tokenize(prompts[:1], context_length=net.context_length).to(config["device"])
    flops = count_flops(net.encode_text, one)
    evaluate.encode_prompts(net, prompts[: evaluate.PROMPT_BATCH], config["device"])  # warm-up
    seconds = wall_seconds(evaluate.encode_prompts, net, prompts, config["device"], "prompts")
    figures = dict(
        prompts=len(prompts),
        context=net.context_length,
        seconds=seconds,
        prompts_per_s=len(prompts) / seconds,
        flops_per_prompt=flops,
        matmul_flops_per_s=matmul_flops_per_s(config["device"]),
    )
    figures["classes_10000_minutes"] = 10_000 / figures["prompts_per_s"] / 60
    figures["floor_10000_minutes"] = 10_000 * flops / figures["matmul_flops_per_s"] / 60
    print_prompts(figures, config)
    return figures


def matmul_flops_per_s(device, size=2048, runs=10):
    """This machine's fp32 matrix-multiply rate in FLOPs/s: the best of `runs` products of two size x size
    matrices, after one untimed one."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)

    def product():
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()

    product()
    return 2 * size**3 / min(wall_seconds(product) for _ in range(runs))


def print_prompts(figures, config):
    f = figures
    efficiency = f["prompts_per_s"] * f["flops_per_prompt"] / f["matmul_flops_per_s"]
    print(
        f"class prompts, {config['student']}'s text tower on {config['device']}, {torch.get_num_threads()} "
        f"threads: {f['prompts']} prompts at {f['context']} tokens in {f['seconds']:.1f} s = "
        f"{f['prompts_per_s']:.1f} prompts/s | {f['flops_per_prompt'] / 1e9:.2f} GFLOP a prompt, "
        f"{efficiency:.0%} of this CPU's matrix-multiply rate ({f['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s) | "
        f"10,000 one-prompt classes: {f['classes_10000_minutes']:.1f} min at this rate, "
        f"{f['floor_10000_minutes']:.1f} min at the matrix-multiply rate (the fp32 floor)"
    )


# ------------------------------------------------------------------ predict.py on a cine loop


def bench_predict(config):
    """predict.py end to end on a cine loop (--cine: the demo's DICOM sweep by default) with the real-size
    student (--student, random weights saved as a checkpoint), in this process (imports timed apart, in a
    fresh interpreter): the first run into an empty cache folder (its prompts encoded, its ONNX encoder
    exported), the second run (both read back), and the steady-state frames/s of its frames loop (scans.py
    reading in a thread, the encoder as predict.py runs it, the zero-shot heads and GA): the median of three
    passes after one warm-up pass; beside them, in the same run, the eager student's image encoder alone at
    batch 32 (predict.py's path before the ONNX encoder) on random images, the best of three; and the ONNX
    encoder alone at batch 8, its FLOPs a frame and the FLOPs/s that makes, beside torch's fp32 matrix
    multiply on this machine (the text tower's floor in bench_prompts)."""
    import predict
    from model import load_model
    from tools import scans

    found, _, skipped = scans.find([config["cine"]])
    if skipped or not found:
        raise FileNotFoundError(
            f"--cine={config['cine']}: {skipped[0][1] if skipped else 'no scan'} (python -m tools.synthetic)"
        )
    with tempfile.TemporaryDirectory() as folder:
        ckpt = random_checkpoint(config["student"], config["seed"], folder)
        arguments = [ckpt, config["cine"], f"--out_dir={folder}/out", f"--cache_dir={folder}/cache"]
        arguments += [f"--device={config['device']}"]
        arguments += [f"--batch_size={config['batch_size']}"] if config["batch_size"] else []
        first, second = wall_seconds(predict.main, arguments), wall_seconds(predict.main, arguments)
        settings = configurator.configure(
            dict(predict.DEFAULTS), arguments, positional="ckpt", rest="paths"
        )
        net, sha256 = load_model(ckpt).to(config["device"]), configurator.file_sha256(ckpt)
        classifier = predict.make_classifier(net, settings, config["device"], sha256)
        predict.classify_scans(classifier, found, settings)  # warm-up
        passes = [
            frames_per_s(predict.classify_scans, classifier, found, settings) for _ in range(3)
        ]
        exported = sorted(Path(folder, "cache").rglob("*.onnx"))  # none where onnxruntime is absent
        encoder_alone = onnx_frames_per_s(exported[0], net.image_size) if exported else 0.0
    frames, steady = passes[0][0], statistics.median(rate for _, rate in passes)
    eager = eager_frames_per_s(net, config["device"], batch=32, runs=3)
    one_image = torch.zeros(1, 3, net.image_size, net.image_size, device=config["device"])
    figures = dict(
        imports_seconds=import_seconds("predict"),
        first_run_seconds=first,
        second_run_seconds=second,
        frames=frames,
        batch_size=settings["batch_size"],
        frames_per_s=steady,
        eager_batch32_frames_per_s=eager,
        onnx_encoder_batch8_frames_per_s=encoder_alone,
        encoder_flops_per_frame=count_flops(reparameterize(net).encode_image, one_image),
        matmul_flops_per_s=matmul_flops_per_s(config["device"]),
    )
    print_predict(figures, config)
    return figures


def onnx_frames_per_s(path, image_size, batch=8, runs=3):
    """predict.py's ONNX encoder file alone at `batch` on random images, the best of `runs` after one untimed."""
    from export import onnx_session

    images = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size))
    feed = {"image": images.astype(np.float32)}
    session = onnx_session(path)
    session.run(None, feed)
    return batch / min(wall_seconds(session.run, None, feed) for _ in range(runs))


def random_checkpoint(name, seed, folder):
    torch.manual_seed(seed)
    path = os.path.join(folder, f"{name}.pt")
    torch.save({"model": create_model(name).state_dict(), "model_name": name}, path)
    return path


def wall_seconds(call, *arguments):
    start = time.perf_counter()
    call(*arguments)
    return time.perf_counter() - start


def frames_per_s(classify_scans, *arguments):
    """One pass of predict.py's frames loop -> (frames, frames per second)."""
    start = time.perf_counter()
    frames = len(classify_scans(*arguments)[0])
    return frames, frames / (time.perf_counter() - start)


def import_seconds(module):
    """Seconds a fresh interpreter takes to import `module` (the start-up a user waits before anything runs)."""
    code = f"import time; start = time.perf_counter(); import {module}; print(time.perf_counter() - start)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


@torch.no_grad()
def eager_frames_per_s(net, device, batch, runs=2):
    """The model as trained, its image encoder alone on random images: the best of `runs` after one warm-up."""
    images = torch.randn(batch, 3, net.image_size, net.image_size, device=device)
    net.encode_image(images)
    return batch / min(wall_seconds(net.encode_image, images) for _ in range(runs))


def print_predict(figures, config):
    f = figures
    print(
        f"predict.py, {config['student']} on {config['device']}, {torch.get_num_threads()} threads, "
        f"{f['frames']} frames of {config['cine']}: imports {f['imports_seconds']:.1f} s | first run "
        f"{f['first_run_seconds']:.1f} s | second run {f['second_run_seconds']:.1f} s "
        f"({f['second_run_seconds'] / f['first_run_seconds']:.2f}x) | steady state {f['frames_per_s']:.1f} "
        f"frames/s at batch {f['batch_size']} | eager encoder alone at batch 32 "
        f"{f['eager_batch32_frames_per_s']:.1f} frames/s ({f['frames_per_s'] / f['eager_batch32_frames_per_s']:.2f}x)"
    )
    alone = f["onnx_encoder_batch8_frames_per_s"]
    if alone:
        flop_rate = alone * f["encoder_flops_per_frame"]
        print(
            f"predict.py's ONNX encoder alone, batch 8: {alone:.1f} frames/s at "
            f"{f['encoder_flops_per_frame'] / 1e9:.2f} GFLOP a frame = {flop_rate / 1e9:.0f} GFLOP/s "
            f"(torch's fp32 matrix multiply on this CPU: {f['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s)"
        )


# ------------------------------------------------------------------ command line


def machine():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            )
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return dict(
        cpu=cpu, cores=os.cpu_count(), load_average=os.getloadavg(), torch=torch.__version__
    )


BENCHMARKS = dict(
    step=bench_step,
    loader=bench_loader,
    latency=bench_latency,
    hc18=bench_hc18,
    prompts=bench_prompts,
    predict=bench_predict,
)


def main(arguments):
    config = configurator.configure(dict(DEFAULTS), arguments)
    chosen = config["benchmarks"].split(",")
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown or config["steps"] < 1 or config["runs"] < 1:
        raise SystemExit(
            f"--benchmarks: expected names from {list(BENCHMARKS)} (got {unknown}); --steps and --runs "
            "must be at least 1"
        )
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    results = {"machine": machine(), "config": config}
    for name in chosen:
        print(f"== {name}")
        with configurator.user_errors(f"bench.py {name}"):
            results[name] = BENCHMARKS[name](config)
    results["machine"]["load_average_after"] = os.getloadavg()
    Path(config["out_dir"]).mkdir(parents=True, exist_ok=True)
    path = Path(config["out_dir"]) / "bench.json"
    configurator.write_atomic(path, json.dumps(results, indent=1))
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
