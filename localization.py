"""Score map -> boxes, the weakly-supervised localization way: one implementation for the image
processor's post-processing and for the evaluation metrics (`wsol_metrics.py`, which is not uploaded with
the model; this file is, and holds only what post-processing needs).

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
from typing import Any, Optional, Union

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


def check_thresholds(thresholds: Union[float, Sequence[float]], increasing: bool = False) -> np.ndarray:
    """Thresholds as a 1-D float64 array: non-empty, finite, in [0, 1] (fractions of the map's maximum),
    strictly increasing when `increasing` (the metrics' curves and tie rules assume it); else
    `LocalizationInputError`."""
    try:
        values = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise LocalizationInputError(f"thresholds must be numbers: {error}") from error
    if values.size == 0:
        raise LocalizationInputError("no thresholds given")
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise LocalizationInputError(f"thresholds must be finite and in [0, 1], got [{values.min()}, {values.max()}]")
    if increasing and values.size > 1 and (np.diff(values) <= 0).any():
        raise LocalizationInputError("thresholds must be strictly increasing")
    return values


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
    level = int(check_thresholds(threshold)[0] * int(quantized.max()))
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


def upsample_scoremap(grid_map: np.ndarray, frame_size: Sequence[int]) -> np.ndarray:
    """A (h, w) map -> min-max normalized (H, W) float32 map, bicubic, as wsolevaluation's CAM computer."""
    height, width = check_frame_size(frame_size)
    check_scoremap(grid_map, normalized=False)
    resized = cv2.resize(np.asarray(grid_map, dtype=np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return normalize_scoremap(resized)


__all__ = [
    "DEFAULT_THRESHOLDS",
    "FINE_THRESHOLDS",
    "LocalizationInputError",
    "check_frame_size",
    "check_scoremap",
    "check_thresholds",
    "check_boxes",
    "normalize_scoremap",
    "quantize_scoremap",
    "boxes_at_threshold",
    "scoremap_to_boxes",
    "boxes_with_scores",
    "ThresholdBoxes",
    "boxes_over_thresholds",
    "upsample_scoremap",
]
