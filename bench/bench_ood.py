"""How well the out-of-distribution score tells the training distribution from everything else.

For each trained model folder (`run_wsol.py`'s output, which holds the score's statistics and threshold), the
score of: held-out phantoms of the model's own series (its test split: in-distribution), phantoms of another
series (the same generator, another seed: in-distribution too, so every alarm there is a false one), the real
radiographs of pydicom's test data (CR), other modalities from the same test data (CT, MR, US, NM, OT; every
file the processor decodes), natural photographs (scikit-learn's two sample images and crops of them) and
constant-ish images (flat, gradients, noise, a checkerboard). Per set: AUROC against the held-out phantoms
and the fraction flagged at the model's threshold (the false-alarm rate for the in-distribution sets, the
detection rate for the others), over the images the processor accepts; the ones it refuses with a typed
error (a flat image, a multi-frame file) are counted apart, since they never reach the model.

    python bench/bench_ood.py --models /tmp/abl/cxr-seed0 /tmp/abl/cxr-seed1 /tmp/abl/cxr-seed2

Prints one JSON object: per model and set, count, AUROC, flagged fraction; then mean ± std over models.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from deit_scm_cxr.data.prepare import load_raw_splits
from deit_scm_cxr.hub.image_processing_cxr import CXRImageError, CXRImageProcessor
from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification
from deit_scm_cxr.training.run import settings_for

logger = logging.getLogger("bench_ood")
IN_DISTRIBUTION = ("phantoms_held_out", "phantoms_other_series")
OTHER_SERIES_SEED = 12345


def phantoms(seed: int, num_phantoms: int, phantom_size: int) -> list[np.ndarray]:
    """The test split of a phantom series (`run_wsol.py --seed seed`'s), as grayscale arrays."""
    settings = settings_for("--num_phantoms", str(num_phantoms), "--phantom_size", str(phantom_size),
                            "--seed", str(seed), "--output_dir", "unused").data  # fmt: skip
    return [np.asarray(item["image"].convert("L")) for item in load_raw_splits(settings)["test"]]


def dicom_files() -> dict[str, list[str]]:
    """pydicom's test files by kind: CR radiographs, and other imaging modalities."""
    import pydicom
    from pydicom.data import get_testdata_files

    kinds: dict[str, list[str]] = {"real_radiographs": [], "other_modalities": []}
    for path in get_testdata_files():
        try:
            modality = getattr(pydicom.dcmread(path, stop_before_pixels=True), "Modality", None)
        except Exception:  # not a DICOM, or one pydicom cannot parse: not an image anyone would upload
            continue
        if modality == "CR":
            kinds["real_radiographs"].append(path)
        elif modality in ("CT", "MR", "US", "NM", "OT"):
            kinds["other_modalities"].append(path)
    return kinds


def natural_images(rng: np.random.Generator, crops: int = 10) -> list[np.ndarray]:
    """scikit-learn's two sample photographs, whole and as random crops of a third to a whole of each side."""
    from sklearn.datasets import load_sample_images

    images = []
    for photo in load_sample_images().images:
        images.append(photo)
        height, width = photo.shape[:2]
        for _ in range(crops):
            side = int(min(height, width) * rng.uniform(0.33, 1.0))
            top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            images.append(photo[top : top + side, left : left + side])
    return images


def constant_ish_images(rng: np.random.Generator, size: int = 256) -> list[np.ndarray]:
    """Flat images, gradients, noise and a checkerboard: nothing a radiograph looks like."""
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    images = [np.full((size, size), level, dtype=np.uint8) for level in (0, 40, 128, 200, 255)]
    images += [np.tile(ramp, (size, 1)).astype(np.uint8), np.tile(ramp[:, None], (1, size)).astype(np.uint8)]
    images += [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(3)]
    images += [np.clip(rng.normal(128, 20, (size, size)), 0, 255).astype(np.uint8) for _ in range(2)]
    checker = ((np.indices((size, size)) // 32).sum(axis=0) % 2 * 255).astype(np.uint8)
    return [*images, checker]


@torch.no_grad()
def scores(model: Any, processor: CXRImageProcessor, inputs: list[Any], batch_size: int = 32) -> tuple[np.ndarray, int]:
    """The model's `ood_scores` of every input the processor accepts, and how many it refused (a typed
    `CXRImageError`: those never reach the model, so they need no alarm)."""
    found, refused = [], 0
    for start in tqdm(range(0, len(inputs), batch_size), desc="scoring", leave=False):
        batch = []
        for item in inputs[start : start + batch_size]:
            try:
                batch.append(processor([item])["pixel_values"])
            except CXRImageError as error:
                logger.info("refused %s", error)
                refused += 1
        if batch:
            found.append(model(torch.cat(batch)).ood_scores.double().numpy())
    return (np.concatenate(found) if found else np.zeros(0)), refused


def evaluate_model(folder: Path, sets: dict[str, list[Any]]) -> dict[str, dict[str, float]]:
    """Per set: how many images scored, AUROC against the held-out phantoms, fraction flagged."""
    from sklearn.metrics import roc_auc_score

    model = DeiTSCMForImageClassification.from_pretrained(folder).eval()
    if model.config.ood_threshold is None:
        raise SystemExit(f"{folder}: no out-of-distribution statistics in its config (trained before they existed)")
    processor = CXRImageProcessor.from_pretrained(folder)
    results = json.loads((folder / "all_results.json").read_text())
    seed = int(results["args"]["seed"])
    own = phantoms(seed, int(results["args"]["num_phantoms"]), int(results["args"]["phantom_size"]))
    reference, _ = scores(model, processor, own)
    report = {}
    for name, items in {"phantoms_held_out": own, **sets}.items():
        values, refused = (reference, 0) if name == "phantoms_held_out" else scores(model, processor, items)
        row = {"count": int(len(values)), "refused_by_the_processor": refused,
               "flagged": float((values > model.config.ood_threshold).mean())}  # fmt: skip
        if name != "phantoms_held_out":
            labels = np.r_[np.zeros(len(reference)), np.ones(len(values))]
            row["auroc"] = float(roc_auc_score(labels, np.r_[reference, values]))
        report[name] = row
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="run_wsol.py output folders")
    parser.add_argument("--seed", type=int, default=0, help="crops and noise images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rng = np.random.default_rng(args.seed)
    files = dicom_files()
    first = json.loads((Path(args.models[0]) / "all_results.json").read_text())["args"]
    sets = {
        "phantoms_other_series": phantoms(OTHER_SERIES_SEED, int(first["num_phantoms"]), int(first["phantom_size"])),
        **files,
        "natural_images": natural_images(rng),
        "constant_ish": constant_ish_images(rng),
    }
    per_model = {str(folder): evaluate_model(Path(folder), sets) for folder in args.models}
    summary: dict[str, dict[str, list[float]]] = {}
    for report in per_model.values():
        for name, row in report.items():
            for key in ("auroc", "flagged"):
                if key in row:
                    summary.setdefault(name, {}).setdefault(key, []).append(row[key])
    output = {
        "per_model": per_model,
        "mean_std": {name: {key: [float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0]
                            for key, v in row.items()} for name, row in summary.items()},  # fmt: skip
        "in_distribution_sets": list(IN_DISTRIBUTION),
    }
    print(json.dumps(output, indent=1))
    return output


if __name__ == "__main__":
    main()
