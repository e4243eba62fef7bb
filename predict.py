"""The model on your scans (nanoGPT's sample.py): which plane each frame shows, the best frame of each plane
in a clip, the brain sub-plane, and a gestational-age estimate where the head is calibrated.

    python predict.py out/best.pt exports/                    # every scan under exports/ (scans.py reads them)
    python predict.py mobile_fetal_clip_weights.pt a.dcm loop.mp4 --pixel_size=0.2 --save_frames=frames/
    python predict.py out/best.pt scans/ --prompts=my_classes.json    # your own classes: {class: [prompt, ...]}

Per view of every frame (a dual-view DICOM frame has two): every class's probability (softmax of 100 * img @ cls.T
with the protocol's prompt-averaged class embeddings), the top three, the brain sub-plane when the plane is brain,
and the GA (the HC18 prompts and top-15 rule: evaluate.ga_scores, protocol.ga_prediction; at the spacing of the
model's input, after crop, pad and resize) where the frame is a brain plane, its pixel size is known and the view
can hold a measurable head (at least HC_MIN / pi = 32 mm across). Per multi-frame file (and view): the label of the
mean probabilities, each class's best frame and a timeline plot. Writes into out_dir, all of it replaced as one:
    predictions.json   {"rows": [...], "clips": [...], "skipped": [...], "ignored": [...], "produced_by": {...}}
    predictions.csv    one line per row
    timelines/         <file>.png per clip: class probabilities over frames
produced_by holds the command, the checkpoint's path, sha256 and model, the prompts and the package versions. Frames
are read and preprocessed in a thread while the image encoder runs, as deployed (--encoder): reparameterised, and
on the CPU exported once per checkpoint to fp32 ONNX and run by onnxruntime. The class, sub-plane and GA prompt
features (the GA's once per distinct spacing) and the ONNX file are cached per checkpoint sha256 in
evaluate.cache_folder(), so a second run encodes no prompt. Memory grows with the rows, not the pixels.
"""

import csv
import datetime
import io
import json
import math
import os
import queue
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import configurator
import data
import evaluate
import protocol
from model import load_model, reparameterize

DEFAULTS = {  # python predict.py CKPT PATH [PATH ...] --key=value
    "ckpt": "",  # the checkpoint: the first argument
    "paths": [],  # files and folders of scans: the further arguments
    "pixel_size": -1.0,  # mm per pixel for files that carry no calibration (as HC18's CSV); -1 = none
    "prompts": "",  # JSON {class: [prompt, ...]} replacing the five planes (no sub-plane, no GA); '' = protocol
    "save_frames": "",  # a folder: the image the model saw for every row, as PNG (to check colour and crop)
    "out_dir": "predictions",  # predictions.json, predictions.csv, timelines/ (replaced, never mixed)
    "model": "",  # model.py name; '' = the name the checkpoint stores
    "device": "",  # '' = cuda, else mps, else cpu
    "batch_size": 32,  # frames per forward pass
    "encoder": "onnx",  # onnx = the exported fp32 image encoder in onnxruntime on the CPU (torch elsewhere);
    # torch = the reparameterised model in PyTorch; eager = the model as trained (both agree:
    # ENCODER_TOLERANCE)
    "cache_dir": "",  # prompt features and ONNX encoders per checkpoint; '' = evaluate.cache_folder()
}
ENCODERS = ("onnx", "torch", "eager")
# max abs difference of the unit-norm image features allowed, the ONNX file against PyTorch (checked on
# export)
ENCODER_TOLERANCE = 1e-5
QUEUE_DEPTH = 2  # batches decoded and preprocessed ahead of the encoder
# across the smallest head the protocol measures (HC 100 mm)
HEAD_MIN_MM = protocol.HC_MIN / math.pi
PACKAGES = ("torch", "timm", "numpy", "pillow", "pydicom", "av", "onnx", "onnxruntime")
OUTPUTS = ("predictions.json", "predictions.csv", "timelines")  # all of out_dir, replaced as one

# ------------------------------------------------------------------ classes and prompts


class Classifier:
    """The zero-shot heads of one model: the classes (the five planes, or the user's), the brain sub-planes
    and the GA prompts (protocol only; ga=False leaves GA out), and the GA text features per spacing,
    encoded once each."""

    def __init__(self, net, prompts, device, ga=True, prompt_cache=None, encoder=None):
        self.net, self.device, self.protocol, self.ga = net, device, prompts is None, ga
        self.prompt_cache = prompt_cache  # evaluate.PromptCache: the text features on disk, or None
        self.encoder = encoder or TorchEncoder(net, device)  # images -> (B, D) unit-norm features
        self.prompts = protocol.PROMPTS["five_planes"] if prompts is None else prompts
        self.classes = list(self.prompts)
        self.embeddings = evaluate.class_embeddings(net, self.prompts, device, prompt_cache)
        brain = protocol.PROMPTS["brain_subplanes"]
        self.brain = (
            evaluate.class_embeddings(net, brain, device, prompt_cache) if self.protocol else None
        )  # (C, D) and (3, D)
        self.ga_text = {}  # spacing string -> (875, D)
        transform = data.eval_transform(net.image_size, net.image_mean, net.image_std)
        # pad, resize, crop: PIL
        self.model_input = torchvision.transforms.Compose(transform.transforms[:-1])
        self.normalise = transform.transforms[-1]

    def prepare(self, views):
        """Views -> (the images the model saw (PIL, before normalising), the normalised batch (B, 3, S, S))."""
        seen = [self.model_input(view.image) for view in views]
        return seen, torch.stack([self.normalise(image) for image in seen])

    @torch.no_grad()
    def __call__(self, views, prepared=None):
        """Views (and their prepare(views), when done already) -> (rows (dicts), the images the model saw
        (PIL, before normalising)), one per view."""
        seen, images = prepared or self.prepare(views)
        features = self.encoder(images)  # (B, D)
        probs = (protocol.SCALE * features @ self.embeddings.T).softmax(-1)  # (B, C)
        rows = [self.row(view, p) for view, p in zip(views, probs)]
        if self.protocol:
            self.add_subplanes(rows, features)
        if self.protocol and self.ga:
            self.add_ga(rows, views, features)
        return rows, seen

    def row(self, view, probs):
        top = probs.topk(min(3, len(self.classes)))
        return {
            "file": view.file,
            "frame": view.frame,
            "region": None if view.region < 0 else view.region,
            "seconds": view.seconds,
            "label": self.classes[int(top.indices[0])],
            "top": [
                [self.classes[int(i)], round(float(p), 4)] for i, p in zip(top.indices, top.values)
            ],
            "probs": {name: round(float(p), 6) for name, p in zip(self.classes, probs)},
            "pixel_size_mm": view.pixel_size_mm,
            "spacing_source": view.spacing_source or None,
            "spacing_note": view.spacing_note or None,
            "pixels": view.pixels,
        }

    def add_subplanes(self, rows, features):
        brain = (protocol.SCALE * features @ self.brain.T).softmax(-1)  # (B, 3)
        for row, p in zip(rows, brain):
            is_brain = row["label"] == "brain"
            row["subplane"] = protocol.BRAIN_SUBPLANES[int(p.argmax())] if is_brain else None
            row["p_subplane"] = round(float(p.max()), 4) if is_brain else None

    def add_ga(self, rows, views, features):
        """GA where measurable (see ga_note), else ga_days None and the reason."""
        chosen, spacings = [], []
        for i, (row, view) in enumerate(zip(rows, views)):
            row.update(ga_days=None, ga=None, ga_spacing_mm=None, ga_note=ga_note(row, view))
            if not row["ga_note"]:
                chosen.append(i)
                spacings.append(
                    evaluate.ga_spacing(
                        max(view.image.size), view.pixel_size_mm, self.net.image_size
                    )
                )
        if chosen:
            scores, _ = evaluate.ga_scores(
                self.net,
                features[chosen],
                spacings,
                device=self.device,
                text_cache=self.ga_text,
                prompt_cache=self.prompt_cache,
            )
            for i, days, spacing in zip(chosen, protocol.ga_prediction(scores).tolist(), spacings):
                rows[i].update(
                    ga_days=days, ga=f"{days // 7}w{days % 7}d", ga_spacing_mm=float(spacing)
                )


def ga_note(row, view):
    """Why a view gets no GA estimate ('' when it gets one)."""
    if row["label"] != "brain":
        return "not a brain plane"
    if view.pixel_size_mm is None:
        return view.spacing_note or "no pixel size"
    span = max(view.image.size) * view.pixel_size_mm
    if span < HEAD_MIN_MM:
        return f"the view spans {span:.0f} mm, less than the smallest head measured ({HEAD_MIN_MM:.0f} mm across)"
    return ""


# ------------------------------------------------------------------ the image encoder as deployed


class TorchEncoder:
    """A model's image encoder in PyTorch on `device`: (B, 3, S, S) -> (B, D) unit-norm float32 CPU features."""

    def __init__(self, net, device):
        self.net, self.device = net, device

    @torch.no_grad()
    def __call__(self, images):
        return F.normalize(self.net.encode_image(images.to(self.device)).float(), dim=-1).cpu()


class OnnxEncoder:
    """export.py's fp32 image encoder file in onnxruntime: (B, 3, S, S) -> (B, D) unit-norm float32 features."""

    def __init__(self, session):
        self.session = session

    def __call__(self, images):
        return torch.from_numpy(self.session.run(None, {"image": images.numpy()})[0])


def image_encoder(net, device, kind, sha256, cache_dir=""):
    """The encoder predict.py runs (--encoder): the model as trained (eager), reparameterised by timm
    (torch; what was deployed, same outputs), or that exported to ONNX once per checkpoint and run by
    onnxruntime (onnx, on the CPU; torch where onnxruntime cannot run it, with the reason printed)."""
    if kind == "eager":
        return TorchEncoder(net, device)
    fused = reparameterize(net)
    if kind == "onnx" and device == "cpu":
        try:
            return OnnxEncoder(onnx_encoder_session(fused, sha256, cache_dir))
        except (ImportError, RuntimeError, ValueError, OSError) as error:  # OSError: no cache
            print(f"the ONNX image encoder is not available ({error}): PyTorch runs it instead")
    return TorchEncoder(fused, device)


def onnx_encoder_session(fused, sha256, cache_dir=""):
    """An onnxruntime session of the checkpoint's image encoder: from the cache when the file there carries
    this checkpoint's sha256 and model, else exported now (checked against PyTorch within ENCODER_TOLERANCE)
    and stored atomically."""
    import export

    folder = Path(cache_dir or evaluate.cache_folder()) / "onnx"
    # the exporter's version too: a file written by another torch is exported again
    key = {"sha256": sha256, "model": fused.name, "torch": torch.__version__}
    path = folder / f"{sha256}-{fused.name}.onnx"
    if path.is_file():
        try:
            session = export.onnx_session(path)
            if session.get_modelmeta().custom_metadata_map == key:
                return session
        except Exception:  # a damaged file (onnxruntime raises its own types): exported again below
            pass
    print(f"exporting the image encoder to {path} (once per checkpoint)")
    folder.mkdir(parents=True, exist_ok=True)
    images = export.example_images(fused)
    with torch.no_grad():
        reference = export.ImageEncoder(fused)(images)

    def stamp_and_check(written):
        stamp(written, key)
        outputs = export.onnx_session(written).run(None, {"image": images.numpy()})
        error = export.max_abs_diff(outputs, [reference])
        export.check(error, "the ONNX image encoder against PyTorch", ENCODER_TOLERANCE)

    export.export_onnx(
        export.ImageEncoder(fused),
        images,
        path,
        "image",
        ["image_features"],
        verify=stamp_and_check,
    )
    return export.onnx_session(path)


def stamp(path, key):
    """Write `key` into an ONNX file's metadata: which checkpoint and model it was exported from."""
    import onnx

    graph = onnx.load(path)
    onnx.helper.set_model_props(graph, key)
    onnx.save(graph, path)


# ------------------------------------------------------------------ the scans, streamed


def views_of(found, pixel_size, skipped, progress):
    """Every view of every file in turn; a file that cannot be read is added to `skipped` with its reason
    (and the number of frames read before the failure, whose rows stay)."""
    from tools import scans

    for path, kind in found:
        frames = set()
        try:
            for view in scans.read(path, kind, pixel_size):
                frames.add(view.frame)
                yield view
        except scans.Unreadable as why:
            skipped.append({"file": path, "reason": str(why), "frames_read": len(frames)})
        progress.update(1)


def batches(views, size):
    batch = []
    for view in views:
        batch.append(view)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prefetched(items, depth):
    """`items` produced in a thread, at most `depth` ahead of the consumer, in order; an error raised while
    producing them is raised here, in the consumer."""
    handoff, finished = queue.Queue(maxsize=depth), object()

    def produce():
        try:
            for item in items:
                handoff.put(item)
            handoff.put(finished)
        except BaseException as error:  # handed over to be raised in the consumer's thread
            handoff.put(ProducerFailed(error))

    threading.Thread(target=produce, daemon=True).start()
    while (item := handoff.get()) is not finished:
        if isinstance(item, ProducerFailed):
            raise item.error
        yield item


class ProducerFailed:
    """An error of prefetched's producer thread, on its way to the consumer."""

    def __init__(self, error):
        self.error = error


def save_model_input(view, seen, folder, taken):
    """The image the model saw (after crop, pad and resize, before normalising) as PNG -> its path."""
    from tools import scans

    path = os.path.join(folder, scans.frame_name(view.file, view.frame, view.region, taken))
    with configurator.atomic_path(path) as tmp:
        seen.save(tmp, format="PNG")
    return path


def predict(net, found, config, device, sha256):
    """-> (rows, skipped, the classifier) for the found scans. `sha256`: the checkpoint's, keying its caches."""
    classifier = make_classifier(net, config, device, sha256)
    rows, skipped = classify_scans(classifier, found, config)
    return rows, skipped, classifier


def make_classifier(net, config, device, sha256):
    """The Classifier predict.py runs: --prompts (or the protocol's) and --encoder, its caches keyed by `sha256`."""
    prompts = evaluate.read_prompts(config["prompts"]) if config["prompts"] else None
    prompt_cache = evaluate.PromptCache(sha256, net.name, config["cache_dir"])
    encoder = image_encoder(net, device, config["encoder"], sha256, config["cache_dir"])
    return Classifier(net, prompts, device, prompt_cache=prompt_cache, encoder=encoder)


def classify_scans(classifier, found, config):
    """-> (rows, skipped) for the found scans: batched, streamed file by file, each batch read and
    preprocessed in a thread while the encoder runs on the one before."""
    rows, skipped, taken = [], [], set()
    if config["save_frames"]:
        os.makedirs(config["save_frames"], exist_ok=True)
    with tqdm(total=len(found), desc="scans", unit="file") as progress:
        views = views_of(found, config["pixel_size"], skipped, progress)
        prepared = (
            (batch, classifier.prepare(batch)) for batch in batches(views, config["batch_size"])
        )
        for batch, inputs in prefetched(prepared, QUEUE_DEPTH):
            batch_rows, seen = classifier(batch, inputs)
            for row, view, image in zip(batch_rows, batch, seen):
                folder = config["save_frames"]
                row["saved"] = save_model_input(view, image, folder, taken) if folder else None
            rows += batch_rows
            progress.set_postfix(frames=len(rows))
    return rows, skipped


# ------------------------------------------------------------------ clips


def views_of_files(rows):
    """{(file, region): its rows, in frame order}."""
    groups = {}
    for row in rows:
        groups.setdefault((row["file"], row["region"]), []).append(row)
    return groups


def clips_of(rows, classes):
    """A clip per multi-frame file and view: its frame count, the label of the mean probabilities and, per
    class, the frame where it is most probable."""
    clips = []
    for (path, region), members in views_of_files(rows).items():
        if len(members) < 2:
            continue
        probs = np.array([[m["probs"][c] for c in classes] for m in members])  # (frames, C)
        mean, best = probs.mean(0), probs.argmax(0)
        clips.append(
            {
                "file": path,
                "region": region,
                "frames": len(members),
                "label": classes[int(mean.argmax())],
                "mean_probs": {c: round(float(p), 6) for c, p in zip(classes, mean)},
                "best_frames": {
                    c: {"frame": members[int(b)]["frame"], "prob": float(probs[b, i])}
                    for i, (c, b) in enumerate(zip(classes, best))
                },
            }
        )
    return clips


def timeline(clip, members, classes):
    """Class probabilities over the frames of one clip (its rows); classes that never reach 0.1 are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [r["frame"] for r in members]
    fig, ax = plt.subplots(figsize=(8, 3))
    for name in classes:
        series = [r["probs"][name] for r in members]
        if max(series) >= 0.1:
            ax.plot(frames, series, label=name, linewidth=1.2)
    view = "" if clip["region"] is None else f", region {clip['region']}"
    ax.set(
        xlabel="frame",
        ylabel="probability",
        ylim=(0, 1),
        title=f"{Path(clip['file']).name}{view}: {clip['label']}",
    )
    ax.legend(fontsize=7, frameon=False, loc="upper right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


# ------------------------------------------------------------------ outputs

CSV_COLUMNS = [
    "file",
    "frame",
    "region",
    "seconds",
    "label",
    "p",
    "second",
    "p2",
    "third",
    "p3",
    "subplane",
    "p_subplane",
    "pixel_size_mm",
    "spacing_source",
    "ga",
    "ga_days",
    "note",
    "pixels",
    "saved",
]


def csv_line(row):
    top = row["top"] + [[None, None]] * (3 - len(row["top"]))
    line = {k: row.get(k) for k in CSV_COLUMNS}
    line.update(p=top[0][1], second=top[1][0], p2=top[1][1], third=top[2][0], p3=top[2][1])
    notes = dict.fromkeys(filter(None, [row.get("spacing_note"), row.get("ga_note")]))  # each once
    line["note"] = "; ".join(notes)
    return line | {f"p_{name}": p for name, p in row["probs"].items()}


def write_outputs(out_dir, rows, clips, skipped, ignored, produced_by, classes):
    """predictions.json, predictions.csv and timelines/ written into a temporary folder beside out_dir,
    which then replaces all of out_dir in one step (configurator.atomic_path): never a mix of two runs. A
    full disk is one line."""
    # 'out/' -> 'out': the temporary folder goes beside it, not inside
    out_dir = os.path.normpath(out_dir)
    try:
        with configurator.atomic_path(out_dir) as tmp:
            os.makedirs(tmp)
            write_files(
                Path(tmp), Path(out_dir), rows, clips, skipped, ignored, produced_by, classes
            )
    except OSError as error:
        raise ValueError(
            f"{out_dir}: cannot write the predictions ({error.strerror or error}); the folder is left as it was"
        ) from None
    return Path(out_dir) / "predictions.json"


def write_files(folder, out_dir, rows, clips, skipped, ignored, produced_by, classes):
    """The outputs into `folder`; the timelines' paths name out_dir, where they will be."""
    from tools import scans

    taken, views = set(), views_of_files(rows)
    (folder / "timelines").mkdir()
    for clip in clips:
        name = scans.frame_name(
            clip["file"], None, -1 if clip["region"] is None else clip["region"], taken
        )
        clip["timeline"] = scans.escaped(out_dir / "timelines" / name)
        png = timeline(clip, views[clip["file"], clip["region"]], classes)
        (folder / "timelines" / name).write_bytes(png)
    document = {
        "rows": rows,
        "clips": clips,
        "skipped": skipped,
        "ignored": ignored,
        "produced_by": produced_by,
    }
    (folder / "predictions.json").write_text(
        json.dumps(evaluate.plain(document), indent=1), encoding="utf-8"
    )
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS + [f"p_{c}" for c in classes])
    writer.writeheader()
    writer.writerows(csv_line(row) for row in rows)
    (folder / "predictions.csv").write_text(text.getvalue(), encoding="utf-8")


def escape_names(entries):
    """Rows, skipped and ignored files with every path as text (scans.escaped): a name that is not UTF-8 is
    kept, escaped, in the JSON, the CSV and the terminal."""
    from tools import scans

    for entry in entries:
        for key in ("file", "saved"):
            if entry.get(key):
                entry[key] = scans.escaped(entry[key])
    return entries


def provenance(config, net, classifier, sha256):
    return {
        "command": " ".join(["python predict.py", *sys.argv[1:]])
        if sys.argv[0].endswith("predict.py")
        else "",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checkpoint": os.path.abspath(config["ckpt"]),
        "sha256": sha256,
        "model": net.name,
        "prompts": {
            "file": config["prompts"] or "zero_shot_prompts.json (the protocol's)",
            "classes": classifier.prompts,
        },
        "pixel_size_mm": config["pixel_size"] if config["pixel_size"] > 0 else None,
        "encoder": config["encoder"],
        "versions": configurator.package_versions(PACKAGES),
    }


def print_table(rows, clips, skipped, ignored):
    clipped = {(c["file"], c["region"]) for c in clips}
    for row in rows:
        if (row["file"], row["region"]) in clipped:
            continue
        view = "" if row["region"] is None else f" [region {row['region']}]"
        top = ", ".join(f"{name} {p:.3f}" for name, p in row["top"])
        extra = f" | {row['subplane']} {row['p_subplane']:.3f}" if row.get("subplane") else ""
        extra += f" | GA {row['ga']}" if row.get("ga") else ""
        print(f"{row['file']}{view}: {top}{extra}")
    for clip in clips:
        view = "" if clip["region"] is None else f" [region {clip['region']}]"
        best = ", ".join(
            f"{c} f{b['frame']} {b['prob']:.2f}"
            for c, b in clip["best_frames"].items()
            if b["prob"] >= 0.5
        )
        print(
            f"{clip['file']}{view}: {clip['frames']} frames, {clip['label']} | best frames: {best or 'none above 0.5'}"
        )
    for entry in skipped:
        print(f"skipped {entry['file']}: {entry['reason']}")
    if ignored:
        print(f"ignored {len(ignored)} files that are not scans (listed in predictions.json)")


# ------------------------------------------------------------------ command line


def check(config):
    if not config["ckpt"] or not config["paths"]:
        raise ValueError(
            "usage: python predict.py CKPT PATH [PATH ...] [--pixel_size=MM] [--prompts=FILE] ..."
        )
    if config["pixel_size"] != -1:
        protocol.check_pixel_size(config["pixel_size"], "--pixel_size")
    if config["batch_size"] < 1:
        raise ValueError(f"--batch_size={config['batch_size']}: expected at least 1")
    if config["prompts"]:
        check_class_names(evaluate.read_prompts(config["prompts"]), config["prompts"])
    if not config["out_dir"]:
        raise ValueError("--out_dir is empty: expected a folder for the predictions")
    check_folders(config["out_dir"], config["save_frames"])


def check_class_names(prompts, path):
    """A class whose CSV column (p_NAME) would be one of the CSV's own columns: refused, naming it."""
    clashes = [name for name in prompts if f"p_{name}" in CSV_COLUMNS]
    if clashes:
        raise ValueError(
            f"{path}: class {clashes[0]!r} would write column p_{clashes[0]}, which predictions.csv already "
            "has; rename the class"
        )


def check_folders(out_dir, save_frames):
    """--out_dir and --save_frames, before any work: folders, not files; out_dir holds only what predict.py
    writes (it is replaced as a whole), and save_frames lies outside it."""
    configurator.check_replaceable(out_dir, "--out_dir", OUTPUTS, "predict.py")
    if save_frames:
        configurator.check_folder(save_frames, "--save_frames")
    inside = os.path.realpath(save_frames).startswith(os.path.realpath(out_dir) + os.sep)
    if save_frames and inside:
        raise ValueError(
            f"--save_frames={save_frames} is inside --out_dir={out_dir}, which is replaced as a whole"
        )


def run(config):
    from tools import scans  # tools/scans.py reads a clinic's files

    check(config)
    configurator.refuse(config, [configurator.choice("encoder", config["encoder"], ENCODERS)])
    device = configurator.pick_device(config["device"])
    # refuses non-finite weights
    net = load_model(config["ckpt"], config["model"]).to(device).eval()
    if config["prompts"]:  # against this model's text context
        evaluate.read_prompts(config["prompts"], net.context_length)
    found, ignored, skipped = scans.find(config["paths"], exclude=own_folders(config))
    print(
        f"{config['ckpt']}: {net.name} on {device}; {len(found)} scans, {len(ignored)} other files ignored"
    )
    sha256 = configurator.file_sha256(config["ckpt"])  # the provenance's and every cache's key
    rows, unreadable, classifier = predict(net, found, config, device, sha256)
    skipped = [
        {"file": path, "reason": why, "frames_read": 0} for path, why in skipped
    ] + unreadable
    ignored = [{"file": path, "reason": why} for path, why in ignored]
    rows, skipped, ignored = escape_names(rows), escape_names(skipped), escape_names(ignored)
    clips = clips_of(rows, classifier.classes)
    out = write_outputs(
        config["out_dir"],
        rows,
        clips,
        skipped,
        ignored,
        provenance(config, net, classifier, sha256),
        classifier.classes,
    )
    print_table(rows, clips, skipped, ignored)
    print(
        f"wrote {out}, predictions.csv and {len(clips)} timelines: {len(rows)} rows, {len(skipped)} files skipped"
    )
    if not rows:
        raise ValueError(
            f"no frame was predicted ({len(skipped)} files skipped, {len(ignored)} ignored; see {out})"
        )
    return rows, clips, skipped, ignored


def own_folders(config):
    """predict.py's own output folders: never read as scans, even under a folder of scans (a second run
    would classify the first run's timelines and frames)."""
    folders = {config["out_dir"]: "predict.py's output folder (--out_dir), not read"}
    if config["save_frames"]:
        folders[config["save_frames"]] = (
            "predict.py's folder of model inputs (--save_frames), not read"
        )
    return folders


def main(arguments):
    config = configurator.configure(dict(DEFAULTS), arguments, positional="ckpt", rest="paths")
    try:
        return run(config)
    except (
        FileNotFoundError,
        ValueError,
    ) as error:  # the user's files and values: one line, no traceback
        raise SystemExit(f"predict.py: {error}") from None
    # a full disk or a folder that cannot be written (--save_frames): one line
    except OSError as error:
        raise SystemExit(f"predict.py: {error.filename}: {error.strerror or error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
