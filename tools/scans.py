"""Your scans as the models see them: images of any bit depth, DICOM as ultrasound scanners write it, and
video clips, read one frame at a time with the calibration each file carries. predict.py, evaluate.py --task
and analysis.py --probe read through it; run it alone to check a folder before a model sees it:

    python -m tools.scans exports/                          # per file: frames, colour, views, pixel size, or why not
    python -m tools.scans exports/ --save_frames=frames/    # every view of every frame as an 8-bit PNG, to look at

What is read (DICOM PS3.3 C.7.6.3 and C.8.5.5; pydicom decodes, with Pillow's JPEG Baseline and JPEG 2000 codecs):
- Files and folders (recursively, sorted; linked folders followed, each real folder and file read once, a loop, a
  second link or name and hidden folders listed as ignored). Images by extension (PNG, JPEG, TIFF, BMP, WebP, GIF;
  every page of a multi-page file), video clips by extension (MP4, AVI, MOV, M4V, MKV, WebM; PyAV), DICOM by
  content (the 'DICM' marker, any extension; a DICOMDIR, an export's index, is ignored). Other files are listed
  as ignored; a scan that cannot be read is skipped with its reason.
- Colour as the file means it: pydicom returns YBR (JPEG Baseline's YBR_FULL_422, JPEG 2000's YBR_RCT / YBR_ICT) as
  RGB, converted once; PALETTE COLOR goes through its lookup tables (pydicom's apply_color_lut); MONOCHROME1 is
  inverted; every bit depth other than 8 scales by BitsStored (1 -> 255, 63 of 6 bits -> 255, 4095 of 12 bits -> 255),
  never clipped (data.scale_to_8bit); signed pixels shift by half their range. A photometric the data cannot carry
  (JPEG 2000's YBR_RCT / YBR_ICT on other data, a YBR pydicom does not convert) is refused.
- A view under MIN_SIDE pixels of the file on a side (a 1x1 image, a region 2 px wide) shows no anatomy: skipped
  with its reason, never classified. A header promising more frames than the data holds: the frames held are read,
  then the file is reported with both counts.
- Views and calibration: the 2D tissue regions of SequenceOfUltrasoundRegions (RegionSpatialFormat 1, RegionDataType
  1) are the views (a dual view gives two per frame), each cropped to its box, with its pixel size when the region is
  in cm (PhysicalUnits 3) and square; Doppler, M-mode and other regions are left out. Regions that do not fit the
  pixel array (the file was resized after calibration) are not trusted: the whole frame, no pixel size, and why.
  PixelSpacing is used only where no region exists; `pixel_size` (mm) only for files that carry no calibration.
"""

import dataclasses
import io
import math
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

import configurator
import data
import protocol

DEFAULTS = {  # python -m tools.scans PATH [PATH ...] --key=value
    "paths": [],  # the files and folders: the arguments
    "pixel_size": -1.0,  # mm per pixel for files that carry no calibration; -1 = none
    "save_frames": "",  # a folder: write every view of every frame there as PNG
}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".m4v", ".mkv", ".webm")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
REGION_FORMATS = {1: "2D", 2: "M-mode", 3: "spectral Doppler", 4: "waveform", 5: "graphics"}
REGION_TYPES = {
    1: "tissue",
    2: "colour flow",
    3: "PW Doppler",
    4: "CW Doppler",
    5: "Doppler mean trace",
}
CM = 3  # PhysicalUnitsX/YDirection code of centimetres (PS3.3 C.8.5.5.1.15)
SQUARE = 0.01  # largest relative difference of a pixel's width and height still taken as square
MIN_SIDE = 16  # px of the file: a view narrower or lower than this shows no anatomy (the smallest synthetic scan)
# photometrics defined only for JPEG 2000 data, whose decoder undoes them (PS3.3 C.7.6.3.1.2)
JPEG_2000_ONLY = ("YBR_RCT", "YBR_ICT")
YBR_CONVERTED = ("YBR_FULL", "YBR_FULL_422")  # the YBR that pydicom converts to RGB itself
TASK_FILES = (
    "prompts.json",
    "patients.csv",
)  # what a labelled folder may hold beside its class folders


class Unreadable(ValueError):
    """A file or frame that cannot be read, with the reason as the message."""


@dataclasses.dataclass
class View:
    """One view of one frame, as the models get it."""

    file: str
    frame: int  # 0-based
    region: int  # the tissue region's index in SequenceOfUltrasoundRegions; -1 = the whole frame
    image: Image.Image  # 'L' or 'RGB', 8-bit, cropped to the region
    pixel_size_mm: float | None  # mm per pixel of `image`; None = unknown (spacing_note says why)
    spacing_source: str  # 'ultrasound region N', 'PixelSpacing', 'given' (pixel_size) or ''
    spacing_note: str  # why there is no pixel size, or why the crop is not trusted
    seconds: float | None  # the frame's time in a clip
    pixels: str  # how the stored values became these 8-bit colours


# ------------------------------------------------------------------ finding the scans


def classify(path):
    """-> 'image' | 'video' | 'dicom', or raises Unreadable (a scan that cannot be read) / NotAScan."""
    name, suffix = os.path.basename(path), Path(path).suffix.lower()
    if name.startswith("._"):
        raise Unreadable("a macOS resource-fork file (AppleDouble), not a scan")
    if name.upper() == "DICOMDIR":  # PS3.10 names the index of removable media so
        raise NotAScan("a DICOMDIR, the index of a DICOM export: its scans are the files beside it")
    if os.path.getsize(path) == 0:
        raise Unreadable("empty file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM" or suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    raise NotAScan("not an image, video or DICOM file")


class NotAScan(ValueError):
    pass


def walk(folder, ignored, skipped, excluded):
    """Every file under `folder`, sorted. Linked folders are followed, each real folder once: one reached
    again (a loop, or a second link to it) is added to `ignored` with where it was read, as are hidden
    folders (.git ...) and the `excluded` ones ({real path: why}); a folder that cannot be listed is added
    to `skipped` with the reason."""
    read = {os.path.realpath(folder): folder}

    def cannot_list(error):
        skipped.append((error.filename, f"cannot list the folder ({error.strerror or error})"))

    for root, folders, files in os.walk(folder, onerror=cannot_list, followlinks=True):
        kept = []
        for name in sorted(folders):
            path, real = os.path.join(root, name), os.path.realpath(os.path.join(root, name))
            if name.startswith("."):
                ignored.append((path, "a hidden folder, not read"))
            elif real in excluded:
                ignored.append((path, excluded[real]))
            elif real in read:
                ignored.append(
                    (path, f"the same folder as {escaped(read[real])} (a link), read there once")
                )
            else:
                read[real] = path
                kept.append(name)
        folders[:] = kept
        yield from (os.path.join(root, f) for f in sorted(files))


def find(paths, exclude=None):
    """Files and folders -> (scans [(path, kind)], ignored [(path, why)], skipped [(path, why)]); folders
    are read recursively in sorted order, linked folders followed (walk). A file reached twice (named
    twice, or again through a link) is read once and listed as ignored where it is reached again, so no
    clip holds its frames twice. `exclude` {folder: why} leaves folders out, listed as ignored (predict.py's
    own outputs, when they lie inside a folder it reads)."""
    scans, ignored, skipped = [], [], []
    excluded = {os.path.realpath(folder): why for folder, why in (exclude or {}).items()}
    read_as = {}  # real path -> the path it was read as
    for item in paths:
        if not os.path.exists(item):
            skipped.append((item, "not found"))
            continue
        why_excluded = excluded.get(os.path.realpath(item))
        if why_excluded:
            ignored.append((item, why_excluded))
            continue
        files = walk(item, ignored, skipped, excluded) if os.path.isdir(item) else [item]
        for path in files:
            real = os.path.realpath(path)
            if real in read_as:
                ignored.append(
                    (path, f"the same file as {escaped(read_as[real])}, read there once")
                )
                continue
            read_as[real] = path
            try:
                scans.append((path, classify(path)))
            except NotAScan as why:
                ignored.append((path, str(why)))
            except (Unreadable, OSError) as why:
                skipped.append((path, str(why)))
    return scans, ignored, skipped


def labelled(folder, classes):
    """A folder of labelled scans, one sub-folder per class (its name one of `classes`) -> (files [(path,
    kind)], labels (class indices), skipped, ignored). A sub-folder that is no class is an error naming it;
    files beside the class folders other than TASK_FILES are ignored; the same scan twice (by content) is an
    error naming both."""
    class_folders = sorted(
        p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    unknown = [p.name for p in class_folders if p.name not in classes]
    if unknown or not class_folders:
        found = f"folders {unknown} are not classes" if unknown else "no class folder"
        raise ValueError(f"{folder}: {found}; expected one sub-folder per class among {classes}")
    loose = [p for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name not in TASK_FILES]
    files, labels, skipped, ignored = [], [], [], [(str(p), "not in a class folder") for p in loose]
    for class_folder in class_folders:
        found, not_scans, unreadable = find([str(class_folder)])
        files += found
        labels += [classes.index(class_folder.name)] * len(found)
        ignored, skipped = ignored + not_scans, skipped + unreadable
    if not files:
        raise ValueError(
            f"{folder}: no scan in its class folders {[p.name for p in class_folders]}"
        )
    twice = same_content([path for path, _ in files])
    if twice:
        raise ValueError(
            f"{folder}: {twice[0]} and {twice[1]} hold the same scan (the same bytes: a copy or a link); "
            "a scan is counted once, in one class folder"
        )
    return files, labels, skipped, ignored


def same_content(paths):
    """The first two files with the same bytes, or None: sizes compared first, sha256 only where sizes agree."""
    by_size = {}
    for path in paths:
        by_size.setdefault(os.path.getsize(path), []).append(path)
    first_with = {}
    for same_size in (group for group in by_size.values() if len(group) > 1):
        for path in same_size:
            digest = configurator.file_sha256(path)
            if digest in first_with:
                return first_with[digest], path
            first_with[digest] = path
    return None


def evenly_spaced(count, k):
    """k frame indices spread evenly over `count` frames (all of them when there are fewer): a clip's 16 frames."""
    return (
        sorted({round(i * (count - 1) / max(k - 1, 1)) for i in range(k)})
        if count > k
        else list(range(count))
    )


# ------------------------------------------------------------------ reading


def read(path, kind, pixel_size=-1.0, indices=None):
    """Views of one file, frame by frame (bounded memory); `indices` keeps only those frames. Raises
    Unreadable, possibly after some views: the caller keeps those and reports the rest."""
    reader = {"image": image_views, "dicom": dicom_views, "video": video_views}[kind]
    given = pixel_size if pixel_size > 0 else None
    try:
        for view in reader(path, given, None if indices is None else set(indices)):
            check_size(*view.image.size, "the frame")
            yield view
    except Unreadable:
        raise
    except Exception as error:  # decoders raise many types; the file is skipped with the reason
        raise Unreadable(one_line(error)) from None


def check_size(width, height, what):
    """A view too small to show anatomy (a 1x1 image, a region 2 px wide) is never classified."""
    if min(width, height) < MIN_SIDE:
        raise Unreadable(
            f"{what} is {width}x{height} px, too small to show anatomy "
            f"(a view needs {MIN_SIDE} px or more on each side, in pixels of the file)"
        )


def count_frames(path, kind):
    """Frames in a file, without decoding them (a clip without a frame count in its header is decoded once);
    Unreadable when the file cannot tell."""
    try:
        return frames_in(path, kind)
    # readers raise many types; the caller skips the file with the reason
    except Exception as error:
        raise Unreadable(one_line(error)) from None


def frames_in(path, kind):
    if kind == "dicom":
        import pydicom

        return int(
            pydicom.dcmread(path, stop_before_pixels=True, force=True).get("NumberOfFrames") or 1
        )
    if kind == "image":
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1)
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        return stream.frames or sum(1 for _ in container.decode(stream))


def one_line(error):
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {' '.join(lines)[:300]}" if lines else type(error).__name__


def given_size(given):
    """(mm, source, why not) of a file that carries no calibration: the size the user gave, if any."""
    return (
        (given, "given", "")
        if given
        else (None, "", "the file carries no calibration (give pixel_size)")
    )


def uncalibrated(path, frame, image, given, seconds=None, pixels=""):
    return View(path, frame, -1, image, *given_size(given), seconds, pixels)


def image_views(path, given, indices):
    with Image.open(path) as image:
        for frame, page in enumerate(ImageSequence.Iterator(image)):
            if indices is None or frame in indices:
                page.load()
                converted, note = data.to_8bit(page)
                yield uncalibrated(path, frame, converted.copy(), given, pixels=note or page.mode)


def video_views(path, given, indices):
    import av  # PyAV: imported only when a clip is read

    with av.open(path) as container:
        if not container.streams.video:
            raise Unreadable("no video stream")
        for frame, decoded in enumerate(container.decode(video=0)):
            if indices is None or frame in indices:
                yield uncalibrated(
                    path, frame, decoded.to_image(), given, decoded.time, "video frame as RGB"
                )


# ------------------------------------------------------------------ DICOM


def dicom_views(path, given, indices):
    """Each frame of a DICOM file, decoded one at a time, as its views."""
    import pydicom

    # malformed tags: read anyway
    warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")
    dataset = pydicom.dcmread(path, defer_size="256 KB", force=True)
    if len(dataset) == 0:
        raise Unreadable(
            "no data set after the file meta information (a truncated or damaged file)"
        )
    if not any(k in dataset for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = getattr(dataset.get("SOPClassUID"), "name", "") or "no SOP class"
        raise Unreadable(f"no pixel data ({kind})")
    check_decoder(dataset)
    check_photometric(dataset)
    promised, rows, columns = int(dataset.get("NumberOfFrames") or 1), dataset.Rows, dataset.Columns
    frames = min(promised, frames_held(path, dataset, promised))
    views = calibrated_views(dataset, rows, columns, given)
    to_rgb, pixels = colour(dataset)
    frame_time = seconds_per_frame(dataset)
    wanted = None if indices is None else sorted(i for i in indices if i < frames)
    numbers = range(frames) if wanted is None else wanted  # of the frames decoded, in order
    arrays = pillow_rgb_frames(path, dataset, frames, wanted) or pydicom_frames(
        path, dataset, wanted
    )
    read = 0
    for frame, array in zip(numbers, arrays):
        image = Image.fromarray(to_rgb(array))
        seconds = None if frame_time is None else frame * frame_time
        for region, box, size, source, note in views:
            crop = image if box is None else image.crop(box)
            yield View(path, frame, region, crop, size, source, note, seconds, pixels)
        read += 1
    if read < len(numbers):  # compressed data holding fewer frames than its header says
        frames = numbers[read]
    if frames < promised:  # the views of the frames held are kept; the file is reported
        raise Unreadable(
            f"the header promises {promised} frames (NumberOfFrames) and the data holds {frames}"
        )


def pydicom_frames(path, dataset, wanted):
    """pydicom's decoding of the `wanted` frames (None: all), read from the file one at a time (bounded
    memory), or from the data set already read where the file cannot be read frame by frame: a deflated file
    (inflated only in memory), encapsulated data whose offset table pydicom's frame reader rejects, and
    native YBR_FULL_422, whose frames pydicom's frame reader miscounts (3 bytes a pixel, not 2) but its
    whole-array decoding reads right."""
    from pydicom.pixels import iter_pixels
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    syntax = transfer_syntax(dataset)
    native = syntax is not None and not syntax.is_compressed
    if dataset.get("PhotometricInterpretation") == "YBR_FULL_422" and native:
        array = dataset.pixel_array  # (frames, H, W, 3), or (H, W, 3) for one frame
        frames = array if int(dataset.get("NumberOfFrames") or 1) > 1 else array[None]
        yield from (frames[i] for i in (range(len(frames)) if wanted is None else wanted))
        return
    if syntax == DeflatedExplicitVRLittleEndian:
        yield from iter_pixels(dataset, indices=wanted)
        return
    from_file = iter_pixels(path, indices=wanted)
    try:
        first = next(from_file)
    except StopIteration:
        return
    except ValueError:
        yield from iter_pixels(dataset, indices=wanted)
        return
    yield first
    yield from from_file


def transfer_syntax(dataset):
    """The file's TransferSyntaxUID (a pydicom UID: .is_compressed, .name), or None where it has no file meta."""
    return dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None


def frames_held(path, dataset, promised):
    """How many whole frames uncompressed pixel data holds (the bytes the file holds of it, read from its
    header and the file's size); compressed data counts as `promised` (dicom_views counts the frames its
    decoder gives)."""
    syntax = transfer_syntax(dataset)
    if "PixelData" not in dataset or (syntax is not None and syntax.is_compressed):
        return promised
    samples = int(dataset.get("SamplesPerPixel") or 1)
    if dataset.get("PhotometricInterpretation") == "YBR_FULL_422":
        samples = 2  # 4:2:2 stores two values a pixel: Y for each, Cb and Cr for each pair (PS3.3 C.7.6.3.1.2)
    frame_bits = dataset.Rows * dataset.Columns * samples * int(dataset.BitsAllocated)
    return bytes_held(path, dataset) * 8 // frame_bits if frame_bits else promised


def bytes_held(path, dataset):
    """The bytes of PixelData in the file: what its header says, or less where the file ends first."""
    element = dataset.get_item("PixelData")
    if getattr(element, "value", None) is not None:  # read already: pydicom read what the file held
        return len(element.value)
    # deferred: a RawDataElement knows its length and where its value starts without reading it
    return max(0, min(element.length, os.path.getsize(path) - element.value_tell))


JPEG_BASELINE = "1.2.840.10008.1.2.4.50"  # the transfer syntax of JPEG Baseline (Process 1), 8 bits
# the photometric interpretations whose JPEG frames libjpeg converts to RGB as pydicom's decoding does
PILLOW_YBR = ("YBR_FULL", "YBR_FULL_422")
PIXEL_DATA = 0x7FE00010  # (7FE0,0010): the encapsulated frames


def pillow_rgb_frames(path, dataset, frames, wanted):
    """JPEG Baseline YBR frames decoded by Pillow (libjpeg) straight to RGB, one at a time, or None where
    pydicom decodes (every other syntax and photometric). On every such real file of pydicom's (4:4:4 and
    4:2:2, among them a 30-frame ultrasound cine) the pixels are pydicom's bit for bit
    (tests/test_scans.py), in a fifth of the time: pydicom's frames of that cine took 10 ms each, Pillow's
    1.9 ms, on 2 loaded cores. JPEG coded in RGB stays with pydicom, which reads the photometric
    interpretation that Pillow does not (Pillow would convert it as YCbCr)."""
    syntax = transfer_syntax(dataset)
    photometric = str(dataset.get("PhotometricInterpretation", ""))
    offset = getattr(dataset.get_item(PIXEL_DATA), "value_tell", None)  # where the file holds them
    if syntax != JPEG_BASELINE or photometric not in PILLOW_YBR or offset is None:
        return None
    if dataset.get("SamplesPerPixel") != 3:
        return None
    return decoded_by_pillow(path, offset, frames, wanted)


def decoded_by_pillow(path, offset, frames, wanted):
    """The encapsulated JPEG frames read from `offset` one by one (bounded memory) -> (H, W, 3) uint8 arrays
    of the `wanted` frames (None = all)."""
    from pydicom.encaps import generate_frames

    keep = set(range(frames) if wanted is None else wanted)
    with open(path, "rb") as file:
        file.seek(offset)
        for index, encoded in enumerate(generate_frames(file, number_of_frames=frames)):
            if index in keep:
                with Image.open(io.BytesIO(encoded)) as image:
                    yield np.asarray(image.convert("RGB"))


def check_decoder(dataset):
    """A compressed transfer syntax whose decoder is missing: say which and what decodes it."""
    from pydicom.pixels import get_decoder

    syntax = transfer_syntax(dataset)
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise Unreadable(f"{syntax.name} ({syntax}): pydicom has no decoder for it") from None
    if not decoder.is_available:
        options = "; ".join(decoder.missing_dependencies)
        raise Unreadable(
            f"{syntax.name} ({syntax}): no decoder installed; pydicom decodes it with {options}"
        )


def check_photometric(dataset):
    """A colour space the pixel data cannot carry: JPEG 2000's YBR_RCT / YBR_ICT on other data (the decoder
    that would undo them never runs, so the pixels would stay as stored), or YBR that pydicom does not
    convert."""
    from pydicom.uid import JPEG2000TransferSyntaxes

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    syntax = transfer_syntax(dataset)
    if photometric in JPEG_2000_ONLY and syntax not in JPEG2000TransferSyntaxes:
        carried = syntax.name if syntax is not None else "without a transfer syntax"
        raise Unreadable(
            f"PhotometricInterpretation {photometric} is defined only for JPEG 2000 data, but the file is "
            f"{carried}: the stored values cannot be read as {photometric}"
        )
    if photometric.startswith("YBR") and photometric not in JPEG_2000_ONLY + YBR_CONVERTED:
        raise Unreadable(
            f"PhotometricInterpretation {photometric}: pydicom does not convert it to RGB"
        )


def colour(dataset):
    """-> (function: a decoded frame -> (H, W) or (H, W, 3) uint8, description)."""
    from pydicom.pixels import apply_color_lut

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    bits = int(dataset.get("BitsStored") or dataset.get("BitsAllocated") or 8)
    if photometric == "PALETTE COLOR":
        first, entries = (
            dataset.RedPaletteColorLookupTableDescriptor[1],
            dataset.RedPaletteColorLookupTableDescriptor[0],
        )
        table = apply_color_lut(np.arange(first, first + (entries or 65536)), dataset)
        # some write 8-bit values in 16
        lut_bits = 16 if table.dtype == np.uint16 and table.max() > 255 else 8

        def through_palette(array):
            return data.scale_to_8bit(apply_color_lut(array, dataset)[..., :3], lut_bits)[0]

        return through_palette, f"PALETTE COLOR through its {lut_bits}-bit lookup tables"
    signed = int(dataset.get("PixelRepresentation") or 0) == 1

    def to_rgb(array):
        if signed and np.issubdtype(array.dtype, np.signedinteger):
            array = array.astype(np.int64) + 2 ** (bits - 1)  # -> 0 .. 2**bits - 1
        if array.dtype == np.uint8 and bits < 8:
            array = array.astype(np.uint16)  # 1 or 6 bits in a byte: scaled as 12 and 16 bits are
        scaled = data.scale_to_8bit(array, bits if np.issubdtype(array.dtype, np.integer) else 0)[0]
        return 255 - scaled if photometric == "MONOCHROME1" else scaled

    how = {"MONOCHROME1": "MONOCHROME1 inverted", "RGB": "RGB"}.get(photometric, photometric)
    if photometric.startswith("YBR"):
        by = "the JPEG 2000 decoder" if photometric in JPEG_2000_ONLY else "pydicom"
        how = f"{photometric} -> RGB ({by}, once)"
    if "PixelData" not in dataset:  # FloatPixelData or DoubleFloatPixelData
        return (
            to_rgb,
            how + ", float: [0, 1] x 255, [0, 255] kept, any other range stretched per frame",
        )
    return to_rgb, how + (f", {bits}-bit scaled to 8" if bits != 8 else "")


def seconds_per_frame(dataset):
    if dataset.get("FrameTime"):
        return float(dataset.FrameTime) / 1000  # ms
    if dataset.get("CineRate"):
        return 1 / float(dataset.CineRate)  # frames per second
    return None


def calibrated_views(dataset, rows, columns, given):
    """-> [(region, crop box or None, pixel size mm or None, its source, why not)]: the views of each frame."""
    regions = list(dataset.get("SequenceOfUltrasoundRegions") or [])
    if not regions:
        return [(-1, None, *pixel_spacing(dataset, given))]
    tissue = [
        (i, r)
        for i, r in enumerate(regions)
        if r.get("RegionSpatialFormat") == 1 and r.get("RegionDataType") == 1
    ]
    if not tissue:
        found = ", ".join(describe_region(r) for r in regions)
        raise Unreadable(f"no 2D tissue region to classify (regions: {found})")
    views, too_small = [], []
    for index, region in tissue:
        x0, y0, x1, y1 = (
            int(region.get(k, -1))
            for k in (
                "RegionLocationMinX0",
                "RegionLocationMinY0",
                "RegionLocationMaxX1",
                "RegionLocationMaxY1",
            )
        )
        if not (0 <= x0 <= x1 < columns and 0 <= y0 <= y1 < rows):
            where = f"region {index} spans x {x0}-{x1}, y {y0}-{y1} outside the {columns}x{rows} pixel array"
            note = f"calibration not trusted: {where} (resized after calibration?): whole frame, no pixel size"
            return [(-1, None, None, "", note)]
        try:
            check_size(x1 - x0 + 1, y1 - y0 + 1, f"tissue region {index}")
        except Unreadable as why:
            too_small.append(str(why))
            continue
        size, why = region_pixel_size(region)
        source = f"ultrasound region {index}" if size else ""
        views.append((index, (x0, y0, x1 + 1, y1 + 1), size, source, why))
    if not views:
        raise Unreadable("; ".join(too_small))
    left_out = [f"left out: {why}" for why in too_small]  # said in each kept view's note
    return [(*view[:4], "; ".join(filter(None, [view[4], *left_out]))) for view in views]


def describe_region(region):
    spatial, kind = region.get("RegionSpatialFormat"), region.get("RegionDataType")
    return f"{REGION_FORMATS.get(spatial, spatial)} {REGION_TYPES.get(kind, kind)}"


def region_pixel_size(region):
    """-> (mm per pixel or None, why not): PhysicalDeltaX/Y in cm when both units are cm and the pixel is square."""
    units = (region.get("PhysicalUnitsXDirection"), region.get("PhysicalUnitsYDirection"))
    if units != (CM, CM):
        return None, f"region units {units} are not cm (3): no pixel size"
    return square_pixel(
        10 * float(region.get("PhysicalDeltaX", 0)), 10 * float(region.get("PhysicalDeltaY", 0))
    )


def pixel_spacing(dataset, given):
    """-> (mm, source, note) for a file without regions: PixelSpacing (row, column) else the given size."""
    spacing = dataset.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        size, why = square_pixel(float(spacing[1]), float(spacing[0]))
        return size, "PixelSpacing" if size else "", why
    return given_size(given)


def square_pixel(width, height):
    """A pixel's size in mm, when it is plausible and square."""
    low, high = protocol.PIXEL_SIZE_RANGE_MM
    if not all(math.isfinite(v) and low <= v <= high for v in (width, height)):
        return (
            None,
            f"implausible pixel size {width:g} x {height:g} mm (expected {low:g}-{high:g} mm)",
        )
    if abs(width - height) > SQUARE * max(width, height):
        return None, f"pixels are not square ({width:.4g} x {height:.4g} mm): no single pixel size"
    return (width + height) / 2, ""


# ------------------------------------------------------------------ command line


def escaped(path):
    """A path as text (JSON, CSV, a terminal): a name that is not UTF-8 (Python holds its bytes as lone
    surrogates) gets each such byte as \\xNN and its own backslashes doubled, so codecs.escape_decode gives
    back its bytes; a UTF-8 name stays as it is."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def frame_name(path, frame, region, taken):
    """A file name for one view of one frame (frame None: for the whole file), unique within `taken` (a set
    it is added to)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).as_posix().lstrip("./")) or "scan"
    name = (
        stem + ("" if frame is None else f"_f{frame:04d}") + (f"_r{region}" if region >= 0 else "")
    )
    unique, n = name, 1
    while unique in taken:
        n += 1
        unique = f"{name}-{n}"
    taken.add(unique)
    return unique + ".png"


def describe(path, kind, views, save_frames="", taken=None):
    """Read every view of a file (saving each as PNG into save_frames) -> one line saying what was read."""
    first, frames, sizes, regions = None, set(), set(), set()
    for view in views:
        first = first or view
        frames.add(view.frame)
        regions.add(view.region)
        sizes.add(
            f"{view.pixel_size_mm:.4f} mm ({view.spacing_source})" if view.pixel_size_mm else "none"
        )
        if save_frames:
            target = os.path.join(save_frames, frame_name(path, view.frame, view.region, taken))
            with configurator.atomic_path(target) as tmp:
                view.image.save(tmp, format="PNG")
    if first is None:
        return f"{escaped(path)}: no frames"
    shape = "whole frame" if regions == {-1} else f"regions {sorted(regions)}"
    size = f"{first.image.width}x{first.image.height} {first.image.mode}"
    text = f"{escaped(path)}: {kind}, {len(frames)} frames, {size}, {first.pixels}; {shape}; "
    text += f"pixel size {', '.join(sorted(sizes))}"
    return text + (f"; {first.spacing_note}" if first.spacing_note else "")


def main(arguments):
    config = configurator.configure(dict(DEFAULTS), arguments, rest="paths")
    if not config["paths"]:
        raise SystemExit(
            "usage: python -m tools.scans PATH [PATH ...] [--pixel_size=MM] [--save_frames=DIR]"
        )
    with configurator.user_errors("scans.py"):
        if config["pixel_size"] != -1:
            protocol.check_pixel_size(config["pixel_size"], "--pixel_size")
        if config["save_frames"]:
            configurator.check_folder(config["save_frames"], "--save_frames")
    found, ignored, skipped = find(config["paths"])
    if config["save_frames"]:
        os.makedirs(config["save_frames"], exist_ok=True)
    taken, read_files = set(), 0
    for path, kind in found:
        try:
            print(
                describe(
                    path, kind, read(path, kind, config["pixel_size"]), config["save_frames"], taken
                )
            )
            read_files += 1
        except Unreadable as why:
            skipped.append((path, str(why)))
        except OSError as error:  # writing a frame: a full disk is one line
            raise SystemExit(
                f"scans.py: {config['save_frames']}: cannot write the frames ({error.strerror})"
            ) from None
    for path, why in skipped:
        print(f"skipped {escaped(path)}: {why}")
    for path, why in ignored:
        print(f"ignored {escaped(path)}: {why}")
    print(f"{read_files} scans read, {len(skipped)} skipped, {len(ignored)} ignored")
    return found, ignored, skipped


if __name__ == "__main__":
    main(sys.argv[1:])
