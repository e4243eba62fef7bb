"""scans.py: scans read as their files mean them, checked against pydicom's own decoding of real scanner
files (its test files: a SonoSite cine in YBR_FULL_422 JPEG Baseline, a 16-bit PALETTE COLOR still, JPEG
2000, big-endian RGB), DICOM written with pydicom the way scanners write it (dual view with a Doppler strip,
MONOCHROME1 in 12 bits), a clip written with PyAV, and every kind of unreadable file."""

import os
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import data
from tools import scans

PYDICOM_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")


def real(name):
    return os.path.join(PYDICOM_FILES, name)


def views(path, pixel_size=-1.0):
    found, ignored, skipped = scans.find([str(path)])
    assert not ignored and not skipped, (ignored, skipped)
    return list(scans.read(*found[0], pixel_size))


def region(x0, y0, x1, y1, spatial=1, kind=1, delta_cm=0.02, units=3):
    item = Dataset()
    item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = spatial, kind, 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
    item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = units
    item.PhysicalDeltaX = item.PhysicalDeltaY = delta_cm
    return item


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=8, regions=None, **tags):
    """An ultrasound DICOM file as a scanner writes it: file meta, Ultrasound (Multi-frame) Image Storage,
    native little-endian pixels (frames, rows, columns[, 3])."""
    multi = pixels.ndim == (4 if photometric == "RGB" else 3)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = (
        "1.2.840.10008.5.1.4.1.1.3.1" if multi else "1.2.840.10008.5.1.4.1.1.6.1"
    )
    meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = generate_uid(), ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.SOPInstanceUID = (
        meta,
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.PhotometricInterpretation = "US", photometric
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.Rows, ds.Columns = pixels.shape[1 if multi else 0], pixels.shape[2 if multi else 1]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        8 * pixels.itemsize,
        bits_stored,
        bits_stored - 1,
        0,
    )
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    if multi:
        ds.NumberOfFrames, ds.FrameTime = pixels.shape[0], 40.0
    if regions is not None:
        ds.SequenceOfUltrasoundRegions = regions
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_real_ybr_cine_is_converted_to_rgb_once_and_its_misfit_calibration_is_not_trusted():
    # SonoSite: 30 frames, YBR_FULL_422 in JPEG Baseline, regions of 640x480
    path = real("examples_ybr_color.dcm")
    got = views(path)
    raw = pydicom.pixels.pixel_array(path, raw=True)  # the codec's YCbCr, not converted
    assert len(got) == 30 and [v.frame for v in got] == list(range(30))
    for view, ybr in zip(got[::7], raw[::7]):
        expected = convert_color_space(ybr, "YBR_FULL", "RGB")  # one conversion, by pydicom
        assert view.image.mode == "RGB" and np.array_equal(np.asarray(view.image), expected)
        assert not np.array_equal(np.asarray(view.image), ybr)
    assert got[3].seconds == pytest.approx(3 * 0.033333)  # FrameTime 33.333 ms
    # the region box lies outside the 320x240 frames
    assert got[0].region == -1 and got[0].pixel_size_mm is None
    assert "not trusted" in got[0].spacing_note and "x 84-595" in got[0].spacing_note


def test_a_real_16_bit_palette_goes_through_its_lookup_tables():
    path = real("examples_palette.dcm")  # 8-bit indices, 16-bit LUT entries
    (view,) = views(path, pixel_size=0.2)
    ds = pydicom.dcmread(path)
    expected = np.rint(apply_color_lut(ds.pixel_array, ds) / 257).astype(np.uint8)
    assert view.image.mode == "RGB" and np.array_equal(np.asarray(view.image), expected)
    # its regions do not fit either
    assert view.pixel_size_mm is None and "not trusted" in view.spacing_note


@pytest.mark.parametrize(
    "name", ["examples_jpeg2k.dcm", "examples_rgb_color.dcm", "ExplVR_BigEnd.dcm"]
)
def test_real_jpeg2000_rgb_and_big_endian_files_decode_as_pydicom_decodes_them(name):
    (view,) = views(real(name), pixel_size=0.3)
    assert np.array_equal(np.asarray(view.image), pydicom.dcmread(real(name)).pixel_array)
    assert (view.pixel_size_mm, view.spacing_source) == (0.3, "given")  # no calibration in the file


def test_dual_view_regions_crop_each_view_and_leave_the_doppler_strip_out(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 300, 800), dtype=np.uint8)
    regions = [
        region(0, 0, 399, 199),
        region(400, 0, 799, 199, delta_cm=0.025),
        region(0, 200, 799, 299, 3, 3),
    ]
    # no extension
    path = write_dicom(tmp_path / "dual", frames, regions=regions, PixelSpacing=[0.5, 0.5])
    got = views(path, pixel_size=0.9)
    assert [(v.frame, v.region) for v in got] == [(f, r) for f in range(3) for r in (0, 1)]
    for view in got:
        box = (
            (slice(0, 200), slice(0, 400)) if view.region == 0 else (slice(0, 200), slice(400, 800))
        )
        assert np.array_equal(np.asarray(view.image), frames[view.frame][box])
    # cm -> mm; PixelSpacing unused
    assert [v.pixel_size_mm for v in got[:2]] == pytest.approx([0.2, 0.25])
    assert got[1].spacing_source == "ultrasound region 1" and got[1].seconds == 0.0


def test_regions_without_centimetres_or_square_pixels_give_no_pixel_size(tmp_path):
    frame = np.zeros((100, 100), np.uint8)
    (view,) = views(
        write_dicom(tmp_path / "a.dcm", frame, regions=[region(0, 0, 99, 99, units=0)]), 0.3
    )
    # the given size does not override it
    assert view.pixel_size_mm is None and "not cm" in view.spacing_note
    oblong = region(0, 0, 99, 99)
    oblong.PhysicalDeltaY = 0.03
    (view,) = views(write_dicom(tmp_path / "b.dcm", frame, regions=[oblong]))
    assert view.pixel_size_mm is None and "not square" in view.spacing_note
    (view,) = views(write_dicom(tmp_path / "c.dcm", frame, PixelSpacing=[0.4, 0.4]))
    assert (view.pixel_size_mm, view.spacing_source) == (0.4, "PixelSpacing")
    only_doppler = [region(0, 0, 99, 99, spatial=3, kind=3)]
    found, _, _ = scans.find([write_dicom(tmp_path / "d.dcm", frame, regions=only_doppler)])
    with pytest.raises(scans.Unreadable, match="no 2D tissue region .*spectral Doppler PW Doppler"):
        list(scans.read(*found[0]))


def test_monochrome1_in_12_bits_is_inverted_and_scaled_never_clipped(tmp_path):
    stored = np.tile(np.array([[0, 1000, 4095], [2048, 4000, 17]], np.uint16), (8, 6))  # 16 x 18 px
    (view,) = views(write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1", bits_stored=12))
    expected = 255 - np.rint(pydicom.dcmread(tmp_path / "m1.dcm").pixel_array / 4095 * 255).astype(
        np.uint8
    )
    assert view.image.mode == "L" and np.array_equal(np.asarray(view.image), expected)
    assert np.asarray(view.image)[0, 0] == 255  # 0 is white in MONOCHROME1


def test_16_bit_and_float_images_scale_to_the_8_bit_scan(tmp_path):
    scan = np.random.default_rng(1).integers(0, 256, (40, 60), dtype=np.uint8)
    Image.fromarray(scan).save(tmp_path / "scan8.png")
    # how converters export 16 bits
    Image.fromarray(scan.astype(np.uint16) * 257).save(tmp_path / "scan16.png")
    Image.fromarray(scan.astype(np.uint16) * 257).save(tmp_path / "scan16.tif")
    Image.fromarray(scan.astype(np.float32) / 255).save(tmp_path / "scan_float.tif")
    for name in ("scan8.png", "scan16.png", "scan16.tif", "scan_float.tif"):
        (view,) = views(tmp_path / name)
        assert np.array_equal(np.asarray(view.image), scan), name
    # PIL alone clips
    assert Image.open(tmp_path / "scan16.png").convert("RGB").getextrema()[0][1] == 255


def test_a_clip_written_with_pyav_gives_every_frame_in_order(tmp_path):
    import av

    path, levels = str(tmp_path / "loop.mp4"), [20, 60, 100, 140, 180, 220]
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for level in levels:
            frame = av.VideoFrame.from_ndarray(
                np.full((48, 64, 3), level, np.uint8), format="rgb24"
            )
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    got = views(path)
    assert [v.frame for v in got] == list(range(6)) and got[0].image.size == (64, 48)
    # lossy codec: close, in order
    assert np.allclose([np.asarray(v.image).mean() for v in got], levels, atol=3)
    assert got[2].seconds == pytest.approx(2 / 25)


def test_unreadable_files_are_skipped_with_their_reason_and_other_files_listed_as_ignored(tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    shutil.copy(real("test-SR.dcm"), folder / "report.dcm")
    shutil.copy(real("JPEGLSNearLossless_08.dcm"), folder / "IMG0001")  # DICOM without an extension
    good = real("examples_rgb_color.dcm")
    (folder / "truncated.dcm").write_bytes(open(good, "rb").read()[:-5000])
    (folder / "empty.png").write_bytes(b"")
    (folder / "._IMG0002.dcm").write_bytes(b"\0\5\26\7" * 100)
    (folder / "clip.mp4").write_bytes(os.urandom(2000))
    (folder / "notes.txt").write_text("not a scan")
    shutil.copy(good, folder / "good.dcm")
    found, ignored, skipped = scans.find([str(folder)])
    reasons = dict(skipped)
    for path, kind in found:
        try:
            assert list(scans.read(path, kind)), path
        except scans.Unreadable as why:
            reasons[path] = str(why)
    named = {os.path.basename(p): why for p, why in reasons.items()}
    assert sorted(named) == [
        "._IMG0002.dcm",
        "IMG0001",
        "clip.mp4",
        "empty.png",
        "report.dcm",
        "truncated.dcm",
    ]
    assert "no pixel data (Comprehensive SR Storage)" in named["report.dcm"]
    assert (
        "JPEG-LS" in named["IMG0001"]
        and "1.2.840.10008.1.2.4.81" in named["IMG0001"]
        and "pyjpegls" in named["IMG0001"]
    )
    assert "empty file" in named["empty.png"] and "AppleDouble" in named["._IMG0002.dcm"]
    assert (
        named["truncated.dcm"]
        == "the header promises 1 frames (NumberOfFrames) and the data holds 0"
    )
    assert ignored == [(str(folder / "notes.txt"), "not an image, video or DICOM file")]


def test_scale_to_8bit_never_clips_and_says_how():
    assert data.scale_to_8bit(np.array([0, 257, 65535], np.uint16))[0].tolist() == [0, 1, 255]
    assert data.scale_to_8bit(np.array([0, 4095], np.uint16), bits=12)[0].tolist() == [0, 255]
    pixels, note = data.scale_to_8bit(np.array([-1.0, 3.0], np.float32))
    assert pixels.tolist() == [0, 255] and "stretched" in note
    with pytest.raises(ValueError, match="do not fit in 12 bits"):
        data.scale_to_8bit(np.array([5000], np.uint16), bits=12)
    with pytest.raises(ValueError, match="not all finite"):
        data.scale_to_8bit(np.array([np.nan], np.float32))


def read_all(path):
    """-> (the views read, the reason the file was skipped or '')."""
    found, _, skipped = scans.find([str(path)])
    got = []
    try:
        got += scans.read(*found[0])
    except scans.Unreadable as why:
        return got, str(why)
    return got, ""


def test_a_view_too_small_to_show_anatomy_is_skipped_naming_the_threshold_in_file_pixels(tmp_path):
    """Before: a 1x1 PNG or a region 2 px wide got a confident class (lips_nose 0.997)."""
    Image.new("L", (1, 1), 128).save(tmp_path / "dot.png")
    threshold = "(a view needs 16 px or more on each side, in pixels of the file)"
    assert read_all(tmp_path / "dot.png") == (
        [],
        f"the frame is 1x1 px, too small to show anatomy {threshold}",
    )
    frame = np.zeros((100, 160), np.uint8)
    narrow = write_dicom(tmp_path / "narrow.dcm", frame, regions=[region(10, 0, 11, 99)])
    assert read_all(narrow) == (
        [],
        f"tissue region 0 is 2x100 px, too small to show anatomy {threshold}",
    )
    dual = write_dicom(
        tmp_path / "dual.dcm", frame, regions=[region(0, 0, 0, 0), region(20, 0, 99, 99)]
    )
    (view,), why = read_all(dual)
    assert (view.region, view.image.size, why) == (1, (80, 100), "")
    assert view.spacing_note.startswith("left out: tissue region 0 is 1x1 px, too small")


def test_every_bit_depth_scales_by_bits_stored_as_pydicom_decodes_it(tmp_path):
    """Before: BitsAllocated 1 gave a black frame (0 and 1 of 255), 6 bits in a byte stayed 0-63."""
    (view,) = views(real("liver_1frame.dcm"))  # pydicom's own 1-bit file: 0 / 1
    ones = pydicom.dcmread(real("liver_1frame.dcm")).pixel_array
    assert set(np.unique(ones)) == {0, 1} and np.array_equal(np.asarray(view.image), ones * 255)
    assert view.pixels == "MONOCHROME2, 1-bit scaled to 8"
    stored = np.tile(np.arange(64, dtype=np.uint8).reshape(4, 16), (4, 1))  # 16 x 16 px, 0 .. 63
    (view,) = views(write_dicom(tmp_path / "six.dcm", stored, bits_stored=6))
    decoded = pydicom.dcmread(tmp_path / "six.dcm").pixel_array
    assert np.array_equal(np.asarray(view.image), np.rint(decoded / 63 * 255).astype(np.uint8))
    assert np.asarray(view.image).max() == 255 and view.pixels == "MONOCHROME2, 6-bit scaled to 8"


def test_a_photometric_the_data_cannot_carry_is_refused_with_its_reason(tmp_path):
    """Before: YBR_RCT on uncompressed pixels was left as stored, under a note 'YBR_RCT -> RGB (pydicom, once)'."""
    dataset = pydicom.dcmread(real("examples_rgb_color.dcm"))
    dataset.PhotometricInterpretation = "YBR_RCT"
    dataset.save_as(tmp_path / "rct.dcm")
    why = "PhotometricInterpretation YBR_RCT is defined only for JPEG 2000 data, but the file is Explicit VR Little "
    why += "Endian: the stored values cannot be read as YBR_RCT"
    assert read_all(tmp_path / "rct.dcm") == ([], why)
    (view,) = views(real("examples_jpeg2k.dcm"))  # YBR_RCT in JPEG 2000: its decoder undoes it
    assert view.pixels == "YBR_RCT -> RGB (the JPEG 2000 decoder, once)"


def test_linked_folders_are_followed_once_and_loops_listed_as_ignored(tmp_path):
    """Before: the scans of a linked folder appeared nowhere, neither read nor skipped nor ignored."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("L", (20, 20)).save(outside / "a.png")
    folder = tmp_path / "exports"
    (folder / ".cache").mkdir(parents=True)
    (folder / "linked").symlink_to(outside)
    (folder / "linked" / "loop").symlink_to(folder)
    (folder / "again").symlink_to(outside)
    found, ignored, skipped = scans.find([str(folder)])
    assert found == [(str(folder / "again" / "a.png"), "image")] and not skipped
    assert ignored == [
        (str(folder / ".cache"), "a hidden folder, not read"),
        (
            str(folder / "linked"),
            f"the same folder as {folder / 'again'} (a link), read there once",
        ),
        (str(folder / "again" / "loop"), f"the same folder as {folder} (a link), read there once"),
    ]


def test_a_header_promising_more_frames_than_the_data_holds_says_both(tmp_path):
    """Before: skipped with 'cannot reshape array of size 0 ...'."""
    frames = np.random.default_rng(2).integers(0, 256, (3, 20, 30), dtype=np.uint8)
    dataset = pydicom.dcmread(write_dicom(tmp_path / "cine.dcm", frames))
    dataset.NumberOfFrames = 5
    dataset.save_as(tmp_path / "cine.dcm")
    got, why = read_all(tmp_path / "cine.dcm")
    assert why == "the header promises 5 frames (NumberOfFrames) and the data holds 3"
    assert [np.asarray(v.image).tolist() for v in got] == frames.tolist()  # rows for the 3 held


# ------------------------------------------------------------------ JPEG Baseline straight to RGB

PILLOW_YBR_FILES = [  # pydicom's real JPEG Baseline YBR files: (file, photometric, chroma subsampling)
    ("examples_ybr_color.dcm", "YBR_FULL_422", "4:2:2"),  # a 30-frame ultrasound cine
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", "YBR_FULL_422", "4:2:2"),
    ("SC_rgb_dcmtk_+eb+cy+s2.dcm", "YBR_FULL_422", "4:2:2"),
    ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "YBR_FULL", "4:4:4"),
    ("SC_rgb_dcmtk_+eb+cy+n2.dcm", "YBR_FULL", "4:4:4"),
    ("SC_rgb_dcmtk_+eb+cy+s4.dcm", "YBR_FULL", "4:4:4"),
    ("SC_rgb_jpeg_dcmtk.dcm", "YBR_FULL", "4:4:4"),
    ("SC_rgb_jpeg_lossy_gdcm.dcm", "YBR_FULL", "4:4:4"),
    ("SC_rgb_small_odd_jpeg.dcm", "YBR_FULL", "4:4:4"),
]


@pytest.mark.parametrize("name, photometric, subsampling", PILLOW_YBR_FILES)
def test_jpeg_baseline_ybr_frames_decoded_by_pillow_are_pydicoms_bit_for_bit(
    name, photometric, subsampling
):
    from pydicom.pixels import iter_pixels

    dataset = pydicom.dcmread(real(name), defer_size="256 KB", force=True)
    assert dataset.PhotometricInterpretation == photometric
    frames = int(dataset.get("NumberOfFrames") or 1)
    wanted = sorted({0, frames - 1})
    fast = scans.pillow_rgb_frames(real(name), dataset, frames, wanted)
    assert fast is not None  # the fast path is taken
    for ours, reference in zip(fast, iter_pixels(real(name), indices=wanted), strict=True):
        np.testing.assert_array_equal(ours, reference)
    reference = next(iter_pixels(real(name), indices=[0]))
    # the 3x3 file: decoded right, then refused as too small
    if min(reference.shape[:2]) < scans.MIN_SIDE:
        with pytest.raises(scans.Unreadable, match="too small to show anatomy"):
            views(real(name))
        return
    # scans.read's first view
    assert np.array_equal(np.asarray(views(real(name))[0].image), reference)


def test_jpeg_coded_in_rgb_stays_with_pydicom():
    """Pillow takes the components of an RGB-coded JPEG for YCbCr and converts them: pydicom decodes such files."""
    from pydicom.pixels import iter_pixels

    path = real("SC_jpeg_no_color_transform.dcm")
    dataset = pydicom.dcmread(path, force=True)
    assert scans.pillow_rgb_frames(path, dataset, 1, None) is None
    reference = next(iter_pixels(path))
    np.testing.assert_array_equal(np.asarray(views(path)[0].image), reference)


# ------------------------------------------------------------------ found once, read whole, said right


def test_a_file_named_twice_or_reached_again_through_a_link_is_read_once(tmp_path):
    """Before: read twice, so predict.py made a 2-frame clip of one image and doubled a clip's frames."""
    folder = tmp_path / "exports"
    folder.mkdir()
    Image.new("L", (20, 20)).save(folder / "a.png")
    (folder / "b.png").symlink_to(folder / "a.png")
    found, ignored, skipped = scans.find([str(folder), str(folder / "a.png")])
    assert found == [(str(folder / "a.png"), "image")] and not skipped
    assert ignored == [
        (str(folder / "b.png"), f"the same file as {folder / 'a.png'}, read there once"),
        (str(folder / "a.png"), f"the same file as {folder / 'a.png'}, read there once"),
    ]


def test_excluded_folders_and_folders_that_cannot_be_listed_are_reported(tmp_path, monkeypatch):
    """Before: an unreadable folder vanished, neither read nor skipped nor ignored."""
    for name in ("scans", "results", "locked"):
        (tmp_path / name).mkdir()
        Image.new("L", (20, 20)).save(tmp_path / name / "a.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found, ignored, skipped = scans.find(
        [str(tmp_path)], exclude={str(tmp_path / "results"): "ours"}
    )
    assert found == [(str(tmp_path / "scans" / "a.png"), "image")]
    assert ignored == [(str(tmp_path / "results"), "ours")]
    assert skipped == [(str(tmp_path / "locked"), "cannot list the folder (Permission denied)")]


@pytest.mark.parametrize("name", ["examples_ybr_color.dcm", "SC_rgb_rle_2frame.dcm"])
def test_compressed_data_holding_fewer_frames_than_its_header_says_is_reported(tmp_path, name):
    """Before: the frames held were read and the file reported as whole. Both decoders: Pillow (JPEG
    Baseline YBR) and pydicom (RLE)."""
    dataset = pydicom.dcmread(real(name))
    held = int(dataset.NumberOfFrames)
    dataset.NumberOfFrames = held + 2
    dataset.save_as(tmp_path / name)
    got, why = read_all(tmp_path / name)
    assert (
        why == f"the header promises {held + 2} frames (NumberOfFrames) and the data holds {held}"
    )
    assert [v.frame for v in got] == list(range(held))


def test_native_ybr_full_422_is_read_whole_as_pydicom_decodes_it(tmp_path):
    """4:2:2 stores two values a pixel. Before: the real file was refused ('the data holds 0') and a 6-frame
    cine of it gave 4 frames."""
    dataset = pydicom.dcmread(real("SC_ybr_full_422_uncompressed.dcm"))
    dataset.PixelData, dataset.NumberOfFrames = dataset.PixelData * 6, 6
    dataset.save_as(tmp_path / "cine.dcm")
    for path in (real("SC_ybr_full_422_uncompressed.dcm"), tmp_path / "cine.dcm"):
        reference = pydicom.dcmread(path).pixel_array  # RGB, converted by pydicom
        got, why = read_all(path)
        assert why == ""
        frames = reference if reference.ndim == 4 else reference[None]
        assert [np.asarray(v.image).tolist() for v in got] == frames.tolist()


@pytest.mark.parametrize("name", ["image_dfl.dcm", "SC_rgb_jpeg.dcm"])
def test_files_pydicom_cannot_read_frame_by_frame_decode_from_the_data_set(name):
    """A deflated file and JPEG whose offset table pydicom's frame reader rejects. Before: skipped with
    "no 'Pixel Data'" and "Found unexpected tag (0000,0000)"."""
    (view,) = views(real(name))
    np.testing.assert_array_equal(np.asarray(view.image), pydicom.dcmread(real(name)).pixel_array)


@pytest.mark.parametrize(
    "size", [(3, 20, 30), (5, 256, 256)]
)  # value read, and deferred (over 256 KB)
def test_a_truncated_native_cine_keeps_its_whole_frames_and_says_how_many(tmp_path, size):
    """Before: 'cannot reshape array' or 'buffer size must be a multiple', with no frame read."""
    frames = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8)
    path = write_dicom(tmp_path / "cine.dcm", frames)
    whole = os.path.getsize(path)
    with open(path, "r+b") as file:
        file.truncate(whole - 7)  # the last frame cut short
    got, why = read_all(path)
    assert (
        why
        == f"the header promises {size[0]} frames (NumberOfFrames) and the data holds {size[0] - 1}"
    )
    assert [np.asarray(v.image).tolist() for v in got] == frames[:-1].tolist()


def test_a_dicomdir_is_ignored_and_a_truncated_file_says_so(tmp_path):
    found, ignored, _ = scans.find([real(os.path.join("dicomdirtests", "DICOMDIR"))])
    assert not found and ignored[0][1].startswith("a DICOMDIR, the index of a DICOM export")
    whole = open(real("examples_ybr_color.dcm"), "rb").read()
    (tmp_path / "cut.dcm").write_bytes(whole[:-10])
    why = "no data set after the file meta information (a truncated or damaged file)"
    assert read_all(tmp_path / "cut.dcm") == ([], why)


def test_scans_prints_a_name_that_is_not_utf8_escaped(tmp_path, capsys):
    """Before: printed as lone surrogates, a UnicodeEncodeError under a strict UTF-8 terminal."""
    name = os.fsdecode(b"caf\xe9.png")
    Image.new("L", (20, 20)).save(tmp_path / name)
    scans.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert f"{tmp_path}/caf\\xe9.png: image, 1 frames" in out
    out.encode("utf-8")  # strict: no lone surrogate left


def test_float_dicom_pixels_say_how_they_were_scaled(tmp_path):
    """Before: 'MONOCHROME2, 32-bit scaled to 8', while the range was stretched as data.scale_to_8bit does."""
    frame = np.random.default_rng(4).integers(0, 256, (20, 30), dtype=np.uint8)
    dataset = pydicom.dcmread(write_dicom(tmp_path / "float.dcm", frame))
    del dataset.PixelData, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation
    dataset.BitsAllocated, dataset.FloatPixelData = (
        32,
        (frame * 4.0 - 100).astype(np.float32).tobytes(),
    )
    dataset.save_as(tmp_path / "float.dcm")
    (view,) = views(tmp_path / "float.dcm")
    assert np.array_equal(
        np.asarray(view.image), frame
    )  # 0..255 * 4 - 100 stretched back to 0..255
    assert (
        view.pixels
        == "MONOCHROME2, float: [0, 1] x 255, [0, 255] kept, any other range stretched per frame"
    )
