"""Outputs of `run_wsol.py`: saving the model, the results and, through `wsol_plots` and `wsol_card`, the
pictures and the model card; pushing to the Hub; predicting files."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from image_processing_cxr import CXRImageError, CXRImageProcessor, overlay_heatmap
from wsol_card import CardSettings, empty_results, model_card
from wsol_data import PreparedSplit
from wsol_evaluation import Predictions
from wsol_plots import save_png, write_overlays, write_plots
from wsol_reporting import reliability_diagram, softmax

logger = logging.getLogger("run_wsol")


def save_model(accelerator, model, processor: CXRImageProcessor, output_dir: Path) -> None:
    """Weights, config and processor: written before anything else at the end of a run, so that a full
    disk or a crash while plotting cannot lose the trained model."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped = getattr(unwrapped, "_orig_mod", unwrapped)
    # transformers copies the remote-code files before it writes config.json: a run killed in between would
    # leave code files no config.json claims, which a resume refuses as no run's. Ours goes first, whole.
    partial = output_dir / "config.json.partial"
    unwrapped.config.to_json_file(str(partial))
    os.replace(partial, output_dir / "config.json")
    unwrapped.save_pretrained(str(output_dir), safe_serialization=True)
    processor.save_pretrained(str(output_dir))


def push_to_hub(hub_model_id: str, hub_space_id: Optional[str], output_dir: Path) -> None:
    """Upload the output folder (checkpoints excluded). Offline, fail at once with a clear message."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise SystemExit(
            f"run_wsol.py: error: cannot push: the hub is offline (HF_HUB_OFFLINE=1); "
            f"everything is saved in {output_dir}"
        )
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(hub_model_id, exist_ok=True)
        api.upload_folder(
            repo_id=hub_model_id, folder_path=str(output_dir), ignore_patterns=["checkpoints/*", "*.tmp"]
        )
        if hub_space_id:
            from cxr_datasets import load_demo_module

            logger.info("demo Space: %s", load_demo_module("push_space").push_space(hub_model_id, hub_space_id))
    except Exception as error:  # network and auth errors of every kind end the same way
        raise SystemExit(
            f"run_wsol.py: error: push to {hub_model_id} failed ({type(error).__name__}: {error}); "
            f"everything is saved in {output_dir}"
        ) from error


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
    files: Sequence[str], model: Any, processor: CXRImageProcessor, output_dir: Path
) -> list[dict[str, Any]]:
    """Predict PNG/JPEG/DICOM files: a row per file, appended to predictions/predictions.jsonl as each
    few files finish (a crash keeps what was done), then predictions.json with every row; an overlay per
    file in predictions/. A file that cannot be read is a row with its error, never an abort."""
    folder = output_dir / "predictions"
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def write_results(output_dir: Path, results: dict[str, Any]) -> None:
    (output_dir / "all_results.json").write_text(json.dumps(_jsonable(results), indent=2))


def write_run_outputs(
    card: CardSettings,
    evaluated: bool,
    accelerator: Any,
    model: Any,
    processor: CXRImageProcessor,
    results: dict[str, Any],
    state: Any,
    splits: dict[str, PreparedSplit],
    predictions: dict[str, Predictions],
) -> None:
    """Everything a run leaves in `--output_dir`, the model first (a full disk or a crash while plotting
    must not lose it), then the results, plots and overlays, and the card last."""
    output_dir = Path(card.output_dir)
    save_model(accelerator, model, processor, output_dir)
    write_results(output_dir, results)
    if evaluated:
        write_plots(output_dir, state, results)
        test, temperature = predictions["test"], results["calibration"]["temperature"]
        curves = {"softmax": softmax(test.logits), f"scaled, T = {temperature:.2f}": softmax(test.logits, temperature)}
        reliability_diagram(curves, test.labels, str(output_dir / "metrics_plots" / "reliability.png"))
        results["overlays"] = write_overlays(
            output_dir, splits["loc_test"], predictions["loc_test"], processor, temperature
        )
        write_results(output_dir, results)
    (output_dir / "README.md").write_text(model_card(card, results if evaluated else empty_results()))
