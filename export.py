"""A deployable student (Core ML and ONNX) and the inference-efficiency table (paper Table 2).

    python export.py                                # out/best.pt -> export/: image encoder + zero-shot head
    python export.py ckpt.pt --model=mobilefetalclip --text=True --out_dir=export_s0
    python export.py --bench --bench_threads=1      # Table 2 on this machine -> export/bench.json

Export: fuse FastViT's branches (timm's reparameterisation, checked against the model as trained), then write
    image_encoder.{mlpackage,onnx}  image (B, 3, S, S), normalised -> image_features (B, D), L2-normalised
    zero_shot.{mlpackage,onnx}      image -> plane_probs (B, 9), brain_probs (B, 3), image_features (B, D):
                                    softmax(100 * img @ cls.T), evaluate.py's class embeddings baked in
    text_encoder.{mlpackage,onnx}   (--text=True) tokens (B, L) from data.tokenize -> text_features (B, D)
Core ML: ML program, fp16 compute, iOS 17+, batch 1, float32 in and out (int32 tokens); Linux cannot run it,
so its spec is checked (macOS also runs it). ONNX: opset 17, dynamic batch, onnx.checker, onnxruntime vs
PyTorch. Sidecar <file>.json: file, format, model, source_checkpoint, input {name, shape, dtype, image_size,
mean, std, preprocessing | tokenizer}, outputs [{name, shape, dtype, classes}], reparameterisation_max_abs_diff,
parity {reference, max_abs_diff, tolerance | note}, versions.
Bench: models built by name with random weights (latency and FLOPs do not depend on them); image-encoder
parameters, FLOPs by torch's FlopCounterMode (MACs = FLOPs / 2), batch-1 latency (warm-up, median of
bench_runs calls, fixed threads, inference mode): teacher, student as trained, reparameterised, onnxruntime.
"""
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import evaluate
import model as model_lib

# ----------------------------------------------------------------------------- config
ckpt = "out/best.pt"  # student checkpoint (the demo's best by default); the only positional argument
model = ""  # model.py name; '' = the name the checkpoint stores (or guessed from its keys)
out_dir = "export"  # exported files, sidecars and bench.json
coreml = True  # write .mlpackage files
onnx = True  # write .onnx files
zero_shot_head = True  # also export the encoder with the plane / brain sub-plane classifiers baked in
text = False  # also export the text encoder (on-device prompts)
allow_teacher = False  # export a teacher (fetalclip, demo_teacher) too; refused by default
tolerance = 1e-3  # max abs difference allowed on L2-normalised features (reparameterisation, ONNX)
# bench
bench = False  # measure Table 2 instead of exporting
bench_student = "mobilefetalclip"  # model.py names, random weights
bench_teacher = "fetalclip"
bench_runs = 50  # timed batch-1 calls per row; the median is reported
bench_warmup = 5  # untimed calls first
bench_threads = -1  # torch / onnxruntime intra-op threads; -1 = os.cpu_count()
bench_onnx = True  # also time the student and the teacher through onnxruntime

CONFIG_KEYS = ("ckpt", "model", "out_dir", "coreml", "onnx", "zero_shot_head", "text", "allow_teacher", "tolerance",
               "bench", "bench_student", "bench_teacher", "bench_runs", "bench_warmup", "bench_threads", "bench_onnx")
TEACHERS = ("fetalclip", "demo_teacher")
ONNX_OPSET = 17
FORMATS = {"coreml": "Core ML ML program, fp16 compute, iOS 17+", "onnx": f"ONNX opset {ONNX_OPSET}"}
# Paper Table 2: Core ML fp16, batch 1, iPhone 16 Pro (image encoders)
PAPER = {"student": {"gmacs": 1.2, "latency_ms": 1.6}, "teacher": {"gmacs": 38.9, "latency_ms": 37.6}}

# ----------------------------------------------------------------------------- what gets exported


class ImageEncoder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.visual = net.visual

    def forward(self, image):  # (B, 3, S, S) normalised -> (B, D) unit norm
        return F.normalize(self.visual(image), dim=-1)


class ZeroShotHead(nn.Module):
    """The image encoder and the prompt-averaged class embeddings (SPEC 4): one call, plane probabilities."""

    def __init__(self, net, plane_embeddings, brain_embeddings):
        super().__init__()
        self.encoder = ImageEncoder(net)
        self.register_buffer("plane_embeddings", plane_embeddings.clone())  # (9, D)
        self.register_buffer("brain_embeddings", brain_embeddings.clone())  # (3, D)

    def forward(self, image):
        image_features = self.encoder(image)  # (B, D)
        plane_probs = (100.0 * image_features @ self.plane_embeddings.T).softmax(-1)  # (B, 9)
        brain_probs = (100.0 * image_features @ self.brain_embeddings.T).softmax(-1)  # (B, 3)
        return plane_probs, brain_probs, image_features


class TextEncoder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.text = net.text

    def forward(self, tokens):  # (B, L) token ids -> (B, D) unit norm
        return F.normalize(self.text(tokens), dim=-1)


def export_jobs(net, fused, zero_shot=True, text=False):
    """[(stem, module to export, the same computed by the model as trained, example input, input name,
    output names, class names per output)]. Class embeddings come from evaluate.py's own functions."""
    images = example_images(net)
    jobs = [("image_encoder", ImageEncoder(fused), ImageEncoder(net), images, "image", ["image_features"], {})]
    if zero_shot:
        with torch.no_grad():
            planes = evaluate.class_embeddings(net, evaluate.PROMPTS["five_planes"])  # (9, D)
            brain = evaluate.class_embeddings(net, evaluate.PROMPTS["brain_subplanes"])  # (3, D)
        classes = {"plane_probs": evaluate.FIVE_PLANES, "brain_probs": evaluate.BRAIN_SUBPLANES}
        jobs.append(("zero_shot", ZeroShotHead(fused, planes, brain), ZeroShotHead(net, planes, brain), images,
                     "image", ["plane_probs", "brain_probs", "image_features"], classes))
    if text:
        prompts = [p for class_prompts in evaluate.PROMPTS["five_planes"].values() for p in class_prompts][:4]
        tokens = data.tokenize(prompts, context_length=net.context_length)  # (4, L)
        jobs.append(("text_encoder", TextEncoder(fused), TextEncoder(net), tokens, "tokens", ["text_features"], {}))
    return jobs

# ----------------------------------------------------------------------------- loading and parity


def load_student(path, name="", allow_teacher=False):
    """The model a checkpoint holds; a teacher is refused before its weights are built."""
    checkpoint = model_lib.read_checkpoint(path)  # names the file when missing or unreadable
    name = name or checkpoint.get("model_name", "") or model_lib.guess_model_name(checkpoint)
    if name not in model_lib.MODEL_CONFIGS:
        raise ValueError(f"unsupported model {name!r} (from --model or {path}); "
                         f"expected one of {sorted(model_lib.MODEL_CONFIGS)}")
    if name in TEACHERS and not allow_teacher:
        raise ValueError(f"{path} holds the teacher {name!r}, but export.py deploys a student "
                         f"(e.g. out/best.pt, model demo_student or mobilefetalclip); "
                         f"pass --allow_teacher=True to export a teacher anyway")
    return model_lib.load_model(path, name).eval()


def max_abs_diff(outputs, references):
    """Largest |a - b| over lists of arrays / tensors (a batch-1 output is compared with row 0)."""
    return max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)[:len(a)]).max())
               for a, b in zip(outputs, references))


def example_images(net, batch=2, seed=0):
    return torch.randn(batch, 3, net.image_size, net.image_size, generator=torch.Generator().manual_seed(seed))


def reparameterisation_error(net, fused, batch=2, seed=0):
    """Max abs difference of the L2-normalised image features, fused vs as trained."""
    images = example_images(net, batch, seed)
    with torch.inference_mode():
        return max_abs_diff([ImageEncoder(net)(images)], [ImageEncoder(fused)(images)])


def check(error, what, tol):
    if not error <= tol:  # also catches NaN
        raise ValueError(f"{what}: max abs difference {error:.3g} exceeds --tolerance={tol:g}")
    return error

# ----------------------------------------------------------------------------- writers


def export_onnx(module, inputs, path, input_name, output_names, dynamic_batch=True):
    """ONNX (TorchScript exporter: the dynamo one needs onnxscript), checked by onnx."""
    import onnx as onnx_lib
    axes = {n: {0: "batch"} for n in [input_name] + output_names} if dynamic_batch else None
    with warnings.catch_warnings():  # the legacy-exporter notice and advanced-indexing note are expected
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (inputs,), str(path), input_names=[input_name], output_names=output_names,
                          dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)
    onnx_lib.checker.check_model(str(path))
    return path


def onnx_session(path, threads=0):
    """A CPU onnxruntime session; threads=0 lets onnxruntime choose."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def register_alias_as_noop():
    """torch.export keeps aten.alias (a causal text mask sliced to its full length); coremltools 9 maps
    alias_copy, clone, detach... to its no-op converter but not alias."""
    from coremltools.converters.mil.frontend.torch import ops, register_torch_op, torch_op_registry
    if torch_op_registry._TORCH_OPS_REGISTRY.get_func("alias") is None:
        def alias(context, node):
            ops.noop(context, node)
        register_torch_op(alias)


def export_coreml(module, inputs, path, input_name, output_names):
    """ML program, fp16 compute, iOS 17, batch 1, from torch.export (torch.jit.trace fails with coremltools 9)."""
    import coremltools as ct
    register_alias_as_noop()
    example = inputs[:1]
    dtype = np.int32 if example.dtype == torch.long else np.float32
    program = torch.export.export(module.eval(), (example,)).run_decompositions({})
    with warnings.catch_warnings():  # coremltools' own use of its deprecated registry API, once per op
        warnings.simplefilter("ignore", DeprecationWarning)
        converted = ct.convert(program, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                               minimum_deployment_target=ct.target.iOS17,
                               inputs=[ct.TensorType(name=input_name, shape=tuple(example.shape), dtype=dtype)],
                               outputs=[ct.TensorType(name=n, dtype=np.float32) for n in output_names])
    converted.save(str(path))
    return path


def coreml_output_shapes(path, input_name, output_names):
    """{output: shape} from the saved spec (loads on Linux too), after checking its input / output names."""
    import coremltools as ct
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    inputs = [i.name for i in spec.description.input]
    outputs = {o.name: list(o.type.multiArrayType.shape) for o in spec.description.output}
    if inputs != [input_name] or list(outputs) != output_names:
        raise ValueError(f"{path}: spec has inputs {inputs} and outputs {list(outputs)}, "
                         f"expected [{input_name!r}] and {output_names}")
    return outputs


def run_coreml(path, input_name, inputs):
    """Core ML predictions, on Apple platforms only (coremltools has no runtime for Linux): [arrays]."""
    import coremltools as ct
    prediction = ct.models.MLModel(str(path)).predict({input_name: inputs[:1].numpy().astype(np.float32)})
    return [np.asarray(v) for v in prediction.values()]

# ----------------------------------------------------------------------------- export


def versions():
    import onnxruntime
    out = {"torch": torch.__version__, "timm": model_lib.timm.__version__, "onnxruntime": onnxruntime.__version__}
    if "coremltools" in sys.modules:  # imported only when a Core ML file is written (slow, noisy import)
        out["coremltools"] = sys.modules["coremltools"].__version__
    return out


def input_info(net, name, shape):
    if name == "tokens":
        return {"name": name, "shape": shape, "dtype": "int64 (onnx) | int32 (coreml)",
                "tokenizer": f"data.tokenize(texts, context_length={net.context_length}): CLIP BPE "
                             "(bpe_simple_vocab_16e6.txt.gz), start 49406, end 49407, pad 0, lower-cased"}
    return {"name": name, "shape": shape, "dtype": "float32", "layout": "NCHW, RGB", "image_size": net.image_size,
            "mean": list(net.image_mean), "std": list(net.image_std),
            "preprocessing": f"data.eval_transform: pad to square (black, centred), resize {net.image_size} "
                             f"bicubic, centre crop {net.image_size}, /255, (x - mean) / std"}


def write_file(fmt, path, module, inputs, input_name, output_names):
    """One exported file -> (output shapes, its outputs on `inputs`, or None where it cannot run here)."""
    if fmt == "onnx":
        export_onnx(module, inputs, path, input_name, output_names)
        outputs = onnx_session(path, torch.get_num_threads()).run(None, {input_name: inputs.numpy()})
        return {n: ["batch"] + list(o.shape[1:]) for n, o in zip(output_names, outputs)}, outputs
    export_coreml(module, inputs, path, input_name, output_names)
    shapes = coreml_output_shapes(path, input_name, output_names)
    return shapes, run_coreml(path, input_name, inputs) if sys.platform == "darwin" else None


def export(net, source, folder, formats=("coreml", "onnx"), zero_shot=True, text=False, tol=1e-3):
    """Reparameterise, check, write each file with its sidecar -> [paths]."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    fused = model_lib.reparameterize(net)
    reparam_error = check(reparameterisation_error(net, fused), "reparameterised vs as trained", tol)
    print(f"reparameterised {net.name}: {sum(p.numel() for p in net.visual.parameters()):,} -> "
          f"{sum(p.numel() for p in fused.visual.parameters()):,} image parameters, "
          f"max abs diff {reparam_error:.2e} on normalised features")
    written = []
    for stem, module, trained, inputs, input_name, output_names, classes in export_jobs(net, fused, zero_shot, text):
        with torch.inference_mode():
            reference = trained(inputs)
        reference = [reference] if torch.is_tensor(reference) else list(reference)
        for fmt in formats:
            path = Path(folder) / f"{stem}.{'mlpackage' if fmt == 'coreml' else 'onnx'}"
            shapes, outputs = write_file(fmt, path, module, inputs, input_name, output_names)
            parity = {"reference": "PyTorch, the model as trained (before reparameterisation), same inputs",
                      "max_abs_diff": None if outputs is None else max_abs_diff(outputs, reference)}
            if fmt == "onnx":
                check(parity["max_abs_diff"], f"{path} vs PyTorch", tol)
                parity["tolerance"] = tol
            elif outputs is None:
                parity["note"] = "not run: Core ML executes on Apple platforms only; its spec was checked"
            shape = list(inputs[:1].shape) if fmt == "coreml" else ["batch"] + list(inputs.shape[1:])
            sidecar = {"file": path.name, "format": FORMATS[fmt], "model": net.name, "source_checkpoint": str(source),
                       "input": input_info(net, input_name, shape),
                       "outputs": [dict(name=n, shape=shapes[n], dtype="float32", **(
                           {"classes": classes[n]} if n in classes else {})) for n in output_names],
                       "reparameterisation_max_abs_diff": reparam_error, "parity": parity, "versions": versions()}
            Path(f"{path}.json").write_text(json.dumps(sidecar, indent=1))
            written.append(path)
            print(f"wrote {path} (+ .json) | " + (f"max abs diff vs PyTorch {parity['max_abs_diff']:.2e}"
                                                    if outputs is not None else "spec checked, not run (Linux)"))
    return written

# ----------------------------------------------------------------------------- bench (Table 2)


def count_flops(module, inputs):
    """FLOPs of one call (a multiply-add counts 2). torch's counter has no formula for the CPU kernel of
    scaled_dot_product_attention (timm's fused attention), so it gets the same formula as the GPU kernels."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                     lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)}
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention)
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


def bench_encoders(student_name, teacher_name):
    """[(row, model name, image encoder)]: the teacher, the student as trained and reparameterised."""
    torch.manual_seed(0)
    teacher, student = (model_lib.create_model(name).eval() for name in (teacher_name, student_name))
    return [("teacher as trained", teacher_name, ImageEncoder(teacher)),
            ("student as trained", student_name, ImageEncoder(student)),
            ("student reparameterised", student_name, ImageEncoder(model_lib.reparameterize(student)))]


def bench_rows(student_name, teacher_name, runs=50, warmup=5, threads=1, with_onnx=True):
    """Table 2 rows [{row, model, runtime, params, flops, macs, latency_ms, teacher_over_row}], batch 1, CPU.
    onnxruntime times the deployable graphs: the teacher and the reparameterised student."""
    torch.set_num_threads(threads)
    rows = []
    for label, name, encoder in bench_encoders(student_name, teacher_name):
        size = model_lib.MODEL_CONFIGS[name]["image_size"]
        images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        row = {"row": label, "model": name, "params": sum(p.numel() for p in encoder.parameters()),
               "flops": count_flops(encoder, images)}
        row["macs"] = row["flops"] // 2
        with torch.inference_mode():
            rows.append(dict(row, runtime="pytorch", latency_ms=latency_ms(lambda: encoder(images), warmup, runs)))
        if with_onnx and label != "student as trained":
            with tempfile.TemporaryDirectory() as folder:  # fixed batch 1, as the Core ML file
                path = export_onnx(encoder, images, Path(folder) / "encoder.onnx", "image", ["image_features"],
                                   dynamic_batch=False)
                session, feed = onnx_session(path, threads), {"image": images.numpy()}
                rows.append(dict(row, runtime="onnxruntime",
                                 latency_ms=latency_ms(lambda: session.run(None, feed), warmup, runs)))
        print(f"  timed {label}: " + ", ".join(f"{r['runtime']} {r['latency_ms']['median']:.1f} ms"
                                               for r in rows if r["row"] == label))
    for row in rows:  # teacher / row on the same runtime: > 1 means the row is smaller or faster
        teacher = next(r for r in rows if r["row"] == "teacher as trained" and r["runtime"] == row["runtime"])
        row["teacher_over_row"] = {k: teacher[k] / row[k] for k in ("params", "flops")}
        row["teacher_over_row"]["latency"] = teacher["latency_ms"]["median"] / row["latency_ms"]["median"]
    return rows


def format_bench(rows, machine):
    lines = [f"Image encoders, batch 1, {machine['threads']} thread(s), {machine['cores']} cores ({machine['cpu']}), "
             f"load average {machine['load_before'][0]:.1f} before, {machine['load_after'][0]:.1f} after",
             f"{'':<24}{'runtime':<12}{'params':>12}{'GFLOPs':>8}{'GMACs':>7}{'ms median':>11}{'p10-p90':>16}"
             f"   teacher/row: params FLOPs latency"]
    for r in rows:
        ratio, ms = r["teacher_over_row"], r["latency_ms"]
        lines.append(f"{r['row']:<24}{r['runtime']:<12}{r['params']:>12,}{r['flops'] / 1e9:>8.2f}"
                     f"{r['macs'] / 1e9:>7.2f}{ms['median']:>11.1f}{ms['p10']:>8.1f}-{ms['p90']:<7.1f}"
                     f"{ratio['params']:>22.1f}{ratio['flops']:>6.1f}{ratio['latency']:>8.1f}")
    fastest = min((r for r in rows if r["row"].startswith("student")), key=lambda r: r["latency_ms"]["median"])
    teacher = rows[0]  # teacher as trained, PyTorch
    lines.append(f"fastest student ({fastest['row']}, {fastest['runtime']}) vs teacher (pytorch): "
                 f"{teacher['latency_ms']['median'] / fastest['latency_ms']['median']:.1f}x")
    s, t = PAPER["student"], PAPER["teacher"]
    lines.append(f"paper (Core ML fp16, iPhone 16 Pro): student {s['gmacs']} GMACs {s['latency_ms']} ms, teacher "
                 f"{t['gmacs']} GMACs {t['latency_ms']} ms: {t['gmacs'] / s['gmacs']:.1f}x MACs, "
                 f"{t['latency_ms'] / s['latency_ms']:.1f}x latency")
    return "\n".join(lines)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_bench(config):
    """Time, print and write out_dir/bench.json (rows, machine, versions, the paper's figures, config)."""
    threads = config["bench_threads"] if config["bench_threads"] > 0 else os.cpu_count()
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
               "load_before": os.getloadavg()}
    rows = bench_rows(config["bench_student"], config["bench_teacher"], config["bench_runs"], config["bench_warmup"],
                      threads, config["bench_onnx"])
    machine["load_after"] = os.getloadavg()
    print(format_bench(rows, machine))
    Path(config["out_dir"]).mkdir(parents=True, exist_ok=True)
    path = Path(config["out_dir"]) / "bench.json"
    path.write_text(json.dumps({"rows": rows, "machine": machine, "versions": versions(), "batch": 1,
                                "paper_iphone16pro": PAPER, "config": config}, indent=1))
    print(f"wrote {path}")
    return rows

# ----------------------------------------------------------------------------- command line


def main(argv=None):
    defaults = globals()  # the config section's values
    config = data.apply_overrides({k: defaults[k] for k in CONFIG_KEYS}, sys.argv[1:] if argv is None else argv,
                                  positional="ckpt")
    try:
        if config["bench"]:
            for key in ("bench_student", "bench_teacher"):
                if config[key] not in model_lib.MODEL_CONFIGS:
                    raise ValueError(f"--{key}={config[key]}: unsupported model; expected one of "
                                     f"{sorted(model_lib.MODEL_CONFIGS)}")
            if config["bench_runs"] < 1 or config["bench_warmup"] < 0:
                raise ValueError(f"--bench_runs={config['bench_runs']} must be >= 1 (the paper's protocol: >= 50) "
                                 f"and --bench_warmup={config['bench_warmup']} >= 0")
            return run_bench(config)
        formats = [f for f in ("coreml", "onnx") if config[f]]
        if not formats:
            raise ValueError("nothing to write: --coreml=False and --onnx=False")
        net = load_student(config["ckpt"], config["model"], config["allow_teacher"])
        return export(net, config["ckpt"], config["out_dir"], formats, config["zero_shot_head"], config["text"],
                      config["tolerance"])
    except FileNotFoundError as error:
        raise SystemExit(f"export.py: {error} (train a student with `python train.py`, or pass CKPT)") from None
    except ValueError as error:
        raise SystemExit(f"export.py: {error}") from None


if __name__ == "__main__":
    main()
