"""Per-stage cost of CXRImageProcessor against a straightforward PIL/numpy pipeline of the same steps.

Inputs are synthetic radiograph-like images (smooth anatomy-scale structure plus noise, so they
compress like real films): 1024x1024 8-bit PNGs and 2048x2048 16-bit DICOMs. Prints progress to stderr
and one JSON object on the last line of stdout:

    {"png_1024_8bit": {"ours": {"decode_ms", "normalize_ms", "clahe_ms", "resize_ms", "stack_ms",
                                "total_ms", "images_per_s", "after_decode_over_decode"},
                       "baseline": {...}, "speedup_after_decode": x},
     "dicom_2048_16bit": {...}, "target_after_decode_over_decode_png": 0.5}

The baseline is what a first implementation writes: PIL decode, float64 min-max with numpy, OpenCV
CLAHE (as the original scripts), PIL bilinear resize, float normalization per channel.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import time

import cv2
import numpy as np
from PIL import Image

from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor

logger = logging.getLogger("bench_processor")
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def synthetic_radiograph(size: int, seed: int, bits: int) -> np.ndarray:
    """Smooth large-scale structure + fine noise at `bits` depth."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((16, 16)).astype(np.float32)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image += 0.8 * np.exp(-((xx - 0.5) ** 2) / 0.01)  # a bright central column
    image += rng.normal(0, 0.03, (size, size)).astype(np.float32)
    image = (image - image.min()) / (image.max() - image.min())
    top = 2**bits - 1
    return (image * top).astype(np.uint8 if bits == 8 else np.uint16)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def dicom_bytes(image: np.ndarray) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("bench.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.Modality = "CR"
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.Rows, dataset.Columns = image.shape
    dataset.SamplesPerPixel = 1
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.PixelRepresentation = 0
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, 0
    dataset.WindowCenter, dataset.WindowWidth = 32768, 60000
    dataset.PixelData = image.tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def ours_stages(processor: CXRImageProcessor, data: bytes) -> dict[str, float]:
    """The processor's own steps, timed one by one (the same calls `process_one` makes)."""
    times = {}
    start = time.perf_counter()
    raw = processor.decode(data)
    times["decode_ms"] = time.perf_counter() - start
    start = time.perf_counter()
    gray = processor.normalize_intensity(raw)
    times["normalize_ms"] = time.perf_counter() - start
    start = time.perf_counter()
    gray = processor.apply_clahe(gray)
    times["clahe_ms"] = time.perf_counter() - start
    start = time.perf_counter()
    resized, _ = processor._resize(gray, raw.shape[:2])
    times["resize_ms"] = time.perf_counter() - start
    start = time.perf_counter()
    processor.to_pixel_values([resized])
    times["stack_ms"] = time.perf_counter() - start
    return times


def baseline_stages(data: bytes, is_dicom: bool) -> dict[str, float]:
    times = {}
    start = time.perf_counter()
    if is_dicom:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        dataset = pydicom.dcmread(io.BytesIO(data))
        raw = apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset)
    else:
        raw = np.array(Image.open(io.BytesIO(data)))
    times["decode_ms"] = time.perf_counter() - start
    start = time.perf_counter()
    values = raw.astype(np.float64)
    gray = ((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)
    times["normalize_ms"] = time.perf_counter() - start
    start = time.perf_counter()
    gray = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)
    times["clahe_ms"] = time.perf_counter() - start
    start = time.perf_counter()
    resized = np.array(Image.fromarray(gray).resize((224, 224), Image.BILINEAR))
    times["resize_ms"] = time.perf_counter() - start
    start = time.perf_counter()
    rgb = np.stack([resized] * 3, axis=-1).astype(np.float32) / 255.0
    ((rgb - MEAN) / STD).transpose(2, 0, 1)
    times["stack_ms"] = time.perf_counter() - start
    return times


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    summary = {key: round(statistics.median(r[key] for r in runs) * 1000, 3) for key in runs[0]}
    summary["total_ms"] = round(sum(summary.values()), 3)
    after = summary["total_ms"] - summary["decode_ms"]
    summary["after_decode_ms"] = round(after, 3)
    summary["after_decode_over_decode"] = round(after / summary["decode_ms"], 3)
    summary["images_per_s"] = round(1000 / summary["total_ms"], 2)
    return summary


def bench_kind(kind: str, images: list[bytes], repeats: int, **settings: object) -> dict:
    processor = CXRImageProcessor(**settings)
    is_dicom = kind.startswith("dicom")
    ours, baseline = [], []
    for _ in range(repeats):
        for data in images:
            # Alternate the two so that machine load hits both alike.
            ours.append(ours_stages(processor, data))
            baseline.append(baseline_stages(data, is_dicom))
    result = {"ours": summarize(ours), "baseline": summarize(baseline)}
    result["speedup_after_decode"] = round(result["baseline"]["after_decode_ms"] / result["ours"]["after_decode_ms"], 2)
    end_to_end = [processor(data)["pixel_values"] for data in images[:1]]
    assert end_to_end[0].shape == (1, 3, 224, 224)
    return result


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)  # per-image, per-core cost: data loaders run one image per worker
    pngs = [png_bytes(synthetic_radiograph(1024, seed, 8)) for seed in range(args.images)]
    dicoms = [dicom_bytes(synthetic_radiograph(2048, seed, 16)) for seed in range(max(1, args.images // 2))]
    report: dict = {}
    cases = (
        ("png_1024_8bit", pngs, {}),
        ("png_1024_8bit_clahe_max_512", pngs, {"clahe_max_size": 512}),
        ("dicom_2048_16bit", dicoms, {}),
        ("dicom_2048_16bit_clahe_max_512", dicoms, {"clahe_max_size": 512}),
    )
    for name, images, settings in cases:
        report[name] = bench_kind(name, images, args.repeats, **settings)
        logger.info("%s done", name)
    # What the faster CLAHE setting costs in fidelity: mean |difference| of the 224^2 uint8 images.
    default, fast = CXRImageProcessor(), CXRImageProcessor(clahe_max_size=512)
    differences = [
        np.abs(default.process_one(d)[0].astype(int) - fast.process_one(d)[0].astype(int)).mean() for d in pngs
    ]
    report["clahe_max_512_mean_abs_grey_level_change_png"] = round(float(np.mean(differences)), 3)
    report["target_after_decode_over_decode_png"] = 0.5
    report["target_met"] = {
        name: report[name]["ours"]["after_decode_over_decode"] <= 0.5
        for name in ("png_1024_8bit", "png_1024_8bit_clahe_max_512")
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
