"""A deployable student: Core ML and ONNX files of its image encoder, zero-shot head and text encoder, and int8 ones.

    python export.py                                # out/best.pt -> export/: image encoder + zero-shot head
    python export.py mobile_fetal_clip_weights.pt --text=True --out_dir=export_s0
    python -m tools.quantize                        # the same files + int8 copies of the image encoder
    python -m tools.bench --benchmarks=latency            # their latency next to the paper's Table 2

Export: fuse FastViT's branches (timm's reparameterisation, checked against the model as trained), then write
    image_encoder.{mlpackage,onnx}  image (B, 3, S, S), normalised -> image_features (B, D), L2-normalised
    zero_shot.{mlpackage,onnx}      image -> plane_probs (B, 9), brain_probs (B, 3), image_features (B, D):
                                    softmax(100 * img @ cls.T), evaluate.py's class embeddings baked in
    text_encoder.{mlpackage,onnx}   (--text=True) tokens (B, L) from data.tokenize -> text_features (B, D)
Core ML: ML program, fp16 compute, iOS 17+, batch 1, float32 in and out (int32 tokens); Linux cannot run it,
so its spec is checked (macOS also runs it). ONNX: opset 17, dynamic batch, onnx.checker, onnxruntime vs
PyTorch. A file replaces the old one only once written and checked. Sidecar <file>.json: file, format, model,
source_checkpoint, input {name, shape, dtype, image_size, mean, std, preprocessing | tokenizer}, outputs [{name,
shape, dtype, classes}], reparameterisation_max_abs_diff, parity {reference, max_abs_diff, tolerance | note}, versions.
"""

import contextlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import configurator
import data
import evaluate
import protocol
from model import held_model_name, load_model, read_checkpoint, reparameterize

# ------------------------------------------------------------------ settings: --key=value, read by main()
DEFAULTS = {
    "ckpt": "out/best.pt",  # student checkpoint (the demo's best by default): the one positional argument
    "model": "",  # model.py name; '' = the name the checkpoint stores (or the one its keys show)
    "out_dir": "export",  # exported files and their JSON sidecars
    "coreml": True,  # write .mlpackage files
    "onnx": True,  # write .onnx files
    "zero_shot_head": True,  # also export the encoder with the plane / brain sub-plane classifiers baked in
    "text": False,  # also export the text encoder (on-device prompts)
    "allow_teacher": False,  # export a teacher (fetalclip, demo_teacher) too; refused by default
    "tolerance": 1e-3,  # max abs difference allowed on L2-normalised features (reparameterisation, ONNX)
}

TEACHERS = ("fetalclip", "demo_teacher")
ONNX_OPSET = 17
FORMATS = {
    "coreml": "Core ML ML program, fp16 compute, iOS 17+",
    "onnx": f"ONNX opset {ONNX_OPSET}",
}
EXTENSIONS = {"coreml": "mlpackage", "onnx": "onnx"}

# ------------------------------------------------------------------ what gets exported


class ImageEncoder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.visual = net.visual

    def forward(self, image):  # (B, 3, S, S) normalised -> (B, D) unit norm
        return F.normalize(self.visual(image), dim=-1)


class ZeroShotHead(nn.Module):
    """The image encoder and the protocol's prompt-averaged class embeddings: one call, plane probabilities."""

    def __init__(self, net, plane_embeddings, brain_embeddings):
        super().__init__()
        self.encoder = ImageEncoder(net)
        self.register_buffer("plane_embeddings", plane_embeddings.clone())  # (9, D)
        self.register_buffer("brain_embeddings", brain_embeddings.clone())  # (3, D)

    def forward(self, image):
        image_features = self.encoder(image)  # (B, D)
        # (B, 9)
        plane_probs = (protocol.SCALE * image_features @ self.plane_embeddings.T).softmax(-1)
        # (B, 3)
        brain_probs = (protocol.SCALE * image_features @ self.brain_embeddings.T).softmax(-1)
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
    jobs = [
        (
            "image_encoder",
            ImageEncoder(fused),
            ImageEncoder(net),
            images,
            "image",
            ["image_features"],
            {},
        )
    ]
    if zero_shot:
        with torch.no_grad():
            planes = evaluate.class_embeddings(net, protocol.PROMPTS["five_planes"])  # (9, D)
            brain = evaluate.class_embeddings(net, protocol.PROMPTS["brain_subplanes"])  # (3, D)
        classes = {"plane_probs": protocol.FIVE_PLANES, "brain_probs": protocol.BRAIN_SUBPLANES}
        jobs.append(
            (
                "zero_shot",
                ZeroShotHead(fused, planes, brain),
                ZeroShotHead(net, planes, brain),
                images,
                "image",
                ["plane_probs", "brain_probs", "image_features"],
                classes,
            )
        )
    if text:
        prompts = [
            p for class_prompts in protocol.PROMPTS["five_planes"].values() for p in class_prompts
        ][:4]
        tokens = data.tokenize(prompts, context_length=net.context_length)  # (4, L)
        jobs.append(
            (
                "text_encoder",
                TextEncoder(fused),
                TextEncoder(net),
                tokens,
                "tokens",
                ["text_features"],
                {},
            )
        )
    return jobs


# ------------------------------------------------------------------ loading and parity


def load_student(path, name="", allow_teacher=False):
    """The model a checkpoint holds; a teacher is refused before its weights are built."""
    checkpoint = read_checkpoint(path)  # names the file when missing or unreadable
    name = name or held_model_name(path, checkpoint)
    if name in TEACHERS and not allow_teacher:
        raise ValueError(
            f"{path} holds the teacher {name!r}, but export.py deploys a student (e.g. out/best.pt, "
            "model demo_student or mobilefetalclip); pass --allow_teacher=True to export a teacher anyway"
        )
    return load_model(path, name, checkpoint).eval()


def max_abs_diff(outputs, references):
    """Largest |a - b| over lists of arrays / tensors (a batch-1 output is compared with row 0)."""
    return max(
        float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)[: len(a)]).max())
        for a, b in zip(outputs, references)
    )


def example_images(net, batch=2, seed=0):
    return torch.randn(
        batch, 3, net.image_size, net.image_size, generator=torch.Generator().manual_seed(seed)
    )


def reparameterisation_error(net, fused, batch=2, seed=0):
    """Max abs difference of the L2-normalised image features, fused vs as trained."""
    images = example_images(net, batch, seed)
    with torch.inference_mode():
        return max_abs_diff([ImageEncoder(net)(images)], [ImageEncoder(fused)(images)])


def check(error, what, tol):
    if not error <= tol:  # also catches NaN
        raise ValueError(f"{what}: max abs difference {error:.3g} exceeds --tolerance={tol:g}")
    return error


# ------------------------------------------------------------------ writers


def export_onnx(module, inputs, path, input_name, output_names, dynamic_batch=True, verify=None):
    """ONNX (TorchScript exporter: the dynamo one needs onnxscript), checked by onnx and by verify(file), if
    given, before it replaces `path` -> path."""
    import onnx

    axes = {n: {0: "batch"} for n in [input_name] + output_names} if dynamic_batch else None
    with configurator.atomic_path(path) as tmp, warnings.catch_warnings(), unfused_attention():
        # the legacy-exporter notice and advanced-indexing note are expected
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (inputs,),
            tmp,
            input_names=[input_name],
            output_names=output_names,
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
        onnx.checker.check_model(tmp)
        if verify:
            verify(tmp)
    return path


@contextlib.contextmanager
def unfused_attention():
    """nn.MultiheadAttention in eval mode without a mask (the student's text tower) runs as one fused op,
    aten::_native_multi_head_attention, which the ONNX exporter cannot convert (torch.export, for Core ML,
    traces the plain path itself): the plain path while a model is exported, then back as it was."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def onnx_session(path, threads=0):
    """A CPU onnxruntime session; threads=0 lets onnxruntime choose. It optimises the graph for this CPU: on
    x86 the convolutions and the elementwise ops between them (FastViT's GELUs included) run in its blocked
    NCHWc layout."""
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
    """ML program, fp16 compute, iOS 17, batch 1, from torch.export (torch.jit.trace fails with coremltools
    9), its spec checked before it replaces `path` -> {output: shape}. Weights coremltools.optimize.torch
    compressed stay so."""
    import coremltools as ct

    register_alias_as_noop()
    example = inputs[:1]
    dtype = np.int32 if example.dtype == torch.long else np.float32
    program = torch.export.export(module.eval(), (example,)).run_decompositions({})
    # coremltools' own use of its deprecated registry API, once per op
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        converted = ct.convert(
            program,
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16,
            minimum_deployment_target=ct.target.iOS17,
            inputs=[ct.TensorType(name=input_name, shape=tuple(example.shape), dtype=dtype)],
            outputs=[ct.TensorType(name=n, dtype=np.float32) for n in output_names],
        )
    with configurator.atomic_path(path) as tmp:
        try:
            converted.save(f"{tmp}.mlpackage")  # coremltools insists on the extension
            os.replace(f"{tmp}.mlpackage", tmp)
        finally:
            shutil.rmtree(f"{tmp}.mlpackage", ignore_errors=True)
        return coreml_output_shapes(tmp, input_name, output_names)


def coreml_output_shapes(path, input_name, output_names):
    """{output: shape} from the saved spec (loads on Linux too), after checking its input / output names."""
    import coremltools as ct

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    inputs = [i.name for i in spec.description.input]
    outputs = {o.name: list(o.type.multiArrayType.shape) for o in spec.description.output}
    if inputs != [input_name] or list(outputs) != output_names:
        raise ValueError(
            f"{path}: spec has inputs {inputs} and outputs {list(outputs)}, "
            f"expected [{input_name!r}] and {output_names}"
        )
    return outputs


def run_coreml(path, input_name, inputs):
    """Core ML predictions, on Apple platforms only (coremltools has no runtime for Linux): [arrays]."""
    import coremltools as ct

    prediction = ct.models.MLModel(str(path)).predict(
        {input_name: inputs[:1].numpy().astype(np.float32)}
    )
    return [np.asarray(v) for v in prediction.values()]


# ------------------------------------------------------------------ export


def versions():
    # imported only when a Core ML file is written
    coreml = ("coremltools",) if "coremltools" in sys.modules else ()
    return configurator.package_versions(("torch", "timm", "onnxruntime", *coreml))


def input_info(net, name, shape):
    if name == "tokens":
        return {
            "name": name,
            "shape": shape,
            "dtype": "int64 (onnx) | int32 (coreml)",
            "tokenizer": f"data.tokenize(texts, context_length={net.context_length}): CLIP BPE "
            f"({os.path.basename(data.BPE_PATH)}), start {data.SOT}, end {data.EOT}, pad 0, lower-cased",
        }
    return {
        "name": name,
        "shape": shape,
        "dtype": "float32",
        "layout": "NCHW, RGB",
        "image_size": net.image_size,
        "mean": list(net.image_mean),
        "std": list(net.image_std),
        "preprocessing": f"data.eval_transform: pad to square (black, centred), resize {net.image_size} "
        f"bicubic, centre crop {net.image_size}, /255, (x - mean) / std",
    }


def sidecar(net, source, path, fmt, inputs, input_name, shapes, classes, reparam_error, **figures):
    """What <file>.json says of one exported file, with `figures` (parity, or the int8 ones)."""
    shape = list(inputs[:1].shape) if fmt == "coreml" else ["batch"] + list(inputs.shape[1:])
    outputs = [
        dict(name=n, shape=s, dtype="float32") | ({"classes": classes[n]} if n in classes else {})
        for n, s in shapes.items()
    ]
    about = dict(
        file=Path(path).name, format=FORMATS[fmt], model=net.name, source_checkpoint=str(source)
    )
    about.update(
        input=input_info(net, input_name, shape),
        outputs=outputs,
        reparameterisation_max_abs_diff=reparam_error,
    )
    return dict(about, **figures, versions=versions())


def write_file(fmt, path, module, inputs, input_name, output_names, reference, tol):
    """One exported file -> (output shapes, parity with `reference`, the model as trained). An ONNX file that
    onnxruntime runs further than `tol` from it never replaces `path`."""
    parity = {"reference": "PyTorch, the model as trained (before reparameterisation), same inputs"}
    if fmt == "onnx":
        shapes = {}

        def verify(written):
            outputs = onnx_session(written, torch.get_num_threads()).run(
                None, {input_name: inputs.numpy()}
            )
            parity.update(
                max_abs_diff=check(max_abs_diff(outputs, reference), f"{path} vs PyTorch", tol)
            )
            shapes.update({n: ["batch"] + list(o.shape[1:]) for n, o in zip(output_names, outputs)})

        export_onnx(module, inputs, path, input_name, output_names, verify=verify)
        return shapes, dict(parity, tolerance=tol)
    shapes = export_coreml(module, inputs, path, input_name, output_names)
    if sys.platform == "darwin":
        return shapes, dict(
            parity, max_abs_diff=max_abs_diff(run_coreml(path, input_name, inputs), reference)
        )
    note = "not run: Core ML executes on Apple platforms only; its spec was checked"
    return shapes, dict(parity, max_abs_diff=None, note=note)


def export(net, source, folder, formats=("coreml", "onnx"), zero_shot=True, text=False, tol=1e-3):
    """Reparameterise, check, write each file with its sidecar -> ([paths], the reparameterised model, its
    largest difference from the model as trained); tools/quantize.py builds its int8 files on the last
    two."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    fused = reparameterize(net)
    reparam_error = check(
        reparameterisation_error(net, fused), "reparameterised vs as trained", tol
    )
    print(
        f"reparameterised {net.name}: {sum(p.numel() for p in net.visual.parameters()):,} -> "
        f"{sum(p.numel() for p in fused.visual.parameters()):,} image parameters, "
        f"max abs diff {reparam_error:.2e} on normalised features"
    )
    written = []
    for stem, module, trained, inputs, input_name, output_names, classes in export_jobs(
        net, fused, zero_shot, text
    ):
        with torch.inference_mode():
            reference = trained(inputs)
        reference = [reference] if torch.is_tensor(reference) else list(reference)
        for fmt in formats:
            path = Path(folder) / f"{stem}.{EXTENSIONS[fmt]}"
            shapes, parity = write_file(
                fmt, path, module, inputs, input_name, output_names, reference, tol
            )
            about = sidecar(
                net,
                source,
                path,
                fmt,
                inputs,
                input_name,
                shapes,
                classes,
                reparam_error,
                parity=parity,
            )
            configurator.write_atomic(f"{path}.json", json.dumps(about, indent=1))
            written.append(path)
            error = parity["max_abs_diff"]
            print(
                f"wrote {path} (+ .json) | "
                + (
                    "spec checked, not run (Linux)"
                    if error is None
                    else f"max abs diff vs PyTorch {error:.2e}"
                )
            )
    return written, fused, reparam_error


# ------------------------------------------------------------------ command line


def formats_of(config):
    """The formats --coreml and --onnx ask for; a ValueError when neither."""
    formats = [f for f in ("coreml", "onnx") if config[f]]
    if not formats:
        raise ValueError("nothing to write: --coreml=False and --onnx=False")
    return formats


def student_of(config, command="export.py"):
    """The checkpoint --ckpt names, as a student (load_student); a missing file says how to make one."""
    try:
        return load_student(config["ckpt"], config["model"], config["allow_teacher"])
    except FileNotFoundError as error:
        raise SystemExit(
            f"{command}: {error} (train a student with `python train.py`, or pass CKPT)"
        ) from None


def main(arguments):
    config = configurator.configure(dict(DEFAULTS), arguments, positional="ckpt")
    with configurator.user_errors("export.py"):
        formats = formats_of(config)
        configurator.check_folder(config["out_dir"], "--out_dir")
        net = student_of(config)
        options = [config[k] for k in ("zero_shot_head", "text", "tolerance")]
        written, _, _ = export(net, config["ckpt"], config["out_dir"], formats, *options)
        return written


if __name__ == "__main__":
    main(sys.argv[1:])
