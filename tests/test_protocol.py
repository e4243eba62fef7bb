"""protocol.py: the FetalCLIP protocol's metrics against the release's definitions, sklearn and
hand-computed cases, its Planes DB and HC18 readers on small files in the real layouts, and its data-check
command."""

import math
import os

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from sklearn.metrics import f1_score

import protocol
from protocol import GA_DAYS, ga_validity, macro_f1


def scores_with_top(indices, values=None):
    """(1, 175) scores that are 0 except at `indices`."""
    scores = np.zeros((1, len(GA_DAYS)), np.float32)
    scores[0, indices] = 10.0 if values is None else values
    return scores


def released_median_index(scores, n=15):
    """The release's find_median_from_top_n, transcribed as a naive reference."""
    pairs = sorted([[i, t] for i, t in enumerate(scores)], key=lambda x: x[1], reverse=True)[:n]
    return sorted(pairs, key=lambda x: x[0])[n // 2][0]


# ------------------------------------------------------------------ classification


def test_macro_f1_matches_sklearn_over_present_classes():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 2, 3, 8], size=300)  # 4 of 9 classes never present
    predictions = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 9, 300))
    expected = f1_score(
        labels, predictions, labels=np.unique(labels), average="macro", zero_division=0
    )
    assert macro_f1(predictions, labels) == pytest.approx(expected, abs=1e-12)


def test_prediction_of_absent_class_is_only_a_miss():
    # class 0: tp 1, fn 1 -> F1 2/3; class 1: perfect. Class 5 (absent) is not averaged in.
    assert macro_f1([0, 5, 1, 1], [0, 0, 1, 1]) == pytest.approx((2 / 3 + 1) / 2)
    # no div by 0
    assert macro_f1([1, 1, 1, 1], [0, 0, 1, 1]) == pytest.approx((0 + 2 * 2 / (2 * 2 + 2)) / 2)


def release_topk_accuracy(probs, labels, k):
    """The release's acc / acc_top{k}: per class present, the share of its images whose top k holds it,
    averaged over those classes (torchmetrics Accuracy(top_k=k, average="none")), as a naive loop."""
    per_class = []
    for c in sorted(set(labels.tolist())):
        rows = [i for i in range(len(labels)) if labels[i] == c]
        ranked = [sorted(range(probs.shape[1]), key=lambda j: (-probs[i, j], j))[:k] for i in rows]
        per_class.append(sum(c in top for top in ranked) / len(rows))
    return sum(per_class) / len(per_class)


def test_classification_metrics_are_the_release_definitions():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])
    labels = np.array([1, 1, 2, 1])  # row 3 ties 0/1: the lower index ranks first (pred 0)
    m = protocol.classification_metrics(probs, labels, ["a", "b", "c"])
    # hand-computed: class b is right 1 of 3 times at top 1 and 2 of 3 at top 2, class c always
    assert m["accuracy"] == pytest.approx((1 / 3 + 1) / 2) and m["top2"] == pytest.approx(
        (2 / 3 + 1) / 2
    )
    assert m["top3"] == 1.0 and m["n"] == 4
    assert (m["pooled_accuracy"], m["pooled_top2"], m["pooled_top3"]) == (
        0.5,
        0.75,
        1.0,
    )  # over all images
    assert set(m["per_class"]) == {"b", "c"}  # only classes present in the labels
    assert m["per_class"]["b"]["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(macro_f1(probs.argmax(1), labels))
    # and on a larger case with absent classes, against the naive loop
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(9), size=200)
    labels = rng.choice([0, 2, 3, 7], size=200, p=[0.6, 0.2, 0.15, 0.05])
    m = protocol.classification_metrics(probs, labels, [str(c) for c in range(9)])
    for k, name in ((1, "accuracy"), (2, "top2"), (3, "top3")):
        assert m[name] == pytest.approx(release_topk_accuracy(probs, labels, k), abs=1e-12)
        # the two definitions do differ here
        assert m[name] != pytest.approx(m[f"pooled_{name}"], abs=1e-3)


# ------------------------------------------------------------------ HC18 protocol


def test_ga_prediction_is_median_index_of_top15():
    top = [3, 40, 41, 42, 60, 61, 62, 100, 101, 130, 150, 160, 170, 171, 174]
    # the order of the scores is irrelevant
    values = np.linspace(20, 6, 15)[np.random.default_rng(1).permutation(15)]
    assert protocol.ga_prediction(scores_with_top(top, values))[0] == 98 + 100


def test_ga_prediction_ties_follow_the_stable_sort():
    assert protocol.ga_prediction(np.zeros((1, 175)))[0] == 98 + 7  # all tied: indices 0..14
    # 14 clear winners at 100..113 and a tie for the 15th place between indices 20 and 150:
    # the lower index (20) is kept, so the sorted top 15 is [20, 100..113] and position 7 is 106.
    scores = scores_with_top(list(range(100, 114)))
    scores[0, [20, 150]] = 5.0
    assert protocol.ga_prediction(scores)[0] == 98 + 106
    rng = np.random.default_rng(0)
    many_ties = rng.integers(0, 4, size=(50, 175)).astype(np.float32)
    expected = [98 + released_median_index(row) for row in many_ties]
    np.testing.assert_array_equal(protocol.ga_prediction(many_ties), expected)


def test_validity_curves_against_hand_computed_values():
    w = 140 / 7  # 20 weeks, coefficients typed independently from the FetalCLIP release
    q025 = math.exp(
        1.59317517131532
        + 0.29459800552433 * w
        - 7.3860372566707e-3 * w**2
        + 6.56951770216148e-5 * w**3
    )
    q975 = math.exp(
        2.50074069629423
        + 0.220067854715719 * w
        - 4.93623111462443e-3 * w**2
        + 3.89066000946519e-5 * w**3
    )
    assert protocol.ga_quantile(140, "q025") == pytest.approx(q025, rel=1e-12)
    assert protocol.ga_quantile(140, "q975") == pytest.approx(q975, rel=1e-12)
    # the release's anchors: median HC 100 mm at 14 weeks, 342 mm at 40 weeks
    assert protocol.ga_quantile(98) == pytest.approx(100, abs=1) and protocol.ga_quantile(
        280
    ) == pytest.approx(342, abs=1)


def test_filter_bounds_are_inclusive_and_validity_bounds_too():
    day = 98 + 100
    # every image predicts index 100
    scores = np.repeat(scores_with_top(list(range(93, 108))), 6, axis=0)
    low, high = protocol.ga_quantile(day, "q025"), protocol.ga_quantile(day, "q975")
    true_hc = np.array([99.999, 100.0, 342.0, 342.001, low, np.nextafter(low, 0)])
    r = ga_validity(scores, true_hc)
    np.testing.assert_array_equal(r["kept"], [False, True, True, False, True, True])
    np.testing.assert_array_equal(r["pred_days"], [day] * 6)
    np.testing.assert_array_equal(r["is_valid"], [False, False, False, False, True, False])
    assert (r["n"], r["valid"]) == (4, 1) and r["validity"] == 25.0
    upper = ga_validity(scores[:3], [(low + high) / 2, high, np.nextafter(high, np.inf)])
    np.testing.assert_array_equal(upper["is_valid"], [True, True, False])


def test_bootstrap_is_reproducible_and_matches_an_independent_resampling():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(120, 175)).astype(np.float32)
    true_hc = rng.uniform(80, 360, size=120)
    a, b = ga_validity(scores, true_hc), ga_validity(scores, true_hc)
    assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"])
    hits = a["is_valid"][a["kept"]].astype(float)
    draws = np.random.default_rng(42).integers(0, len(hits), size=(10_000, len(hits)))
    means = [np.mean([hits[j] for j in row]) for row in draws]  # one resample at a time
    assert (a["ci_low"], a["ci_high"]) == pytest.approx(
        tuple(100 * np.percentile(means, [2.5, 97.5]))
    )
    assert a["ci_low"] <= a["validity"] <= a["ci_high"]
    kept = a["kept"]
    assert a["spearman"] == pytest.approx(
        stats.spearmanr(a["pred_days"][kept], true_hc[kept]).statistic
    )


# ------------------------------------------------------------------ readers


def write_planes(
    root,
    rows,
    header="Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train ",
    images=True,
):
    os.makedirs(os.path.join(root, "Images"), exist_ok=True)
    with open(os.path.join(root, "FETAL_PLANES_DB_data.csv"), "w") as f:
        f.write(header + "\n" + "".join(";".join(r) + "\n" for r in rows))
    for r in rows if images else []:
        Image.new("L", (40, 30), 100).save(os.path.join(root, "Images", r[0] + ".png"))


PLANES_ROWS = [
    ["Patient00001_Plane1_1_of_15", "1", "Other", "Not A Brain", "Other", "Aloka", "1"],
    [
        "Patient00002_Plane3_1_of_2",
        "2",
        "Fetal brain",
        "Trans-thalamic",
        "Op. 3",
        "Voluson E6",
        "0",
    ],
]


def test_read_planes_db(tmp_path):
    write_planes(tmp_path, PLANES_ROWS)
    rows = protocol.read_planes_db(tmp_path)
    assert [
        (r["image_name"], r["patient"], r["plane"], r["brain_plane"], r["train"]) for r in rows
    ] == [
        ("Patient00001_Plane1_1_of_15", 1, "Other", "Not A Brain", True),
        ("Patient00002_Plane3_1_of_2", 2, "Fetal brain", "Trans-thalamic", False),
    ]
    assert rows[1]["path"] == os.path.join(tmp_path, "Images", "Patient00002_Plane3_1_of_2.png")
    assert rows[1]["operator"] == "Op. 3" and rows[1]["us_machine"] == "Voluson E6"


def test_read_planes_db_errors(tmp_path):
    write_planes(
        tmp_path,
        [r[:3] + r[4:] for r in PLANES_ROWS],
        header="Image_name;Patient_num;Plane;Operator;US_Machine;Train ",
    )
    with pytest.raises(ValueError, match="Brain_plane") as error:
        protocol.read_planes_db(tmp_path)
    assert "FETAL_PLANES_DB_data.csv" in str(error.value)
    write_planes(tmp_path / "no_images", PLANES_ROWS, images=False)
    with pytest.raises(FileNotFoundError, match="Patient00001_Plane1_1_of_15.png"):
        protocol.read_planes_db(tmp_path / "no_images")
    with pytest.raises(FileNotFoundError, match="FETAL_PLANES_DB_data.csv"):
        protocol.read_planes_db(tmp_path / "nowhere")


def write_hc18(root, lines, images=("000_HC.png", "001_2HC.png")):
    os.makedirs(os.path.join(root, "training_set"), exist_ok=True)
    with open(os.path.join(root, "training_set_pixel_size_and_HC.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    for name in images:
        Image.new("L", (800, 540)).save(os.path.join(root, "training_set", name))


def test_read_hc18(tmp_path):
    write_hc18(
        tmp_path,
        [
            "filename,pixel size(mm),head circumference (mm)",
            "000_HC.png,0.0691358041432,44.3",
            "001_2HC.png,0.0891,56.81",
        ],
    )
    rows = protocol.read_hc18(tmp_path)
    assert [(r["filename"], r["pixel_size"], r["hc"]) for r in rows] == [
        ("000_HC.png", 0.0691358041432, 44.3),
        ("001_2HC.png", 0.0891, 56.81),
    ]
    assert rows[0]["path"] == os.path.join(tmp_path, "training_set", "000_HC.png")


def test_read_hc18_errors(tmp_path):
    write_hc18(tmp_path, ["filename,pixel size(mm)", "000_HC.png,0.07"])
    with pytest.raises(ValueError, match="head circumference"):
        protocol.read_hc18(tmp_path)
    write_hc18(tmp_path, ["filename,pixel size(mm),head circumference (mm)", "000_HC.png,0.07,abc"])
    with pytest.raises(ValueError, match="row 2.*head circumference.*abc"):
        protocol.read_hc18(tmp_path)
    write_hc18(tmp_path, ["filename,pixel size(mm),head circumference (mm)", "005_HC.png,0.07,50"])
    with pytest.raises(FileNotFoundError, match="005_HC.png"):
        protocol.read_hc18(tmp_path)


def test_hc18_sizes_must_be_positive_finite_numbers(tmp_path):
    header = "filename,pixel size(mm),head circumference (mm)"
    for line, column in (
        ("000_HC.png,0,150.0", "pixel size"),
        ("000_HC.png,nan,150.0", "pixel size"),
        ("000_HC.png,-0.07,150.0", "pixel size"),
        ("000_HC.png,0.07,-44.3", "head circumference"),
        ("000_HC.png,0.07,inf", "head circumference"),
    ):
        write_hc18(tmp_path, [header, "001_2HC.png,0.07,150.0", line])
        value = line.split(",")[1 if column == "pixel size" else 2]
        with pytest.raises(
            ValueError,
            match=f"training_set_pixel_size_and_HC.csv, row 3: column '{column}.*= '{value}'",
        ):
            protocol.read_hc18(tmp_path)


def test_an_unreadable_evaluation_image_is_named_when_the_rows_are_read(tmp_path):
    write_planes(tmp_path, PLANES_ROWS)
    (tmp_path / "Images" / "Patient00002_Plane3_1_of_2.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="Patient00002_Plane3_1_of_2.png: not a readable image"):
        protocol.read_planes_db(tmp_path)


def test_the_command_checks_a_copy_of_the_data_sets(tmp_path, capsys):
    from tools import synthetic

    synthetic.write_planes(str(tmp_path / "planes"), 0, 21, 64, 48)  # one cycle of its kinds
    synthetic.write_hc18(str(tmp_path / "hc18"), 0, 4)
    protocol.main([f"--planes_dir={tmp_path / 'planes'}", f"--hc18_dir={tmp_path / 'hc18'}"])
    out = capsys.readouterr().out
    # 2 'Other' dropped
    assert "Planes DB, split all: 19 images" in out and "Planes DB, split all: 6 images" in out
    assert "HC18, split all: 4 images" in out and "every row read and every image decoded" in out
    png = (
        tmp_path / "planes" / "Images" / sorted((tmp_path / "planes" / "Images").iterdir())[3].name
    )
    png.write_bytes(png.read_bytes()[:200])  # truncated: its header still reads
    with pytest.raises(SystemExit, match=f"protocol.py: .*{png.name}: not a readable image"):
        protocol.main([f"--planes_dir={tmp_path / 'planes'}"])
