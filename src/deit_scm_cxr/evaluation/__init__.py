"""Evaluation: WSOL box and pixel metrics, the pointing game, calibration, bootstrap intervals, the
out-of-distribution statistics, and the `evaluate` metric module (`wsol_localization`)."""
