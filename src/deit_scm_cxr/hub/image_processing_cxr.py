"""Chest radiograph image processor: DICOM/PNG/JPEG/arrays in, `pixel_values` out, and the way back
from the model's localization maps to heatmaps and boxes in the user's pixels.

Pipeline (each step switchable): grayscale -> intensity normalization to 0-255 (min-max or robust
percentiles) -> CLAHE (Zuiderveld, "Contrast Limited Adaptive Histogram Equalization", Graphics Gems IV,
1994; clip limit 2.0, 8x8 tiles) -> resize (squash, or keep the aspect ratio and pad) -> 3 channels ->
rescale and normalize.

Decoding (DICOM's grayscale transform, PNG/JPEG/TIFF, arrays) lives in `cxr_decoding.py`; integer inputs
keep their bit depth until the intensity normalization.

This file is uploaded with the model and loaded as remote code, with `cxr_decoding.py` and
`localization.py` beside it (relative imports); it imports numpy, OpenCV, Pillow, torch and transformers,
and pydicom only when a DICOM arrives.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Optional, Union

import numpy as np
import torch
from transformers import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

try:
    import cv2
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("CXRImageProcessor needs OpenCV: pip install opencv-python-headless") from error

from .cxr_decoding import CXRImageError, DecodeOptions, ImageLike, decode, typed_errors
from .localization import (
    GEOMETRY_FIELDS,
    LEGACY_MAP_NAMES,
    MAP_LABELS,
    Geometry,
    LocalizationInputError,
    boxes_with_scores,
    check_smoothing,
    check_thresholds,
    map_output,
    normalize_scoremap,
    overlay_heatmap,
    smooth_grid_map,
)
from .localization import is_finite_number as _finite
from .localization import is_integer_number as _is_int

logger = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# The model outputs post_process_localization can localize with (see `localization_map`).
LOCALIZATION_MAPS = tuple(map_output(name) for name in MAP_LABELS)
# An 8-bit input with more than this share of its pixels at 255 is refused as clipped. Measured: 300 phantoms
# at 8 bits have at most 1.5 %, pydicom's real CR windowed to 8 bits 0.0006 %; a 16-bit PNG through PIL's
# 8-bit conversion (which clips every value above 255) at least 74 % (the phantoms) and 100 % (the real CR).
CLIPPED_WHITE_FRACTION = 0.5


class CXRImageProcessorKwargs(ImagesKwargs, total=False):
    intensity_normalization: str
    intensity_percentiles: Sequence[float]
    do_clahe: bool
    clahe_clip_limit: float
    clahe_tile_grid_size: Sequence[int]
    clahe_max_size: Optional[int]
    resize_mode: str
    pad_value: int
    dicom_voi: str
    dicom_voi_percentiles: Sequence[float]
    dicom_multiframe: str
    dicom_invert_monochrome1: bool
    strict: bool
    localization_threshold: float
    localization_smoothing: dict[str, float]


@lru_cache(maxsize=8)
def _clahe(clip_limit: float, tiles: tuple[int, int]) -> Any:
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=tiles)


def _area_resize(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area (box) downsampling, enlarging bilinearly. A large reduction goes in two stages: an exact
    integer factor first (OpenCV's fast path), then the remainder; within a few grey levels of a
    single area resize at a third of its cost."""
    in_h, in_w = gray.shape
    if height >= in_h and width >= in_w:
        return cv2.resize(gray, (width, height), interpolation=cv2.INTER_LINEAR)
    factor = min(in_h // max(height, 1), in_w // max(width, 1))
    if factor >= 2:
        gray = cv2.resize(gray, (in_w // factor, in_h // factor), interpolation=cv2.INTER_AREA)
    if gray.shape != (height, width):
        gray = cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA)
    return gray


def _integer_percentiles(pixels: np.ndarray, percentiles: Sequence[float]) -> tuple[float, float]:
    """Percentiles of an integer image from its histogram: O(n), unlike a sort."""
    offset = int(pixels.min())
    counts = np.bincount((pixels.ravel() - offset).astype(np.int64) if offset else pixels.ravel())
    cumulative = np.cumsum(counts)
    total = cumulative[-1]
    low, high = (int(np.searchsorted(cumulative, p / 100.0 * total)) + offset for p in percentiles)
    return float(low), float(high)


class CXRImageProcessor(BaseImageProcessor):
    r"""Image processor for chest radiographs (the original scripts' `DicomStyleImagePreprocessor`).

    Args:
        do_normalize_intensity (`bool`, defaults to `True`): map intensities to 0-255.
        intensity_normalization (`str`, defaults to `"minmax"`): `"minmax"` or `"percentile"`.
        intensity_percentiles (`(float, float)`, defaults to `(0.5, 99.5)`): the robust window.
        do_clahe (`bool`, defaults to `True`): contrast-limited adaptive histogram equalization.
        clahe_clip_limit (`float`, defaults to 2.0): CLAHE's clip limit.
        clahe_tile_grid_size (`(int, int)`, defaults to `(8, 8)`): CLAHE's tiles.
        clahe_max_size (`int`, *optional*): when set, CLAHE runs on the image area-downsampled so that
            its longer side is at most this. `None` (default) runs it at full resolution, as the
            original scripts; 512 is about 3x cheaper on 1024^2 films and moves the 224^2 output by
            about one grey level on average (see bench/bench_processor.py).
        do_resize (`bool`, defaults to `True`): resize to `size`.
        size (`dict[str, int]`, defaults to height 224, width 224): the model input.
        resize_mode (`str`, defaults to `"squash"`): `"squash"` or `"pad"` (keep aspect, pad centred).
        pad_value (`int`, defaults to 0): 0-255 fill of the padding.
        do_rescale (`bool`, defaults to `True`): multiply by `rescale_factor`.
        rescale_factor (`float`, defaults to 1/255): the rescale factor.
        do_normalize (`bool`, defaults to `True`): subtract `image_mean`, divide by `image_std`.
        image_mean (`list[float]`, defaults to ImageNet's): per-channel mean.
        image_std (`list[float]`, defaults to ImageNet's): per-channel standard deviation.
        num_channels (`int`, defaults to 3): grayscale is stacked to this many channels (1 or 3).
        dicom_voi (`str`, defaults to `"on"`): `"on"` applies the file's VOI LUT or window, `"off"` skips
            it, `"percentile"` windows at `dicom_voi_percentiles`.
        dicom_multiframe (`str`, defaults to `"first"`): `"first"` frame, or `"error"`.
        dicom_invert_monochrome1 (`bool`, defaults to `True`): invert MONOCHROME1 (bright = low values)
            so that bone and the mediastinum come out bright.
        strict (`bool`, defaults to `False`): non-radiograph DICOM modalities (CT, MR, US...) raise
            instead of warning.
        max_image_pixels (`int`, defaults to 100,000,000): an input with more pixels (rows x columns, as
            its header says, before anything is decoded) is refused with `CXRImageError`: a PNG header
            claiming 30000 x 30000 pixels would otherwise allocate gigabytes. Full-field digital
            radiographs are 10-30 megapixels.
        localization_map (`str`, defaults to `"coupled_maps"`): which model output
            `post_process_localization` localizes with: `"coupled_maps"` (F0 * S0, the paper's
            inference map), `"semantic_maps"` (S0, plain CAM) or `"attention_maps"` (F0). The main job
            stores the one that localized best on the validation boxes (the best mean of MaxBoxAccV2, PxAP
            and the pointing game). The name saved by earlier versions, `"localization_maps"`, is read as
            `"coupled_maps"`.
        localization_threshold (`float`, defaults to 0.5): tau for `post_process_localization`;
            training writes the value calibrated on the validation split here.
        localization_smoothing (`dict[str, float]`, *optional*): per model output (`"semantic_maps"`...), the
            standard deviation in tokens of the Gaussian that `post_process_localization` smooths that map with
            on the model's grid before upsampling (`smooth_grid_map`); a map not named is not smoothed. Training
            writes the width chosen for each map on the validation boxes here.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = CXRImageProcessorKwargs

    def __init__(
        self,
        do_normalize_intensity: bool = True,
        intensity_normalization: str = "minmax",
        intensity_percentiles: Sequence[float] = (0.5, 99.5),
        do_clahe: bool = True,
        clahe_clip_limit: float = 2.0,
        clahe_tile_grid_size: Sequence[int] = (8, 8),
        clahe_max_size: Optional[int] = None,
        do_resize: bool = True,
        size: Optional[dict[str, int]] = None,
        resize_mode: str = "squash",
        pad_value: int = 0,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Optional[Sequence[float]] = None,
        image_std: Optional[Sequence[float]] = None,
        num_channels: int = 3,
        dicom_voi: str = "on",
        dicom_voi_percentiles: Sequence[float] = (0.5, 99.5),
        dicom_multiframe: str = "first",
        dicom_invert_monochrome1: bool = True,
        strict: bool = False,
        max_image_pixels: int = 100_000_000,
        localization_threshold: float = 0.5,
        localization_map: str = "coupled_maps",
        localization_smoothing: Optional[dict[str, float]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.do_normalize_intensity, self.intensity_normalization = do_normalize_intensity, intensity_normalization
        self.intensity_percentiles = list(intensity_percentiles)
        self.do_clahe, self.clahe_clip_limit, self.clahe_max_size = do_clahe, clahe_clip_limit, clahe_max_size
        self.clahe_tile_grid_size = list(clahe_tile_grid_size)
        # An int size means a square, as transformers' processors accept.
        if isinstance(size, int) and not isinstance(size, bool):
            size = {"height": size, "width": size}
        self.do_resize, self.size = do_resize, dict(size) if size is not None else {"height": 224, "width": 224}
        self.resize_mode, self.pad_value = resize_mode, pad_value
        self.do_rescale, self.rescale_factor, self.do_normalize = do_rescale, rescale_factor, do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else list(IMAGENET_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(IMAGENET_STD)
        self.num_channels = num_channels
        self.dicom_voi, self.dicom_voi_percentiles = dicom_voi, list(dicom_voi_percentiles)
        self.dicom_multiframe, self.dicom_invert_monochrome1 = dicom_multiframe, dicom_invert_monochrome1
        self.strict, self.max_image_pixels = strict, max_image_pixels
        self.localization_threshold, self.localization_map = localization_threshold, localization_map
        self.localization_smoothing: Any = {} if localization_smoothing is None else localization_smoothing
        self._check_settings()

    def _check_settings(self) -> None:
        if self.localization_map in LEGACY_MAP_NAMES:  # a configuration saved before the maps were renamed
            logger.info("localization_map %r is now %r", self.localization_map, LEGACY_MAP_NAMES[self.localization_map])
            self.localization_map = LEGACY_MAP_NAMES[self.localization_map]
        choices = {
            "intensity_normalization": ("minmax", "percentile"),
            "resize_mode": ("squash", "pad"),
            "dicom_voi": ("on", "off", "percentile"),
            "dicom_multiframe": ("first", "error"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {self.num_channels}")
        if len(self.image_mean) != self.num_channels and len(self.image_mean) != 3:
            raise ValueError(f"image_mean needs {self.num_channels} values, got {self.image_mean}")
        if not ({"height", "width"} <= set(self.size)) or not all(
            _is_int(self.size[k]) and self.size[k] >= 1 for k in ("height", "width")
        ):
            raise ValueError(f"size must have positive integer 'height' and 'width', got {self.size}")
        # Settings come from any preprocessor_config.json: a bad one must be a ValueError here, never a
        # crash inside OpenCV later (a 0 x 0 CLAHE grid kills the interpreter with SIGFPE).
        grid = self.clahe_tile_grid_size
        if len(grid) != 2 or not all(_is_int(v) and v >= 1 for v in grid):
            raise ValueError(f"clahe_tile_grid_size must be two integers >= 1, got {grid}")
        if not _finite(self.clahe_clip_limit) or self.clahe_clip_limit <= 0:
            raise ValueError(f"clahe_clip_limit must be a positive number, got {self.clahe_clip_limit!r}")
        if self.clahe_max_size is not None and not (_is_int(self.clahe_max_size) and self.clahe_max_size >= 1):
            raise ValueError(f"clahe_max_size must be None or an integer >= 1, got {self.clahe_max_size!r}")
        if not (_is_int(self.max_image_pixels) and self.max_image_pixels >= 1):
            raise ValueError(f"max_image_pixels must be an integer >= 1, got {self.max_image_pixels!r}")
        if not _finite(self.rescale_factor) or self.rescale_factor <= 0:
            raise ValueError(f"rescale_factor must be a positive finite number, got {self.rescale_factor!r}")
        if not all(_finite(v) for v in self.image_mean):
            raise ValueError(f"image_mean must be finite numbers, got {self.image_mean}")
        if len(self.image_std) != len(self.image_mean) or not all(_finite(v) and v > 0 for v in self.image_std):
            raise ValueError(f"image_std must be {len(self.image_mean)} positive numbers, got {self.image_std}")
        for name in ("intensity_percentiles", "dicom_voi_percentiles"):
            low_high = getattr(self, name)
            if len(low_high) != 2 or not all(_finite(v) for v in low_high) or not 0 <= low_high[0] < low_high[1] <= 100:
                raise ValueError(f"{name} must be two numbers 0 <= low < high <= 100, got {low_high}")
        if self.localization_map not in LOCALIZATION_MAPS:
            raise ValueError(f"localization_map must be one of {LOCALIZATION_MAPS}, got {self.localization_map!r}")
        if not _finite(self.localization_threshold) or not 0 <= self.localization_threshold <= 1:
            raise ValueError(f"localization_threshold must be in [0, 1], got {self.localization_threshold!r}")
        if not isinstance(self.localization_smoothing, dict):
            raise ValueError(
                f"localization_smoothing must map model outputs to widths, got {self.localization_smoothing!r}"
            )
        self.localization_smoothing = {LEGACY_MAP_NAMES.get(k, k): v for k, v in self.localization_smoothing.items()}
        for key, sigma in self.localization_smoothing.items():
            if key not in LOCALIZATION_MAPS:
                raise ValueError(f"localization_smoothing names {key!r}, not one of {LOCALIZATION_MAPS}")
            check_smoothing(sigma, f"localization_smoothing[{key!r}]")
        if not _is_int(self.pad_value) or not 0 <= self.pad_value <= 255:
            raise ValueError(f"pad_value must be an integer in [0, 255], got {self.pad_value!r}")

    # ------------------------------------------------------------------------------------- decode

    def decode(self, image: ImageLike, source: Optional[str] = None) -> np.ndarray:
        """Decode one input to a 2-D grayscale array, keeping its bit depth (uint8, uint16, float...).
        Raises `CXRImageError` (and nothing else) for any input it cannot use."""
        source = source or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else "image")
        return decode(image, source, self.decode_options)

    @property
    def decode_options(self) -> DecodeOptions:
        """The decoding settings, as `cxr_decoding` takes them."""
        return DecodeOptions(
            max_image_pixels=self.max_image_pixels, strict=self.strict, dicom_voi=self.dicom_voi,
            dicom_voi_percentiles=tuple(self.dicom_voi_percentiles), dicom_multiframe=self.dicom_multiframe,
            dicom_invert_monochrome1=self.dicom_invert_monochrome1,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------- pipeline

    def normalize_intensity(self, pixels: np.ndarray) -> np.ndarray:
        """Map to uint8 0-255 by min-max or percentiles. A constant image becomes all zeros."""
        if self.intensity_normalization == "percentile":
            if pixels.dtype.kind in "ui":
                low, high = _integer_percentiles(pixels, self.intensity_percentiles)
            else:
                low, high = (float(v) for v in np.percentile(pixels, self.intensity_percentiles))
        else:
            low, high = float(pixels.min()), float(pixels.max())
        if high <= low:
            return np.zeros(pixels.shape, dtype=np.uint8)
        if pixels.dtype == np.uint8 and low == 0 and high == 255:
            return pixels
        if pixels.dtype.kind in "u":
            # A lookup table over the integer range: one gather instead of float arithmetic per pixel.
            levels = np.arange(int(pixels.max()) + 1, dtype=np.float32)
            table = np.clip((levels - low) * (255.0 / (high - low)) + 0.5, 0, 255).astype(np.uint8)
            return table[pixels]
        magnitude = max(abs(low), abs(high))
        if magnitude < 1e30 and high - low > 1e-30:
            # The offset is removed in the input's own precision first: levels 1e-3 apart at 1e6 survive.
            wide = np.float64 if pixels.dtype == np.float64 or pixels.dtype.kind in "iu" else np.float32
            values = (pixels.astype(wide, copy=False) - wide(low)).astype(np.float32)  # type: ignore[operator]
            low, high = 0.0, high - low
        else:
            # Near the float limits: divide by the magnitude first, in float64, so that neither
            # (x - low) nor 255 / (high - low) can overflow.
            values = pixels.astype(np.float64) / magnitude
            low, high = low / magnitude, high / magnitude
        scaled = (values - low) * (255.0 / (high - low)) + 0.5
        return np.clip(scaled, 0, 255).astype(np.uint8)

    def _to_uint8(self, pixels: np.ndarray) -> np.ndarray:
        if self.do_normalize_intensity:
            return self.normalize_intensity(pixels)
        if pixels.dtype == np.uint8:
            return pixels
        return np.clip(pixels.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)

    def _resize(self, gray: np.ndarray, original: Optional[tuple[int, int]] = None) -> tuple[np.ndarray, list[int]]:
        """Resize to `size` and record the geometry; the plan follows the `original` (decoded) size
        even when `gray` was downsampled for CLAHE."""
        height, width = original or gray.shape
        if not self.do_resize:
            gray = gray if gray.shape == (height, width) else _area_resize(gray, height, width)
            return gray, [height, width, height, width, 0, 0, height, width]
        out_h, out_w = self.size["height"], self.size["width"]
        if self.resize_mode == "squash":
            content_h, content_w = out_h, out_w
        else:
            scale = min(out_h / height, out_w / width)
            content_h = max(1, min(out_h, round(height * scale)))
            content_w = max(1, min(out_w, round(width * scale)))
        resized = _area_resize(gray, content_h, content_w)
        top, left = (out_h - content_h) // 2, (out_w - content_w) // 2
        if (content_h, content_w) != (out_h, out_w):
            canvas = np.full((out_h, out_w), self.pad_value, dtype=np.uint8)
            canvas[top : top + content_h, left : left + content_w] = resized
            resized = canvas
        return resized, [height, width, content_h, content_w, top, left, out_h, out_w]

    def normalization(self) -> tuple[np.ndarray, np.ndarray]:
        """Per channel (scale, shift), float32, such that a uint8 level v becomes `v * scale - shift`:
        rescale and normalize folded into one affine map. The one definition of the normalization: the
        processor's lookup table and the training loop's batched version (`wsol_data.PixelNormalizer`)
        both come from it."""
        channels = self.num_channels
        mean = np.asarray(self.image_mean[:channels] if self.do_normalize else [0.0] * channels, dtype=np.float64)
        std = np.asarray(self.image_std[:channels] if self.do_normalize else [1.0] * channels, dtype=np.float64)
        rescale = float(self.rescale_factor) if self.do_rescale else 1.0
        return (rescale / std).astype(np.float32), (mean / std).astype(np.float32)

    def pixel_value_table(self) -> np.ndarray:
        """(channels, 256) float32: uint8 level -> the model's input value, per channel."""
        scale, shift = self.normalization()
        levels = np.arange(256, dtype=np.float32)
        return levels[None, :] * scale[:, None] - shift[:, None]

    def to_pixel_values(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 H x W images of one size -> (B, C, H, W) float32: stacked, rescaled, normalized.

        Every uint8 level maps to a fixed value per channel, so this is a table lookup."""
        tables = self.pixel_value_table()
        pixels = np.empty((len(images), len(tables), *images[0].shape), dtype=np.float32)
        for row, image in enumerate(images):
            for channel, table in enumerate(tables):
                pixels[row, channel] = cv2.LUT(image, table)
        return pixels

    def process_one(self, image: ImageLike, source: str = "image") -> tuple[np.ndarray, list[int]]:
        """One input -> (uint8 H x W after resize, geometry). Raises `CXRImageError` and nothing else:
        a library's own exception on a malformed file (pydicom, PIL, OpenCV) becomes one naming `source`."""

        def run() -> tuple[np.ndarray, list[int]]:
            pixels = decode(image, source, self.decode_options)
            low, high = pixels.min(), pixels.max()
            if low == high:
                # Nothing to classify; typically a file a generic reader could not decode (PIL opens a DICOM
                # as an all-white image), which must not get a confident answer.
                raise CXRImageError(source, f"has no contrast: every pixel is {low} (a blank or misread image)")
            if pixels.dtype == np.uint8:
                white = float(np.count_nonzero(pixels == 255)) / pixels.size
                if white > CLIPPED_WHITE_FRACTION:
                    # What transformers' stock image-classification pipeline hands over for a 16-bit PNG:
                    # it reads files with PIL, whose conversion to 8 bits clips, so the radiograph is gone.
                    raise CXRImageError(
                        source,
                        f"{white:.0%} of its pixels are pure white (255): an image of more than 8 bits clipped "
                        "to 8 by its reader (PIL's 8-bit conversion, which transformers' stock "
                        "image-classification pipeline applies to files, clips every value above 255); pass "
                        "the file itself to the chest-xray-localization pipeline or to this processor, or "
                        "decode it with `image_processor.decode(path)` and pass the array",
                    )
            gray = self._to_uint8(pixels)
            if self.do_clahe:
                gray = self.apply_clahe(gray)
            return self._resize(gray, pixels.shape[:2])

        return typed_errors(source, run)

    def apply_clahe(self, gray: np.ndarray) -> np.ndarray:
        """CLAHE on a uint8 image, at a working size of at most `clahe_max_size` when set."""
        if self.clahe_max_size and max(gray.shape) > self.clahe_max_size:
            scale = self.clahe_max_size / max(gray.shape)
            gray = _area_resize(gray, max(1, round(gray.shape[0] * scale)), max(1, round(gray.shape[1] * scale)))
        tiles = tuple(int(v) for v in self.clahe_tile_grid_size)
        return _clahe(float(self.clahe_clip_limit), tiles).apply(np.ascontiguousarray(gray))

    def preprocess(
        self,
        images: Union[ImageLike, Sequence[ImageLike]],
        return_tensors: Optional[str] = "pt",
        on_error: str = "raise",
        **kwargs: Any,
    ) -> BatchFeature:
        """Process one image or a list.

        Args:
            images: paths, bytes (PNG/JPEG/DICOM), PIL images, numpy arrays or torch tensors, mixed freely.
            return_tensors: `"pt"` (default) or `"np"`.
            on_error: `"raise"` the first `CXRImageError`, or `"skip"` bad items; skipped items are listed
                under `"skipped"` as (index, message) and `"indices"` holds the kept items' positions.
            **kwargs: any constructor setting, for this call only.

        Returns:
            `BatchFeature` with `pixel_values` (B, C, H, W) float32, `original_sizes` (B, 2) as
            (height, width), `geometry` (B, 8) in the order of `GEOMETRY_FIELDS`, `indices` (B,).
        """
        if kwargs:
            processor = self.__class__(**{**self.to_dict(), **kwargs})
            return processor.preprocess(images, return_tensors=return_tensors, on_error=on_error)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("no images given")
        images_u8, geometry, kept, skipped = self._process_items(items, on_error)
        if not images_u8:
            raise CXRImageError("batch", f"every image failed: {skipped}")
        shapes = {image.shape for image in images_u8}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes cannot be batched with do_resize=False: {sorted(shapes)}")
        data: dict[str, Any] = {
            "pixel_values": self.to_pixel_values(images_u8),
            "original_sizes": np.asarray([g[:2] for g in geometry], dtype=np.int64),
            "geometry": np.asarray(geometry, dtype=np.int64),
            "indices": np.asarray(kept, dtype=np.int64),
        }
        if return_tensors == "pt":
            data = {key: torch.from_numpy(value) for key, value in data.items()}
        feature = BatchFeature(data=data)
        if skipped:
            feature["skipped"] = skipped
        return feature

    def _process_items(self, items: list, on_error: str) -> tuple[list, list, list, list]:
        """(uint8 images, geometry rows, kept positions, skipped (position, message)) of `preprocess`."""
        images_u8, geometry, kept, skipped = [], [], [], []
        for index, item in enumerate(items):
            source = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"image[{index}]"
            try:
                gray, geo = self.process_one(item, source)
            except CXRImageError as error:
                if on_error == "raise":
                    raise
                logger.warning("skipping %s", error)
                skipped.append((index, str(error)))
                continue
            images_u8.append(gray)
            geometry.append(geo)
            kept.append(index)
        return images_u8, geometry, kept, skipped

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:  # type: ignore[override]
        return self.preprocess(images, *args, **kwargs)

    # ------------------------------------------------------------------------------------- post-processing

    @staticmethod
    def boxes_to_input(
        boxes: Sequence[Sequence[float]], geometry: Sequence[int], frame: Optional[Sequence[int]] = None
    ) -> np.ndarray:
        """Boxes in original pixels -> the model input (content scaled, then offset by the padding), or that
        input stretched to `frame` (H, W): wsolevaluation's 224 x 224. Truncated to integers as its
        `resize_bbox` does: `int(x * new_size / old_size)`, multiplication first. With a squashed resize
        (no padding) this is the reference's own formula, original -> frame in one step. The inverse of
        `heatmap_to_original`'s mapping, for boxes."""
        original_h, original_w, content_h, content_w, top, left, input_h, input_w = Geometry.of(geometry)
        frame_h, frame_w = (input_h, input_w) if frame is None else (int(frame[0]), int(frame[1]))
        array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if (content_h, content_w, top, left) == (input_h, input_w, 0, 0):
            scaled = array * np.array([frame_w, frame_h] * 2) / np.array([original_w, original_h] * 2)
        else:
            inside = array * np.array([content_w, content_h] * 2) / np.array([original_w, original_h] * 2)
            inside = inside + np.array([left, top, left, top])
            scaled = inside * np.array([frame_w, frame_h] * 2) / np.array([input_w, input_h] * 2)
        return scaled.astype(np.int64)

    def heatmap_to_original(self, scoremap: np.ndarray, geometry: Sequence[int]) -> np.ndarray:
        """A score map over the model input (any grid size) -> float32 [0, 1] map in original pixels.

        One bicubic warp maps each original pixel centre through the resize and padding onto the
        grid, so nothing is resampled twice. The result is min-max normalized.
        """
        original_h, original_w, content_h, content_w, top, left, input_h, input_w = Geometry.of(geometry)
        grid_h, grid_w = scoremap.shape
        # original pixel centre -> input pixel: x_in = (x + .5) * content_w / original_w - .5 + left
        # input pixel -> grid cell:            x_g  = (x_in + .5) * grid_w / input_w - .5
        scale_x = content_w / original_w * grid_w / input_w
        scale_y = content_h / original_h * grid_h / input_h
        shift_x = (0.5 * content_w / original_w + left) * grid_w / input_w - 0.5
        shift_y = (0.5 * content_h / original_h + top) * grid_h / input_h - 0.5
        matrix = np.array([[scale_x, 0.0, shift_x], [0.0, scale_y, shift_y]], dtype=np.float64)
        warped = cv2.warpAffine(
            np.ascontiguousarray(scoremap, dtype=np.float32),
            matrix,
            (original_w, original_h),
            flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        return normalize_scoremap(warped)

    def _geometry_rows(self, geometry: Any, target_sizes: Optional[Sequence[Sequence[int]]], batch: int) -> np.ndarray:
        """(B, 8) geometry rows from the processor's output, or from `target_sizes` for squashed inputs."""
        if isinstance(geometry, (BatchFeature, dict)):
            geometry = geometry["geometry"]
        if geometry is not None:
            rows = np.asarray(geometry.cpu() if isinstance(geometry, torch.Tensor) else geometry)
        elif target_sizes is not None:
            input_h, input_w = self.size["height"], self.size["width"]
            rows = np.asarray([[h, w, input_h, input_w, 0, 0, input_h, input_w] for h, w in target_sizes])
        else:
            raise ValueError("post_process_localization needs geometry (from the processor) or target_sizes")
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} geometry rows for {batch} images")
        return rows

    @staticmethod
    def heatmap_boxes(
        heatmap: np.ndarray, threshold: float, multi_contour: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """The boxes `post_process_localization` gives for a heatmap it returned, at another threshold: (K, 4)
        int64 inclusive xyxy and their (K,) mean heatmap values. A viewer that keeps the heatmap redraws boxes
        with this alone, without warping the map to the original pixels again."""
        return boxes_with_scores(heatmap, float(check_thresholds(threshold)[0]), multi_contour)

    def post_process_localization(
        self,
        outputs: Any,
        target_sizes: Optional[Sequence[Sequence[int]]] = None,
        labels: Optional[Union[Sequence[int], torch.Tensor]] = None,
        threshold: Optional[float] = None,
        multi_contour: bool = False,
        geometry: Optional[Union[torch.Tensor, np.ndarray, BatchFeature]] = None,
        id2label: Optional[dict[int, str]] = None,
        localization_map: Optional[str] = None,
        smoothing: Optional[float] = None,
    ) -> list[dict[str, Any]]:
        """Model outputs -> per image: label, score, heatmap and boxes in the original pixels.

        Args:
            outputs: the model's output (needs `logits` and the map named by `localization_map`:
                `(B, C, h, w)` class maps, or `(B, h, w)` for the class-agnostic attention); its
                `probabilities` (calibrated) give `score` when present, else the softmax of `logits`.
            target_sizes: (height, width) per image, when the inputs were squashed (no padding) and
                `geometry` is not given.
            labels: class per image to localize (ground-truth-known); defaults to the prediction.
            threshold: tau as a fraction of the heatmap's maximum; defaults to `localization_threshold`.
            multi_contour: a box per contour above tau, instead of the largest contour's only.
            geometry: the processor's `BatchFeature` (or its `geometry`), which undoes padding exactly.
            id2label: class names (e.g. `model.config.id2label`) for `label_name`.
            localization_map: the output to localize with; defaults to `self.localization_map`.
            smoothing: the Gaussian width (tokens) the map is smoothed with on its grid; defaults to the width
                stored for that output in `localization_smoothing` (none when it has none). 0: the raw map.

        Returns:
            A list of dicts, one per image: `label` (int), `label_name` (from `id2label`, else the
            index as a string), `score` (softmax probability of `label`), `heatmap` (float32 H x W,
            0-1), `boxes` (K x 4 inclusive xyxy, int64), `box_scores` (K, mean heatmap inside), and the
            settings applied (`localization_settings`): `localization_map`, `threshold`, `smoothing`.
        """
        key, tau, sigma = self.localization_settings(localization_map, threshold, smoothing)
        selected, probabilities, chosen = self._localization_inputs(outputs, key, labels)
        rows = self._geometry_rows(geometry, target_sizes, selected.shape[0])
        results = []
        for i, label in enumerate(chosen.tolist()):
            heatmap = self.heatmap_to_original(smooth_grid_map(selected[i].numpy(), sigma), rows[i])
            boxes, box_scores = self.heatmap_boxes(heatmap, tau, multi_contour)
            name = id2label[label] if id2label else str(label)
            results.append({"label": label, "label_name": name, "score": float(probabilities[i, label]),
                            "heatmap": heatmap, "boxes": boxes, "box_scores": box_scores,
                            "localization_map": key, "threshold": tau, "smoothing": sigma})  # fmt: skip
        return results

    def localization_settings(
        self, localization_map: Optional[str] = None, threshold: Optional[float] = None,
        smoothing: Optional[float] = None,
    ) -> tuple[str, float, float]:  # fmt: skip
        """(model output, tau, smoothing width in tokens) that `post_process_localization` localizes with, given
        its overrides (None: this processor's stored choices; a legacy map name is read as its current one).
        The one place these defaults resolve, so that what a caller reports is what was applied."""
        key = self.localization_map if localization_map is None else localization_map
        key = LEGACY_MAP_NAMES.get(key, key)
        tau = float(check_thresholds(self.localization_threshold if threshold is None else threshold)[0])
        sigma = check_smoothing(self.localization_smoothing.get(key, 0.0) if smoothing is None else smoothing)
        return key, tau, sigma

    @staticmethod
    def _localization_inputs(
        outputs: Any, key: str, labels: Optional[Union[Sequence[int], torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the map of the class to localize (B, h, w), probabilities, that class per image), checked: finite
        logits and maps, classes in range. F0's single map stands for every class."""
        if key not in LOCALIZATION_MAPS:
            raise ValueError(f"localization_map must be one of {LOCALIZATION_MAPS}, got {key!r}")
        # ModelOutput is a dict too, so both the model's output and a plain dict index alike.
        maps, logits = outputs[key].detach().float().cpu(), outputs["logits"].detach().float().cpu()
        if maps.ndim == 3:
            maps = maps[:, None].expand(-1, logits.shape[-1], -1, -1)
        batch = maps.shape[0]
        chosen = logits.argmax(-1) if labels is None else torch.as_tensor(labels).long().view(-1)
        # The model's calibrated probabilities (temperature scaling) when it gives them; else the softmax.
        given = outputs.get("probabilities") if hasattr(outputs, "get") else None
        probabilities = given.detach().float().cpu() if given is not None else logits.softmax(-1)
        if chosen.numel() != batch or (batch and (chosen.min() < 0 or chosen.max() >= logits.shape[-1])):
            raise LocalizationInputError(
                f"labels must be {batch} class indices in [0, {logits.shape[-1]}), got {chosen.tolist()}"
            )
        broken = ~(torch.isfinite(logits).all(-1) & torch.isfinite(probabilities).all(-1))
        if broken.any():
            image = int(broken.nonzero()[0])
            raise LocalizationInputError(f"image {image}: the model's logits are NaN or infinite (broken weights?)")
        selected = maps[torch.arange(batch), chosen]
        broken = ~torch.isfinite(selected.flatten(1)).all(-1)
        if broken.any():
            image = int(broken.nonzero()[0])
            raise LocalizationInputError(f"image {image}: the {key} map holds NaN or infinite values")
        return selected, probabilities, chosen

    def overlay_heatmap(self, *args: Any, **kwargs: Any) -> np.ndarray:
        """See the module-level `overlay_heatmap`."""
        return overlay_heatmap(*args, **kwargs)


CXRImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["CXRImageProcessor", "CXRImageError", "overlay_heatmap", "Geometry", "GEOMETRY_FIELDS"]
