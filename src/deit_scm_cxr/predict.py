"""Predict radiographs with a saved model: a JSON row per file and a heatmap overlay with boxes per file.

    deit-scm-predict --model outputs/wsol --output_dir predictions patient.dcm scans/
    python -m deit_scm_cxr.predict --model org/deit-scm-cxr --output_dir predictions patient.dcm

Needs only the inference dependencies (no Accelerate, datasets or matplotlib). A file that cannot be read is a
row with its error, never an abort; rows are appended to `predictions.jsonl` as each few files finish, then
`predictions.json` holds them all. The model's own processor reads every file (DICOM through pydicom).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from deit_scm_cxr.hub.image_processing_cxr import CXRImageError, CXRImageProcessor, overlay_heatmap

logger = logging.getLogger(__name__)


def save_png(path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path)


def overlay_name(path: str) -> str:
    """A unique, stable overlay file name: the stem (cut to 80 characters, so that any file system takes
    it), the suffix and a hash of the absolute path (`good.png`, `good.jpg` and `sub/good.png` must not
    overwrite each other)."""
    source = Path(path)
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
    return f"{source.stem[:80]}{source.suffix.replace('.', '_')[:12]}_{digest}_overlay.png"


PREDICTION_CHUNK = 16


def _predict_chunk(model, processor: CXRImageProcessor, files: Sequence[str], folder: Path) -> list[dict[str, Any]]:
    """Rows for a few files: each file is read once (the decoded pixels feed both the model and the
    overlay); a file that fails is a row with its error, an overlay that cannot be written leaves the
    prediction in place with `overlay_error`."""
    rows: dict[int, dict[str, Any]] = {}
    decoded: list[np.ndarray] = []
    kept: list[int] = []
    for index, path in enumerate(files):
        try:
            decoded.append(processor.decode(path))
            kept.append(index)
        except CXRImageError as error:
            rows[index] = {"file": str(path), "error": str(error)}
    if decoded:
        inputs = processor(decoded, on_error="skip")
        with torch.no_grad():
            outputs = model(inputs["pixel_values"].to(next(model.parameters()).device))
        results = processor.post_process_localization(outputs, geometry=inputs, id2label=model.config.id2label)
        for position, message in inputs.get("skipped", []):
            rows[kept[position]] = {"file": str(files[kept[position]]), "error": message}
        for position, result in zip(inputs["indices"].tolist(), results):
            index = kept[position]
            row = {
                "file": str(files[index]),
                "label": result["label_name"],
                "score": result["score"],
                "boxes": result["boxes"].tolist(),
                "box_scores": result["box_scores"].tolist(),
            }
            target = folder / overlay_name(files[index])
            try:
                save_png(target, overlay_heatmap(decoded[position], result["heatmap"], boxes=result["boxes"]))
                row["overlay"] = str(target)
            except (OSError, RuntimeError) as error:  # a full disk, a read-only folder: keep the prediction
                row["overlay_error"] = f"{target}: {error}"
            rows[index] = row
    return [rows[i] for i in range(len(files))]


def predict_files(
    files: Sequence[str], model: Any, processor: CXRImageProcessor, folder: Path
) -> list[dict[str, Any]]:
    """Predict PNG/JPEG/DICOM files into `folder`: a row per file, appended to predictions.jsonl as each
    few files finish (a crash keeps what was done), then predictions.json with every row; an overlay per
    file in predictions/. A file that cannot be read is a row with its error, never an abort."""
    folder.mkdir(parents=True, exist_ok=True)
    files = list(files)
    model.eval()
    records: list[dict[str, Any]] = []
    stream = folder / "predictions.jsonl"
    with open(stream, "w") as handle:
        for start in tqdm(range(0, len(files), PREDICTION_CHUNK), desc="predicting", leave=False):
            rows = _predict_chunk(model, processor, files[start : start + PREDICTION_CHUNK], folder)
            for row in rows:
                handle.write(json.dumps(row) + "\n")
            handle.flush()
            records += rows
    partial = folder / "predictions.json.tmp"
    partial.write_text(json.dumps(records, indent=2))
    os.replace(partial, folder / "predictions.json")
    failed = sum("error" in row for row in records)
    if failed:
        logger.warning("%d of %d files could not be predicted; their rows name the reason", failed, len(records))
    return records


def load_predictor(model: str) -> tuple[Any, CXRImageProcessor]:
    """The model (calibrated probabilities, weights checked) and its processor from a folder or a Hub id."""
    from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification

    return DeiTSCMForImageClassification.from_pretrained(model), CXRImageProcessor.from_pretrained(model)


def cli() -> None:
    """The console script `deit-scm-predict`."""
    main()


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    from deit_scm_cxr.errors import WRITE_ERRORS, RunInputError
    from deit_scm_cxr.training.arguments import expand_predict_files

    parser = argparse.ArgumentParser(prog="deit-scm-predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="PNG/JPEG/TIFF/DICOM files, or folders of them")
    parser.add_argument("--model", default="outputs/wsol", help="a saved model folder or Hub id (default: %(default)s)")
    parser.add_argument(
        "--output_dir", default="predictions", help="where the JSON and overlays go (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        files = expand_predict_files(args.files)
    except RunInputError as error:
        parser.exit(2, f"deit-scm-predict: error: {error}\n")
    if Path(args.model).exists() and not Path(args.model, "config.json").is_file():
        parser.exit(2, f"deit-scm-predict: error: --model {args.model}: no config.json (not a saved model folder)\n")
    try:
        model, processor = load_predictor(args.model)
    except (OSError, ValueError) as error:
        parser.exit(2, f"deit-scm-predict: error: --model {args.model}: {error}\n".replace("\n", " ").strip() + "\n")
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        parser.exit(2, f"deit-scm-predict: error: --output_dir {output} is a file, not a folder\n")
    try:
        output.mkdir(parents=True, exist_ok=True)
        rows = predict_files(files, model, processor, output)
    except OSError as error:
        if error.errno not in WRITE_ERRORS:
            raise
        parser.exit(2, f"deit-scm-predict: error: cannot write {error.filename or output}: {error.strerror}\n")
    sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    cli()
