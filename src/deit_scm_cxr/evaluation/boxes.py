"""What the WSOL metrics need from score maps beyond the post-processing in `localization.py`: the threshold
grids, checks of ground-truth boxes and evaluation frames, boxes at every threshold of a grid from one
contour pass per level (identical to `localization.boxes_at_threshold` at each), and maps upsampled into
wsolevaluation's evaluation frame. Not uploaded with the model (Choe et al., CVPR 2020, for the conventions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import cv2
import numpy as np

from deit_scm_cxr.hub.localization import (
    LocalizationInputError,
    _contours,
    _where,
    check_scoremap,
    check_thresholds,
    normalize_scoremap,
)

# wsolevaluation's `cam_curve_interval`: its CLI default 0.01 (used while training) and the 0.001 of its
# published configs (used for the final test numbers).
DEFAULT_THRESHOLDS = np.arange(0, 1, 0.01)
FINE_THRESHOLDS = np.arange(0, 1, 0.001)


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


def check_frame_size(frame_size: Sequence[Any]) -> tuple[int, int]:
    """(height, width) as two integers >= 1, else `LocalizationInputError`."""
    try:
        height, width = (float(v) for v in frame_size)
    except (TypeError, ValueError) as error:
        raise LocalizationInputError(f"a frame size is (height, width), got {frame_size!r}") from error
    if not (np.isfinite([height, width]).all() and height >= 1 and width >= 1 and height.is_integer()
            and width.is_integer()):  # fmt: skip
        raise LocalizationInputError(f"a frame size is two integers >= 1, got {frame_size!r}")
    return int(height), int(width)


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
    levels = (check_thresholds(thresholds) * int(quantized.max())).astype(np.int64)
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


def _contour_boxes_and_areas(
    points: np.ndarray, starts: np.ndarray, lengths: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes (wsolevaluation's inclusive corners, clipped) and `cv2.contourArea` of the contours
    packed in `points` (contour k is points[starts[k] : starts[k] + lengths[k]])."""
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
    return boxes, np.abs(np.add.reduceat(cross, starts)) * 0.5


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
    boxes, areas = _contour_boxes_and_areas(points, starts, lengths, height, width)
    # Largest contour per threshold, first one on ties (as Python's max): sort by threshold, then by
    # area descending, then by position, and keep each threshold's first.
    order = np.lexsort((np.arange(len(areas)), -areas, owner))
    first = order[np.r_[True, owner[order][1:] != owner[order][:-1]]]
    largest[owner[first]] = boxes[first]
    empty = np.flatnonzero(~np.isin(np.arange(count), owner))
    multi_boxes = np.concatenate([boxes, np.zeros((len(empty), 4), dtype=np.int64)])
    multi_owner = np.concatenate([owner, empty])
    return ThresholdBoxes(multi_boxes, multi_owner, largest)


def upsample_scoremap(grid_map: np.ndarray, frame_size: Sequence[int]) -> np.ndarray:
    """A (h, w) map -> min-max normalized (H, W) float32 map, bicubic, as wsolevaluation's CAM computer."""
    height, width = check_frame_size(frame_size)
    check_scoremap(grid_map, normalized=False)
    resized = cv2.resize(np.asarray(grid_map, dtype=np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return normalize_scoremap(resized)


__all__ = [
    "DEFAULT_THRESHOLDS",
    "FINE_THRESHOLDS",
    "check_boxes",
    "check_frame_size",
    "ThresholdBoxes",
    "boxes_over_thresholds",
    "upsample_scoremap",
]
