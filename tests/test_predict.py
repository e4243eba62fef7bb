"""predict.py run as a user runs it on a folder of scans: the same pixels give the same answer whatever the
file format, rows per frame and view, clips with their best frames, GA only where it can be measured
(checked against evaluate.py's own HC18 functions), the user's own classes, outputs that replace the last
run's, and bad input."""

import csv
import errno
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import model
import predict
import protocol
from test_scans import region, write_dicom
from tools import synthetic


@pytest.fixture(scope="module", autouse=True)
def cache_folder(tmp_path_factory):
    """The prompt features and ONNX encoders of this module's checkpoints, away from the user's cache."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOBILEFETALCLIP_CACHE", str(folder))
        yield folder


def save(net, path):
    torch.save({"model": net.state_dict(), "model_name": net.name}, path)
    return str(path)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    torch.manual_seed(0)
    return save(model.create_model("demo_student"), tmp_path_factory.mktemp("ckpt") / "student.pt")


@pytest.fixture(scope="module")
def brain_student(tmp_path_factory):
    """A student whose every image embedding is the brain class's: each frame is a brain plane."""
    torch.manual_seed(0)
    net = model.create_model("demo_student").eval()
    brain = evaluate.class_embeddings(net, {"brain": protocol.PROMPTS["five_planes"]["brain"]})[0]
    head = net.visual.get_classifier()
    with torch.no_grad():
        head.weight.zero_(), head.bias.copy_(brain)
    return save(net, tmp_path_factory.mktemp("ckpt") / "brain.pt")


def scan(seed=0, width=160, height=120):
    rng = np.random.default_rng(seed)
    # (H, W) uint8
    return synthetic.render_scan(rng, "brain", "trans-thalamic", 250, 0.3, width, height)


def run(*arguments):
    rows, clips, skipped, ignored = predict.main([str(a) for a in arguments])
    return rows, clips, skipped, ignored


def test_the_same_pixels_as_png_16_bit_png_and_dicom_give_the_same_probabilities(student, tmp_path):
    pixels = scan()
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "a.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(folder / "b16.png")
    write_dicom(folder / "c.dcm", pixels)
    write_dicom(folder / "d.dcm", np.repeat(pixels[..., None], 3, -1), "RGB")
    rows, _, skipped, _ = run(student, folder, f"--out_dir={tmp_path / 'out'}")
    assert [r["file"].split("/")[-1] for r in rows] == [
        "a.png",
        "b16.png",
        "c.dcm",
        "d.dcm",
    ] and not skipped
    for row in rows[1:]:
        assert row["probs"] == pytest.approx(rows[0]["probs"], abs=1e-5), row["file"]
    assert sum(rows[0]["probs"].values()) == pytest.approx(1, abs=1e-4)


def test_rows_per_frame_and_view_clips_and_outputs_that_replace_the_last_run(student, tmp_path):
    frames = np.stack([scan(seed) for seed in range(4)])[:, :100, :]  # (4, 100, 160)
    regions = [
        region(0, 0, 79, 99),
        region(80, 0, 159, 99),
        region(0, 0, 159, 99, spatial=3, kind=3),
    ]
    cine = write_dicom(tmp_path / "cine.dcm", frames, regions=regions)
    out, saved = tmp_path / "out", tmp_path / "frames"
    (out / "timelines").mkdir(parents=True)
    (out / "timelines" / "stale.png").write_bytes(b"an older run's")
    rows, clips, _, _ = run(student, cine, f"--out_dir={out}", f"--save_frames={saved}")
    assert [(r["frame"], r["region"]) for r in rows] == [(f, v) for f in range(4) for v in (0, 1)]
    assert [(c["region"], c["frames"]) for c in clips] == [(0, 4), (1, 4)]
    for clip in clips:
        members = [r for r in rows if r["region"] == clip["region"]]
        for name, best in clip["best_frames"].items():
            assert best["prob"] == max(r["probs"][name] for r in members)
        mean = {c: np.mean([r["probs"][c] for r in members]) for c in members[0]["probs"]}
        assert clip["label"] == max(mean, key=mean.get)
    document = json.loads((out / "predictions.json").read_text())
    assert (
        document["produced_by"]["sha256"] == hashlib.sha256(open(student, "rb").read()).hexdigest()
    )
    assert (
        document["produced_by"]["model"] == "demo_student"
        and document["produced_by"]["versions"]["pydicom"]
    )
    assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 8
    # the older run's timeline is gone
    assert sorted(p.name for p in (out / "timelines").iterdir()) == [
        "cine.dcm_r0.png".join(["_".join(str(tmp_path).strip("/").split("/")) + "_", ""]),
        "cine.dcm_r1.png".join(["_".join(str(tmp_path).strip("/").split("/")) + "_", ""]),
    ]
    assert Image.open(rows[3]["saved"]).size == (56, 56)  # the model's input, as the model saw it


def test_ga_only_for_measurable_calibrated_brain_views_at_the_model_inputs_spacing(
    brain_student, tmp_path
):
    frames = np.stack([scan(seed, 320, 140) for seed in range(2)])  # two views of 160 x 140 px
    regions = [region(0, 0, 159, 139, delta_cm=0.02), region(160, 0, 319, 139, delta_cm=0.025)]
    files = [
        write_dicom(tmp_path / "dual.dcm", frames, regions=regions),
        tmp_path / "plain.png",
        tmp_path / "small.png",
    ]
    Image.fromarray(scan(6, 160, 120)).save(files[1])  # 160 px x 0.2 mm given: region 0's spacing
    Image.fromarray(scan(5, 100, 80)).save(files[2])  # 100 px x 0.2 mm: 20 mm across, no head fits
    files.append(
        write_dicom(tmp_path / "nocm.dcm", scan(7), regions=[region(0, 0, 159, 119, units=0)])
    )
    rows, _, _, _ = run(brain_student, *files, "--pixel_size=0.2", f"--out_dir={tmp_path / 'out'}")
    net = model.load_model(brain_student)
    with torch.no_grad():
        feature = torch.nn.functional.normalize(net.encode_image(torch.zeros(1, 3, 56, 56)), dim=-1)
    for row, mm in zip(rows[:2], (0.2, 0.25)):  # the file's calibration wins over --pixel_size
        spacing = f"{160 / 56 * mm:.2f}"  # the crop's longer side, padded and resized to 56 px
        days = protocol.ga_prediction(evaluate.ga_scores(net, feature, [spacing])[0])[0]
        assert (row["label"], row["ga_days"], row["ga_spacing_mm"]) == (
            "brain",
            days,
            float(spacing),
        )
        assert (
            row["ga"] == f"{days // 7}w{days % 7}d" and row["subplane"] in protocol.BRAIN_SUBPLANES
        )
    plain, small, nocm = rows[4:]
    assert (plain["ga_days"], plain["spacing_source"]) == (rows[0]["ga_days"], "given")
    assert small["ga_days"] is None and "spans 20 mm" in small["ga_note"]
    assert nocm["ga_days"] is None and "not cm" in nocm["ga_note"]


def test_your_own_classes_replace_the_planes(student, tmp_path):
    prompts = tmp_path / "classes.json"
    prompts.write_text(
        json.dumps({"four chamber": ["a four chamber view"], "other": ["an ultrasound image"]})
    )
    Image.fromarray(scan()).save(tmp_path / "a.png")
    rows, _, _, _ = run(
        student, tmp_path / "a.png", f"--prompts={prompts}", f"--out_dir={tmp_path / 'out'}"
    )
    assert (
        list(rows[0]["probs"]) == ["four chamber", "other"]
        and "subplane" not in rows[0]
        and "ga" not in rows[0]
    )
    header = next(csv.reader(open(tmp_path / "out" / "predictions.csv")))
    assert header[-2:] == ["p_four chamber", "p_other"]


def test_bad_files_are_skipped_bad_values_refused_in_one_line(student, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.fromarray(scan()).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    rows, _, skipped, _ = run(student, folder, f"--out_dir={tmp_path / 'out'}")
    assert len(rows) == 1 and [s["file"].split("/")[-1] for s in skipped] == ["broken.png"]
    for value in ("0", "nan", "inf", "1e9", "-0.5"):
        with pytest.raises(
            SystemExit,
            match=f"predict.py: --pixel_size={float(value)!r}: expected a pixel size in mm",
        ):
            run(student, folder, f"--pixel_size={value}")
    (tmp_path / "bad.json").write_text("{'brain': ['x']}")
    with pytest.raises(SystemExit, match="predict.py: .*bad.json: not valid JSON"):
        run(student, folder, f"--prompts={tmp_path / 'bad.json'}")
    with pytest.raises(SystemExit, match=r"predict.py: no frame was predicted \(1 files skipped"):
        run(student, folder / "broken.png", f"--out_dir={tmp_path / 'none'}")
    document = json.loads((tmp_path / "none" / "predictions.json").read_text())
    assert document["rows"] == [] and "broken.png" in document["skipped"][0]["file"]
    with pytest.raises(SystemExit, match="usage: python predict.py CKPT PATH"):
        run(student)
    weights = torch.load(student, weights_only=True)
    weights["model"]["visual.bn1.running_mean"][3] = float("inf")
    torch.save(weights, tmp_path / "inf.pt")
    with pytest.raises(
        SystemExit, match="predict.py: .*inf.pt: visual.bn1.running_mean holds NaN or inf values"
    ):
        run(tmp_path / "inf.pt", folder, f"--out_dir={tmp_path / 'never'}")
    assert not (tmp_path / "never").exists()  # refused before any prediction
    assert math.isfinite(rows[0]["probs"]["brain"])


def old_run(out):
    """An earlier run's complete set in out/, to see that it is replaced as a whole or left as it was."""
    (out / "timelines").mkdir(parents=True)
    (out / "timelines" / "old.png").write_bytes(b"an older run's timeline")
    (out / "predictions.json").write_text('{"rows": "old"}')
    (out / "predictions.csv").write_text("old\n")


def test_a_name_that_is_not_utf8_is_kept_escaped_and_the_folder_replaced_as_one(student, tmp_path):
    """Before: a one-line encode error, leaving the new predictions.json and timelines beside the old CSV."""
    import codecs

    folder, out = tmp_path / "scans", tmp_path / "out"
    folder.mkdir()
    name = os.fsencode(folder) + b"/caf\xe9.png"  # Latin-1, as an old export names it
    Image.fromarray(scan()).save(os.fsdecode(name))
    old_run(out)
    rows, _, _, _ = run(student, folder, f"--out_dir={out}")
    document = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    (line,) = csv.DictReader(open(out / "predictions.csv", encoding="utf-8"))
    assert (
        document["rows"][0]["file"]
        == line["file"]
        == rows[0]["file"]
        == os.fsencode(folder).decode() + "/caf\\xe9.png"
    )
    assert codecs.escape_decode(line["file"].encode())[0] == name  # the name's bytes come back
    assert sorted(os.listdir(out)) == ["predictions.csv", "predictions.json", "timelines"]
    assert os.listdir(out / "timelines") == []  # the older run's timeline is gone with its set
    assert sorted(os.listdir(tmp_path)) == ["out", "scans"]  # no temporary folder left beside


def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_the_last_run_whole(
    student, tmp_path, monkeypatch
):
    """Before: a traceback, the new predictions.json beside the old predictions.csv."""
    Image.fromarray(scan()).save(tmp_path / "a.png")
    out = tmp_path / "out"
    old_run(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    write_text = Path.write_text

    def full_at_the_csv(path, text, *args, **kwargs):
        if path.name == "predictions.csv":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_at_the_csv)
    with pytest.raises(SystemExit) as refused:
        run(student, tmp_path / "a.png", f"--out_dir={out}")
    assert str(refused.value) == (
        f"predict.py: {out}: cannot write the predictions (No space left on device); the folder is left as it was"
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["a.png", "out"]  # the temporary folder is gone


def test_out_dir_and_save_frames_are_checked_before_any_work(tmp_path):
    """Before: a traceback after every scan was predicted. The checkpoint is missing: these come first."""
    Image.fromarray(scan()).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("mine")
    file, out = tmp_path / "a.png", tmp_path / "out"
    cases = [
        ([f"--out_dir={file}"], f"--out_dir={file}: {file} is a file, not a folder"),
        (
            [f"--save_frames={file / 'x'}"],
            f"--save_frames={file / 'x'}: {file} is a file, not a folder",
        ),
        (
            [f"--out_dir={tmp_path}"],
            "did not write (a.png, notes.txt), and it is replaced as a whole",
        ),
        (
            [f"--out_dir={out}", f"--save_frames={out / 'f'}"],
            f"is inside --out_dir={out}, which is replaced",
        ),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit, match=f"^predict.py: .*{re.escape(message)}"):
            run(tmp_path / "missing.pt", file, *flags)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "notes.txt"]


def test_the_new_set_replaces_the_old_in_one_step_where_linux_can(tmp_path):
    """configurator.exchange (renameat2 RENAME_EXCHANGE): no instant in which out_dir is missing."""
    import configurator

    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "predictions.json").write_text("new")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "predictions.json").write_text("old")
    if not configurator.exchange(tmp_path / "new", tmp_path / "out"):
        pytest.skip(
            "this system or file system cannot swap two folders in one step (README: what a kill leaves)"
        )
    assert (tmp_path / "out" / "predictions.json").read_text() == "new"
    assert (tmp_path / "new" / "predictions.json").read_text() == "old"


# ------------------------------------------------------------------ the fast path: the eager model's answers


def cine_and_still(folder):
    """A 5-frame DICOM cine and a PNG: batches of 2 cross the file boundary."""
    folder.mkdir()
    write_dicom(folder / "cine.dcm", np.stack([scan(seed) for seed in range(5)]))
    Image.fromarray(scan(7)).save(folder / "still.png")
    return folder


def test_onnx_and_reparameterised_encoders_give_the_eager_models_rows(
    student, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MOBILEFETALCLIP_CACHE", str(tmp_path / "cache"))
    scans_folder = cine_and_still(tmp_path / "scans")
    options = [student, scans_folder, "--batch_size=2", f"--out_dir={tmp_path / 'out'}"]
    eager, _, _, _ = run(*options, "--encoder=eager")
    for encoder in ("onnx", "onnx", "torch"):  # the second onnx run reads the exported file back
        capsys.readouterr()
        rows, _, _, _ = run(*options, f"--encoder={encoder}")
        assert [(r["file"], r["frame"]) for r in rows] == [(r["file"], r["frame"]) for r in eager]
        for fast, reference in zip(rows, eager):
            assert fast["label"] == reference["label"]
            assert fast["probs"] == pytest.approx(reference["probs"], abs=1e-5, rel=0)
    sha256 = hashlib.sha256(open(student, "rb").read()).hexdigest()
    assert [p.name for p in (tmp_path / "cache" / "onnx").iterdir()] == [
        f"{sha256}-demo_student.onnx"
    ]
    # the torch run, as the second onnx one, exports nothing
    assert "exporting" not in capsys.readouterr().out


def test_an_onnx_encoder_of_another_checkpoint_is_never_used(
    student, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MOBILEFETALCLIP_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(1)
    other = save(model.create_model("demo_student"), tmp_path / "other.pt")
    scans_folder = cine_and_still(tmp_path / "scans")
    run(student, scans_folder, f"--out_dir={tmp_path / 'out'}")
    (exported,) = (tmp_path / "cache" / "onnx").iterdir()
    sha256 = hashlib.sha256(open(other, "rb").read()).hexdigest()
    # the student's, as the other's
    exported.rename(exported.with_name(f"{sha256}-demo_student.onnx"))
    capsys.readouterr()
    rows, _, _, _ = run(other, scans_folder, f"--out_dir={tmp_path / 'out'}")
    assert "exporting the image encoder" in capsys.readouterr().out
    eager, _, _, _ = run(other, scans_folder, f"--out_dir={tmp_path / 'out'}", "--encoder=eager")
    for fast, reference in zip(rows, eager):
        assert fast["probs"] == pytest.approx(reference["probs"], abs=1e-5, rel=0)
    # a file whose exporter's version is not this torch's (here: not said, as before it was) is exported again
    (exported,) = (tmp_path / "cache" / "onnx").iterdir()
    predict.stamp(exported, {"sha256": sha256, "model": "demo_student"})
    capsys.readouterr()
    run(other, scans_folder, f"--out_dir={tmp_path / 'out'}")
    assert "exporting the image encoder" in capsys.readouterr().out


def test_frames_prefetched_in_a_thread_keep_their_order_and_its_errors_reach_the_caller():
    def produced():
        yield from range(5)
        raise KeyError("the producer's error")

    received = []
    with pytest.raises(KeyError, match="the producer's error"):
        for item in predict.prefetched(produced(), depth=2):
            received.append(item)
    assert received == list(range(5))


# ------------------------------------------------------------------ read once, written where asked


def test_a_run_inside_the_folder_it_reads_never_reads_its_own_outputs_or_a_file_twice(
    student, tmp_path
):
    """Before: a second run classified the first run's timelines and frames as scans, and a file named
    twice became a clip of twice its frames (an image, a 2-frame clip)."""
    folder = cine_and_still(tmp_path / "scans")
    out, frames = folder / "predictions", folder / "frames"
    options = [folder, folder / "still.png", f"--out_dir={out}", f"--save_frames={frames}"]
    first, first_clips, _, _ = run(student, *options)
    second, clips, skipped, ignored = run(student, *options)
    assert [(r["file"], r["frame"]) for r in second] == [(r["file"], r["frame"]) for r in first]
    assert len(second) == 6 and [c["frames"] for c in clips] == [5] and not skipped
    assert ignored == [
        {
            "file": str(frames),
            "reason": "predict.py's folder of model inputs (--save_frames), not read",
        },
        {"file": str(out), "reason": "predict.py's output folder (--out_dir), not read"},
        {
            "file": str(folder / "still.png"),
            "reason": f"the same file as {folder / 'still.png'}, read there once",
        },
    ]
    document = json.loads((out / "predictions.json").read_text())
    assert document["produced_by"]["encoder"] == "onnx"
    assert document["produced_by"]["versions"]["onnxruntime"]


def test_out_dir_through_a_link_replaces_the_folder_it_points_to(student, tmp_path):
    """Before: the link itself was replaced by a folder, then the run failed saying the folder was left as
    it was."""
    Image.fromarray(scan()).save(tmp_path / "a.png")
    (tmp_path / "results").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "results")
    for _ in range(2):  # the second run replaces the first's set, through the link again
        run(student, tmp_path / "a.png", f"--out_dir={tmp_path / 'link'}")
    assert (tmp_path / "link").is_symlink()
    assert sorted(os.listdir(tmp_path / "results")) == sorted(predict.OUTPUTS)
    assert sorted(os.listdir(tmp_path)) == ["a.png", "link", "results"]


def test_class_names_and_an_empty_out_dir_that_cannot_work_are_refused_before_any_work(tmp_path):
    """Before: a class 'subplane' wrote a second p_subplane column over the sub-plane's, a class '' a column
    'p_', and --out_dir= failed after every scan was predicted. The checkpoint is missing: these come first."""
    Image.fromarray(scan()).save(tmp_path / "a.png")
    (tmp_path / "sub.json").write_text(json.dumps({"subplane": ["a"], "abdomen": ["b"]}))
    (tmp_path / "blank.json").write_text(json.dumps({" ": ["a"], "abdomen": ["b"]}))
    cases = [
        ("--out_dir=", "--out_dir is empty: expected a folder for the predictions"),
        (
            f"--prompts={tmp_path / 'sub.json'}",
            "class 'subplane' would write column p_subplane, which predictions.csv already has",
        ),
        (f"--prompts={tmp_path / 'blank.json'}", "a class is named ' '; give every class a name"),
    ]
    for flag, message in cases:
        with pytest.raises(SystemExit, match=f"^predict.py: .*{re.escape(message)}"):
            run(tmp_path / "missing.pt", tmp_path / "a.png", flag)


def test_a_note_is_written_once_where_the_spacing_is_why_there_is_no_ga(brain_student, tmp_path):
    """Before: 'the file carries no calibration (give pixel_size); the file carries no calibration ...'."""
    Image.fromarray(scan()).save(tmp_path / "a.png")
    run(brain_student, tmp_path / "a.png", f"--out_dir={tmp_path / 'out'}")
    (line,) = csv.DictReader(open(tmp_path / "out" / "predictions.csv"))
    assert (line["label"], line["note"]) == (
        "brain",
        "the file carries no calibration (give pixel_size)",
    )
