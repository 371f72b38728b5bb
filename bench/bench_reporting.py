"""What the clinical reporting adds to a run: seconds of temperature fitting, the bootstrap intervals
(classification and every localization row) and the operating points, at the default job's sizes.

    python bench/bench_reporting.py [--test 300] [--boxed 188] [--rows 6] [--resamples 1000]

Prints one JSON object with the seconds of each step and their total. The localization intervals are
timed on the per-image quantities they start from (IoUs at the thresholds, pixel histograms), which the
evaluation computes anyway for its point estimates.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from deit_scm_cxr.evaluation import reporting
from deit_scm_cxr.evaluation.boxes import FINE_THRESHOLDS
from deit_scm_cxr.evaluation.metrics import LocalizationScores, localization_intervals


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--validation", type=int, default=200)
    parser.add_argument("--boxed", type=int, default=188)
    parser.add_argument("--rows", type=int, default=6, help="localization rows (maps and baselines)")
    parser.add_argument("--resamples", type=int, default=reporting.BOOTSTRAP_RESAMPLES)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    val_labels, test_labels = rng.integers(0, 3, args.validation), rng.integers(0, 3, args.test)
    val_logits = rng.normal(size=(args.validation, 3)) + 2 * np.eye(3)[val_labels]
    test_logits = rng.normal(size=(args.test, 3)) + 2 * np.eye(3)[test_labels]
    seconds = {}
    start = time.perf_counter()
    calibration = reporting.calibration_report(val_logits, val_labels, test_logits, test_labels)
    seconds["temperature_and_calibration"] = time.perf_counter() - start
    start = time.perf_counter()
    reporting.classification_intervals(test_labels, reporting.softmax(test_logits), range(args.test),
                                       resamples=args.resamples)  # fmt: skip
    seconds["classification_intervals"] = time.perf_counter() - start
    start = time.perf_counter()
    temperature = calibration["temperature"]
    reporting.operating_points(val_labels, reporting.softmax(val_logits, temperature), test_labels,
                               reporting.softmax(test_logits, temperature), ["A", "B", "C"], range(args.test),
                               resamples=args.resamples)  # fmt: skip
    seconds["operating_points"] = time.perf_counter() - start
    thresholds = np.asarray(FINE_THRESHOLDS)
    scores = LocalizationScores(
        rng.random((args.boxed, len(thresholds))), rng.random((args.boxed, len(thresholds))),
        np.ones(args.boxed, bool), thresholds,
    )  # fmt: skip
    histograms = (rng.integers(0, 50, (args.boxed, len(thresholds) + 2)).astype(float),) * 2
    start = time.perf_counter()
    weights = reporting.resample_weights(range(args.boxed), args.resamples)
    for _ in range(args.rows):
        localization_intervals(weights, scores, (500, [400, 500, 600]), histograms)
    seconds["localization_intervals"] = time.perf_counter() - start
    report = {"sizes": vars(args), "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    report["total_seconds"] = round(sum(seconds.values()), 3)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
