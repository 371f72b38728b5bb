"""WSOL localization metric for `evaluate`: MaxBoxAcc, MaxBoxAccV2, top-1 Loc and GT-known Loc of score
maps against ground-truth boxes, with the conventions of clovaai/wsolevaluation (Choe et al., CVPR 2020).

    metric = evaluate.load("metrics/wsol_localization")      # a local path: nothing is downloaded
    metric.compute(scoremaps=[...], gt_boxes=[...])            # maps (H, W); boxes [[x0, y0, x1, y1], ...]

A thin wrapper: the computation is `wsol_metrics.LocalizationScores` of this repository.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from deit_scm_cxr.evaluation.boxes import DEFAULT_THRESHOLDS
from deit_scm_cxr.evaluation.metrics import LocalizationScores, pointing_hits
from deit_scm_cxr.hub.localization import LocalizationInputError, check_scoremap, normalize_scoremap

_CITATION = """\
@inproceedings{choe2020wsol,
  title={Evaluating Weakly Supervised Object Localization Methods Right},
  author={Choe, Junsuk and Oh, Seong Joon and Lee, Seungho and Chun, Sanghyuk and Akata, Zeynep and Shim, Hyunjung},
  booktitle={CVPR}, year={2020}}
"""

_INPUTS = """
Args:
    scoremaps: per image an (H, W) score map in the frame of its boxes (min-max normalized here).
    gt_boxes: per image a list of [x0, y0, x1, y1] inclusive pixel boxes.
    correct_class: optional per image bool, the predicted class is right (for top-1 Loc).
    threshold_step: spacing of the threshold grid, in (0, 1] (default 0.01).
Returns:
    MaxBoxAcc (delta 0.5, largest contour), MaxBoxAccV2 (mean over delta 0.3/0.5/0.7, all contours),
    top1_loc, gt_known_loc, the best threshold; all maxima over thresholds of this very set. And
    pointing_game: the percentage of images whose map's maximum lies inside a box (no threshold).
    A map that is not a non-empty finite 2-D array, or a step outside (0, 1], raises `LocalizationInputError`.
"""


class WsolLocalization(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "scoremaps": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                    "gt_boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
                    "correct_class": datasets.Value("bool"),
                }
            ),
            reference_urls=["https://github.com/clovaai/wsolevaluation"],
        )

    def _compute(self, scoremaps, gt_boxes, correct_class, threshold_step: float = 0.01):
        step = float(threshold_step)
        if not (np.isfinite(step) and 0.0 < step <= 1.0):
            raise LocalizationInputError(f"threshold_step must be in (0, 1], got {threshold_step!r}")
        thresholds = DEFAULT_THRESHOLDS if step == 0.01 else np.arange(0, 1, step)
        maps = [
            normalize_scoremap(check_scoremap(np.asarray(m, dtype=np.float32), index, normalized=False))
            for index, m in enumerate(scoremaps)
        ]
        boxes = [np.asarray(b, dtype=np.float64).reshape(-1, 4) for b in gt_boxes]
        scores = LocalizationScores.from_maps(maps, boxes, correct_class, thresholds=thresholds)
        return {**scores.oracle(), "pointing_game": float(pointing_hits(maps, boxes).mean() * 100.0)}
