"""The model card of a run of `run_wsol.py` (`huggingface_hub.ModelCard` with a model-index from the
results): what it says about the data, the results tables, the demo and the usage."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from deit_scm_cxr.hub.localization import MAP_LABELS, map_output
from deit_scm_cxr.training.checkpoints import MODEL_CARD_TITLE

DATASET_NAMES = {
    "phantoms": ("CXR phantoms (synthetic)", "cxr-phantoms"),
    "nih": ("NIH ChestX-ray14", "nih-chestxray14"),
}


@dataclass(frozen=True, kw_only=True)
class CardSettings:
    """What the model card and the Hub upload say about a run (`run_wsol.py`'s flags, resolved)."""

    output_dir: str
    dataset: str
    preset: str
    scm_variant: str
    hub_model_id: Optional[str]
    hub_space_id: Optional[str]  # a demo Space pushed beside the model, linked from the card
    push_to_hub: bool


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
            if math.isfinite(float(value))  # a split too small for a measure has none to index
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


def _ood_lines(results: dict[str, Any]) -> list[str]:
    ood = results.get("out_of_distribution")
    if not ood:
        return []
    return [
        "## Images unlike the training data",
        "",
        "Calibration on the validation split says nothing about images from another distribution: a model trained "
        "on one kind of film can give a confident class for a film it has never seen the like of. The pipeline "
        "therefore returns `out_of_distribution` (with `ood_score` and `ood_threshold`): the squared Mahalanobis "
        "distance of the image's pooled patch features to the nearest class mean of the training split, under "
        "their tied covariance (Lee et al., NeurIPS 2018). The alarm threshold "
        f"({ood['threshold']:.1f}) is set on the validation split so that "
        f"{ood['target_false_alarm_rate']:.0%} of in-distribution images raise it "
        f"(validation {ood['validation_false_alarm_rate']:.1%}, test {ood['test_false_alarm_rate']:.1%}). "
        "When the flag is set, treat the class scores and the boxes as meaningless. The score catches images "
        "far from the training data (another modality, a natural image, a real film for a phantom-trained model); "
        "it is no guarantee for subtle shifts.",
        "",
    ]


def _localization_rows(results: dict[str, Any]) -> list[str]:
    """The card's localization table: one row per map and baseline."""
    lines = [
        "| method | BoxAcc@0.5 (τ from validation) | MaxBoxAcc (test oracle) | MaxBoxAccV2 (τ from validation) "
        "| top-1 Loc | PxAP | pointing game (%) | mean IoU | mean GIoU | Hausdorff (px) "
        "| avg. boundary distance (px) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
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
            f"| {row.get('pointing_game', float('nan')):.1f}{_interval(ci.get('pointing_game'))} "
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
result["out_of_distribution"]  # True: the image is unlike the training data, trust none of the above
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
    # Results written before maps were smoothed have no width: their maps were not smoothed.
    sigma = float(results["localization"].get("smoothing_sigma_from_validation", 0.0))
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
        *_ood_lines(results),
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
        f"at a threshold of {threshold:.2f} of the maximum, smoothed on the model's token grid by a Gaussian of "
        f"{sigma:g} tokens: the map that localized best on the validation boxes "
        "(the best mean of MaxBoxAccV2, PxAP and the pointing game), and its threshold and width there, all stored "
        "in the processor (`localization_map`, `localization_threshold`, `localization_smoothing`).",
    ]
    metadata = _card_metadata(card, results, released)
    text, undefined = re.subn(r"\bnan\b", "n/a", "\n".join(body))
    if undefined:  # a tiny or one-class evaluation split leaves some measures undefined: say so, once
        text += ("\n\n*n/a*: not measured, or not defined on this run's evaluation split (no evaluation, too few "
                 "images, a class or a box missing from it). Evaluate on more images for these figures.")
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + text + "\n"))


def try_it_lines(card: CardSettings) -> list[str]:
    """The card's pointer to the demo: the Space when one is pushed, else the local command."""
    if card.push_to_hub and card.hub_space_id:
        return [f"A demo page: [{card.hub_space_id}](https://huggingface.co/spaces/{card.hub_space_id})."]
    return [
        "Run the demo page (Gradio, offline) from a clone of the project's repository:",
        "",
        "```bash",
        f"deit-scm-demo --model {card.hub_model_id or card.output_dir}",
        "```",
    ]


def empty_results() -> dict[str, Any]:
    """Results of a run that trained without evaluating: every figure the card reads, NaN."""
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
