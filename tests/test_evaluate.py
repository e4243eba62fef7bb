"""evaluate.py: the fast HC18 path, an end-to-end run on small files in the real Planes DB / HC18 layouts,
the user's tasks and one-line errors (the protocol's metrics on hand-built cases:
tests/test_protocol.py)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import evaluate
import model
import protocol


class TinyCLIP(nn.Module):
    """Stand-in exposing the model contract: a pooled-pixel image tower and a bag-of-tokens text tower."""

    image_size, image_mean, image_std, context_length = 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 117

    def __init__(self, dim=16):
        super().__init__()
        torch.manual_seed(0)
        self.name, self.embed_dim = "tiny", dim
        self.image_proj = nn.Linear(3 * 4 * 4, dim)
        self.token_embedding = nn.Embedding(49408, dim)
        self.text_proj = nn.Linear(dim, dim)

    def encode_image(self, images):
        return self.image_proj(F.adaptive_avg_pool2d(images, 4).flatten(1))

    def encode_text(self, tokens):
        mask = (tokens > 0).float()[..., None]
        return self.text_proj((self.token_embedding(tokens) * mask).sum(1) / mask.sum(1))

    def forward(self, images, tokens):
        return (
            F.normalize(self.encode_image(images), dim=-1),
            F.normalize(self.encode_text(tokens), dim=-1),
            torch.tensor(100.0),
        )


# ------------------------------------------------------------------ HC18 GA prompts


def test_cached_and_per_image_ga_scores_are_identical():
    model = TinyCLIP().eval()
    features = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    spacings = ["0.25", "0.31", "0.25"]
    fast, fast_n = evaluate.ga_scores(model, features, spacings, cache_text=True)
    slow, slow_n = evaluate.ga_scores(model, features, spacings, cache_text=False)
    np.testing.assert_array_equal(fast, slow)
    assert fast.shape == (3, 175) and (fast_n, slow_n) == (2 * 875, 3 * 875)
    assert not np.array_equal(fast[0], fast[1])  # the spacing string does reach the scores


# ------------------------------------------------------------------ prompts: batched, cached on disk


class CountingTextTower:
    """Wraps a model, counting encode_text's forward passes."""

    def __init__(self, net):
        self.net, self.passes = net, 0

    def __getattr__(self, name):
        return getattr(self.net, name)

    def encode_text(self, tokens):
        self.passes += 1
        return self.net.encode_text(tokens)


def one_pass_per_class(net, prompts_by_class):
    """The old way (a reference written apart): each class's prompts in one pass, normalised, averaged."""
    means = []
    for texts in prompts_by_class.values():
        tokens = data.tokenize(texts, context_length=net.context_length)
        means.append(F.normalize(net.encode_text(tokens), dim=-1).mean(0))
    return F.normalize(torch.stack(means), dim=-1)


@torch.no_grad()
def test_class_prompts_are_encoded_in_batches_across_classes_as_one_pass_per_class(monkeypatch):
    torch.manual_seed(0)
    net = CountingTextTower(model.create_model("demo_student").eval())
    prompts = protocol.PROMPTS["five_planes"]  # 9 classes
    every = sum(len(texts) for texts in prompts.values())
    monkeypatch.setattr(evaluate, "PROMPT_BATCH", 16)
    batched = evaluate.class_embeddings(net, prompts)
    assert net.passes == math.ceil(every / 16) < len(prompts)
    torch.testing.assert_close(batched, one_pass_per_class(net.net, prompts), atol=1e-5, rtol=0)


@torch.no_grad()
def test_prompt_features_are_cached_per_checkpoint_model_prompts_and_spacing(tmp_path):
    torch.manual_seed(0)
    net = CountingTextTower(model.create_model("demo_student").eval())
    prompts = {"a": ["fetal brain", "a fetal brain"], "b": ["fetal femur"]}
    first = evaluate.PromptCache("a" * 64, net.name, tmp_path)
    reference = evaluate.class_embeddings(net, prompts, prompt_cache=first)
    assert net.passes == 1
    again = evaluate.class_embeddings(
        net, prompts, prompt_cache=evaluate.PromptCache("a" * 64, net.name, tmp_path)
    )
    assert net.passes == 1 and torch.equal(again, reference)  # read back, not encoded
    evaluate.class_embeddings(net, {**prompts, "b": ["fetal thorax"]}, prompt_cache=first)
    evaluate.class_embeddings(
        net, prompts, prompt_cache=evaluate.PromptCache("a" * 64, "x", tmp_path)
    )
    assert net.passes == 3  # other prompts, another model: encoded again
    evaluate.ga_text_features(net, "0.20", prompt_cache=first)
    evaluate.ga_text_features(net, "0.21", prompt_cache=first)
    passes = net.passes
    torch.testing.assert_close(
        evaluate.ga_text_features(net, "0.21", prompt_cache=first),
        evaluate.ga_text_features(net, "0.21"),
    )
    # only the uncached call encoded
    assert net.passes == passes + math.ceil(875 / evaluate.PROMPT_BATCH)
    files = sorted((tmp_path / "text").iterdir())
    assert len(files) == 5 and all(f.suffix == ".pt" for f in files)  # no temporary file left


@torch.no_grad()
def test_a_cached_file_of_another_checkpoint_is_never_used(tmp_path):
    """The key is checked on read: a file holding another checkpoint's key under this one's name is encoded
    again, as is a damaged file."""
    torch.manual_seed(0)
    net = CountingTextTower(model.create_model("demo_student").eval())
    prompts = {"a": ["fetal brain"], "b": ["fetal femur"]}
    mine, other = (evaluate.PromptCache(c * 64, net.name, tmp_path) for c in "ab")
    evaluate.class_embeddings(net, prompts, prompt_cache=mine)
    (mine_file,) = (tmp_path / "text").iterdir()
    expected = evaluate.class_embeddings(net, prompts, prompt_cache=other)
    (other_file,) = set((tmp_path / "text").iterdir()) - {mine_file}
    foreign = torch.load(mine_file, weights_only=True)
    foreign["features"] = torch.zeros_like(foreign["features"])
    torch.save(foreign, other_file)  # the other checkpoint's key and zeros, under this one's name
    assert net.passes == 2
    torch.testing.assert_close(
        evaluate.class_embeddings(net, prompts, prompt_cache=other), expected
    )
    other_file.write_bytes(b"truncated")
    torch.testing.assert_close(
        evaluate.class_embeddings(net, prompts, prompt_cache=other), expected
    )
    assert (
        net.passes == 4 and torch.load(other_file, weights_only=True)["key"]["sha256"] == "b" * 64
    )


def test_the_cache_folder_follows_xdg_and_its_override(tmp_path, monkeypatch):
    monkeypatch.delenv("MOBILEFETALCLIP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert evaluate.cache_folder() == tmp_path / "xdg" / "mobilefetalclip"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert evaluate.cache_folder() == Path.home() / ".cache" / "mobilefetalclip"
    monkeypatch.setenv("MOBILEFETALCLIP_CACHE", str(tmp_path / "mine"))
    assert evaluate.cache_folder() == tmp_path / "mine"


# ------------------------------------------------------------------ end to end


def write_benchmark(root):
    """A tiny Planes DB and HC18 in the real layouts."""
    planes, hc18 = root / "planes", root / "hc18"
    (planes / "Images").mkdir(parents=True)
    (hc18 / "training_set").mkdir(parents=True)
    rng = np.random.default_rng(0)
    kinds = [
        ("Fetal brain", "Trans-thalamic"),
        ("Fetal brain", "Trans-cerebellum"),
        ("Fetal brain", "Trans-ventricular"),
        ("Fetal brain", "Other"),
        ("Fetal abdomen", "Not A Brain"),
        ("Fetal thorax", "Not A Brain"),
        ("Fetal femur", "Not A Brain"),
        ("Maternal cervix", "Not A Brain"),
        ("Other", "Not A Brain"),
    ]
    lines = ["Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train "]
    for i in range(2 * len(kinds)):
        plane, brain = kinds[i % len(kinds)]
        name = f"Patient{i:05d}_Plane1_1_of_1"
        Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8)).save(
            planes / "Images" / f"{name}.png"
        )
        lines.append(f"{name};{i % 7};{plane};{brain};Op. 1;Voluson E6;{int(i % 3 != 0)}")
    (planes / "FETAL_PLANES_DB_data.csv").write_text("\n".join(lines) + "\n")
    lines = ["filename,pixel size(mm),head circumference (mm)"]
    for i, hc in enumerate([44.3, 100.0, 150.2, 220.5, 342.0, 350.1]):
        name = f"{i:03d}_HC.png" if i % 2 else f"{i - 1:03d}_2HC.png" if i else "000_HC.png"
        Image.fromarray(rng.integers(0, 255, (54, 80), dtype=np.uint8)).save(
            hc18 / "training_set" / name
        )
        lines.append(f"{name},{0.1 + 0.02 * (i % 2)},{hc}")
    (hc18 / "training_set_pixel_size_and_HC.csv").write_text("\n".join(lines) + "\n")
    return planes, hc18


def test_zero_shot_end_to_end_on_real_layouts(tmp_path):
    planes, hc18 = write_benchmark(tmp_path)
    model = TinyCLIP().train()
    r = evaluate.zero_shot(model, planes, hc18, batch_size=4)
    assert model.training  # mode restored
    assert r["five_planes"]["n"] == 16 and r["brain_subplanes"]["n"] == 6  # 'Other' / brain drops
    assert set(r["five_planes"]["per_class"]) <= {"abdomen", "brain", "femur", "heart", "cervix"}
    assert set(r["brain_subplanes"]["per_class"]) == set(protocol.BRAIN_SUBPLANES)
    assert r["hc18"]["n"] == 4 and r["hc18"]["n_images"] == 6  # 100 <= HC <= 342 mm
    assert r["hc18"][
        "excluded"
    ] == 2 and "2 of 6 images outside 100-342 mm excluded" in evaluate.format_table(r)
    assert r["hc18"]["text_encodings"] == 875 * 2  # 2 distinct spacing strings
    assert r["f1_all"] == pytest.approx(
        (5 * r["five_planes"]["f1"] + 3 * r["brain_subplanes"]["f1"]) / 8
    )
    assert r["avg"] == pytest.approx((r["f1_all"] + r["hc18"]["validity"] / 100) / 2)
    json.dumps(evaluate.plain(r), allow_nan=False)
    assert "Five planes" in evaluate.format_table(r)


def test_select_and_report_splits_are_patient_disjoint(tmp_path):
    planes, hc18 = write_benchmark(tmp_path)
    for rows, patient in (
        (lambda s: protocol.planes_rows(planes, s), lambda r: r["patient"]),
        (lambda s: protocol.hc18_rows(hc18, s), lambda r: r["filename"].split("_")[0]),
    ):
        every, select, report = rows("all"), rows("select"), rows("report")
        assert len(select) + len(report) == len(every) and select and report
        assert not {patient(r) for r in select} & {patient(r) for r in report}


def test_missing_data_folder_is_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m tools.synthetic"):
        evaluate.zero_shot(TinyCLIP(), tmp_path / "nowhere", tmp_path / "nowhere")


def test_cli_on_the_generated_benchmark(tmp_path, capsys, monkeypatch):
    from tools import synthetic

    synthetic.write_planes(str(tmp_path / "planes"), 0, 21, 64, 48)  # one cycle of its 21 kinds
    synthetic.write_hc18(str(tmp_path / "hc18"), 0, 2)
    (tmp_path / "best.pt").write_bytes(b"")  # the loader is stubbed below
    monkeypatch.setattr(evaluate, "load_model", lambda path, name="": TinyCLIP())
    args = [
        str(tmp_path / "best.pt"),
        f"--planes_dir={tmp_path / 'planes'}",
        f"--hc18_dir={tmp_path / 'hc18'}",
    ]
    evaluate.main(args + ["--device=cpu", "--batch_size=8"])
    table = capsys.readouterr().out
    # 2 'Other'
    assert "Five planes (n=19)" in table and "Brain sub-planes (n=6)" in table and "F1-all" in table
    saved = json.loads((tmp_path / "best_zeroshot.json").read_text())
    assert {"five_planes", "brain_subplanes", "hc18", "f1_all", "avg"} <= set(saved)
    assert saved["hc18"]["n_images"] == 2 and "f1" in saved["brain_subplanes"]
    with pytest.raises(SystemExit, match="python -m tools.synthetic"):
        evaluate.main([str(tmp_path / "best.pt"), f"--planes_dir={tmp_path / 'missing'}"])


def test_the_cli_encodes_a_checkpoints_prompts_once_and_reads_them_back(tmp_path, monkeypatch):
    """evaluate.py twice on one checkpoint: the second run encodes no prompt (class and GA prompts from the
    cache, keyed by the file's sha256) and writes the same figures; another file's run encodes its own."""
    from tools import synthetic

    synthetic.write_planes(str(tmp_path / "planes"), 0, 21, 64, 48)
    synthetic.write_hc18(str(tmp_path / "hc18"), 0, 2)
    monkeypatch.setattr(evaluate, "load_model", lambda path, name="": TinyCLIP())
    encode_prompts, encoded = evaluate.encode_prompts, []  # per run: the prompts of each encoding

    def counted(model, prompts, *args, **kwargs):
        encoded[-1].append(len(prompts))
        return encode_prompts(model, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate, "encode_prompts", counted)
    figures = []
    for content in (b"one checkpoint", b"one checkpoint", b"another checkpoint"):
        encoded.append([])
        (tmp_path / "best.pt").write_bytes(
            content
        )  # the loader is stubbed: only the bytes' hash counts
        arguments = [str(tmp_path / "best.pt"), f"--planes_dir={tmp_path / 'planes'}"]
        arguments += [f"--hc18_dir={tmp_path / 'hc18'}", f"--cache_dir={tmp_path / 'cache'}"]
        evaluate.main(arguments)
        figures.append((tmp_path / "best_zeroshot.json").read_text())
    five = sum(len(prompts) for prompts in protocol.PROMPTS["five_planes"].values())
    three = sum(len(prompts) for prompts in protocol.PROMPTS["brain_subplanes"].values())
    ga = 875  # 5 templates x 175 days
    # the two HC18 scans share a spacing
    assert encoded == [[five, three, ga], [], [five, three, ga]]
    assert figures[0] == figures[1] == figures[2]


# ------------------------------------------------------------------ your own tasks


def planes_as_task(planes, folder, prompts=None):
    """The Planes DB's five-plane rows as a user's task folder: one sub-folder per class, the protocol's prompts."""
    for row in protocol.planes_rows(planes):
        if row["five"] >= 0:
            target = folder / protocol.FIVE_PLANES[row["five"]] / Path(row["path"]).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(row["path"], target)
    (folder / "prompts.json").write_text(json.dumps(prompts or protocol.PROMPTS["five_planes"]))
    return folder


def test_a_task_folder_of_the_planes_gives_exactly_the_protocols_five_plane_figures(tmp_path):
    planes, _ = write_benchmark(tmp_path)
    task = evaluate.read_task(planes_as_task(planes, tmp_path / "my_planes"))
    # four classes without a folder stay candidates
    assert len(task.prompts) == 9 and len(set(task.labels)) == 5
    r = evaluate.zero_shot(TinyCLIP(), planes, tasks=[task], batch_size=4)
    protocol, mine = r["five_planes"], r["tasks"]["my_planes"]
    for key in (
        "f1",
        "accuracy",
        "top2",
        "top3",
        "pooled_accuracy",
        "pooled_top2",
        "pooled_top3",
        "n",
        "per_class",
    ):
        assert mine[key] == protocol[key], key
    assert mine["f1_ci_low"] <= mine["f1"] <= mine["f1_ci_high"] and mine["files"] == 16
    assert (
        "hc18" not in r
        and "avg" not in r
        and r["selection"] == {"value": r["selection"]["value"], "rule": "F1-all"}
    )
    assert "Task my_planes (n=16)" in evaluate.format_table(
        r
    ) and "my_planes F1" in evaluate.summary(r)


def test_every_view_of_a_clip_counts_and_the_cli_runs_tasks_alone(tmp_path, monkeypatch, capsys):
    from test_scans import region, write_dicom

    folder = tmp_path / "echo"
    for name in ("four_chamber", "other"):
        (folder / name).mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_dicom(
        folder / "four_chamber" / "loop",
        rng.integers(0, 255, (3, 40, 80), dtype=np.uint8),
        regions=[region(0, 0, 39, 39), region(40, 0, 79, 39)],
    )
    Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8)).save(folder / "other" / "a.png")
    (folder / "other" / "notes.txt").write_text("a note")
    prompts = {
        "four_chamber": ["a four chamber view"],
        "other": ["an ultrasound image"],
        "outflow": ["an outflow"],
    }
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    (tmp_path / "best.pt").write_bytes(b"")  # the loader is stubbed below
    monkeypatch.setattr(evaluate, "load_model", lambda path, name="": TinyCLIP())
    r = evaluate.main(
        [str(tmp_path / "best.pt"), f"--task={folder}", f"--prompts={tmp_path / 'prompts.json'}"]
    )
    assert set(r) == {
        "split",
        "tasks",
        "selection",
    }  # no demo protocol is asked for when tasks are named
    assert (
        r["tasks"]["echo"]["n"] == 7 and r["tasks"]["echo"]["per_class"]["four_chamber"]["n"] == 6
    )  # 3 x 2 views
    assert r["selection"] == {"value": r["tasks"]["echo"]["f1"], "rule": "mean task F1"}
    assert len(r["tasks"]["echo"]["ignored"]) == 1 and "Task echo (n=7)" in capsys.readouterr().out
    # its own file: before, best_zeroshot.json, replacing the protocol's results
    assert not (tmp_path / "best_zeroshot.json").exists()
    saved = json.loads((tmp_path / "best_task_echo.json").read_text())
    assert saved["tasks"]["echo"]["per_class"]["other"]["n"] == 1
    (folder / "stray").mkdir()
    with pytest.raises(
        SystemExit, match=r"evaluate.py: .*echo: folders \['stray'\] are not classes"
    ):
        evaluate.main(
            [
                str(tmp_path / "best.pt"),
                f"--task={folder}",
                f"--prompts={tmp_path / 'prompts.json'}",
            ]
        )
    with pytest.raises(
        SystemExit, match=r"evaluate.py: .*echo/prompts.json: prompts file not found"
    ):
        evaluate.main([str(tmp_path / "best.pt"), f"--task={folder}"])


def test_a_class_given_twice_is_refused_naming_it(tmp_path):
    """Before: the later 'brain' silently won; a head scan flipped to abdomen 1.000."""
    path = tmp_path / "prompts.json"
    path.write_text('{"brain": ["a head"], "abdomen": ["a belly"], "brain": ["a stomach"]}')
    with pytest.raises(
        ValueError, match=f"^{path}: class 'brain' is given twice; give its prompts once$"
    ):
        evaluate.read_prompts(path)


def test_a_prompt_past_the_text_context_is_refused_with_its_token_count(tmp_path):
    """Before: cut silently; two classes cut to the same tokens sent every image to class 0 (F1 0.333)."""
    import open_clip

    long = "the fetal brain in an axial plane at the level of the thalami and the cavum septi pellucidi"
    # open_clip's own tokenizer
    counted = int((open_clip.tokenize([long], context_length=200) != 0).sum())
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"brain": [long], "abdomen": ["the fetal abdomen"]}))
    assert evaluate.read_prompts(path, context_length=counted)["brain"] == [long]  # fits exactly
    past = f"is {counted} tokens with its start and end, past the text context of {counted - 1}; shorten it"
    with pytest.raises(ValueError, match=f"class 'brain': the prompt .* {past}"):
        evaluate.read_prompts(path, context_length=counted - 1)


def test_classes_whose_token_rows_coincide_are_refused(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(
        json.dumps({"brain": ["A  Fetal Brain", "a head"], "head": ["a head", "a fetal brain"]})
    )
    with pytest.raises(
        ValueError, match="classes 'brain' and 'head' have the same prompts once tokenized"
    ):
        evaluate.read_prompts(path)
    path.write_text(json.dumps({"brain": ["a fetal brain"], "head": ["a fetal brain."]}))
    assert list(evaluate.read_prompts(path)) == ["brain", "head"]  # one token apart: two classes


@pytest.mark.parametrize("how", ["copy", "link"])
def test_the_same_scan_in_two_class_folders_is_refused_naming_both_paths(tmp_path, how):
    """Before: counted in both (n 40 for 30 scans), one hit and one certain miss each."""
    folder = tmp_path / "task"
    for name in ("brain", "abdomen"):
        (folder / name).mkdir(parents=True)
    (folder / "prompts.json").write_text(json.dumps({"brain": ["a head"], "abdomen": ["a belly"]}))
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(
            folder / "brain" / f"{i}.png"
        )
    first, second = folder / "brain" / "1.png", folder / "abdomen" / "renamed.png"
    shutil.copy(first, second) if how == "copy" else second.symlink_to(first)
    with pytest.raises(ValueError, match=f"{second} and {first} hold the same scan"):
        evaluate.read_task(folder)


# ------------------------------------------------------------------ one-line errors


def test_user_errors_are_one_line(tmp_path):
    from model import create_model

    torch.save(
        {"model": create_model("demo_teacher").state_dict(), "model_name": "demo_teacher"},
        tmp_path / "t.pt",
    )
    (tmp_path / "empty.pt").write_bytes(b"")
    cases = [
        ([str(tmp_path / "missing.pt")], "checkpoint not found: .*missing.pt"),
        ([str(tmp_path / "empty.pt")], "empty.pt: the file is empty"),
        (
            [str(tmp_path / "t.pt"), "--model=mobilefetalclip"],
            "t.pt holds the demo teacher .'demo_teacher'., not",
        ),
        ([], "no checkpoint given"),
    ]
    for arguments, message in cases:
        with pytest.raises(SystemExit, match=f"evaluate.py: .*{message}") as error:
            evaluate.main(arguments)
        assert "\n" not in str(error.value)


def test_unknown_planes_label_names_the_file_and_the_row(tmp_path):
    planes, _ = write_benchmark(tmp_path)
    csv = planes / "FETAL_PLANES_DB_data.csv"
    lines = csv.read_text().splitlines()
    lines[3] = lines[3].replace("Fetal brain", "Fetal heart")
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ValueError, match="FETAL_PLANES_DB_data.csv, row 4: unknown Plane 'Fetal heart'"
    ):
        protocol.planes_rows(planes)
