"""The teacher-embedding cache: the frozen teacher's outputs computed once, replayed by every run of a sweep
(MobileCLIP's reinforced datasets, local and simple). Not in the paper or the release.

    python cache.py --teacher_ckpt=FetalCLIP_weights.pt --train_data='shards/{000000..000246}.tar' \\
        --augs=20 --out_dir=teacher_cache      # resumable: run it again after an interruption
    python train.py --preset=paper --teacher_cache=teacher_cache ...

For every pair the cache holds the teacher's L2-normalised text embedding of the caption and its image embeddings
for `augs` coupled augmentations (data.augment_params(seed, a, key), a < augs), fp16, in one WebDataset shard per
training shard (same file name, same keys) with the digest of the training sample it was computed from, plus
manifest.json (teacher, checkpoint sha256, seed, augs, image size, context length, logit scale, and per finished
shard its sample count and fingerprint). data.py holds the reading side and refuses a cache whose shards changed.

Amortisation for the paper's sweep (246,349 pairs, 20 epochs; MACs per sample by torch's FlopCounterMode:
FetalCLIP image 81.0 G + text 10.2 G, student forward + backward about 3 x (2.39 + 2.94) = 16 G): a live teacher
costs 449 PMACs per run; `--augs=20` costs 402 PMACs once and reproduces the live runs (twelve runs: 1,350 instead
of 6,336 PMACs, 4.7x less); `--augs=4` costs 82 PMACs, but each pair then sees 4 augmentation draws over 20 epochs
instead of 20, a departure from the paper's recipe. Storage: about 34 KB per pair with --augs=20, 10 KB with 4.
"""

import contextlib
import hashlib
import io
import json
import os
import sys
import tarfile

import numpy as np
import torch
import tqdm
import webdataset as wds

import configurator
import data
import model as model_lib

# ------------------------------------------------------------------ settings: --key=value
teacher_ckpt = ""  # the teacher's weights (required)
teacher = ""  # model.py name; '' = the name the checkpoint stores
train_data = ""  # WebDataset shards: brace pattern, list or folder (required)
out_dir = ""  # the cache folder (required)
augs = 4  # coupled augmentations cached per pair; epoch e replays augmentation e % augs
seed = 0  # augmentation seed (train.py --augment_seed must match it)
batch_size = 32  # pairs per teacher batch (x augs images)
num_workers = 2  # loader processes
device = ""  # '' = cuda, else mps, else cpu
dtype = ""  # '' = bfloat16 on cuda, float32 elsewhere
DEFAULTS = configurator.settings(globals())

IDENTITY = ("teacher", "teacher_sha256", "seed", "augs", "image_size", "context_length")  # what a resume must match


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_fingerprint(url):
    """A cheap identity of a shard's content: its size and every member's name and size, read from the tar
    headers alone (milliseconds for a shard of a thousand pairs). Regenerated shards change it; replaced bytes
    of the same sizes are caught per sample by sample_digest."""
    digest = hashlib.sha256(str(os.path.getsize(url)).encode())
    with tarfile.open(url) as tar:
        for member in tar:
            digest.update(f"{member.name}\0{member.size}\0".encode())
    return digest.hexdigest()


def check_cache(folder, urls, *, teacher, teacher_ckpt, seed, image_size, context_length):
    """The manifest of a complete cache that matches the run and the shards' current content, else ValueError
    saying what differs. teacher_ckpt '' skips the checkpoint hash (the run then takes the cache's teacher)."""
    manifest = data.read_cache_manifest(folder)
    asked = dict(teacher=teacher, seed=seed, image_size=image_size, context_length=context_length)
    if teacher_ckpt:
        asked["teacher_sha256"] = file_sha256(teacher_ckpt)
    hints = {"seed": " (train.py --augment_seed sets the augmentation seed alone)"}
    hints["teacher_sha256"] = f" (it was made from {manifest['teacher_ckpt']}, this run gives {teacher_ckpt})"
    for key, value in asked.items():
        if manifest[key] != value:
            made = f"teacher cache {folder} was made with {key} {manifest[key]!r}"
            raise ValueError(f"{made}; this run asks for {value!r}{hints.get(key, '')}")
    redo = "; run `python cache.py ...` again to finish it"
    for url in data.expand_urls(urls):
        entry = manifest["shards"].get(data.cache_shard_name(url))
        if not isinstance(entry, dict):
            raise ValueError(f"teacher cache {folder} has no finished cache shard for {url}{redo}")
        if entry["fingerprint"] != shard_fingerprint(url):
            raise ValueError(f"teacher cache {folder} was made from another {url} (its members changed){redo}")
    return manifest


class TeacherViews(torch.utils.data.Dataset):
    """The raw samples of one shard -> (key, source digest, caption, (augs, 3, S, S) teacher views or None)."""

    def __init__(self, samples, view, augs, seed):
        self.samples, self.view, self.augs, self.seed = samples, view, augs, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        sample = self.samples[i]
        key, decoded = sample["__key__"], data.decode_sample(sample)
        if not isinstance(decoded, tuple):  # unreadable: training skips it too
            return key, "", "", None
        square = data.pad_to_square(decoded[0])
        draws = [data.augment_params(self.seed, a, key) for a in range(self.augs)]
        views = torch.stack([data.coupled_views(square, params, [self.view])[0] for params in draws])
        return key, data.sample_digest(sample), decoded[1], views


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@torch.no_grad()
def embed(teacher, images, captions, device, autocast):
    """-> (B * augs, D) image and (B, D) text embeddings, L2-normalised, fp16 on the CPU."""
    tokens = data.tokenize(captions, teacher.context_length).to(device)
    with autocast:
        image_features = teacher.encode_image(images.to(device)).float()
        text_features = teacher.encode_text(tokens).float()
    normalise = lambda x: torch.nn.functional.normalize(x, dim=-1).half().cpu().numpy()
    return normalise(image_features), normalise(text_features)


def cache_one_shard(teacher, url, path, settings, device, autocast, bar):
    """Teacher embeddings of one shard -> a WebDataset shard of <key>.image.npy (augs, D), <key>.text.npy (D,) and
    <key>.source.txt (the training sample's digest), written atomically. Returns the number of samples cached.
    Batches restart with each shard, so a resumed run computes exactly the same numbers."""
    samples = list(wds.tarfile_samples([{"url": url}]))
    view = (teacher.image_size, teacher.image_mean, teacher.image_std)
    views = TeacherViews(samples, view, settings["augs"], settings["seed"])
    loader = torch.utils.data.DataLoader(
        views, batch_size=settings["batch_size"], num_workers=settings["num_workers"], collate_fn=list
    )
    written = 0
    with configurator.atomic_path(path) as tmp, wds.TarWriter(tmp, encoder=False, mtime=0) as sink:  # same bytes
        for batch in loader:
            bar.update(len(batch))
            batch = [b for b in batch if b[3] is not None]
            if not batch:
                continue
            images = torch.cat([b[3] for b in batch])  # (B * augs, 3, S, S)
            image, text = embed(teacher, images, [b[2] for b in batch], device, autocast)
            image = image.reshape(len(batch), settings["augs"], -1)
            for i, (key, digest, _, _) in enumerate(batch):
                sink.write(
                    {
                        "__key__": key,
                        "image.npy": npy_bytes(image[i]),
                        "text.npy": npy_bytes(text[i]),
                        "source.txt": digest.encode(),
                    }
                )
            written += len(batch)
    return written


def write_json(path, content):
    configurator.write_atomic(path, json.dumps(content, indent=1))


def start_manifest(net, settings, names):
    """The manifest of this run, merged with the finished shards of an earlier run into the same folder."""
    manifest = dict(
        teacher=net.name,
        teacher_ckpt=os.path.abspath(settings["teacher_ckpt"]),
        teacher_sha256=file_sha256(settings["teacher_ckpt"]),
        seed=settings["seed"],
        augs=settings["augs"],
        image_size=net.image_size,
        context_length=net.context_length,
        embed_dim=net.embed_dim,
        logit_scale=net.logit_scale.exp().item(),
        shards={n: None for n in names},
    )
    path = os.path.join(settings["out_dir"], data.CACHE_MANIFEST)
    if os.path.exists(path):  # resuming: the same teacher and draws, or nothing
        previous = data.read_cache_manifest(settings["out_dir"])
        for key in IDENTITY:
            if previous.get(key) != manifest[key]:
                raise ValueError(
                    f"{path} holds a cache with {key} {previous.get(key)!r}, not {manifest[key]!r}: "
                    "use another --out_dir"
                )
        finished = {n: entry for n, entry in previous["shards"].items() if isinstance(entry, dict)}
        manifest["shards"].update(finished)
    return manifest


def write_cache(
    teacher_ckpt, train_data, out_dir, *, augs=4, teacher="", seed=0, batch_size=32, num_workers=2, device="", dtype=""
):
    """Write (or finish) a cache folder -> its manifest. Finished shards whose training shard is unchanged are
    kept, an interrupted or stale one is redone; a folder holding another teacher's cache is refused."""
    settings = dict(locals())
    device = configurator.pick_device(device)
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    net = model_lib.load_model(teacher_ckpt, teacher).to(device).eval()
    autocast = contextlib.nullcontext()
    if dtype != "float32":
        autocast = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype))
    urls = data.expand_urls(train_data)
    names = [data.cache_shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"{train_data}: training shards share file names; give each shard a distinct name")
    manifest = start_manifest(net, settings, names)
    os.makedirs(out_dir, exist_ok=True)
    fingerprints = {n: shard_fingerprint(u) for u, n in zip(urls, names)}
    todo = [
        (u, n)
        for u, n in zip(urls, names)
        if manifest["shards"][n] is None
        or manifest["shards"][n]["fingerprint"] != fingerprints[n]
        or not os.path.exists(os.path.join(out_dir, n))
    ]
    print(
        f"caching {net.name} ({teacher_ckpt}) for {len(urls)} shards x {augs} augmentations into {out_dir}; "
        f"{len(urls) - len(todo)} already done"
    )
    local = all("://" not in u and not u.startswith("pipe:") for u, _ in todo)
    with tqdm.tqdm(total=data.count_samples([u for u, _ in todo]) if todo and local else None, unit="sample") as bar:
        for url, name in todo:
            count = cache_one_shard(net, url, os.path.join(out_dir, name), settings, device, autocast, bar)
            manifest["shards"][name] = {"samples": count, "fingerprint": fingerprints[name]}
            write_json(os.path.join(out_dir, data.CACHE_MANIFEST), manifest)  # a listed shard is a finished one
    write_json(os.path.join(out_dir, data.CACHE_MANIFEST), manifest)
    total = sum(entry["samples"] for entry in manifest["shards"].values())
    print(f"wrote {out_dir}: {total} samples, {manifest['embed_dim']}-d fp16 embeddings")
    return manifest


if __name__ == "__main__":
    config = configurator.configure(dict(DEFAULTS), sys.argv[1:])
    if not (config["teacher_ckpt"] and config["train_data"] and config["out_dir"]) or config["augs"] < 1:
        raise SystemExit("usage: python cache.py --teacher_ckpt=FILE --train_data=SHARDS --out_dir=DIR [--augs=4 ...]")
    try:
        write_cache(**config)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"cache.py: {error}") from None
