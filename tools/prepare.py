"""Your image-caption pairs -> the WebDataset shards train.py and cache.py read (nanoGPT's data/<name>/prepare.py).

    python -m tools.prepare pairs.csv --out_dir=shards      # open_clip's CSV: columns filepath and title
    python -m tools.prepare my_scans/ --out_dir=shards      # a folder: scan.png + its caption in scan.txt
    python train.py --train_data=shards ...

A CSV names each image by a path relative to the CSV's folder (or an absolute one) in column --img_key and
its caption in --caption_key (open_clip's --csv-img-key / --csv-caption-key defaults). Its separator is read
off the header (tab, open_clip's default, comma or semicolon: the one that splits out both columns) unless
--separator says. Each pair becomes <key>.<ext> (the image file's bytes, unchanged) and <key>.txt (the
caption, UTF-8, stripped) in train-000000.tar, train-000001.tar, ... (--shard_size pairs each). The key is
the CSV row number (the header is row 1, as a spreadsheet counts), or in a folder the image's position in
sorted path order, zero-padded to 9 digits: unique, and without the dots WebDataset splits keys at. One
image listed with several captions (COCO) gives one pair per caption; the same image bytes with the same
caption a second time is refused as a duplicate.

A pair is written exactly when the training loader decodes it (data.decode_sample); every other row or file
is refused with its reason (REASONS), printed and listed in out_dir/prepare_report.json with the shards and
their sample counts, the source and the settings. DICOM files and video clips are refused with the command
that converts them. The folder is written beside out_dir and swapped in at the end: the same input gives
byte-identical shards, a rerun never leaves a mix of old and new shards, and a folder that prepare.py did
not write is never replaced."""

import contextlib
import csv
import json
import os
import re
import sys

import tqdm
import webdataset as wds

import configurator
import data
from tools import scans

# ------------------------------------------------------------------ settings: --key=value
DEFAULTS = {
    # a CSV of pairs, or a folder of images with same-stem .txt captions: the one positional argument
    "source": "",
    "out_dir": "",  # the shard folder (required); replaced as a whole, and only when prepare.py wrote it
    "img_key": "filepath",  # CSV column of image paths (open_clip's --csv-img-key)
    "caption_key": "title",  # CSV column of captions (open_clip's --csv-caption-key)
    "separator": "",  # CSV separator; '' = read off the header (tab, comma or semicolon); '\t' = tab
    "shard_size": 1000,  # pairs per shard
}

REPORT = "prepare_report.json"  # its presence marks a folder prepare.py wrote
SHARD = "train-{:06d}.tar"
SHARD_PATTERN = r"train-\d{6}\.tar"
SEPARATORS = ("\t", ",", ";")  # tried in this order; tab is open_clip's default
REASONS = (
    "missing image",  # no such file (in a folder: a caption file without an image)
    "unreadable image",  # the file cannot be read, or the training loader cannot decode it
    "DICOM or video",  # scans.py writes their frames as PNG
    "unsupported format",  # an extension data.IMAGE_EXTENSIONS does not hold
    "missing caption",  # in a folder: an image without a same-stem .txt
    "empty caption",  # blank, or not UTF-8
    "duplicate",  # the same image bytes and caption as a pair already written
    "too many cells",  # a CSV row with more cells than its header: an unquoted separator in the caption
    "name not UTF-8",  # in a folder: a file name the shards' report cannot hold as text
)
CONVERT = "write its frames as PNG with `python -m tools.scans PATH --save_frames=DIR` and list those instead"


class Refused(Exception):
    """A row or file that does not become a pair: one of REASONS and what exactly is wrong."""

    def __init__(self, reason, detail):
        assert reason in REASONS, reason
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------ the sources: a CSV or a folder
# An entry: {"number": key number, "where": {"row": N, "file": F} (or just file), "image": path, "caption":
# str}, or {"where": ..., "refused": Refused} for a caption file without an image.


def csv_separator(path, img_key, caption_key, separator):
    """The separator: the given one ('\\t' = tab), else the one that splits both columns out of the header."""
    if separator:
        separator = "\t" if separator == "\\t" else separator
        if len(separator) != 1:
            raise ValueError(f"--separator={separator!r}: expected one character (or \\t for tab)")
        return separator
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = f.readline()
    fields = {
        s: [name.strip() for name in next(csv.reader([header], delimiter=s), [])]
        for s in SEPARATORS
    }
    fitting = [s for s in SEPARATORS if img_key in fields[s] and caption_key in fields[s]]
    if len(fitting) > 1:
        raise ValueError(
            f"{path}: the header splits into {img_key!r} and {caption_key!r} at several separators: "
            f"give --separator"
        )
    # none fits: the separator that splits the header most, so that data.read_csv names the columns found
    return fitting[0] if fitting else max(SEPARATORS, key=lambda s: len(fields[s]))


def csv_entries(path, img_key, caption_key, separator):
    """-> (separator, entries), one entry per row in file order; image paths relative to the CSV's folder."""
    if img_key == caption_key:
        raise ValueError(f"--img_key and --caption_key are both {img_key!r}")
    try:
        separator = csv_separator(path, img_key, caption_key, separator)
        # the columns, as every CSV is checked
        data.read_csv(path, separator, (img_key, caption_key))
        with open(path, newline="", encoding="utf-8-sig") as f:
            # (row number as a spreadsheet shows it, cells); blank rows are skipped, as DictReader does,
            # but still counted
            numbered = enumerate(csv.reader(f, delimiter=separator), start=1)
            rows = [(number, cells) for number, cells in numbered if cells]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    header = [name.strip() for name in rows[0][1]]
    folder, entries = os.path.dirname(os.path.abspath(path)), []
    for row, cells in rows[1:]:
        # short rows: empty cells, as csv.DictReader
        cells = cells + [""] * (len(header) - len(cells))
        named = {key: cells[header.index(key.strip())].strip() for key in (img_key, caption_key)}
        entry = dict(number=row, where={"row": row, "file": named[img_key]})
        if len(cells) > len(header):
            detail = f"{len(cells)} cells for the header's {len(header)}: quote a caption holding {separator!r}"
            entry["refused"] = Refused("too many cells", detail)
        image = os.path.join(folder, named[img_key]) if named[img_key] else ""
        entries.append(dict(entry, image=image, caption=named[caption_key]))
    return separator, entries


def read_caption(path):
    """A folder's caption file -> its text, stripped ('' when it is not UTF-8: refused as an empty caption)."""
    with open(path, "rb") as f:
        try:
            return f.read().decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            return ""


def folder_entries(folder):
    """Every file under folder, recursively: an image with its same-stem .txt caption, or a refusal."""
    files = sorted(
        os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
        for d, _, fs in os.walk(folder)
        for f in fs
    )
    not_utf8_names = [f for f in files if scans.escaped(f) != f]  # refused, the rest kept
    entries = [dict(where={"file": scans.escaped(f)}, refused=not_utf8(f)) for f in not_utf8_names]
    files = [f for f in files if f not in not_utf8_names]
    captions = {os.path.splitext(f)[0]: f for f in files if f.lower().endswith(".txt")}
    images = [f for f in files if not f.lower().endswith(".txt")]
    stems = {os.path.splitext(f)[0] for f in images}
    for stem, name in captions.items():
        if stem not in stems:
            refusal = Refused(
                "missing image", f"{name}: a caption file without an image of the same name"
            )
            entries.append(dict(where={"file": name}, refused=refusal))
    for number, name in enumerate(images, start=1):
        entry = dict(number=number, where={"file": name}, image=os.path.join(folder, name))
        stem = os.path.splitext(name)[0]
        if stem in captions:
            entry["caption"] = read_caption(os.path.join(folder, captions[stem]))
        else:
            entry["refused"] = Refused(
                "missing caption", f"{name}: no caption file {stem}.txt beside it"
            )
        entries.append(entry)
    return entries


def not_utf8(name):
    return Refused(
        "name not UTF-8", f"{scans.escaped(name)}: the file name is not UTF-8; rename it"
    )


# ------------------------------------------------------------------ one pair


def read_pair(image, caption):
    """-> the sample {ext: the file's bytes, "txt": caption} when the training loader decodes it, else Refused."""
    if not image or not os.path.isfile(image):
        raise Refused("missing image", f"{image or 'an empty path'}: not found")
    try:
        with open(image, "rb") as f:
            content = f.read()
    except OSError as error:
        raise Refused("unreadable image", f"{image}: {error.strerror}") from None
    extension = os.path.splitext(image)[1][1:].lower()
    sample = {extension: content, "txt": caption.encode()}
    problem = data.decode_sample(sample)[
        2
    ]  # the loader's own test: "image" or "caption" it cannot use
    if problem == "image":
        raise image_refusal(image, extension, content)
    if problem == "caption":
        raise Refused("empty caption", f"{image}: the caption is empty")
    return sample


def image_refusal(image, extension, content):
    """Why the loader cannot read an image file; DICOM files and video clips say how to convert them."""
    # a 128-byte preamble, then DICM
    if f".{extension}" in scans.DICOM_SUFFIXES or content[128:132] == b"DICM":
        return Refused("DICOM or video", f"{image} is a DICOM file: {CONVERT}")
    if f".{extension}" in scans.VIDEO_SUFFIXES:
        return Refused("DICOM or video", f"{image} is a video clip: {CONVERT}")
    if extension not in data.IMAGE_EXTENSIONS:
        kind = f".{extension}" if extension else "a name without an extension"
        readable = ", ".join(data.IMAGE_EXTENSIONS)
        return Refused(
            "unsupported format", f"{image}: {kind} is not a format the loader reads ({readable})"
        )
    return Refused(
        "unreadable image", f"{image}: the training loader cannot decode it (corrupt or truncated?)"
    )


def described(where):
    return f"row {where['row']}" if "row" in where else where["file"]


# ------------------------------------------------------------------ the shards


def check_out_dir(out_dir, source):
    """out_dir may be new, empty, or a folder prepare.py wrote (its report and shards, nothing else)."""
    inside = os.path.realpath(out_dir) + os.sep
    if os.path.isdir(source) and inside.startswith(os.path.realpath(source) + os.sep):
        raise ValueError(
            f"--out_dir={out_dir} is inside {source}: its shards would be read as input next time"
        )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir={out_dir} is a file, not a folder")
    names = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    foreign = [n for n in names if n != REPORT and not re.fullmatch(SHARD_PATTERN, n)]
    if names and (REPORT not in names or foreign):
        why = (
            f"files prepare.py did not write ({', '.join(foreign[:3])})"
            if foreign
            else f"no {REPORT}"
        )
        raise ValueError(f"--out_dir={out_dir} exists and holds {why}: give a new or empty folder")


def write_shards(entries, folder, shard_size):
    """Every entry's pair into folder/train-NNNNNN.tar, shard_size a shard, in entry order -> (shards,
    refusals). One image in memory at a time; fixed tar metadata (mtime 0), so the same input gives the same
    bytes."""
    shards, refusals, sink = {}, [], None
    try:
        for number, sample in accepted(entries, refusals):
            if sum(shards.values()) % shard_size == 0:
                if sink is not None:
                    sink.close()
                name = SHARD.format(len(shards))
                sink = wds.TarWriter(os.path.join(folder, name), encoder=False, mtime=0)
                shards[name] = 0
            sink.write({"__key__": f"{number:09d}", **sample})
            shards[name] += 1
    except BaseException:
        if sink is not None:
            release(sink)
        raise
    if sink is not None:
        sink.close()
    return shards, refusals


def accepted(entries, refusals):
    """(key number, sample) of each entry the training loader decodes; the others go to `refusals` with the reason."""
    written = {}  # sample digest -> where it was first written
    for entry in tqdm.tqdm(entries, unit="pair", desc="prepare"):
        try:
            if "refused" in entry:
                raise entry["refused"]
            sample = read_pair(entry["image"], entry["caption"])
            digest = data.sample_digest(sample)
            if digest in written:
                raise Refused(
                    "duplicate", f"the same image bytes and caption as {described(written[digest])}"
                )
        except Refused as refusal:
            refusals.append({**entry["where"], "reason": refusal.reason, "detail": refusal.detail})
            continue
        written[digest] = entry["where"]
        yield entry["number"], sample


def release(sink):
    """A shard whose write failed (a full disk): its file let go, its own flush errors dropped (the first
    one is reported), so nothing tries again at exit."""
    for stream in (sink.tarstream, sink.stream):
        with contextlib.suppress(OSError):
            stream.close()


def prepare(
    source, out_dir, img_key="filepath", caption_key="title", separator="", shard_size=1000
):
    """Write the shards of source (a CSV or a folder) into out_dir -> the report (also out_dir/REPORT)."""
    if shard_size < 1:
        raise ValueError(f"--shard_size={shard_size}: expected a positive number of pairs")
    # 'shards/' -> 'shards': the temporary folder goes beside it, not inside
    out_dir = os.path.normpath(out_dir)
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such CSV file or folder")
    check_out_dir(out_dir, source)
    settings = dict(shard_size=shard_size)
    if os.path.isdir(source):
        mode, entries = "folder", folder_entries(source)
    else:
        separator, entries = csv_entries(source, img_key, caption_key, separator)
        mode = "csv"
        settings.update(img_key=img_key, caption_key=caption_key, separator=separator)
    report = dict(source=os.path.abspath(source), mode=mode, settings=settings)
    try:
        with configurator.atomic_path(out_dir) as tmp:
            os.makedirs(tmp)
            write_folder(tmp, entries, report, source, shard_size)
    except OSError as error:  # a full disk: one line, the folder as it was
        raise ValueError(
            f"{out_dir}: cannot write the shards ({error.strerror or error}); the folder is left as it was"
        ) from None
    print_summary(report, out_dir)
    return report


def write_folder(folder, entries, report, source, shard_size):
    """The shards and the report into `folder`; the report gets the counts. No pair at all is an error."""
    shards, refusals = write_shards(entries, folder, shard_size)
    counts = {reason: sum(r["reason"] == reason for r in refusals) for reason in REASONS}
    report.update(written=sum(shards.values()), refused=len(refusals), refused_by_reason=counts)
    report.update(shards=shards, refusals=refusals)
    if not shards:  # nothing to train on: out_dir is left as it was
        first = f"; first: {described(refusals[0])}: {refusals[0]['detail']}" if refusals else ""
        raise ValueError(
            f"{source}: no pair written, {len(refusals)} refused{summary_counts(report)}{first}"
        )
    configurator.write_atomic(
        os.path.join(folder, REPORT), json.dumps(report, indent=1, ensure_ascii=False)
    )


def summary_counts(report):
    counts = ", ".join(
        f"{count} {reason}" for reason, count in report["refused_by_reason"].items() if count
    )
    return f" ({counts})" if counts else ""


def print_summary(report, out_dir):
    shards = report["shards"]
    print(
        f"prepare.py: {report['source']} -> {out_dir}: {report['written']} pairs in {len(shards)} shards, "
        f"{report['refused']} refused{summary_counts(report)}"
    )
    for reason in REASONS:
        examples = [r for r in report["refusals"] if r["reason"] == reason]
        if examples:
            more = f" (and {len(examples) - 1} more)" if len(examples) > 1 else ""
            print(f"  {reason}: {described(examples[0])}: {examples[0]['detail']}{more}")
    print(f"wrote {os.path.join(out_dir, REPORT)} (every refusal with its reason)")


def main(arguments):
    config = configurator.configure(dict(DEFAULTS), arguments, positional="source")
    if not config["source"] or not config["out_dir"]:
        raise SystemExit(
            "usage: python -m tools.prepare PAIRS.csv|FOLDER --out_dir=DIR [--shard_size=1000 ...]"
        )
    with configurator.user_errors("prepare.py"):
        return prepare(**config)


if __name__ == "__main__":
    main(sys.argv[1:])
