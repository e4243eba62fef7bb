"""The teacher-embedding cache (cache.py, train.py --teacher_cache) against the live teacher."""

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch.multiprocessing.spawn import ProcessException

import configurator
import data
from model import CLIP, MODEL_CONFIGS, create_model, load_model
from tools import cache, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8  # samples per shard and per batch
AUGS = 2
TEACHER_SIZE = MODEL_CONFIGS["demo_teacher"]["image_size"]
TEACHER_VIEW = (TEACHER_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they give on 2 cores
    yield
    torch.set_num_threads(threads)


def save_teacher(path, seed):
    torch.manual_seed(seed)
    net = create_model("demo_teacher")
    torch.save({"model": net.state_dict(), "model_name": "demo_teacher"}, path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    synthetic.write_shards(
        str(root / "shards"),
        seed=0,
        n=3 * BATCH,
        width=96,
        height=72,
        shard_size=BATCH,
        input_size=48,
    )
    teacher = save_teacher(root / "teacher.pt", seed=0)
    manifest = cache.write_cache(
        teacher,
        str(root / "shards"),
        str(root / "cache"),
        augs=AUGS,
        batch_size=BATCH,
        num_workers=0,
        device="cpu",
    )
    return root, teacher, manifest


def same_files(folder, reference):
    """Every file of the reference folder, byte for byte, and nothing else (no temporary file left behind)."""
    names = sorted(os.listdir(reference))
    assert sorted(os.listdir(folder)) == names
    match, mismatch, errors = filecmp.cmpfiles(reference, folder, names, shallow=False)
    # 3 shards, their entries, the manifest
    assert mismatch == [] and errors == [] and len(match) == 7


def batches(root, epoch, **cache):
    """Epoch `epoch` of the loader in the shards' order: (student images, teacher input, tokens, keys)."""
    student = create_model("demo_student")
    loader = data.train_loader(
        str(root / "shards"),
        (student.image_size, student.image_mean, student.image_std),
        TEACHER_VIEW,
        BATCH,
        epoch=epoch,
        shuffle_buffer=1,
        return_keys=True,
        context_length=48,
        **cache,
    )
    return list(loader)


def test_cached_teacher_gives_the_live_teacher_logits(setup):
    root, teacher_path, manifest = setup
    teacher = load_model(teacher_path).eval()
    assert {name: entry["samples"] for name, entry in manifest["shards"].items()} == {
        f"train-00000{i}.tar": BATCH for i in range(3)
    }
    assert manifest["logit_scale"] == pytest.approx(1 / 0.07)
    for epoch in range(AUGS + 1):
        live = batches(root, epoch % AUGS)  # epoch AUGS replays augmentation 0
        cached = batches(root, epoch, teacher_cache=str(root / "cache"))
        assert (
            [b[3] for b in cached] == [b[3] for b in live]
            if epoch < AUGS
            else sorted(k for b in cached for k in b[3]) == sorted(k for b in live for k in b[3])
        )
        live = {k: (b[0][i], b[1][i], b[2][i]) for b in live for i, k in enumerate(b[3])}
        for student_images, (image, text), tokens, keys in cached:
            assert image.dtype == torch.float16 and image.shape == text.shape == (BATCH, 128)
            torch.testing.assert_close(
                student_images, torch.stack([live[k][0] for k in keys]), rtol=0, atol=0
            )
            with torch.no_grad():
                live_image, live_text, scale = teacher(
                    torch.stack([live[k][1] for k in keys]), tokens
                )
            live_logits = scale * live_image @ live_text.T
            cached_logits = manifest["logit_scale"] * image.float() @ text.float().T
            # fp16 storage: each unit vector entry within 2^-11 relative, so |cos| within ~1e-3
            assert (cached_logits - live_logits).abs().max() < scale * 1e-3
            # the check is not trivially met by constant logits
            assert live_logits.std() > scale * 1e-2


def test_interrupted_cache_resumes_to_the_same_files(setup, tmp_path, monkeypatch):
    root, teacher, _ = setup
    calls = {"n": 0}
    encode_image = CLIP.encode_image

    def crash_on_the_second_batch(self, images):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash in shard 2")
        return encode_image(self, images)

    monkeypatch.setattr(CLIP, "encode_image", crash_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        cache.write_cache(
            teacher,
            str(root / "shards"),
            str(tmp_path),
            augs=AUGS,
            batch_size=BATCH,
            num_workers=0,
            device="cpu",
        )
    monkeypatch.setattr(CLIP, "encode_image", encode_image)
    # no shard before the end
    assert list(data.read_cache_manifest(str(tmp_path))["shards"].values()) == [None] * 3
    finished = [cache.read_entry(str(tmp_path), f"train-00000{i}.tar") for i in range(3)]
    assert [entry and entry["samples"] for entry in finished] == [BATCH, None, None]
    one_shard = str(root / "shards" / "train-000001.tar")
    settings = dict(augs=AUGS, batch_size=BATCH, num_workers=0, device="cpu")
    assert list(cache.write_cache(teacher, one_shard, str(tmp_path), **settings)["shards"]) == [
        "train-000001.tar"
    ]
    # the rest: train-000002.tar
    cache.write_cache(teacher, str(root / "shards"), str(tmp_path), **settings)
    same_files(tmp_path, root / "cache")
    reference = data.read_cache_manifest(str(root / "cache"))["shards"]
    # others stay
    assert cache.write_cache(teacher, one_shard, str(tmp_path), **settings)["shards"] == reference


def check_cache(folder, urls, *, teacher_ckpt, **asked):
    """data.check_cache as train.py calls it: with the checkpoint's sha256 when one is given."""
    sha256 = configurator.file_sha256(teacher_ckpt) if teacher_ckpt else ""
    return data.check_cache(folder, urls, teacher_sha256=sha256, teacher_ckpt=teacher_ckpt, **asked)


def test_a_cache_from_another_teacher_seed_or_size_is_refused(setup, tmp_path):
    root, teacher, _ = setup
    asked = dict(
        teacher="demo_teacher", teacher_ckpt=teacher, seed=0, view=TEACHER_VIEW, context_length=48
    )
    shards = str(root / "shards")
    folder = str(root / "cache")
    assert check_cache(folder, shards, **asked)["augs"] == AUGS
    # no hash asked
    assert check_cache(folder, shards, **{**asked, "teacher_ckpt": ""})["augs"] == AUGS
    other = save_teacher(tmp_path / "other.pt", seed=1)
    for change, message in [
        ({"teacher_ckpt": other}, "teacher_sha256 .* asks for .*other.pt"),
        ({"seed": 1}, "made with seed 0; this run asks for 1 .*--augment_seed"),
        (
            {"view": (64, *TEACHER_VIEW[1:])},
            f"made with image_size {TEACHER_SIZE}; this run asks for 64",
        ),
        (
            {"teacher": "fetalclip"},
            "made with teacher .demo_teacher.; this run asks for .fetalclip.",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            check_cache(folder, shards, **{**asked, **change})
    synthetic.write_shards(
        str(tmp_path / "more"),
        seed=1,
        n=BATCH,
        width=96,
        height=72,
        shard_size=BATCH,
        input_size=48,
    )
    os.rename(tmp_path / "more" / "train-000000.tar", tmp_path / "more" / "train-000009.tar")
    with pytest.raises(ValueError, match="no finished cache shard for .*train-000009.tar"):
        check_cache(
            folder,
            [shards + "/train-000000.tar", str(tmp_path / "more" / "train-000009.tar")],
            **asked,
        )
    with pytest.raises(ValueError, match="holds a cache with seed 0, not 1"):
        cache.write_cache(teacher, shards, folder, augs=AUGS, seed=1, num_workers=0, device="cpu")
    with pytest.raises(FileNotFoundError, match="not a teacher cache"):
        check_cache(str(tmp_path), shards, **asked)


def test_a_cache_of_regenerated_shards_is_refused(setup, tmp_path):
    """The shards regenerated under the same names and keys (another seed): every cached target would belong
    to another image and caption. Refused at start-up, naming the shard; and where a shard keeps its
    members' names and sizes but not their bytes, by the first sample's digest."""
    root, teacher, _ = setup
    asked = dict(
        teacher="demo_teacher", teacher_ckpt=teacher, seed=0, view=TEACHER_VIEW, context_length=48
    )
    regenerated = tmp_path / "shards"
    synthetic.write_shards(
        str(regenerated), seed=1, n=3 * BATCH, width=96, height=72, shard_size=BATCH, input_size=48
    )
    # same file names and keys
    assert sorted(os.listdir(regenerated)) == sorted(os.listdir(root / "shards"))
    with pytest.raises(
        ValueError, match=f"was made from another {regenerated / 'train-000000.tar'}"
    ):
        check_cache(str(root / "cache"), str(regenerated), **asked)
    # one caption's bytes changed in place: names and sizes stay
    same_sizes = tmp_path / "same_sizes"
    shutil.copytree(root / "shards", same_sizes)
    shard = same_sizes / "train-000001.tar"
    payload = shard.read_bytes()
    caption = next(s["txt"] for s in data.wds.tarfile_samples([{"url": str(shard)}]))
    shard.write_bytes(payload.replace(caption, caption[::-1], 1))
    # headers agree
    assert check_cache(str(root / "cache"), str(same_sizes), **asked)["augs"] == AUGS
    student = create_model("demo_student")
    view = (student.image_size, student.image_mean, student.image_std)
    loader = data.train_loader(
        str(same_sizes),
        view,
        None,
        BATCH,
        shuffle_buffer=1,
        context_length=48,
        teacher_cache=str(root / "cache"),
    )
    with pytest.raises(
        data.StaleCache, match=f"the entry for 00000008 in {shard} was computed from another sample"
    ):
        list(loader)


def test_two_gloo_processes_build_the_cache_of_one(setup, tmp_path):
    """cache.py under torchrun: the three shards dealt to two processes, each cached once, the same files."""
    root, teacher, _ = setup
    flags = [
        f"--teacher_ckpt={teacher}",
        f"--train_data={root / 'shards'}",
        f"--out_dir={tmp_path}",
        f"--augs={AUGS}",
    ]
    flags += [f"--batch_size={BATCH}", "--num_workers=0", "--device=cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    process = subprocess.run(
        [*torchrun, "-m", "tools.cache", *flags],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    cached = sorted(re.findall(r"rank \d: cached train-\d+\.tar", process.stdout))
    expected = sorted(f"rank {i % 2}: cached train-00000{i}.tar" for i in range(3))  # dealt in turn
    assert cached == expected, process.stdout + process.stderr[-2000:]
    same_files(tmp_path, root / "cache")


def killed_rank_zero(rank, init_file, settings):
    """One process of a two-process build, rank 0 killed in the middle of its second shard (after rank 1 has
    finished its own): os._exit runs no clean-up, so its half-written file stays, as after kill -9."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    embed, calls = cache.embed, []

    def embed_then_die(*args):
        calls.append(args)
        if rank == 0 and len(calls) == 2:  # one batch per shard
            dist.barrier()  # met by rank 1 once its shard and its entry are written
            os._exit(1)
        return embed(*args)

    cache.embed = embed_then_die
    cache.write_cache(**settings)


def test_a_killed_rank_loses_only_its_unfinished_shard(setup, tmp_path, monkeypatch):
    root, teacher, _ = setup
    out_dir = tmp_path / "cache"
    settings = dict(
        teacher_ckpt=teacher, train_data=str(root / "shards"), out_dir=str(out_dir), augs=AUGS
    )
    settings.update(batch_size=BATCH, num_workers=0, device="cpu")
    with pytest.raises(ProcessException):  # rank 0 killed, rank 1 then fails or is ended
        # forked: the processes start with this one's modules instead of importing them again (seconds each)
        torch.multiprocessing.start_processes(
            killed_rank_zero, (str(tmp_path / "init"), settings), nprocs=2, start_method="fork"
        )
    assert any(
        name.startswith("train-000002.tar.") and name.endswith(".tmp")
        for name in os.listdir(out_dir)
    )
    asked = dict(
        teacher="demo_teacher", teacher_ckpt=teacher, seed=0, view=TEACHER_VIEW, context_length=48
    )
    with pytest.raises(ValueError, match="has no finished cache shard for .*train-000000.tar"):
        check_cache(str(out_dir), str(root / "shards"), **asked)  # nothing listed before the end
    redone, cache_one_shard = [], cache.cache_one_shard
    monkeypatch.setattr(
        cache,
        "cache_one_shard",
        lambda *a: redone.append(os.path.basename(a[2])) or cache_one_shard(*a),
    )
    cache.write_cache(**settings)  # the rerun, here by one process
    assert redone == ["train-000002.tar"]
    same_files(out_dir, root / "cache")


def test_a_deleted_truncated_or_swapped_cache_shard_is_refused_naming_it(
    setup, tmp_path, monkeypatch
):
    """Refused at start-up, each naming the cache shard; a rerun of cache.py redoes exactly the damaged shards."""
    root, teacher, _ = setup
    asked = dict(
        teacher="demo_teacher", teacher_ckpt=teacher, seed=0, view=TEACHER_VIEW, context_length=48
    )
    shards, folder = str(root / "shards"), tmp_path / "cache"
    shutil.copytree(root / "cache", folder)
    first, second, third = (folder / f"train-00000{i}.tar" for i in range(3))
    assert first.stat().st_size == second.stat().st_size  # a swap keeps every size
    first.rename(tmp_path / "swap")
    second.rename(first)
    (tmp_path / "swap").rename(second)
    with pytest.raises(
        ValueError,
        match=f"holds a {first} that is not the cache shard of .*train-000000.tar .swapped",
    ):
        check_cache(str(folder), shards, **asked)
    third.write_bytes(third.read_bytes()[: third.stat().st_size // 2])
    with pytest.raises(
        ValueError, match=f"holds a truncated or replaced {third} .{third.stat().st_size} bytes"
    ):
        check_cache(str(folder), str(root / "shards" / "train-000002.tar"), **asked)
    third.unlink()
    with pytest.raises(
        ValueError,
        match=f"lacks {third}, the cache shard of .*train-000002.tar; run `python -m tools.cache",
    ):
        check_cache(str(folder), str(root / "shards" / "train-000002.tar"), **asked)
    redone, cache_one_shard = [], cache.cache_one_shard
    monkeypatch.setattr(
        cache,
        "cache_one_shard",
        lambda *a: redone.append(os.path.basename(a[2])) or cache_one_shard(*a),
    )
    cache.write_cache(
        teacher, shards, str(folder), augs=AUGS, batch_size=BATCH, num_workers=0, device="cpu"
    )
    assert redone == [f"train-00000{i}.tar" for i in range(3)]
    same_files(folder, root / "cache")


def test_a_cache_of_other_views_is_refused(setup, monkeypatch):
    """The manifest records what the views depend on: data.AUGMENT (which drives augment_params) with its
    version, and the teacher's input size, mean and std. A change in any is refused, naming the key."""
    root, teacher, manifest = setup
    asked = dict(
        teacher="demo_teacher", teacher_ckpt=teacher, seed=0, view=TEACHER_VIEW, context_length=48
    )
    recorded = {key: manifest[key] for key in ("augment", "image_size", "image_mean", "image_std")}
    assert recorded == dict(
        augment=dict(degrees=7.0, translate=0.05, jitter=0.15, version=data.AUGMENT["version"]),
        image_size=TEACHER_SIZE,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    # the names the start-up check requires, in the file's order
    assert tuple(manifest) == data.MANIFEST_KEYS
    monkeypatch.setitem(data.AUGMENT, "degrees", 0.0)
    monkeypatch.setitem(data.AUGMENT, "translate", 0.0)
    monkeypatch.setitem(data.AUGMENT, "jitter", 0.0)
    params = data.augment_params(0, 1, "00000003")
    assert (params["angle"], params["translate"], params["factors"]) == (
        0,
        (0, 0),
        (1, 1, 1),
    )  # AUGMENT is the draw
    with pytest.raises(
        ValueError, match="made with augment .*'degrees': 7.0.*; this run asks for .*'degrees': 0.0"
    ):
        check_cache(str(root / "cache"), str(root / "shards"), **asked)
    # coupled_views changed
    monkeypatch.setattr(data, "AUGMENT", {**manifest["augment"], "version": "changed"})
    with pytest.raises(
        ValueError, match="made with augment .*; this run asks for .*'version': 'changed'.*rebuild"
    ):
        check_cache(str(root / "cache"), str(root / "shards"), **asked)
    monkeypatch.setattr(data, "AUGMENT", manifest["augment"])
    assert check_cache(str(root / "cache"), str(root / "shards"), **asked) == manifest
    for position, name in ((1, "image_mean"), (2, "image_std")):
        view = list(TEACHER_VIEW)
        view[position] = (0.5, 0.5, 0.5)
        with pytest.raises(
            ValueError, match=f"made with {name} .*; this run asks for .0.5, 0.5, 0.5."
        ):
            check_cache(str(root / "cache"), str(root / "shards"), **{**asked, "view": tuple(view)})


def test_a_manifest_without_a_key_is_one_line_naming_it(setup, tmp_path):
    """A missing key (a cache of an older cache.py has no 'augment') is one line naming it and saying to rebuild."""
    root, teacher, manifest = setup
    asked = dict(
        teacher="demo_teacher", teacher_ckpt=teacher, seed=0, view=TEACHER_VIEW, context_length=48
    )
    folder = tmp_path / "cache"
    shutil.copytree(root / "cache", folder)
    entry = dict(manifest["shards"]["train-000001.tar"])
    del entry["fingerprint"]
    for key, damaged in [
        ("augs", {k: v for k, v in manifest.items() if k != "augs"}),
        ("augment", {k: v for k, v in manifest.items() if k != "augment"}),
        (
            "shards/train-000001.tar/fingerprint",
            {**manifest, "shards": {**manifest["shards"], "train-000001.tar": entry}},
        ),
    ]:
        (folder / data.CACHE_MANIFEST).write_text(json.dumps(damaged))
        with pytest.raises(ValueError) as error:
            check_cache(str(folder), str(root / "shards"), **asked)
        assert f"{folder / data.CACHE_MANIFEST} has no key {key!r}" in str(error.value)
        assert "rebuild" in str(error.value) and "\n" not in str(error.value)
    (folder / data.CACHE_MANIFEST).write_text("{")
    with pytest.raises(ValueError, match=f"{folder / data.CACHE_MANIFEST}: not JSON"):
        check_cache(str(folder), str(root / "shards"), **asked)
