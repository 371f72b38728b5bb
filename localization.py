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
from typing import Union

import numpy as np

try:
    import cv2
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("localization needs OpenCV: pip install opencv-python-headless") from error

# OpenCV 3 returns (image, contours, hierarchy); 4 and later (contours, hierarchy).
_CONTOUR_INDEX = 1 if cv2.__version__.split(".")[0] == "3" else 0
DEFAULT_THRESHOLDS = np.arange(0, 1, 0.01)


def normalize_scoremap(scoremap: np.ndarray) -> np.ndarray:
    """Min-max normalize to float32 [0, 1]; NaN-containing or constant maps become zeros."""
    scoremap = np.asarray(scoremap, dtype=np.float32)
    if np.isnan(scoremap).any():
        return np.zeros_like(scoremap)
    low, high = float(scoremap.min()), float(scoremap.max())
    if high == low:
        return np.zeros_like(scoremap)
    return (scoremap - low) / (high - low)


def quantize_scoremap(scoremap: np.ndarray) -> np.ndarray:
    """[0, 1] float map -> uint8 as the reference does it (truncation, not rounding)."""
    return (np.asarray(scoremap, dtype=np.float32) * 255).astype(np.uint8)


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


__all__ = [
    "DEFAULT_THRESHOLDS",
    "normalize_scoremap",
    "quantize_scoremap",
    "boxes_at_threshold",
    "scoremap_to_boxes",
    "boxes_with_scores",
]
