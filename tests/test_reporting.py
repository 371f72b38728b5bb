"""Calibration, bootstrap intervals and operating points (wsol_reporting), against hand-computed cases,
simulations with a known truth and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from deit_scm_cxr.evaluation import reporting
from deit_scm_cxr.evaluation.metrics import pixel_average_precision


def test_ece_and_brier_by_hand():
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])
    # Confidences 0.9, 0.6, 0.7, 0.55 with 15 bins: (13/15, 14/15] holds 0.9 (right); (8/15, 9/15] holds 0.55
    # (right) and 0.6 (wrong); (10/15, 11/15] holds 0.7 (right).
    expected = (abs(1 - 0.9) + abs(1 - (0.55 + 0.6)) + abs(1 - 0.7)) / 4
    assert reporting.expected_calibration_error(probabilities, labels) == pytest.approx(expected)
    brier = np.mean([0.1**2 * 2, 0.6**2 * 2, 0.3**2 * 2, 0.45**2 * 2])
    assert reporting.brier_score(probabilities, labels) == pytest.approx(brier)
    assert reporting.brier_score(np.eye(2)[labels], labels) == 0.0
    assert reporting.expected_calibration_error(np.eye(2)[labels], labels) == 0.0
    nll = -np.mean(np.log([0.9, 0.4, 0.7, 0.55]))
    assert reporting.negative_log_likelihood(probabilities, labels) == pytest.approx(nll)


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(20000, 3))
    true_temperature = 2.5
    probabilities = reporting.softmax(logits, true_temperature)
    labels = (probabilities.cumsum(axis=1) > rng.random((len(logits), 1))).argmax(axis=1)
    assert reporting.fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.05)
    # Overconfident logits are cooled: ECE falls after scaling.
    before = reporting.expected_calibration_error(reporting.softmax(logits), labels)
    after = reporting.expected_calibration_error(
        reporting.softmax(logits, reporting.fit_temperature(logits, labels)), labels
    )
    assert after < 0.02 < before


def test_test_data_never_enter_the_temperature():
    rng = np.random.default_rng(1)
    val_logits, val_labels = rng.normal(size=(200, 3)), rng.integers(0, 3, 200)
    test_logits, test_labels = rng.normal(size=(100, 3)), rng.integers(0, 3, 100)
    first = reporting.calibration_report(val_logits, val_labels, test_logits, test_labels)
    second = reporting.calibration_report(val_logits, val_labels, test_logits * 10, (test_labels + 1) % 3)
    assert first["temperature"] == second["temperature"]
    assert first["validation"] == second["validation"] and first["test"] != second["test"]


def test_weighted_metrics_equal_sklearn_with_sample_weights():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 60)
    probabilities = reporting.softmax(rng.normal(size=(60, 3)) + np.eye(3)[labels])
    probabilities[:5, 0] = probabilities[5:10, 0]  # ties in the scores
    weights = rng.integers(0, 4, size=(5, 60)).astype(float)
    measured = reporting.weighted_classification(weights, labels, probabilities)
    predicted = probabilities.argmax(axis=1)
    for row, w in enumerate(weights):
        assert measured["balanced_accuracy"][row] == pytest.approx(
            balanced_accuracy_score(labels, predicted, sample_weight=w)
        )
        assert measured["macro_f1"][row] == pytest.approx(f1_score(labels, predicted, average="macro", sample_weight=w))
        aucs = [roc_auc_score(labels == c, probabilities[:, c], sample_weight=w) for c in range(3)]
        assert measured["macro_roc_auc_ovr"][row] == pytest.approx(np.mean(aucs))


def test_patient_resampling_keeps_a_patients_images_together():
    groups = ["a", "a", "a", "b", "c", "c", "d"]
    weights = reporting.resample_weights(groups, resamples=500, seed=3)
    assert weights.shape == (500, 7)
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 1] == weights[:, 2]).all()
    assert (weights[:, 4] == weights[:, 5]).all()
    # Four patients drawn per resample, each image as often as its patient.
    assert (weights[:, [0, 3, 4, 6]].sum(axis=1) == 4).all()
    assert not (weights[:, 0] == weights[:, 3]).all()
    np.testing.assert_array_equal(weights, reporting.resample_weights(groups, resamples=500, seed=3))


def test_bootstrap_intervals_cover_the_truth_at_about_the_nominal_rate():
    """A simulated metric with a known value (accuracy of a classifier right with probability 0.8 on 200
    images): over 300 simulated test sets, the 95 % interval holds 0.8 about 95 % of the time."""
    rng = np.random.default_rng(4)
    covered = 0
    trials = 300
    for trial in range(trials):
        labels = rng.integers(0, 2, 200)
        right = rng.random(200) < 0.8
        predicted = np.where(right, labels, 1 - labels)
        probabilities = np.eye(2)[predicted] * 0.8 + 0.1
        low, high = reporting.classification_intervals(labels, probabilities, range(200), resamples=1000, seed=trial)[
            "accuracy"
        ]
        covered += low <= 0.8 <= high
    assert 0.91 <= covered / trials <= 0.98


def test_operating_point_reaches_the_specificity_on_validation():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 400)
    probabilities = reporting.softmax(rng.normal(size=(400, 3)) + 2 * np.eye(3)[labels])
    for c in range(3):
        for target in (0.9, 0.95):
            threshold = reporting.threshold_for_specificity(probabilities[:, c], labels == c, target)
            negatives = probabilities[labels != c, c]
            specificity = np.mean(negatives < threshold)
            assert specificity >= target
            # The most sensitive such threshold: one step lower would break the target.
            assert np.mean(negatives < np.max(negatives[negatives < threshold], initial=0)) < target
    points = reporting.operating_points(labels, probabilities, labels, probabilities, ["A", "B", "C"], range(400))
    point = points["A"]["specificity_0.90"]
    assert point["test_specificity"] >= 0.9 and point["test_sensitivity_ci95"][0] <= point["test_sensitivity"]


def test_pxap_ignore_region_yields_to_the_foreground():
    """wsolevaluation removes the foreground from the ignore region: foreground pixels inside it count."""
    scoremap = np.zeros((20, 20), np.float32)
    scoremap[5:10, 5:10] = 0.9
    scoremap[0:3, 0:3] = 0.8
    box = np.array([[5, 5, 9, 9]], dtype=float)
    ignore = np.zeros((20, 20), bool)
    ignore[4:11, 4:11] = True  # covers the whole box and a ring of background around it
    # The 25 foreground pixels (0.9) outrank every counted background pixel (0.8 and 0): AP 100. Were the
    # foreground dropped with the ignore region, there would be no positives at all (NaN).
    assert pixel_average_precision([scoremap], [box], ignore_masks=[ignore]) == pytest.approx(100.0)
    foreground_only_ignored = np.zeros((20, 20), bool)
    foreground_only_ignored[5:10, 5:10] = True
    assert pixel_average_precision([scoremap], [box], ignore_masks=[foreground_only_ignored]) == pytest.approx(
        pixel_average_precision([scoremap], [box])
    )


def test_a_card_of_undefined_figures_says_so_instead_of_nan():
    """Issue 33: with one or two evaluation images the card showed bare `nan` cells."""
    from deit_scm_cxr.outputs.card import empty_results, model_card
    from deit_scm_cxr.training.run import settings_for

    card = model_card(settings_for("--output_dir", "run").card, empty_results())
    metadata, body = card.split("---")[1], card.split("---", 2)[2]
    assert "nan" not in body and "| n/a" in body and "*n/a*: not measured" in body
    assert "nan" not in metadata.lower()  # no undefined value indexed on the Hub
