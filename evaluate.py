"""Zero-shot evaluation of a model: the FetalCLIP protocol (FetalCLIP, Maani et al. 2025; paper Sec. 4; its
data sets and metrics: protocol.py) and your own zero-shot tasks. predict.py applies a model to your scans;
analysis.py holds the paper's further analyses (Tables 4-5, Figures 2-3).

    python evaluate.py out/best.pt                                   # table + out/best_zeroshot.json
    python evaluate.py mobile_fetal_clip_weights.pt --planes_dir=FETAL_PLANES_DB --hc18_dir=HC18
    python evaluate.py out/best.pt --eval_split=report               # held-out patients only (see README)
    python evaluate.py out/best.pt --task=my_task/                   # my_task/<class>/ scans + my_task/prompts.json
                                                                     # -> out/best_task_my_task.json

JSON layout: five_planes.{f1, f1_ci_low, f1_ci_high, accuracy, top2, top3, pooled_*, n, per_class.<name>.{f1,
recall, n}}, brain_subplanes.{same}, hc18.{validity, valid, n, n_images, excluded, ci_low, ci_high, spearman,
text_encodings}, f1_all, avg (each where its data sets are given), tasks.<name>.{same as five_planes, files,
skipped, ignored}, selection.{value, rule} (what train.py keeps best.pt by), split.

On a CPU most of the time goes to the 875 GA prompts per distinct pixel spacing; on the demo the real-size
student takes minutes on 2 cores, on a GPU seconds (progress bars show both stages)."""

import dataclasses
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import configurator
import data
from model import load_model
from protocol import (
    GA_DAYS,
    HC_MAX,
    HC_MIN,
    PROMPTS,
    SCALE,
    SPLITS,
    classification_metrics,
    decode_all,
    ga_validity,
    hc18_rows,
    planes_rows,
    require_tasks,
)

# ------------------------------------------------------------------ settings: --key=value, read by main()
DEFAULTS = {
    "ckpt": "",  # the checkpoint to evaluate: the one positional argument
    "model": "",  # model.py name; '' = the name the checkpoint stores (or the one its keys show)
    "planes_dir": "",  # Planes DB folder; '' = the demo's (data/demo/planes) unless --task is given
    "hc18_dir": "",  # HC18 folder; '' = the demo's (data/demo/hc18) unless --task is given
    "task": "",  # your labelled scans: task folders (one sub-folder per class + prompts.json), comma-separated
    "prompts": "",  # the tasks' prompts JSON {class: [prompt, ...]}; '' = each task folder's prompts.json
    "eval_split": "all",  # 'all' = the published protocol; 'select' / 'report' = patient-disjoint 20 / 80 parts
    "out_dir": "",  # where the JSON goes; '' = beside the checkpoint
    "device": "",  # '' = cuda, else mps, else cpu
    "batch_size": 64,
    "num_workers": 0,  # image-loading processes
    "cache_text": True,  # GA prompts encoded once per distinct pixel spacing; False = per image, as the release
    # where the checkpoint's prompt features are kept between runs; '' = cache_folder()
    "cache_dir": "",
}


# ------------------------------------------------------------------ encoding


class Images(torch.utils.data.Dataset):
    """Image files -> (normalised tensor, original max(W, H)); an unreadable file is an error naming it."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = Image.open(self.paths[i])
            image.load()
            image = data.to_8bit(image)[0]  # 'L' or 'RGB', 16-bit scaled, not clipped
        except Exception as error:  # PIL raises several types for unreadable files
            raise ValueError(f"{self.paths[i]}: not a readable image ({error})") from None
        return self.transform(image), max(image.size)  # original size, before pad-to-square


@torch.no_grad()
def encode_images(model, paths, batch_size=64, device="cpu", num_workers=0):
    """-> (N, D) L2-normalised float32 CPU features and the (N,) original max(W, H) of each image."""
    transform = data.eval_transform(model.image_size, model.image_mean, model.image_std)
    dataset = Images(list(paths), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    features, sides = [], []
    for images, max_sides in tqdm(loader, desc="images", unit="batch", leave=False):
        features.append(F.normalize(model.encode_image(images.to(device)).float(), dim=-1).cpu())
        sides += max_sides.tolist()
    return (torch.cat(features) if features else torch.zeros(0, model.embed_dim)), sides


# prompts per text forward pass (the full context: the student's text tower has no mask)
PROMPT_BATCH = 64


@torch.no_grad()
def encode_prompts(model, prompts, device="cpu", desc=""):
    """-> (P, D) L2-normalised float32 CPU features, PROMPT_BATCH prompts per forward pass; a progress bar
    named `desc` when given."""
    tokens = data.tokenize(list(prompts), context_length=model.context_length)
    starts = range(0, len(tokens), PROMPT_BATCH)
    bar = tqdm(total=len(tokens), desc=desc, unit="prompt", leave=False, disable=not desc)
    features = []
    for start in starts:
        batch = tokens[start : start + PROMPT_BATCH].to(device)
        features.append(F.normalize(model.encode_text(batch).float(), dim=-1).cpu())
        bar.update(len(batch))
    bar.close()
    return torch.cat(features) if features else torch.zeros(0, model.embed_dim)


def cache_folder():
    """Where text features and ONNX encoders computed from a checkpoint are kept (XDG's convention):
    $MOBILEFETALCLIP_CACHE, else $XDG_CACHE_HOME/mobilefetalclip, else ~/.cache/mobilefetalclip."""
    if os.environ.get("MOBILEFETALCLIP_CACHE"):
        return Path(os.environ["MOBILEFETALCLIP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mobilefetalclip"


class PromptCache:
    """The text features of one checkpoint's model on disk, a file per list of prompts
    (cache_folder()/text/), keyed by the checkpoint's sha256, the model's name, the prompts and the GA
    spacing. The key is stored in the file and compared on every read, so a file written for another
    checkpoint or other prompts is never used."""

    def __init__(self, sha256, model_name, folder=""):
        self.sha256, self.model_name = sha256, model_name
        self.folder = Path(folder or cache_folder()) / "text"

    def key(self, prompts, spacing):
        return {
            "sha256": self.sha256,
            "model": self.model_name,
            "spacing": spacing,
            "prompts": prompts,
        }

    def stored(self, path, key):
        """The features stored at `path` under exactly `key`, else None (absent, unreadable or another key)."""
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # absent, truncated by a crash of another writer, or not a torch file
            return None
        return entry["features"] if isinstance(entry, dict) and entry.get("key") == key else None

    def features(self, model, prompts, device="cpu", spacing="", desc=""):
        """encode_prompts(model, prompts) from the cache, or encoded now and stored (atomically) -> (P, D)."""
        key = self.key(list(prompts), spacing)
        name = hashlib.sha256(json.dumps(key).encode()).hexdigest()
        path = self.folder / f"{name}.pt"
        features = self.stored(path, key)
        if features is None:
            features = encode_prompts(model, prompts, device, desc)
            self.store(path, key, features)
        return features

    def store(self, path, key, features):
        """Write an entry atomically; a cache that cannot be written (a full disk, no permission) is said in
        one line and the run goes on without it: the features are the same, only the next run pays for them
        again."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with configurator.atomic_path(path) as tmp:
                torch.save({"key": key, "features": features}, tmp)
        except (OSError, RuntimeError) as error:  # torch.save: a failed write is a RuntimeError
            reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
            print(f"cannot write the prompt cache in {self.folder} ({reason}): not cached")


def text_features(model, prompts, device="cpu", prompt_cache=None, spacing="", desc=""):
    """encode_prompts, through `prompt_cache` (a PromptCache) when given."""
    if prompt_cache is None:
        return encode_prompts(model, prompts, device, desc)
    return prompt_cache.features(model, prompts, device, spacing, desc)


def class_embeddings(model, prompts_by_class, device="cpu", prompt_cache=None):
    """Encode every prompt (in batches across classes), L2-normalise, average per class, re-normalise -> (C, D)."""
    counts = [len(texts) for texts in prompts_by_class.values()]
    every_prompt = [text for texts in prompts_by_class.values() for text in texts]
    desc = "class prompts" if len(every_prompt) > PROMPT_BATCH else ""
    features = text_features(model, every_prompt, device, prompt_cache, desc=desc)  # (P, D)
    means = [per_class.mean(0) for per_class in features.split(counts)]
    return F.normalize(torch.stack(means), dim=-1)  # (C, D)


def ga_prompts(spacing):
    """The 875 GA prompts at one spacing string: each template over weeks 14..38 x days 0..6, template-major."""
    return [
        template.replace("{weeks}", str(weeks))
        .replace("{day}", str(day))
        .replace("{pixel_spacing}", spacing)
        for template in PROMPTS["ga_templates"]
        for weeks in range(14, 39)
        for day in range(7)
    ]


def ga_text_features(model, spacing, device="cpu", prompt_cache=None):
    """(5, 175, D): the GA prompts' features at one spacing string (through `prompt_cache` when given)."""
    desc = f"GA prompts at {spacing} mm"
    features = text_features(model, ga_prompts(spacing), device, prompt_cache, spacing, desc)
    return features.view(len(PROMPTS["ga_templates"]), len(GA_DAYS), -1)


def ga_spacing(side, pixel_size, image_size):
    """The GA prompts' pixel spacing: mm per pixel of the model input, `%.2f` (the image is padded to a square
    of its longer side `side`, then resized to image_size)."""
    return f"{side / image_size * pixel_size:.2f}"


def ga_scores(
    model,
    image_features,
    spacings,
    cache_text=True,
    device="cpu",
    text_cache=None,
    prompt_cache=None,
):
    """image_features (n, D), spacings n '%.2f' strings -> ((n, 175) float32 scores, prompts encoded). The
    GA text features depend on the image only through its spacing string, so cache_text=True encodes them
    once per distinct string (kept in `text_cache` across calls when given, and on disk across runs in
    `prompt_cache`, a PromptCache, when given); cache_text=False re-encodes them per image (release)."""
    cache, encoded, scores = {} if text_cache is None else text_cache, 0, []
    for feature, spacing in zip(
        tqdm(image_features, desc="GA prompts", unit="image", leave=False), spacings
    ):
        if not cache_text or spacing not in cache:
            on_disk = prompt_cache if cache_text else None
            # (875, D)
            cache[spacing] = ga_text_features(model, spacing, device, on_disk).flatten(0, 1)
            encoded += cache[spacing].shape[0]
        text = cache[spacing] if cache_text else cache.pop(spacing)
        # 100 * img @ txt.T per image, averaged over the 5 templates: (1, 875) -> (175,)
        scores.append(
            (SCALE * feature[None] @ text.T).view(len(PROMPTS["ga_templates"]), -1).mean(0)
        )
    return torch.stack(scores).numpy() if scores else np.zeros(
        (0, len(GA_DAYS)), np.float32
    ), encoded


def check_sets(
    planes_dir="",
    hc18_dir="",
    task_folders="",
    prompts="",
    split="all",
    context_length=data.CONTEXT_LENGTH,
):
    """Every evaluation set that is given, checked before anything runs: each row, each image decoded (a
    truncated PNG has a good header), both Planes DB tasks present -> the user's tasks (read_tasks; their
    prompts checked against the model's text context)."""
    planes = planes_rows(planes_dir, split) if planes_dir else []
    if planes_dir:
        require_tasks(planes, planes_dir, split)
    decode_all([row["path"] for row in planes + (hc18_rows(hc18_dir, split) if hc18_dir else [])])
    return read_tasks(task_folders, prompts, context_length)


# ------------------------------------------------------------------ tasks: labelled scans and prompts per class
# A zero-shot classification task is its prompts per class (every class a candidate, class index = key
# order) and its labelled items. The protocol's two are read from Planes DB (PLANES_TASKS); a user's task is
# a folder.

PLANES_TASKS = {
    "five_planes": "five",
    "brain_subplanes": "sub",
}  # name (its PROMPTS key) -> planes_rows' class key


@dataclasses.dataclass
class Task:
    """A user's task: its prompts and scans.labelled(folder): every view of a file carries the file's class."""

    name: str
    prompts: dict  # {class: [prompt, ...]}
    files: list  # [(path, kind)] as scans.find gives them
    labels: list  # the class index of each file
    skipped: list  # [(path, reason)]: scans that could not be read
    ignored: list  # [(path, reason)]: files that are not scans


def read_prompts(path, context_length=data.CONTEXT_LENGTH):
    """{class: [prompt, ...]} from a JSON file, checked: two classes or more, each named once with non-empty
    prompts that fit the text context (check_tokens)."""
    try:
        prompts = json.loads(Path(path).read_text(), object_pairs_hook=once_each)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: prompts file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    except KeyError as twice:
        raise ValueError(
            f"{path}: class {twice.args[0]!r} is given twice; give its prompts once"
        ) from None
    if not isinstance(prompts, dict) or len(prompts) < 2:
        raise ValueError(
            f"{path}: expected a JSON object {{class: [prompt, ...]}} with two classes or more"
        )
    for name, texts in prompts.items():
        if not name.strip():
            raise ValueError(f"{path}: a class is named {name!r}; give every class a name")
        if not (
            isinstance(texts, list)
            and texts
            and all(isinstance(t, str) and t.strip() for t in texts)
        ):
            raise ValueError(f"{path}: class {name!r} needs a non-empty list of prompt strings")
    check_tokens(prompts, context_length, path)
    return prompts


def once_each(pairs):
    """json's object hook: a key given twice (the later one would silently win) raises KeyError naming it."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise KeyError(key)
        seen[key] = value
    return seen


def check_tokens(prompts, context_length, source):
    """A prompt longer than the text context would be cut (its end lost), and two classes whose token rows
    coincide get the same embedding (the first wins every argmax): both refused, naming them."""
    classes_of = {}
    for name, texts in prompts.items():
        # one position more than the context: a row that reaches it is too long
        tokens = data.tokenize(texts, context_length + 1)
        for text, row in zip(texts, tokens):
            if row[context_length]:
                count = int((data.tokenize(text, 4 * len(text) + 2) != 0).sum())
                raise ValueError(
                    f"{source}: class {name!r}: the prompt {text[:60]!r} is {count} tokens with its start and "
                    f"end, past the text context of {context_length}; shorten it"
                )
        key = tuple(sorted(map(tuple, tokens[:, :context_length].tolist())))
        if key in classes_of:
            raise ValueError(
                f"{source}: classes {classes_of[key]!r} and {name!r} have the same prompts once tokenized "
                "(case, spaces); they could never be told apart"
            )
        classes_of[key] = name


def read_task(folder, prompts="", context_length=data.CONTEXT_LENGTH):
    """A task folder -> Task, its prompts from `prompts` or folder/prompts.json. A class without a folder
    stays a candidate: predicting it is a miss, as the protocol's absent planes."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"task {folder}: not a folder")
    # task folders are an optional feature: the reading of scans lives in tools/
    from tools import scans

    classes = read_prompts(prompts or Path(folder) / "prompts.json", context_length)
    return Task(Path(folder).name, classes, *scans.labelled(folder, list(classes)))


def read_tasks(folders, prompts="", context_length=data.CONTEXT_LENGTH):
    """'a/,b/' -> [Task], names made unique (a second 'scans' becomes 'scans-2')."""
    tasks, names = [], set()
    for folder in filter(None, (f.strip() for f in folders.split(","))):
        task = read_task(folder, prompts, context_length)
        base, n = task.name, 1
        while task.name in names:
            n += 1
            task.name = f"{base}-{n}"
        names.add(task.name)
        tasks.append(task)
    return tasks


@torch.no_grad()
def encode_task(model, task, batch_size=64, device="cpu", frames=0):
    """-> (N, D) L2-normalised features of every view, (N,) labels, [(path, frame, region)] per view, and
    the files skipped (task.skipped and those that failed now; views read before a failure are kept). frames
    > 0 keeps that many evenly spaced frames of each file (a clip's, the CHD probe's 16)."""
    from tools import scans

    transform = data.eval_transform(model.image_size, model.image_mean, model.image_std)
    features, labels, where, batch, skipped = [], [], [], [], list(task.skipped)

    def flush():
        images = torch.stack([transform(view.image) for view, _ in batch]).to(device)
        features.append(F.normalize(model.encode_image(images).float(), dim=-1).cpu())
        labels.extend(label for _, label in batch)
        where.extend((view.file, view.frame, view.region) for view, _ in batch)
        batch.clear()

    for (path, kind), label in zip(
        tqdm(task.files, desc=task.name, unit="file", leave=False), task.labels
    ):
        try:
            indices = (
                scans.evenly_spaced(scans.count_frames(path, kind), frames) if frames > 0 else None
            )
            for view in scans.read(path, kind, indices=indices):
                batch.append((view, label))
                if len(batch) == batch_size:
                    flush()
        except scans.Unreadable as why:
            skipped.append((path, str(why)))
    if batch:
        flush()
    stacked = torch.cat(features) if features else torch.zeros(0, model.embed_dim)
    return stacked, np.array(labels, dtype=np.int64), where, skipped


def class_logits(model, features, prompts, device="cpu", prompt_cache=None):
    """Zero-shot logits over every class of `prompts`: SCALE * img @ cls.T -> (N, C)."""
    return SCALE * features @ class_embeddings(model, prompts, device, prompt_cache).T


def task_results(model, tasks, batch_size, device, prompt_cache=None):
    """{task name: metrics + the files skipped and ignored} for the user's tasks."""
    results = {}
    for task in tasks:
        features, labels, _, skipped = encode_task(model, task, batch_size, device)
        logits = class_logits(model, features, task.prompts, device, prompt_cache)
        probs = logits.softmax(-1).numpy()
        results[task.name] = classification_metrics(probs, labels, list(task.prompts))
        results[task.name].update(files=len(task.files), skipped=skipped, ignored=task.ignored)
    return results


def zero_shot(
    model,
    planes_dir="",
    hc18_dir="",
    batch_size=64,
    device="cpu",
    split="all",
    cache_text=True,
    num_workers=0,
    details=False,
    tasks=(),
    prompt_cache=None,
):
    """The protocol (the five planes and brain sub-planes of planes_dir, HC18 of hc18_dir; each where given)
    and the user's `tasks` -> nested dict (module docstring). The model must already be on `device`; its
    train/eval mode is restored. details=True adds features and logits under '_details' (not JSON; used by
    the analyses). prompt_cache: a PromptCache for a checkpoint's model (never for one in training)."""
    was_training = model.training
    model.eval()
    results, extra = {"split": split}, {}
    reading = dict(batch_size=batch_size, device=device, split=split, num_workers=num_workers)
    if planes_dir:
        extra = planes_results(model, planes_dir, results, details, prompt_cache, **reading)
    if hc18_dir:
        extra.update(hc18_results(model, hc18_dir, results, cache_text, prompt_cache, **reading))
    if planes_dir and hc18_dir:
        results["f1_all"] = f1_all(results)
        results["avg"] = (results["f1_all"] + results["hc18"]["validity"] / 100) / 2
    if tasks:
        results["tasks"] = task_results(model, tasks, batch_size, device, prompt_cache)
    results["selection"] = dict(zip(("value", "rule"), selection_score(results)))
    if details:
        results["_details"] = extra
    model.train(was_training)
    return results


def planes_results(
    model, planes_dir, results, details, prompt_cache, batch_size, device, split, num_workers
):
    """The protocol's Planes DB tasks into `results` -> what the analyses need."""
    rows = planes_rows(planes_dir, split, include_other=details)
    features, _ = encode_images(model, [r["path"] for r in rows], batch_size, device, num_workers)
    extra = {"planes_rows": rows, "planes_features": features}
    for name, key in PLANES_TASKS.items():
        labels, prompts = np.array([r[key] for r in rows], dtype=np.int64), PROMPTS[name]
        logits = class_logits(model, features, prompts, device, prompt_cache)  # (N, C), "Other" too
        mask = labels >= 0
        results[name] = classification_metrics(
            logits[mask].softmax(-1).numpy(), labels[mask], list(prompts)
        )
        extra[name + "_logits"] = logits
    return extra


def hc18_results(
    model, hc18_dir, results, cache_text, prompt_cache, batch_size, device, split, num_workers
):
    """HC18's GA validity into `results` -> what the analyses need."""
    hc_rows = hc18_rows(hc18_dir, split)
    hc_features, sides = encode_images(
        model, [r["path"] for r in hc_rows], batch_size, device, num_workers
    )
    spacings = [
        ga_spacing(side, r["pixel_size"], model.image_size) for side, r in zip(sides, hc_rows)
    ]
    scores, encoded = ga_scores(
        model, hc_features, spacings, cache_text, device, prompt_cache=prompt_cache
    )
    hc = ga_validity(scores, [r["hc"] for r in hc_rows])
    results["hc18"] = {
        k: hc[k] for k in ("validity", "valid", "n", "ci_low", "ci_high", "spearman")
    }
    results["hc18"].update(
        n_images=len(hc_rows), excluded=len(hc_rows) - hc["n"], text_encodings=encoded
    )
    true_hc = np.array([r["hc"] for r in hc_rows])
    return dict(hc18=hc, hc18_true=true_hc, hc18_scores=scores, hc18_features=hc_features)


def f1_all(results):
    """The protocol's F1-all: the macro F1 of the five planes and of the three brain sub-planes, weighted by
    their class counts, (5 F1-5 + 3 F1-3) / 8."""
    return (5 * results["five_planes"]["f1"] + 3 * results["brain_subplanes"]["f1"]) / 8


def selection_score(results):
    """(value, rule) by which train.py keeps best.pt: the protocol's Avg (paper Sec. 3.6) when both its data
    sets are evaluated, else F1-all (Planes DB alone), else HC18 validity / 100, else the mean macro F1 of
    the user's tasks; NaN when nothing was evaluated."""
    if "avg" in results:
        return results["avg"], "Avg"
    if "five_planes" in results:
        return f1_all(results), "F1-all"
    if "hc18" in results:
        return results["hc18"]["validity"] / 100, "HC18 validity"
    if results.get("tasks"):
        return float(np.mean([t["f1"] for t in results["tasks"].values()])), "mean task F1"
    return math.nan, "nothing evaluated"


def summary(results):
    """One line: the protocol's figures and each task's macro F1, as far as they were evaluated."""
    parts = []
    if "five_planes" in results:
        parts += [
            f"F1-5 {results['five_planes']['f1']:.3f}",
            f"F1-3 {results['brain_subplanes']['f1']:.3f}",
        ]
    if "hc18" in results:
        parts.append(f"HC18 {results['hc18']['validity']:5.1f}%")
    if "avg" in results:
        parts += [f"F1-all {results['f1_all']:.3f}", f"Avg {results['avg']:.3f}"]
    parts += [f"{name} F1 {task['f1']:.3f}" for name, task in results.get("tasks", {}).items()]
    return " | ".join(parts)


def task_table(title, r):
    lines = [f"{title} (n={r['n']})", f"  {'class':<20} {'F1':>7} {'recall':>7} {'n':>6}"]
    lines += [
        f"  {name:<20} {c['f1']:7.4f} {c['recall']:7.4f} {c['n']:6d}"
        for name, c in r["per_class"].items()
    ]
    return lines + [
        f"  {'macro':<20} {r['f1']:7.4f} {r['accuracy']:7.4f}  F1 95% CI [{r['f1_ci_low']:.4f}, {r['f1_ci_high']:.4f}]",
        f"  accuracy {r['accuracy']:.4f} | top-2 {r['top2']:.4f} | top-3 {r['top3']:.4f} (per class, "
        f"averaged) | pooled {r['pooled_accuracy']:.4f} / {r['pooled_top2']:.4f} / {r['pooled_top3']:.4f}",
    ]


def format_table(results):
    lines = []
    for key, title in (("five_planes", "Five planes"), ("brain_subplanes", "Brain sub-planes")):
        lines += task_table(title, results[key]) if key in results else []
    if "hc18" in results:
        h = results["hc18"]
        lines.append(
            f"HC18 validity {h['validity']:.2f}% ({h['valid']}/{h['n']}; {h['excluded']} of {h['n_images']} images "
            f"outside {HC_MIN:.0f}-{HC_MAX:.0f} mm excluded), 95% CI [{h['ci_low']:.2f}, {h['ci_high']:.2f}], "
            f"Spearman {h['spearman']:.4f}"
        )
    if "avg" in results:
        lines.append(
            f"F1-all {results['f1_all']:.4f} | Avg {results['avg']:.4f} | split {results['split']}"
        )
    for name, task in results.get("tasks", {}).items():
        lines += task_table(f"Task {name}", task)
        lines += [f"  skipped {path}: {why}" for path, why in task["skipped"]]
        lines += (
            [f"  ignored {len(task['ignored'])} files that are not scans"]
            if task["ignored"]
            else []
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ command line


def plain(obj):
    """JSON-ready copy: numpy scalars -> Python, NaN -> null, '_' keys dropped."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (np.generic, float)):
        obj = obj.item() if isinstance(obj, np.generic) else obj
        return None if isinstance(obj, float) and math.isnan(obj) else obj
    return obj


def run(config):
    """The command line's work -> what it wrote or computed."""
    if not config["ckpt"]:
        raise FileNotFoundError("no checkpoint given: python evaluate.py CKPT [--key=value ...]")
    device, ckpt = configurator.pick_device(config["device"]), Path(config["ckpt"])
    out_dir = Path(config["out_dir"] or ckpt.parent)
    configurator.check_folder(out_dir, "--out_dir")  # before any work, not after every scan
    out_dir.mkdir(parents=True, exist_ok=True)
    net = load_model(str(ckpt), config["model"]).to(device).eval()
    print(f"{ckpt}: {net.name} on {device}")
    demo = {}
    if not config["task"]:  # the protocol runs on the demo's data unless tasks are named
        from tools import synthetic

        demo = synthetic.layout(configurator.DEMO_DIR)
    planes_dir, hc18_dir = (config[k] or demo.get(k, "") for k in ("planes_dir", "hc18_dir"))
    tasks = check_sets(
        planes_dir,
        hc18_dir,
        config["task"],
        config["prompts"],
        config["eval_split"],
        net.context_length,
    )
    batching = dict(
        batch_size=config["batch_size"], device=device, num_workers=config["num_workers"]
    )
    prompt_cache = PromptCache(configurator.file_sha256(ckpt), net.name, config["cache_dir"])
    kwargs = dict(
        batching,
        split=config["eval_split"],
        cache_text=config["cache_text"],
        tasks=tasks,
        prompt_cache=prompt_cache,
    )
    results = zero_shot(net, planes_dir, hc18_dir, **kwargs)
    print(format_table(results))
    out_json = out_dir / results_name(ckpt, planes_dir or hc18_dir, tasks)
    configurator.write_atomic(out_json, json.dumps(plain(results), indent=1))
    print(f"wrote {out_json}")
    return results


def results_name(ckpt, protocol_ran, tasks):
    """<ckpt>_zeroshot.json where the protocol ran, <ckpt>_task_<names>.json for tasks alone: evaluating a
    task never replaces the protocol's results."""
    if protocol_ran:
        return f"{ckpt.stem}_zeroshot.json"
    return f"{ckpt.stem}_task_{'_'.join(task.name for task in tasks)}.json"


def main(arguments):
    config = configurator.configure(dict(DEFAULTS), arguments, positional="ckpt")
    configurator.refuse(
        config,
        [
            configurator.choice("eval_split", config["eval_split"], SPLITS),
            ("batch_size", config["batch_size"] >= 1, "at least 1"),
            ("num_workers", config["num_workers"] >= 0, "0 or more"),
        ],
    )
    try:
        return run(config)
    except (FileNotFoundError, ValueError) as error:  # the user's files: one line, no traceback
        raise SystemExit(f"evaluate.py: {error}") from None
    except OSError as error:  # a full disk, a folder that cannot be written: one line
        raise SystemExit(f"evaluate.py: {error.filename}: {error.strerror or error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
