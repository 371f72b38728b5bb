"""Score map -> boxes, the weakly-supervised localization way: one implementation for the image
processor's post-processing and for the evaluation metrics. This file is uploaded with the model and holds
only what post-processing needs; what only the metrics use (threshold grids, boxes at every threshold at
once, maps upsampled into the evaluation frame) is in `deit_scm_cxr.evaluation.boxes`, which is not uploaded.

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

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, Union

import numpy as np

try:
    import cv2
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("localization needs OpenCV: pip install opencv-python-headless") from error

# The three maps, one name each from model output to results, plots, card, demo and bench (TS-CAM's terms,
# Gao et al., ICCV 2021: the semantic-agnostic attention F0, the semantic-aware map S0, their coupling).
# Model output `<name>_maps`; results key `<name>`. "coupled", not "scm": at inference the SCM blocks do not
# run, and F0 * S0 is TS-CAM's map as much as SCM's.
MAP_LABELS = {
    "coupled": "F₀⊙S₀ (coupled map)",
    "semantic": "S₀ (semantic map, CAM)",
    "attention": "F₀ (attention map)",
}
# Names written before the vocabulary was settled: read (old results, old processor configs), never written.
LEGACY_MAP_NAMES = {"scm": "coupled", "localization_maps": "coupled_maps"}


def current_map_names(value: Any) -> Any:
    """`value` (results JSON, nested dicts and lists) with the legacy map names, as keys or string values,
    replaced by the current ones: how results written by earlier versions are read."""
    if isinstance(value, dict):
        return {LEGACY_MAP_NAMES.get(k, k): current_map_names(v) for k, v in value.items()}
    if isinstance(value, list):
        return [current_map_names(v) for v in value]
    return LEGACY_MAP_NAMES.get(value, value) if isinstance(value, str) else value


def map_output(name: str) -> str:
    """The model output holding map `name` ("coupled" -> "coupled_maps")."""
    return f"{name}_maps"


# The Gaussian widths (standard deviations, in tokens of the model's grid) a map may be smoothed with before it
# is upsampled; each run chooses one per map on the validation boxes (`deit_scm_cxr.evaluation`). 0 = none.
SMOOTHING_SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.5)


def check_smoothing(sigma: Any, name: str = "smoothing sigma") -> float:
    """A smoothing width as a float: finite and >= 0 (tokens), else `ValueError` naming it."""
    if not is_finite_number(sigma) or sigma < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (tokens), got {sigma!r}")
    return float(sigma)


def smooth_grid_map(grid_map: np.ndarray, sigma: float) -> np.ndarray:
    """A (h, w) map on the model's token grid smoothed by a Gaussian of standard deviation `sigma` tokens
    (edges replicated), float32; `sigma` 0 returns the map unchanged.

    Why: a class map trained with log-sum-exp pooling tends to ring a compact finding -- its largest values
    sit on the tokens at the lesion's edge, where the contrast is, and the lesion's centre is cooler (the
    pictures of bench/RESULTS.md, issue 31). The ring's maximum then misses the finding (the pointing game)
    and its contour encloses a cold hole (PxAP). A Gaussian of about one token merges the ring into one peak
    at its centre. The width is chosen per map on the validation boxes; smoothing on the grid, before the
    bicubic upsampling, keeps the operation at the resolution the evidence lives on.
    """
    sigma = check_smoothing(sigma)
    grid_map = np.asarray(grid_map, dtype=np.float32)
    if sigma == 0.0:
        return grid_map
    if grid_map.ndim != 2:
        raise LocalizationInputError(f"a grid map to smooth must be 2-D, got shape {grid_map.shape}")
    return cv2.GaussianBlur(grid_map, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


# OpenCV 3 returns (image, contours, hierarchy); 4 and later (contours, hierarchy).
_CONTOUR_INDEX = 1 if cv2.__version__.split(".")[0] == "3" else 0


class LocalizationInputError(ValueError):
    """A score map or box the metrics cannot score: non-finite values, a normalized map outside
    [0, 1], a box that is inverted, non-finite or negative, an image without ground-truth box. The
    message names the image (its position in the inputs). wsolevaluation rejects the same inputs."""


def is_finite_number(value: Any) -> bool:
    """A finite int or float, numpy's included (not a bool): what a setting or a geometry value must be."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def is_integer_number(value: Any) -> bool:
    """An int, numpy's included (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# Geometry columns carried per image in the BatchFeature, so post-processing can invert the resize.
class Geometry(NamedTuple):
    """How one image became the model input: its original size, the size of the resized content, the
    padding before it, and the input size. The processor returns one row of these 8 integers per image
    (`geometry` in its output); post-processing inverts it."""

    original_height: int
    original_width: int
    content_height: int
    content_width: int
    pad_top: int
    pad_left: int
    height: int
    width: int

    @classmethod
    def of(cls, row: Sequence[Any]) -> Geometry:
        """A geometry row (list, array or tensor of 8 numbers) as a `Geometry`."""
        values = row.tolist() if hasattr(row, "tolist") else list(row)
        if len(values) < 8:
            raise ValueError(f"a geometry row has 8 values ({', '.join(cls._fields)}), got {len(values)}")
        if not all(is_integer_number(v) or (is_finite_number(v) and float(v).is_integer()) for v in values[:8]):
            raise LocalizationInputError(f"a geometry row holds integers, got {values[:8]}")
        geometry = cls(*(int(v) for v in values[:8]))
        sizes_ok = min(geometry.original_height, geometry.original_width, geometry.content_height,
                       geometry.content_width, geometry.height, geometry.width) >= 1  # fmt: skip
        fits = (min(geometry.pad_top, geometry.pad_left) >= 0
                and geometry.pad_top + geometry.content_height <= geometry.height
                and geometry.pad_left + geometry.content_width <= geometry.width)  # fmt: skip
        if not (sizes_ok and fits):
            raise LocalizationInputError(
                f"a geometry row needs sizes >= 1 and the content inside the input, got {geometry}"
            )
        return geometry


GEOMETRY_FIELDS = Geometry._fields


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
    return cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[_CONTOUR_INDEX]  # type: ignore[return-value]


def _above(quantized: np.ndarray, threshold: float) -> np.ndarray:
    """The uint8 mask (0/255) of a quantized map above tau times its maximum, as wsolevaluation cuts it."""
    level = int(check_thresholds(threshold)[0] * int(quantized.max()))
    return np.where(quantized > level, np.uint8(255), np.uint8(0))


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
    binary = _above(quantized, threshold)
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
    if isinstance(threshold, Sequence) or np.ndim(threshold) > 0:
        return [boxes_at_threshold(quantized, float(t), multi_contour)[0] for t in threshold]  # type: ignore[union-attr]
    return boxes_at_threshold(quantized, float(threshold), multi_contour)[0]


def boxes_with_scores(
    heatmap: np.ndarray, threshold: float, multi_contour: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes for a person to read: the regions of a [0, 1] heatmap above one threshold, each with its score.

    Unlike the metric code (`boxes_at_threshold`, which keeps wsolevaluation's `RETR_TREE` contours, hole
    outlines included), a box here frames heat, never its absence: only outer contours count, so a hot ring
    gives one box around the ring and none around its cold centre; a box lying inside another one is merged
    into it (the enclosing box keeps the higher score); the score is the mean heatmap value over the region's
    pixels above the threshold, and boxes come sorted by it, highest first.

    Args:
        heatmap: (H, W) map in [0, 1].
        threshold: tau, a fraction of the map's maximum (as in the metrics).
        multi_contour: every region instead of the largest one only.

    Returns:
        (K, 4) int64 inclusive xyxy boxes and (K,) float32 scores; K = 0 when nothing passes the threshold.
    """
    quantized = quantize_scoremap(heatmap)
    height, width = quantized.shape
    binary = _above(quantized, threshold)
    contours = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[_CONTOUR_INDEX]
    if len(contours) == 0:
        return np.zeros((0, 4), dtype=np.int64), np.zeros((0,), dtype=np.float32)
    if not multi_contour:
        contours = [max(contours, key=cv2.contourArea)]
    above = binary.astype(bool)
    boxes, scores = [], []
    for contour in contours:
        mask = np.zeros(heatmap.shape, dtype=np.uint8)
        cv2.drawContours(mask, [contour], -1, 1, thickness=cv2.FILLED)
        inside = heatmap[mask.astype(bool) & above]
        boxes.append(_rect(contour, height, width))
        scores.append(float(inside.mean()) if inside.size else 0.0)
    # Largest first, so that a box inside another meets the enclosing one before it and is merged into it
    # (the enclosing box keeps the higher of the two scores).
    kept: list[int] = []
    for index in sorted(range(len(boxes)), key=lambda i: -_area(boxes[i])):
        outer = next((k for k in kept if _contains(boxes[k], boxes[index])), None)
        if outer is None:
            kept.append(index)
        else:
            scores[outer] = max(scores[outer], scores[index])
    kept.sort(key=lambda i: -scores[i])
    return (np.asarray([boxes[i] for i in kept], dtype=np.int64).reshape(-1, 4),
            np.asarray([scores[i] for i in kept], dtype=np.float32))  # fmt: skip


def _area(box: Sequence[int]) -> int:
    return (box[2] - box[0] + 1) * (box[3] - box[1] + 1)


def _contains(outer: Sequence[int], inner: Sequence[int]) -> bool:
    """Whether inclusive xyxy box `inner` lies inside `outer` (edges may touch)."""
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


# ------------------------------------------------------------------------------------------------
# The picture: a heatmap over the radiograph, with boxes
# ------------------------------------------------------------------------------------------------


PREDICTED_BOX_COLOR = (0, 255, 0)
GROUND_TRUTH_BOX_COLOR = (255, 40, 40)


def overlay_heatmap(
    image: np.ndarray,
    heatmap: np.ndarray,
    boxes: Optional[np.ndarray] = None,
    gt_boxes: Optional[np.ndarray] = None,
    alpha: float = 0.4,
    title: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """Blend a jet-coloured heatmap on a radiograph and draw boxes: predicted green, ground truth red.

    Args:
        image: H x W (any numeric dtype, min-max scaled for display) or H x W x 3 uint8.
        heatmap: any size, values in [0, 1]; resized to the image.
        boxes, gt_boxes: (K, 4) xyxy in image pixels.
        title: lines written in a strip above the picture (which map, the threshold, the predicted class),
            followed by a legend of the box colours present. None: no strip, the picture keeps its size.
    Returns:
        H x W x 3 uint8 RGB, or (H + strip) x W x 3 with a title.
    """
    image = np.asarray(image)
    if image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 1):
        gray = (normalize_scoremap(image.reshape(image.shape[:2])) * 255).astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, axis=2)
    elif image.ndim == 3 and image.shape[-1] in (3, 4):
        rgb = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    else:
        raise ValueError(f"overlay_heatmap: image must be H x W or H x W x 3, got {image.shape}")
    height, width = rgb.shape[:2]
    heat: Any = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != (height, width):
        heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_CUBIC)
    colored = cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)
    out = cv2.addWeighted(rgb, 1 - alpha, colored, alpha, 0)
    thickness = max(1, round(max(height, width) / 300))
    drawn = []
    for group, color, label in ((gt_boxes, GROUND_TRUTH_BOX_COLOR, "ground truth"),
                                (boxes, PREDICTED_BOX_COLOR, "predicted")):  # fmt: skip
        if group is None:
            continue
        drawn.append((label, color))
        for x0, y0, x1, y1 in np.asarray(group, dtype=np.int64).reshape(-1, 4):
            cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), color, thickness)
    return out if title is None else _with_title(out, list(title), drawn)


_TITLE_MIN_WIDTH = 384  # narrower pictures are enlarged first, so that a title stays legible


def _with_title(picture: np.ndarray, lines: list[str], legend: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """`picture` under a black strip holding `lines` in white and, on the last line, each box colour's name
    written in that colour. Hershey fonts draw ASCII only, so map names come as F0, S0, F0*S0."""
    if picture.shape[1] < _TITLE_MIN_WIDTH:
        height = round(picture.shape[0] * _TITLE_MIN_WIDTH / picture.shape[1])
        picture = cv2.resize(picture, (_TITLE_MIN_WIDTH, height), interpolation=cv2.INTER_CUBIC)
    width = picture.shape[1]
    rows = lines + (["boxes: " + ", ".join(label for label, _ in legend)] if legend else [])
    font, weight = cv2.FONT_HERSHEY_SIMPLEX, 1
    widest = max(cv2.getTextSize(text, font, 1.0, weight)[0][0] for text in rows)
    scale = min(max(0.6, width / 900), (width - 8) / widest)  # legible on a large film; every line fits
    line_height = int(round(30 * scale)) + 4
    strip = np.zeros((line_height * len(rows) + 4, width, 3), dtype=np.uint8)
    for row, text in enumerate(rows):
        cv2.putText(strip, text, (4, line_height * (row + 1) - 4), font, scale, (255, 255, 255), weight, cv2.LINE_AA)
    if legend:  # the colour names written again over the white ones, in their box colours
        x = 4 + cv2.getTextSize("boxes: ", font, scale, weight)[0][0]
        for label, color in legend:
            cv2.putText(strip, label, (x, line_height * len(rows) - 4), font, scale, color, weight, cv2.LINE_AA)
            x += cv2.getTextSize(label + ", ", font, scale, weight)[0][0]
    return np.concatenate([strip, picture], axis=0)


__all__ = [
    "LocalizationInputError",
    "check_scoremap",
    "check_thresholds",
    "normalize_scoremap",
    "quantize_scoremap",
    "boxes_at_threshold",
    "scoremap_to_boxes",
    "boxes_with_scores",
    "smooth_grid_map",
    "SMOOTHING_SIGMAS",
    "overlay_heatmap",
]
