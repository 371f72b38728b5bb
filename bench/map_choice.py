"""Which map localizes: every candidate localization map of trained runs, scored the same way.

For each run folder (a saved model whose `all_results.json` names its seed and data), the validation and
test phantoms are predicted once and each candidate map is scored with MaxBoxAccV2 / MaxBoxAcc at the
thresholds chosen on validation (the test oracle beside it), in the 224x224 frame. Candidates, all
for the ground-truth class c (GT-known, as wsolevaluation):

    coupled         F0 * S0[c]                  the paper's inference map (TS-CAM's coupling)
    semantic        S0[c]                       plain CAM
    attention       F0                          the CLS attention
    relu_product    F0 * relu(S0[c])            the product without S0's negative background
    minmax_product  F0 * minmax(S0[c])          the product with S0 rescaled to [0, 1] per image
    random          uniform noise on the grid   the floor

With `--offset_px D1,D2,...`, S0 is also scored moved D pixels up and left in the 224x224 frame (`semantic_up_left_D`):
how far a run's maps sit from where the evaluation puts them (a 3x3 convolutional stem centres each token
3.5 px up and left of its patch at 96x96, 8.2 px in the frame; `conv_stem_kernel_size`).

Prints one JSON line per run and a last line with mean +- std per arm (run folders named ARM-seedN):

    python bench/map_choice.py bench/ablation_runs/*-seed*/
    python bench/map_choice.py --offset_px 4,8,12 bench/ablation_runs/cxr-seed*/
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import deit_scm_cxr.data.prepare as wsol_data
import deit_scm_cxr.evaluation.evaluator as wsol_evaluation
from deit_scm_cxr.evaluation.boxes import DEFAULT_THRESHOLDS, upsample_scoremap
from deit_scm_cxr.evaluation.metrics import LocalizationScores, calibrated_report
from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification
from deit_scm_cxr.training.run import settings_for


def candidate_maps(attention: torch.Tensor, semantic: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
    """(N, h, w) attention and the selected class's (N, h, w) semantic map -> each candidate (N, h, w)."""
    low = semantic.flatten(1).min(1).values.view(-1, 1, 1)
    high = semantic.flatten(1).max(1).values.view(-1, 1, 1)
    maps = {
        "coupled": attention * semantic,
        "semantic": semantic,
        "attention": attention,
        "relu_product": attention * semantic.clamp_min(0),
        "minmax_product": attention * (semantic - low) / (high - low).clamp_min(1e-12),
    }
    arrays = {k: v.numpy().astype(np.float32) for k, v in maps.items()}
    arrays["random"] = np.random.default_rng(seed).random(tuple(semantic.shape)).astype(np.float32)
    return arrays


def moved_up_left(frame_map: np.ndarray, pixels: int) -> np.ndarray:
    """The map read `pixels` further down and right (edge values repeated): its content moves up and left."""
    rows = np.clip(np.arange(frame_map.shape[0]) + pixels, 0, frame_map.shape[0] - 1)
    columns = np.clip(np.arange(frame_map.shape[1]) + pixels, 0, frame_map.shape[1] - 1)
    return frame_map[rows][:, columns]


def boxed_scores(boxed, seed: int, thresholds, offsets: tuple[int, ...] = ()) -> dict[str, LocalizationScores]:
    """Each candidate of a split's boxed images (`wsol_evaluation.evaluation_split`), scored in the frame."""
    attention, semantic = (torch.from_numpy(boxed.maps[key]) for key in ("attention", "semantic"))
    frame_maps = {
        name: [upsample_scoremap(m, boxed.frame_size) for m in grid_maps]
        for name, grid_maps in candidate_maps(attention, semantic, seed).items()
    }
    for pixels in offsets:
        frame_maps[f"semantic_up_left_{pixels}"] = [moved_up_left(m, pixels) for m in frame_maps["semantic"]]
    return {
        name: LocalizationScores.from_maps(maps, boxed.gt_boxes, boxed.correct_class, thresholds)
        for name, maps in frame_maps.items()
    }


def score_run(run: Path, thresholds, offsets: tuple[int, ...] = ()) -> dict:
    from accelerate import Accelerator

    saved = json.loads((run / "all_results.json").read_text())["args"]
    flags = ["--seed", str(saved["seed"]), "--num_phantoms", str(saved["num_phantoms"]), "--phantom_size",
             str(saved["phantom_size"]), "--per_device_eval_batch_size", str(saved["per_device_eval_batch_size"]),
             "--output_dir", str(run / "rescored")]  # fmt: skip
    flags += ["--cache_dir", saved["cache_dir"]] if saved.get("cache_dir") else []
    settings = settings_for(*flags)
    data, evaluation = settings.data, settings.evaluation
    processor = wsol_data.build_processor(str(run), saved["image_size"])
    accelerator = Accelerator(cpu=True)
    splits = wsol_data.prepare_all(data, processor, accelerator)
    model = DeiTSCMForImageClassification.from_pretrained(run).eval()
    # The run's own prediction and boxed-image selection (wsol_evaluation), as the final evaluation does it.
    parts = SimpleNamespace(accelerator=accelerator, model=model, normalizer=wsol_data.PixelNormalizer(processor))
    scores = {}
    for name, seed in (("loc_validation", saved["seed"]), ("loc_test", saved["seed"] + 1)):
        predictions = wsol_evaluation.predict_split(evaluation, parts, splits[name])
        boxed = wsol_evaluation.evaluation_split(splits[name], predictions)
        scores[name] = boxed_scores(boxed, seed, thresholds, offsets)
    validation, test = scores["loc_validation"], scores["loc_test"]
    row = {"run": run.name}
    for name in validation:
        report = calibrated_report(validation[name], test[name])
        row[name] = {
            "MaxBoxAccV2": report["calibrated_on_validation"]["MaxBoxAccV2"],
            "MaxBoxAcc": report["calibrated_on_validation"]["MaxBoxAcc"],
            "validation_MaxBoxAccV2": validation[name].oracle()["MaxBoxAccV2"],
            "test_oracle_MaxBoxAccV2": report["test_oracle_max_over_thresholds"]["MaxBoxAccV2"],
        }
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--threshold_step", type=float, default=0.01)
    parser.add_argument(
        "--offset_px",
        type=lambda text: tuple(int(v) for v in text.split(",")),
        default=(),
        help="comma-separated D: also score S0 moved up-left by D px (e.g. 4,8,12)",
    )
    args = parser.parse_args(argv)
    thresholds = np.arange(0, 1, args.threshold_step) if args.threshold_step != 0.01 else DEFAULT_THRESHOLDS
    rows = []
    by_arm: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in args.runs:
        row = score_run(run, thresholds, args.offset_px)
        rows.append(row)
        print(json.dumps(row), flush=True)
        arm = run.name.rsplit("-seed", 1)[0]
        for name in (k for k in row if k != "run"):
            for key in ("MaxBoxAccV2", "validation_MaxBoxAccV2"):
                by_arm[arm][f"{name}.{key}"].append(row[name][key])
    summary = {
        arm: {
            k: f"{statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}" for k, v in values.items()
        }
        for arm, values in by_arm.items()
    }
    print(json.dumps({"summary": summary}))
    return rows


if __name__ == "__main__":
    main()
