"""export.py: FastViT reparameterisation parity, the Core ML spec, ONNX against PyTorch, the zero-shot head
against evaluate.py's own pipeline, and bad-input messages."""

import json
import platform

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import evaluate
import export
import protocol
from model import create_model, reparameterize, save_open_clip

ONNX_ATOL = 1e-3  # the bound on L2-normalised features (observed: ~1e-7)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def randomise_batchnorm(net, seed=0):
    """Non-trivial BatchNorm statistics, so fusing them into convolutions is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in net.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    return net


def save_project_checkpoint(net, path):
    torch.save({"model": net.state_dict(), "model_name": net.name}, path)  # as train.py writes it
    return str(path)


def run_onnx(path, inputs):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs.numpy()})


def write_images(folder, seed=0):
    """Five PNGs of different sizes, colours and contrasts (non-square: pad_to_square is exercised)."""
    rng, paths = np.random.default_rng(seed), []
    for i, (width, height) in enumerate([(80, 60), (48, 48), (100, 70), (64, 90), (120, 50)]):
        level, spread = rng.uniform(0, 255, size=3), rng.uniform(0, 128)
        pixels = np.clip(level + spread * rng.standard_normal((height, width, 3)), 0, 255).astype(
            np.uint8
        )
        paths.append(folder / f"{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def fit_image_tower(net, paths, plane_targets, brain_targets, steps=60):
    """A few Adam steps on the image tower so the images get different zero-shot classes: a random
    network maps every image to nearly the same feature, which would make the comparison weak."""
    transform = data.eval_transform(net.image_size, net.image_mean, net.image_std)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        classes = {
            k: evaluate.class_embeddings(net, protocol.PROMPTS[k])
            for k in ("five_planes", "brain_subplanes")
        }
    optimizer = torch.optim.Adam(net.visual.parameters(), lr=3e-3)
    for _ in range(steps):
        features = F.normalize(net.encode_image(images), dim=-1)
        loss = F.cross_entropy(
            100 * features @ classes["five_planes"].T, torch.tensor(plane_targets)
        ) + F.cross_entropy(
            100 * features @ classes["brain_subplanes"].T, torch.tensor(brain_targets)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


PLANE_TARGETS, BRAIN_TARGETS = [0, 1, 2, 3, 8], [0, 1, 2, 0, 1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny_vit student fitted to five images, exported once in both formats with the zero-shot head and
    the text encoder."""
    folder = tmp_path_factory.mktemp("tiny")
    paths = write_images(folder)
    torch.manual_seed(0)
    net = fit_image_tower(create_model("tiny_vit"), paths, PLANE_TARGETS, BRAIN_TARGETS)
    ckpt = save_project_checkpoint(net, folder / "student.pt")
    written = export.main([ckpt, f"--out_dir={folder / 'export'}", "--text=True"])
    return net, ckpt, folder / "export", written, paths


def test_reparameterisation_parity_fastvit():
    """mobilefetalclip's FastViT-MCi0 tower at 256 px: branches fused, outputs unchanged (batch 1: CPU time)."""
    torch.manual_seed(0)
    net = randomise_batchnorm(create_model("mobilefetalclip")).eval()
    fused = reparameterize(net)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert (count(net.visual), count(fused.visual)) == (
        11_406_976,
        11_357_504,
    )  # MobileCLIP2-S0's image tower
    images = export.example_images(net, batch=1, seed=3)
    with torch.no_grad():
        reference = F.normalize(net.encode_image(images), dim=-1)
        torch.testing.assert_close(
            F.normalize(fused.encode_image(images), dim=-1), reference, atol=1e-5, rtol=0
        )
        # a fused model that differs: export's check must notice it
        fused.visual.head.fc.bias.add_(0.5)
    error = export.reparameterisation_error(net, fused, batch=1, seed=3)
    assert error > 1e-3
    with pytest.raises(ValueError, match="exceeds --tolerance"):
        export.check(error, "reparameterised", 1e-3)


def test_coreml_package_and_sidecar(tiny):
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    net, ckpt, folder, written, _ = tiny
    assert {p.name for p in written} == {
        f"{stem}.{ext}"
        for stem in ("image_encoder", "zero_shot", "text_encoder")
        for ext in ("mlpackage", "onnx")
    }
    expected = {
        "image_encoder": ({"image": [1, 3, 48, 48]}, {"image_features": [1, 64]}),
        "zero_shot": (
            {"image": [1, 3, 48, 48]},
            {"plane_probs": [1, 9], "brain_probs": [1, 3], "image_features": [1, 64]},
        ),
        "text_encoder": ({"tokens": [1, 48]}, {"text_features": [1, 64]}),
    }
    for stem, (inputs, outputs) in expected.items():
        spec = ct.models.MLModel(str(folder / f"{stem}.mlpackage"), skip_model_load=True).get_spec()
        # 8 = iOS 17
        assert spec.WhichOneof("Type") == "mlProgram" and spec.specificationVersion >= 8
        assert {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input} == inputs
        assert {
            o.name: list(o.type.multiArrayType.shape) for o in spec.description.output
        } == outputs
        block = spec.mlProgram.functions["main"].block_specializations["CoreML7"]
        compute = {
            o.type.tensorType.dataType
            for op in block.operations
            if op.type == "linear"
            for o in op.outputs
        }
        assert compute == {MIL_pb2.FLOAT16}  # fp16 compute precision
        sidecar = json.loads((folder / f"{stem}.mlpackage.json").read_text())
        assert sidecar["source_checkpoint"] == ckpt and sidecar["model"] == "tiny_vit"
        assert (
            sidecar["input"]["name"] == list(inputs)[0]
            and sidecar["input"]["shape"] == list(inputs.values())[0]
        )
        assert [o["name"] for o in sidecar["outputs"]] == list(outputs)
        # Core ML cannot run on Linux; said so, not faked
        assert sidecar["parity"]["max_abs_diff"] is None
    sidecar = json.loads((folder / "zero_shot.mlpackage.json").read_text())
    assert sidecar["input"]["mean"] == list(net.image_mean) and sidecar["input"]["std"] == list(
        net.image_std
    )
    assert sidecar["outputs"][0]["classes"] == list(protocol.PROMPTS["five_planes"])
    assert sidecar["outputs"][1]["classes"] == [
        "trans-thalamic",
        "trans-cerebellum",
        "trans-ventricular",
    ]


def test_onnx_matches_pytorch_tiny(tiny):
    net, _, folder, _, _ = tiny
    images = export.example_images(net, batch=3, seed=1)
    tokens = data.tokenize(
        ["fetal brain", "an ultrasound of the abdomen", "cervix"], context_length=48
    )
    with torch.no_grad():
        image_features = F.normalize(net.encode_image(images), dim=-1)
        text_features = F.normalize(net.encode_text(tokens), dim=-1)
    torch.testing.assert_close(
        torch.from_numpy(run_onnx(folder / "image_encoder.onnx", images)[0]),
        image_features,
        atol=ONNX_ATOL,
        rtol=0,
    )
    torch.testing.assert_close(
        torch.from_numpy(run_onnx(folder / "text_encoder.onnx", tokens)[0]),
        text_features,
        atol=ONNX_ATOL,
        rtol=0,
    )
    sidecar = json.loads((folder / "image_encoder.onnx.json").read_text())
    assert (
        sidecar["input"]["shape"] == ["batch", 3, 48, 48]
        and 0 <= sidecar["parity"]["max_abs_diff"] <= ONNX_ATOL
    )


def test_onnx_matches_pytorch_demo_student(tmp_path):
    """The demo's student (BatchNorm, hard-swish, squeeze-excitation) with MobileFetalCLIP's text tower (no
    attention mask), where nn.MultiheadAttention takes its fused inference path, which the ONNX exporter
    cannot convert: both encoders to both formats."""
    torch.manual_seed(0)
    net = randomise_batchnorm(create_model("demo_student")).eval()
    ckpt = save_project_checkpoint(net, tmp_path / "best.pt")
    export.main([ckpt, f"--out_dir={tmp_path}", "--text=True", "--zero_shot_head=False"])
    assert (tmp_path / "text_encoder.mlpackage" / "Manifest.json").is_file()
    images = export.example_images(net, batch=4, seed=2)
    tokens = data.tokenize(["fetal brain", "an ultrasound of the abdomen"], net.context_length)
    with torch.no_grad():
        references = {
            "image_encoder.onnx": (images, F.normalize(net.encode_image(images), dim=-1)),
            "text_encoder.onnx": (tokens, F.normalize(net.encode_text(tokens), dim=-1)),
        }
    for name, (inputs, reference) in references.items():
        torch.testing.assert_close(
            torch.from_numpy(run_onnx(tmp_path / name, inputs)[0]),
            reference,
            atol=ONNX_ATOL,
            rtol=0,
        )


class ConvMlp(nn.Module):
    """FastViT's convolutional MLP (1x1 conv, GELU, 1x1 conv) with its residual."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize(
    "channels", [32, 24]
)  # 24: not a whole number of 16-channel blocks (padded)
def test_onnxruntime_keeps_the_gelus_between_convolutions_in_its_blocked_layout(tmp_path, channels):
    """predict.py's speed on x86 rests on this (onnxruntime 1.23 converted each GELU of FastViT's ConvMlp back
    to NCHW and forth again, 14 % of the student's time): no layout conversion next to a GELU in the graph
    onnxruntime runs, and the outputs those of PyTorch."""
    import onnx
    import onnxruntime

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), ConvMlp(channels, 64), ConvMlp(channels, 40)
    )
    images = torch.randn(2, 3, 20, 20)
    path = export.export_onnx(net, images, tmp_path / "convmlp.onnx", "image", ["features"])
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(tmp_path / "optimized.onnx").graph
    produced_by = {name: node.op_type for node in graph.node for name in node.output}
    read_by = [(node.op_type, produced_by.get(name)) for node in graph.node for name in node.input]
    gelus = [node for node in graph.node if node.op_type == "Gelu"]
    assert len(gelus) == 2
    assert ("Gelu", "ReorderOutput") not in read_by and ("ReorderInput", "Gelu") not in read_by
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert ("Conv", "Gelu") in read_by and ("Gelu", "Conv") in read_by
    (features,) = export.onnx_session(path, 1).run(None, {"image": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(features), net(images), atol=1e-5, rtol=0)


def test_zero_shot_head_matches_evaluate(tiny):
    """Images on disk -> evaluate.py's encode_images / class_embeddings / softmax(100 x) vs the exported head."""
    net, _, folder, _, paths = tiny
    features, _ = evaluate.encode_images(net, paths)
    expected = {
        key: (100.0 * features @ evaluate.class_embeddings(net, protocol.PROMPTS[key]).T).softmax(
            -1
        )
        for key in ("five_planes", "brain_subplanes")
    }
    transform = data.eval_transform(net.image_size, net.image_mean, net.image_std)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    plane_probs, brain_probs, image_features = run_onnx(folder / "zero_shot.onnx", images)
    torch.testing.assert_close(
        torch.from_numpy(plane_probs), expected["five_planes"], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        torch.from_numpy(brain_probs), expected["brain_subplanes"], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(torch.from_numpy(image_features), features, atol=ONNX_ATOL, rtol=0)
    assert expected["five_planes"].argmax(-1).tolist() == PLANE_TARGETS  # the images are told apart
    assert expected["brain_subplanes"].argmax(-1).tolist() == BRAIN_TARGETS


def test_bad_inputs_have_clear_messages(tmp_path):
    torch.manual_seed(0)
    teacher = create_model("demo_teacher")
    project = save_project_checkpoint(teacher, tmp_path / "teacher.pt")
    open_clip_file = str(tmp_path / "teacher_open_clip.pt")
    save_open_clip(teacher, open_clip_file)  # no model name inside: guessed from the keys
    student = save_project_checkpoint(create_model("demo_student"), tmp_path / "student.pt")
    cases = [
        ([project], "holds the teacher 'demo_teacher'.*--allow_teacher"),
        ([open_clip_file], "holds the teacher 'demo_teacher'"),
        ([str(tmp_path / "missing.pt")], "checkpoint not found: .*missing.pt"),
        ([student, "--model=resnet50"], "unknown model 'resnet50'.*mobilefetalclip"),
        (
            [student, "--model=mobilefetalclip"],
            "holds a demo student .'demo_student'., not the 'mobilefetalclip'",
        ),
        (["--nope=1"], "unknown config key 'nope'; valid keys: .*zero_shot_head"),
        (["--text=maybe"], "--text=maybe: expected bool"),
        (["--tolerance=small"], "--tolerance=small: expected float"),
        (["--out_dir"], "--out_dir needs a value"),
        (["a.pt", "b.pt"], "expected one ckpt"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            export.main(argv)


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    """A model file replaces the old one only once written and checked: a check failing half-way leaves the
    old file, no temporary and no sidecar."""
    import onnx

    torch.manual_seed(0)
    ckpt = save_project_checkpoint(create_model("tiny_vit").eval(), tmp_path / "student.pt")
    out = tmp_path / "export"
    (out / "image_encoder.mlpackage").mkdir(parents=True)
    (out / "image_encoder.mlpackage" / "Manifest.json").write_text("old")
    (out / "image_encoder.onnx").write_bytes(b"old")

    def broken(*args, **kwargs):
        raise ValueError("the check failed")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    monkeypatch.setattr(export, "coreml_output_shapes", broken)
    for fmt in ("--coreml=False", "--onnx=False"):
        with pytest.raises(SystemExit, match="export.py: the check failed"):
            export.main([ckpt, f"--out_dir={out}", fmt, "--zero_shot_head=False"])
    assert (out / "image_encoder.onnx").read_bytes() == b"old"
    assert (out / "image_encoder.mlpackage" / "Manifest.json").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == [
        "image_encoder.mlpackage",
        "image_encoder.onnx",
    ]
