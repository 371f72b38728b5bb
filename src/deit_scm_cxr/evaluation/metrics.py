"""WSOL evaluation metrics (not uploaded with the model): box measures, BoxAcc / MaxBoxAcc / MaxBoxAccV2,
top-1 and GT-known Loc, PxAP, thresholds calibrated on validation, the chest X-ray IoBB/IoU protocol,
classification metrics, the baselines harness and its chart.

Conventions follow clovaai/wsolevaluation (Choe et al., "Evaluating Weakly Supervised Object Localization
Methods Right", CVPR 2020); boxes come from `localization.py`, the same code the processor's
post-processing uses, so that the evaluated boxes are the boxes users get.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from deit_scm_cxr.evaluation.boxes import (
    DEFAULT_THRESHOLDS,
    ThresholdBoxes,
    boxes_over_thresholds,
    check_boxes,
    check_frame_size,
    upsample_scoremap,
)
from deit_scm_cxr.evaluation.reporting import percentile_interval
from deit_scm_cxr.hub.localization import (
    LocalizationInputError,
    check_scoremap,
    check_smoothing,
    check_thresholds,
    quantize_scoremap,
    scoremap_to_boxes,
    smooth_grid_map,
)


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Inclusive-pixel area: (x1 - x0 + 1) * (y1 - y0 + 1), zero for inverted boxes."""
    boxes = _as_boxes(boxes)
    return np.maximum(boxes[:, 2] - boxes[:, 0] + 1, 0) * np.maximum(boxes[:, 3] - boxes[:, 1] + 1, 0)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = _as_boxes(a)[:, None], _as_boxes(b)[None]
    width = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1
    height = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1
    return np.maximum(width, 0) * np.maximum(height, 0)


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU with inclusive pixel corners, as wsolevaluation; degenerate pairs give 0."""
    inter = _intersection(a, b)
    union = box_area(a)[:, None] + box_area(b)[None] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def pairwise_giou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) generalized IoU (Rezatofighi et al., CVPR 2019): IoU - |C minus (A u B)| / |C|, C the
    smallest enclosing box; in [-1, 1], inclusive pixel corners."""
    a2, b2 = _as_boxes(a)[:, None], _as_boxes(b)[None]
    inter = _intersection(a, b)
    union = box_area(a)[:, None] + box_area(b)[None] - inter
    hull = (np.maximum(a2[..., 2], b2[..., 2]) - np.minimum(a2[..., 0], b2[..., 0]) + 1) * (
        np.maximum(a2[..., 3], b2[..., 3]) - np.minimum(a2[..., 1], b2[..., 1]) + 1
    )
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou - np.divide(hull - union, hull, out=np.zeros_like(inter), where=hull > 0)


def pairwise_iobb(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N, M) intersection over the detected (predicted) box's area: IoBB of Wang et al., CVPR 2017."""
    inter = _intersection(predicted, truth)
    area = box_area(predicted)[:, None]
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


# Outline points per side at most: exact (one per unit step) for any side up to this many pixels, evenly
# spaced beyond it, so that one huge box costs milliseconds, not minutes (a 1e7-pixel side took 108 s).
MAX_OUTLINE_POINTS = 4096


def _side(start: int, stop: int) -> np.ndarray:
    if stop - start + 1 <= MAX_OUTLINE_POINTS:
        return np.arange(start, stop + 1)
    return np.unique(np.round(np.linspace(start, stop, MAX_OUTLINE_POINTS)).astype(np.int64))


def box_outline(box: np.ndarray) -> np.ndarray:
    """Integer points on the outline of an inclusive box, one per unit step (sides longer than
    `MAX_OUTLINE_POINTS` pixels: that many, evenly spaced, corners included)."""
    x0, y0, x1, y1 = (int(round(v)) for v in check_boxes(box).reshape(-1)[:4])
    xs, ys = _side(x0, x1), _side(y0, y1)
    top = np.stack([xs, np.full_like(xs, y0)], 1)
    bottom = np.stack([xs, np.full_like(xs, y1)], 1)
    left = np.stack([np.full_like(ys, x0), ys], 1)
    right = np.stack([np.full_like(ys, x1), ys], 1)
    return np.unique(np.concatenate([top, bottom, left, right]), axis=0).astype(np.float64)


def _distance_to_outline(points: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Euclidean distance from points to the outline of a box (inside points: to the nearest side)."""
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64).reshape(4)
    px, py = points[:, 0], points[:, 1]
    dx = np.maximum.reduce([x0 - px, np.zeros_like(px), px - x1])
    dy = np.maximum.reduce([y0 - py, np.zeros_like(py), py - y1])
    outside = np.hypot(dx, dy)
    inside = np.minimum.reduce([px - x0, x1 - px, py - y0, y1 - py])
    return np.where((dx > 0) | (dy > 0), outside, inside)


def box_boundary_distances(predicted: np.ndarray, truth: np.ndarray, image_size: Sequence[int]) -> dict[str, float]:
    """Hausdorff and average symmetric boundary distance between two boxes' outlines.

    Returns pixels and the same divided by the image diagonal (`image_size` = (height, width)).
    """
    diagonal = float(np.hypot(*check_frame_size(image_size)))
    a, b = box_outline(predicted), box_outline(truth)
    a_to_b, b_to_a = _distance_to_outline(a, truth), _distance_to_outline(b, predicted)
    hausdorff = float(max(a_to_b.max(), b_to_a.max()))
    average = float((a_to_b.sum() + b_to_a.sum()) / (len(a) + len(b)))
    return {
        "hausdorff": hausdorff,
        "average_boundary_distance": average,
        "hausdorff_normalized": hausdorff / diagonal,
        "average_boundary_distance_normalized": average / diagonal,
    }


def box_measures(predicted: np.ndarray, truth: np.ndarray, image_size: Sequence[int]) -> dict[str, float]:
    """IoU, GIoU, IoBB and the boundary distances of one predicted box against one ground-truth box."""
    for name, box in (("predicted", predicted), ("truth", truth)):
        if check_boxes(box).shape != (1, 4):
            raise LocalizationInputError(f"box_measures takes one {name} box, got {np.shape(box)}")
    measures = {
        "iou": float(pairwise_iou(predicted, truth)[0, 0]),
        "giou": float(pairwise_giou(predicted, truth)[0, 0]),
        "iobb": float(pairwise_iobb(predicted, truth)[0, 0]),
    }
    measures.update(box_boundary_distances(predicted, truth, image_size))
    return measures


IOU_THRESHOLDS_V2 = (0.3, 0.5, 0.7)


CXR_IOBB_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)


CXR_IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def threshold_ious(
    scoremap: np.ndarray, gt_boxes: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> tuple[np.ndarray, np.ndarray, ThresholdBoxes]:
    """For a normalized map: per threshold, the best IoU with any ground-truth box of the largest
    contour's box, and of any contour's box. Returns (largest (T,), multi (T,), the boxes)."""
    boxes = boxes_over_thresholds(quantize_scoremap(scoremap), thresholds)
    truth = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    count = len(thresholds)
    if len(truth) == 0:
        return np.zeros(count), np.zeros(count), boxes
    largest = pairwise_iou(boxes.largest, truth).max(axis=1)
    multi = np.zeros(count)
    np.maximum.at(multi, boxes.multi_owner, pairwise_iou(boxes.multi_boxes, truth).max(axis=1))
    return largest, multi, boxes


def _check_delta(delta: float) -> float:
    if not (isinstance(delta, (int, float, np.floating)) and 0 <= float(delta) <= 1):
        raise LocalizationInputError(f"an IoU threshold delta must be a number in [0, 1], got {delta!r}")
    return float(delta)


@dataclass
class LocalizationScores:
    """Per image and threshold: best IoU of the largest-contour box and of any contour box.

    `correct_class` marks images whose predicted class is right (for top-1 Loc).
    """

    largest_iou: np.ndarray  # (N, T)
    multi_iou: np.ndarray  # (N, T)
    correct_class: np.ndarray  # (N,) bool
    thresholds: np.ndarray  # (T,)

    @classmethod
    def from_maps(
        cls,
        scoremaps: Sequence[np.ndarray],
        gt_boxes: Sequence[np.ndarray],
        correct_class: Optional[Sequence[bool]] = None,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        workers: int = 1,
    ) -> LocalizationScores:
        """Score normalized maps (in the frame of their boxes). `workers` > 1 spreads images over
        threads (OpenCV releases the GIL while tracing contours)."""
        thresholds = check_thresholds(thresholds, increasing=True)
        if len(scoremaps) != len(gt_boxes):
            raise LocalizationInputError(f"{len(scoremaps)} score maps for {len(gt_boxes)} images' boxes")
        if correct_class is not None and len(correct_class) != len(scoremaps):
            raise LocalizationInputError(f"{len(correct_class)} correct_class flags for {len(scoremaps)} score maps")
        for index, (scoremap, boxes) in enumerate(zip(scoremaps, gt_boxes)):
            check_scoremap(scoremap, index)
            check_boxes(boxes, index)

        def one(item: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            largest, multi, _ = threshold_ious(item[0], item[1], thresholds)
            return largest, multi

        pairs = list(zip(scoremaps, gt_boxes))
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(one, pairs))
        else:
            results = [one(pair) for pair in pairs]
        largest = np.array([r[0] for r in results]).reshape(len(results), len(thresholds))
        multi = np.array([r[1] for r in results]).reshape(len(results), len(thresholds))
        correct = np.ones(len(results), bool) if correct_class is None else np.asarray(correct_class, bool)
        return cls(largest, multi, correct, thresholds)

    @classmethod
    def from_fixed_boxes(
        cls,
        boxes: Sequence[np.ndarray],
        gt_boxes: Sequence[np.ndarray],
        correct_class=None,
        thresholds=DEFAULT_THRESHOLDS,
    ) -> LocalizationScores:
        """A baseline that predicts the same box at every threshold (full image, a prior box)."""
        thresholds = check_thresholds(thresholds, increasing=True)
        if len(boxes) != len(gt_boxes) or (correct_class is not None and len(correct_class) != len(boxes)):
            raise LocalizationInputError(f"{len(boxes)} boxes for {len(gt_boxes)} images' ground truth")
        for index, (box, truth) in enumerate(zip(boxes, gt_boxes)):
            check_boxes(box, index)
            check_boxes(truth, index)
        ious = np.array([pairwise_iou(b, g).max() if len(np.asarray(g)) else 0.0 for b, g in zip(boxes, gt_boxes)])
        grid = np.repeat(ious[:, None], len(thresholds), axis=1)
        correct = np.ones(len(ious), bool) if correct_class is None else np.asarray(correct_class, bool)
        return cls(grid, grid.copy(), correct, np.asarray(thresholds, dtype=np.float64))

    def box_acc(self, delta: float = 0.5, multi_contour: bool = False) -> np.ndarray:
        """BoxAcc(tau, delta) in percent for every threshold tau: images whose box reaches IoU >= delta."""
        _check_delta(delta)
        ious = self.multi_iou if multi_contour else self.largest_iou
        # count * 100 / N, the reference's formula, so results are bit-identical to it.
        return (ious >= delta).sum(axis=0) * 100.0 / len(ious)

    def top1_loc(self, delta: float = 0.5) -> np.ndarray:
        """Per threshold: percent of images with the right class and IoU >= delta (largest contour)."""
        hits = (self.largest_iou >= _check_delta(delta)) & self.correct_class[:, None]
        return hits.sum(axis=0) * 100.0 / len(hits)

    def oracle(self) -> dict[str, float]:
        """Best over thresholds on this very split, as WSOL papers report (an upper bound)."""
        v2 = [self.box_acc(d, True).max() for d in IOU_THRESHOLDS_V2]
        best = int(self.box_acc(0.5).argmax())
        # top-1 Loc at MaxBoxAcc's threshold, the same rule as the calibrated path (not its own best).
        return {
            "MaxBoxAcc": float(self.box_acc(0.5).max()),
            "MaxBoxAccV2": float(np.mean(v2)),
            "top1_loc": float(self.top1_loc()[best]),
            "gt_known_loc": float(self.box_acc(0.5).max()),
            "threshold": float(self.thresholds[best]),
        }

    def at_thresholds(self, threshold_index: int, v2_indices: Sequence[int]) -> dict[str, float]:
        """Measures with thresholds fixed beforehand (chosen on another split)."""
        v2 = [self.box_acc(d, True)[i] for d, i in zip(IOU_THRESHOLDS_V2, v2_indices)]
        return {
            "MaxBoxAcc": float(self.box_acc(0.5)[threshold_index]),
            "MaxBoxAccV2": float(np.mean(v2)),
            "top1_loc": float(self.top1_loc()[threshold_index]),
            "gt_known_loc": float(self.box_acc(0.5)[threshold_index]),
            "threshold": float(self.thresholds[threshold_index]),
        }


def calibrate_thresholds(validation: LocalizationScores) -> tuple[int, list[int]]:
    """Threshold indices chosen on validation only: the MaxBoxAcc one (delta 0.5, largest contour) and
    one per MaxBoxAccV2 delta (all contours). Ties go to the lowest threshold."""
    main = int(validation.box_acc(0.5).argmax())
    per_delta = [int(validation.box_acc(d, True).argmax()) for d in IOU_THRESHOLDS_V2]
    return main, per_delta


def calibrated_report(validation: LocalizationScores, test: LocalizationScores) -> dict[str, dict[str, float]]:
    """Test measures at thresholds calibrated on validation, the test-set oracle beside them, and the
    validation measures at those thresholds (what a choice between maps may look at)."""
    main, per_delta = calibrate_thresholds(validation)
    return {
        "calibrated_on_validation": test.at_thresholds(main, per_delta),
        "test_oracle_max_over_thresholds": test.oracle(),
        "validation": validation.at_thresholds(main, per_delta),
    }


def boxes_to_mask(boxes: np.ndarray, frame_size: Sequence[int]) -> np.ndarray:
    """Rasterize inclusive xyxy boxes into a boolean (H, W) mask."""
    mask = np.zeros((int(frame_size[0]), int(frame_size[1])), dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        mask[max(int(y0), 0) : int(y1) + 1, max(int(x0), 0) : int(x1) + 1] = True
    return mask


def pixel_histograms(
    scoremaps: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    ignore_masks: Optional[Sequence[Optional[np.ndarray]]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the histograms of foreground and background pixel scores over the thresholds' bins
    ([0, t1), ..., [t_last, 1), [1, 2), [2, 3), wsolevaluation's mask evaluator): two (N, bins) arrays.
    `ignore_masks` (per image, boolean (H, W) or None) marks pixels counted neither as foreground nor as
    background; as in the reference, foreground pixels are taken out of the ignore region (they count)."""
    bins = check_thresholds(thresholds, increasing=True)
    if bins[-1] >= 1:
        raise LocalizationInputError("PxAP thresholds must lie below 1 (the last bins are [t, 1), [1, 2), [2, 3))")
    edges = np.append(bins, [1.0, 2.0, 3.0])
    if len(gt_boxes) != len(scoremaps) or (ignore_masks is not None and len(ignore_masks) != len(scoremaps)):
        raise LocalizationInputError(f"{len(scoremaps)} score maps for {len(gt_boxes)} images' boxes (or masks)")
    positive = np.zeros((len(scoremaps), len(edges) - 1))
    negative = np.zeros((len(scoremaps), len(edges) - 1))
    ignores = ignore_masks if ignore_masks is not None else [None] * len(scoremaps)
    for index, (scoremap, boxes, ignore) in enumerate(zip(scoremaps, gt_boxes, ignores)):
        scoremap = check_scoremap(scoremap, index)
        mask = boxes_to_mask(check_boxes(boxes, index), scoremap.shape)
        ignored = np.zeros(scoremap.shape, dtype=bool) if ignore is None else np.asarray(ignore, dtype=bool)
        if ignored.shape != scoremap.shape:
            raise LocalizationInputError(
                f"image {index}: ignore mask of shape {ignored.shape} does not match the score map's {scoremap.shape}"
            )
        keep = ~(ignored & ~mask)
        positive[index] = np.histogram(scoremap[mask & keep], bins=edges)[0]
        negative[index] = np.histogram(scoremap[~mask & keep], bins=edges)[0]
    return positive, negative


def average_precision_from_histograms(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """PxAP (percent) from pooled foreground/background histograms; rows of (R, bins) arrays are
    independent pools (one per bootstrap resample); a 1-D pair gives a 0-d array."""
    positive, negative = np.atleast_2d(positive), np.atleast_2d(negative)
    true_positive = positive[:, ::-1].cumsum(axis=1)
    false_positive = negative[:, ::-1].cumsum(axis=1)
    total = positive.sum(axis=1, keepdims=True)
    flagged = true_positive + false_positive
    valid = flagged != 0
    precision = np.divide(true_positive, flagged, out=np.zeros_like(true_positive), where=valid)
    recall = np.divide(true_positive, total, out=np.zeros_like(true_positive), where=total > 0)
    ap = np.where(valid[:, 1:], precision[:, 1:] * np.diff(recall, axis=1), 0.0).sum(axis=1) * 100.0
    empty = (total[:, 0] <= 0) | (flagged.max(axis=1) <= 0)
    return np.where(empty, np.nan, ap)


def pixel_average_precision(
    scoremaps: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    ignore_masks: Optional[Sequence[Optional[np.ndarray]]] = None,
) -> float:
    """PxAP (percent): area under the pixel precision-recall curve, boxes rasterized as masks; histograms
    accumulated over all images (`pixel_histograms`), precision weighted by recall steps."""
    positive, negative = pixel_histograms(scoremaps, gt_boxes, thresholds, ignore_masks)
    return float(average_precision_from_histograms(positive.sum(axis=0), negative.sum(axis=0))[0])


def pointing_hits(maps: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray]) -> np.ndarray:
    """The pointing game (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016), per image:
    whether the map's maximum falls inside a ground-truth box (inclusive xyxy, in the map's pixels).

    Where several pixels share the maximum (a constant map, a box mask), the point is the centre of mass of
    those pixels, rounded: a tie never counts as a hit everywhere at once, and a constant map points at the
    image centre. No tolerance margin (Zhang et al. allow 15 px; at 224 px that is a third of a median finding).
    Returns (N,) bool.
    """
    hits = np.zeros(len(maps), dtype=bool)
    for index, (scoremap, boxes) in enumerate(zip(maps, gt_boxes)):
        hits[index] = bool(_boxes_holding(_map_peak(scoremap), _as_boxes(boxes)).any())
    return hits


def _map_peak(scoremap: np.ndarray) -> tuple[int, int]:
    """The point a map points at (x, y): its maximum, the rounded centre of mass of the pixels tied there."""
    scoremap = np.asarray(scoremap)
    rows, columns = np.nonzero(scoremap == scoremap.max())
    return int(np.rint(columns.mean())), int(np.rint(rows.mean()))


def _boxes_holding(point: tuple[int, int], boxes: np.ndarray) -> np.ndarray:
    """Which of the (K, 4) inclusive xyxy boxes hold the point: (K,) bool."""
    x, y = point
    return (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])


def pointing_game_per_finding(
    maps: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray], gt_findings: Sequence[Sequence[str]]
) -> dict[str, dict[str, float]]:
    """The pointing game (`pointing_hits`) of each finding: among the images with that finding, the share
    (%) whose map peaks inside one of that finding's boxes. It tells which findings a map misses: a compact
    nodule, or atelectasis whose indirect signs (a raised hemidiaphragm) lie outside its box.
    Returns {finding: {"images": n, "pointing_game": %}}."""
    if not len(maps) == len(gt_boxes) == len(gt_findings):
        raise LocalizationInputError(
            f"{len(maps)} maps, {len(gt_boxes)} box lists and {len(gt_findings)} finding lists"
        )
    hits: dict[str, list[bool]] = {}
    for scoremap, boxes, names in zip(maps, _boxes_of_findings(gt_boxes, gt_findings), gt_findings):
        inside = _boxes_holding(_map_peak(scoremap), boxes)
        for finding in sorted(set(names)):
            hits.setdefault(finding, []).append(bool(inside[[n == finding for n in names]].any()))
    return {
        finding: {"images": len(found), "pointing_game": 100.0 * float(np.mean(found))}
        for finding, found in sorted(hits.items())
    }


def localization_intervals(
    weights: np.ndarray,
    test: LocalizationScores,
    threshold_indices: tuple[int, Sequence[int]],
    histograms: Optional[tuple[np.ndarray, np.ndarray]] = None,
    hits: Optional[np.ndarray] = None,
) -> dict[str, list[float]]:
    """95 % percentile intervals over bootstrap resamples of the test images (`weights`: (R, N)
    multiplicities) of MaxBoxAcc and MaxBoxAccV2 at the thresholds fixed on validation, of PxAP when
    the per-image pixel histograms are given, and of the pointing game when its per-image `hits` are. The
    thresholds are not re-chosen per resample: they come from validation, as the point estimate's."""
    main, per_delta = threshold_indices
    total = weights.sum(axis=1)
    box_acc = weights @ (test.largest_iou[:, main] >= 0.5) * 100.0 / total
    v2 = np.mean(
        [weights @ (test.multi_iou[:, i] >= d) * 100.0 / total for d, i in zip(IOU_THRESHOLDS_V2, per_delta)], axis=0
    )
    intervals = {"MaxBoxAcc": percentile_interval(box_acc), "MaxBoxAccV2": percentile_interval(v2)}
    if histograms is not None:
        intervals["PxAP"] = percentile_interval(
            average_precision_from_histograms(weights @ histograms[0], weights @ histograms[1])
        )
    if hits is not None:
        intervals["pointing_game"] = percentile_interval(weights @ hits * 100.0 / total)
    return intervals


def cxr_protocol(
    predicted_boxes: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    gt_findings: Sequence[Sequence[str]],
    iobb_thresholds: Sequence[float] = CXR_IOBB_THRESHOLDS,
    iou_thresholds: Sequence[float] = CXR_IOU_THRESHOLDS,
) -> dict[str, dict[str, dict[str, float]]]:
    """Wang et al. (CVPR 2017) localization protocol, per finding.

    A ground-truth box counts as localized at T when some predicted box on its image reaches IoBB (or
    IoU) >= T; accuracy is the fraction of a finding's boxes localized. A predicted box that reaches T
    with no ground-truth box of its image is a false positive; AFP is their number per image that has
    the finding. Returns {finding: {"iobb@T": {"accuracy", "afp"}, "iou@T": {...}}}.
    """
    if not len(predicted_boxes) == len(gt_boxes) == len(gt_findings):
        raise LocalizationInputError(
            f"{len(predicted_boxes)} predicted, {len(gt_boxes)} ground-truth and {len(gt_findings)} finding lists"
        )
    _boxes_of_findings(gt_boxes, gt_findings)
    for index, predicted in enumerate(predicted_boxes):
        check_boxes(predicted, index, allow_empty=True)
    for level in (*iobb_thresholds, *iou_thresholds):
        check_thresholds(level)
    findings = sorted({f for fs in gt_findings for f in fs})
    measures = (("iobb", pairwise_iobb, iobb_thresholds), ("iou", pairwise_iou, iou_thresholds))
    return {
        finding: {
            f"{name}@{level:g}": _finding_at_level(finding, measure, level, predicted_boxes, gt_boxes, gt_findings)
            for name, measure, levels in measures
            for level in levels
        }
        for finding in findings
    }


def _boxes_of_findings(gt_boxes: Sequence[np.ndarray], gt_findings: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """Each image's checked (K, 4) boxes, one per finding name, else `LocalizationInputError` naming the image."""
    checked = []
    for index, (truth, names) in enumerate(zip(gt_boxes, gt_findings)):
        boxes = check_boxes(truth, index, allow_empty=True)
        if len(boxes) != len(names):
            raise LocalizationInputError(f"image {index}: {len(boxes)} boxes, {len(names)} findings")
        checked.append(boxes)
    return checked


def _finding_at_level(
    finding: str,
    measure: Callable[[np.ndarray, np.ndarray], np.ndarray],
    level: float,
    predicted_boxes: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    gt_findings: Sequence[Sequence[str]],
) -> dict[str, float]:
    """`cxr_protocol`'s accuracy and AFP of one finding at one IoBB or IoU level."""
    found = total = false_positives = images = 0
    for predicted, truth, names in zip(predicted_boxes, gt_boxes, gt_findings):
        names = list(names)
        if finding not in names:
            continue
        images += 1
        truth = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
        predicted = np.asarray(predicted, dtype=np.float64).reshape(-1, 4)
        of_finding = truth[[n == finding for n in names]]
        total += len(of_finding)
        if len(predicted) == 0:
            continue
        found += int((measure(predicted, of_finding) >= level).any(axis=0).sum())
        false_positives += int((~(measure(predicted, truth) >= level).any(axis=1)).sum())
    return {
        "accuracy": found / total if total else float("nan"),
        "afp": false_positives / images if images else float("nan"),
    }


class ClassificationInputError(ValueError):
    """Labels or probabilities the classification metrics cannot score; the message says which and why."""


def check_classification_inputs(labels: Sequence[int], probabilities: np.ndarray,
                                num_classes: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Integer labels in [0, num_classes) and finite (N, num_classes) probabilities, one row per label."""
    try:
        raw = np.asarray(labels)
        probabilities = np.asarray(probabilities, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ClassificationInputError(f"labels and probabilities must be numbers: {error}") from error
    whole = raw.dtype.kind in "iub" or (
        raw.dtype.kind == "f" and bool(np.isfinite(raw).all()) and bool((raw == np.round(raw)).all())
    )
    if raw.ndim != 1 or not whole:
        raise ClassificationInputError(f"labels must be 1-D class indices, got dtype {raw.dtype}, shape {raw.shape}")
    labels = raw.astype(np.int64)
    if probabilities.shape != (len(labels), num_classes):
        raise ClassificationInputError(
            f"probabilities of shape {probabilities.shape} for {len(labels)} labels and {num_classes} classes"
        )
    if len(labels) == 0:
        raise ClassificationInputError("no labels to score")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ClassificationInputError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    if not np.isfinite(probabilities).all():
        raise ClassificationInputError("probabilities hold NaN or infinite values")
    return labels, probabilities


def classification_metrics(labels: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, per-class precision/recall/F1, macro F1, one-vs-rest ROC-AUC,
    confusion matrix (rows: truth, columns: prediction)."""
    try:
        from sklearn import metrics as skm
    except ImportError as error:
        raise ImportError("classification_metrics needs scikit-learn: pip install scikit-learn") from error
    labels, probabilities = check_classification_inputs(labels, probabilities, len(class_names))
    predictions = probabilities.argmax(axis=1)
    classes = list(range(len(class_names)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0
    )
    result = {
        "accuracy": float(skm.accuracy_score(labels, predictions)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, predictions)),
        "macro_f1": float(np.mean(f1)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for name, p, r, f, n in zip(class_names, precision, recall, f1, support)
        },
        "confusion_matrix": skm.confusion_matrix(labels, predictions, labels=classes).tolist(),
    }
    aucs = {}
    for index, name in enumerate(class_names):
        positives = labels == index
        if positives.any() and (~positives).any():
            aucs[name] = float(skm.roc_auc_score(positives, probabilities[:, index]))
    result["roc_auc_ovr"] = aucs
    result["macro_roc_auc_ovr"] = float(np.mean(list(aucs.values()))) if aucs else float("nan")
    return result


@dataclass
class EvaluationSplit:
    """One split's inputs to the localization harness, all in the evaluation frame (H, W).

    maps: {name: (N, h, w) score maps of the class being localized}, e.g. "attention" (F0),
    "semantic" (S0, CAM-like), "coupled" (F0 * S0). gt_boxes: per image (K, 4). correct_class: (N,) bool.
    """

    maps: dict[str, np.ndarray]
    gt_boxes: list[np.ndarray]
    frame_size: tuple[int, int]
    correct_class: np.ndarray
    gt_findings: Optional[list[list[str]]] = None


def _random_maps(count: int, grid: Sequence[int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, int(grid[0]), int(grid[1]))).astype(np.float32)


def mean_box_measures(
    predicted: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray], frame_size: Sequence[int]
) -> dict[str, float]:
    """Mean over images of `box_measures` between each image's predicted box and the ground-truth box
    it overlaps most (IoU, GIoU, IoBB, Hausdorff and average boundary distance, pixels and /diagonal)."""
    per_image = []
    for boxes, truth in zip(predicted, gt_boxes):
        box = _as_boxes(boxes)[:1]
        truth = _as_boxes(truth)
        if len(truth) == 0:
            continue
        match = truth[int(pairwise_iou(box, truth)[0].argmax())]
        per_image.append(box_measures(box, match[None], frame_size))
    if not per_image:
        return {}
    return {f"mean_{key}": float(np.mean([m[key] for m in per_image])) for key in per_image[0]}


# What a choice between maps (or between settings of one map) on the validation boxes looks at: all three ask
# something a map parked on one spot cannot fake together. MaxBoxAccV2 alone did not suffice: an attention map
# sitting on the film's border, its box as large as the image, won it with a pointing game of 0-0.5 %
# (bench/RESULTS.md, issue 31).
CHOICE_MEASURES = ("MaxBoxAccV2", "PxAP", "pointing_game")


def map_choice_score(validation: dict[str, float]) -> float:
    """The mean of `CHOICE_MEASURES` (each in percent) in a map's validation row; NaN measures (no boxed
    validation image) count as 0."""
    values = [float(validation.get(name, float("nan"))) for name in CHOICE_MEASURES]
    return float(np.mean([value if np.isfinite(value) else 0.0 for value in values]))


@dataclass
class _ValidationCandidate:
    """One smoothing width of one map, scored on the validation boxes."""

    sigma: float
    scores: LocalizationScores
    row: dict[str, float]  # the measures at thresholds calibrated there, PxAP and the pointing game


def frame_maps(grid_maps: np.ndarray, sigma: float, frame_size: Sequence[int]) -> list[np.ndarray]:
    """Maps on the model's grid, smoothed (`smooth_grid_map`) and upsampled to the evaluation frame: what every
    box and pixel measure scores."""
    return [upsample_scoremap(smooth_grid_map(m, sigma), frame_size) for m in grid_maps]


def _validation_candidate(
    grid_maps: np.ndarray, validation: EvaluationSplit, sigma: float, thresholds: Sequence[float]
) -> _ValidationCandidate:
    maps = frame_maps(grid_maps, sigma, validation.frame_size)
    scores = LocalizationScores.from_maps(maps, validation.gt_boxes, validation.correct_class, thresholds=thresholds)
    row = scores.at_thresholds(*calibrate_thresholds(scores))
    row.update(threshold_free_measures(maps, validation.gt_boxes, thresholds))
    return _ValidationCandidate(sigma, scores, row)


def choose_smoothing(
    grid_maps: np.ndarray, validation: EvaluationSplit, sigmas: Sequence[float], thresholds: Sequence[float]
) -> tuple[_ValidationCandidate, dict[str, float]]:
    """The smoothing width (`smooth_grid_map`) among `sigmas` whose maps score best on the validation boxes
    (`map_choice_score`; the narrower width on ties), and every width's score."""
    best: Optional[_ValidationCandidate] = None
    choice: dict[str, float] = {}
    for sigma in sorted({check_smoothing(s) for s in sigmas}):
        candidate = _validation_candidate(grid_maps, validation, sigma, thresholds)
        choice[f"{sigma:g}"] = map_choice_score(candidate.row)
        if best is None or choice[f"{sigma:g}"] > map_choice_score(best.row):
            best = candidate
    if best is None:
        raise ValueError("choose_smoothing needs at least one smoothing width")
    return best, choice


def localization_table(
    validation: EvaluationSplit,
    test: EvaluationSplit,
    prior_box: Optional[np.ndarray] = None,
    seed: int = 0,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    upsampled_test_maps: Optional[dict[str, list[np.ndarray]]] = None,
    resample_weights: Optional[np.ndarray] = None,
    smoothing_sigmas: Sequence[float] = (0.0,),
) -> dict[str, dict]:
    """Every localization result with its baselines, thresholds calibrated on validation.

    Rows: each map in `maps`, a random map, the full-image box, and `prior_box` (the mean ground-truth
    box of the train split, in the frame) when given. Each row holds the calibrated test measures, the
    test oracle, PxAP on test, and `box_measures`: the mean IoU/GIoU/IoBB/boundary distances of the
    largest-contour box at the threshold calibrated on validation (the fixed box for the box rows).
    Each map is smoothed on its grid (`smooth_grid_map`) with the width among `smoothing_sigmas` that scores
    best on validation (`choose_smoothing`), recorded as `smoothing_sigma`, every width's validation score as
    `smoothing_choice`; the random map is never smoothed.
    `upsampled_test_maps`, when given, receives each map row's test maps in the frame. With
    `resample_weights` ((R, N) bootstrap multiplicities of the test images) each row also holds `ci95`:
    95 % intervals of MaxBoxAcc, MaxBoxAccV2 (thresholds from validation) and PxAP.
    """
    rows: dict[str, dict] = {}
    grid = next(iter(test.maps.values())).shape[1:]
    map_sets = dict(test.maps)
    val_sets = dict(validation.maps)
    map_sets["random"] = _random_maps(len(test.gt_boxes), grid, seed + 1)
    val_sets["random"] = _random_maps(len(validation.gt_boxes), grid, seed)
    for name in map_sets:
        chosen, choice = choose_smoothing(
            val_sets[name], validation, (0.0,) if name == "random" else smoothing_sigmas, thresholds
        )
        test_maps = frame_maps(map_sets[name], chosen.sigma, test.frame_size)
        if upsampled_test_maps is not None:  # the caller reuses them instead of upsampling again
            upsampled_test_maps[name] = test_maps
        test_scores = LocalizationScores.from_maps(test_maps, test.gt_boxes, test.correct_class, thresholds=thresholds)
        rows[name] = calibrated_report(chosen.scores, test_scores)
        _add_threshold_free_measures(
            rows[name], test_maps, test.gt_boxes, thresholds, chosen.scores, test_scores, resample_weights
        )
        # The threshold-free measures on validation too: what the choice of the released map may look at.
        rows[name]["validation"] = chosen.row
        rows[name]["smoothing_sigma"] = chosen.sigma
        rows[name]["smoothing_choice"] = choice
        tau = rows[name]["calibrated_on_validation"]["threshold"]
        predicted = [scoremap_to_boxes(m, tau, normalized=True) for m in test_maps]
        rows[name]["box_measures"] = mean_box_measures(predicted, test.gt_boxes, test.frame_size)
    height, width = test.frame_size
    fixed = {"full_image": np.array([0, 0, width - 1, height - 1], dtype=np.float64)}
    if prior_box is not None:
        fixed["train_mean_box"] = np.asarray(prior_box, dtype=np.float64)
    for name, box in fixed.items():
        rows[name] = _fixed_box_row(box, validation, test, thresholds, resample_weights)
    return rows


def _fixed_box_row(
    box: np.ndarray, validation: EvaluationSplit, test: EvaluationSplit, thresholds: Sequence[float],
    resample_weights: Optional[np.ndarray],
) -> dict:  # fmt: skip
    """`localization_table`'s row of a box baseline: the same box on every image."""
    scores, val = (
        LocalizationScores.from_fixed_boxes([box] * len(part.gt_boxes), part.gt_boxes, part.correct_class, thresholds)
        for part in (test, validation)
    )
    row = calibrated_report(val, scores)
    box_map = boxes_to_mask(box, test.frame_size).astype(np.float32)
    box_maps = [box_map] * len(test.gt_boxes)
    _add_threshold_free_measures(row, box_maps, test.gt_boxes, thresholds, val, scores, resample_weights)
    row["box_measures"] = mean_box_measures([box] * len(test.gt_boxes), test.gt_boxes, test.frame_size)
    return row


def threshold_free_measures(
    maps: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray], thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict[str, float]:
    """{"PxAP", "pointing_game"} (percent) of maps in the frame against their boxes; NaN without images."""
    return _pxap_and_pointing(pixel_histograms(maps, gt_boxes, thresholds), pointing_hits(maps, gt_boxes))


def _pxap_and_pointing(histograms: tuple[np.ndarray, np.ndarray], hits: np.ndarray) -> dict[str, float]:
    pxap = float(average_precision_from_histograms(histograms[0].sum(axis=0), histograms[1].sum(axis=0))[0])
    return {"PxAP": pxap, "pointing_game": float(hits.mean() * 100.0) if len(hits) else float("nan")}


def _add_threshold_free_measures(
    row: dict, maps: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray], thresholds: Sequence[float],
    validation: LocalizationScores, test: LocalizationScores, resample_weights: Optional[np.ndarray],
) -> None:  # fmt: skip
    """PxAP and the pointing game of a row (neither needs a threshold), and the row's bootstrap intervals when
    asked for."""
    histograms = pixel_histograms(maps, gt_boxes, thresholds)
    hits = pointing_hits(maps, gt_boxes)
    row.update(_pxap_and_pointing(histograms, hits))
    if resample_weights is not None:
        row["ci95"] = localization_intervals(
            resample_weights, test, calibrate_thresholds(validation), histograms, hits
        )
