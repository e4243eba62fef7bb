"""prepare.py: a user's CSV or folder of pairs -> shards, read back with tarfile and by data.train_loader,
against expectations written out by hand; the report, the rerun rule and the one-line refusals. Tiny images,
CPU."""

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pydicom.data
import pytest
import webdataset as wds
from PIL import Image

import data
from tools import cache, prepare

VIEW = (
    16,
    (0.5, 0.5, 0.5),
    (0.5, 0.5, 0.5),
)  # (size, mean, std) of the one view the loader check asks for


def image_bytes(fmt, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    if mode == "I;16":  # a 16-bit greyscale scan, as some exports write
        image = Image.fromarray(rng.integers(0, 65535, (20, 24), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)


def read_shard(path):
    """Independent reader: tarfile -> [(member name, bytes)] in file order; fixed metadata, so reruns are identical."""
    with tarfile.open(path) as tar:
        assert all(m.mtime == 0 and m.isreg() for m in tar.getmembers())
        return [(m.name, tar.extractfile(m).read()) for m in tar]


# Rows of the CSV (row 1 is the header), with the reason each bad row must be refused for
ROWS = [
    ("images/plain.png", "Fetal brain, transthalamic plane."),  # 2
    ("images/plain.png", 'The same scan, a second "caption"'),  # 3: COCO-style, kept
    ("images/deep.png", "16-bit greyscale"),  # 4
    ("images/missing.png", "no such file"),  # 5: missing image
    ("images/broken.jpg", "truncated JPEG"),  # 6: unreadable image
    ("images/scan.jpg", "   "),  # 7: empty caption
    ("images/plain.png", "Fetal brain, transthalamic plane."),  # 8: duplicate of row 2
    ("images/dicom/IM0001", "a DICOM file named as scanners do"),  # 9: DICOM or video
    ("images/clip.mp4", "a video"),  # 10: DICOM or video
    ("images/anim.gif", "a GIF"),  # 11: unsupported format
    ("images/scan.jpg", "Abdomen"),  # 12
    ("images/sub dir/old.v2.bmp", "a BMP with dots in its name"),  # 13
    ("images/scan.TIFF", "a TIFF, its extension in capitals"),  # 14
]
WRITTEN = {
    2: "png",
    3: "png",
    4: "png",
    12: "jpg",
    13: "bmp",
    14: "tiff",
}  # row -> the field its image is written under
SHARDS = (
    "train-000000.tar",
    "train-000001.tar",
    "train-000002.tar",
)  # two pairs each, with --shard_size=2
REFUSED = {
    5: "missing image",
    6: "unreadable image",
    7: "empty caption",
    8: "duplicate",
    9: "DICOM or video",
    10: "DICOM or video",
    11: "unsupported format",
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A folder with images of every kind and a tab-separated CSV (open_clip's default) of ROWS."""
    root = tmp_path_factory.mktemp("pairs")
    write(root / "images/plain.png", image_bytes("PNG", 0))
    write(root / "images/deep.png", image_bytes("PNG", 1, mode="I;16"))
    write(root / "images/broken.jpg", image_bytes("JPEG", 2)[:300])
    write(root / "images/scan.jpg", image_bytes("JPEG", 3))
    write(root / "images/anim.gif", image_bytes("GIF", 4))
    write(root / "images/sub dir/old.v2.bmp", image_bytes("BMP", 5))
    write(root / "images/scan.TIFF", image_bytes("TIFF", 6))
    write(root / "images/clip.mp4", b"\x00\x00\x00\x18ftypmp42")
    os.makedirs(root / "images/dicom")
    shutil.copy(
        pydicom.data.get_testdata_file("examples_rgb_color.dcm"), root / "images/dicom/IM0001"
    )
    assert Image.open(root / "images/deep.png").mode == "I;16"
    lines = ["filepath\ttitle"] + [
        f'{path}\t"{caption.replace(chr(34), 2 * chr(34))}"' for path, caption in ROWS
    ]
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root


def test_csv_shards_report_and_loader(pairs, tmp_path):
    out = tmp_path / "shards"
    prepare.main([str(pairs / "pairs.csv"), f"--out_dir={out}/", "--shard_size=2"])
    # the shards: rows in order, two a shard, image bytes exactly the files', captions stripped
    members = [m for name in SHARDS for m in read_shard(out / name)]
    expected = []
    for row, field in WRITTEN.items():
        path, caption = ROWS[row - 2]
        expected += [
            (f"{row:09d}.{field}", (pairs / path).read_bytes()),
            (f"{row:09d}.txt", caption.strip().encode()),
        ]
    assert members == expected
    assert sorted(os.listdir(out)) == [
        "prepare_report.json",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    # the report: every refusal with its row, file and reason; DICOM and video name the command that
    # converts them
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["written"] == 6 and report["refused"] == 7
    assert [(r["row"], r["file"], r["reason"]) for r in report["refusals"]] == [
        (row, ROWS[row - 2][0], reason) for row, reason in REFUSED.items()
    ]
    assert report["refusals"][3]["detail"] == "the same image bytes and caption as row 2"
    assert all(
        "python -m tools.scans" in r["detail"]
        for r in report["refusals"]
        if r["reason"] == "DICOM or video"
    )
    assert report["shards"] == dict(zip(SHARDS, (2, 2, 2)))
    assert report["settings"]["separator"] == "\t" and report["source"] == str(pairs / "pairs.csv")
    # what training reads: every pair, nothing skipped
    loader = data.train_loader(str(out), VIEW, None, batch_size=1, return_keys=True)
    keys = sorted(key for *_, batch_keys in loader for key in batch_keys)
    assert keys == [f"{row:09d}" for row in WRITTEN]
    assert not any(loader.skipped.values()) and data.count_samples(str(out)) == 6
    # and what cache.py computes the teacher's views from (a BMP and a TIFF included)
    samples = [
        s
        for name in sorted(report["shards"])
        for s in wds.tarfile_samples([{"url": str(out / name)}])
    ]
    assert all(views is not None for *_, views in cache.TeacherViews(samples, VIEW, augs=1, seed=0))


def test_rerun_gives_the_same_bytes_and_never_a_mix(pairs, tmp_path):
    out = tmp_path / "shards"
    csv = str(pairs / "pairs.csv")
    prepare.main([csv, f"--out_dir={out}", "--shard_size=2"])
    first = {name: (out / name).read_bytes() for name in os.listdir(out)}
    prepare.main([csv, f"--out_dir={out}", "--shard_size=2"])
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == first
    prepare.main([csv, f"--out_dir={out}"])  # one shard now: the old second and third are gone
    assert sorted(os.listdir(out)) == ["prepare_report.json", "train-000000.tar"]
    kept = (out / "train-000000.tar").read_bytes()
    # nothing to write: one line, and the shards there stay as they were
    (tmp_path / "bad.csv").write_text("filepath,title\nnowhere.png,a\n,b\n")
    with pytest.raises(
        SystemExit, match=r"^prepare.py: .*bad.csv: no pair written, 2 refused \(2 missing image\)"
    ):
        prepare.main([str(tmp_path / "bad.csv"), f"--out_dir={out}"])
    assert (out / "train-000000.tar").read_bytes() == kept
    # a folder prepare.py did not write is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match=r"holds files prepare.py did not write \(notes.txt\)"):
        prepare.main([csv, f"--out_dir={tmp_path / 'mine'}"])
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_folder_of_images_with_captions(tmp_path):
    scans = tmp_path / "scans"
    write(scans / "a.png", image_bytes("PNG", 0))
    # a BOM and a newline, as editors write them
    write(scans / "a.txt", b"\xef\xbb\xbfFetal heart.\n")
    write(scans / "deep/b.jpg", image_bytes("JPEG", 1))
    write(scans / "deep/b.txt", "Fœtal abdomen".encode())
    write(scans / "c.png", image_bytes("PNG", 2))  # no caption file
    write(scans / "d.txt", b"a caption without its image")
    write(scans / "e.png", image_bytes("PNG", 3))
    write(scans / "e.txt", b"\n")
    prepare.main([str(scans), f"--out_dir={tmp_path / 'shards'}"])
    # keys: the image's position among the images in sorted path order (a.png, c.png, deep/b.jpg, e.png)
    assert read_shard(tmp_path / "shards/train-000000.tar") == [
        ("000000001.png", (scans / "a.png").read_bytes()),
        ("000000001.txt", b"Fetal heart."),
        ("000000003.jpg", (scans / "deep/b.jpg").read_bytes()),
        ("000000003.txt", "Fœtal abdomen".encode()),
    ]
    report = json.loads((tmp_path / "shards/prepare_report.json").read_text())
    assert [(r["file"], r["reason"]) for r in report["refusals"]] == [
        ("d.txt", "missing image"),
        ("c.png", "missing caption"),
        ("e.png", "empty caption"),
    ]
    # its shards would be read as input next time
    with pytest.raises(SystemExit, match="is inside"):
        prepare.main([str(scans), f"--out_dir={scans / 'shards'}"])


def test_csv_conventions_and_one_line_errors(pairs, tmp_path):
    """Comma or semicolon found from the header, absolute paths, other column names; a missing column names
    those found."""
    plain = pairs / "images/plain.png"
    (tmp_path / "a.csv").write_text(f'image;caption;extra\n{plain};"semi; colon";x\n')
    prepare.main(
        [
            str(tmp_path / "a.csv"),
            f"--out_dir={tmp_path / 'a'}",
            "--img_key=image",
            "--caption_key=caption",
        ]
    )
    assert read_shard(tmp_path / "a/train-000000.tar")[1] == ("000000002.txt", b"semi; colon")
    (tmp_path / "b.csv").write_text(f"path,caption\n{plain},x\n")
    with pytest.raises(
        SystemExit,
        match=r"^prepare.py: .*b.csv: missing column 'filepath' \(found \['path', 'caption'",
    ):
        prepare.main([str(tmp_path / "b.csv"), f"--out_dir={tmp_path / 'b'}"])
    assert not os.path.exists(tmp_path / "b")


def test_a_row_with_unquoted_separators_is_refused_not_cut(pairs, tmp_path):
    """Before: the caption stored as 'caption one', the rest of the row dropped, 0 refused. A blank row is
    skipped but counted, so rows are named as a spreadsheet numbers them (before: one less after it)."""
    plain, scan = pairs / "images/plain.png", pairs / "images/scan.jpg"
    rows = [
        "filepath,title",
        "",
        f"{plain},caption one,EXTRA,MORE",
        f'{scan},"a quoted, whole caption"',
    ]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    report = prepare.prepare(str(tmp_path / "pairs.csv"), str(tmp_path / "shards"))
    assert report["refusals"] == [
        {
            "row": 3,
            "file": str(plain),
            "reason": "too many cells",
            "detail": "4 cells for the header's 2: quote a caption holding ','",
        }
    ]
    assert read_shard(tmp_path / "shards/train-000000.tar")[1] == (
        "000000004.txt",
        b"a quoted, whole caption",
    )


def test_a_file_name_that_is_not_utf8_refuses_that_pair_and_writes_the_rest(tmp_path):
    """Before: one line that named neither the file nor the row, and the whole run stopped."""
    scans = tmp_path / "scans"
    write(scans / "a.png", image_bytes("PNG", 0))
    write(scans / "a.txt", b"Fetal heart.")
    latin1 = os.fsencode(scans) + b"/caf\xe9"  # 'cafe' with an accent, in Latin-1
    write(latin1 + b".png", image_bytes("PNG", 1))
    write(latin1 + b".txt", b"Fetal brain.")
    report = prepare.prepare(str(scans), str(tmp_path / "shards"))
    assert [(r["file"], r["reason"]) for r in report["refusals"]] == [
        ("caf\\xe9.png", "name not UTF-8"),
        ("caf\\xe9.txt", "name not UTF-8"),
    ]
    assert report["written"] == 1
    saved = json.loads((tmp_path / "shards/prepare_report.json").read_text(encoding="utf-8"))
    assert saved["refusals"][0]["detail"] == "caf\\xe9.png: the file name is not UTF-8; rename it"
