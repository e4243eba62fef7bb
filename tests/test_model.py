"""model.py against open_clip itself: same weights in every file format give the same outputs."""

import math
import os
import re

import open_clip
import pytest
import torch
import torch.nn.functional as F

import loss as loss_lib
import model as model_lib
import release_mci
from model import (
    create_model,
    first_non_finite,
    held_model_name,
    load_checkpoint,
    load_model,
    reparameterize,
    save_open_clip,
)

ATOL = 1e-4  # on unit-normalised features, fp32


def open_clip_model(config_name, context_length):
    """open_clip's own model, built from its bundled config with FetalCLIP's text context."""
    cfg = open_clip.get_model_config(config_name)
    cfg["text_cfg"]["context_length"] = context_length
    custom_text = cfg.pop("custom_text", False)
    torch.manual_seed(0)
    net = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and temperature
        for name, buffer in net.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
        net.logit_scale.fill_(3.3)
    return net


def random_tokens(batch, length, seed=0):
    """[start, random ids, end, 0 ...] rows of different lengths, written without data.py."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n = int(torch.randint(1, length - 2, (1,), generator=generator))
        tokens[row, 0] = 49406
        tokens[row, 1 : n + 1] = torch.randint(1, 49406, (n,), generator=generator)
        tokens[row, n + 1] = 49407
    return tokens


def assert_same_outputs(ours, theirs, image_size, context_length=117):
    torch.manual_seed(1)
    images = torch.randn(2, 3, image_size, image_size)
    tokens = random_tokens(3, context_length)
    with torch.no_grad():
        their_image = F.normalize(theirs.encode_image(images), dim=-1)
        their_text = F.normalize(theirs.encode_text(tokens), dim=-1)
        image_features, text_features, logit_scale = ours.eval()(images, tokens)
    torch.testing.assert_close(image_features, their_image, atol=ATOL, rtol=0)
    torch.testing.assert_close(text_features, their_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(logit_scale, theirs.logit_scale.exp())
    torch.testing.assert_close(
        logit_scale * image_features @ text_features.T,
        theirs.logit_scale.exp() * their_image @ their_text.T,
        atol=30 * ATOL,
        rtol=0,
    )


@pytest.fixture(scope="module")
def teacher_pair():
    return open_clip_model("ViT-L-14", 117), create_model("fetalclip")


@pytest.fixture(scope="module")
def student_pair():
    return open_clip_model("MobileCLIP2-S0", 117), create_model("mobilefetalclip")


@pytest.mark.parametrize("pair", ["teacher_pair", "student_pair"])
def test_open_clip_checkpoints_load_and_match(pair, request, tmp_path):
    theirs, ours = request.getfixturevalue(pair)
    torch.save(theirs.state_dict(), tmp_path / "open_clip.pt")
    load_checkpoint(ours, str(tmp_path / "open_clip.pt"))
    assert_same_outputs(ours, theirs, ours.image_size)


@pytest.mark.parametrize("name", ["demo_teacher", "demo_student"])
def test_every_envelope_loads_the_same_weights(name, tmp_path):
    """Bare, {"state_dict": ...} and DDP "module." files, in open_clip's key names."""
    source, target = create_model(name), create_model(name)
    save_open_clip(source, str(tmp_path / "open_clip.pt"))
    state_dict = torch.load(tmp_path / "open_clip.pt", weights_only=True)
    for envelope in (
        state_dict,
        {"state_dict": state_dict},
        {"state_dict": {"module." + k: v for k, v in state_dict.items()}},
    ):
        torch.save(envelope, tmp_path / "envelope.pt")
        load_checkpoint(target, str(tmp_path / "envelope.pt"))
        for key, value in source.state_dict().items():
            torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts(teacher_pair, student_pair):
    for theirs, ours, total, image in [
        (*teacher_pair, 427_647_233, 303_966_208),
        (*student_pair, 74_855_553, 11_406_976),
    ]:
        assert parameter_count(theirs) == parameter_count(ours) == total
        assert parameter_count(theirs.visual) == parameter_count(ours.visual) == image
        assert len(theirs.state_dict()) == len(ours.state_dict())
    assert parameter_count(reparameterize(student_pair[1]).visual) == 11_357_504


GAP_STUDENTS = {  # name: (image-tower parameters, the gap it stands for); the demo teacher's tower has 4,988,152
    "demo_student": (1_163_388, 4),
    "demo_student_12x": (427_950, 12),
    "demo_student_26x": (187_102, 26.7),  # the paper's 303,966,208 / 11,406,976 (above)
    "demo_student_60x": (83_867, 60),
}


@pytest.mark.parametrize("name", list(GAP_STUDENTS))
def test_gap_students_sit_on_the_gap_share_one_text_tower_and_train_a_step(name):
    """Teacher / student image-tower parameters within 10 % of the gap each student stands for
    (demo_student's 4.3x is today's); every other tower is demo_student's, so the gap is the one thing that
    changes. One AdamW step on a tiny batch moves every parameter and lowers the CLIP loss on that batch."""
    image_params, gap = GAP_STUDENTS[name]
    teacher, student, reference = (create_model(n) for n in ("demo_teacher", name, "demo_student"))
    teacher_params = parameter_count(teacher.visual)
    student_params = parameter_count(student.visual)
    assert teacher_params == 4_988_152 and student_params == image_params
    assert teacher_params / student_params == pytest.approx(gap, rel=0.1)
    for key, value in reference.state_dict().items():
        if not key.startswith("visual."):
            assert student.state_dict()[key].shape == value.shape, key
    torch.manual_seed(0)
    images = torch.randn(4, 3, student.image_size, student.image_size)
    tokens = random_tokens(4, student.context_length)
    before = {k: v.clone() for k, v in student.named_parameters()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        losses.append(loss_lib.distill_loss(student.train()(images, tokens), mode="none")["loss"])
        optimizer.zero_grad()
        losses[-1].backward()
        optimizer.step()
    assert losses[1] < losses[0]
    moved = [k for k, v in student.named_parameters() if not torch.equal(v, before[k])]
    assert len(moved) == len(before)


def test_every_demo_model_is_identified_by_its_keys_and_shapes_alone(tmp_path):
    """An open_clip file of each demo model (no stored name) fits that one entry of MODEL_CONFIGS and no other."""
    for name in ("demo_teacher", *GAP_STUDENTS):
        save_open_clip(create_model(name), str(tmp_path / f"{name}.pt"))
        checkpoint = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert held_model_name(f"{name}.pt", checkpoint) == name


@pytest.mark.parametrize("pair", ["teacher_pair", "student_pair"])
def test_open_clip_loads_what_we_save(pair, request, tmp_path):
    theirs, ours = request.getfixturevalue(pair)
    torch.manual_seed(2)
    with torch.no_grad():
        for parameter in ours.parameters():  # weights unlike the fixture's, so the load must happen
            parameter.add_(0.01 * torch.randn_like(parameter))
    path = tmp_path / "ours.pt"
    save_open_clip(ours, str(path))
    # open_clip's own loader
    theirs.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert_same_outputs(ours, theirs.eval(), ours.image_size)


def to_apple_format(state_dict):
    """open_clip MobileCLIP2 keys -> Apple's (the reverse of SPEC 1's table, written independently)."""
    text_rules = [
        ("token_embedding", "embedding_layer"),
        ("ln_final", "final_layer_norm"),
        ("text_projection", "projection_layer"),
        ("ln_1", "pre_norm_mha.0"),
        ("attn.in_proj_", "pre_norm_mha.1.qkv_proj."),
        ("attn.out_proj", "pre_norm_mha.1.out_proj"),
        ("ln_2", "pre_norm_ffn.0"),
        ("mlp.c_fc", "pre_norm_ffn.1"),
        ("mlp.c_proj", "pre_norm_ffn.4"),
    ]
    out = {}
    for key, value in state_dict.items():
        if key.startswith("visual.trunk."):
            key = "image_encoder.model." + key[len("visual.trunk.") :]
        elif key == "text.positional_embedding":
            key, value = "text_encoder.positional_embedding.pos_embed.pos_embed", value[None, None]
        elif key.startswith("text."):
            key = "text_encoder." + key[len("text.") :]
            key = re.sub(r"transformer\.resblocks\.(\d+)\.", r"transformer.\1.", key)
            for old, new in text_rules:
                key = key.replace(old, new)
        out[key] = value
    return out


def test_apple_format_and_77_to_117_resize(tmp_path, student_pair):
    """A 77-position MobileCLIP2 file, in open_clip's and in Apple's format, vs open_clip's resize."""
    _, ours = student_pair
    source = open_clip_model("MobileCLIP2-S0", 77)
    open_clip_path, apple_path = tmp_path / "open_clip77.pt", tmp_path / "apple77.pt"
    torch.save(source.state_dict(), open_clip_path)
    torch.save(to_apple_format(source.state_dict()), apple_path)
    reference = open_clip_model("MobileCLIP2-S0", 117)
    open_clip.load_checkpoint(reference, str(open_clip_path))  # open_clip's own 77 -> 117 resize
    for path in (open_clip_path, apple_path):
        load_checkpoint(ours, str(path))
        torch.testing.assert_close(
            ours.text.positional_embedding, reference.text.positional_embedding
        )
        assert_same_outputs(ours, reference.eval(), ours.image_size)


# ------------------------------------------------------------------ the official release's files


@pytest.fixture(scope="module")
def release():
    """The release's student as its factory builds it (Apple's MCi0 class registered as timm's fastvit_mci0),
    text tower frozen so the trainer envelope's optimiser state stays small."""
    model = release_mci.release_model(seed=3)
    model.text.requires_grad_(False)
    return model


@pytest.mark.parametrize("kind", ["bare", "trainer", "module"])
def test_release_checkpoints_load_strictly_and_match_the_release(release, kind, tmp_path):
    """What the release writes: its Apple-named trunk inside open_clip's keys, bare or in the trainer's
    envelope (optimizer and LambdaLR states beside the weights), with and without DDP's module. prefix."""
    path = tmp_path / f"release_{kind}.pt"
    torch.save(release_mci.release_checkpoint(release, kind), path)
    # strict: every key accounted for; the name comes from the text tower
    ours = load_model(str(path))
    assert ours.name == "mobilefetalclip"
    assert_same_outputs(ours, release, ours.image_size)


def test_official_files_load_strictly_into_the_release(release, student_pair, tmp_path):
    _, ours = student_pair
    torch.manual_seed(4)
    with torch.no_grad():
        for parameter in ours.parameters():  # weights unlike the release fixture's
            parameter.add_(0.01 * torch.randn_like(parameter))
    save_open_clip(ours, str(tmp_path / "official.pt"), official=True)
    target = release_mci.release_model(seed=5)
    target.load_state_dict(torch.load(tmp_path / "official.pt", weights_only=True), strict=True)
    assert_same_outputs(ours, target.eval(), ours.image_size)
    back = load_model(str(tmp_path / "official.pt"))  # and it reads back into ours
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="official=True writes the release's FastViT-MCi student"):
        save_open_clip(create_model("demo_student"), str(tmp_path / "no.pt"), official=True)


def meta_open_clip(config_name, context_length=117):
    """open_clip's own model on the meta device: its real keys and shapes, no memory (a 64 kB file for FetalCLIP)."""
    cfg = open_clip.get_model_config(config_name)
    cfg["text_cfg"]["context_length"] = context_length
    custom_text = cfg.pop("custom_text", False)
    with torch.device("meta"):
        return (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**cfg).state_dict()


def test_a_file_of_the_wrong_kind_is_named_in_one_line(tmp_path):
    """FetalCLIP's ViT offered as the student: the file, what its keys and shapes prove it holds, what was expected."""
    torch.save(meta_open_clip("ViT-L-14"), tmp_path / "FetalCLIP_weights.pt")
    expected = (
        r"FetalCLIP_weights.pt holds the FetalCLIP teacher \(ViT-L/14\) \('fetalclip'\), "
        r"not the 'mobilefetalclip'"
    )
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(create_model("mobilefetalclip"), str(tmp_path / "FetalCLIP_weights.pt"))
    good = tmp_path / "good.pt"
    torch.save(
        {"model": create_model("demo_student").state_dict(), "model_name": "demo_student"}, good
    )
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "notes.pt").write_text("hello")
    (tmp_path / "run").mkdir()
    for name, message in (
        ("empty.pt", "the file is empty"),
        ("truncated.pt", r".* \(an incomplete zip archive: an interrupted copy or save\?\)"),
        ("notes.pt", r".* \(not a torch file: it starts with b'hello'\)"),
        ("run", r"a folder, not a checkpoint file \(give the .pt file inside it\)"),
    ):
        with pytest.raises(ValueError, match=f"{name}: {message}") as error:
            load_model(str(tmp_path / name))
        assert "\n" not in str(error.value)


def test_files_are_identified_by_name_or_keys_and_shapes_never_one_width(
    release, monkeypatch, tmp_path
):
    """Registering a second 512-wide student (MobileCLIP2-S2's image tower, the same text tower) is one
    entry in MODEL_CONFIGS and every existing format is still identified; a file that fits two entries is
    not guessed."""
    configs = dict(model_lib.MODEL_CONFIGS)
    configs["mobileclip2_s2"] = dict(
        configs["mobilefetalclip"], image="fastvit_mci2", about="a MobileCLIP2-S2"
    )
    configs["demo_student_b"] = dict(
        configs["demo_student"], image_kwargs={}, about="another demo student"
    )
    monkeypatch.setattr(model_lib, "MODEL_CONFIGS", configs)
    mobileclip2 = meta_open_clip("MobileCLIP2-S0", 77)
    save_open_clip(create_model("demo_student"), str(tmp_path / "demo_student.pt"))
    files = {  # the file (as read), the model it holds
        "FetalCLIP, open_clip CLIP": (meta_open_clip("ViT-L-14"), "fetalclip"),
        "MobileCLIP2-S0, open_clip CustomTextCLIP, 77 positions": (mobileclip2, "mobilefetalclip"),
        "MobileCLIP2-S0, Apple's format": (to_apple_format(mobileclip2), "mobilefetalclip"),
        "the release's Apple-named trunk": (
            release_mci.release_checkpoint(release, "bare"),
            "mobilefetalclip",
        ),
        "MobileCLIP2-S2, open_clip": (meta_open_clip("MobileCLIP2-S2", 77), "mobileclip2_s2"),
        "demo student, open_clip": (
            torch.load(tmp_path / "demo_student.pt", weights_only=True),
            "demo_student",
        ),
        "ours, named": ({"model": {}, "model_name": "mobileclip2_s2"}, "mobileclip2_s2"),
    }
    for about, (checkpoint, name) in files.items():
        assert held_model_name(about, checkpoint) == name, about
    configs["mobilefetalclip_copy"] = configs["mobilefetalclip"]
    with pytest.raises(
        ValueError, match="fits mobilefetalclip and mobilefetalclip_copy alike: name it"
    ):
        held_model_name("student.pt", mobileclip2)
    with pytest.raises(
        ValueError,
        match="x.pt stores model_name 'demo_studnet', not one of .*did you mean 'demo_student'",
    ):
        held_model_name("x.pt", {"model": {}, "model_name": "demo_studnet"})


def test_the_finite_check_by_sums_is_exact_where_a_sum_overflows_or_cancels():
    """first_non_finite reads sums first: finite values whose sum overflows are finite; +inf and -inf in one
    tensor (their sum is NaN) and a half-precision inf are found, as a naive loop over every element finds
    them."""
    big = torch.full((4,), 3e38)  # finite, summing to inf in float32
    cases = [
        {"a": big, "b": torch.zeros(2, dtype=torch.int64)},
        {"a": big, "b": torch.tensor([float("inf"), -float("inf")])},
        {"a": torch.ones(3), "b": torch.tensor([6e4, 6e4, float("inf")], dtype=torch.float16)},
    ]
    for state_dict in cases:
        naive = next(
            (
                k
                for k, v in state_dict.items()
                if v.is_floating_point()
                for x in v.tolist()
                if not math.isfinite(x)
            ),
            "",
        )
        assert first_non_finite(state_dict) == naive
    assert [first_non_finite(c) for c in cases] == ["", "b", "b"]


def test_non_finite_tensors_are_refused_naming_them_and_load_model_returns_a_frozen_model(tmp_path):
    """A NaN weight or an inf BatchNorm statistic, in our files and in open_clip's: refused at load, named
    as the file names it. A loaded model is in eval mode and frozen: a user's forward pass moves no
    BatchNorm statistic."""
    net = create_model("demo_student")
    variance = next(k for k in net.state_dict() if k.endswith("running_var"))
    for key, value in ((variance, float("inf")), ("text.ln_final.weight", float("nan"))):
        state_dict = {k: v.clone() for k, v in net.state_dict().items()}
        state_dict[key].view(-1)[0] = value
        torch.save({"model": state_dict, "model_name": "demo_student"}, tmp_path / "ours.pt")
        with pytest.raises(ValueError, match=f"ours.pt: {re.escape(key)} holds NaN or inf values"):
            load_model(str(tmp_path / "ours.pt"))
    broken = create_model("demo_student")
    with torch.no_grad():
        broken.get_buffer(variance).fill_(float("nan"))
    save_open_clip(broken, str(tmp_path / "open_clip.pt"))
    trunk_key = re.escape(variance.replace("visual.", "visual.trunk.", 1))
    with pytest.raises(ValueError, match=f"open_clip.pt: {trunk_key} holds NaN or inf values"):
        load_model(str(tmp_path / "open_clip.pt"))
    torch.save({"model": net.state_dict(), "model_name": "demo_student"}, tmp_path / "good.pt")
    loaded = load_model(str(tmp_path / "good.pt"))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    loaded(torch.randn(4, 3, 56, 56), random_tokens(4, loaded.context_length))
    assert all(torch.equal(before[k], v) for k, v in loaded.state_dict().items())
    trainable = load_model(str(tmp_path / "good.pt"), trainable=True)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_reparameterised_student_matches(student_pair):
    _, ours = student_pair
    fused = reparameterize(ours)
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        expected = F.normalize(ours.eval().encode_image(images), dim=-1)
        actual = F.normalize(fused.encode_image(images), dim=-1)
    assert (actual - expected).abs().max() <= ATOL


def test_load_model_names_the_model_from_the_file(tmp_path):
    source = create_model("demo_student")
    torch.save({"model": source.state_dict(), "model_name": "demo_student"}, tmp_path / "ours.pt")
    assert load_model(str(tmp_path / "ours.pt")).name == "demo_student"
    # no name inside: identified by its keys and shapes
    save_open_clip(source, str(tmp_path / "open_clip.pt"))
    loaded = load_model(str(tmp_path / "open_clip.pt"))
    assert loaded.name == "demo_student"
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_key_and_shape_errors_name_the_problem(tmp_path):
    net = create_model("demo_student")
    state_dict = net.state_dict()
    state_dict.pop("text.ln_final.weight")
    state_dict["visual.extra"] = torch.zeros(1)
    torch.save(state_dict, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"text\.ln_final\.weight.*visual\.extra"):
        load_checkpoint(net, str(tmp_path / "bad.pt"))
    state_dict = net.state_dict()
    state_dict["logit_scale"] = torch.zeros(2)
    torch.save(state_dict, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"logit_scale has shape \(2,\)"):
        load_checkpoint(net, str(tmp_path / "shape.pt"))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(net, str(tmp_path / "nowhere.pt"))
    with pytest.raises(ValueError, match="unknown model 'vit_huge'"):
        create_model("vit_huge")


class RunsCode:
    """An object whose unpickling would execute a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"logit_scale": torch.zeros(())}, "payload": RunsCode(marker)}, path)
    # torch's own message, a paragraph advising weights_only=False, is not passed on
    expected = "weights-only torch checkpoint (it holds a Python object, posix.system, that only running code"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_checkpoint(create_model("demo_student"), str(path))
    assert not marker.exists()
