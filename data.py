"""What training and evaluation read: the CLIP tokenizer, CSV files and WebDataset shards, images of any bit
depth, the evaluation transform, coupled augmentation, the training loader and the reading side of the
teacher cache. Imports no other file of this project: copy it into yours.

    tokens = tokenize(["Ultrasound image of the fetal brain."])      # (1, 117): open_clip's SimpleTokenizer ids
    for student_images, teacher_images, tokens in train_loader("shards/{000000..000246}.tar", student_view,
                                                               teacher_view, batch_size=256): ...

bpe_simple_vocab_16e6.txt.gz is OpenAI CLIP's BPE merges file (MIT licence), byte for byte from
open_clip_torch 3.3.0 (sha256 924691ac...48d6804a); the 49,408-entry vocabulary is built from it as CLIP
does.

Past the ~500 lines of a file users copy (about 740): still one concern, a pair as the models read it, in the
order it flows (text -> tokens, files -> pixels -> views -> batches, and the teacher cache's entries joined to
them); the cache's checks live here so that a run and its loader read a cache one way (tools/cache.py only
writes).
"""

import csv
import dataclasses
import functools
import gzip
import hashlib
import html
import io
import json
import math
import os
import random
import sys
import tarfile

import ftfy
import numpy as np
import tokenizers
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import webdataset as wds
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # loader workers fork after tokenizing

# ------------------------------------------------------------------ tokenizer: open_clip's SimpleTokenizer ids

CONTEXT_LENGTH = 117  # FetalCLIP's text context; model.py has its own copy (tests/test_layout.py)

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = 49406, 49407
# CLIP's pre-tokenizer regex; CLIP compiles it with IGNORECASE
CLIP_PATTERN = r"""(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# BPE pieces of the special tokens' text under CLIP's merges (see clip_tokenizer)
SPECIAL_PIECES = {
    f"<{word}_of_text>": ["<", word, "_", "of", "_", "text", "></w>"] for word in ("start", "end")
}


def bytes_to_unicode():
    """CLIP's byte -> printable character table (printable bytes map to themselves)."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = bs[:] + [256 + n for n in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    return dict(zip(bs, map(chr, cs)))


@functools.cache
def clip_tokenizer():
    """The `tokenizers` BPE pipeline, without start/end tokens. Its regex engine (Oniguruma) and CLIP's
    (`regex`) agree on every code point assigned in Unicode 14; unassigned ones may differ, as between
    `regex` versions."""
    merges = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    chars = list(bytes_to_unicode().values())
    tokens = (
        chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIAL_PIECES)
    )
    vocab = {t: i for i, t in enumerate(tokens)}  # 49,408 entries
    # CLIP's regex isolates a literal "<end_of_text>" and its BPE cache maps it to the special id.
    # Merges ranked after all of CLIP's join its pieces into one symbol with that id; they touch no
    # other word, since no other pre-token mixes '<' with letters.
    for special, pieces in SPECIAL_PIECES.items():
        joined = pieces[0]
        for piece in pieces[1:]:
            merges.append((joined, piece))
            joined += piece
            vocab[joined] = vocab[special]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, end_of_word_suffix="</w>"))
    split = tokenizers.pre_tokenizers.Split(
        tokenizers.Regex(CLIP_PATTERN), behavior="removed", invert=True
    )
    to_bytes = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([split, to_bytes])
    return tok


def clean_text(text):
    """open_clip's 'lower' cleaning: ftfy, HTML unescape twice, strip, collapse whitespace, lower."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def tokenize(texts, context_length=CONTEXT_LENGTH):
    """str | list[str] -> (N, context_length) long: start, BPE ids, end, 0-padding; a text longer
    than the context is cut and its last token set to the end token."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    # U+0345 case-folds to a letter, so no branch of CLIP's case-insensitive regex matches it and
    # CLIP drops it like whitespace (Oniguruma would keep it)
    cleaned = [clean_text(t).replace("\u0345", " ") for t in texts]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, encoding in enumerate(clip_tokenizer().encode_batch(cleaned, add_special_tokens=False)):
        ids = [SOT] + encoding.ids[:context_length] + [EOT]
        if len(ids) > context_length:
            ids = ids[: context_length - 1] + [EOT]
        result[i, : len(ids)] = torch.tensor(ids)
    return result


# ------------------------------------------------------------------ readers


def read_csv(path, delimiter, columns):
    """-> [{column: stripped value}]; headers match stripped (Planes DB spells 'Train ' with a trailing space)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = {name.strip(): name for name in reader.fieldnames or []}
        for column in columns:
            if column.strip() not in header:
                raise ValueError(f"{path}: missing column {column!r} (found {reader.fieldnames})")
        return [{c: (row[header[c.strip()]] or "").strip() for c in columns} for row in reader]


def expand_urls(urls):
    """Shards from a brace pattern ('train-{000000..000009}.tar', '::' joins several), a list or a folder."""
    if isinstance(urls, str) and os.path.isdir(urls):
        urls = sorted(os.path.join(urls, f) for f in os.listdir(urls) if f.endswith(".tar"))
    urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("no shards given")
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not os.path.isfile(url):
            raise FileNotFoundError(f"shard not found: {url}")
    return urls


def count_samples(urls):
    """Samples (distinct keys) in local shards, from the tar headers; a broken shard counts those before the break."""
    total = 0
    for url in expand_urls(urls):
        if "://" in url or url.startswith("pipe:"):
            raise ValueError(f"cannot count samples of remote shard {url}: give samples_per_epoch")
        keys, size = set(), os.path.getsize(url)
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    # tarfile reads headers only: check the data fits
                    if member.offset_data + member.size > size:
                        raise tarfile.ReadError(f"unexpected end of data in {member.name}")
                    keys.add(
                        wds.tariterators.base_plus_ext(member.name)[0] if member.isreg() else None
                    )
        except (tarfile.TarError, EOFError, OSError) as error:
            print(
                f"data: shard {url} is broken after {len(keys - {None})} samples ({error})",
                file=sys.stderr,
            )
        total += len(keys - {None})
    return total


# ------------------------------------------------------------------ pixels: any bit depth to the models' 8 bits


def scale_to_8bit(pixels, bits=0):
    """(H, W) or (H, W, C) array -> (uint8 array, how it was scaled; '' for 8-bit input). Never clipped:
    integers scale by their bit depth, `bits` (a DICOM file's BitsStored) or else 16 where the values fit in
    16 bits, so a 16-bit export of an 8-bit scan (v * 257) gives back v; floats by their value range: [0, 1]
    times 255, [0, 255] kept, any other range stretched from its minimum to its maximum (and said so)."""
    if pixels.dtype == np.uint8:
        return pixels, ""
    values = pixels.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("pixel values are not all finite")
    if np.issubdtype(pixels.dtype, np.floating) or low < 0:
        kind = "float" if np.issubdtype(pixels.dtype, np.floating) else "signed"
        if 0 <= low and high <= 1:
            return np.rint(values * 255).astype(np.uint8), f"{kind} [0, 1] x 255"
        if 0 <= low and high <= 255:
            return np.rint(values).astype(np.uint8), f"{kind} [0, 255]"
        stretched = (values - low) * (255 / (high - low)) if high > low else values * 0
        return np.rint(stretched).astype(
            np.uint8
        ), f"{kind} range [{low:g}, {high:g}] stretched to 0-255"
    bits = bits or (16 if high < 2**16 else 8 * pixels.dtype.itemsize)
    if high >= 2**bits:
        raise ValueError(f"pixel values up to {high:g} do not fit in {bits} bits")
    return np.rint(values * (255 / (2**bits - 1))).astype(
        np.uint8
    ), f"{bits}-bit / {(2**bits - 1) / 255:g}"


def to_8bit(image):
    """A PIL image of any mode -> ('L' or 'RGB' 8-bit image, how it was scaled: see scale_to_8bit). PIL's own
    convert('RGB') clips 16-bit values at 255 (a scan becomes a white silhouette) and floats at 1; palettes and
    other colour spaces go through PIL's conversion, alpha is dropped."""
    if image.mode in ("L", "RGB"):
        return image, ""
    if image.mode in ("1", "LA", "La"):
        return image.convert("L"), ""
    # I;16 (PNG, TIFF), I;16B, I (32-bit), F (float TIFF)
    if image.mode == "F" or image.mode.startswith("I"):
        pixels, note = scale_to_8bit(np.asarray(image))
        return Image.fromarray(pixels, "L"), note
    return image.convert("RGB"), ""  # P, PA, RGBA, CMYK, YCbCr, LAB, HSV ...


# ------------------------------------------------------------------ transforms


def pad_to_square(image):
    """Centre the image on a black square of side max(W, H); 'L' stays 'L' (3x cheaper), other modes become RGB."""
    image = image if image.mode in ("L", "RGB") else image.convert("RGB")
    side = max(image.size)
    square = Image.new(image.mode, (side, side))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def normalise(image, mean, std):
    """PIL 'L' or 'RGB' -> (3, H, W): to_tensor then normalize as one lookup of each 8-bit value in a table
    (bit-identical to them); grayscale is repeated over the channels."""
    # (H * W * channels,)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).long()
    table = normalisation_table(tuple(mean), tuple(std))  # (3, 256)
    if image.mode == "L":
        return table.index_select(1, pixels).view(3, image.height, image.width)
    return table.gather(1, pixels.view(-1, 3).T).view(3, image.height, image.width)


@functools.cache
def normalisation_table(mean, std):
    """(3, 256): what to_tensor then normalize make of each 8-bit value, computed as they compute it."""
    values = torch.arange(256, dtype=torch.float32).div(255)
    return values.sub(torch.tensor(mean)[:, None]).div(torch.tensor(std)[:, None])


def eval_transform(image_size, mean, std):
    """PIL -> (3, S, S): pad to square, resize S bicubic, centre crop S, normalise."""
    resize = T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose(
        [
            pad_to_square,
            resize,
            T.CenterCrop(image_size),
            functools.partial(normalise, mean=mean, std=std),
        ]
    )


# caches record it; bump version if views change
AUGMENT = dict(degrees=7.0, translate=0.05, jitter=0.15, version="2")


def augment_params(seed, epoch, key):
    """One draw of RandomAffine + ColorJitter (AUGMENT), a pure function of (seed, epoch, sample key): replayable."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    # U(-1, 1); translation: fractions of the side
    u = (2 * torch.rand(6, generator=generator) - 1).tolist()
    params = dict(
        angle=AUGMENT["degrees"] * u[0],
        translate=(AUGMENT["translate"] * u[1], AUGMENT["translate"] * u[2]),
    )
    # brightness, contrast, saturation
    params["factors"] = tuple(1 + AUGMENT["jitter"] * x for x in u[3:])
    # the order the three adjustments run in
    params["order"] = torch.randperm(3, generator=generator).tolist()
    return params


ADJUST = (
    TF.adjust_brightness,
    TF.adjust_contrast,
    TF.adjust_saturation,
)  # in the order of params["factors"]


def coupled_views(square, params, views):
    """One augment_params draw applied to each view: a pad_to_square image ('L' or 'RGB'), [(size, mean, std), ...]
    -> [(3, size, size)]. The geometry is relative (rotation about the centre, translation as a fraction of the
    side), so every view shows the same scan. A bicubic resize then RandomAffine's bilinear warp, made cheap: an
    integer box filter (Image.reduce, shared by views that shrink alike) to at most 1.2x the view, then one PIL
    affine with torchvision's own matrix times the remaining scale (PSNR >= 35 dB against the two steps)."""
    shrunk, out = {}, []
    for size, mean, std in views:
        factor = math.ceil(square.width / (1.2 * size))
        # a box filter under 3 smooths less than bicubic: resize exactly
        key = factor if factor >= 3 else -size
        if key not in shrunk:
            shrunk[key] = (
                square.reduce(factor) if factor >= 3 else square.resize((size, size), Image.BICUBIC)
            )
        # rotation about the view's centre after the shift
        translate = [t * size for t in params["translate"]]
        matrix = TF._get_inverse_affine_matrix(
            [size / 2, size / 2], params["angle"], translate, 1.0, [0.0, 0.0]
        )
        scale = shrunk[key].width / size  # source pixels per view pixel
        view = shrunk[key].transform(
            (size, size), Image.AFFINE, [scale * m for m in matrix], Image.BILINEAR
        )
        for i in params["order"]:  # ColorJitter in the drawn order, torchvision's own functions
            view = ADJUST[i](view, params["factors"][i])
        out.append(normalise(view, mean, std))
    return out


# ------------------------------------------------------------------ training loader

IMAGE_EXTENSIONS = (
    "jpg",
    "png",
    "jpeg",
    "webp",
    "tif",
    "tiff",
    "bmp",
)  # the image fields a sample may hold
SKIP_REASONS = (
    "image",
    "caption",
    "uncached",
)  # unreadable or missing, no caption, no teacher-cache entry


def decode_sample(sample):
    """A raw WebDataset sample -> (PIL image or None, caption, problem): problem is '' for a usable pair,
    else the SKIP_REASONS entry saying why not ("image": missing or unreadable, "caption": none)."""
    image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except (KeyError, UnicodeDecodeError):
        caption = ""
    try:
        image = Image.open(io.BytesIO(sample[image_key]))
        image.load()  # decodes: raises when corrupt
        image = to_8bit(image)[0]
    except Exception:  # missing or unreadable: PIL raises several types
        return None, caption, "image"
    return image, caption, "" if caption else "caption"


class StaleCache(ValueError):
    """A teacher-cache entry that was computed from another sample than the one the shard now holds."""


@dataclasses.dataclass(eq=False)
class CoupledShards(torch.utils.data.IterableDataset):
    """Batches of coupled views from WebDataset shards (train_loader's settings, see there). Each (rank,
    worker) pair is a reader: every readers-th shard (sample, with fewer shards than readers), through a
    shuffle buffer, batched."""

    urls: list  # the shards, expanded
    views: list  # [(size, mean, std)]: the student's, then the teacher's (none when the teacher is cached)
    cache: tuple  # (folder, manifest) of a teacher cache, or None
    batch_size: int  # per rank
    num_workers: int
    seed: int  # of the shuffle
    augment_seed: int  # of the augmentation draws
    epoch: int  # TrainLoader.set_epoch changes it
    rank: int
    world_size: int
    samples_per_epoch: int
    resampled: bool
    shuffle_buffer: int
    context_length: int
    return_keys: bool

    def __post_init__(self):
        workers = max(self.num_workers, 1)
        # shared with the workers: skipped samples per worker and reason, broken shards (whoever read them)
        self.skipped = torch.zeros(workers, len(SKIP_REASONS), dtype=torch.long).share_memory_()
        self.broken = torch.zeros(len(self.urls), dtype=torch.bool).share_memory_()

    def _stream(self, reader, readers, rng):
        """Raw samples of one reader, pass after pass (a single pass when the epoch is one pass)."""
        order = self.urls[:]
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)  # the same on every reader
        by_sample = len(order) < readers  # too few shards to split: split by sample
        mine = order if by_sample else order[reader::readers]
        empty_passes = 0
        while True:
            urls = [rng.choice(self.urls) for _ in self.urls] if self.resampled else mine
            found = 0
            for i, sample in enumerate(self._read(urls)):
                if not by_sample or self.resampled or i % readers == reader:
                    found += 1
                    yield sample
            empty_passes = 0 if found else empty_passes + 1
            if self.samples_per_epoch <= 0:
                return
            # a fixed epoch length would loop forever
            if empty_passes == (20 if self.resampled else 1):
                raise RuntimeError(f"data: reader {reader} of {readers} found no sample in {urls}")

    def _read(self, urls):
        """Raw samples of the shards, in order; a broken shard's samples before the break are kept. With a
        cache, each joins its entry (same keys, same order, minus unreadable samples), checked against the
        sample's digest."""
        for url in urls:
            samples = wds.tarfile_samples(
                [{"url": url}], handler=functools.partial(self._broken, url)
            )
            if self.cache is None:
                yield from samples
                continue
            cached = wds.tarfile_samples(
                [{"url": os.path.join(self.cache[0], cache_shard_name(url))}]
            )
            entry = next(cached, None)
            for sample in samples:
                if entry is not None and entry["__key__"] == sample["__key__"]:
                    if entry["source.txt"].decode() != sample_digest(sample):
                        stale = f"teacher cache {self.cache[0]}: the entry for {sample['__key__']} in {url}"
                        raise StaleCache(
                            f"{stale} was computed from another sample; run `python -m tools.cache ...` again"
                        )
                    sample, entry = {**entry, **sample}, next(cached, None)
                yield sample

    def _broken(self, url, error):
        index = self.urls.index(url)
        if not self.broken[index]:
            self.broken[index] = True
            print(f"data: skipping the rest of broken shard {url}: {error}", file=sys.stderr)
        return True  # go on with the next shard

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        rng = random.Random(f"{self.seed}/{self.epoch}/{reader}")
        counts = self.skipped[worker]
        quota = -1  # batches of this worker; -1: until its share runs out
        if self.samples_per_epoch > 0:
            per_rank = self.samples_per_epoch // (self.world_size * self.batch_size)
            quota = per_rank // workers + (worker < per_rank % workers)
        batch, yielded, bad_streak = [], 0, 0
        # webdataset's buffer
        shuffle = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
        for sample in shuffle(self._stream(reader, readers, rng)):
            if yielded == quota:
                return
            image, caption, problem = decode_sample(sample)
            if not problem and self.cache is not None and "image.npy" not in sample:
                problem = "uncached"
            bad_streak = bad_streak + 1 if problem else 0
            # with a fixed epoch length, all-unreadable data would loop forever
            if bad_streak > 10_000:
                raise RuntimeError(f"data: 10,000 unusable samples in a row in {self.urls}")
            if problem:
                counts[SKIP_REASONS.index(problem)] += 1
                continue
            batch.append(self._prepare(sample, image, caption))
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch, yielded = [], yielded + 1

    def _prepare(self, sample, image, caption):
        """-> (views, caption, key, cached teacher (image (D,), text (D,)) or None). With a cache the
        views replay the cached augmentation of this epoch, so the student sees what the teacher saw."""
        key, teacher = sample["__key__"], None
        augmentation = self.epoch
        if self.cache is not None:
            augmentation = cached_augmentation(self.epoch, self.cache[1]["augs"])
            image_features = load_npy(sample["image.npy"])[augmentation]  # (augs, D)[augmentation]
            teacher = image_features, load_npy(sample["text.npy"])  # (D,), (D,) fp16
        params = augment_params(self.augment_seed, augmentation, key)
        return coupled_views(pad_to_square(image), params, self.views), caption, key, teacher

    def _collate(self, batch):
        views = [torch.stack([b[0][v] for b in batch]) for v in range(len(self.views))]
        student, teacher = views[0], views[1] if len(views) > 1 else None
        if self.cache is not None:
            teacher = tuple(torch.stack([b[3][i] for b in batch]) for i in range(2))
        tokens = tokenize([b[1] for b in batch], self.context_length)
        return (student, teacher, tokens) + (([b[2] for b in batch],) if self.return_keys else ())


def load_npy(field):
    """A cache entry's .npy bytes -> tensor (fp16, as stored)."""
    return torch.from_numpy(np.load(io.BytesIO(field)))


class TrainLoader(torch.utils.data.DataLoader):
    """A DataLoader of CoupledShards: iterating runs one epoch, then reports the samples it skipped (kept in
    .skipped and .broken_shards; also when the caller stops early). set_epoch(e) changes the next epoch's
    draws."""

    skipped, broken_shards = {}, ()  # until an epoch has run to its end

    def set_epoch(self, epoch):
        self.dataset.epoch = epoch

    def __len__(self):
        """Batches per epoch on this rank (an upper bound for a single pass)."""
        d = self.dataset
        return (d.samples_per_epoch if d.samples_per_epoch > 0 else count_samples(d.urls)) // (
            d.world_size * d.batch_size
        )

    def __iter__(self):
        d = self.dataset
        d.skipped.zero_(), d.broken.zero_()
        batches = super().__iter__()
        try:
            yield from batches
        # from a worker, the message holds its traceback: keep the last line
        except StaleCache as error:
            raise StaleCache(
                str(error).strip().splitlines()[-1].split("StaleCache: ")[-1]
            ) from None
        finally:  # also when the caller stops early (GeneratorExit): the report counts what was read
            del batches  # stops the workers, so their counts are final
            self.skipped = dict(zip(SKIP_REASONS, d.skipped.sum(0).tolist()))
            self.broken_shards = [url for url, broken in zip(d.urls, d.broken.tolist()) if broken]
            self.skipped["shard"] = len(self.broken_shards)
            if any(self.skipped.values()):
                image, caption, uncached, shard = self.skipped.values()
                print(
                    f"data: epoch {d.epoch} (rank {d.rank}) skipped {image} unreadable images, {caption} captionless "
                    f"and {uncached} uncached samples, and the rest of {shard} broken shards {self.broken_shards[:3]}",
                    file=sys.stderr,
                )


def train_loader(
    urls,
    student_view,
    teacher_view,
    batch_size,
    *,
    num_workers=0,
    seed=0,
    epoch=0,
    rank=0,
    world_size=1,
    samples_per_epoch=-1,
    resampled=False,
    shuffle_buffer=1000,
    context_length=CONTEXT_LENGTH,
    return_keys=False,
    pin_memory=False,
    teacher_cache="",
    augment_seed=-1,
):
    """WebDataset shards (image IMAGE_EXTENSIONS, caption txt; brace pattern, list or folder) -> TrainLoader
    of (student_images (B,3,Ss,Ss), teacher_images (B,3,St,St) or None, tokens (B,L)[, keys]). Views: (size,
    mean, std); batch_size is per rank. Both views come from one draw, a pure function of (augment_seed
    (default: seed), epoch, sample key); seed drives the shuffle. Ranks read disjoint shards (or samples,
    with fewer shards than readers) whose union is the data set. samples_per_epoch > 0: exactly
    samples_per_epoch // (world_size * batch_size) batches per rank, readers wrapping around their share
    (use it under data parallelism); else one pass, each worker dropping its last partial batch. resampled:
    shards drawn with replacement. teacher_cache: a folder of tools/cache.py (checked first by check_cache);
    the second item is then the cached teacher features (image, text), (B, D) each, fp16, L2-normalised;
    epoch e replays cached augmentation e % augs. augment_seed -1 = seed."""
    if resampled and samples_per_epoch <= 0:
        raise ValueError("resampled=True needs samples_per_epoch > 0")
    cache = (teacher_cache, read_cache_manifest(teacher_cache)) if teacher_cache else None
    views = [student_view] + ([teacher_view] if teacher_view is not None and cache is None else [])
    dataset = CoupledShards(
        urls=expand_urls(urls),
        views=views,
        cache=cache,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        augment_seed=seed if augment_seed < 0 else augment_seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        samples_per_epoch=samples_per_epoch,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        context_length=context_length,
        return_keys=return_keys,
    )
    return TrainLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)


# ------------------------------------------------------------------ teacher cache: the reading side
# tools/cache.py writes a cache; what it holds and every check of it before a run reads it live here.

CACHE_MANIFEST = "manifest.json"
# What manifest.json holds: the teacher, the draws, what the views depend on (VIEW_KEYS) and, per training
# shard, the entry of its finished cache shard (None until then). A resumed build must match IDENTITY;
# check_cache checks a run.
VIEW_KEYS = ("augment", "image_size", "image_mean", "image_std")
IDENTITY = ("teacher", "teacher_sha256", "seed", "augs", *VIEW_KEYS, "context_length")
MANIFEST_KEYS = (
    "teacher",
    "teacher_ckpt",
    *IDENTITY[1:],
    "embed_dim",
    "logit_scale",
    "shards",
)  # file order
# An entry: the cached sample count, the training shard's fingerprint, and the cache shard's size and the
# sha256 of its first HEAD_BYTES, which bind the file to its training shard at start-up without decoding it.
ENTRY_KEYS = ("samples", "fingerprint", "bytes", "head_sha256")
HEAD_BYTES = 1 << 16


def cached_augmentation(epoch, augs):
    """Epoch e replays cached draw e % augs: each draw as often, and a live teacher's views in the first augs epochs."""
    return epoch % augs


def cache_shard_name(url):
    """A training shard's cache shard has the same file name, inside the cache folder."""
    return os.path.basename(url.split("?")[0])


def sample_digest(sample):
    """Digest of a raw WebDataset sample's fields (image and caption bytes): binds a cache entry to its pair."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(k for k in sample if not k.startswith("__")):
        digest.update(name.encode() + b"\0" + bytes(sample[name]) + b"\0")
    return digest.hexdigest()


def head_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()


def shard_fingerprint(url):
    """A cheap identity of a shard's content: its size and every member's name and size, read from the tar
    headers alone (milliseconds for a shard of a thousand pairs). Regenerated shards change it; replaced bytes
    of the same sizes are caught per sample by sample_digest."""
    digest = hashlib.sha256(str(os.path.getsize(url)).encode())
    with tarfile.open(url) as tar:
        for member in tar:
            digest.update(f"{member.name}\0{member.size}\0".encode())
    return digest.hexdigest()


def view_recipe(view):
    """What a cached view depends on besides (seed, draw, key): the augmentation (AUGMENT, its version
    included) and the teacher's input (size, mean, std). A cache made with another recipe holds other
    views."""
    size, mean, std = view
    return {
        "augment": dict(AUGMENT),
        "image_size": size,
        "image_mean": [float(m) for m in mean],
        "image_std": [float(s) for s in std],
    }


def read_cache_manifest(folder):
    """A cache folder's manifest.json with every key there, else one line naming what is wrong."""
    path = os.path.join(folder, CACHE_MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: not a teacher cache (write one with `python -m tools.cache`)"
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error}); rebuild the cache") from None
    manifest = manifest if isinstance(manifest, dict) else {}
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    for name, entry in (manifest.get("shards") or {}).items():
        if isinstance(entry, dict):
            missing += [f"shards/{name}/{key}" for key in ENTRY_KEYS if key not in entry]
    if missing:
        why = "made by an older cache.py, which did not record what its views depend on, or damaged"
        raise ValueError(
            f"{path} has no key {missing[0]!r} ({why}): rebuild it with cache.py into a new --out_dir"
        )
    return manifest


def shard_problem(folder, url, entry, fingerprint):
    """Why the cache shard of training shard `url` (current fingerprint given) cannot be used, as words that
    follow 'teacher cache FOLDER', or ''. Cheap: its entry, the cache shard's size and its first
    HEAD_BYTES."""
    path = os.path.join(folder, cache_shard_name(url))
    if not isinstance(entry, dict):
        return f"has no finished cache shard for {url}"
    if entry["fingerprint"] != fingerprint:
        return f"was made from another {url} (its members changed)"
    if not os.path.isfile(path):
        return f"lacks {path}, the cache shard of {url}"
    if os.path.getsize(path) != entry["bytes"]:
        size = os.path.getsize(path)
        return f"holds a truncated or replaced {path} ({size} bytes; {entry['bytes']} were written)"
    if head_sha256(path) != entry["head_sha256"]:
        return f"holds a {path} that is not the cache shard of {url} (swapped or replaced: its first bytes differ)"
    return ""


def check_cache(
    folder, urls, *, teacher, teacher_sha256, seed, view, context_length, teacher_ckpt=""
):
    """The manifest of a complete cache that matches the run (view: the teacher's (size, mean, std)), the
    training shards' current content and its own cache shards, else ValueError saying what differs.
    teacher_sha256 '' skips the checkpoint's hash (the run then takes the cache's teacher); teacher_ckpt
    names that file in the error. Reads tar headers, sizes and HEAD_BYTES per shard."""
    manifest = read_cache_manifest(folder)
    asked = dict(teacher=teacher, seed=seed, context_length=context_length, **view_recipe(view))
    if teacher_sha256:
        asked["teacher_sha256"] = teacher_sha256
    hints = {
        "seed": " (train.py --augment_seed sets the augmentation seed alone)",
        "teacher_sha256": f" (it was made from {manifest['teacher_ckpt']}, this run gives {teacher_ckpt})",
        "augment": " (the augmentation, data.AUGMENT, changed since: rebuild the cache with cache.py)",
    }
    for key, value in asked.items():
        if manifest[key] != value:
            made = f"teacher cache {folder} was made with {key} {manifest[key]!r}"
            raise ValueError(f"{made}; this run asks for {value!r}{hints.get(key, '')}")
    for url in expand_urls(urls):
        entry = manifest["shards"].get(cache_shard_name(url))
        problem = shard_problem(folder, url, entry, shard_fingerprint(url))
        if problem:
            raise ValueError(
                f"teacher cache {folder} {problem}; run `python -m tools.cache ...` again to redo it"
            )
    return manifest
