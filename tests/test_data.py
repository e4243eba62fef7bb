"""data.py: tokenizer parity with open_clip, images of any bit depth, coupled augmentation and the training
loader. CPU, small files written here, fixed seeds (the Planes DB and HC18 readers:
tests/test_protocol.py)."""

import io
import json
import math
import os
import random
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
STUDENT, TEACHER = (256, *IMAGENET), (224, *CLIP)

# ------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def reference_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=117)


def protocol_prompts():
    with open(os.path.join(ROOT, "zero_shot_prompts.json")) as f:
        prompts = json.load(f)
    texts = [
        p
        for group in ("five_planes", "brain_subplanes")
        for ps in prompts[group].values()
        for p in ps
    ]
    for template in prompts["ga_templates"]:
        for spacing in (0.28, 1.0, 2.875, 12.5 * 0.0691358041432):
            texts += [
                template.format(weeks=w, day=d, pixel_spacing=f"{spacing:.2f}")
                for w in range(14, 39)
                for d in range(7)
            ]
    return texts


def varied_captions(n, seed=0):
    """Captions mixing protocol wording, numbers, punctuation, unicode, HTML entities and odd spacing."""
    rng = random.Random(seed)
    words = " ".join(protocol_prompts()[:45]).split()
    pieces = [
        "café",
        "naïve",
        "Ñandú",
        "Straße",
        "胎儿超声图像",
        "頭囲",
        "👶🏽",
        "❤️",
        "🩺",
        "мозг",
        "دماغ",
        "ελληνικά",
        "’s",
        "don’t",
        "“quoted”",
        "‘single’",
        "it's",
        "WE'RE",
        "I'LL",
        "they'd",
        "&amp;",
        "&lt;b&gt;",
        "&#39;",
        "&quot;x&quot;",
        "&nbsp;",
        "&amp;amp;",
        "&eacute;",
        "Ã©tÃ©",
        "\u0345",
        "ᾳ",
        "ſ",
        "K",
        "<end_of_text>",
        "!!<start_of_text>",
        "x<end_of_text>y",
        "it'ſ",
        "<ſtart_of_text>",
        "mm/pixel",
        "3.14",
        "-2.5e-3",
        "1,000",
        "42",
        "0.07",
        "#1",
        "@user",
        "a_b-c",
        "...",
        "?!",
        "(14w+6d)",
        "[x]",
        "{y}",
        "100%",
        "$5",
        "~",
        "\t",
        "\n",
        "  ",
        "\r\n",
        "\u00a0",
        "\u3000",
        "İstanbul",
        "ǅ",
        "ﬁne",
        "Ⅻ",
        "²",
        "½",
        "٣",
    ]
    texts = [
        "",
        "   ",
        "\n\t",
        "a" * 400,
        " ".join(["fetal"] * 200),
        "<start_of_text>",
        "<end_of_text>",
    ]
    while len(texts) < n:
        parts = [
            rng.choice(pieces) if rng.random() < 0.4 else rng.choice(words)
            for _ in range(rng.randint(1, 60))
        ]
        if rng.random() < 0.3:
            parts = [p.upper() if rng.random() < 0.3 else p for p in parts]
        texts.append(
            rng.choice(["", " ", "  ", "\n"]).join(parts) if rng.random() < 0.2 else " ".join(parts)
        )
    return texts


def test_tokenizer_matches_open_clip_on_protocol_prompts(reference_tokenizer):
    texts = protocol_prompts()
    assert len(texts) > 3500
    torch.testing.assert_close(data.tokenize(texts), reference_tokenizer(texts), rtol=0, atol=0)


def test_tokenizer_matches_open_clip_on_varied_captions(reference_tokenizer):
    texts = varied_captions(1200)
    ours = data.tokenize(texts)
    torch.testing.assert_close(ours, reference_tokenizer(texts), rtol=0, atol=0)
    assert (ours[:, -1] == data.EOT).sum() > 20  # over-long texts were cut with the end token last
    for length in (8, 77):
        torch.testing.assert_close(
            data.tokenize(texts[:200], length),
            reference_tokenizer(texts[:200], length),
            rtol=0,
            atol=0,
        )


def test_tokenizer_shape_and_special_ids():
    tokens = data.tokenize("Fetal brain")
    assert tokens.shape == (1, 117) and tokens.dtype == torch.long
    assert tokens[0, 0] == 49406 and tokens[0, 3] == 49407 and tokens[0, 4:].eq(0).all()
    # joined special-token pieces reuse the special ids
    ids = set(data.clip_tokenizer().get_vocab().values())
    assert len(ids) == 49408 and max(ids) == 49407


# ------------------------------------------------------------------ shards and loader


def encoded(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_shard(path, samples):
    """samples: [(key, {extension: bytes})] -> a tar in WebDataset layout."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for extension, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def smooth_image(seed, size=(120, 90)):
    """A smooth test scan: bright shapes on a gradient, blurred (little aliasing when resized)."""
    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.randrange(size[0] - 30), rng.randrange(size[1] - 30)
        draw.ellipse(
            [x, y, x + rng.randrange(10, 30), y + rng.randrange(10, 30)],
            fill=(255, rng.randrange(256), 60),
        )
    return image.filter(ImageFilter.GaussianBlur(2))


def good_sample(i, fmt="PNG"):
    extension = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    return f"{i:06d}", {
        extension: encoded(smooth_image(i), fmt),
        "txt": f"Fetal ultrasound number {i}.".encode(),
    }


def make_shards(folder, n_shards, per_shard):
    os.makedirs(folder, exist_ok=True)
    for s in range(n_shards):
        write_shard(
            os.path.join(folder, f"train-{s:06d}.tar"),
            [good_sample(s * per_shard + i) for i in range(per_shard)],
        )
    return os.path.join(folder, f"train-{{000000..{n_shards - 1:06d}}}.tar")


def epoch_keys(urls, **kw):
    kw = dict(dict(batch_size=1, return_keys=True, shuffle_buffer=4), **kw)
    return [
        k for batch in data.train_loader(urls, (32, *IMAGENET), (24, *CLIP), **kw) for k in batch[3]
    ]


def test_expand_urls_and_count(tmp_path):
    pattern = make_shards(tmp_path, 3, 2)
    assert data.expand_urls(pattern) == [
        os.path.join(tmp_path, f"train-{s:06d}.tar") for s in range(3)
    ]
    assert data.expand_urls(str(tmp_path)) == data.expand_urls(pattern)
    assert data.count_samples(pattern) == 6
    with pytest.raises(FileNotFoundError, match="train-000003.tar"):
        data.expand_urls(os.path.join(tmp_path, "train-{000002..000003}.tar"))


def test_corrupt_image_and_missing_caption_are_skipped_and_counted(tmp_path, capsys):
    samples = [
        good_sample(0, "PNG"),
        good_sample(1, "JPEG"),
        ("000002", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"broken"}),
        ("000003", {"png": encoded(smooth_image(3), "PNG")}),
        good_sample(4, "WEBP"),
    ]
    write_shard(tmp_path / "a.tar", samples)
    (tmp_path / "b.tar").write_bytes(b"this is not a tar file" * 40)  # a broken shard
    urls = [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    for workers in (0, 2):  # in workers, the counts travel back through shared memory
        loader = data.train_loader(urls, STUDENT, TEACHER, 1, num_workers=workers, return_keys=True)
        assert sorted(k for batch in loader for k in batch[3]) == ["000000", "000001", "000004"]
        assert loader.skipped == {"image": 1, "caption": 1, "uncached": 0, "shard": 1}
        assert loader.broken_shards == [str(tmp_path / "b.tar")]
        assert (
            "skipped 1 unreadable images, 1 captionless and 0 uncached samples"
            in capsys.readouterr().err
        )


def test_a_truncated_shard_is_counted_once_and_named(tmp_path, capsys):
    urls = make_shards(tmp_path, 2, 6)
    broken = tmp_path / "train-000001.tar"
    # cut inside a member
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2 + 700])
    readable = data.count_samples(urls)  # the default samples_per_epoch: counting reads every shard
    assert (
        6 < readable < 12
        and f"shard {broken} is broken after {readable - 6} samples" in capsys.readouterr().err
    )
    loader = data.train_loader(
        urls, (32, *IMAGENET), None, 2, samples_per_epoch=30, shuffle_buffer=1
    )
    assert len(list(loader)) == 15  # 30 samples: the readers pass over the shards three times
    assert loader.skipped["shard"] == 1 and loader.broken_shards == [str(broken)]
    assert capsys.readouterr().err.count("skipping the rest of broken shard") == 1


def test_two_ranks_are_disjoint_and_cover_the_epoch(tmp_path):
    for n_shards, per_shard in (
        (4, 3),
        (1, 12),
    ):  # split by shard, then by sample (fewer shards than readers)
        urls = make_shards(tmp_path / f"{n_shards}", n_shards, per_shard)
        ranks = [epoch_keys(urls, rank=r, world_size=2, seed=3) for r in range(2)]
        assert not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == [f"{i:06d}" for i in range(12)]
        assert len(ranks[0]) == len(ranks[1]) == 6
    # two workers on each of two ranks: four readers, one shard each
    urls = make_shards(tmp_path / "w", 4, 3)
    ranks = [epoch_keys(urls, rank=r, world_size=2, num_workers=2) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == [f"{i:06d}" for i in range(12)]


def test_fixed_epoch_length_and_resampling(tmp_path):
    urls = make_shards(tmp_path, 3, 4)
    # 30 samples over 2 ranks: 15 batches each, wrapping around the 6 per rank
    for rank in range(2):
        assert len(epoch_keys(urls, rank=rank, world_size=2, samples_per_epoch=30)) == 15
    loader = data.train_loader(urls, STUDENT, None, 4, samples_per_epoch=20, resampled=True)
    batches = list(loader)
    assert (
        len(loader) == len(batches) == 5
        and batches[0][1] is None
        and batches[0][0].shape == (4, 3, 256, 256)
    )
    with pytest.raises(ValueError, match="samples_per_epoch"):
        data.train_loader(urls, STUDENT, None, 4, resampled=True)


def test_loader_replays_views_from_seed_epoch_key(tmp_path):
    urls = make_shards(tmp_path, 2, 3)
    raw = {f"{i:06d}": smooth_image(i) for i in range(6)}
    loader = data.train_loader(urls, STUDENT, TEACHER, 2, seed=7, epoch=1, return_keys=True)
    student, teacher, tokens, keys = next(iter(loader))
    assert (
        student.shape == (2, 3, 256, 256)
        and teacher.shape == (2, 3, 224, 224)
        and tokens.shape == (2, 117)
    )
    for i, key in enumerate(keys):  # the same (seed, epoch, key) replays the identical views
        params = data.augment_params(7, 1, key)
        replay = data.coupled_views(
            data.pad_to_square(Image.open(io.BytesIO(encoded(raw[key], "PNG"))).convert("RGB")),
            params,
            [STUDENT, TEACHER],
        )
        assert torch.equal(replay[0], student[i]) and torch.equal(replay[1], teacher[i])
        torch.testing.assert_close(
            tokens[i], data.tokenize(f"Fetal ultrasound number {int(key)}.")[0]
        )
    assert [k for batch in loader for k in batch[3]] == [
        k for batch in loader for k in batch[3]
    ]  # same order
    loader.set_epoch(2)  # another epoch: the same key gets another draw
    again = {k: s for batch in loader for k, s in zip(batch[3], batch[0])}
    assert not torch.equal(again[keys[0]], student[0])


# ------------------------------------------------------------------ transforms


def test_pad_to_square_centres_on_black():
    image = Image.new("L", (6, 2), 200)
    square = np.asarray(data.pad_to_square(image))
    assert square.shape == (6, 6)  # grayscale stays grayscale
    assert (square[2:4] == 200).all() and (square[:2] == 0).all() and (square[4:] == 0).all()
    square = np.asarray(data.pad_to_square(Image.new("RGBA", (3, 5), (9, 9, 9, 255))))
    assert (
        square.shape == (5, 5, 3) and square[:, [0, 4]].sum() == 0 and (square[:, 1:4] == 9).all()
    )


def test_eval_transform_matches_manual_pipeline():
    image = smooth_image(1, (80, 50))
    ours = data.eval_transform(32, *CLIP)(image)
    square = Image.new("RGB", (80, 80))
    square.paste(image, (0, 15))
    manual = np.asarray(square.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255
    manual = torch.from_numpy(manual).permute(2, 0, 1)
    manual = (manual - torch.tensor(CLIP[0])[:, None, None]) / torch.tensor(CLIP[1])[:, None, None]
    torch.testing.assert_close(ours, manual)


def test_grayscale_path_equals_rgb():
    gray = smooth_image(2, (90, 60)).convert("L")
    params = data.augment_params(0, 0, "g")
    for a, b in zip(
        data.coupled_views(data.pad_to_square(gray), params, [STUDENT, TEACHER]),
        data.coupled_views(data.pad_to_square(gray.convert("RGB")), params, [STUDENT, TEACHER]),
    ):
        assert torch.equal(a, b)
    assert torch.equal(
        data.eval_transform(64, *CLIP)(gray), data.eval_transform(64, *CLIP)(gray.convert("RGB"))
    )


def unnormalise(view, mean, std):
    return view * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]


def test_coupled_views_share_geometry():
    square = data.pad_to_square(smooth_image(5, (200, 140)))
    params = data.augment_params(0, 0, "000005")
    params.update(angle=6.0, translate=(0.04, -0.03))  # a clearly visible transformation
    student, teacher = data.coupled_views(square, params, [STUDENT, TEACHER])
    student = F.interpolate(
        unnormalise(student, *IMAGENET)[None], size=224, mode="bilinear", antialias=True
    )[0]
    teacher = unnormalise(teacher, *CLIP)
    error = (student - teacher).abs().mean()  # ~0.002: interpolation only
    assert error < 0.004
    for other in (
        dict(params, angle=5.0),
        dict(params, translate=(0.04 + 2 / 224, -0.03)),
    ):  # 1 degree, 2 pixels off
        moved = unnormalise(data.coupled_views(square, other, [TEACHER])[0], *CLIP)
        assert (moved - teacher).abs().mean() > 2 * error


def hc18_scans(folder, n, rgb=False):
    """n 800x540 scans as the synthetic benchmark writes HC18 (the demo's model of a B-mode scan)."""
    from tools import synthetic

    synthetic.write_hc18(str(folder), 0, n)
    images = [Image.open(path).convert("L") for path in sorted((folder / "training_set").iterdir())]
    return [
        Image.merge("RGB", (i, i.point(lambda v: v * 0.9), i.point(lambda v: 255 - v)))
        if rgb
        else i
        for i in images
    ]


def psnr(a, b, mean, std):
    error = ((unnormalise(a, mean, std) - unnormalise(b, mean, std)) ** 2).mean().item()
    return 10 * math.log10(1 / error) if error else math.inf


def test_views_look_like_the_torchvision_pipeline(tmp_path):
    """Each view against the plain bicubic-resize + affine + jitter pipeline for the same draw: >= 35 dB
    PSNR on the benchmark's 800x540 scans, grayscale and colour (the views' anti-aliasing filter is a box
    instead of bicubic; the geometry and the colour steps are torchvision's)."""
    from tools.bench import torchvision_views

    worst = {}
    for rgb in (False, True):
        for i, scan in enumerate(hc18_scans(tmp_path / f"rgb{rgb}", 4, rgb)):
            square, params = data.pad_to_square(scan), data.augment_params(0, i, f"{i:06d}")
            ours = data.coupled_views(square, params, [STUDENT, TEACHER])
            for view, a, b in zip(
                (STUDENT, TEACHER), ours, torchvision_views(square, params, [STUDENT, TEACHER])
            ):
                worst[rgb, view[0]] = min(
                    worst.get((rgb, view[0]), math.inf), psnr(a, b, *view[1:])
                )
    assert min(worst.values()) >= 35, worst
    # under 3x the view: the exact bicubic path
    small = data.pad_to_square(smooth_image(0, size=(300, 200)))
    params = data.augment_params(0, 0, "small")
    for ours, theirs in zip(
        data.coupled_views(small, params, [STUDENT]), torchvision_views(small, params, [STUDENT])
    ):
        assert psnr(ours, theirs, *STUDENT[1:]) > 60


def test_a_landmark_lands_at_the_same_place_in_both_views():
    for seed in range(5):
        image = Image.new("L", (800, 540))
        x, y = 250 + 60 * seed, 150 + 40 * seed
        image.paste(255, (x - 3, y - 3, x + 4, y + 4))  # a bright 7 x 7 dot centred on (x, y)
        square = data.pad_to_square(image)
        params = dict(data.augment_params(0, seed, "dot"), factors=(1.0, 1.0, 1.0))  # geometry only
        centres = []
        for view, (size, mean, std) in zip(
            data.coupled_views(square, params, [STUDENT, TEACHER]), (STUDENT, TEACHER)
        ):
            weight = unnormalise(view, mean, std)[0].clamp(min=0)  # (size, size)
            rows, cols = torch.meshgrid(
                torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij"
            )
            centres.append(
                torch.stack([(weight * cols).sum(), (weight * rows).sum()]) / weight.sum() / size
            )
        assert (centres[0] - centres[1]).abs().max() * 224 < 1.0  # in pixels of the smaller view
        angle, (tx, ty) = (
            math.radians(params["angle"]),
            params["translate"],
        )  # and where the draw puts it
        u, v = (
            (x + 0.5) / 800 - 0.5,
            (y + 130 + 0.5) / 800 - 0.5,
        )  # relative to the padded square's centre
        expected = [
            0.5 + tx + u * math.cos(angle) - v * math.sin(angle),
            0.5 + ty + u * math.sin(angle) + v * math.cos(angle),
        ]
        assert (centres[1] - torch.tensor(expected)).abs().max() * 224 < 1.0


def test_views_are_pure_and_independent_of_each_other():
    square = data.pad_to_square(smooth_image(7, (800, 540)))
    params = data.augment_params(3, 1, "k")
    both = data.coupled_views(square, params, [STUDENT, TEACHER])
    assert all(
        torch.equal(a, b)
        for a, b in zip(both, data.coupled_views(square, params, [STUDENT, TEACHER]))
    )
    # the cache's one-view replay
    assert torch.equal(data.coupled_views(square, params, [TEACHER])[0], both[1])


def test_augment_params_pure_and_in_range():
    a, b = data.augment_params(1, 3, "k"), data.augment_params(1, 3, "k")
    assert a == b
    assert all(
        a != data.augment_params(*other) for other in ((1, 4, "k"), (2, 3, "k"), (1, 3, "j"))
    )
    draws = [data.augment_params(0, 0, str(i)) for i in range(300)]
    assert max(abs(d["angle"]) for d in draws) <= 7 and max(abs(d["angle"]) for d in draws) > 6.5
    assert max(abs(t) for d in draws for t in d["translate"]) <= 0.05
    assert all(0.85 <= f <= 1.15 for d in draws for f in d["factors"])
    assert len({tuple(d["order"]) for d in draws}) == 6


def test_a_16_bit_or_float_training_image_decodes_as_its_8_bit_scan():
    scan = np.asarray(smooth_image(5).convert("L"))  # (H, W) uint8
    eight = data.decode_sample({"png": encoded(Image.fromarray(scan), "PNG"), "txt": b"a scan"})[0]
    assert data.decode_sample({"png": b"not a png", "txt": b"a scan"}) == (None, "a scan", "image")
    assert data.decode_sample({"png": encoded(Image.fromarray(scan), "PNG")})[2] == "caption"
    for image in (
        Image.fromarray(scan.astype(np.uint16) * 257),
        Image.fromarray(scan.astype(np.float32) / 255),
    ):
        decoded, caption, problem = data.decode_sample(
            {"png": encoded(image, "PNG" if image.mode != "F" else "TIFF"), "txt": b"a scan"}
        )
        assert caption == "a scan" and not problem
        assert np.array_equal(np.asarray(decoded), np.asarray(eight))
