"""Score map -> boxes, the weakly-supervised localization way: one implementation for the image
processor's post-processing and for the evaluation metrics.

Conventions follow clovaai/wsolevaluation (Choe et al., "Evaluating Weakly Supervised Object
Localization Methods Right", CVPR 2020), so that numbers are comparable with the WSOL literature:

* A score map is min-max normalized to [0, 1]; a map with NaN or with a single value becomes all zeros.
* It is quantized to uint8 (`int(map * 255)`), and thresholded at `int(tau * max)` keeping pixels
  strictly above it (OpenCV's THRESH_BINARY).
* Contours are OpenCV's (`RETR_TREE`, `CHAIN_APPROX_SIMPLE`, hole outlines included); the largest by
  `cv2.contourArea`, or all of them.
* A box is the contour's bounding rectangle as inclusive pixel corners (x0, y0, x1, y1), with
  x1 = min(x + w, W - 1) and y1 = min(y + h, H - 1).
* A threshold that leaves no contour yields the single box (0, 0, 0, 0).

This file is uploaded with the model as remote code, so it imports only numpy and OpenCV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

try:
    import cv2
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("localization needs OpenCV: pip install opencv-python-headless") from error

# OpenCV 3 returns (image, contours, hierarchy); 4 and later (contours, hierarchy).
_CONTOUR_INDEX = 1 if cv2.__version__.split(".")[0] == "3" else 0
# wsolevaluation's `cam_curve_interval`: its CLI default 0.01 (used while training) and the 0.001 of its
# published configs (used for the final test numbers).
DEFAULT_THRESHOLDS = np.arange(0, 1, 0.01)
FINE_THRESHOLDS = np.arange(0, 1, 0.001)


class LocalizationInputError(ValueError):
    """A score map or box the metrics cannot score: non-finite values, a normalized map outside
    [0, 1], a box that is inverted, non-finite or negative, an image without ground-truth box. The
    message names the image (its position in the inputs). wsolevaluation rejects the same inputs."""


def _where(index: Optional[int]) -> str:
    return "" if index is None else f"image {index}: "


def check_scoremap(scoremap: np.ndarray, index: Optional[int] = None, normalized: bool = True) -> np.ndarray:
    """A 2-D, finite map (in [0, 1] when `normalized`), else `LocalizationInputError`."""
    scoremap = np.asarray(scoremap)
    if scoremap.ndim != 2 or scoremap.size == 0:
        raise LocalizationInputError(
            f"{_where(index)}a score map must be a non-empty 2-D array, got shape {scoremap.shape}"
        )
    if not np.issubdtype(scoremap.dtype, np.number) or not np.isfinite(scoremap).all():
        raise LocalizationInputError(f"{_where(index)}the score map holds NaN or infinite values")
    if normalized and (scoremap.min() < 0 or scoremap.max() > 1):
        raise LocalizationInputError(
            f"{_where(index)}a normalized score map must lie in [0, 1], "
            f"got [{scoremap.min():.4g}, {scoremap.max():.4g}]"
        )
    return scoremap


def check_boxes(boxes: np.ndarray, index: Optional[int] = None, allow_empty: bool = False) -> np.ndarray:
    """(K, 4) finite, non-negative, x0 <= x1 and y0 <= y1 (inclusive corners), else `LocalizationInputError`."""
    try:
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    except (TypeError, ValueError) as error:
        raise LocalizationInputError(f"{_where(index)}boxes must be (K, 4) numbers: {error}") from error
    if len(boxes) == 0 and not allow_empty:
        raise LocalizationInputError(f"{_where(index)}no ground-truth box; score only images that have one")
    if not np.isfinite(boxes).all() or (boxes < 0).any():
        raise LocalizationInputError(f"{_where(index)}boxes must be finite and non-negative, got {boxes.tolist()}")
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        raise LocalizationInputError(
            f"{_where(index)}box {boxes[inverted][0].tolist()} is inverted: corners must be (x0, y0, x1, y1) "
            "with x0 <= x1 and y0 <= y1"
        )
    return boxes


def _float_map(scoremap: np.ndarray) -> np.ndarray:
    """Float maps keep their precision (the reference computes in the map's own dtype); others become float32."""
    scoremap = np.asarray(scoremap)
    return scoremap if scoremap.dtype in (np.float32, np.float64) else scoremap.astype(np.float32)


def normalize_scoremap(scoremap: np.ndarray) -> np.ndarray:
    """Min-max normalize to [0, 1] in the map's precision (float32 unless float64); NaN-containing or
    constant maps become zeros."""
    scoremap = _float_map(scoremap)
    if np.isnan(scoremap).any():
        return np.zeros_like(scoremap)
    low, high = float(scoremap.min()), float(scoremap.max())
    if high == low:
        return np.zeros_like(scoremap)
    return (scoremap - low) / (high - low)


def quantize_scoremap(scoremap: np.ndarray) -> np.ndarray:
    """[0, 1] float map -> uint8 as the reference does it: `x * 255` in the map's own precision, then
    truncation (not rounding). A float64 map cast to float32 first would move pixels across levels.
    Values outside [0, 1] or NaN would wrap around in uint8: they raise `LocalizationInputError`."""
    return (_float_map(check_scoremap(scoremap)) * 255).astype(np.uint8)


def _contours(binary: np.ndarray) -> Sequence[np.ndarray]:
    return cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[_CONTOUR_INDEX]


def _rect(contour: np.ndarray, height: int, width: int) -> list[int]:
    x, y, w, h = cv2.boundingRect(contour)
    return [x, y, min(x + w, width - 1), min(y + h, height - 1)]


def boxes_at_threshold(
    quantized: np.ndarray, threshold: float, multi_contour: bool = False
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Boxes of one threshold on a quantized (uint8) score map.

    Returns:
        boxes: (K, 4) int64 inclusive xyxy; (1, 4) zeros when nothing passes the threshold.
        contours: the K contours behind the boxes (empty when nothing passes).
    """
    height, width = quantized.shape
    level = int(threshold * int(quantized.max()))
    binary = np.where(quantized > level, np.uint8(255), np.uint8(0))
    contours = _contours(binary)
    if len(contours) == 0:
        return np.zeros((1, 4), dtype=np.int64), []
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = np.array([_rect(c, height, width) for c in contours], dtype=np.int64)
    return boxes, list(contours)


def scoremap_to_boxes(
    scoremap: np.ndarray,
    threshold: Union[float, Sequence[float]] = 0.5,
    multi_contour: bool = False,
    normalized: bool = False,
) -> Union[np.ndarray, list[np.ndarray]]:
    """Boxes from a score map at one threshold (returns (K, 4)) or at each of several (a list).

    Args:
        scoremap: (H, W) map at the resolution the boxes should be in.
        threshold: tau, a fraction of the map's maximum, or a sequence of them.
        multi_contour: one box per contour instead of the largest contour's only.
        normalized: the map is already min-max normalized.
    """
    quantized = quantize_scoremap(scoremap if normalized else normalize_scoremap(scoremap))
    if np.ndim(threshold) == 0:
        return boxes_at_threshold(quantized, float(threshold), multi_contour)[0]
    return [boxes_at_threshold(quantized, float(t), multi_contour)[0] for t in threshold]


def boxes_with_scores(
    heatmap: np.ndarray, threshold: float, multi_contour: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of a [0, 1] heatmap at one threshold, each with the mean heatmap value inside its contour.

    Returns (K, 4) int64 boxes and (K,) float32 scores; K = 0 when nothing passes the threshold.
    """
    boxes, contours = boxes_at_threshold(quantize_scoremap(heatmap), threshold, multi_contour)
    if not contours:
        return np.zeros((0, 4), dtype=np.int64), np.zeros((0,), dtype=np.float32)
    scores = []
    for contour in contours:
        mask = np.zeros(heatmap.shape, dtype=np.uint8)
        cv2.drawContours(mask, [contour], -1, 1, thickness=cv2.FILLED)
        inside = heatmap[mask.astype(bool)]
        scores.append(float(inside.mean()) if inside.size else 0.0)
    return boxes, np.asarray(scores, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# All thresholds at once (identical boxes to `boxes_at_threshold` at each threshold)
# ------------------------------------------------------------------------------------------------


@dataclass
class ThresholdBoxes:
    """Boxes of one score map at every threshold of a grid, from one contour pass per threshold.

    `multi_boxes[multi_owner == t]` are all contours' boxes at threshold t (a zero box when nothing
    passes), `largest[t]` the box of the largest contour at t: exactly what `boxes_at_threshold` returns
    with `multi_contour=True` and `False`.
    """

    multi_boxes: np.ndarray  # (M, 4) int64
    multi_owner: np.ndarray  # (M,) threshold index of each box
    largest: np.ndarray  # (T, 4) int64


def boxes_over_thresholds(quantized: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> ThresholdBoxes:
    """Boxes at every threshold of a quantized (uint8) score map, identical to the per-threshold loop.

    Each threshold's binary map is cropped to the bounding box of its pixels (one margin pixel kept, so
    the contours and their order are unchanged); boxes, contour areas and the largest contour of every
    threshold are then computed from all contours at once instead of one OpenCV call per contour.
    """
    levels = (np.asarray(thresholds, dtype=np.float64) * int(quantized.max())).astype(np.int64)
    # A uint8 map has at most 256 levels: the 1,000 thresholds of a 0.001 grid share their contour passes.
    unique, inverse = np.unique(levels, return_inverse=True)
    if len(unique) == len(levels):
        return _boxes_over_levels(quantized, levels)
    found = _boxes_over_levels(quantized, unique)
    order = np.argsort(found.multi_owner, kind="stable")
    owner_sorted = found.multi_owner[order]
    counts = np.bincount(owner_sorted, minlength=len(unique))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    per_threshold = counts[inverse]
    first = np.repeat(starts[inverse], per_threshold)
    within = np.arange(per_threshold.sum()) - np.repeat(np.cumsum(per_threshold) - per_threshold, per_threshold)
    rows_taken = order[first + within]
    return ThresholdBoxes(
        found.multi_boxes[rows_taken], np.repeat(np.arange(len(levels)), per_threshold), found.largest[inverse]
    )


def _boxes_over_levels(quantized: np.ndarray, levels: np.ndarray) -> ThresholdBoxes:
    """`boxes_over_thresholds` for integer levels (pixels strictly above a level are foreground)."""
    height, width = quantized.shape
    rows = quantized.max(axis=1)[None, :] > levels[:, None]
    cols = quantized.max(axis=0)[None, :] > levels[:, None]
    present = rows.any(axis=1)
    top, bottom = rows.argmax(axis=1), height - 1 - rows[:, ::-1].argmax(axis=1)
    left, right = cols.argmax(axis=1), width - 1 - cols[:, ::-1].argmax(axis=1)
    contours: list[np.ndarray] = []
    runs: list[tuple[int, int, int, int]] = []  # (threshold, contour count, crop x0, crop y0)
    bounds = np.stack([top, bottom, left, right], axis=1).tolist()
    level_list = levels.tolist()
    for t in np.flatnonzero(present).tolist():
        y_top, y_bottom, x_left, x_right = bounds[t]
        y0, y1 = max(y_top - 1, 0), min(y_bottom + 2, height)
        x0, x1 = max(x_left - 1, 0), min(x_right + 2, width)
        _, binary = cv2.threshold(quantized[y0:y1, x0:x1], level_list[t], 255, cv2.THRESH_BINARY)
        found = _contours(binary)
        contours.extend(found)
        runs.append((t, len(found), x0, y0))
    count = len(levels)
    largest = np.zeros((count, 4), dtype=np.int64)
    if not contours:
        return ThresholdBoxes(np.zeros((count, 4), dtype=np.int64), np.arange(count), largest)
    lengths = np.fromiter((len(c) for c in contours), dtype=np.int64, count=len(contours))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    points = np.concatenate(contours).reshape(-1, 2).astype(np.int64)
    run = np.asarray(runs, dtype=np.int64)
    owner = np.repeat(run[:, 0], run[:, 1])
    points += np.repeat(np.repeat(run[:, 2:], run[:, 1], axis=0), lengths, axis=0)
    xs, ys = points[:, 0], points[:, 1]
    boxes = np.stack(
        [
            np.minimum.reduceat(xs, starts),
            np.minimum.reduceat(ys, starts),
            np.minimum(np.maximum.reduceat(xs, starts) + 1, width - 1),
            np.minimum(np.maximum.reduceat(ys, starts) + 1, height - 1),
        ],
        axis=1,
    )
    # cv2.contourArea: |sum over edges of (x_prev * y - y_prev * x)| / 2, the previous point of the first
    # being the last; exact in float64 for pixel coordinates.
    previous = np.arange(len(points)) - 1
    previous[starts] = starts + lengths - 1
    cross = xs[previous].astype(np.float64) * ys - ys[previous].astype(np.float64) * xs
    areas = np.abs(np.add.reduceat(cross, starts)) * 0.5
    # Largest contour per threshold, first one on ties (as Python's max): sort by threshold, then by
    # area descending, then by position, and keep each threshold's first.
    order = np.lexsort((np.arange(len(areas)), -areas, owner))
    first = order[np.r_[True, owner[order][1:] != owner[order][:-1]]]
    largest[owner[first]] = boxes[first]
    empty = np.flatnonzero(~np.isin(np.arange(count), owner))
    multi_boxes = np.concatenate([boxes, np.zeros((len(empty), 4), dtype=np.int64)])
    multi_owner = np.concatenate([owner, empty])
    return ThresholdBoxes(multi_boxes, multi_owner, largest)


# ------------------------------------------------------------------------------------------------
# Per-image measures
# ------------------------------------------------------------------------------------------------


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


def box_outline(box: np.ndarray) -> np.ndarray:
    """Integer points on the outline of an inclusive box, one per unit step."""
    x0, y0, x1, y1 = (int(round(v)) for v in np.asarray(box).reshape(4))
    xs, ys = np.arange(x0, x1 + 1), np.arange(y0, y1 + 1)
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
    a, b = box_outline(predicted), box_outline(truth)
    a_to_b, b_to_a = _distance_to_outline(a, truth), _distance_to_outline(b, predicted)
    hausdorff = float(max(a_to_b.max(), b_to_a.max()))
    average = float((a_to_b.sum() + b_to_a.sum()) / (len(a) + len(b)))
    diagonal = float(np.hypot(*image_size))
    return {
        "hausdorff": hausdorff,
        "average_boundary_distance": average,
        "hausdorff_normalized": hausdorff / diagonal,
        "average_boundary_distance_normalized": average / diagonal,
    }


def box_measures(predicted: np.ndarray, truth: np.ndarray, image_size: Sequence[int]) -> dict[str, float]:
    """IoU, GIoU, IoBB and the boundary distances of one predicted box against one ground-truth box."""
    measures = {
        "iou": float(pairwise_iou(predicted, truth)[0, 0]),
        "giou": float(pairwise_giou(predicted, truth)[0, 0]),
        "iobb": float(pairwise_iobb(predicted, truth)[0, 0]),
    }
    measures.update(box_boundary_distances(predicted, truth, image_size))
    return measures


# ------------------------------------------------------------------------------------------------
# Dataset-level measures
# ------------------------------------------------------------------------------------------------

IOU_THRESHOLDS_V2 = (0.3, 0.5, 0.7)
CXR_IOBB_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
CXR_IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def upsample_scoremap(grid_map: np.ndarray, frame_size: Sequence[int]) -> np.ndarray:
    """A (h, w) map -> min-max normalized (H, W) float32 map, bicubic, as wsolevaluation's CAM computer."""
    height, width = int(frame_size[0]), int(frame_size[1])
    check_scoremap(grid_map, normalized=False)
    resized = cv2.resize(np.asarray(grid_map, dtype=np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return normalize_scoremap(resized)


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
        thresholds = np.asarray(thresholds, dtype=np.float64)
        if len(scoremaps) != len(gt_boxes):
            raise LocalizationInputError(f"{len(scoremaps)} score maps for {len(gt_boxes)} images' boxes")
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
        for index, (box, truth) in enumerate(zip(boxes, gt_boxes)):
            check_boxes(box, index)
            check_boxes(truth, index)
        ious = np.array([pairwise_iou(b, g).max() if len(np.asarray(g)) else 0.0 for b, g in zip(boxes, gt_boxes)])
        grid = np.repeat(ious[:, None], len(thresholds), axis=1)
        correct = np.ones(len(ious), bool) if correct_class is None else np.asarray(correct_class, bool)
        return cls(grid, grid.copy(), correct, np.asarray(thresholds, dtype=np.float64))

    def box_acc(self, delta: float = 0.5, multi_contour: bool = False) -> np.ndarray:
        """BoxAcc(tau, delta) in percent for every threshold tau: images whose box reaches IoU >= delta."""
        ious = self.multi_iou if multi_contour else self.largest_iou
        # count * 100 / N, the reference's formula, so results are bit-identical to it.
        return (ious >= delta).sum(axis=0) * 100.0 / len(ious)

    def top1_loc(self, delta: float = 0.5) -> np.ndarray:
        """Per threshold: percent of images with the right class and IoU >= delta (largest contour)."""
        hits = (self.largest_iou >= delta) & self.correct_class[:, None]
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


def pixel_average_precision(
    scoremaps: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    ignore_masks: Optional[Sequence[Optional[np.ndarray]]] = None,
) -> float:
    """PxAP (percent): area under the pixel precision-recall curve, boxes rasterized as masks.

    Histograms over the thresholds' bins, accumulated over all images, as wsolevaluation's mask
    evaluator ([0, t1), ..., [t_last, 1), [1, 2), [2, 3) bins; precision weighted by recall steps).
    `ignore_masks` (per image, boolean (H, W) or None) marks pixels counted neither as foreground nor as
    background, as the reference's "ignore" regions (they override the foreground).
    """
    edges = np.append(np.asarray(thresholds, dtype=np.float64), [1.0, 2.0, 3.0])
    positive = np.zeros(len(edges) - 1)
    negative = np.zeros(len(edges) - 1)
    ignores = ignore_masks if ignore_masks is not None else [None] * len(scoremaps)
    for index, (scoremap, boxes, ignore) in enumerate(zip(scoremaps, gt_boxes, ignores)):
        scoremap = check_scoremap(scoremap, index)
        mask = boxes_to_mask(check_boxes(boxes, index), scoremap.shape)
        keep = np.ones(scoremap.shape, dtype=bool) if ignore is None else ~np.asarray(ignore, dtype=bool)
        if keep.shape != scoremap.shape:
            raise ValueError(f"ignore mask of shape {keep.shape} does not match the score map's {scoremap.shape}")
        positive += np.histogram(scoremap[mask & keep], bins=edges)[0]
        negative += np.histogram(scoremap[~mask & keep], bins=edges)[0]
    true_positive = positive[::-1].cumsum()
    false_positive = negative[::-1].cumsum()
    if positive.sum() <= 0 or (true_positive + false_positive).max() <= 0:
        return float("nan")
    valid = (true_positive + false_positive) != 0
    precision = np.divide(true_positive, true_positive + false_positive, out=np.zeros_like(true_positive), where=valid)
    recall = true_positive / positive.sum()
    return float((precision[1:] * np.diff(recall))[valid[1:]].sum() * 100.0)


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
    findings = sorted({f for fs in gt_findings for f in fs})
    results: dict[str, dict[str, dict[str, float]]] = {}
    for finding in findings:
        table: dict[str, dict[str, float]] = {}
        for name, measure, levels in (("iobb", pairwise_iobb, iobb_thresholds), ("iou", pairwise_iou, iou_thresholds)):
            for level in levels:
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
                table[f"{name}@{level:g}"] = {
                    "accuracy": found / total if total else float("nan"),
                    "afp": false_positives / images if images else float("nan"),
                }
        results[finding] = table
    return results


def classification_metrics(labels: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, per-class precision/recall/F1, macro F1, one-vs-rest ROC-AUC,
    confusion matrix (rows: truth, columns: prediction)."""
    try:
        from sklearn import metrics as skm
    except ImportError as error:
        raise ImportError("classification_metrics needs scikit-learn: pip install scikit-learn") from error
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
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


# ------------------------------------------------------------------------------------------------
# Baselines in the same harness
# ------------------------------------------------------------------------------------------------


@dataclass
class EvaluationSplit:
    """One split's inputs to the localization harness, all in the evaluation frame (H, W).

    maps: {name: (N, h, w) score maps of the class being localized}, e.g. "attention" (F0),
    "semantic" (S0, CAM-like), "scm" (F0 * S0). gt_boxes: per image (K, 4). correct_class: (N,) bool.
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


def localization_table(
    validation: EvaluationSplit,
    test: EvaluationSplit,
    prior_box: Optional[np.ndarray] = None,
    seed: int = 0,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict[str, dict]:
    """Every localization result with its baselines, thresholds calibrated on validation.

    Rows: each map in `maps`, a random map, the full-image box, and `prior_box` (the mean ground-truth
    box of the train split, in the frame) when given. Each row holds the calibrated test measures, the
    test oracle, PxAP on test, and `box_measures`: the mean IoU/GIoU/IoBB/boundary distances of the
    largest-contour box at the threshold calibrated on validation (the fixed box for the box rows).
    """
    rows: dict[str, dict] = {}
    grid = next(iter(test.maps.values())).shape[1:]
    map_sets = dict(test.maps)
    val_sets = dict(validation.maps)
    map_sets["random"] = _random_maps(len(test.gt_boxes), grid, seed + 1)
    val_sets["random"] = _random_maps(len(validation.gt_boxes), grid, seed)
    for name in map_sets:
        test_maps = [upsample_scoremap(m, test.frame_size) for m in map_sets[name]]
        val_maps = [upsample_scoremap(m, validation.frame_size) for m in val_sets[name]]
        val_scores = LocalizationScores.from_maps(
            val_maps, validation.gt_boxes, validation.correct_class, thresholds=thresholds
        )
        test_scores = LocalizationScores.from_maps(test_maps, test.gt_boxes, test.correct_class, thresholds=thresholds)
        rows[name] = calibrated_report(val_scores, test_scores)
        rows[name]["PxAP"] = pixel_average_precision(test_maps, test.gt_boxes, thresholds)
        tau = rows[name]["calibrated_on_validation"]["threshold"]
        predicted = [scoremap_to_boxes(m, tau, normalized=True) for m in test_maps]
        rows[name]["box_measures"] = mean_box_measures(predicted, test.gt_boxes, test.frame_size)
    height, width = test.frame_size
    fixed = {"full_image": np.array([0, 0, width - 1, height - 1], dtype=np.float64)}
    if prior_box is not None:
        fixed["train_mean_box"] = np.asarray(prior_box, dtype=np.float64)
    for name, box in fixed.items():
        scores = LocalizationScores.from_fixed_boxes(
            [box] * len(test.gt_boxes), test.gt_boxes, test.correct_class, thresholds
        )
        val = LocalizationScores.from_fixed_boxes(
            [box] * len(validation.gt_boxes), validation.gt_boxes, validation.correct_class, thresholds
        )
        rows[name] = calibrated_report(val, scores)
        box_map = boxes_to_mask(box, test.frame_size).astype(np.float32)
        rows[name]["PxAP"] = pixel_average_precision([box_map] * len(test.gt_boxes), test.gt_boxes, thresholds)
        rows[name]["box_measures"] = mean_box_measures([box] * len(test.gt_boxes), test.gt_boxes, test.frame_size)
    return rows


def plot_localization_table(table: dict[str, dict], path: str) -> None:
    """Bar chart of calibrated MaxBoxAcc / MaxBoxAccV2 / top-1 Loc per row, the oracle as outlines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from error
    names = list(table)
    measures = ("MaxBoxAcc", "MaxBoxAccV2", "top1_loc")
    figure, axis = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    width = 0.8 / len(measures)
    for k, measure in enumerate(measures):
        positions = np.arange(len(names)) + (k - 1) * width
        calibrated = [table[n]["calibrated_on_validation"][measure] for n in names]
        oracle = [table[n]["test_oracle_max_over_thresholds"][measure] for n in names]
        axis.bar(positions, calibrated, width, label=f"{measure} (τ from validation)")
        axis.bar(positions, oracle, width, fill=False, edgecolor="black", linewidth=0.6)
    axis.set_xticks(np.arange(len(names)), names, rotation=20)
    axis.set_ylabel("percent of test images")
    axis.set_title("Localization on test (outlines: test oracle)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


__all__ = [
    "DEFAULT_THRESHOLDS",
    "FINE_THRESHOLDS",
    "LocalizationInputError",
    "check_boxes",
    "check_scoremap",
    "ThresholdBoxes",
    "boxes_over_thresholds",
    "box_area",
    "pairwise_iou",
    "pairwise_giou",
    "pairwise_iobb",
    "box_outline",
    "box_boundary_distances",
    "box_measures",
    "IOU_THRESHOLDS_V2",
    "upsample_scoremap",
    "threshold_ious",
    "LocalizationScores",
    "calibrate_thresholds",
    "calibrated_report",
    "boxes_to_mask",
    "pixel_average_precision",
    "cxr_protocol",
    "classification_metrics",
    "EvaluationSplit",
    "localization_table",
    "mean_box_measures",
    "plot_localization_table",
    "normalize_scoremap",
    "quantize_scoremap",
    "boxes_at_threshold",
    "scoremap_to_boxes",
    "boxes_with_scores",
]
