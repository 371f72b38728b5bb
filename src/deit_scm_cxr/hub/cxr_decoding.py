"""Decoding chest radiographs to a grayscale array: DICOM (PS3.3 C.11's grayscale transform: modality LUT ->
VOI LUT or window -> MONOCHROME1 inversion), PNG/JPEG/TIFF (EXIF orientation honoured), arrays and tensors.
Integer inputs keep their bit depth. Every failure is a `CXRImageError` naming the input.

Part of the image processor's remote code: uploaded beside `image_processing_cxr.py`, which imports it
relatively; it imports numpy, OpenCV, Pillow and torch, and pydicom only when a DICOM arrives.
"""

from __future__ import annotations

import io
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

_RADIOGRAPH_MODALITIES = {"CR", "DX", "RG", "DR", "MG", "PX", "IO", "XA", "RF", "OT", "SC"}
_SUPPORTED_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422"}

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, torch.Tensor]


class CXRImageError(ValueError):
    """An input that cannot be turned into a radiograph. `source` names it (path or batch index)."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def typed_errors(source: str, work: Any) -> Any:
    """Run `work()`; any exception but `CXRImageError` becomes one naming `source` (chained)."""
    try:
        return work()
    except CXRImageError:
        raise
    except MemoryError as error:
        raise CXRImageError(source, "out of memory while decoding") from error
    except Exception as error:  # a per-image failure of any library is this image's error
        raise CXRImageError(source, f"{type(error).__name__}: {error}") from error


def _looks_like_dicom(data: bytes) -> bool:
    """A DICOM file with its 128-byte preamble and "DICM", or a bare data set (no preamble) whose first
    element is in the file-meta (0002) or identifying (0008) group, little-endian."""
    return (len(data) >= 132 and data[128:132] == b"DICM") or data[:2] in (b"\x02\x00", b"\x08\x00")


def _finite_pixels(pixels: np.ndarray, source: str, stage: str) -> np.ndarray:
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise CXRImageError(source, f"contains NaN or infinite values ({stage})")
    return pixels


# Deflated Explicit VR Little Endian: the whole dataset after the file meta is one raw deflate stream.
_DEFLATED_SYNTAX = b"1.2.840.10008.1.2.1.99"


def _narrowest_float(pixels: np.ndarray) -> np.ndarray:
    """float32 when it keeps every grey level, else float64: a large rescale intercept with a small slope
    (1e6 + 1e-3 k) has levels closer together than float32's spacing at that magnitude, and the cast
    would merge them before the window is applied."""
    wide = pixels.astype(np.float64, copy=False)
    magnitude = float(np.abs(wide).max())
    if magnitude > 3e38:
        return wide
    narrow = wide.astype(np.float32)
    span = float(wide.max() - wide.min())
    if span > 0 and float(np.abs(narrow - wide).max()) > span * 1e-6:
        return wide
    return narrow


@dataclass(frozen=True)
class DecodeOptions:
    """The processor's decoding settings (see `CXRImageProcessor` for each)."""

    max_image_pixels: int = 100_000_000
    strict: bool = False
    dicom_voi: str = "on"
    dicom_voi_percentiles: Sequence[float] = field(default=(0.5, 99.5))
    dicom_multiframe: str = "first"
    dicom_invert_monochrome1: bool = True


def decode(image: ImageLike, source: str, options: DecodeOptions) -> np.ndarray:
    """One input decoded to a 2-D grayscale array, its bit depth kept (uint8, uint16, float...). Raises
    `CXRImageError` (and nothing else) for any input it cannot use."""
    return typed_errors(source, lambda: _decode(image, source, options))


def _decode(image: ImageLike, source: str, options: DecodeOptions) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if os.path.isdir(path):
            raise CXRImageError(path, "is a folder, not an image file")
        if not os.path.isfile(path):
            raise CXRImageError(path, "no such file")
        with open(path, "rb") as handle:
            data = handle.read()
        return _decode_bytes(data, path, options, hint_dicom=path.lower().endswith((".dcm", ".dicom")))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(image), source, options)
    if isinstance(image, Image.Image):
        _check_pixel_count(image.size[0] * image.size[1], source, options)
        return _finite_pixels(_from_pil(image, source), source, "decoded image")
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        if array.dtype in (torch.bfloat16, torch.float16):
            array = array.float()  # numpy has no bfloat16; float32 holds both exactly
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.permute(1, 2, 0)  # torch images are channels-first
        return _from_array(array.numpy(), source, options)
    if isinstance(image, np.ndarray):
        return _from_array(image, source, options)
    raise CXRImageError(source, f"unsupported input type {type(image).__name__}")


def _decode_bytes(data: bytes, source: str, options: DecodeOptions, hint_dicom: bool = False) -> np.ndarray:
    if not data:
        raise CXRImageError(source, "empty file")
    if _looks_like_dicom(data) or hint_dicom:
        return _from_dicom(data, source, options)
    try:
        with Image.open(io.BytesIO(data)) as pil:
            _check_pixel_count(pil.size[0] * pil.size[1], source, options)
            pil.load()
            # EXIF orientation, as every viewer honours it: a rotated photo of a film is turned upright,
            # so the heart is on the side the viewer shows.
            upright = ImageOps.exif_transpose(pil)
            return _finite_pixels(_from_pil(upright, source), source, "decoded image")
    except Image.DecompressionBombError as error:
        raise CXRImageError(source, f"image too large to decode safely ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, CXRImageError):
            raise
        raise CXRImageError(source, f"cannot decode image ({error})") from error


def _check_pixel_count(count: int, source: str, options: DecodeOptions) -> None:
    if count > options.max_image_pixels:
        raise CXRImageError(
            source, f"{count:,} pixels, more than max_image_pixels ({options.max_image_pixels:,}); not decoded"
        )


def _from_pil(pil: Image.Image, source: str) -> np.ndarray:
    if pil.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(pil, dtype=np.uint16)
    if pil.mode in ("I", "F", "L"):
        return np.asarray(pil)
    if pil.mode in ("1", "P", "LA", "PA"):
        return np.asarray(pil.convert("L"))
    if pil.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
        return luminance(np.asarray(pil.convert("RGB")))
    raise CXRImageError(source, f"unsupported image mode {pil.mode}")


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Grayscale of an RGB image (ITU-R BT.601 weights, as OpenCV's)."""
    if rgb.dtype == np.uint8:
        return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    dtype = np.float64 if rgb.dtype == np.float64 else np.float32
    weights = np.array([0.299, 0.587, 0.114], dtype=dtype)
    return rgb[..., :3].astype(dtype) @ weights  # type: ignore[operator]


def _from_array(array: np.ndarray, source: str, options: DecodeOptions) -> np.ndarray:
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype.kind not in "uif":
        raise CXRImageError(source, f"unsupported dtype {array.dtype}")
    if array.size == 0:
        raise CXRImageError(source, f"empty array of shape {array.shape}")
    if array.ndim == 3:
        channels = array.shape[-1]
        if channels == 1:
            array = array[..., 0]
        elif channels in (3, 4):
            array = luminance(array[..., :3])
        else:
            raise CXRImageError(source, f"expected H x W x 1, 3 or 4, got shape {array.shape}")
    elif array.ndim != 2:
        raise CXRImageError(source, f"expected a 2-D or 3-D image, got {array.ndim}-D shape {array.shape}")
    _check_pixel_count(array.shape[0] * array.shape[1], source, options)
    _finite_pixels(array, source, "input array")
    if array.dtype.kind == "f":
        # float64 stays float64: values beyond float32's range would become infinite.
        return array if array.dtype == np.float64 else array.astype(np.float32)
    if array.dtype in (np.uint8, np.uint16):
        return array
    # Other integers: unsigned 16-bit when the values fit (keeps the lookup-table path), else float.
    if int(array.min()) >= 0 and int(array.max()) <= 65535:
        return array.astype(np.uint16)
    return array.astype(np.float32)


def _dicom_pixel_array(dataset: Any, source: str) -> np.ndarray:
    """`dataset.pixel_array`, or a `CXRImageError` that says whether a decoder is missing (compressed
    transfer syntax) or the data is malformed."""
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax or "unknown"))
        if syntax is not None and getattr(syntax, "is_compressed", False):
            hint = "; compressed DICOM needs a decoder: pip install pylibjpeg pylibjpeg-libjpeg "
            hint += "pylibjpeg-openjpeg (or python-gdcm)"
        else:
            hint = "; the pixel data or its description (Rows, Columns, BitsAllocated...) is malformed"
        raise CXRImageError(
            source, f"cannot decode pixel data with transfer syntax {name} ({error}){hint}"
        ) from error
    return pixels


def _check_deflated_size(data: bytes, source: str, options: DecodeOptions) -> None:
    """A Deflated Explicit VR Little Endian file is inflated whole by pydicom before any tag can be read,
    so `max_image_pixels` would be checked too late (a 1.7 MB upload inflated to 3.4 GB). Count the
    inflated bytes first, in chunks that are thrown away, and stop at the most a dataset within
    `max_image_pixels` can need (16-bit RGB, 6 bytes a pixel, plus 16 MiB of other elements)."""
    if data[128:132] != b"DICM" or _DEFLATED_SYNTAX not in data[132:4096]:
        return
    meta_end = 132
    # The file meta group is explicit VR little endian; (0002,0000) UL gives the length of the rest.
    if data[132:136] == b"\x02\x00\x00\x00" and data[136:138] == b"UL":
        meta_end = 144 + int.from_bytes(data[140:144], "little")
    if _DEFLATED_SYNTAX not in data[132:meta_end]:
        return
    limit = options.max_image_pixels * 6 + (16 << 20)
    inflater, inflated, view = zlib.decompressobj(-zlib.MAX_WBITS), 0, memoryview(data)[meta_end:]
    step = 1 << 22  # at most 4 MiB of inflated bytes held at a time
    head: Optional[bytearray] = bytearray()  # the first inflated bytes, where Rows and Columns are

    def take(chunk: bytes) -> int:
        """Count a chunk (then dropped); check Rows x Columns as soon as both are in."""
        nonlocal head
        if head is not None and len(head) < _HEADER_BYTES:
            head += chunk[: _HEADER_BYTES - len(head)]
            size = _rows_and_columns(bytes(head))
            if size is not None:
                _check_pixel_count(size[0] * size[1], source, options)
                head = None
        return len(chunk)

    try:
        for start in range(0, len(view), 1 << 16):
            inflated += take(inflater.decompress(view[start : start + (1 << 16)], step))
            while inflater.unconsumed_tail and inflated <= limit:
                inflated += take(inflater.decompress(inflater.unconsumed_tail, step))
            if inflated > limit:
                raise CXRImageError(
                    source, f"deflated DICOM inflates to more than {limit:,} bytes, more than max_image_pixels "
                    f"({options.max_image_pixels:,}) can need; not decoded",
                )  # fmt: skip
    except zlib.error as error:
        raise CXRImageError(source, f"deflated DICOM is corrupt ({error})") from error


# Explicit VR little endian (the deflated syntax's): (0028,0010) Rows and (0028,0011) Columns, US, length 2.
_ROWS_TAG, _COLUMNS_TAG = b"\x28\x00\x10\x00US\x02\x00", b"\x28\x00\x11\x00US\x02\x00"
_HEADER_BYTES = 1 << 16


def _rows_and_columns(head: bytes) -> Optional[tuple[int, int]]:
    """Rows and Columns from the first inflated bytes of a deflated dataset, once both are in; else None."""
    rows_at, columns_at = head.find(_ROWS_TAG), head.find(_COLUMNS_TAG)
    if rows_at < 0 or columns_at < 0 or columns_at + 10 > len(head) or rows_at + 10 > len(head):
        return None
    rows = int.from_bytes(head[rows_at + 8 : rows_at + 10], "little")
    columns = int.from_bytes(head[columns_at + 8 : columns_at + 10], "little")
    return rows, columns


def _from_dicom(data: bytes, source: str, options: DecodeOptions) -> np.ndarray:
    try:
        import pydicom
    except ImportError as error:
        raise CXRImageError(source, "reading DICOM needs pydicom: pip install pydicom") from error
    _check_deflated_size(data, source, options)
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as error:  # pydicom raises many types for malformed files
        raise CXRImageError(source, f"cannot read DICOM ({error})") from error
    modality = str(getattr(dataset, "Modality", "")).upper()
    if modality and modality not in _RADIOGRAPH_MODALITIES:
        if options.strict:
            raise CXRImageError(source, f"modality {modality} is not a radiograph (strict mode)")
        logger.warning("%s: modality %s is not a radiograph; processing it anyway", source, modality)
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        raise CXRImageError(source, f"unsupported photometric interpretation {photometric}")
    if "PixelData" not in dataset:
        raise CXRImageError(source, "DICOM has no pixel data")
    rows, columns = int(getattr(dataset, "Rows", 0) or 0), int(getattr(dataset, "Columns", 0) or 0)
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    _check_pixel_count(rows * columns * frames, source, options)
    pixels = _dicom_pixel_array(dataset, source)
    if frames > 1:
        if options.dicom_multiframe == "error":
            raise CXRImageError(source, f"multi-frame DICOM ({frames} frames)")
        pixels = pixels[0]
    if photometric.startswith(("RGB", "YBR")):
        return _dicom_colour(pixels, photometric, source)
    return _dicom_grayscale(pixels, dataset, photometric, source, options)


def _dicom_colour(pixels: np.ndarray, photometric: str, source: str) -> np.ndarray:
    """An RGB or YBR DICOM's pixels as luminance."""
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise CXRImageError(source, f"{photometric} DICOM whose pixel data has shape {pixels.shape} (SamplesPerPixel?)")
    if photometric.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        pixels = convert_color_space(pixels, photometric, "RGB")
    return luminance(pixels)


def _dicom_grayscale(
    pixels: np.ndarray, dataset: Any, photometric: str, source: str, options: DecodeOptions
) -> np.ndarray:
    """A MONOCHROME DICOM's stored values through its modality and VOI LUTs (or percentile window), inverted
    for MONOCHROME1."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    pixels = apply_modality_lut(pixels, dataset)
    if options.dicom_voi == "on":
        pixels = apply_voi_lut(pixels, dataset)
    elif options.dicom_voi == "percentile":
        low, high = np.percentile(pixels, options.dicom_voi_percentiles)
        pixels = np.clip(pixels, low, high)
    if photometric == "MONOCHROME1" and options.dicom_invert_monochrome1:
        # After the VOI transform, so that the window applies to stored values as intended.
        pixels = pixels.max() + pixels.min() - pixels
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.size == 0:
        raise CXRImageError(source, f"DICOM pixel data has shape {pixels.shape}")
    # RescaleSlope/Intercept or a LUT can give NaN or overflow (slope 1e308): an error, not a black image.
    _finite_pixels(pixels, source, "after the modality/VOI LUT")
    if pixels.dtype.kind == "f" or pixels.dtype.itemsize > 2 or pixels.min() < 0:
        pixels = _narrowest_float(pixels)
    return pixels
