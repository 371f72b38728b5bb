"""Tests of the localization and classification metrics."""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deit_scm_cxr.evaluation.boxes import DEFAULT_THRESHOLDS, FINE_THRESHOLDS, boxes_over_thresholds, upsample_scoremap
from deit_scm_cxr.evaluation.metrics import (
    EvaluationSplit,
    LocalizationScores,
    box_boundary_distances,
    box_measures,
    calibrate_thresholds,
    calibrated_report,
    choose_smoothing,
    classification_metrics,
    cxr_protocol,
    localization_table,
    pairwise_giou,
    pairwise_iobb,
    pairwise_iou,
    pixel_average_precision,
)
from deit_scm_cxr.hub.localization import (
    LocalizationInputError,
    boxes_at_threshold,
    normalize_scoremap,
    quantize_scoremap,
    scoremap_to_boxes,
    smooth_grid_map,
)

# ----------------------------------------------------------------------------- per-image measures


def test_hand_computed_iou_giou_iobb():
    a, b = np.array([0, 0, 9, 9]), np.array([5, 5, 14, 14])  # 10x10 boxes overlapping in 5x5
    assert pairwise_iou(a, b)[0, 0] == pytest.approx(25 / 175)
    assert pairwise_giou(a, b)[0, 0] == pytest.approx(25 / 175 - (225 - 175) / 225)
    assert pairwise_iobb(a, b)[0, 0] == pytest.approx(25 / 100)
    inner = np.array([2, 2, 3, 3])  # 2x2 box inside a: IoBB 1, IoU 4/100
    assert pairwise_iobb(inner, a)[0, 0] == 1.0 and pairwise_iou(inner, a)[0, 0] == pytest.approx(0.04)
    far = np.array([50, 50, 59, 59])
    assert pairwise_iou(a, far)[0, 0] == 0 and pairwise_giou(a, far)[0, 0] == pytest.approx(-(3600 - 200) / 3600)


def test_hand_computed_boundary_distances():
    same = box_boundary_distances([0, 0, 10, 10], [0, 0, 10, 10], (100, 100))
    assert same["hausdorff"] == 0 and same["average_boundary_distance"] == 0
    shifted = box_boundary_distances([0, 0, 10, 10], [3, 0, 13, 10], (30, 40))
    assert shifted["hausdorff"] == pytest.approx(3.0)
    assert shifted["hausdorff_normalized"] == pytest.approx(3.0 / 50.0)
    taller = box_boundary_distances([0, 0, 10, 10], [0, 0, 10, 20], (100, 100))
    assert taller["hausdorff"] == pytest.approx(10.0)
    measures = box_measures([0, 0, 9, 9], [5, 5, 14, 14], (100, 100))
    assert set(measures) >= {"iou", "giou", "iobb", "hausdorff", "average_boundary_distance"}


_box = st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(0, 40), st.integers(0, 40)).map(
    lambda t: np.array([t[0], t[1], t[0] + t[2], t[1] + t[3]])
)


@settings(max_examples=300, deadline=None)
@given(_box, _box)
def test_measure_properties(a, b):
    iou_ab, iou_ba = pairwise_iou(a, b)[0, 0], pairwise_iou(b, a)[0, 0]
    assert iou_ab == iou_ba and 0 <= iou_ab <= 1
    giou = pairwise_giou(a, b)[0, 0]
    assert -1 <= giou <= iou_ab + 1e-12
    iobb = pairwise_iobb(a, b)[0, 0]
    assert 0 <= iobb <= 1 and iobb >= iou_ab - 1e-12
    if np.array_equal(a, b):
        assert iou_ab == 1 and giou == 1


# ----------------------------------------------------------------------------- box extraction


def _blob_map(size=(64, 64), blobs=((20, 20, 8, 1.0),)):
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    scoremap = np.zeros(size, np.float32)
    for cy, cx, radius, height in blobs:
        scoremap = np.maximum(scoremap, height * ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2))
    return scoremap


def test_perfect_map_gives_max_box_acc_100():
    boxes = [np.array([[10, 12, 40, 50]]), np.array([[0, 0, 30, 20]])]
    maps = []
    for ((x0, y0, x1, y1),) in boxes:
        scoremap = np.zeros((64, 64), np.float32)
        scoremap[y0 : y1 + 1, x0 : x1 + 1] = 1
        maps.append(scoremap)
    scores = LocalizationScores.from_maps(maps, boxes)
    assert scores.oracle()["MaxBoxAcc"] == 100 and scores.oracle()["MaxBoxAccV2"] == 100


def test_map_with_no_contour_gives_the_zero_box():
    scoremap = np.zeros((32, 32), np.float32)
    assert np.array_equal(scoremap_to_boxes(scoremap, 0.5), np.zeros((1, 4)))
    scores = LocalizationScores.from_maps([scoremap], [np.array([[10, 10, 20, 20]])])
    assert scores.oracle()["MaxBoxAcc"] == 0
    # The zero box does count when the truth is at the origin, as in the reference.
    corner = LocalizationScores.from_maps([scoremap], [np.array([[0, 0, 0, 0]])])
    assert corner.oracle()["MaxBoxAcc"] == 100


def test_multi_contour_finds_the_small_blob_the_largest_contour_misses():
    scoremap = _blob_map(blobs=((20, 20, 12, 1.0), (50, 50, 5, 0.9)))
    truth = [np.array([[45, 45, 55, 55]])]
    scores = LocalizationScores.from_maps([scoremap], truth)
    assert scores.box_acc(0.5).max() == 0
    assert scores.box_acc(0.5, multi_contour=True).max() == 100
    assert len(scoremap_to_boxes(scoremap, 0.5, multi_contour=True)) == 2


def test_all_thresholds_at_once_equal_the_per_threshold_loop():
    rng = np.random.default_rng(0)
    for index in range(24):
        if index % 3 == 0:
            scoremap = rng.random((30, 41)).astype(np.float32)  # noise: many contours, holes, ties
        elif index % 3 == 1:
            scoremap = cv2.resize(rng.random((14, 14)).astype(np.float32), (112, 112), interpolation=cv2.INTER_CUBIC)
        else:
            scoremap = cv2.resize(rng.random((6, 5)).astype(np.float32), (47, 39), interpolation=cv2.INTER_NEAREST)
        scoremap = (scoremap - scoremap.min()) / (scoremap.max() - scoremap.min())
        quantized = quantize_scoremap(scoremap)
        fast = boxes_over_thresholds(quantized)
        for t, threshold in enumerate(DEFAULT_THRESHOLDS):
            multi, _ = boxes_at_threshold(quantized, threshold, multi_contour=True)
            largest, _ = boxes_at_threshold(quantized, threshold, multi_contour=False)
            ours = fast.multi_boxes[fast.multi_owner == t]
            assert np.array_equal(np.sort(ours, axis=0), np.sort(multi, axis=0)), (index, t)
            assert np.array_equal(fast.largest[t], largest[0]), (index, t)


# ----------------------------------------------------------------------------- dataset level


def _scores_with_best_threshold(best: int, count: int = 20) -> LocalizationScores:
    """IoU 0.8 at threshold index `best`, 0.1 elsewhere."""
    ious = np.full((count, len(DEFAULT_THRESHOLDS)), 0.1)
    ious[:, best] = 0.8
    return LocalizationScores(ious, ious.copy(), np.ones(count, bool), DEFAULT_THRESHOLDS)


def test_calibration_uses_validation_only():
    validation, test = _scores_with_best_threshold(30), _scores_with_best_threshold(60)
    main, per_delta = calibrate_thresholds(validation)
    assert main == 30 and per_delta == [30, 30, 30]
    report = calibrated_report(validation, test)
    assert report["calibrated_on_validation"]["MaxBoxAcc"] == 0  # test's best threshold is elsewhere
    assert report["calibrated_on_validation"]["threshold"] == pytest.approx(0.30)
    assert report["test_oracle_max_over_thresholds"]["MaxBoxAcc"] == 100
    # Changing the test set leaves the chosen threshold alone.
    other = calibrated_report(validation, _scores_with_best_threshold(10))
    assert other["calibrated_on_validation"]["threshold"] == pytest.approx(0.30)


def test_top1_loc_needs_the_right_class():
    ious = np.full((4, len(DEFAULT_THRESHOLDS)), 0.9)
    scores = LocalizationScores(ious, ious, np.array([True, False, True, False]), DEFAULT_THRESHOLDS)
    assert scores.oracle()["top1_loc"] == 50 and scores.oracle()["gt_known_loc"] == 100


def test_pixel_average_precision():
    truth = [np.array([[8, 8, 23, 23]])]
    perfect = np.zeros((32, 32), np.float32)
    perfect[8:24, 8:24] = 1
    assert pixel_average_precision([perfect], truth) == pytest.approx(100.0)
    noise = np.random.default_rng(0).random((200, 200)).astype(np.float32)
    base_rate = 16 * 16 / 200**2
    random_ap = pixel_average_precision([noise], [np.array([[50, 50, 65, 65]])])
    assert random_ap == pytest.approx(base_rate * 100, rel=0.5)


def test_cxr_protocol_accuracy_and_false_positives():
    truth = [np.array([[10, 10, 29, 29]]), np.array([[0, 0, 9, 9], [50, 50, 59, 59]])]
    findings = [["Atelectasis"], ["Nodule", "Atelectasis"]]
    predicted = [
        np.array([[12, 12, 20, 20], [80, 80, 90, 90]]),  # inside the truth (IoBB 1) + a false positive
        np.array([[50, 50, 59, 59]]),  # exactly the Atelectasis box of image 2
    ]
    result = cxr_protocol(predicted, truth, findings)
    atelectasis = result["Atelectasis"]
    assert atelectasis["iobb@0.9"] == {"accuracy": 1.0, "afp": 0.5}  # one FP over two images
    # IoU of the inner box is 81 / 400: localized at T(IoU) = 0.2, not at 0.3.
    assert atelectasis["iou@0.2"]["accuracy"] == 1.0
    assert atelectasis["iou@0.3"]["accuracy"] == 0.5
    assert result["Nodule"]["iobb@0.1"]["accuracy"] == 0.0


def test_classification_metrics():
    labels = [0, 0, 1, 1, 2, 2]
    probabilities = np.array(
        [[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]]
    )
    result = classification_metrics(labels, probabilities, ["A", "B", "C"])
    assert result["accuracy"] == pytest.approx(5 / 6)
    assert result["confusion_matrix"] == [[2, 0, 0], [1, 1, 0], [0, 0, 2]]
    assert result["per_class"]["B"]["recall"] == 0.5 and result["per_class"]["A"]["precision"] == pytest.approx(2 / 3)
    assert result["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert result["roc_auc_ovr"]["C"] == 1.0


def test_harness_table_with_baselines(tmp_path):
    rng = np.random.default_rng(0)

    def split(count):
        maps = {"attention": [], "semantic": [], "coupled": []}
        boxes = []
        for _ in range(count):
            cy, cx = rng.integers(3, 11, 2)
            grid = np.zeros((14, 14), np.float32)
            grid[cy - 2 : cy + 2, cx - 2 : cx + 2] = 1
            maps["coupled"].append(grid + rng.normal(0, 0.05, grid.shape).astype(np.float32))
            maps["attention"].append(rng.random((14, 14)).astype(np.float32))
            maps["semantic"].append(np.roll(grid, 3, axis=1))
            boxes.append(np.array([[(cx - 2) * 8, (cy - 2) * 8, (cx + 2) * 8 - 1, (cy + 2) * 8 - 1]]))
        return EvaluationSplit({k: np.stack(v) for k, v in maps.items()}, boxes, (112, 112), np.ones(count, bool))

    table = localization_table(split(12), split(16), prior_box=np.array([30, 30, 80, 80]))
    assert set(table) == {"attention", "semantic", "coupled", "random", "full_image", "train_mean_box"}
    for row in table.values():
        assert {"calibrated_on_validation", "test_oracle_max_over_thresholds", "PxAP"} <= set(row)
        assert row["calibrated_on_validation"]["MaxBoxAcc"] <= row["test_oracle_max_over_thresholds"]["MaxBoxAcc"]
    assert table["coupled"]["calibrated_on_validation"]["MaxBoxAcc"] > 80
    assert (
        table["coupled"]["calibrated_on_validation"]["MaxBoxAcc"]
        > table["random"]["calibrated_on_validation"]["MaxBoxAcc"]
    )
    assert table["full_image"]["calibrated_on_validation"]["MaxBoxAcc"] == 0  # the boxes are small
    path = tmp_path / "table.png"
    from deit_scm_cxr.outputs.plots import plot_localization_table

    plot_localization_table(table, str(path))
    assert path.stat().st_size > 1000


def test_evaluate_wrapper_loads_offline_and_agrees():
    evaluate = pytest.importorskip("evaluate", reason="the evaluate wrapper needs the evaluate package")
    os.environ["HF_EVALUATE_OFFLINE"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    metric = evaluate.load(os.path.join(root, "src", "deit_scm_cxr", "evaluation", "wsol_localization.py"))
    maps = [_blob_map(blobs=((20, 20, 8, 1.0),)), _blob_map(blobs=((40, 40, 6, 1.0),))]
    truth = [[[12, 12, 28, 28]], [[0, 0, 10, 10]]]
    result = metric.compute(scoremaps=maps, gt_boxes=truth, correct_class=[True, True])
    expected = LocalizationScores.from_maps(maps, [np.array(t) for t in truth]).oracle()
    assert result["MaxBoxAcc"] == expected["MaxBoxAcc"] == 50
    assert math.isclose(result["MaxBoxAccV2"], expected["MaxBoxAccV2"])
    assert result["pointing_game"] == 50  # the first blob peaks inside its box, the second outside
    # Issue 33: a zero step divided by zero, an empty map raised numpy's error; both are typed now.
    for step in (0, -0.01, float("nan"), 2.0):
        with pytest.raises(LocalizationInputError, match="threshold_step"):
            metric.compute(scoremaps=maps, gt_boxes=truth, correct_class=[True, True], threshold_step=step)
    with pytest.raises(LocalizationInputError, match="image 1: a score map must be a non-empty 2-D array"):
        metric.compute(scoremaps=[maps[0], np.zeros((0, 0))], gt_boxes=truth, correct_class=[True, True])


# ----------------------------------------------------------------------------- reference conventions


def test_float64_maps_are_quantized_in_float64():
    """Just under 77/255, x * 255 is 76.99999999999999 in float64 (level 76, as the reference computes it)
    but 77.0 once x is cast to float32 first (level 77): the map's own precision decides."""
    value = np.nextafter(77 / 255, 0)
    as64 = np.array([[value]], dtype=np.float64)
    assert quantize_scoremap(as64)[0, 0] == 76
    assert quantize_scoremap(as64.astype(np.float32))[0, 0] == 77
    assert normalize_scoremap(np.array([[0.0, 0.5, 1.0]], dtype=np.float64)).dtype == np.float64
    assert normalize_scoremap(np.array([[0, 2, 4]], dtype=np.uint8)).dtype == np.float32


def test_fine_threshold_grid_equals_the_per_threshold_loop():
    rng = np.random.default_rng(1)
    for _ in range(6):
        scoremap = cv2.resize(rng.random((12, 12)).astype(np.float32), (96, 96), interpolation=cv2.INTER_CUBIC)
        scoremap = (scoremap - scoremap.min()) / (scoremap.max() - scoremap.min())
        quantized = quantize_scoremap(scoremap)
        fast = boxes_over_thresholds(quantized, FINE_THRESHOLDS)
        assert len(fast.largest) == 1000
        for t in range(0, 1000, 7):
            multi, _ = boxes_at_threshold(quantized, FINE_THRESHOLDS[t], multi_contour=True)
            largest, _ = boxes_at_threshold(quantized, FINE_THRESHOLDS[t], multi_contour=False)
            assert np.array_equal(np.sort(fast.multi_boxes[fast.multi_owner == t], axis=0), np.sort(multi, axis=0))
            assert np.array_equal(fast.largest[t], largest[0])


def test_top1_loc_is_read_at_maxboxaccs_threshold_in_both_paths():
    """At threshold 10 images 0-2 are localized (BoxAcc 60 %; only image 0 has the right class: top-1 20 %);
    at threshold 20 images 3-4 (BoxAcc 40 %, both right: top-1 40 %). top-1 Loc is read at MaxBoxAcc's
    threshold, 10, in the oracle and the calibrated path alike: 20 %, not top-1's own best of 40 %."""
    ious = np.zeros((5, len(DEFAULT_THRESHOLDS)))
    ious[[0, 1, 2], 10] = 0.9
    ious[[3, 4], 20] = 0.9
    scores = LocalizationScores(ious, ious.copy(), np.array([True, False, False, True, True]), DEFAULT_THRESHOLDS)
    assert scores.oracle()["MaxBoxAcc"] == pytest.approx(60.0)
    assert scores.oracle()["top1_loc"] == pytest.approx(20.0)
    main, per_delta = calibrate_thresholds(scores)
    assert scores.at_thresholds(main, per_delta)["top1_loc"] == pytest.approx(20.0)


def test_pxap_ignores_marked_pixels():
    truth = [np.array([[8, 8, 23, 23]])]
    scoremap = np.zeros((32, 32), np.float32)
    scoremap[8:24, 8:24] = 1.0
    scoremap[0:4, 0:4] = 1.0  # a false positive that the ignore mask hides
    assert pixel_average_precision([scoremap], truth) < 100
    ignore = np.zeros((32, 32), bool)
    ignore[0:4, 0:4] = True
    assert pixel_average_precision([scoremap], truth, ignore_masks=[ignore]) == pytest.approx(100.0)
    # Ignoring half the true pixels leaves the ranking perfect: still 100.
    half = np.zeros((32, 32), bool)
    half[8:16, 8:24] = True
    assert pixel_average_precision([scoremap], truth, ignore_masks=[ignore | half]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="ignore mask"):
        pixel_average_precision([scoremap], truth, ignore_masks=[np.zeros((3, 3), bool)])


# ----------------------------------------------------------------------------- bad metric inputs (issue 12)


def _good_inputs(count: int = 3):
    rng = np.random.default_rng(0)
    maps = [rng.random((32, 32)).astype(np.float32) for _ in range(count)]
    boxes = [np.array([[4.0, 4.0, 20.0, 24.0]]) for _ in range(count)]
    return maps, boxes


@pytest.mark.parametrize(
    "bad_map, fragment",
    [
        (np.full((32, 32), np.nan, np.float32), "NaN or infinite"),
        (np.full((32, 32), np.inf, np.float32), "NaN or infinite"),
        (np.full((32, 32), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((32, 32), -0.2, np.float32), r"\[0, 1\]"),
        (np.zeros((2, 32, 32), np.float32), "2-D"),
    ],
)
def test_bad_score_maps_are_refused_by_every_metric(bad_map, fragment):
    maps, boxes = _good_inputs()
    maps[1] = bad_map
    with pytest.raises(LocalizationInputError, match=f"image 1: .*{fragment}"):
        LocalizationScores.from_maps(maps, boxes)
    with pytest.raises(LocalizationInputError, match=f"image 1: .*{fragment}"):
        pixel_average_precision(maps, boxes)
    if bad_map.ndim == 2:
        with pytest.raises(LocalizationInputError, match=fragment):
            quantize_scoremap(bad_map)


@pytest.mark.parametrize(
    "bad_boxes, fragment",
    [
        (np.array([[20.0, 4.0, 10.0, 24.0]]), "inverted"),
        (np.array([[4.0, 30.0, 20.0, 10.0]]), "inverted"),
        (np.array([[np.nan, 4.0, 20.0, 24.0]]), "finite"),
        (np.array([[-3.0, 4.0, 20.0, 24.0]]), "non-negative"),
        (np.zeros((0, 4)), "no ground-truth box"),
    ],
)
def test_bad_boxes_are_refused_by_every_metric(bad_boxes, fragment):
    maps, boxes = _good_inputs()
    boxes[2] = bad_boxes
    with pytest.raises(LocalizationInputError, match=f"image 2: .*{fragment}"):
        LocalizationScores.from_maps(maps, boxes)
    with pytest.raises(LocalizationInputError, match=f"image 2: .*{fragment}"):
        pixel_average_precision(maps, boxes)
    with pytest.raises(LocalizationInputError, match=f"image 2: .*{fragment}"):
        LocalizationScores.from_fixed_boxes([np.array([0.0, 0.0, 31.0, 31.0])] * 3, boxes)


def test_a_nan_grid_map_is_refused_before_normalization():
    # Normalizing would turn it into zeros, whose threshold-0 box is the full image: a silent score.
    grid = np.ones((12, 12), np.float32)
    grid[3, 4] = np.nan
    with pytest.raises(LocalizationInputError, match="NaN"):
        upsample_scoremap(grid, (224, 224))
    assert issubclass(LocalizationInputError, ValueError)


def test_results_of_earlier_versions_read_with_the_current_map_names():
    """all_results.json written before the maps were renamed ("scm" for F0 * S0, output "localization_maps")
    reads with today's names; everything else is left as it was."""
    from deit_scm_cxr.hub.localization import MAP_LABELS, current_map_names

    old = {
        "localization": {
            "methods": {"scm": {"PxAP": 7.5}, "semantic": {"PxAP": 6.0}, "random": {"PxAP": 5.0}},
            "localization_map": "scm",
            "localization_map_output": "localization_maps",
        },
        "history": [{"epoch": 1, "note": "scm phase"}],
    }
    new = current_map_names(old)
    assert set(new["localization"]["methods"]) == {"coupled", "semantic", "random"}
    assert new["localization"]["methods"]["coupled"] == {"PxAP": 7.5}
    assert new["localization"]["localization_map"] == "coupled" and "coupled" in MAP_LABELS
    assert new["localization"]["localization_map_output"] == "coupled_maps"
    assert new["history"] == old["history"]  # a value that merely contains the old name is not touched


# ----------------------------------------------------------------------------- smoothing on the grid


def _ring(grid: int, cy: int, cx: int) -> np.ndarray:
    """A map that rings a finding at token (cy, cx): its 8 neighbours at 1, the token itself at 0.6, the rest 0
    (what an LSE-trained S0 does around a compact lesion)."""
    ring = np.zeros((grid, grid), np.float32)
    ring[cy - 1 : cy + 2, cx - 1 : cx + 2] = 1.0
    ring[cy, cx] = 0.6
    return ring


def test_smoothing_moves_a_rings_peak_onto_its_centre():
    ring = _ring(12, 5, 7)
    assert ring[5, 7] < ring.max()
    for sigma in (0.75, 1.0, 1.5):
        smoothed = smooth_grid_map(ring, sigma)
        assert np.unravel_index(smoothed.argmax(), smoothed.shape) == (5, 7), sigma
        assert smoothed.dtype == np.float32 and smoothed.shape == ring.shape
    assert np.array_equal(smooth_grid_map(ring, 0.0), ring)
    # A constant map stays constant (edges replicated, no dark border).
    assert np.allclose(smooth_grid_map(np.full((12, 12), 3.0, np.float32), 1.0), 3.0)
    for bad in (-0.5, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="smoothing"):
            smooth_grid_map(ring, bad)


def test_the_smoothing_width_is_chosen_on_validation_and_applied_to_test():
    """Rings around one-token findings: unsmoothed, the maximum is on the ring (outside the finding's box: the
    pointing game 0 %); smoothed, on the centre (100 %). The table chooses a width > 0 on validation and reports
    test with it; offered no smoothing, it keeps the rings."""
    rng = np.random.default_rng(0)
    grid, token = 12, 8  # a 96 x 96 frame

    def split(count: int) -> EvaluationSplit:
        maps, boxes = [], []
        for _ in range(count):
            cy, cx = (int(v) for v in rng.integers(2, 10, 2))
            maps.append(_ring(grid, cy, cx) + rng.normal(0, 0.01, (grid, grid)).astype(np.float32))
            boxes.append(np.array([[cx * token, cy * token, cx * token + token - 1, cy * token + token - 1]]))
        return EvaluationSplit({"semantic": np.stack(maps)}, boxes, (96, 96), np.ones(count, bool))

    validation, test = split(10), split(12)
    unsmoothed = localization_table(validation, test, smoothing_sigmas=(0.0,))["semantic"]
    assert unsmoothed["pointing_game"] == 0.0 and unsmoothed["smoothing_sigma"] == 0.0
    row = localization_table(validation, test, smoothing_sigmas=(0.0, 0.75, 1.0))["semantic"]
    assert row["smoothing_sigma"] in (0.75, 1.0)
    assert set(row["smoothing_choice"]) == {"0", "0.75", "1"}
    assert row["smoothing_choice"]["0"] < row["smoothing_choice"][f"{row['smoothing_sigma']:g}"]
    assert row["pointing_game"] == 100.0 and row["validation"]["pointing_game"] == 100.0
    assert row["PxAP"] > unsmoothed["PxAP"]
    # The random baseline is never smoothed.
    assert localization_table(validation, test, smoothing_sigmas=(0.0, 1.0))["random"]["smoothing_sigma"] == 0.0
    # Ties go to the narrower width: a map whose every width scores the same keeps 0.
    flat = EvaluationSplit({"semantic": np.ones((4, grid, grid), np.float32)}, validation.gt_boxes[:4], (96, 96),
                           np.ones(4, bool))  # fmt: skip
    chosen, _ = choose_smoothing(flat.maps["semantic"], flat, (1.0, 0.0, 0.5), DEFAULT_THRESHOLDS)
    assert chosen.sigma == 0.0
