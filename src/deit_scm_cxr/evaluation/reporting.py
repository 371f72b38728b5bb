"""Clinical reporting of a run: calibrated probabilities, 95 % bootstrap intervals on every headline number,
operating points, and the environment that produced them.

* Calibration: temperature scaling (Guo et al., *On Calibration of Modern Neural Networks*, ICML 2017),
  one scalar T fitted on the validation split by minimizing the negative log-likelihood of softmax(z / T);
  reported with the expected calibration error (15 equal-width bins of the top-label confidence, and a
  class-wise variant: Kull et al., NeurIPS 2019), the Brier score and the NLL, before and after.
* Intervals: the percentile bootstrap (Efron & Tibshirani 1993) over images, or over patients when
  several images share one (all of a patient's images are drawn together), with every resample
  expressed as a vector of multiplicities so that a thousand resamples are a few matrix products.
* Operating points: per class (one-vs-rest), the threshold that reaches a target specificity on
  validation, and the sensitivity and specificity it gives on test, with intervals.

Test data never enter a fit or a choice here: thresholds and the temperature come from validation.
"""

from __future__ import annotations

import math
import platform
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 1000
SPECIFICITY_TARGETS = (0.90, 0.95)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / float(temperature)
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class)."""
    picked = np.asarray(probabilities)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.clip(picked, 1e-300, None))))


def _nll_of_temperature(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = logits / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
    return float(np.mean(log_norm - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: Sequence[int], low: float = 0.05, high: float = 20.0) -> float:
    """The temperature T minimizing the NLL of softmax(logits / T) (Guo et al. 2017). The NLL is convex in
    1/T, so a golden-section search over log T in [low, high] finds the minimum to 1e-6 relative."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need (N, C) logits and N labels, got {logits.shape} and {labels.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("logits must be finite to fit a temperature")
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = _nll_of_temperature(logits, labels, math.exp(c)), _nll_of_temperature(logits, labels, math.exp(d))
    while b - a > 1e-6:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = _nll_of_temperature(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = _nll_of_temperature(logits, labels, math.exp(d))
    return float(math.exp((a + b) / 2))


def expected_calibration_error(probabilities: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |accuracy - mean confidence| weighted by the
    bin's share of samples (Guo et al. 2017; bins (lo, hi], the first one closed at 0)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    return _binned_gap(confidence, correct.astype(np.float64), bins)


def classwise_calibration_error(probabilities: np.ndarray, labels: Sequence[int], bins: int = ECE_BINS) -> float:
    """Class-wise ECE: for every class c, the binned gap between p_c and the frequency of c, averaged over
    classes (Kull et al., NeurIPS 2019)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    return float(np.mean([_binned_gap(probabilities[:, c], (labels == c).astype(np.float64), bins)
                          for c in range(probabilities.shape[1])]))  # fmt: skip


def _binned_gap(score: np.ndarray, outcome: np.ndarray, bins: int) -> float:
    index = np.clip(np.ceil(score * bins).astype(np.int64) - 1, 0, bins - 1)
    gap = np.abs(
        np.bincount(index, weights=outcome, minlength=bins) - np.bincount(index, weights=score, minlength=bins)
    )
    return float(gap.sum() / max(len(score), 1))


def brier_score(probabilities: np.ndarray, labels: Sequence[int]) -> float:
    """Multi-class Brier score: mean over samples of sum_c (p_c - [y = c])^2 (0 is perfect, 2 the worst)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    onehot = np.eye(probabilities.shape[1])[np.asarray(labels)]
    return float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1)))


def calibration_measures(probabilities: np.ndarray, labels: Sequence[int]) -> dict[str, float]:
    return {
        "ece": expected_calibration_error(probabilities, labels),
        "classwise_ece": classwise_calibration_error(probabilities, labels),
        "brier": brier_score(probabilities, labels),
        "nll": negative_log_likelihood(probabilities, labels),
    }


def calibration_report(
    validation_logits: np.ndarray, validation_labels: np.ndarray, test_logits: np.ndarray, test_labels: np.ndarray
) -> dict[str, Any]:
    """The temperature fitted on validation and the calibration measures before and after, on both splits."""
    temperature = fit_temperature(validation_logits, validation_labels)
    report: dict[str, Any] = {"temperature": temperature, "fitted_on": "validation", "ece_bins": ECE_BINS}
    for name, logits, labels in (
        ("validation", validation_logits, validation_labels),
        ("test", test_logits, test_labels),
    ):
        report[name] = {
            "before": calibration_measures(softmax(logits), labels),
            "after": calibration_measures(softmax(logits, temperature), labels),
        }
    return report


def reliability_diagram(
    probabilities: dict[str, np.ndarray], labels: Sequence[int], path: str, bins: int = ECE_BINS
) -> None:
    """Accuracy against mean confidence per bin, one curve per set of probabilities (e.g. before/after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.6, 4.4))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    labels = np.asarray(labels)
    for name, probs in probabilities.items():
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == labels
        index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
        count = np.bincount(index, minlength=bins)
        used = count > 0
        accuracy = np.bincount(index, weights=correct, minlength=bins)[used] / count[used]
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins)[used] / count[used]
        ece = expected_calibration_error(probs, labels, bins)
        axis.plot(mean_confidence, accuracy, marker="o", label=f"{name} (ECE {ece:.3f})")
    axis.set_xlabel("confidence (top class probability)")
    axis.set_ylabel("accuracy")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.02)
    axis.set_title("Reliability, test split")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------


def resample_weights(groups: Sequence[Any], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, N) multiplicities of the N samples: each resample draws as many groups (patients) as
    there are, with replacement, and a sample counts as often as its group was drawn, so a patient's
    images stay together. With one group per sample this is the ordinary bootstrap."""
    _, group_index = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    count = int(group_index.max()) + 1 if len(group_index) else 0
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(count, np.full(count, 1.0 / count), size=resamples) if count else np.zeros((resamples, 0))
    return draws[:, group_index].astype(np.float64)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> list[float]:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return [float("nan"), float("nan")]
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]


def _weighted_ratio(weights: np.ndarray, numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    top, bottom = weights @ numerator, weights @ denominator
    return np.divide(top, bottom, out=np.full_like(top, np.nan), where=bottom > 0)


def weighted_classification(
    weights: np.ndarray, labels: np.ndarray, probabilities: np.ndarray
) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro F1 and macro one-vs-rest ROC-AUC for every row of `weights`
    (multiplicities of the samples), each an array over the rows."""
    labels = np.asarray(labels)
    predicted = probabilities.argmax(axis=1)
    classes = probabilities.shape[1]
    correct = (predicted == labels).astype(np.float64)
    ones = np.ones(len(labels))
    recall, f1 = [], []
    for c in range(classes):
        truth, chosen = (labels == c).astype(np.float64), (predicted == c).astype(np.float64)
        r = _weighted_ratio(weights, correct * truth, truth)
        p = _weighted_ratio(weights, correct * chosen, chosen)
        recall.append(r)
        p0, r0 = np.nan_to_num(p), np.nan_to_num(r)
        f1.append(np.divide(2 * p0 * r0, p0 + r0, out=np.zeros_like(p0), where=(p0 + r0) > 0))
    aucs = [weighted_auc(weights, labels == c, probabilities[:, c]) for c in range(classes)]
    with warnings.catch_warnings():  # a resample without some class: NaN for it, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "accuracy": _weighted_ratio(weights, correct, ones),
            "balanced_accuracy": np.nanmean(np.stack(recall), axis=0),
            "macro_f1": np.mean(np.stack(f1), axis=0),
            "macro_roc_auc_ovr": np.nanmean(np.stack(aucs), axis=0),
        }


def weighted_auc(weights: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC-AUC (Mann-Whitney, ties counted half) for every row of multiplicities, from one sort: the scores'
    distinct values become groups, and each row's positive and negative weight per group are matrix
    products."""
    positive = np.asarray(positive, dtype=bool)
    values, group = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    onehot = np.zeros((len(scores), len(values)))
    onehot[np.arange(len(scores)), group] = 1.0
    pos = weights @ (onehot * positive[:, None])
    neg = weights @ (onehot * ~positive[:, None])
    below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    return np.divide(wins, pairs, out=np.full(len(weights), np.nan), where=pairs > 0)


def classification_intervals(
    labels: np.ndarray,
    probabilities: np.ndarray,
    groups: Sequence[Any],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, list[float]]:
    """95 % percentile intervals of accuracy, balanced accuracy, macro F1 and macro ROC-AUC."""
    weights = resample_weights(groups, resamples, seed)
    return {k: percentile_interval(v) for k, v in weighted_classification(weights, labels, probabilities).items()}


# --------------------------------------------------------------------------------------------------
# Operating points
# --------------------------------------------------------------------------------------------------


def threshold_for_specificity(scores: np.ndarray, positive: np.ndarray, target: float) -> float:
    """The lowest threshold t (predict positive when score >= t) whose specificity on these samples is at
    least `target`: the most sensitive operating point that keeps it."""
    negatives = np.sort(np.asarray(scores, dtype=np.float64)[~np.asarray(positive, dtype=bool)])
    if not len(negatives):
        return float("nan")
    allowed = int(math.floor((1 - target) * len(negatives) + 1e-9))  # negatives that may score >= t
    if allowed == 0:
        return float(np.nextafter(negatives[-1], np.inf))
    # t just above the (allowed+1)-th highest negative: at most `allowed` negatives reach it.
    return float(np.nextafter(negatives[len(negatives) - allowed - 1], np.inf))


def operating_points(
    validation_labels: np.ndarray, validation_probabilities: np.ndarray, test_labels: np.ndarray,
    test_probabilities: np.ndarray, class_names: Sequence[str], groups: Sequence[Any],
    targets: Sequence[float] = SPECIFICITY_TARGETS, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Per class and target specificity: the threshold chosen on validation, and test sensitivity and
    specificity at it with 95 % intervals (bootstrap over `groups` of the test samples)."""
    weights = resample_weights(groups, resamples, seed)
    points: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        truth = np.asarray(test_labels) == c
        for target in targets:
            threshold = threshold_for_specificity(
                validation_probabilities[:, c], np.asarray(validation_labels) == c, target
            )
            flagged = (test_probabilities[:, c] >= threshold).astype(np.float64)
            hit, miss = truth.astype(np.float64), (~truth).astype(np.float64)
            sensitivity = _weighted_ratio(weights, flagged * hit, hit)
            specificity = _weighted_ratio(weights, (1 - flagged) * miss, miss)
            points.setdefault(name, {})[f"specificity_{target:.2f}"] = {
                "threshold_from_validation": threshold,
                "test_sensitivity": float((flagged * hit).sum() / max(hit.sum(), 1)),
                "test_sensitivity_ci95": percentile_interval(sensitivity),
                "test_specificity": float(((1 - flagged) * miss).sum() / max(miss.sum(), 1)),
                "test_specificity_ci95": percentile_interval(specificity),
            }
    return points


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# Out-of-distribution score: Mahalanobis distance of pooled features (Lee et al., NeurIPS 2018)
# ------------------------------------------------------------------------------------------------

OOD_FALSE_ALARM_RATE = 0.05
_OOD_DIGITS = 7  # significant digits kept in config.json: the statistics of a 96-wide model stay ~100 kB


def _round(values: np.ndarray) -> list:
    return np.vectorize(lambda x: float(f"{x:.{_OOD_DIGITS}g}"), otypes=[float])(values).tolist()


def mahalanobis_scores(features: np.ndarray, class_means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(N,) squared Mahalanobis distance of each feature row to the nearest class mean (the model's
    `ood_scores`, computed the same way in float64)."""
    centred = np.asarray(features, dtype=np.float64)[:, None, :] - np.asarray(class_means, dtype=np.float64)[None]
    return np.einsum("ncd,de,nce->nc", centred, np.asarray(precision, dtype=np.float64), centred).min(axis=1)


def fit_ood_statistics(
    train_features: np.ndarray, train_labels: Sequence[int], num_labels: int,
    validation_features: np.ndarray, false_alarm_rate: float = OOD_FALSE_ALARM_RATE,
) -> dict[str, Any]:  # fmt: skip
    """Class means and tied precision of the training split's pooled features, and the alarm threshold.

    The covariance of the class-centred features is shrunk towards a scaled identity (Ledoit and Wolf, 2004,
    through scikit-learn): with a few hundred images per class and a hundred dimensions the empirical one is
    near-singular. The threshold is the (1 - `false_alarm_rate`) quantile of the validation scores, so that
    this fraction of in-distribution images raises the alarm. Returns the config fields (`ood_*`, rounded
    as stored) and the threshold's validation false-alarm rate.
    """
    from sklearn.covariance import LedoitWolf

    features = np.asarray(train_features, dtype=np.float64)
    labels = np.asarray(train_labels)
    present = [c for c in range(num_labels) if (labels == c).any()]
    means = np.stack([features[labels == c].mean(axis=0) if c in present else features.mean(axis=0)
                      for c in range(num_labels)])  # fmt: skip
    centred = features - means[labels]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    stored_means, stored_precision = _round(means), _round((precision + precision.T) / 2)
    validation = mahalanobis_scores(validation_features, np.asarray(stored_means), np.asarray(stored_precision))
    # "higher": a score of the set itself, so that at most this fraction lies strictly above it.
    threshold = float(np.quantile(validation, 1.0 - false_alarm_rate, method="higher"))
    return {
        "ood_class_means": stored_means,
        "ood_precision": stored_precision,
        "ood_threshold": threshold,
        "ood_false_alarm_rate": float(false_alarm_rate),
        "validation_false_alarm_rate": float((validation > threshold).mean()),
    }


def environment() -> dict[str, Any]:
    """What produced the numbers: processor, accelerator, threads and library versions (results are
    bitwise reproducible only on the same CPU model, thread count and versions)."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


__all__ = [
    "calibration_report", "classification_intervals", "environment", "expected_calibration_error", "fit_temperature",
    "operating_points", "percentile_interval", "reliability_diagram", "resample_weights", "softmax",
    "weighted_auc", "weighted_classification", "brier_score", "classwise_calibration_error",
]  # fmt: skip
