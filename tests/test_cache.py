"""The teacher-embedding cache (cache.py, train.py --teacher_cache) against the live teacher."""

import filecmp
import os
import shutil

import pytest
import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

import cache
import data
import synthetic
from model import CLIP, MODEL_CONFIGS, create_model, load_model

BATCH = 8  # samples per shard and per batch
AUGS = 2
TEACHER_SIZE = MODEL_CONFIGS["demo_teacher"]["image_size"]


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
        str(root / "shards"), seed=0, n=3 * BATCH, width=96, height=72, shard_size=BATCH, input_size=48
    )
    teacher = save_teacher(root / "teacher.pt", seed=0)
    manifest = cache.write_cache(
        teacher, str(root / "shards"), str(root / "cache"), augs=AUGS, batch_size=BATCH, num_workers=0, device="cpu"
    )
    return root, teacher, manifest


def batches(root, epoch, **cache):
    """Epoch `epoch` of the loader in the shards' order: (student images, teacher input, tokens, keys)."""
    student = create_model("demo_student")
    teacher_view = (TEACHER_SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    loader = data.train_loader(
        str(root / "shards"),
        (student.image_size, student.image_mean, student.image_std),
        teacher_view,
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
            torch.testing.assert_close(student_images, torch.stack([live[k][0] for k in keys]), rtol=0, atol=0)
            with torch.no_grad():
                live_image, live_text, scale = teacher(torch.stack([live[k][1] for k in keys]), tokens)
            live_logits = scale * live_image @ live_text.T
            cached_logits = manifest["logit_scale"] * image.float() @ text.float().T
            # fp16 storage: each unit vector entry within 2^-11 relative, so |cos| within ~1e-3
            assert (cached_logits - live_logits).abs().max() < scale * 1e-3
            assert live_logits.std() > scale * 1e-2  # the check is not trivially met by constant logits


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
            teacher, str(root / "shards"), str(tmp_path), augs=AUGS, batch_size=BATCH, num_workers=0, device="cpu"
        )
    monkeypatch.setattr(CLIP, "encode_image", encode_image)
    partial = data.read_cache_manifest(str(tmp_path))["shards"]
    assert [entry and entry["samples"] for entry in partial.values()] == [BATCH, None, None]
    cache.write_cache(
        teacher, str(root / "shards"), str(tmp_path), augs=AUGS, batch_size=BATCH, num_workers=0, device="cpu"
    )
    names = sorted(os.listdir(root / "cache"))
    assert sorted(os.listdir(tmp_path)) == names  # no .tmp left behind
    match, mismatch, errors = filecmp.cmpfiles(root / "cache", tmp_path, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == 4


def test_a_cache_from_another_teacher_seed_or_size_is_refused(setup, tmp_path):
    root, teacher, _ = setup
    asked = dict(teacher="demo_teacher", teacher_ckpt=teacher, seed=0, image_size=TEACHER_SIZE, context_length=48)
    shards = str(root / "shards")
    folder = str(root / "cache")
    assert cache.check_cache(folder, shards, **asked)["augs"] == AUGS
    assert cache.check_cache(folder, shards, **{**asked, "teacher_ckpt": ""})["augs"] == AUGS  # no hash asked
    other = save_teacher(tmp_path / "other.pt", seed=1)
    for change, message in [
        ({"teacher_ckpt": other}, "teacher_sha256 .* asks for .*other.pt"),
        ({"seed": 1}, "made with seed 0; this run asks for 1 .*--augment_seed"),
        ({"image_size": 64}, f"made with image_size {TEACHER_SIZE}; this run asks for 64"),
        ({"teacher": "fetalclip"}, "made with teacher .demo_teacher.; this run asks for .fetalclip."),
    ]:
        with pytest.raises(ValueError, match=message):
            cache.check_cache(folder, shards, **{**asked, **change})
    synthetic.write_shards(
        str(tmp_path / "more"), seed=1, n=BATCH, width=96, height=72, shard_size=BATCH, input_size=48
    )
    os.rename(tmp_path / "more" / "train-000000.tar", tmp_path / "more" / "train-000009.tar")
    with pytest.raises(ValueError, match="no finished cache shard for .*train-000009.tar"):
        cache.check_cache(folder, [shards + "/train-000000.tar", str(tmp_path / "more" / "train-000009.tar")], **asked)
    with pytest.raises(ValueError, match="holds a cache with seed 0, not 1"):
        cache.write_cache(teacher, shards, folder, augs=AUGS, seed=1, num_workers=0, device="cpu")
    with pytest.raises(FileNotFoundError, match="not a teacher cache"):
        cache.check_cache(str(tmp_path), shards, **asked)


def test_a_cache_of_regenerated_shards_is_refused(setup, tmp_path):
    """The shards regenerated under the same names and keys (another seed): every cached target would belong to
    another image and caption. Refused at start-up, naming the shard; and where a shard keeps its members' names
    and sizes but not their bytes, by the first sample's digest."""
    root, teacher, _ = setup
    asked = dict(teacher="demo_teacher", teacher_ckpt=teacher, seed=0, image_size=TEACHER_SIZE, context_length=48)
    regenerated = tmp_path / "shards"
    synthetic.write_shards(str(regenerated), seed=1, n=3 * BATCH, width=96, height=72, shard_size=BATCH, input_size=48)
    assert sorted(os.listdir(regenerated)) == sorted(os.listdir(root / "shards"))  # same file names and keys
    with pytest.raises(ValueError, match=f"was made from another {regenerated / 'train-000000.tar'}"):
        cache.check_cache(str(root / "cache"), str(regenerated), **asked)
    same_sizes = tmp_path / "same_sizes"  # one caption's bytes changed in place: names and sizes stay
    shutil.copytree(root / "shards", same_sizes)
    shard = same_sizes / "train-000001.tar"
    payload = shard.read_bytes()
    caption = next(s["txt"] for s in data.wds.tarfile_samples([{"url": str(shard)}]))
    shard.write_bytes(payload.replace(caption, caption[::-1], 1))
    assert cache.check_cache(str(root / "cache"), str(same_sizes), **asked)["augs"] == AUGS  # headers agree
    student = create_model("demo_student")
    view = (student.image_size, student.image_mean, student.image_std)
    loader = data.train_loader(
        str(same_sizes), view, None, BATCH, shuffle_buffer=1, context_length=48, teacher_cache=str(root / "cache")
    )
    with pytest.raises(data.StaleCache, match=f"the entry for 00000008 in {shard} was computed from another sample"):
        list(loader)
