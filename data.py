"""
Data: the CLIP tokenizer, readers for the real formats (WebDataset shards, Planes DB, HC18), the
evaluation transform, the training loader with coupled augmentation, and a synthetic fetal
ultrasound benchmark written in exactly the real formats.

    python data.py                                # writes data/demo: shards/ planes/ hc18/
    python data.py --out=data/big --seed=1 --n_train=20000
    python data.py --bench                        # coupled two-view samples/s, one worker, 800x540 PNGs
    python data.py cache --teacher_ckpt=FetalCLIP_weights.pt --train_data='shards/{000000..000123}.tar' \
        --augs=4 --out=teacher_cache                # the teacher's embeddings, once, for train.py --teacher_cache

Tokenizer data: bpe_simple_vocab_16e6.txt.gz is OpenAI CLIP's BPE merges file (MIT licence), copied
byte for byte from open_clip_torch 3.3.0 (open_clip/bpe_simple_vocab_16e6.txt.gz). The 49,408-entry
vocabulary is built from it at load time exactly as CLIP does: 256 byte characters, the same with
'</w>', the first 48,894 merges, <start_of_text> and <end_of_text>.
"""
import ast
import contextlib
import csv
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
import time

import ftfy
import numpy as np
import tokenizers
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import tqdm
import webdataset as wds
from PIL import Image, ImageFilter

import model as model_lib

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # loader workers fork after tokenizing

# -----------------------------------------------------------------------------
# tokenizer: same ids as open_clip.tokenizer.SimpleTokenizer

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = 49406, 49407
# CLIP's pre-tokenizer regex; CLIP compiles it with IGNORECASE
CLIP_PATTERN = r"""(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# BPE pieces of the special tokens' text under CLIP's merges (see clip_tokenizer)
SPECIAL_PIECES = {"<start_of_text>": ["<", "start", "_", "of", "_", "text", "></w>"],
                  "<end_of_text>": ["<", "end", "_", "of", "_", "text", "></w>"]}


def bytes_to_unicode():
    """CLIP's byte -> printable character table (printable bytes map to themselves)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:] + [256 + n for n in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=None)
def clip_tokenizer():
    """The `tokenizers` BPE pipeline (built once per process; ids without start/end tokens). Its
    regex engine (Oniguruma) and CLIP's (the `regex` package) agree on every assigned code point;
    code points unassigned in Unicode 14 may classify differently, as they do between versions
    of `regex` itself."""
    merges = gzip.open(BPE_PATH).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIAL_PIECES)
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
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(CLIP_PATTERN), behavior="removed", invert=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tok


def clean_text(text):
    """open_clip's 'lower' cleaning: ftfy, HTML unescape twice, strip, collapse whitespace, lower."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def tokenize(texts, context_length=117):
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
            ids = ids[:context_length - 1] + [EOT]
        result[i, :len(ids)] = torch.tensor(ids)
    return result


# -----------------------------------------------------------------------------
# readers for the real formats

PLANES_CSV, PLANES_COLUMNS = "FETAL_PLANES_DB_data.csv", ("Image_name", "Patient_num", "Plane", "Brain_plane",
                                                         "Operator", "US_Machine", "Train ")
HC18_CSV, HC18_COLUMNS = "training_set_pixel_size_and_HC.csv", ("filename", "pixel size(mm)",
                                                                "head circumference (mm)")


def read_csv(path, delimiter, columns):
    """-> list of {column: stripped value}. Header names match after stripping spaces (the real
    Planes DB spells 'Train ' with a trailing space); a missing column is an error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = {name.strip(): name for name in reader.fieldnames or []}
        for column in columns:
            if column.strip() not in header:
                raise ValueError(f"{path}: missing column {column!r} (found {reader.fieldnames})")
        return [{c: (row[header[c.strip()]] or "").strip() for c in columns} for row in reader]


def _number(path, line, column, text, kind):
    try:
        return kind(text)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise ValueError(f"{path}, row {line}: column {column!r} = {text!r} is not {expected}") from None


def _existing(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    return path


def read_planes_db(root):
    """FETAL_PLANES_DB (';'-separated) -> [{path, image_name, patient, plane, brain_plane, operator,
    us_machine, train}], one per row, in file order."""
    path = os.path.join(root, PLANES_CSV)
    return [dict(path=_existing(os.path.join(root, "Images", row["Image_name"] + ".png")),
                 image_name=row["Image_name"], patient=_number(path, i + 2, "Patient_num", row["Patient_num"], int),
                 plane=row["Plane"], brain_plane=row["Brain_plane"], operator=row["Operator"],
                 us_machine=row["US_Machine"], train=_number(path, i + 2, "Train ", row["Train "], int) == 1)
            for i, row in enumerate(read_csv(path, ";", PLANES_COLUMNS))]


def read_hc18(root):
    """HC18 training set -> [{path, filename, pixel_size (mm/px), hc (mm)}], in file order."""
    path = os.path.join(root, HC18_CSV)
    return [dict(path=_existing(os.path.join(root, "training_set", row["filename"])), filename=row["filename"],
                 pixel_size=_number(path, i + 2, "pixel size(mm)", row["pixel size(mm)"], float),
                 hc=_number(path, i + 2, "head circumference (mm)", row["head circumference (mm)"], float))
            for i, row in enumerate(read_csv(path, ",", HC18_COLUMNS))]


def expand_urls(urls):
    """Shard list from a brace pattern ('train-{000000..000009}.tar', '::' joins several), a list,
    or a folder (its *.tar, sorted). Local shards must exist."""
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
    """Number of samples (distinct keys) in local shards, read from the tar headers only."""
    total = 0
    for url in expand_urls(urls):
        if "://" in url or url.startswith("pipe:"):
            raise ValueError(f"cannot count samples of remote shard {url}: give samples_per_epoch")
        with tarfile.open(url) as tar:
            total += len({wds.tariterators.base_plus_ext(m.name)[0] for m in tar if m.isreg()} - {None})
    return total


def demo_shards(root):
    """The synthetic benchmark's shard folder."""
    return os.path.join(root, "shards")


# -----------------------------------------------------------------------------
# transforms

def pad_to_square(image):
    """Centre the image on a black square of side max(W, H). Grayscale ('L') stays grayscale, three
    times cheaper to transform and identical once expanded to RGB; any other mode becomes RGB."""
    image = image if image.mode in ("L", "RGB") else image.convert("RGB")
    side = max(image.size)
    square = Image.new(image.mode, (side, side))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def to_normalised_tensor(image, mean, std):
    """PIL 'L' or 'RGB' -> (3, H, W) float, normalised (grayscale repeated over the channels)."""
    tensor = TF.to_tensor(image)
    return TF.normalize(tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor, mean, std)


def eval_transform(image_size, mean, std):
    """PIL -> (3, S, S): pad to square, resize S bicubic, centre crop S, normalise."""
    return T.Compose([pad_to_square, T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), functools.partial(to_normalised_tensor, mean=mean, std=std)])


def augment_params(seed, epoch, key):
    """One draw of RandomAffine(7 deg, translate 0.05) + ColorJitter(0.15, 0.15, 0.15): a pure
    function of (seed, epoch, sample key), so any view can be replayed exactly."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    u = (2 * torch.rand(6, generator=generator) - 1).tolist()  # U(-1, 1)
    return dict(angle=7.0 * u[0], translate=(0.05 * u[1], 0.05 * u[2]),  # fractions of the side
                factors=(1 + 0.15 * u[3], 1 + 0.15 * u[4], 1 + 0.15 * u[5]),  # brightness, contrast, saturation
                order=torch.randperm(3, generator=generator).tolist())


def coupled_views(square, params, views):
    """Apply one draw to each view. square: a pad_to_square image; views: [(size, mean, std), ...]
    -> [(3, size, size)]. Geometry is relative (rotation about the centre, translation as a fraction
    of the side), so all views show the same transformed scan."""
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    out = []
    for size, mean, std in views:
        view = TF.center_crop(TF.resize(square, size, interpolation=T.InterpolationMode.BICUBIC), size)
        # bilinear rather than RandomAffine's default nearest: the views then agree to interpolation error
        view = TF.affine(view, angle=params["angle"], translate=[t * size for t in params["translate"]], scale=1.0,
                         shear=[0.0, 0.0], interpolation=T.InterpolationMode.BILINEAR)
        for i in params["order"]:
            view = adjust[i](view, params["factors"][i])
        out.append(to_normalised_tensor(view, mean, std))
    return out


# -----------------------------------------------------------------------------
# training loader

IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")
SKIP_REASONS = ("image", "caption", "shard", "uncached")  # ... broken tar, no teacher-cache entry


def decode_sample(sample):
    """A raw WebDataset sample -> (PIL image, caption), or the SKIP_REASONS index of why not."""
    image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except (KeyError, UnicodeDecodeError):
        caption = ""
    try:
        image = Image.open(io.BytesIO(sample[image_key]))
        image = image.convert("L" if image.mode == "L" else "RGB")  # loads: raises when corrupt
    except Exception:  # missing or unreadable: PIL raises several types
        return 0
    return (image, caption) if caption else 1


class CoupledShards(torch.utils.data.IterableDataset):
    """Batches of coupled views from WebDataset shards; see train_loader. Each (rank, worker) pair
    is one reader: it takes every readers-th shard (every readers-th sample when there are fewer
    shards than readers), shuffles through a buffer and batches."""

    def __init__(self, urls, views, batch_size, context_length, seed, epoch, samples_per_epoch, resampled,
                 shuffle_buffer, rank, world_size, num_workers, return_keys, cache, augment_seed):
        self.urls, self.views, self.batch_size, self.context_length = urls, views, batch_size, context_length
        self.cache = cache  # (folder, manifest) of a teacher-embedding cache, or None
        self.augment_seed = augment_seed
        self.seed, self.epoch, self.samples_per_epoch, self.resampled = seed, epoch, samples_per_epoch, resampled
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.return_keys = return_keys
        self.skipped = torch.zeros(max(num_workers, 1), len(SKIP_REASONS), dtype=torch.long).share_memory_()

    def _stream(self, reader, readers, rng, counts):
        """Raw samples of one reader, pass after pass (a single pass when the epoch is one pass)."""
        def handler(exn):  # a broken shard: count it, warn, go on with the next one
            counts[2] += 1
            print(f"data: skipping unreadable shard data: {exn}", file=sys.stderr)
            return True
        order = self.urls[:]
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)  # the same on every reader
        by_sample = len(order) < readers  # too few shards to split: split by sample
        mine = order if by_sample else order[reader::readers]
        empty_passes = 0
        while True:
            urls = [rng.choice(self.urls) for _ in self.urls] if self.resampled else mine
            found = 0
            for i, sample in enumerate(self._read(urls, handler)):
                if not by_sample or self.resampled or i % readers == reader:
                    found += 1
                    yield sample
            empty_passes = 0 if found else empty_passes + 1
            if self.samples_per_epoch <= 0:
                return
            if empty_passes == (20 if self.resampled else 1):  # a fixed epoch length would loop forever
                raise RuntimeError(f"data: reader {reader} of {readers} found no sample in {urls}")

    def _read(self, urls, handler):
        """Raw samples of the shards, in order; with a cache, each joined to its cached teacher
        embeddings (the cache shard lists the same keys in the same order, minus unreadable ones)."""
        if self.cache is None:
            yield from wds.tarfile_samples(({"url": u} for u in urls), handler=handler)
            return
        for url in urls:
            cached = wds.tarfile_samples([{"url": cache_shard_path(self.cache[0], url)}], handler=handler)
            entry = next(cached, None)
            for sample in wds.tarfile_samples([{"url": url}], handler=handler):
                if entry is not None and entry["__key__"] == sample["__key__"]:
                    sample, entry = {**entry, **sample}, next(cached, None)
                yield sample

    def _samples(self, reader, readers, rng, counts):
        """The reader's raw samples through a shuffle buffer (webdataset's scheme, our seeded rng)."""
        buffer = []
        for sample in self._stream(reader, readers, rng, counts):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

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
        for sample in self._samples(reader, readers, rng, counts):
            if yielded == quota:
                return
            decoded = decode_sample(sample)
            if isinstance(decoded, tuple) and self.cache is not None and "image.npy" not in sample:
                decoded = SKIP_REASONS.index("uncached")
            bad_streak = 0 if isinstance(decoded, tuple) else bad_streak + 1
            if bad_streak > 10_000:  # with a fixed epoch length, all-unreadable data would loop forever
                raise RuntimeError(f"data: 10,000 unusable samples in a row in {self.urls}")
            if not isinstance(decoded, tuple):
                counts[decoded] += 1
                continue
            batch.append(self._prepare(sample, *decoded))
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
            image_embeddings = np.load(io.BytesIO(sample["image.npy"]))  # (augs, D) fp16
            teacher = (torch.from_numpy(image_embeddings[augmentation]), torch.from_numpy(np.load(
                io.BytesIO(sample["text.npy"]))))
        params = augment_params(self.augment_seed, augmentation, key)
        return coupled_views(pad_to_square(image), params, self.views), caption, key, teacher

    def _collate(self, batch):
        views = [torch.stack([b[0][v] for b in batch]) for v in range(len(self.views))]
        student, teacher = views[0], views[1] if len(views) > 1 else None
        if self.cache is not None:
            teacher = tuple(torch.stack([b[3][i] for b in batch]) for i in range(2))
        tokens = tokenize([b[1] for b in batch], self.context_length)
        return (student, teacher, tokens) + (([b[2] for b in batch],) if self.return_keys else ())


class TrainLoader:
    """Iterating runs one epoch, then reports skipped samples (also kept in .skipped).
    set_epoch(e) changes the shuffle and the augmentation draws of the next iteration."""

    def __init__(self, dataset, num_workers, pin_memory):
        self.dataset, self.num_workers, self.pin_memory, self.skipped = dataset, num_workers, pin_memory, {}

    def set_epoch(self, epoch):
        self.dataset.epoch = epoch

    def __len__(self):
        """Batches per epoch on this rank (an upper bound for a single pass)."""
        d = self.dataset
        samples = d.samples_per_epoch if d.samples_per_epoch > 0 else count_samples(d.urls)
        return samples // (d.world_size * d.batch_size)

    def __iter__(self):
        self.dataset.skipped.zero_()
        yield from torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                               pin_memory=self.pin_memory)
        self.skipped = dict(zip(SKIP_REASONS, self.dataset.skipped.sum(0).tolist()))
        if any(self.skipped.values()):
            print(f"data: epoch {self.dataset.epoch} (rank {self.dataset.rank}): skipped "
                  f"{self.skipped['image']} unreadable or missing images, {self.skipped['caption']} missing "
                  f"captions, {self.skipped['shard']} broken shards, {self.skipped['uncached']} samples "
                  "missing from the teacher cache", file=sys.stderr)


def train_loader(urls, student_view, teacher_view, batch_size, *, num_workers=0, seed=0, epoch=0, rank=0,
                 world_size=1, samples_per_epoch=-1, resampled=False, shuffle_buffer=1000, context_length=117,
                 return_keys=False, pin_memory=False, teacher_cache="", augment_seed=None):
    """WebDataset image-caption shards (image jpg|png|jpeg|webp, caption txt) -> TrainLoader of
    (student_images (B,3,Ss,Ss), teacher_images (B,3,St,St) or None, tokens (B,L)[, keys]).

    urls: brace pattern, list or folder. student_view / teacher_view: (size, mean, std); teacher_view
    None gives no teacher images. batch_size: per rank. Both views come from one augmentation draw,
    a pure function of (augment_seed (default: seed), epoch, sample key) (augment_params); seed alone
    drives the shuffle. samples_per_epoch > 0: exactly
    samples_per_epoch // (world_size * batch_size) batches per rank, readers wrapping around their
    share when it runs short (use this under data parallelism); <= 0: one pass over the shards,
    each worker dropping its last partial batch. resampled: shards drawn with replacement (needs
    samples_per_epoch > 0). Ranks read disjoint shards (or samples, with fewer shards than
    readers), whose union is the whole data set.

    teacher_cache: a folder written by `python data.py cache` (check it first with check_cache).
    teacher_view is then unused and the second item is the cached teacher features (image (B,D),
    text (B,D)), fp16, L2-normalised; epoch e replays cached augmentation e % augs."""
    if resampled and samples_per_epoch <= 0:
        raise ValueError("resampled=True needs samples_per_epoch > 0")
    cache = (teacher_cache, read_cache_manifest(teacher_cache)) if teacher_cache else None
    views = [student_view] + ([teacher_view] if teacher_view is not None and cache is None else [])
    dataset = CoupledShards(expand_urls(urls), views, batch_size, context_length, seed, epoch, samples_per_epoch,
                            resampled, shuffle_buffer, rank, world_size, num_workers, return_keys, cache,
                            seed if augment_seed is None else augment_seed)
    return TrainLoader(dataset, num_workers, pin_memory)


# -----------------------------------------------------------------------------
# teacher-embedding cache: the frozen teacher's outputs computed once, replayed by every run

CACHE_MANIFEST = "manifest.json"
CACHE_IDENTITY = ("teacher", "teacher_sha256", "seed", "augs", "image_size", "context_length")


def cached_augmentation(epoch, augs):
    """The cached augmentation epoch `epoch` replays. epoch % augs: every draw is used equally
    often, and the first `augs` epochs are exactly the views a live teacher would see
    (augment_params(seed, epoch, key)), so cached and live runs can be compared step by step."""
    return epoch % augs


def cache_shard_path(folder, url):
    """A training shard's cache shard: the same file name inside the cache folder."""
    return os.path.join(folder, os.path.basename(url.split("?")[0]))


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_cache_manifest(folder):
    path = os.path.join(folder, CACHE_MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a teacher cache (write one with `python data.py cache`)")
    with open(path) as f:
        return json.load(f)


def check_cache(folder, urls, *, teacher, teacher_ckpt, seed, image_size, context_length):
    """The manifest of a complete cache that matches the run, else ValueError saying what differs.
    teacher_ckpt '' skips the checkpoint hash (the run then takes the cache's teacher)."""
    manifest = read_cache_manifest(folder)
    asked = dict(teacher=teacher, seed=seed, image_size=image_size, context_length=context_length)
    if teacher_ckpt:
        asked["teacher_sha256"] = file_sha256(teacher_ckpt)
    for key, value in asked.items():
        if manifest[key] != value:
            made, run = (f" ({manifest['teacher_ckpt']})", f" ({teacher_ckpt})") if key == "teacher_sha256" else ("", "")
            hint = " (train.py --augment_seed sets the augmentation seed alone)" if key == "seed" else ""
            raise ValueError(f"teacher cache {folder} was made with {key} {manifest[key]!r}{made}; this run asks "
                             f"for {value!r}{run}{hint}")
    missing = [u for u in expand_urls(urls) if manifest["shards"].get(os.path.basename(cache_shard_path("", u)))
               is None]
    if missing:
        raise ValueError(f"teacher cache {folder} has no finished cache shard for {missing[0]} ({len(missing)} "
                         "training shards missing); run `python data.py cache ...` again to finish or extend it")
    return manifest


class TeacherViews(torch.utils.data.Dataset):
    """The raw samples of one shard -> (key, caption, (augs, 3, S, S) teacher views or None)."""

    def __init__(self, samples, view, augs, seed):
        self.samples, self.view, self.augs, self.seed = samples, view, augs, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        sample = self.samples[i]
        decoded = decode_sample(sample)
        if not isinstance(decoded, tuple):
            return sample["__key__"], "", None
        square = pad_to_square(decoded[0])
        views = [coupled_views(square, augment_params(self.seed, a, sample["__key__"]), [self.view])[0]
                 for a in range(self.augs)]
        return sample["__key__"], decoded[1], torch.stack(views)


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@torch.no_grad()
def cache_one_shard(teacher, url, path, augs, seed, batch_size, num_workers, device, autocast, bar):
    """Teacher embeddings of one shard's samples -> a WebDataset shard of <key>.image.npy (augs, D)
    and <key>.text.npy (D,), fp16, L2-normalised, written atomically. Returns the sample count.
    Batches restart with each shard, so a resumed run computes exactly the same numbers."""
    samples = list(wds.tarfile_samples([{"url": url}]))
    views = TeacherViews(samples, (teacher.image_size, teacher.image_mean, teacher.image_std), augs, seed)
    loader = torch.utils.data.DataLoader(views, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    written = 0
    with tarfile.open(path + ".tmp", "w") as tar:
        for batch in loader:
            seen = len(batch)
            batch = [b for b in batch if b[2] is not None]  # unreadable: skipped by training too
            if batch:
                keys, captions = [b[0] for b in batch], [b[1] for b in batch]
                images = torch.cat([b[2] for b in batch]).to(device)  # (B * augs, 3, S, S)
                with autocast:
                    image = torch.nn.functional.normalize(teacher.encode_image(images).float(), dim=-1)
                    text = torch.nn.functional.normalize(teacher.encode_text(
                        tokenize(captions, teacher.context_length).to(device)).float(), dim=-1)
                image = image.reshape(len(batch), augs, -1).half().cpu().numpy()
                text = text.half().cpu().numpy()
                for i, key in enumerate(keys):
                    _tar_add(tar, f"{key}.image.npy", _npy(image[i]))
                    _tar_add(tar, f"{key}.text.npy", _npy(text[i]))
                written += len(batch)
            bar.update(seen)
    os.replace(path + ".tmp", path)
    return written


def write_cache(teacher_ckpt, train_data, out, *, augs=4, teacher="", seed=0, batch_size=32, num_workers=2,
                device="", dtype=""):
    """`python data.py cache`: the teacher's text embedding of every caption and its image embeddings
    for `augs` replayable coupled augmentations (augment_params(seed, a, key), a < augs), one cache
    shard per training shard plus manifest.json. Resumable: finished shards are kept, an
    interrupted one is redone; a folder holding another teacher's cache is refused."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    net = model_lib.load_model(teacher_ckpt, teacher).to(device).eval()
    autocast = (torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype)) if dtype != "float32"
                else contextlib.nullcontext())
    urls = expand_urls(train_data)
    names = [os.path.basename(cache_shard_path("", u)) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"{train_data}: training shards share file names; give each shard a distinct name")
    manifest = dict(teacher=net.name, teacher_ckpt=os.path.abspath(teacher_ckpt),
                    teacher_sha256=file_sha256(teacher_ckpt), seed=seed, augs=augs, image_size=net.image_size,
                    context_length=net.context_length, embed_dim=net.embed_dim,
                    logit_scale=net.logit_scale.exp().item(), dtype=dtype, shards={n: None for n in names})
    manifest_path = os.path.join(out, CACHE_MANIFEST)
    if os.path.exists(manifest_path):  # resuming: the same teacher and draws, or nothing
        previous = read_cache_manifest(out)
        for key in CACHE_IDENTITY:
            if previous[key] != manifest[key]:
                raise ValueError(f"{manifest_path} holds a cache with {key} {previous[key]!r}, not {manifest[key]!r}: "
                                 "use another --out folder")
        manifest["shards"] = {**manifest["shards"], **{n: c for n, c in previous["shards"].items() if c is not None}}
    os.makedirs(out, exist_ok=True)
    todo = [(u, n) for u, n in zip(urls, names) if manifest["shards"][n] is None or not os.path.exists(
        os.path.join(out, n))]
    print(f"caching {net.name} ({teacher_ckpt}) for {len(urls)} shards x {augs} augmentations into {out}; "
          f"{len(urls) - len(todo)} already done")
    total = count_samples([u for u, _ in todo]) if all("://" not in u for u, _ in todo) and todo else None
    with tqdm.tqdm(total=total, unit="sample", desc="teacher cache") as bar:
        for url, name in todo:
            manifest["shards"][name] = cache_one_shard(net, url, os.path.join(out, name), augs, seed, batch_size,
                                                       num_workers, device, autocast, bar)
            _write_json(manifest_path, manifest)  # after the shard: a listed shard is a finished one
    _write_json(manifest_path, manifest)
    print(f"wrote {out}: {sum(manifest['shards'].values())} samples, {manifest['embed_dim']}-d fp16 embeddings")
    return manifest


def _write_json(path, content):
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=1)
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# synthetic benchmark: B-mode-like scans in the real formats

GA_Q500 = (2.09924879247164, 0.253373656106037, -6.05647816678282e-3, 5.14256072059917e-5)  # SPEC 4
# pixel spacings (mm per pixel of a 48-px model input (the demo models)) the scans are drawn at; few distinct values
# keep the per-spacing GA prompts of the HC18 evaluation cheap
SPACING_GRID = (0.8, 0.95, 1.15, 1.4, 1.65, 2.0, 2.4, 2.85, 3.45, 4.15, 5.0, 6.0, 7.0)
PLANES = {"brain": "Fetal brain", "abdomen": "Fetal abdomen", "heart": "Fetal thorax", "femur": "Fetal femur",
          "cervix": "Maternal cervix", "spine": "Other", "kidney": "Other"}
SUBPLANES = ("trans-thalamic", "trans-cerebellum", "trans-ventricular")
# Planes DB rows cycle through this pattern: (kind, Brain_plane); '' = brain without a named sub-plane
PLANES_PATTERN = [("brain", s) for s in SUBPLANES * 2] + [("brain", "")] + [(k, None) for k in (
    "abdomen", "heart", "femur", "cervix") for _ in range(3)] + [("spine", None), ("kidney", None)]
# pretraining mix: (kind, sub-plane, probability)
TRAIN_MIX = [("brain", "trans-thalamic", .16), ("brain", "trans-cerebellum", .12),
             ("brain", "trans-ventricular", .12), ("abdomen", None, .12), ("heart", None, .12), ("femur", None, .12),
             ("cervix", None, .12), ("spine", None, .06), ("kidney", None, .06)]
# caption parts, in the wording of the protocol prompts and GA templates (zero_shot_prompts.json)
SUBJECTS = {
    "brain": ["the fetal brain", "the developing fetal brain", "fetal brain structures", "the fetal head and brain"],
    "abdomen": ["the fetal abdomen", "the fetal abdominal area", "fetal abdominal structures",
                "the developing fetal abdomen"],
    "heart": ["the fetal heart", "the four-chamber view of the fetal heart", "fetal cardiac structures",
              "the developing fetal heart"],
    "femur": ["the fetal femur", "the developing fetal femur", "the fetal femur and its bone length",
              "fetal femur skeletal development"],
    "cervix": ["the cervix", "the maternal cervix", "the cervical region", "the cervix and its length"],
    "spine": ["the fetal spine", "the vertebral alignment of the fetal spine", "the developing fetal spine"],
    "kidney": ["the fetal kidney", "the developing fetal kidney", "fetal renal structures"]}
SUBPLANE_DETAILS = {
    "trans-thalamic": ["in a transverse plane through the thalamus", "in the thalamic (transverse) view",
                       "with clear visualization of the thalami"],
    "trans-cerebellum": ["in a transverse plane through the cerebellum", "showing the butterfly-shaped cerebellum",
                         "with a transverse section of the cerebellum"],
    "trans-ventricular": ["in a transverse plane through the ventricles", "in the brain ventricular view",
                          "with the lateral ventricles in view"]}
OPENERS = ["Ultrasound image focusing on {}", "Detailed ultrasound scan of {}", "Fetal ultrasound image showing {}",
           "Clear ultrasound of {}", "Focused ultrasound highlighting {}", "Ultrasound scan showcasing {}"]
CLOSERS = [", highlighting anatomical structures.", ", emphasizing structural details.", ".",
           " with detailed visualization.", ", showcasing its development."]
GA_PHRASES = ["at {w} weeks and {d} days gestation", "at {w} weeks, {d} days of gestation",
              "at {w} weeks and {d} days gestational age"]
SPACING_PHRASES = ["with a pixel spacing of {p} mm/pixel", "with an image pixel spacing of {p} mm/pixel",
                   "at a pixel spacing of {p} mm/pixel"]


def hc_median(days):
    """Median head circumference (mm) at a gestational age in days (SPEC 4, q500)."""
    w = days / 7
    return math.exp(sum(b * w ** i for i, b in enumerate(GA_Q500)))


def ellipse_perimeter(a, b):
    """Ramanujan's second approximation."""
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def make_caption(rng, kind, subplane, ga_days=-1, spacing=-1.0):
    """A caption in the wording of the protocol prompts; GA and spacing in the GA templates' form."""
    pick = lambda options: options[rng.integers(len(options))]
    subject = pick(SUBJECTS[kind]) + (" " + pick(SUBPLANE_DETAILS[subplane]) if subplane else "")
    text = pick(OPENERS).format(subject)
    if ga_days >= 0:
        text += " " + pick(GA_PHRASES).format(w=ga_days // 7, d=ga_days % 7)
    if spacing > 0:
        text += ", " + pick(SPACING_PHRASES).format(p=f"{spacing:.2f}")
    return text + pick(CLOSERS)


def pick_spacing(rng, kind, hc):
    """A grid spacing at which the structure's half-length (the head's semi-major axis for fetal
    anatomy, ~17 mm for the cervix) is 17-28% of the image's long side."""
    half = 17.5 if kind == "cervix" else hc / ellipse_perimeter(1.0, 0.8)  # mm
    fits = [g for g in SPACING_GRID if 0.17 <= half / (g * 64) <= 0.28]
    return float(rng.choice(fits or [min(SPACING_GRID, key=lambda g: abs(half / (g * 64) - 0.22))]))


def _frame(x, y, cx, cy, theta):
    """Image coordinates in a shape's frame: u along the angle theta, v across it."""
    c, s = math.cos(theta), math.sin(theta)
    return (x - cx) * c + (y - cy) * s, (y - cy) * c - (x - cx) * s


def _ell(u, v, a, b, du=0.0, dv=0.0):
    """Normalised radius of the ellipse with semi-axes (a, b) centred at (du, dv): < 1 inside."""
    return np.sqrt(np.square((u - du) * (1 / a)) + np.square((v - dv) * (1 / b)))


@functools.lru_cache(maxsize=8)
def _grid(width, height, apex_y):
    """Pixel coordinates, and depth and beam angle from a probe apex at (width/2, apex_y)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return x, y, np.hypot(x - width / 2, y - apex_y), np.arctan2(x - width / 2, y - apex_y)


def draw_anatomy(tissue, x, y, rng, kind, subplane, hc, px):
    """Paint one structure into the echogenicity map (0 black .. 1 bright). hc (mm) sizes the
    fetal anatomy; px = pixels per mm."""
    h, w = tissue.shape
    theta = rng.uniform(-0.5, 0.5) + (rng.choice([0, math.pi]) if kind != "femur" else 0)
    u, v = _frame(x, y, w * rng.uniform(0.46, 0.54), h * rng.uniform(0.48, 0.55), theta)
    line = max(1.0, 0.8 * px)  # thin bright echoes, >= 1 pixel
    if kind == "brain":  # head: skull, brain, midline, then the sub-plane's structures
        a = hc / ellipse_perimeter(1.0, 0.8) * px
        b = 0.8 * a
        r = _ell(u, v, a, b)
        skull = 1.5 * px / a  # 3 mm thick, centred on the measured ellipse (r = 1)
        tissue[r < 1.25], tissue[r < 1 + skull], tissue[r < 1 - skull] = 0.06, 0.95, 0.22
        tissue[(abs(v) < line) & (abs(u) < 0.92 * a)] = 0.6
        if subplane:  # cavum septi pellucidi
            tissue[(abs(v) < 0.06 * b) & (u > -0.45 * a) & (u < -0.3 * a)] = 0.04
        if subplane == "trans-thalamic":
            for side in (-1, 1):
                tissue[_ell(u, v, 0.17 * a, 0.1 * b, 0.02 * a, side * 0.12 * b) < 1] = 0.11
        elif subplane == "trans-cerebellum":
            tissue[_ell(u, v, 0.1 * a, 0.2 * b, 0.72 * a) < 1] = 0.04  # cisterna magna
            for side in (-1, 1):
                tissue[_ell(u, v, 0.11 * a, 0.13 * b, 0.52 * a, side * 0.13 * b) < 1] = 0.5
            tissue[(abs(v) < 0.05 * b) & (abs(u - 0.52 * a) < 0.08 * a)] = 0.65  # vermis
        elif subplane == "trans-ventricular":
            for side, dark, plexus in ((1, 0.05, 0.75), (-1, 0.14, 0.45)):  # far ventricle clearer
                tissue[_ell(u, v, 0.32 * a, 0.09 * b, 0.35 * a, side * 0.3 * b) < 1] = dark
                tissue[_ell(u, v, 0.2 * a, 0.055 * b, 0.42 * a, side * 0.3 * b) < 1] = plexus
    elif kind in ("abdomen", "heart"):  # round trunk, spine at the back
        a = (0.15 if kind == "abdomen" else 0.12) * hc * px  # AC ~ 0.95 HC, thorax ~ 0.8 AC
        b = rng.uniform(0.88, 0.96) * a
        r = _ell(u, v, a, b)
        tissue[r < 1.2], tissue[r < 1.05], tissue[r < 1] = 0.07, 0.65, 0.38 if kind == "abdomen" else 0.48
        if kind == "abdomen":
            tissue[_ell(u, v, 0.26 * a, 0.17 * b, -0.2 * a, -0.3 * b) < 1] = 0.03  # stomach bubble
            tissue[_ell(u, v, 0.3 * a, 0.06 * b, 0.05 * a, 0.15 * b) < 1] = 0.05  # umbilical vein
        else:  # ribs, then a four-chamber heart: chambers split by the septum and AV valves
            ring = np.nonzero((r > 0.95) & (r < 1.08))
            ribs = np.sin(7 * np.arctan2(v[ring], u[ring])) > 0.5
            tissue[ring[0][ribs], ring[1][ribs]] = 0.95
            hu, hv = _frame(u, v, -0.15 * a, -0.05 * b, math.pi / 4)
            hr = _ell(hu, hv, 0.5 * a, 0.42 * a)
            tissue[hr < 1] = 0.58
            tissue[(hr < 0.8) & (abs(hu) > 0.05 * a) & (abs(hv) > 0.04 * a)] = 0.04
        for du, dv in ((0.75, 0), (0.62, 0.13), (0.62, -0.13)):
            tissue[_ell(u, v, 0.07 * a, 0.07 * a, du * a, dv * b) < 1] = 0.95
    elif kind == "femur":  # bright bone with an acoustic shadow, in the thigh
        half, thick = 0.1 * hc * px, max(1.5, 1.6 * px)  # femur length ~ 0.2 HC
        tissue[_ell(u, v, 1.4 * half, 0.6 * half) < 1.3] = 0.07
        tissue[_ell(u, v, 1.4 * half, 0.6 * half) < 1] = 0.32
        tissue[(v > thick) & (abs(u) < half)] *= 0.3
        tissue[((abs(u) < half) & (abs(v) < thick)) | (np.hypot(abs(u) - half, v) < 1.3 * thick)] = 1.0
    elif kind == "cervix":  # pear-shaped cervix with the bright canal and its dark mucosa
        a = rng.uniform(14, 21) * px
        b = rng.uniform(0.6, 0.8) * a
        tissue[_ell(u, v, a, b) < 1] = 0.5
        tissue[(abs(v) < 0.18 * b) & (abs(u) < 0.9 * a)] = 0.16
        tissue[(abs(v) < line) & (abs(u) < 0.85 * a)] = 0.85
    elif kind == "spine":  # two rows of vertebrae under the skin line
        step, dot = 0.03 * hc * px, max(1.2, 0.012 * hc * px)
        tissue[abs(v) < 0.14 * hc * px] = 0.3
        tissue[abs(v + 0.14 * hc * px) < line] = 0.75
        near = (np.abs(u - np.round(u / step) * step) < dot) & (abs(u) < 0.3 * hc * px)
        tissue[near & ((abs(abs(v) - 0.05 * hc * px)) < dot)] = 0.95
    elif kind == "kidney":  # cortex, bright sinus, dark pelvis
        a = 0.055 * hc * px
        r = _ell(u, v, a, 0.6 * a)
        tissue[r < 1.08], tissue[r < 1] = 0.55, 0.25
        tissue[_ell(u, v, 0.55 * a, 0.25 * a) < 1] = 0.7
        tissue[_ell(u, v, 0.2 * a, 0.12 * a) < 1] = 0.05


def render_scan(rng, kind, subplane, hc, mm_per_px, width, height):
    """One B-mode-like scan (H, W) uint8: anatomy to scale in a sector on black, with speckle.
    Drawn at ~320 px wide (speckle cells of 1-3 pixels), then upsampled."""
    grain = max(1, round(width / 320))
    w, h = -(-width // grain), -(-height // grain)
    apex = (0.02 if kind == "cervix" else -0.08)  # transvaginal: a wide fan from the top
    x, y, depth, _ = _grid(w, h, apex * h)
    coarse = rng.uniform(0.25, 0.5, (4, 6)).astype(np.float32)  # slowly varying tissue
    tissue = np.array(Image.fromarray(coarse, "F").resize((w, h), Image.BICUBIC), dtype=np.float32)
    draw_anatomy(tissue, x, y, rng, kind, subplane, hc, 1 / (mm_per_px * grain))
    tissue = Image.fromarray(np.clip(tissue * 255, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)
    speckle = rng.rayleigh(math.sqrt(2 / math.pi), (h, w)).astype(np.float32)  # Rayleigh amplitude, mean 1
    r0, r1 = 0.12 * h, rng.uniform(1.0, 1.08) * h
    gain = np.exp((depth - r0) * (-0.5 / (r1 - r0)))  # attenuation with depth
    image = np.clip(np.asarray(tissue, dtype=np.float32) * speckle * gain * (1.15 / 1.2 / 255), 0, 1)
    image = Image.fromarray(GAMMA[(image * 255).astype(np.uint8)]).resize((width, height), Image.BILINEAR)
    _, _, depth, angle = _grid(width, height, apex * height)
    half_angle = rng.uniform(0.9, 1.05) if kind == "cervix" else rng.uniform(0.55, 0.7)
    fov = (abs(angle) < half_angle) & (depth > r0 * grain) & (depth < r1 * grain)
    return np.asarray(image) * fov.astype(np.uint8)


GAMMA = (255 * (np.arange(256) / 255) ** 0.8).astype(np.uint8)  # mild log-compression look


def _encode(array, fmt):
    buffer = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    else:
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # speckle barely compresses
    return buffer.getvalue()


def _tar_add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # fixed metadata: same seed, same bytes
    tar.addfile(info, io.BytesIO(payload))


def write_shards(out, seed, n, width, height, shard_size, input_size):
    """Pretraining pairs: shards/train-NNNNNN.tar with <key>.jpg + <key>.txt, keys %08d."""
    os.makedirs(out, exist_ok=True)
    kinds, weights = [(k, s) for k, s, _ in TRAIN_MIX], [p for _, _, p in TRAIN_MIX]
    for first in range(0, n, shard_size):
        with tarfile.open(os.path.join(out, f"train-{first // shard_size:06d}.tar"), "w") as tar:
            for i in range(first, min(first + shard_size, n)):
                rng = np.random.default_rng([seed, 0, i])
                kind, subplane = kinds[rng.choice(len(kinds), p=weights)]
                days = int(rng.integers(14 * 7, 39 * 7))
                hc = hc_median(days) * math.exp(rng.normal(0, 0.03))
                grid = pick_spacing(rng, kind, hc)
                with_ga = rng.random() < (0.7 if kind == "brain" else 0.3)
                caption = make_caption(rng, kind, subplane, days if with_ga else -1,
                                       grid * 64 / input_size if with_ga and kind == "brain" else -1)
                image = render_scan(rng, kind, subplane, hc, grid * 64 / max(width, height), width, height)
                _tar_add(tar, f"{i:08d}.jpg", _encode(image, "jpg"))
                _tar_add(tar, f"{i:08d}.txt", caption.encode())


def write_planes(out, seed, n, width, height):
    """Planes-DB format: FETAL_PLANES_DB_data.csv (';') + Images/<Image_name>.png, ~5 images a
    patient, patients with Patient_num % 5 == 0 in the test split (Train 0)."""
    os.makedirs(os.path.join(out, "Images"), exist_ok=True)
    lines, patients = [";".join(PLANES_COLUMNS)], math.ceil(n / 5)
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        kind, subplane = PLANES_PATTERN[i % len(PLANES_PATTERN)]
        hc = hc_median(int(rng.integers(18 * 7, 39 * 7))) * math.exp(rng.normal(0, 0.03))
        mm_per_px = pick_spacing(rng, kind, hc) * 64 / max(width, height)
        image = render_scan(rng, kind, subplane, hc, mm_per_px, width, height)
        patient = i % patients + 1  # a patient's images span several planes
        name = f"Patient{patient:05d}_Plane{i // patients + 1}_1_of_1"
        Image.fromarray(image).save(os.path.join(out, "Images", name + ".png"), compress_level=1)
        brain_plane = "Not A Brain" if subplane is None else subplane.capitalize() if subplane else "Other"
        operator = ("Op. 1", "Op. 2", "Op. 3", "Other")[patient % 4]
        machine = ("Voluson E6", "Voluson S10", "Aloka")[patient % 3]
        train = str(int(patient % 5 != 0))
        lines.append(";".join([name, str(patient), PLANES[kind], brain_plane, operator, machine, train]))
    with open(os.path.join(out, PLANES_CSV), "w", newline="") as f:
        f.write("\n".join(lines) + "\n")


def write_hc18(out, seed, n):
    """HC18 format: 800x540 trans-thalamic heads whose circumference follows q500 at their GA."""
    os.makedirs(os.path.join(out, "training_set"), exist_ok=True)
    lines = [",".join(HC18_COLUMNS)]
    for i in range(n):
        rng = np.random.default_rng([seed, 2, i])
        hc = hc_median(int(rng.integers(13 * 7, 40 * 7))) * math.exp(rng.normal(0, 0.03))  # some outside 100-342
        pixel_size = pick_spacing(rng, "brain", hc) * 64 / 800
        image = render_scan(rng, "brain", "trans-thalamic", hc, pixel_size, 800, 540)
        Image.fromarray(image).save(os.path.join(out, "training_set", f"{i:03d}_HC.png"), compress_level=1)
        lines.append(f"{i:03d}_HC.png,{pixel_size:.10f},{hc:.2f}")
    with open(os.path.join(out, HC18_CSV), "w", newline="") as f:
        f.write("\n".join(lines) + "\n")


def generate(out="data/demo", seed=0, n_train=3000, n_planes=300, n_hc18=150, width=256, height=192,
             shard_size=500, caption_input_size=48):
    """Write the synthetic benchmark: out/shards, out/planes, out/hc18 (deterministic in seed)."""
    start = time.time()
    write_shards(os.path.join(out, "shards"), seed, n_train, width, height, shard_size, caption_input_size)
    write_planes(os.path.join(out, "planes"), seed, n_planes, width, height)
    write_hc18(os.path.join(out, "hc18"), seed, n_hc18)
    print(f"wrote {out}: {n_train} pairs in {math.ceil(n_train / shard_size)} shards, {n_planes} Planes DB "
          f"images, {n_hc18} HC18 images in {time.time() - start:.1f} s")


def benchmark(out, seed, n=64, batches=8, batch_size=32):
    """Coupled two-view samples/s of one loader worker (num_workers=0) from 800x540 PNG shards."""
    os.makedirs(out, exist_ok=True)
    url = os.path.join(out, "bench-000000.tar")
    with tarfile.open(url, "w") as tar:
        for i in range(n):
            rng = np.random.default_rng([seed, 3, i])
            scan = render_scan(rng, "brain", "trans-thalamic", 250, 0.2, 800, 540)
            _tar_add(tar, f"{i:08d}.png", _encode(scan, "png"))
            _tar_add(tar, f"{i:08d}.txt", make_caption(rng, "brain", "trans-thalamic").encode())
    student = (256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # MobileFetalCLIP: ImageNet statistics
    teacher = (224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # FetalCLIP: CLIP's
    torch.set_num_threads(1)  # as in a DataLoader worker
    loader = train_loader(url, student, teacher, batch_size, samples_per_epoch=batch_size * (batches + 1),
                          shuffle_buffer=n)
    batches_seen = iter(loader)
    next(batches_seen)  # warm-up: tokenizer build, first decode
    start = time.time()
    count = sum(len(b[0]) for b in batches_seen)
    rate = count / (time.time() - start)
    print(f"bench: {rate:.1f} coupled two-view samples/s (one worker, 800x540 grayscale PNG -> 256 + 224 px)")
    return rate


def parse_value(key, text, default):
    """--key=text as the type of the default; an int is accepted where the default is a float."""
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        raise SystemExit(f"--{key}={text}: expected {kind.__name__} (default {default!r})") from None


def apply_overrides(config, arguments, presets=None, positional=""):
    """The scripts' nanoGPT-style command line: --key=value overrides a dict of defaults in place,
    the value taking the default's type (--beta0=2 where the default is 2.0); a bare --flag sets a
    bool; --preset=NAME applies presets[NAME] first, so explicit flags win over it; one bare argument
    sets config[positional]. Every override is printed; errors name the key and the expected type,
    or the valid keys."""
    presets = presets or {}
    chosen = [a for a in arguments if a.startswith("--preset=")] if presets else []
    for argument in chosen:
        name = argument.split("=", 1)[1]
        if name not in presets:
            raise SystemExit(f"--preset={name}: unknown preset; expected one of {sorted(presets)}")
        for key, value in presets[name].items():
            print(f"overriding: {key} = {value!r} (preset {name})")
            config[key] = value
    bare = [a for a in arguments if not a.startswith("--")]
    if len(bare) > (1 if positional else 0):
        raise SystemExit(f"unexpected arguments {bare}; " + (f"expected one {positional}" if positional else
                                                              "expected --key=value"))
    for argument in arguments:
        if argument in chosen:
            continue
        key, has_value, text = argument[2:].partition("=") if argument.startswith("--") else (positional, "=", argument)
        if key not in config:
            raise SystemExit(f"unknown config key {key!r}; valid keys: {', '.join(sorted(config))}")
        if not has_value and not isinstance(config[key], bool):
            raise SystemExit(f"--{key} needs a value: --{key}=<{type(config[key]).__name__}>")
        config[key] = parse_value(key, text if has_value else "true", config[key])
        print(f"overriding: {key} = {config[key]!r}")
    return config


def main(arguments):
    if arguments[:1] == ["cache"]:
        config = apply_overrides(dict(teacher_ckpt="", teacher="", train_data="", out="", augs=4, seed=0,
                                      batch_size=32, num_workers=2, device="", dtype=""), arguments[1:])
        if not (config["teacher_ckpt"] and config["train_data"] and config["out"]) or config["augs"] < 1:
            raise SystemExit("usage: python data.py cache --teacher_ckpt=FILE --train_data=SHARDS --out=DIR "
                             "[--augs=4 --seed=0 --teacher=NAME --batch_size=32 --num_workers=2 --device= --dtype=]")
        try:
            return write_cache(**config)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"data.py cache: {error}") from None
    config = apply_overrides(dict(
        out="data/demo",  # output folder
        seed=0,  # everything written is a function of this seed
        n_train=3000,  # pretraining image-caption pairs
        n_planes=300,  # Planes DB images
        n_hc18=150,  # HC18 images (800x540)
        width=256, height=192,  # shard and Planes DB image size
        shard_size=500,  # pairs per shard
        caption_input_size=48,  # model input size the captions' pixel spacings refer to (demo models: 48)
        bench=False,  # measure the loader instead: writes out/bench-000000.tar
    ), arguments)
    if config.pop("bench"):
        return benchmark(config["out"], config["seed"])
    return generate(**config)


if __name__ == "__main__":
    main(sys.argv[1:])
