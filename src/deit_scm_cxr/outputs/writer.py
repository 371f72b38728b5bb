"""Outputs of `run_wsol.py`: saving the model, the results and, through `outputs.plots` and `outputs.card`, the
pictures and the model card; pushing to the Hub; predicting files."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from deit_scm_cxr.data.prepare import PreparedSplit
from deit_scm_cxr.errors import RunWriteError, free_mib
from deit_scm_cxr.evaluation.evaluator import Predictions
from deit_scm_cxr.evaluation.reporting import reliability_diagram, softmax
from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor
from deit_scm_cxr.outputs.card import CardSettings, empty_results, model_card
from deit_scm_cxr.outputs.plots import write_overlays, write_plots

logger = logging.getLogger("run_wsol")


def save_model(accelerator, model, processor: CXRImageProcessor, output_dir: Path) -> None:
    """Weights, config and processor: written before anything else at the end of a run, so that a full
    disk or a crash while plotting cannot lose the trained model."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped = getattr(unwrapped, "_orig_mod", unwrapped)
    # transformers copies the remote-code files before it writes config.json: a run killed in between would
    # leave code files no config.json claims, which a resume refuses as no run's. Ours goes first, whole.
    from safetensors import SafetensorError

    partial = output_dir / "config.json.partial"
    try:
        unwrapped.config.to_json_file(str(partial))
        os.replace(partial, output_dir / "config.json")
        unwrapped.save_pretrained(str(output_dir), safe_serialization=True)
        processor.save_pretrained(str(output_dir))
    except (SafetensorError, RuntimeError) as error:  # safetensors' and torch's own words for a failed write
        message = f"could not write the model to {output_dir}: {error} ({free_mib(output_dir):.0f} MiB free there)"
        raise RunWriteError(message) from error


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
            from deit_scm_cxr.demo.push_space import push_space

            logger.info("demo Space: %s", push_space(hub_model_id, hub_space_id))
    except Exception as error:  # network and auth errors of every kind end the same way
        raise SystemExit(
            f"run_wsol.py: error: push to {hub_model_id} failed ({type(error).__name__}: {error}); "
            f"everything is saved in {output_dir}"
        ) from error


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
