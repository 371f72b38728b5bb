"""Outputs of `run_wsol.py`: plots, overlays, the model card, saving, pushing and file predictions."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from cxr_data import CLASS_NAMES
from image_processing_cxr import CXRImageError, CXRImageProcessor, overlay_heatmap
from localization import MAP_LABELS, map_output
from wsol_checkpoints import MODEL_CARD_TITLE
from wsol_data import PreparedSplit
from wsol_evaluation import Predictions
from wsol_reporting import reliability_diagram, softmax

logger = logging.getLogger("run_wsol")
DATASET_NAMES = {
    "phantoms": ("CXR phantoms (synthetic)", "cxr-phantoms"),
    "nih": ("NIH ChestX-ray14", "nih-chestxray14"),
}


OVERLAY_SAMPLES = 8


def write_plots(output_dir: Path, state: Any, results: dict[str, Any]) -> None:
    """metrics_plots/: per-epoch curves from `state` (a `TrainState`: `history`, `train_losses`), the
    confusion matrix and the baselines chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = output_dir / "metrics_plots"
    folder.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in state.history]
    curves = {
        "loss.png": ("loss", "validation loss"),
        "accuracy.png": ("accuracy", "validation accuracy"),
        "macro_f1.png": ("macro_f1", "validation macro F1"),
        "localization.png": ("max_box_acc", "validation MaxBoxAcc (coupled map F₀⊙S₀, %)"),
    }
    for filename, (key, title) in curves.items():
        figure, axis = plt.subplots(figsize=(5, 3.2))
        if key == "loss" and state.train_losses:
            steps = np.arange(1, len(state.train_losses) + 1)
            axis.plot(
                steps / max(len(steps), 1) * max(len(epochs), 1) - 1,
                state.train_losses,
                alpha=0.4,
                label="train (per step)",
            )
        axis.plot(epochs, [h.get(key, np.nan) for h in state.history], marker="o", label=title)
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(folder / filename, dpi=110)
        plt.close(figure)
    matrix = np.asarray(results["classification"]["test"]["confusion_matrix"])
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.imshow(matrix, cmap="Blues")
    for (row, col), value in np.ndenumerate(matrix):
        axis.text(col, row, str(value), ha="center", va="center")
    axis.set_xticks(range(len(CLASS_NAMES)), [n.replace("_", "\n") for n in CLASS_NAMES], fontsize=8)
    axis.set_yticks(range(len(CLASS_NAMES)), [n.replace("_", "\n") for n in CLASS_NAMES], fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title("test confusion matrix")
    figure.tight_layout()
    figure.savefig(folder / "confusion_matrix.png", dpi=110)
    plt.close(figure)
    plot_localization_table(results["localization"]["methods"], str(folder / "localization_baselines.png"))


def _save_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path)


def write_overlays(
    output_dir: Path, split: PreparedSplit, predictions: Predictions, processor: CXRImageProcessor
) -> list[str]:
    """heatmap_comparisons/: the released map (the processor's `localization_map`), its predicted and the
    ground-truth boxes on the original image; localization_samples/: the coupled, semantic and attention
    maps side by side, boxes on the released one. A fixed sample: the first boxed images."""
    comparisons, samples = output_dir / "heatmap_comparisons", output_dir / "localization_samples"
    comparisons.mkdir(parents=True, exist_ok=True)
    samples.mkdir(parents=True, exist_ok=True)
    position = {int(index): row for row, index in enumerate(predictions.indices)}
    chosen = [i for i in range(len(split)) if len(split.frame_boxes[i])][:OVERLAY_SAMPLES]
    written = []
    for index in chosen:
        row = position[index]
        image = np.asarray(split.source[index]["image"].convert("L"))
        geometry = split.geometry[index]
        original_boxes = np.asarray(split.source[index]["boxes"], dtype=np.float64).reshape(-1, 4)
        panels = {}
        for name in MAP_LABELS:
            grid = torch.from_numpy(np.asarray(predictions.maps[name][row], dtype=np.float32))
            # The same post-processing users get: the map of the ground-truth class (the one kept in
            # `predictions`) back in original pixels, and its box at the calibrated threshold.
            post = processor.post_process_localization(
                {"logits": torch.zeros(1, 1), map_output(name): grid[None, None]},
                geometry=np.asarray(geometry)[None],
                labels=[0],
                localization_map=map_output(name),
            )[0]
            released = map_output(name) == processor.localization_map
            boxes = post["boxes"] if released else None
            panels[name] = overlay_heatmap(image, post["heatmap"], boxes=boxes, gt_boxes=original_boxes)
        released_name = next(n for n in MAP_LABELS if map_output(n) == processor.localization_map)
        name = f"{split.image_ids[index]}.png"
        _save_png(comparisons / name, panels[released_name])
        _save_png(samples / name, np.concatenate(list(panels.values()), axis=1))
        written.append(name)
    return written


def plot_localization_table(table: dict[str, dict], path: str) -> None:
    """Bar chart of calibrated MaxBoxAcc / MaxBoxAccV2 / top-1 Loc per row, the oracle as outlines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from error
    names = list(table)
    measures = ("MaxBoxAcc", "MaxBoxAccV2", "top1_loc")
    figure, axis = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    width = 0.8 / len(measures)
    for k, measure in enumerate(measures):
        positions = np.arange(len(names)) + (k - 1) * width
        calibrated = [table[n]["calibrated_on_validation"][measure] for n in names]
        oracle = [table[n]["test_oracle_max_over_thresholds"][measure] for n in names]
        axis.bar(positions, calibrated, width, label=f"{measure} (τ from validation)")
        axis.bar(positions, oracle, width, fill=False, edgecolor="black", linewidth=0.6)
    axis.set_xticks(np.arange(len(names)), [MAP_LABELS.get(n, n) for n in names], rotation=20)
    axis.set_ylabel("percent of test images")
    axis.set_title("Localization on test (outlines: test oracle)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@dataclass(frozen=True)
class CardSettings:
    """What the model card and the Hub upload say about a run (`run_wsol.py`'s flags, resolved)."""

    output_dir: str
    dataset: str = "phantoms"
    preset: str = "deit-micro"
    scm_variant: str = "cxr"
    hub_model_id: Optional[str] = None
    hub_space_id: Optional[str] = None  # a demo Space pushed beside the model, linked from the card
    push_to_hub: bool = False


def _card_metadata(card: CardSettings, results: dict[str, Any], released: str) -> Any:
    """The card's YAML: `ModelCardData` with a model-index of classification and localization results."""
    from huggingface_hub import EvalResult, ModelCardData

    test = results["classification"]["test"]
    row = results["localization"]["methods"][released]
    dataset_name, dataset_type = DATASET_NAMES[card.dataset]
    common = {"dataset_type": dataset_type, "dataset_name": dataset_name, "dataset_split": "test"}
    classification = {"task_type": "image-classification", "task_name": "Three-class chest X-ray classification"}
    localization = {"task_type": "object-detection", "task_name": "Weakly supervised localization (heatmap boxes)"}
    metrics = [
        (classification, "accuracy", test["accuracy"], "Accuracy"),
        (classification, "f1", test["macro_f1"], "Macro F1"),
        (classification, "roc_auc", test["macro_roc_auc_ovr"], "Macro one-vs-rest ROC-AUC"),
        (localization, "maxboxacc", row["calibrated_on_validation"]["MaxBoxAcc"],
         f"BoxAcc@0.5 of the {released} map, threshold from validation"),
        (localization, "maxboxacc", row["test_oracle_max_over_thresholds"]["MaxBoxAcc"],
         f"MaxBoxAcc of the {released} map (test oracle)"),
        (localization, "maxboxaccv2", row["calibrated_on_validation"]["MaxBoxAccV2"],
         f"MaxBoxAccV2 of the {released} map, thresholds from validation"),
    ]  # fmt: skip
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license="apache-2.0",
        tags=["medical", "chest-x-ray", "weakly-supervised-object-localization", "deit", "scm", "custom_code"],
        datasets=[dataset_type],
        metrics=["accuracy", "f1", "roc_auc", "maxboxacc"],
        model_name=f"deit-scm-{card.preset}-{card.scm_variant}",
        eval_results=[
            EvalResult(**task, **common, metric_type=kind, metric_value=round(float(value), 4), metric_name=name)
            for task, kind, value, name in metrics
        ],
    )


def _interval(bounds: Any, digits: int = 1) -> str:
    """ " [low, high]" for a 95 % interval, nothing when there is none."""
    if not bounds or any(b is None or not math.isfinite(b) for b in bounds):
        return ""
    return f" [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def _classification_line(test: dict[str, Any]) -> str:
    ci = test.get("ci95") or {}
    names = (("accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"), ("macro F1", "macro_f1"),
             ("macro ROC-AUC", "macro_roc_auc_ovr"))  # fmt: skip
    parts = [f"{label} {test[key]:.3f}{_interval(ci.get(key), 3)}" for label, key in names]
    return "Classification: " + ", ".join(parts) + " (95 % bootstrap intervals over patients in brackets)."


def _calibration_line(results: dict[str, Any]) -> str:
    calibration = results.get("calibration")
    if not calibration:
        return ""
    before, after = calibration["test"]["before"], calibration["test"]["after"]
    return (
        f"Probabilities are temperature-scaled (T = {calibration['temperature']:.2f}, fitted on validation): test "
        f"ECE {before['ece']:.3f} → {after['ece']:.3f}, Brier {before['brier']:.3f} → {after['brier']:.3f}, "
        f"NLL {before['nll']:.3f} → {after['nll']:.3f}."
    )


def _localization_rows(results: dict[str, Any]) -> list[str]:
    """The card's localization table: one row per map and baseline."""
    lines = [
        "| method | BoxAcc@0.5 (τ from validation) | MaxBoxAcc (test oracle) | MaxBoxAccV2 (τ from validation) "
        "| top-1 Loc | PxAP | mean IoU | mean GIoU | Hausdorff (px) | avg. boundary distance (px) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["localization"]["methods"].items():
        cal, oracle = row["calibrated_on_validation"], row["test_oracle_max_over_thresholds"]
        box = row.get("box_measures") or {}
        ci = row.get("ci95") or {}
        lines.append(
            f"| {MAP_LABELS.get(name, name)} | {cal['MaxBoxAcc']:.1f}{_interval(ci.get('MaxBoxAcc'))} "
            f"| {oracle['MaxBoxAcc']:.1f} "
            f"| {cal['MaxBoxAccV2']:.1f}{_interval(ci.get('MaxBoxAccV2'))} "
            f"| {cal['top1_loc']:.1f} | {row['PxAP']:.1f}{_interval(ci.get('PxAP'))} "
            f"| {box.get('mean_iou', float('nan')):.3f} "
            f"| {box.get('mean_giou', float('nan')):.3f} | {box.get('mean_hausdorff', float('nan')):.1f} "
            f"| {box.get('mean_average_boundary_distance', float('nan')):.1f} |"
        )
    return lines


USAGE = """```python
from transformers import pipeline

detector = pipeline(model="path/or/hub-id", trust_remote_code=True)  # task: chest-xray-localization
result = detector("patient.dcm")  # DICOM, PNG, JPEG, bytes, PIL images, arrays; or a list
print(result["label"], result["score"])  # calibrated probability (temperature scaling)
heatmap, boxes = result["heatmap"], result["boxes"]  # original pixels
```

Step by step, with the processor and the model:

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification

repo = "path/or/hub-id"
processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained(
    repo, trust_remote_code=True, use_safetensors=True
).eval()
inputs = processor(["patient.dcm"])            # DICOM, PNG, JPEG, arrays
outputs = model(inputs["pixel_values"])
result = processor.post_process_localization(outputs, geometry=inputs, id2label=model.config.id2label)[0]
print(result["label_name"], result["score"])
heatmap, boxes = result["heatmap"], result["boxes"]  # original pixels
```"""


def model_card(card: CardSettings, results: dict[str, Any]) -> str:
    """A Hub model card (`huggingface_hub.ModelCard`): metadata with a model-index from the results, the
    results tables, the demo and a usage snippet."""
    from huggingface_hub import ModelCard

    test = results["classification"]["test"]
    released = results["localization"].get("localization_map", "coupled")
    dataset_name, _ = DATASET_NAMES[card.dataset]
    threshold = results["localization"]["heatmap_threshold_from_validation"]
    body = [
        f"{MODEL_CARD_TITLE}{card.preset}, `{card.scm_variant}` SCM) — {dataset_name}",
        "",
        "DeiT with the Semantic/Spatial Calibration Module (Bai et al., ECCV 2022): classifies a chest radiograph as "
        "Atelectasis / Other pathologies / No pathologies and localizes the finding from image labels only.",
        "" if card.dataset == "nih" else "**Trained on synthetic phantoms: a demonstration, not a medical device.**",
        "",
        "## Results (test split)",
        "",
        "Maps and boxes in wsolevaluation's 224×224 frame, thresholds on a 0.001 grid, 95 % bootstrap intervals "
        "over patients in brackets. Box measures: the largest-contour box at the threshold chosen on validation "
        "against the ground-truth box it overlaps most.",
        "",
        *_localization_rows(results),
        "",
        _classification_line(test),
        "",
        _calibration_line(results),
        "",
        "## Try it",
        "",
        *try_it_lines(card),
        "",
        "## Usage",
        "",
        USAGE,
        "",
        f"`post_process_localization` localizes with the {MAP_LABELS.get(released, released)} "
        f"(`{map_output(released)}`) "
        f"at a threshold of {threshold:.2f} of the maximum: the map that localized best on the validation boxes, "
        "and its threshold there, both stored in the processor (`localization_map`, `localization_threshold`).",
    ]
    metadata = _card_metadata(card, results, released)
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"))


def try_it_lines(card: CardSettings) -> list[str]:
    """The card's pointer to the demo: the Space when one is pushed, else the local command."""
    if card.push_to_hub and card.hub_space_id:
        return [f"A demo page: [{card.hub_space_id}](https://huggingface.co/spaces/{card.hub_space_id})."]
    return [
        "Run the demo page (Gradio, offline) from a clone of the project's repository:",
        "",
        "```bash",
        f"python demo/app.py --model {card.hub_model_id or card.output_dir}",
        "```",
    ]


def save_model(accelerator, model, processor: CXRImageProcessor, output_dir: Path) -> None:
    """Weights, config and processor: written before anything else at the end of a run, so that a full
    disk or a crash while plotting cannot lose the trained model."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped = getattr(unwrapped, "_orig_mod", unwrapped)
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
                _save_png(target, overlay_heatmap(decoded[position], result["heatmap"], boxes=result["boxes"]))
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


def _empty_results() -> dict[str, Any]:
    nan = float("nan")
    row = {
        "calibrated_on_validation": {"MaxBoxAcc": nan, "MaxBoxAccV2": nan, "top1_loc": nan},
        "test_oracle_max_over_thresholds": {"MaxBoxAcc": nan},
        "PxAP": nan,
    }
    return {
        "classification": {
            "test": {"accuracy": nan, "macro_f1": nan, "balanced_accuracy": nan, "macro_roc_auc_ovr": nan}
        },
        "localization": {"methods": {"coupled": row}, "heatmap_threshold_from_validation": nan},
    }


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
        results["overlays"] = write_overlays(output_dir, splits["loc_test"], predictions["loc_test"], processor)
        write_results(output_dir, results)
    (output_dir / "README.md").write_text(model_card(card, results if evaluated else _empty_results()))
