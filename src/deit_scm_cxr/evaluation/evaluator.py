"""Evaluation for `run_wsol.py`: prediction over a split, classification scores, and localization with its
baselines in wsolevaluation's 224x224 frame, thresholds calibrated on validation; the released map is
chosen there too (`choose_localization_map`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from deit_scm_cxr.data.cxr import CLASS_NAMES
from deit_scm_cxr.data.prepare import EVALUATION_FRAME, PreparedSplit, make_loader
from deit_scm_cxr.evaluation.boxes import FINE_THRESHOLDS, upsample_scoremap
from deit_scm_cxr.evaluation.metrics import (
    EvaluationSplit,
    LocalizationScores,
    classification_metrics,
    cxr_protocol,
    localization_table,
    map_choice_score,
    pointing_game_per_finding,
    pointing_hits,
)
from deit_scm_cxr.evaluation.reporting import (
    calibration_report,
    classification_intervals,
    fit_ood_statistics,
    mahalanobis_scores,
    operating_points,
    resample_weights,
    softmax,
)
from deit_scm_cxr.hub.localization import MAP_LABELS, map_output, scoremap_to_boxes
from deit_scm_cxr.hub.modeling_deit_scm import select_class_maps

logger = logging.getLogger("run_wsol")


class EvaluationParts(Protocol):
    """What evaluation needs of the training components: the Accelerator, the (prepared) model and the
    uint8 -> normalized float module."""

    accelerator: Any
    model: Any
    normalizer: Any


@dataclass
class Predictions:
    """Everything the evaluation needs from one pass over a split, gathered over processes."""

    logits: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,)
    indices: np.ndarray  # (N,) positions in the split
    maps: dict[str, np.ndarray]  # `MAP_LABELS` name -> (N, h, w): F0, and S0 and F0 * S0 of the true class
    loss: float  # the model's loss (`outputs.loss`), averaged over the split
    features: Optional[np.ndarray] = None  # (N, hidden_size) pooled patch tokens (`outputs.pooled_features`)


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings:
    """How evaluation runs (`run_wsol.py`'s evaluation flags, resolved)."""

    batch_size: int  # per device
    num_workers: int  # loader workers
    dataset: str  # the prior-box baseline: the training boxes (phantoms) or validation's (NIH)
    seed: int  # the random-map baseline and the bootstrap
    # the Gaussian widths (tokens) each map may be smoothed with on its grid, chosen per map on validation
    map_smoothing_sigmas: tuple[float, ...]


@torch.no_grad()
def predict_split(settings: EvaluationSettings, parts: EvaluationParts, split: PreparedSplit) -> Predictions:
    accelerator = parts.accelerator
    loader = accelerator.prepare(
        make_loader(split, settings.batch_size, shuffle=False, num_workers=settings.num_workers)
    )
    model = parts.model
    model.eval()
    collected: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("logits", "labels", "indices", "loss", "features", *MAP_LABELS)
    }
    for pixels, labels, indices in tqdm(
        loader, desc=f"evaluating {split.name}", disable=not accelerator.is_local_main_process, leave=False
    ):
        outputs = model(parts.normalizer(pixels), labels=labels, output_pooled_features=True)
        # The model's own loss (its class weights and label smoothing: the training objective), one copy
        # per sample so that gather_for_metrics drops the padding and the mean weighs batches by size.
        per_sample_loss = outputs.loss.detach().float().expand(labels.shape[0])
        batch = {
            "logits": outputs.logits.float(),
            "labels": labels,
            "indices": indices,
            "loss": per_sample_loss,
            "features": outputs.pooled_features.float(),
            **{name: select_class_maps(outputs[map_output(name)].float(), labels=labels) for name in MAP_LABELS},
        }
        for key, value in accelerator.gather_for_metrics(batch).items():
            collected[key].append(value.cpu())
    merged = {k: torch.cat(v).numpy() for k, v in collected.items()}
    return Predictions(
        merged["logits"],
        merged["labels"],
        merged["indices"],
        {name: merged[name] for name in MAP_LABELS},
        float(merged["loss"].mean()),
        merged["features"],
    )


def evaluation_split(split: PreparedSplit, predictions: Predictions) -> EvaluationSplit:
    """The boxed images of a split, in the evaluation frame, for the localization harness."""
    keep = [i for i, index in enumerate(predictions.indices) if len(split.frame_boxes[index]) > 0]
    order = predictions.indices[keep]
    correct = predictions.logits[keep].argmax(1) == predictions.labels[keep]
    frame = EVALUATION_FRAME
    return EvaluationSplit(
        maps={name: values[keep] for name, values in predictions.maps.items()},
        gt_boxes=[split.frame_boxes[i] for i in order],
        frame_size=frame,
        correct_class=correct,
        gt_findings=[split.findings[i] for i in order],
    )


def classification_scores(predictions: Predictions) -> dict[str, Any]:
    probabilities = torch.softmax(torch.from_numpy(predictions.logits), -1).numpy()
    return classification_metrics(predictions.labels, probabilities, CLASS_NAMES)


def validation_metrics(
    settings: EvaluationSettings, parts: EvaluationParts, validation: PreparedSplit
) -> dict[str, float]:
    predictions = predict_split(settings, parts, validation)
    scores = classification_scores(predictions)
    metrics = {"loss": predictions.loss, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}
    boxed = evaluation_split(validation, predictions)
    if boxed.gt_boxes:
        metrics.update(epoch_localization(boxed))
    return metrics


def epoch_localization(boxed: EvaluationSplit) -> dict[str, float]:
    """The per-epoch localization of the boxed validation images, unsmoothed: every map's pointing game
    (`pointing_game_<map>`, %), and for the map that points best (the coupled map on ties, as in
    `choose_localization_map`) its pointing game (`pointing_game`) and oracle MaxBoxAcc (`max_box_acc`).

    Which map the run releases is only known at the end (`choose_localization_map`); the best-pointing map
    stands in for it, so that the curve follows the map a run of this recipe releases instead of one fixed
    map (S0 is released by the scratch recipe, F0*S0 may be by the official one). Box scoring is the costly
    part (tracing contours at every threshold), so it is done for that one map only."""
    frames = {name: [upsample_scoremap(m, boxed.frame_size) for m in boxed.maps[name]] for name in MAP_LABELS}
    pointing = {name: 100.0 * float(pointing_hits(maps, boxed.gt_boxes).mean()) for name, maps in frames.items()}
    best = max(pointing, key=lambda name: (pointing[name], name == "coupled"))
    metrics = {f"pointing_game_{name}": value for name, value in pointing.items()}
    metrics["pointing_game"] = pointing[best]
    metrics["max_box_acc"] = LocalizationScores.from_maps(frames[best], boxed.gt_boxes).oracle()["MaxBoxAcc"]
    return metrics


def patients(split: PreparedSplit, predictions: Predictions) -> list[str]:
    """The patient of every predicted sample (in prediction order): the unit the bootstrap resamples, so
    that a patient's images stay together (each phantom is its own patient)."""
    ids = split.source["patient_id"]
    return [str(ids[int(i)]) for i in predictions.indices]


def mean_prior_box(split: PreparedSplit) -> Optional[np.ndarray]:
    boxes = [b for b in split.frame_boxes if len(b)]
    return np.concatenate(boxes).mean(axis=0) if boxes else None


def choose_localization_map(table: dict[str, dict]) -> str:
    """The map the released model localizes with: the best mean of MaxBoxAccV2 (at the thresholds calibrated
    there), PxAP and the pointing game on the validation boxes (`map_choice_score`); F0*S0 -- the paper's --
    on ties. Test never enters the choice."""
    scores = {name: map_choice_score(table[name]["validation"]) for name in MAP_LABELS if name in table}
    return max(scores, key=lambda name: (scores[name], name == "coupled"))


@dataclass
class Evaluation:
    """The final evaluation: `results` as written to all_results.json (classification, localization),
    the per-split `predictions` (for overlays), and the released map with its calibrated threshold."""

    results: dict[str, Any]
    predictions: dict[str, Predictions]
    localization_map: str  # "coupled", "semantic" or "attention" (`MAP_LABELS`): the map chosen on the validation boxes
    threshold: float  # its threshold, calibrated on the validation boxes
    smoothing: dict[str, float]  # model output name -> the smoothing width (tokens) chosen for it on validation
    temperature: float  # temperature scaling of the class probabilities, fitted on validation
    ood: dict[str, Any]  # the out-of-distribution statistics and threshold (`fit_ood_statistics`), config fields

    @property
    def map_output(self) -> str:
        """The model output the released map is (what the processor's `localization_map` names)."""
        return map_output(self.localization_map)


def predict_splits(
    settings: EvaluationSettings, parts: EvaluationParts, splits: dict[str, PreparedSplit]
) -> dict[str, Predictions]:
    """Predictions of the evaluation splits by the model being trained (`predict_each_split`)."""
    return predict_each_split(splits, lambda split: predict_split(settings, parts, split))


def predict_each_split(
    splits: dict[str, PreparedSplit], predict: Callable[[PreparedSplit], Predictions]
) -> dict[str, Predictions]:
    """`predict` over validation, test and the box splits; a split serving twice (phantom validation =
    loc_validation) is predicted once."""
    by_split: dict[int, Predictions] = {}
    predictions = {}
    for name in ("validation", "test", "loc_validation", "loc_test"):
        if id(splits[name]) not in by_split:
            by_split[id(splits[name])] = predict(splits[name])
        predictions[name] = by_split[id(splits[name])]
    return predictions


def boxed_patients(split: PreparedSplit, predictions: Predictions) -> list[str]:
    """The patient of each predicted image of `split` that has a box, in prediction order (the groups of the
    localization bootstrap)."""
    return [patient for patient, index in zip(patients(split, predictions), predictions.indices)
            if len(split.frame_boxes[index])]  # fmt: skip


def classification_results(
    settings: EvaluationSettings, splits: dict[str, PreparedSplit], predictions: dict[str, Predictions]
) -> dict[str, Any]:
    """Classification on validation and test (test with patient-bootstrap intervals), the temperature
    calibration fitted on validation, and the operating points chosen there."""
    results: dict[str, Any] = {"classification": {}}
    for name in ("validation", "test"):
        results["classification"][name] = classification_scores(predictions[name])
        results["classification"][name]["loss"] = predictions[name].loss
        results["classification"][name]["num_samples"] = int(len(predictions[name].labels))
    validation, test = predictions["validation"], predictions["test"]
    test_patients = patients(splits["test"], test)
    results["classification"]["test"]["ci95"] = classification_intervals(
        test.labels, softmax(test.logits), test_patients, seed=settings.seed
    )
    calibration = calibration_report(validation.logits, validation.labels, test.logits, test.labels)
    results["calibration"] = calibration
    results["operating_points"] = operating_points(
        validation.labels, softmax(validation.logits, calibration["temperature"]),
        test.labels, softmax(test.logits, calibration["temperature"]), CLASS_NAMES, test_patients, seed=settings.seed,
    )  # fmt: skip
    return results


def localization_results(
    settings: EvaluationSettings, splits: dict[str, PreparedSplit], predictions: dict[str, Predictions]
) -> tuple[dict[str, Any], str, float]:
    """Localization on the box splits, with baselines, thresholds and each map's smoothing width calibrated on
    validation; the released map chosen there. Returns (results["localization"], the chosen map, its
    threshold); each map's width is under `methods.<map>.smoothing_sigma`."""
    val_boxed = evaluation_split(splits["loc_validation"], predictions["loc_validation"])
    test_boxed = evaluation_split(splits["loc_test"], predictions["loc_test"])
    prior = mean_prior_box(splits["train" if settings.dataset == "phantoms" else "loc_validation"])
    frame_maps: dict[str, list[np.ndarray]] = {}
    groups = boxed_patients(splits["loc_test"], predictions["loc_test"])
    table = localization_table(
        val_boxed, test_boxed, prior, seed=settings.seed, thresholds=FINE_THRESHOLDS, upsampled_test_maps=frame_maps,
        resample_weights=resample_weights(groups, seed=settings.seed), smoothing_sigmas=settings.map_smoothing_sigmas,
    )  # fmt: skip
    chosen = choose_localization_map(table)
    threshold = table[chosen]["calibrated_on_validation"]["threshold"]
    predicted = [scoremap_to_boxes(m, threshold, multi_contour=True, normalized=True) for m in frame_maps[chosen]]
    localization = {
        "frame": list(test_boxed.frame_size),
        "images_validation": len(val_boxed.gt_boxes),
        "images_test": len(test_boxed.gt_boxes),
        "localization_map": chosen,
        "localization_map_output": map_output(chosen),
        "heatmap_threshold_from_validation": threshold,
        "smoothing_sigma_from_validation": table[chosen]["smoothing_sigma"],
        "threshold_step": float(FINE_THRESHOLDS[1] - FINE_THRESHOLDS[0]),
        "note": "calibrated_on_validation: thresholds chosen on the validation boxes, applied to test; "
        "test_oracle_max_over_thresholds: the best threshold on test itself, as WSOL papers report; "
        "smoothing_sigma: the Gaussian width (tokens) each map is smoothed with on its grid, chosen on the "
        "validation boxes among smoothing_choice's widths; "
        "maps and boxes in the 224x224 frame of wsolevaluation",
        "methods": table,
        "cxr_protocol_at_calibrated_threshold": cxr_protocol(predicted, test_boxed.gt_boxes, test_boxed.gt_findings),
        "pointing_game_per_finding": pointing_game_per_finding(
            frame_maps[chosen], test_boxed.gt_boxes, test_boxed.gt_findings
        ),
    }
    return localization, chosen, float(threshold)


def final_evaluation(
    settings: EvaluationSettings, parts: EvaluationParts, splits: dict[str, PreparedSplit]
) -> Evaluation:
    """Classification on validation and test; localization (with baselines) on the box splits."""
    predictions = predict_splits(settings, parts, splits)
    results = classification_results(settings, splits, predictions)
    localization, chosen, threshold = localization_results(settings, splits, predictions)
    # The order all_results.json has always had: classification, calibration, operating points, localization.
    results["localization"] = localization
    ood, results["out_of_distribution"] = out_of_distribution(settings, parts, splits, predictions)
    smoothing = {map_output(name): float(localization["methods"][name]["smoothing_sigma"]) for name in MAP_LABELS}
    temperature = float(results["calibration"]["temperature"])
    return Evaluation(results, predictions, chosen, threshold, smoothing, temperature, ood)


def out_of_distribution(
    settings: EvaluationSettings, parts: EvaluationParts, splits: dict[str, PreparedSplit],
    predictions: dict[str, Predictions],
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The out-of-distribution statistics fitted on the training split's pooled features, the threshold on
    validation; returns (the config fields, what all_results.json reports: the threshold and the
    false-alarm rates on the validation and test phantoms, which are in-distribution)."""
    train = predict_split(settings, parts, splits["train"])
    num_labels = int(predictions["validation"].logits.shape[1])
    fitted = fit_ood_statistics(train.features, train.labels, num_labels, predictions["validation"].features)
    ood = {key: value for key, value in fitted.items() if key.startswith("ood_")}
    test_scores = mahalanobis_scores(predictions["test"].features, ood["ood_class_means"], ood["ood_precision"])
    report = {
        "score": "squared Mahalanobis distance of the pooled patch tokens to the nearest class mean of the "
        "training split (tied covariance, Ledoit-Wolf shrinkage); alarm above the threshold",
        "threshold": ood["ood_threshold"],
        "target_false_alarm_rate": ood["ood_false_alarm_rate"],
        "validation_false_alarm_rate": fitted["validation_false_alarm_rate"],
        "test_false_alarm_rate": float((test_scores > ood["ood_threshold"]).mean()),
    }
    return ood, report
