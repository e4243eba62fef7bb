"""tools/quantize.py (`python -m tools.quantize`): the int8 files of a small trained student against its fp32
model, run by onnxruntime and rebuilt by hand (symmetric per-channel int8), a broken calibration refused, the
sidecar's figures, and bad settings."""

import copy
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from test_export import run_onnx, save_project_checkpoint

import data
import evaluate
import protocol
from model import create_model
from tools import quantize, synthetic

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fit_to_planes(net, planes_dir, steps=60):
    """A few Adam steps of the image tower towards the five-plane class embeddings: a random network maps
    every scan to nearly the same feature, against which any int8 file would agree."""
    rows = [r for r in protocol.planes_rows(planes_dir) if r["five"] >= 0]
    images = torch.stack([transform(net)(Image.open(r["path"]).convert("RGB")) for r in rows])
    labels = torch.tensor([r["five"] for r in rows])
    with torch.no_grad():
        classes = evaluate.class_embeddings(net, protocol.PROMPTS["five_planes"])  # (9, D)
    optimizer = torch.optim.Adam(net.visual.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(
            100 * F.normalize(net.encode_image(images), dim=-1) @ classes.T, labels
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def transform(net):
    return data.eval_transform(net.image_size, net.image_mean, net.image_std)


def held_out_images(net, folder):
    """Every 4th sorted image, as the module docstring promises, read and transformed here."""
    paths = sorted(str(p) for p in folder.glob("*.png"))[::4]
    # (N, 3, S, S)
    return torch.stack([transform(net)(Image.open(p).convert("RGB")) for p in paths])


def features(net, images):
    with torch.no_grad():
        return F.normalize(net.encode_image(images), dim=-1).double()  # (N, D)


def agreement(fp32, int8, net):
    """Cosines and the five-plane argmax agreement of two (N, D) feature sets."""
    with torch.no_grad():
        classes = evaluate.class_embeddings(net, protocol.PROMPTS["five_planes"]).double()
    same = (fp32 @ classes.T).argmax(-1) == (int8 @ classes.T).argmax(-1)
    return F.cosine_similarity(fp32, int8, dim=-1), same.double().mean().item()


def stem_and_weights(net):
    """The 3-channel stem convolution and the Conv / Linear layers quantised after it."""
    layers = [m for m in net.visual.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    is_stem = [getattr(m, "in_channels", 0) == 3 for m in layers]
    return [m for m, s in zip(layers, is_stem) if s], [m for m, s in zip(layers, is_stem) if not s]


def int8_by_hand(weight):
    """Symmetric int8 per output channel, dequantised: round(w / s) * s with s = max |w| / 127 over the channel."""
    scale = (weight.abs().flatten(1).amax(1).clamp_min(1e-12) / 127).view(
        -1, *[1] * (weight.dim() - 1)
    )
    return (weight / scale).round().clamp(-127, 127) * scale


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """tiny_vit fitted to a 24-scan synthetic Planes DB, exported by tools.quantize in both formats,
    calibrated on those scans, with the zero-shot figures on them and three HC18 scans."""
    folder = tmp_path_factory.mktemp("int8")
    synthetic.write_planes(str(folder / "planes"), 0, 24, 160, 120)
    synthetic.write_hc18(str(folder / "hc18"), 0, 3)
    torch.manual_seed(0)
    net = fit_to_planes(create_model("tiny_vit"), folder / "planes")
    ckpt = save_project_checkpoint(net, folder / "student.pt")
    flags = ["--zero_shot_head=False", f"--calibration={folder / 'planes' / 'Images'}"]
    flags += [f"--planes_dir={folder / 'planes'}", f"--hc18_dir={folder / 'hc18'}"]
    written = quantize.main([ckpt, f"--out_dir={folder / 'export'}", *flags])
    return net, ckpt, folder, written


def test_onnx_int8_agrees_with_pytorch(student):
    net, _, folder, written = student
    path = folder / "export" / "image_encoder_int8.onnx"
    assert path in written and (folder / "export" / "image_encoder_int8.mlpackage") in written
    graph = onnx.load(str(path)).graph
    initialisers = {t.name: t for t in graph.initializer}
    int8 = [
        i
        for n in graph.node
        if n.op_type == "DequantizeLinear"
        for i in n.input[:1]
        if i in initialisers
    ]
    assert all(initialisers[i].data_type == onnx.TensorProto.INT8 for i in int8)
    stem, quantised = stem_and_weights(net)
    # qkv, proj, fc1, fc2 of 2 blocks and the head; not the patch stem
    assert len(int8) == len(quantised) == 9
    scales = [
        n.input[1] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8
    ]
    assert all(len(onnx.numpy_helper.to_array(initialisers[s])) > 1 for s in scales)  # per channel
    weights = [onnx.numpy_helper.to_array(initialisers[i]).astype(int) for i in int8]
    # 7 bits (reduce_range): a pair of uint8 x int8 products fits int16 on CPUs without VNNI
    assert max(abs(w).max() for w in weights) <= 64 and 2 * 255 * 64 <= 2**15 - 1
    stem_conv = next(n for n in graph.node if n.op_type == "Conv" and "image" in n.input)
    assert initialisers[stem_conv.input[1]].data_type == onnx.TensorProto.FLOAT

    images = held_out_images(net, folder / "planes" / "Images")  # 6 of 24, never calibrated on
    cosine, agreed = agreement(
        features(net, images), torch.from_numpy(run_onnx(path, images)[0]).double(), net
    )
    sidecar = json.loads((folder / "export" / "image_encoder_int8.onnx.json").read_text())
    figures = sidecar["agreement"]
    assert figures["images"] == 6 and sidecar["quantization"]["calibration"]["images"] == 18
    assert 0.99 <= cosine.min().item() < 1 - 1e-6  # close, and really quantised
    assert figures["cosine_min"] == pytest.approx(cosine.min().item(), abs=1e-5)
    assert figures["cosine_mean"] == pytest.approx(cosine.mean().item(), abs=1e-5)
    assert figures["five_planes_top1_agreement"] == agreed == 1.0
    sizes = sidecar["quantization"]["size_mb"]
    assert (
        sizes["int8"]
        == path.stat().st_size / 1e6
        < sizes["fp32"]
        == (path.parent / "image_encoder.onnx").stat().st_size / 1e6
    )
    assert sidecar["format"].endswith("int8") and sidecar["outputs"][0]["shape"] == ["batch", 64]


def test_coreml_int8_stores_the_measured_weights(student):
    """The .mlpackage holds, as int8, the per-channel weights computed here by hand, and the sidecar's
    figures are those of the PyTorch encoder with these weights (Linux cannot run Core ML)."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    net, _, folder, _ = student
    path = folder / "export" / "image_encoder_int8.mlpackage"
    package = ct.models.MLModel(str(path), skip_model_load=True)
    blocks = package.get_spec().mlProgram.functions["main"].block_specializations.values()
    stem, quantised = stem_and_weights(net)
    assert sum(
        op.type == "constexpr_affine_dequantize" for b in blocks for op in b.operations
    ) == len(quantised)
    # not the biases
    weights = cto.get_weights_metadata(cto.decompress_weights(package), weight_threshold=1024)
    stored = [w.val.astype(np.float32) for w in weights.values()]
    # the stem: fp16 only
    expected = [int8_by_hand(m.weight.detach()) for m in quantised] + [stem[0].weight.detach()]
    for by_hand in expected:  # each its own stored weight, within fp16 rounding
        close = [
            i
            for i, w in enumerate(stored)
            if w.shape == by_hand.shape and np.allclose(w, by_hand, 2e-3, 1e-4)
        ]
        assert close, f"no stored weight of shape {tuple(by_hand.shape)} matches"
        stored.pop(close[0])

    rebuilt = copy.deepcopy(net)
    for module in stem_and_weights(rebuilt)[1]:
        module.weight.data = int8_by_hand(module.weight.data)
    images = held_out_images(net, folder / "planes" / "Images")
    cosine, agreed = agreement(features(net, images), features(rebuilt, images), net)
    figures = json.loads((folder / "export" / "image_encoder_int8.mlpackage.json").read_text())[
        "agreement"
    ]
    assert (
        figures["cosine_min"] == pytest.approx(cosine.min().item(), abs=1e-5)
        and figures["cosine_min"] >= 0.99
    )
    assert figures["five_planes_top1_agreement"] == agreed and "Apple" in figures["reference"]


def test_zero_shot_figures_of_both(student):
    """The sidecar's fp32 figures are evaluate.py's for the PyTorch student; the int8 ones sit beside them."""
    net, _, folder, _ = student
    reference = evaluate.zero_shot(net, folder / "planes", folder / "hc18")
    rows = protocol.planes_rows(folder / "planes")
    calibration = set(sorted(str(p) for p in (folder / "planes" / "Images").glob("*.png"))) - set(
        sorted(str(p) for p in (folder / "planes" / "Images").glob("*.png"))[::4]
    )
    overlap = {
        "onnx": sum(r["path"] in calibration for r in rows),
        "mlpackage": 0,
    }  # Core ML: no calibration
    for fmt in ("onnx", "mlpackage"):
        sidecar = json.loads((folder / "export" / f"image_encoder_int8.{fmt}.json").read_text())
        figures = sidecar["zero_shot"]
        assert figures["fp32"]["five_planes_f1"] == pytest.approx(reference["five_planes"]["f1"])
        assert figures["fp32"]["brain_subplanes_f1"] == pytest.approx(
            reference["brain_subplanes"]["f1"]
        )
        assert figures["fp32"]["hc18_validity"] == pytest.approx(reference["hc18"]["validity"])
        assert (
            set(figures["int8"]) == set(figures["fp32"])
            and 0 <= figures["int8"]["five_planes_f1"] <= 1
        )
        assert figures["calibration_images_among_planes"] == overlap[fmt]
    assert overlap["onnx"] > 0 and sidecar["quantization"]["calibration"] == "none: weights only"


def test_constant_calibration_is_caught(student, tmp_path):
    """Black frames calibrated on, real scans held out: activation ranges fitted to nothing clip the scans,
    the agreement check refuses the file in one line, exits non-zero, and removes an older int8 file."""
    net, ckpt, folder, _ = student
    scans = sorted((folder / "planes" / "Images").glob("*.png"))
    (tmp_path / "calibration").mkdir()
    for i, scan in enumerate(scans):  # the held-out images (every 4th) stay real scans
        target = tmp_path / "calibration" / f"{i:03d}.png"
        shutil.copy(scan, target) if i % 4 == 0 else Image.new("RGB", (160, 120)).save(target)
    out = tmp_path / "export"
    out.mkdir()
    (out / "image_encoder_int8.onnx").write_bytes(b"an older int8 file")
    (out / "image_encoder_int8.onnx.json").write_text("{}")
    flags = [
        f"--calibration={tmp_path / 'calibration'}",
        "--coreml=False",
        "--zero_shot_head=False",
    ]
    with pytest.raises(SystemExit) as failure:
        quantize.main([ckpt, f"--out_dir={out}", *flags])
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith(
        f"quantize: {out / 'image_encoder_int8.onnx'} not written: minimum cosine 0."
    )
    assert "on 6 held-out images is below --min_cosine=0.99" in message
    assert sorted(p.name for p in out.iterdir()) == [
        "image_encoder.onnx",
        "image_encoder.onnx.json",
    ]


def test_bad_settings_are_refused_before_export(student, tmp_path):
    _, ckpt, folder, _ = student
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (8, 8)).save(one / "a.png")
    base = [ckpt, f"--out_dir={tmp_path / 'export'}"]
    cases = [
        ([f"--calibration={tmp_path / 'nope'}"], "--calibration: .*nope is neither"),
        ([f"--calibration={one}"], "1 scan file.s., at least 2 needed"),
        ([f"--planes_dir={folder / 'planes'}"], "--planes_dir and --hc18_dir: give both"),
        ([f"--planes_dir={tmp_path}", f"--hc18_dir={tmp_path}"], "Planes DB: .* not found"),
        (["--min_cosine=high"], "--min_cosine=high: expected float"),
        (["--calibration_images=0"], "--calibration_images=0: expected a count >= 1, or -1"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit, match=message):
            quantize.main(base + flags)
    assert not (tmp_path / "export").exists()  # refused before anything was written
