"""export.py's files plus int8 copies of the image encoder, each held against its fp32 source.

    python -m tools.quantize                                          # out/best.pt, calibrated on the demo's scans
    python -m tools.quantize CKPT --calibration=my_scans/ --planes_dir=FETAL_PLANES_DB --hc18_dir=HC18

Its own command, not a flag of export.py: it needs calibration scans (read by tools/scans.py) and the demo's
paths (tools/synthetic.py), and export.py, a top-level file, depends on no tool. It takes every export.py
setting.

    image_encoder_int8.onnx       onnxruntime's static quantisation of image_encoder.onnx (quant_pre_process, then
                                  quantize_static): QDQ, symmetric per-channel weights in 7 bits (reduce_range),
                                  uint8 activations from MinMax ranges over the calibration images
    image_encoder_int8.mlpackage  int8 symmetric per-channel weights (coremltools.optimize.torch's
                                  PostTrainingQuantizer; ct.convert stores exactly those as int8), fp16 compute
Why 7-bit weights: x86 CPUs without VNNI (AVX2 only, or AVX-512 without VNNI) multiply uint8 activations by int8
weights with vpmaddubsw, which adds pairs of products into int16 and saturates once 2 x 255 x |w| passes 32767; full
8-bit weights (|w| up to 127) did on an AMD EPYC (AVX2): cosine 0.988 with fp32 where a VNNI CPU gave 0.9999, so a
file checked on one CPU answered differently on another. With |w| <= 64 no pair can saturate (2 x 255 x 64 = 32640),
whatever the CPU. onnxruntime documents reduce_range for this; per-tensor 8-bit weights held on that CPU only because
its weights happened not to saturate. Measured on an Intel Xeon (AVX-512 VNNI, 2 loaded cores), real-size student,
random weights, held-out synthetic planes and 36 real DICOM frames (pydicom's ultrasound, CT and MR test files
through scans.py): minimum cosine 0.99977 (7-bit per-channel), 0.99980 (8-bit per-tensor), 0.99988 (8-bit
per-channel), the speed of the three alike within noise. Without VNNI, checked by running onnxruntime under
`qemu-x86_64 -cpu Haswell` (AVX2 and FMA, no VNNI, no AVX-512: onnxruntime picks its kernels by CPUID) on an AMD EPYC
with VNNI, the same student on 14 held-out frames, 10 of them pydicom's real DICOM: 7-bit weights minimum cosine
0.99975 both natively and emulated; 8-bit per-channel 0.99987 natively and 0.99755 emulated, the saturation above.
Again with onnxruntime 1.32 on that EPYC, on all 35 frames of pydicom's ultrasound (a 30-frame JPEG cine, RGB,
palette, JPEG 2000), CT and MR test files (31 of them never calibrated on): 7-bit weights 0.99975 natively and
emulated, 8-bit per-channel 0.99988 natively and 0.98842 emulated.
No int8 file is faster than the fp32 one on x86 CPUs without VNNI (best 0.88x at batch 1 on the EPYC, AVX2): its
use there is the size, a quarter of fp32's.
Quantised are Conv, MatMul and Gemm but the stem convolution that reads the image's 3 channels: its int8 weights alone
took the demo student's minimum cosine (below) to 0.981, for a few hundred weights. LayerNorm, softmax and the L2
norm stay float: quantised too, they took a random tiny_vit's to 0.94.

Agreement: the --calibration images (files or folders, searched recursively) are sorted and every 4th (0, 4, 8, ...)
is held out, never calibrated on (of the others at most --calibration_images calibrate, evenly spaced). On the held-out
images the int8 image features are held against the fp32 source's: mean and minimum cosine, and the zero-shot head's
top-1 agreement (five planes, brain sub-planes). onnxruntime runs the ONNX file and image_encoder.onnx. Core ML runs on
Apple platforms only, so the Core ML figures are those of the PyTorch encoder with the file's very int8 weights (fp32
compute) against the fp32 PyTorch encoder; the fp16 compute both Core ML files share is not in them. With
--planes_dir and --hc18_dir the protocol's zero-shot figures of both encoders are computed too (evaluate.zero_shot,
the PyTorch text tower), and the sidecar says how many calibration images the Planes DB shares with them (the demo
calibrates on Planes DB images).
Sidecar <file>.json: export.py's, plus quantization {method, source, calibration {images, source}, size_mb {fp32,
int8}}, agreement {images, held_out, reference, cosine_mean, cosine_min, five_planes_top1_agreement,
brain_subplanes_top1_agreement, min_cosine} and zero_shot {calibration_images_among_planes, fp32, int8}: each of
these {five_planes_f1, brain_subplanes_f1, hc18_validity, f1_all, avg}.
A minimum cosine below --min_cosine writes no int8 file (an older one there is removed: it would sit beside another
fp32 file) and the command exits non-zero with one line naming the figure and the threshold.
"""

import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import configurator
import data
import evaluate
import export
import protocol
from tools import scans, synthetic

DEMO_CALIBRATION = os.path.join(
    synthetic.layout(synthetic.DEFAULTS["out_dir"])["planes_dir"], "Images"
)
OPS = [
    "Conv",
    "MatMul",
    "Gemm",
]  # quantised with their inputs (the module docstring says which stay float)
METHODS = {
    "onnx": f"onnxruntime quantize_static after quant_pre_process: QDQ, symmetric per-channel weights in 7 bits "
    f"(reduce_range: no int16 saturation on CPUs without VNNI), uint8 MinMax activations; {'/'.join(OPS)} but the "
    "stem convolution",
    "coreml": "coremltools.optimize.torch PostTrainingQuantizer: int8 symmetric per-channel Conv / Linear weights but "
    "the stem convolution, stored as int8 by ct.convert; fp16 compute",
}
REFERENCES = {
    "onnx": "image_encoder.onnx (fp32), both run by onnxruntime",
    "coreml": "the fp32 PyTorch encoder, against the PyTorch encoder with this file's int8 weights (fp32 compute): "
    "Core ML runs on Apple platforms only",
}
HELD_OUT = "every 4th of the sorted images (0, 4, 8, ...), never calibrated on"

# ------------------------------------------------------------------ settings: export.py's, and these
INT8_DEFAULTS = {
    "calibration": "",  # image files or folders (recursive), comma-separated; '' = the demo's Planes DB images
    "calibration_images": 256,  # at most this many calibrate, evenly spaced (-1 = all); every 4th is held out
    "min_cosine": 0.99,  # the least cosine of int8 and fp32 image features allowed on the held-out images
    "planes_dir": "",  # with hc18_dir, the zero-shot protocol's figures of both encoders; '' = none
    "hc18_dir": "",
}
DEFAULTS = export.DEFAULTS | INT8_DEFAULTS

# ------------------------------------------------------------------ images


def read_image(path):
    """A calibration or held-out file's first view, read as predict.py reads it (scans.py: DICOM, clips, 16-bit)."""
    try:
        return next(scans.read(path, scans.classify(path), indices=[0])).image
    except (scans.Unreadable, scans.NotAScan, StopIteration) as error:
        raise ValueError(f"{path}: not a readable scan ({error or 'no frame'})") from None


def image_files(spec):
    """'a.png,scans/' -> the sorted scan files (scans.find: folders searched recursively); a missing path is named."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    for item in items:
        if not os.path.exists(item):
            hint = (
                " (python -m tools.synthetic writes the demo's)" if item == DEMO_CALIBRATION else ""
            )
            raise FileNotFoundError(
                f"--calibration: {item} is neither a scan file nor a folder{hint}"
            )
    found, _, skipped = scans.find(items)
    if skipped:
        raise ValueError(f"--calibration: {skipped[0][0]} cannot be read ({skipped[0][1]})")
    paths = [path for path, _ in found]
    if len(paths) < 2:
        raise ValueError(
            f"--calibration={spec}: {len(paths)} scan file(s), at least 2 needed (one is held out)"
        )
    return sorted(paths)


def calibration_split(paths, limit=-1):
    """-> (calibration, held out): HELD_OUT, and at most `limit` of the others calibrate, evenly spaced (-1 = all)."""
    rest = [p for i, p in enumerate(paths) if i % 4]
    if 0 < limit < len(rest):
        rest = [rest[i * len(rest) // limit] for i in range(limit)]
    return rest, paths[::4]


def image_batches(paths, net, batch_size=16):
    """Images through the evaluation transform (data.eval_transform) -> (B, 3, S, S) batches."""
    transform = data.eval_transform(net.image_size, net.image_mean, net.image_std)
    for start in range(0, len(paths), batch_size):
        yield torch.stack([transform(read_image(p)) for p in paths[start : start + batch_size]])


# ------------------------------------------------------------------ quantisation


def quantize_onnx(source, path, calibration, net):
    """onnxruntime's static quantisation of `source` into `path` (METHODS["onnx"]); a fixed-batch file
    (bench.py's) is calibrated on batches of its size."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as folder:
        prepared = os.path.join(folder, "prepared.onnx")
        # shapes inferred and graph optimised first, as quantize_static asks
        quant_pre_process(str(source), prepared)
        graph = onnx.load(prepared).graph
        stem = [
            n.name for n in graph.node if n.op_type == "Conv" and graph.input[0].name in n.input
        ]
        # 0: a dynamic batch
        batch_size = graph.input[0].type.tensor_type.shape.dim[0].dim_value or 16
        batches = (
            {"image": images.numpy()} for images in image_batches(calibration, net, batch_size)
        )
        quantize_static(
            prepared,
            path,
            # onnxruntime's CalibrationDataReader
            types.SimpleNamespace(get_next=lambda: next(batches, None)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,  # 7-bit weights: no int16 saturation on x86 without VNNI (module docstring)
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=OPS,
            nodes_to_exclude=stem,
        )


def int8_weights(encoder):
    """A copy whose Conv / Linear weights but the stem's are int8 symmetric per output channel
    (dequantised), with the metadata from which ct.convert stores exactly these weights as int8."""
    from coremltools.optimize.torch.quantization import (
        PostTrainingQuantizer,
        PostTrainingQuantizerConfig,
    )

    weights = {
        "weight_dtype": "int8",
        "granularity": "per_channel",
        "quantization_scheme": "symmetric",
    }
    stem = {
        n: None
        for n, m in encoder.named_modules()
        if isinstance(m, nn.Conv2d) and m.in_channels == 3
    }
    config = PostTrainingQuantizerConfig.from_dict(
        {"global_config": weights, "module_name_configs": stem}
    )
    return PostTrainingQuantizer(encoder, config).compress()


def onnx_encoder(path, threads=0):
    """An ONNX image encoder as a function: (B, 3, S, S) -> (B, D); a fixed-batch file (bench.py's) runs in parts."""
    session = export.onnx_session(path, threads or torch.get_num_threads())
    size = session.get_inputs()[0].shape[0]  # 'batch', or a number

    def run(images):
        return torch.from_numpy(session.run(None, {"image": images.numpy()})[0])

    def encode(images):
        return torch.cat(
            [run(part) for part in images.split(size if isinstance(size, int) else len(images))]
        )

    return encode


# ------------------------------------------------------------------ agreement


class ImageTower:
    """evaluate.zero_shot's model with the image features of `encode_image` (an ONNX or int8 encoder); all
    else (text tower, image size, mean / std, eval / train) is `net`'s."""

    def __init__(self, net, encode_image):
        self.net, self.encode_image = net, encode_image

    def __getattr__(self, name):
        return getattr(self.net, name)


@torch.inference_mode()
def agreement(encoders, paths, net):
    """{'fp32', 'int8': image encoder} on the held-out images -> mean / min cosine, the zero-shot head's top-1
    agreement (its argmax of img @ cls.T, as softmax(100 x) ranks)."""
    pairs = [
        (encoders["fp32"](images), encoders["int8"](images)) for images in image_batches(paths, net)
    ]
    fp32, int8 = (torch.cat(features).double() for features in zip(*pairs))  # (N, D) each
    cosine = F.cosine_similarity(fp32, int8, dim=-1)  # (N,)
    figures = dict(
        images=len(paths), cosine_mean=cosine.mean().item(), cosine_min=cosine.min().item()
    )
    for key in ("five_planes", "brain_subplanes"):
        classes = evaluate.class_embeddings(net, protocol.PROMPTS[key]).double()  # (C, D)
        same = (fp32 @ classes.T).argmax(-1) == (int8 @ classes.T).argmax(-1)  # (N,)
        figures[f"{key}_top1_agreement"] = same.double().mean().item()
    return figures


def zero_shot_figures(encoders, net, planes_dir, hc18_dir, calibration):
    """The protocol's figures of both image encoders with net's text tower, and the calibration images among them."""
    evaluated = {os.path.realpath(row["path"]) for row in protocol.planes_rows(planes_dir)}
    out = {
        "calibration_images_among_planes": len(
            evaluated & {os.path.realpath(p) for p in calibration}
        )
    }
    for label, encoder in encoders.items():
        results = evaluate.zero_shot(ImageTower(net, encoder), planes_dir, hc18_dir)
        print(f"  zero-shot {label}: {evaluate.summary(results)}")
        f1 = dict(
            five_planes_f1=results["five_planes"]["f1"],
            brain_subplanes_f1=results["brain_subplanes"]["f1"],
        )
        out[label] = dict(
            f1,
            hc18_validity=results["hc18"]["validity"],
            f1_all=results["f1_all"],
            avg=results["avg"],
        )
    return out


# ------------------------------------------------------------------ files


def write_int8(fmt, fused, folder, settings):
    """image_encoder_int8.<ext>, held against its fp32 source before it replaces anything -> (path,
    agreement, zero-shot figures or None); a ValueError naming the figure below min_cosine (an older int8
    file is removed)."""
    source, path = (
        Path(folder) / f"image_encoder{tag}.{export.EXTENSIONS[fmt]}" for tag in ("", "_int8")
    )
    calibration, held_out = settings["images"]
    calibration = calibration if fmt == "onnx" else []  # Core ML's int8 weights need no images

    def measure(encoders):
        figures = dict(
            agreement(encoders, held_out, fused), reference=REFERENCES[fmt], held_out=HELD_OUT
        )
        figures["min_cosine"] = settings["min_cosine"]
        if not figures["cosine_min"] >= settings["min_cosine"]:  # NaN fails too
            raise ValueError(
                f"{path} not written: minimum cosine {figures['cosine_min']:.4f} of its image features with the fp32 "
                f"ones on {len(held_out)} held-out images is below --min_cosine={settings['min_cosine']:g} (mean "
                f"{figures['cosine_mean']:.4f}"
                + (f"; calibrated on {len(calibration)} images)" if calibration else ")")
            )
        folders = settings["planes_dir"], settings["hc18_dir"]
        return (
            path,
            figures,
            zero_shot_figures(encoders, fused, *folders, calibration) if folders[0] else None,
        )

    try:
        if fmt == "onnx":
            with configurator.atomic_path(path) as tmp:
                quantize_onnx(source, tmp, calibration, fused)
                return measure({"fp32": onnx_encoder(source), "int8": onnx_encoder(tmp)})
        encoder = int8_weights(export.ImageEncoder(fused))
        written = measure({"fp32": export.ImageEncoder(fused), "int8": encoder})
        export.export_coreml(
            encoder, export.example_images(fused), path, "image", ["image_features"]
        )
        return written
    except ValueError:
        for stale in (path, Path(f"{path}.json")):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
        raise


def size_mb(path):
    """A file's or a folder's (.mlpackage) size in MB."""
    return sum(p.stat().st_size for p in [Path(path), *Path(path).rglob("*")] if p.is_file()) / 1e6


def export_int8(net, fused, source, folder, formats, reparam_error, settings):
    """Each format's int8 image encoder and its sidecar -> [paths]; then one ValueError naming those that failed."""
    written, failures = [], []
    for fmt in formats:
        try:
            path, agreed, zero_shot = write_int8(fmt, fused, folder, settings)
        except ValueError as error:
            failures.append(str(error))
            continue
        fp32_path = Path(folder) / f"image_encoder.{export.EXTENSIONS[fmt]}"
        calibration = dict(images=len(settings["images"][0]), source=settings["calibration"])
        calibration = calibration if fmt == "onnx" else "none: weights only"
        sizes = {"fp32": size_mb(fp32_path), "int8": size_mb(path)}
        quantization = dict(
            method=METHODS[fmt], source=fp32_path.name, calibration=calibration, size_mb=sizes
        )
        figures = dict(quantization=quantization, agreement=agreed) | (
            {"zero_shot": zero_shot} if zero_shot else {}
        )
        shapes = {"image_features": [1 if fmt == "coreml" else "batch", net.embed_dim]}
        about = export.sidecar(
            net, source, path, fmt, export.example_images(net), "image", shapes, {}, reparam_error
        )
        about = dict(about, format=f"{about['format']}, int8", **figures)
        configurator.write_atomic(f"{path}.json", json.dumps(about, indent=1))
        written.append(path)
        print(
            f"wrote {path} (+ .json) | {sizes['int8']:.1f} MB (fp32 {sizes['fp32']:.1f}) | cosine mean "
            f"{agreed['cosine_mean']:.4f}, min {agreed['cosine_min']:.4f} | five-plane top-1 agreement "
            f"{agreed['five_planes_top1_agreement']:.3f} on {agreed['images']} held-out images"
        )
    if failures:
        raise ValueError("; ".join(failures))
    return written


def settings(config):
    """The int8 settings, checked before anything is exported -> what export_int8 takes."""
    if bool(config["planes_dir"]) != bool(config["hc18_dir"]):
        raise ValueError(
            "--planes_dir and --hc18_dir: give both (the zero-shot protocol's figures) or neither"
        )
    if config["calibration_images"] == 0 or config["calibration_images"] < -1:
        raise ValueError(
            f"--calibration_images={config['calibration_images']}: expected a count >= 1, or -1 for all"
        )
    if config["planes_dir"]:  # their errors now, not after the export
        protocol.planes_rows(config["planes_dir"])
        protocol.hc18_rows(config["hc18_dir"])
    calibration = config["calibration"] or DEMO_CALIBRATION
    images = calibration_split(image_files(calibration), config["calibration_images"])
    return dict(config, calibration=calibration, images=images)


# ------------------------------------------------------------------ command line


def main(arguments):
    """export.py's files, then the int8 ones -> [paths]."""
    config = configurator.configure(dict(DEFAULTS), arguments, positional="ckpt")
    with configurator.user_errors("quantize"):
        formats = export.formats_of(config)
        configurator.check_folder(config["out_dir"], "--out_dir")
        int8 = settings(config)
        net = export.student_of(config, "quantize")
        options = [config[k] for k in ("zero_shot_head", "text", "tolerance")]
        written, fused, reparam_error = export.export(
            net, config["ckpt"], config["out_dir"], formats, *options
        )
        return written + export_int8(
            net, fused, config["ckpt"], config["out_dir"], formats, reparam_error, int8
        )


if __name__ == "__main__":
    main(sys.argv[1:])
