"""The teacher-embedding cache: the frozen teacher's outputs computed once, replayed by every run of a sweep
(MobileCLIP's reinforced datasets, local and simple). Not in the paper or the release.

    python -m tools.cache --teacher_ckpt=FetalCLIP_weights.pt --train_data='shards/{000000..000246}.tar' \\
        --augs=20 --out_dir=teacher_cache      # resumable: run it again after an interruption
    torchrun --standalone --nproc_per_node=8 -m tools.cache --teacher_ckpt=...   # the same files, written by 8 GPUs
    python train.py --preset=paper --teacher_cache=teacher_cache ...

For every pair the cache holds the teacher's L2-normalised text embedding of the caption and its image
embeddings for `augs` coupled augmentations (data.augment_params(seed, a, key), a < augs), fp16, in one
WebDataset shard per training shard (same file name, same keys) with the digest of the training sample it
was computed from; beside each its entry (NAME.json: sample count, the training shard's fingerprint, the
cache shard's size and the sha256 of its start); and manifest.json: teacher, checkpoint sha256, seed, augs,
what the views depend on (data.AUGMENT with its version, the teacher's input size, mean and std), context
length, logit scale and the finished shards' entries. This file writes; data.py holds the reading side:
data.check_cache refuses a cache that differs from the run, whose training shards changed, or whose cache
shards are missing, truncated or swapped, and the loader refuses an entry whose sample changed.

Under torchrun (one node or several: the folder must be one that every node sees) the shards still to do are
dealt to the processes, which write their cache shards and entries; rank 0 writes the manifest once all are
done, the same bytes as one process's. A killed process loses only the shard it was writing: a rerun, with
any number of processes, redoes what is missing.

Amortisation for the paper's sweep (246,349 pairs, 20 epochs; MACs per sample by torch's FlopCounterMode:
FetalCLIP image 81.0 G + text 10.2 G, student forward + backward about 3 x (2.39 + 2.94) = 16 G): a live
teacher costs 449 PMACs per run; `--augs=20` costs 402 PMACs once and reproduces the live runs (twelve runs:
1,350 instead of 6,336 PMACs, 4.7x less); `--augs=4` costs 82 PMACs, but each pair then sees 4 augmentation
draws over 20 epochs instead of 20, a departure from the paper's recipe. Storage: about 34 KB per pair with
--augs=20, 10 KB with 4. """

import contextlib
import io
import json
import os
import re
import sys
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import tqdm
import webdataset as wds

import configurator
import data
import model as model_lib

# ------------------------------------------------------------------ settings: --key=value, read by main()
DEFAULTS = {
    "teacher_ckpt": "",  # the teacher's weights (required)
    "teacher": "",  # model.py name; '' = the name the checkpoint stores
    "train_data": "",  # WebDataset shards: brace pattern, list or folder (required)
    "out_dir": "",  # the cache folder (required)
    "augs": 4,  # coupled augmentations cached per pair; epoch e replays augmentation e % augs
    "seed": 0,  # augmentation seed (train.py --augment_seed must match it)
    "batch_size": 32,  # pairs per teacher batch (x augs images)
    "num_workers": 2,  # loader processes
    "device": "",  # '' = cuda, else mps, else cpu
    "dtype": "",  # '' = bfloat16 on cuda, float32 elsewhere
}
# The manifest's keys, its entries and every check of a cache before a run reads it: data.py, the reading
# side.


class TeacherViews(torch.utils.data.Dataset):
    """The raw samples of one shard -> (key, source digest, caption, (augs, 3, S, S) teacher views or None)."""

    def __init__(self, samples, view, augs, seed):
        self.samples, self.view, self.augs, self.seed = samples, view, augs, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        sample = self.samples[i]
        key = sample["__key__"]
        image, caption, problem = data.decode_sample(sample)
        if problem:  # unreadable or captionless: training skips it too
            return key, "", "", None
        square = data.pad_to_square(image)
        draws = [data.augment_params(self.seed, a, key) for a in range(self.augs)]
        views = torch.stack(
            [data.coupled_views(square, params, [self.view])[0] for params in draws]
        )
        return key, data.sample_digest(sample), caption, views


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
    return stored(image_features), stored(text_features)


def stored(features):
    """(N, D) -> L2-normalised fp16 numpy rows on the CPU: what the cache holds."""
    return torch.nn.functional.normalize(features, dim=-1).half().cpu().numpy()


def cache_one_shard(teacher, url, path, settings, device, autocast, bar):
    """Teacher embeddings of one shard -> a WebDataset shard of <key>.image.npy (augs, D), <key>.text.npy
    (D,) and <key>.source.txt (the training sample's digest), written atomically. Returns the number of
    samples cached. Batches restart with each shard, so a resumed run computes exactly the same numbers."""
    samples = list(wds.tarfile_samples([{"url": url}]))
    view = (teacher.image_size, teacher.image_mean, teacher.image_std)
    views = TeacherViews(samples, view, settings["augs"], settings["seed"])
    loader = torch.utils.data.DataLoader(
        views,
        batch_size=settings["batch_size"],
        num_workers=settings["num_workers"],
        collate_fn=list,
    )
    written = 0
    with (
        configurator.atomic_path(path) as tmp,
        wds.TarWriter(tmp, encoder=False, mtime=0) as sink,
    ):  # same bytes
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


def entry_path(out_dir, name):
    """Beside each finished cache shard, its manifest entry: how every rank hands its shards to rank 0, and
    what a rerun trusts. Written after the cache shard, removed before it is redone."""
    return os.path.join(out_dir, f"{name}.json")


def read_entry(out_dir, name):
    """A cache shard's entry file, or None (missing, unreadable or incomplete: the shard is redone)."""
    try:
        with open(entry_path(out_dir, name)) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    return (
        entry if isinstance(entry, dict) and all(key in entry for key in data.ENTRY_KEYS) else None
    )


def remove_leftovers(out_dir, names):
    """What a killed process left half-written: configurator.atomic_path's NAME.PID.tmp files of this cache."""
    ours = {*names, *(os.path.basename(entry_path(out_dir, n)) for n in names), data.CACHE_MANIFEST}
    for file in os.listdir(out_dir):
        match = re.fullmatch(r"(.+)\.\d+\.tmp", file)
        if match and match.group(1) in ours:
            os.remove(os.path.join(out_dir, file))


def start_manifest(net, settings, names):
    """This run's manifest with no shard finished -> (manifest, the folder's manifest or None: only if the
    folder holds this cache already are its entry files trusted). A folder holding another cache is
    refused."""
    manifest = dict(
        teacher=net.name,
        teacher_ckpt=os.path.abspath(settings["teacher_ckpt"]),
        teacher_sha256=configurator.file_sha256(settings["teacher_ckpt"]),
        seed=settings["seed"],
        augs=settings["augs"],
        **data.view_recipe((net.image_size, net.image_mean, net.image_std)),
        context_length=net.context_length,
        embed_dim=net.embed_dim,
        logit_scale=net.logit_scale.exp().item(),
        shards={n: None for n in names},
    )
    path = os.path.join(settings["out_dir"], data.CACHE_MANIFEST)
    if not os.path.exists(path):
        return manifest, None
    previous = data.read_cache_manifest(settings["out_dir"])
    for key in data.IDENTITY:  # resuming: the same teacher and draws, or nothing
        if previous[key] != manifest[key]:
            raise ValueError(
                f"{path} holds a cache with {key} {previous[key]!r}, not {manifest[key]!r}: use another --out_dir"
            )
    return manifest, previous


def plan(net, settings, urls, names):
    """Rank 0, before any rank writes: the folder checked, what killed processes left half-written removed,
    the manifest of the shards already finished written -> (manifest, [(url, name, fingerprint)] still to
    do)."""
    out_dir = settings["out_dir"]
    manifest, previous = start_manifest(net, settings, names)
    os.makedirs(out_dir, exist_ok=True)
    remove_leftovers(out_dir, names)
    todo = []
    for url, name in zip(urls, names):
        fingerprint, entry = (
            data.shard_fingerprint(url),
            read_entry(out_dir, name) if previous else None,
        )
        if data.shard_problem(out_dir, url, entry, fingerprint):
            todo.append((url, name, fingerprint))
        else:
            manifest["shards"][name] = entry
    for name, entry in previous["shards"].items() if previous else ():
        # the finished shards of earlier runs with other --train_data stay listed
        if entry is not None:
            manifest["shards"].setdefault(name, entry)
    # a listed shard is a finished one
    write_json(os.path.join(out_dir, data.CACHE_MANIFEST), manifest)
    return manifest, todo


def cache_shards(net, share, settings, device, autocast, rank):
    """One rank's share of the shards: each cache shard, then its entry file. Rank 0 shows the progress bar."""
    local = all("://" not in url and not url.startswith("pipe:") for url, _, _ in share)
    total = (
        data.count_samples([url for url, _, _ in share]) if share and local and rank == 0 else None
    )
    with tqdm.tqdm(total=total, unit="sample", disable=rank > 0) as bar:
        for url, name, fingerprint in share:
            path, entry_file = (
                os.path.join(settings["out_dir"], name),
                entry_path(settings["out_dir"], name),
            )
            if os.path.exists(entry_file):
                # first: an entry file always describes a finished cache shard
                os.remove(entry_file)
            count = cache_one_shard(net, url, path, settings, device, autocast, bar)
            entry = dict(
                zip(
                    data.ENTRY_KEYS,
                    (count, fingerprint, os.path.getsize(path), data.head_sha256(path)),
                )
            )
            write_json(entry_file, entry)
            tqdm.tqdm.write(f"rank {rank}: cached {name} ({count} samples)")
            sys.stdout.flush()  # ranks share the terminal (or a pipe): one whole line at a time


def finish_manifest(manifest, out_dir, todo):
    """Rank 0, once every rank is done: the entries of the shards just cached, into the manifest."""
    for url, name, fingerprint in todo:
        entry = read_entry(out_dir, name)
        if data.shard_problem(out_dir, url, entry, fingerprint):
            unseen = f"{entry_path(out_dir, name)} is missing or wrong once every rank has finished"
            raise ValueError(f"{unseen}: --out_dir must be one folder that every node sees")
        manifest["shards"][name] = entry
    write_json(os.path.join(out_dir, data.CACHE_MANIFEST), manifest)
    total = sum(entry["samples"] for entry in manifest["shards"].values())
    print(f"wrote {out_dir}: {total} samples, {manifest['embed_dim']}-d fp16 embeddings")


def load_teacher(teacher_ckpt, teacher, device, dtype):
    """-> (the teacher on `device` in eval mode, its autocast: bfloat16 on cuda, float32 elsewhere, unless dtype)"""
    net = model_lib.load_model(teacher_ckpt, teacher).to(device).eval()
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    autocast = contextlib.nullcontext()
    if dtype != "float32":
        autocast = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype))
    return net, autocast


def write_cache(
    teacher_ckpt,
    train_data,
    out_dir,
    *,
    augs=4,
    teacher="",
    seed=0,
    batch_size=32,
    num_workers=2,
    device="",
    dtype="",
):
    """Write (or finish) a cache folder -> its manifest. Under torch.distributed (cache.py under torchrun)
    the shards to do are dealt to the ranks in turn; rank 0 writes the manifest once all are done, the same
    bytes as one process's. Finished shards whose training shard is unchanged are kept, unfinished or stale
    ones redone (by any number of processes); a folder holding another teacher's cache is refused."""
    settings = dict(locals())
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = configurator.pick_device(device)
    net, autocast = load_teacher(teacher_ckpt, teacher, device, dtype)
    urls = data.expand_urls(train_data)
    names = [data.cache_shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError(
            f"{train_data}: training shards share file names; give each shard a distinct name"
        )
    shared = [plan(net, settings, urls, names) if rank == 0 else None]
    if world_size > 1:
        # one plan for every rank, made before any of them writes
        dist.broadcast_object_list(shared)
    manifest, todo = shared[0]
    manifest_path = os.path.join(out_dir, data.CACHE_MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ValueError(
            f"rank {rank} does not see {manifest_path}: --out_dir must be one folder that every node sees"
        )
    if rank == 0:
        done = f"{len(urls) - len(todo)} done, {len(todo)} to do by {world_size} processes"
        print(
            f"caching {net.name} ({teacher_ckpt}) for {len(urls)} shards x {augs} augmentations into {out_dir}: {done}"
        )
    cache_shards(net, todo[rank::world_size], settings, device, autocast, rank)  # dealt in turn
    if world_size > 1:
        dist.barrier()  # every rank's entry files are written
    if rank == 0:
        finish_manifest(manifest, out_dir, todo)
    if world_size > 1:
        dist.barrier()  # the manifest is written
    return data.read_cache_manifest(out_dir)


def start_ranks(device):
    """Under torchrun: join the process group, NCCL on GPUs and gloo on the CPU as in train.py -> this
    process's device (cuda:LOCAL_RANK on GPUs)."""
    device = configurator.pick_device(device)
    if int(os.environ.get("RANK", -1)) == -1:
        return device
    # the last rank may finish its last shard long after the others, who wait at a barrier
    dist.init_process_group(
        backend="nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=6)
    )
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return device


def main(arguments):
    config = configurator.configure(dict(DEFAULTS), arguments)
    if (
        not (config["teacher_ckpt"] and config["train_data"] and config["out_dir"])
        or config["augs"] < 1
    ):
        raise SystemExit(
            "usage: python -m tools.cache --teacher_ckpt=FILE --train_data=SHARDS --out_dir=DIR [--augs=4 ...]"
        )
    config["device"] = start_ranks(config["device"])
    with configurator.user_errors("cache.py"):
        write_cache(**config)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
