"""CXR phantoms: procedural PA chest radiographs with known finding boxes — the embedded default data.

Each image is drawn from a seeded generator (`numpy.random.default_rng([seed, index])`), so a sample
depends only on (seed, index): the same on every machine, in any order, in parallel. The anatomy is
schematic but placed like a PA film (patient's right on the image left): body outline and soft tissue,
two lung fields with costophrenic angles and diaphragm domes (the right one higher), heart shadow to the
patient's left, mediastinum and spine, posterior ribs, clavicles; random patient size, position, small
rotation, exposure, gamma and noise. Findings are drawn where NIH ChestX-ray14's expert boxes are (box
centre and size quantiles per finding, copied from `BBox_List_2017.csv`; Wang et al., CVPR 2017), and
each ground-truth box is the tight box of the lesion as drawn. Every class also carries bright
distractors (ECG electrodes, wires, a side marker), brighter than any lesion, so "box the brightest
blob" does not localize.

Python:
    from deit_scm_cxr.data import phantoms as module
    dataset_dict = module.build_phantom_dataset(num_train=1200, num_validation=200, num_test=300)

CLI:
    python -m deit_scm_cxr.data.phantoms --output_dir phantoms_parquet --contact_sheet sheet.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import cv2
import numpy as np

from deit_scm_cxr.data.cxr import CLASS_NAMES, SPLITS, records_to_dataset

logger = logging.getLogger(__name__)

ATELECTASIS, OTHER, NO_FINDING = 0, 1, 2
DEFAULT_PROPORTIONS = (0.09, 0.55, 0.36)
OTHER_FINDINGS = ("Cardiomegaly", "Effusion", "Nodule", "Mass", "Infiltration", "Pneumothorax")

# NIH ChestX-ray14 expert boxes (BBox_List_2017.csv): quantiles p10, p25, p50, p75, p90 of box centre
# (cx, cy) and size (w, h), as fractions of the 1024-pixel image side.
NIH_BOX_QUANTILES: dict[str, dict[str, tuple[float, ...]]] = {
    "Atelectasis": {"cx": (0.247, 0.3135, 0.4998, 0.7145, 0.7815), "cy": (0.4288, 0.4991, 0.572, 0.6525, 0.707),
                    "w": (0.0985, 0.1246, 0.1673, 0.2396, 0.3205), "h": (0.0632, 0.0815, 0.1149, 0.1814, 0.2224)},
    "Cardiomegaly": {"cx": (0.5236, 0.5413, 0.5744, 0.6028, 0.6323), "cy": (0.4911, 0.5255, 0.5658, 0.6167, 0.6465),
                     "w": (0.4031, 0.435, 0.4664, 0.5, 0.5349), "h": (0.2971, 0.336, 0.3732, 0.4061, 0.4413)},
    "Effusion": {"cx": (0.1686, 0.2423, 0.3762, 0.7899, 0.8236), "cy": (0.4182, 0.4741, 0.5603, 0.6448, 0.7124),
                 "w": (0.0991, 0.1534, 0.2032, 0.2589, 0.31), "h": (0.0871, 0.1544, 0.2709, 0.4497, 0.5879)},
    "Infiltration": {"cx": (0.2861, 0.3479, 0.5556, 0.6918, 0.7358), "cy": (0.3836, 0.4558, 0.5192, 0.5967, 0.6747),
                     "w": (0.1553, 0.1894, 0.2222, 0.2561, 0.6533), "h": (0.1462, 0.1878, 0.2593, 0.3852, 0.4764)},
    "Mass": {"cx": (0.261, 0.3233, 0.4383, 0.7072, 0.779), "cy": (0.3089, 0.3698, 0.4455, 0.5275, 0.602),
             "w": (0.0739, 0.0942, 0.1175, 0.1661, 0.3075), "h": (0.0758, 0.0995, 0.1376, 0.2265, 0.3623)},
    "Nodule": {"cx": (0.2154, 0.277, 0.6275, 0.7632, 0.8056), "cy": (0.2896, 0.3526, 0.4672, 0.6061, 0.6963),
               "w": (0.0466, 0.0534, 0.0688, 0.0852, 0.0984), "h": (0.0444, 0.055, 0.0667, 0.0778, 0.0995)},
    "Pneumothorax": {"cx": (0.2131, 0.2869, 0.3403, 0.6833, 0.7188), "cy": (0.1452, 0.1812, 0.2532, 0.4354, 0.6091),
                     "w": (0.0853, 0.1269, 0.1967, 0.2556, 0.3096), "h": (0.0828, 0.1176, 0.2011, 0.2921, 0.5172)},
}  # fmt: skip
_QUANTILE_LEVELS = (0.10, 0.25, 0.50, 0.75, 0.90)


def sample_box_quantity(rng: np.random.Generator, finding: str, quantity: str) -> float:
    """Draw from the piecewise-linear quantile function through NIH's p10..p90 (clamped outside)."""
    return float(np.interp(rng.uniform(0.02, 0.98), _QUANTILE_LEVELS, NIH_BOX_QUANTILES[finding][quantity]))


@dataclass
class Anatomy:
    """Where the patient's structures are, in pixels of the square canvas."""

    size: int
    center_x: float
    top: float
    body_half_width: float
    lung_top: float
    dome_y: tuple[float, float]  # image-left (patient's right) and image-right dome tops
    lung_inner: tuple[float, float]  # medial borders of the two lungs
    lung_outer: tuple[float, float]  # lateral borders
    heart: tuple[float, float, float, float]  # centre x, centre y, half width, half height
    dome_base: float  # the left dome's level before any atelectatic rise (spaces the ribs)
    mediastinum_gap: float  # half the distance between the lungs' medial borders
    lung_masks: list[np.ndarray] = field(default_factory=list)


@dataclass
class Phantom:
    image: np.ndarray  # uint8 or uint16, H x W
    label: int
    boxes: list[list[float]]  # xyxy, inclusive pixels
    findings: list[str]
    age: int
    sex: str


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, sigma: float = 0.0) -> np.ndarray:
    """Low-frequency texture in [-1, 1]: coarse noise upsampled."""
    coarse = rng.standard_normal((cells, cells), dtype=np.float32)
    texture = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    if sigma:
        texture = cv2.GaussianBlur(texture, (0, 0), sigma)
    return texture / (np.abs(texture).max() + 1e-6)


def _lung_polygon(anatomy: Anatomy, side: int) -> np.ndarray:
    """Outline of one lung: apex arc, lateral wall, costophrenic angle, diaphragm dome, mediastinal border."""
    inner, outer = anatomy.lung_inner[side], anatomy.lung_outer[side]
    top, dome = anatomy.lung_top, anatomy.dome_y[side]
    span = dome - top
    direction = 1.0 if outer > inner else -1.0
    points = []
    for t in np.linspace(0, 1, 10):  # apex arc: highest a third of the way out from the midline
        rise = 0.1 * ((0.35 - t) / 0.35) ** 2 if t < 0.35 else 0.25 * ((t - 0.35) / 0.65) ** 2
        points.append((inner + (outer - inner) * t, top + span * rise))
    angle_y = dome + span * 0.22  # the costophrenic angle lies below the dome's top
    for s in np.linspace(0, 1, 8)[1:]:  # lateral wall, bulging slightly outwards
        points.append(
            (outer + direction * 0.03 * abs(outer - inner) * np.sin(np.pi * s), top + span * (0.25 + 0.97 * s))
        )
    for t in np.linspace(0, 1, 10):  # diaphragm dome from the angle back to the mediastinum
        x = outer + (inner - outer) * t
        y = dome + (angle_y - dome) * (1 - np.sin(np.pi * min(t * 1.4, 1) / 2)) + span * 0.06 * t
        points.append((x, y))
    points.append((inner, top + span * 0.1))
    return np.asarray(points, dtype=np.float32)


def _anatomy_layout(rng: np.random.Generator, size: int, age: int, atelectasis_side: Optional[int]) -> Anatomy:
    """Where the structures of a random patient are (the lung masks are filled in when drawn)."""
    half_width = size * rng.uniform(0.36, 0.46) * (0.85 if age < 16 else 1.0)
    center_x = size * (0.5 + rng.normal(0, 0.015))
    top = size * rng.uniform(0.04, 0.1)
    lung_top = top + size * rng.uniform(0.06, 0.1)
    dome_base = size * rng.uniform(0.7, 0.78)
    dome = [dome_base - size * 0.025, dome_base]  # the right hemidiaphragm sits higher (liver)
    if atelectasis_side is not None:
        dome[atelectasis_side] -= size * rng.uniform(0.04, 0.08)  # volume loss raises the dome
    gap = half_width * rng.uniform(0.16, 0.22)
    lung_inner = (center_x - gap, center_x + gap)
    lung_outer = (center_x - half_width * 0.86, center_x + half_width * 0.86)
    heart_half_w = half_width * rng.uniform(0.36, 0.46)
    heart = (center_x + half_width * 0.12, dome_base - size * 0.09, heart_half_w, size * rng.uniform(0.1, 0.13))
    return Anatomy(
        size, center_x, top, half_width, lung_top, tuple(dome), lung_inner, lung_outer, heart, dome_base, gap
    )


def _draw_body_and_lungs(rng: np.random.Generator, anatomy: Anatomy) -> np.ndarray:
    """Attenuation map of the body outline with the two (textured) lung fields; fills `lung_masks`."""
    size, center_x, half_width, top = anatomy.size, anatomy.center_x, anatomy.body_half_width, anatomy.top
    canvas = np.full((size, size), 0.04, dtype=np.float32)
    # Body: shoulders, chest wall and abdomen as one polygon.
    body = np.array(
        [
            (center_x - half_width * 0.28, 0), (center_x + half_width * 0.28, 0),
            (center_x + half_width * 0.34, top), (center_x + half_width * 1.12, top + size * 0.08),
            (center_x + half_width * 1.05, size), (center_x - half_width * 1.05, size),
            (center_x - half_width * 1.12, top + size * 0.08), (center_x - half_width * 0.34, top),
        ],
        dtype=np.int32,
    )  # fmt: skip
    cv2.fillPoly(canvas, [body], 0.5)
    lungs = np.zeros((size, size), dtype=np.float32)
    for side in (0, 1):
        mask = np.zeros((size, size), dtype=np.uint8)
        cv2.fillPoly(mask, [np.round(_lung_polygon(anatomy, side)).astype(np.int32)], 1)
        anatomy.lung_masks.append(mask.astype(bool))
        lungs[mask.astype(bool)] = 1.0
    lungs = cv2.GaussianBlur(lungs, (0, 0), 2.0 * size / 256)
    markings = 0.04 * _smooth_noise(rng, size, 24)  # vessel / interstitial texture
    canvas -= lungs * (0.32 + markings)
    return canvas


def _draw_mediastinum_and_spine(canvas: np.ndarray, anatomy: Anatomy) -> None:
    """Mediastinum and heart (heart to the patient's left = image right), vertebral bodies down the midline."""
    size, center_x, top, heart = anatomy.size, anatomy.center_x, anatomy.top, anatomy.heart
    scale = size / 256
    gap = anatomy.mediastinum_gap
    mediastinum = np.zeros((size, size), dtype=np.float32)
    cv2.rectangle(
        mediastinum, (int(center_x - gap * 0.8), int(top)), (int(center_x + gap * 0.9), int(heart[1])), 1.0, -1
    )
    cv2.ellipse(mediastinum, (int(heart[0]), int(heart[1])), (int(heart[2]), int(heart[3])), 0, 0, 360, 1.0, -1)
    canvas += cv2.GaussianBlur(mediastinum, (0, 0), 2.5 * scale) * 0.3
    spine = np.zeros((size, size), dtype=np.float32)
    level = top
    while level < size:
        height = size * 0.035
        cv2.rectangle(
            spine,
            (int(center_x - size * 0.03), int(level)),
            (int(center_x + size * 0.03), int(level + height * 0.8)),
            1.0,
            -1,
        )
        level += height
    canvas += cv2.GaussianBlur(spine, (0, 0), 1.0 * scale) * 0.12


def _draw_ribs_and_clavicles(canvas: np.ndarray, anatomy: Anatomy) -> None:
    """Posterior ribs sweeping out and down from the spine; clavicles from the sternal notch to the shoulders."""
    size, center_x, lung_top = anatomy.size, anatomy.center_x, anatomy.lung_top
    ribs = np.zeros((size, size), dtype=np.float32)
    thickness = max(1, int(round(size * 0.016)))
    spacing = (anatomy.dome_base - lung_top) / 9.5
    for index in range(10):
        y0 = lung_top + spacing * index - size * 0.01
        for outer in anatomy.lung_outer:
            xs = np.linspace(center_x, outer + (outer - center_x) * 0.12, 12)
            t = np.linspace(0, 1, 12)
            ys = y0 - size * 0.02 * np.sin(np.pi * t) + spacing * 0.9 * t**2
            cv2.polylines(ribs, [np.stack([xs, ys], 1).round().astype(np.int32)], False, 1.0, thickness)
    canvas += cv2.GaussianBlur(ribs, (0, 0), 0.8 * size / 256) * 0.1
    for direction in (-1, 1):
        xs = center_x + direction * np.linspace(size * 0.03, anatomy.body_half_width * 1.0, 10)
        ys = lung_top + size * 0.02 - np.linspace(0, size * 0.05, 10) + size * 0.012 * np.sin(np.linspace(0, np.pi, 10))
        cv2.polylines(canvas, [np.stack([xs, ys], 1).round().astype(np.int32)], False, 0.62, max(1, int(size * 0.02)))


def _draw_anatomy(
    rng: np.random.Generator, size: int, age: int, atelectasis_side: Optional[int]
) -> tuple[np.ndarray, Anatomy]:
    """Attenuation map (float32, brighter = denser) of a patient without findings."""
    anatomy = _anatomy_layout(rng, size, age, atelectasis_side)
    canvas = _draw_body_and_lungs(rng, anatomy)
    _draw_mediastinum_and_spine(canvas, anatomy)
    _draw_ribs_and_clavicles(canvas, anatomy)
    return canvas, anatomy


def _lesion_box(mask: np.ndarray) -> Optional[list[float]]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)


def _box_from_stats(rng: np.random.Generator, finding: str, size: int) -> tuple[float, float, float, float]:
    cx, cy = sample_box_quantity(rng, finding, "cx"), sample_box_quantity(rng, finding, "cy")
    w, h = sample_box_quantity(rng, finding, "w"), sample_box_quantity(rng, finding, "h")
    return cx * size, cy * size, w * size, h * size


def _in_lung(anatomy: Anatomy, cx: float, cy: float) -> tuple[int, float, float]:
    """The lung nearer (cx, cy), and the point pulled inside it."""
    side = 0 if cx < anatomy.center_x else 1
    ys, xs = np.nonzero(anatomy.lung_masks[side])
    if len(xs) == 0:
        return side, cx, cy
    distance = (xs - cx) ** 2 + (ys - cy) ** 2
    nearest = int(np.argmin(distance))
    if anatomy.lung_masks[side][int(np.clip(cy, 0, anatomy.size - 1)), int(np.clip(cx, 0, anatomy.size - 1))]:
        return side, cx, cy
    return side, float(xs[nearest]), float(ys[nearest])


class _Placement(NamedTuple):
    """Where a lung finding goes: the lung's side, the centre pulled inside it, NIH-drawn box size."""

    side: int
    cx: float
    cy: float
    w: float
    h: float


def _draw_cardiomegaly(rng: np.random.Generator, canvas: np.ndarray, anatomy: Anatomy) -> np.ndarray:
    size = anatomy.size
    mask = np.zeros((size, size), dtype=np.uint8)
    hx, hy, hw, hh = anatomy.heart
    _, _, w, h = _box_from_stats(rng, "Cardiomegaly", size)
    new_w, new_h = max(w / 2, hw * 1.3), max(h / 2, hh * 1.2)
    cv2.ellipse(mask, (int(hx + (new_w - hw) * 0.4), int(hy)), (int(new_w), int(new_h)), 0, 0, 360, 1, -1)
    normal = np.zeros_like(mask)
    cv2.ellipse(normal, (int(hx), int(hy)), (int(hw), int(hh)), 0, 0, 360, 1, -1)
    # The enlarged silhouette: density added where the heart now reaches beyond its normal outline.
    canvas += _soft(mask & (1 - normal), 2.0 * size / 256) * 0.42
    return mask


def _draw_atelectasis(rng: np.random.Generator, canvas: np.ndarray, anatomy: Anatomy, at: _Placement) -> np.ndarray:
    """Plate-like band or wedge, mostly horizontal, in the lower or middle zone."""
    size = anatomy.size
    mask = np.zeros((size, size), dtype=np.uint8)
    length, thick = max(at.w, size * 0.1), max(at.h * rng.uniform(0.35, 0.7), size * 0.04)
    angle = rng.normal(0, 12)
    if rng.random() < 0.5:
        cv2.ellipse(mask, (int(at.cx), int(at.cy)), (int(length / 2), int(thick / 2)), angle, 0, 360, 1, -1)
    else:
        lateral = anatomy.lung_outer[at.side]
        tip = (at.cx + (at.cx - lateral) * 0.4, at.cy)
        wedge = np.array([(lateral, at.cy - thick), (lateral, at.cy + thick), tip], dtype=np.int32)
        cv2.fillPoly(mask, [wedge], 1)
    mask &= anatomy.lung_masks[at.side].astype(np.uint8)
    canvas += _soft(mask, 1.5 * size / 256) * rng.uniform(0.38, 0.48)
    return mask


def _draw_effusion(rng: np.random.Generator, canvas: np.ndarray, anatomy: Anatomy, at: _Placement) -> np.ndarray:
    """Fluid in the costophrenic angle with a meniscus rising laterally."""
    size = anatomy.size
    height = max(at.h * rng.uniform(0.5, 0.8), size * 0.06)
    ys = np.arange(size)[:, None]
    xs = np.arange(size)[None, :]
    lateral, medial = anatomy.lung_outer[at.side], anatomy.lung_inner[at.side]
    t = np.clip((xs - medial) / (lateral - medial), 0, 1)  # 0 medial .. 1 lateral
    surface = anatomy.dome_y[at.side] + size * 0.06 - height * t**1.5
    mask = ((ys >= surface) & anatomy.lung_masks[at.side]).astype(np.uint8)
    canvas += _soft(mask, 1.5 * size / 256) * rng.uniform(0.38, 0.48)
    return mask


def _draw_nodule_or_mass(
    rng: np.random.Generator, canvas: np.ndarray, anatomy: Anatomy, at: _Placement, smallest: float
) -> np.ndarray:
    size = anatomy.size
    mask = np.zeros((size, size), dtype=np.uint8)
    radius = max(min(at.w, at.h) / 2, size * smallest)
    cv2.circle(mask, (int(at.cx), int(at.cy)), int(radius), 1, -1)
    mask &= anatomy.lung_masks[at.side].astype(np.uint8)
    canvas += _soft(mask, 1.0 * size / 256) * rng.uniform(0.38, 0.48)
    return mask


def _draw_infiltration(rng: np.random.Generator, canvas: np.ndarray, anatomy: Anatomy, at: _Placement) -> np.ndarray:
    size = anatomy.size
    cloud = np.zeros((size, size), dtype=np.float32)
    for _ in range(rng.integers(4, 8)):
        px, py = at.cx + rng.normal(0, at.w / 4), at.cy + rng.normal(0, at.h / 4)
        radius = int(max(size * 0.02, rng.uniform(0.15, 0.3) * min(at.w, at.h)))
        cv2.circle(cloud, (int(px), int(py)), radius, 1.0, -1)
    cloud = cv2.GaussianBlur(cloud, (0, 0), 3 * size / 256) * (0.7 + 0.3 * _smooth_noise(rng, size, 32))
    cloud *= anatomy.lung_masks[at.side]
    canvas += np.clip(cloud, 0, 1) * rng.uniform(0.32, 0.42)
    return (cloud > 0.25).astype(np.uint8)


def _draw_pneumothorax(rng: np.random.Generator, canvas: np.ndarray, anatomy: Anatomy, at: _Placement) -> np.ndarray:
    """Apical/lateral air without lung markings, bounded by a thin visceral pleural line."""
    size = anatomy.size
    mask = np.zeros((size, size), dtype=np.uint8)
    axes = (int(max(at.w / 2, size * 0.05)), int(max(at.h / 2, size * 0.06)))
    center = (
        int(anatomy.lung_outer[at.side] + (anatomy.lung_inner[at.side] - anatomy.lung_outer[at.side]) * 0.2),
        int(anatomy.lung_top + axes[1] * 0.8),
    )
    cv2.ellipse(mask, center, axes, 0, 0, 360, 1, -1)
    mask &= anatomy.lung_masks[at.side].astype(np.uint8)
    canvas -= _soft(mask, 1.0 * size / 256) * 0.2
    edge = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((2, 2), np.uint8))
    canvas += edge * 0.25
    return mask


_LUNG_FINDINGS = {
    "Atelectasis": _draw_atelectasis,
    "Effusion": _draw_effusion,
    "Nodule": lambda rng, canvas, anatomy, at: _draw_nodule_or_mass(rng, canvas, anatomy, at, 0.012),
    "Mass": lambda rng, canvas, anatomy, at: _draw_nodule_or_mass(rng, canvas, anatomy, at, 0.03),
    "Infiltration": _draw_infiltration,
    "Pneumothorax": _draw_pneumothorax,
}


def _draw_finding(
    rng: np.random.Generator, canvas: np.ndarray, anatomy: Anatomy, finding: str, side: Optional[int] = None
) -> Optional[list[float]]:
    """Add one finding to the attenuation map; return its tight box."""
    if finding == "Cardiomegaly":
        return _lesion_box(_draw_cardiomegaly(rng, canvas, anatomy))
    if finding not in _LUNG_FINDINGS:
        raise ValueError(f"unknown finding {finding!r}")
    cx, cy, w, h = _box_from_stats(rng, finding, anatomy.size)
    if side is not None:
        cx = anatomy.lung_inner[side] + (anatomy.lung_outer[side] - anatomy.lung_inner[side]) * rng.uniform(0.25, 0.8)
    side, cx, cy = _in_lung(anatomy, cx, cy)
    return _lesion_box(_LUNG_FINDINGS[finding](rng, canvas, anatomy, _Placement(side, cx, cy, w, h)))


def _draw_distractors(rng: np.random.Generator, canvas: np.ndarray, anatomy: Anatomy) -> None:
    """Bright foreign bodies, denser than any lesion: ECG electrodes with wires, a side marker."""
    size = anatomy.size
    for _ in range(rng.integers(1, 5)):
        x = anatomy.center_x + rng.uniform(-1, 1) * anatomy.body_half_width * 0.9
        y = size * rng.uniform(0.15, 0.85)
        cv2.circle(canvas, (int(x), int(y)), max(2, int(size * rng.uniform(0.012, 0.02))), 1.0, -1)
        end = (int(x + rng.normal(0, size * 0.2)), int(min(size - 1, y + size * rng.uniform(0.1, 0.4))))
        middle = (int((x + end[0]) / 2 + rng.normal(0, size * 0.05)), int((y + end[1]) / 2))
        wire = np.array([(int(x), int(y)), middle, end], dtype=np.int32)
        cv2.polylines(canvas, [wire], False, 0.85, 1)
    corner_x = int(size * rng.choice([0.04, 0.88]))
    cv2.rectangle(canvas, (corner_x, int(size * 0.05)), (corner_x + int(size * 0.06), int(size * 0.11)), 1.1, -1)


def generate_phantom(
    index: int,
    seed: int = 0,
    label: Optional[int] = None,
    size: int = 256,
    bits: int = 8,
    proportions: Sequence[float] = DEFAULT_PROPORTIONS,
) -> Phantom:
    """Draw phantom number `index` of the series `seed`.

    Args:
        label: force a class; by default drawn with `proportions` (Atelectasis, Other, No finding).
        size: side of the square image in pixels.
        bits: 8 (uint8) or 16 (uint16) output.
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    rng = np.random.default_rng([seed, index])
    if label is None:
        label = int(rng.choice(3, p=np.asarray(proportions) / np.sum(proportions)))
    sex = "M" if rng.random() < 0.56 else "F"
    age = int(np.clip(rng.normal(47 if label == NO_FINDING else 52, 17), 1, 95))
    atelectasis_side = int(rng.integers(0, 2)) if label == ATELECTASIS else None
    canvas, anatomy = _draw_anatomy(rng, size, age, atelectasis_side)
    boxes, findings = [], []
    if label == ATELECTASIS:
        wanted = ["Atelectasis"]
    elif label == OTHER:
        count = 1 if rng.random() < 0.7 else 2
        wanted = list(rng.choice(OTHER_FINDINGS, size=count, replace=False))
    else:
        wanted = []
    for finding in wanted:
        box = _draw_finding(rng, canvas, anatomy, str(finding), atelectasis_side if finding == "Atelectasis" else None)
        if box is not None:
            boxes.append(box)
            findings.append(str(finding))
    _draw_distractors(rng, canvas, anatomy)
    # Exposure, rotation, gamma and quantum noise.
    angle = rng.normal(0, 2.5)
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
    canvas = cv2.warpAffine(canvas, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.04)
    boxes = [_rotate_box(box, matrix, size) for box in boxes]
    canvas = canvas * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    canvas += rng.standard_normal((size, size), dtype=np.float32) * rng.uniform(0.008, 0.025)
    canvas = np.clip(canvas, 0, 1.2) / 1.2
    canvas = canvas ** rng.uniform(0.8, 1.25)
    top = 255 if bits == 8 else 65535
    image = (canvas * top + 0.5).astype(np.uint8 if bits == 8 else np.uint16)
    return Phantom(image, label, boxes, findings, age, sex)


def _rotate_box(box: list[float], matrix: np.ndarray, size: int) -> list[float]:
    x0, y0, x1, y1 = box
    corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], dtype=np.float64)
    moved = corners @ matrix.T
    low = np.clip(moved.min(axis=0), 0, size - 1)
    high = np.clip(moved.max(axis=0), 0, size - 1)
    return [float(low[0]), float(low[1]), float(high[0]), float(high[1])]


def _encode_png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def phantom_records(start: int, count: int, seed: int, size: int, bits: int, proportions: Sequence[float], prefix: str):
    """Samples in the shared contract (see cxr_data), images as PNG bytes."""
    for index in range(start, start + count):
        phantom = generate_phantom(index, seed, size=size, bits=bits, proportions=proportions)
        yield {
            "image": {"bytes": _encode_png(phantom.image), "path": None},
            "label": phantom.label,
            "boxes": phantom.boxes,
            "findings": phantom.findings,
            "image_id": f"{prefix}{index:06d}",
            "patient_id": f"phantom-{seed}-{index}",
            "age": phantom.age,
            "sex": phantom.sex,
            "view": "PA",
        }


def build_phantom_dataset(
    num_train: int = 1200,
    num_validation: int = 200,
    num_test: int = 300,
    size: int = 256,
    bits: int = 8,
    seed: int = 0,
    proportions: Sequence[float] = DEFAULT_PROPORTIONS,
):
    """A `datasets.DatasetDict` with train / validation / test splits of phantoms (each its own patient).

    Splits use disjoint index ranges of one series, so growing one split never changes another's
    images when the earlier ones stay the same size.
    """
    from datasets import DatasetDict

    counts = {"train": num_train, "validation": num_validation, "test": num_test}
    offsets = {"train": 0, "validation": 10_000_000, "test": 20_000_000}
    splits = {}
    for split in SPLITS:
        records = list(phantom_records(offsets[split], counts[split], seed, size, bits, proportions, f"{split}-"))
        splits[split] = records_to_dataset(records)
    return DatasetDict(splits)


# Index range of the pretraining images: fine-tuning splits use 0, 10M and 20M of whatever series, so
# these images are never in a fine-tuning split, whichever seed that run uses.
PRETRAIN_OFFSET = 30_000_000
PRETRAIN_FINDINGS = ("Atelectasis", *OTHER_FINDINGS)


def build_pretraining_dataset(count: int, size: int = 256, seed: int = 0, bits: int = 8):
    """`count` phantoms for pretraining a backbone, from an index range that no fine-tuning split uses,
    with an `image_labels` column: the finding types drawn on each image (names of `PRETRAIN_FINDINGS`)."""
    records = list(phantom_records(PRETRAIN_OFFSET, count, seed, size, bits, DEFAULT_PROPORTIONS, "pretrain-"))
    dataset = records_to_dataset(records)
    return dataset.add_column("image_labels", [sorted(set(record["findings"])) for record in records])


def contact_sheet(count: int = 16, seed: int = 0, size: int = 256, columns: int = 4) -> np.ndarray:
    """A grid of phantoms (RGB uint8) with their boxes (red) and class names."""
    tiles = []
    for index in range(count):
        phantom = generate_phantom(index, seed, label=index % 3, size=size)
        tile = cv2.cvtColor(phantom.image, cv2.COLOR_GRAY2RGB)
        for box, finding in zip(phantom.boxes, phantom.findings):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            cv2.rectangle(tile, (x0, y0), (x1, y1), (255, 40, 40), 1)
            cv2.putText(tile, finding[:5], (x0, max(8, y0 - 2)), cv2.FONT_HERSHEY_PLAIN, 0.7, (255, 220, 0), 1)
        cv2.putText(tile, CLASS_NAMES[phantom.label], (4, size - 6), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 255, 0), 1)
        tiles.append(tile)
    rows = [np.concatenate(tiles[i : i + columns], axis=1) for i in range(0, count, columns)]
    return np.concatenate(rows, axis=0)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the CXR phantom dataset")
    parser.add_argument("--num_train", type=int, default=1200)
    parser.add_argument("--num_validation", type=int, default=200)
    parser.add_argument("--num_test", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--bits", type=int, default=8, choices=(8, 16))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", help="write one Parquet file per split here")
    parser.add_argument("--contact_sheet", help="write a PNG grid of samples with their boxes here")
    parser.add_argument("--push_to_hub", help="repository id to push the DatasetDict to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.contact_sheet:
        cv2.imwrite(args.contact_sheet, cv2.cvtColor(contact_sheet(seed=args.seed, size=args.size), cv2.COLOR_RGB2BGR))
        logger.info("contact sheet written to %s", args.contact_sheet)
    if args.output_dir or args.push_to_hub:
        dataset = build_phantom_dataset(
            args.num_train, args.num_validation, args.num_test, args.size, args.bits, args.seed
        )
        if args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            for split, part in dataset.items():
                part.to_parquet(str(Path(args.output_dir) / f"{split}.parquet"))
            logger.info("wrote %s", {split: len(part) for split, part in dataset.items()})
        if args.push_to_hub:
            dataset.push_to_hub(args.push_to_hub)
    return 0


if __name__ == "__main__":
    sys.exit(main())
