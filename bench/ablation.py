"""Ablation with seeds: the default recipe with SCM `cxr`, SCM `paper`, and the same backbone without SCM.

Each arm trains the main job (`run_wsol.py`, the embedded phantoms, the `scratch` recipe) once per seed and
the table gives mean ± std over seeds of balanced accuracy, macro F1 and, for every map and baseline,
MaxBoxAcc and MaxBoxAccV2 at thresholds chosen on validation, and PxAP (test split, 224x224 frame,
threshold step 0.001). Runs already finished (an `all_results.json` in their folder) are read, not
retrained, so the script can be stopped and started again.

    python bench/ablation.py --output_dir bench/ablation_runs --parallel 2  # 3 arms x 3 seeds, ~1 h on 2 cores
    python bench/ablation.py --arms cxr --seeds 0 --output_dir /tmp/abl   # one run
    python bench/ablation.py --regimes supervised=outputs/pretrain-supervised dino=outputs/pretrain-dino \
        --output_dir bench/ablation_pretrained --parallel 2   # fine-tuned from pretrained backbones

A regime `NAME=DIR` fine-tunes every arm from the pretrained checkpoint in DIR (`run_pretrain.py`'s output)
through the user path: `--backbone_weights DIR --recipe cxr` (the seed's fine-tuning recipe for all three
arms, patch projection); `scratch` (the default) trains from scratch with the default recipe.

Prints one JSON object (the table's numbers) and writes `ablation.md` (the table) into --output_dir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from localization import MAP_LABELS, current_map_names

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("ablation")

ARMS: dict[str, list[str]] = {
    "cxr": ["--scm_variant", "cxr"],
    "paper": ["--scm_variant", "paper"],
    # The same backbone and head trained without the SCM blocks: TS-CAM's F0 * S0 and plain CAM (S0).
    "no_scm": ["--scm_variant", "cxr", "--config_overrides", "scm_num_blocks=0"],
    # SCM cxr with the auxiliary CLS-token loss, which trains the attention F0 from scratch.
    "cxr_cls": ["--scm_variant", "cxr", "--config_overrides", "cls_loss_weight=1.0"],
    # SCM cxr with a learnable distance penalty on the attention logits (local attention from scratch).
    "cxr_local": ["--scm_variant", "cxr", "--config_overrides", "attention_locality=1.0"],
}
MAPS = (*MAP_LABELS, "random", "full_image", "train_mean_box")
MAP_NAMES = {
    **MAP_LABELS,
    "random": "random map",
    "full_image": "full-image box",
    "train_mean_box": "mean train box",
}


def merge_flags(arm: list[str], extra: list[str]) -> list[str]:
    """The arm's flags, then the extra ones; `--config_overrides` of both are joined, not replaced (argparse
    keeps only the last one, which would drop the arm's `scm_num_blocks=0`)."""

    def overrides(flags: list[str]) -> tuple[list[str], list[str]]:
        rest, found = [], []
        items = iter(flags)
        for flag in items:
            if flag == "--config_overrides":
                found.append(next(items))
            else:
                rest.append(flag)
        return rest, found

    arm_rest, arm_overrides = overrides(arm)
    extra_rest, extra_overrides = overrides(extra)
    joined = ",".join(arm_overrides + extra_overrides)
    return arm_rest + extra_rest + (["--config_overrides", joined] if joined else [])


def regime_flags(regimes: dict[str, str], regime: str) -> list[str]:
    """The flags of a regime: nothing from scratch; a pretrained backbone through the user path."""
    return [] if regime == "scratch" else ["--backbone_weights", regimes[regime], "--recipe", "cxr"]


def run_folder(output_dir: Path, regime: str, arm: str, seed: int) -> Path:
    return output_dir / (f"{arm}-seed{seed}" if regime == "scratch" else f"{regime}-{arm}-seed{seed}")


def run_all(jobs: list[tuple[str, str, int]], output_dir: Path, extra: list[str], parallel: int,
            regimes: dict[str, str]) -> None:  # fmt: skip
    """Train every (regime, arm, seed) not finished yet, `parallel` at a time, the cores split between them."""
    pending = [job for job in jobs if not (run_folder(output_dir, *job) / "all_results.json").is_file()]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    running: list[tuple[subprocess.Popen, Path, float, Any]] = []
    while pending or running:
        while pending and len(running) < parallel:
            regime, arm, seed = pending.pop(0)
            folder = run_folder(output_dir, regime, arm, seed)
            flags = merge_flags(ARMS[arm], [*regime_flags(regimes, regime), *extra])
            command = [sys.executable, str(ROOT / "run_wsol.py"), *flags, "--seed", str(seed)]
            command += [
                "--output_dir",
                str(folder),
                "--overwrite_output_dir",
                "--cache_dir",
                str(output_dir / "cache" / folder.name),
            ]
            logger.info("running %s", " ".join(command))
            log = open(folder.with_suffix(".log"), "w")  # noqa: SIM115 - closed when the run ends
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
            running.append((process, folder, time.perf_counter(), log))
        time.sleep(5)
        for item in list(running):
            process, folder, start, log = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            if process.returncode != 0:
                raise SystemExit(f"ablation: {folder.name} failed (exit {process.returncode}); see its .log")
            (folder / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")


def load_run(folder: Path) -> dict:
    """One finished run's all_results.json with its wall time added."""
    results = current_map_names(json.loads((folder / "all_results.json").read_text()))
    wall = folder / "wall_seconds.txt"
    results["wall_seconds"] = float(wall.read_text()) if wall.is_file() else float("nan")
    return results


def measures(results: dict) -> dict[str, float]:
    """The numbers one run contributes to the table."""
    test = results["classification"]["test"]
    row = {"balanced_accuracy": test["balanced_accuracy"], "macro_f1": test["macro_f1"]}
    for name in MAPS:
        method = results["localization"]["methods"][name]
        calibrated = method["calibrated_on_validation"]
        row[f"{name}/MaxBoxAcc"] = calibrated["MaxBoxAcc"]
        row[f"{name}/MaxBoxAccV2"] = calibrated["MaxBoxAccV2"]
        row[f"{name}/PxAP"] = method["PxAP"]
        row[f"{name}/mean_iou"] = method.get("box_measures", {}).get("mean_iou", float("nan"))
        low, high = method.get("ci95", {}).get("MaxBoxAccV2", (float("nan"), float("nan")))
        row[f"{name}/MaxBoxAccV2_ci_low"], row[f"{name}/MaxBoxAccV2_ci_high"] = low, high
    row["wall_seconds"] = results["wall_seconds"]
    return row


def summarize(rows: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and sample standard deviation over seeds of every measure."""
    keys = rows[0].keys()
    summary = {}
    for key in keys:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        summary[key] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
    return summary


def markdown(table: dict[str, dict[str, tuple[float, float]]], seeds: list[int]) -> str:
    def cell(value: tuple[float, float], digits: int) -> str:
        return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"

    arms = list(table)
    lines = [
        f"Mean ± std over seeds {', '.join(map(str, seeds))} (test split; τ from validation; 224×224 frame).",
        "",
        "| | " + " | ".join(f"`{a}`" for a in arms) + " |",
        "|---" * (len(arms) + 1) + "|",
        "| balanced accuracy | " + " | ".join(cell(table[a]["balanced_accuracy"], 3) for a in arms) + " |",
        "| macro F1 | " + " | ".join(cell(table[a]["macro_f1"], 3) for a in arms) + " |",
        "| wall time, s | " + " | ".join(cell(table[a]["wall_seconds"], 0) for a in arms) + " |",
    ]
    for name in MAPS[:4]:
        bounds = " | ".join(
            f"[{table[a][f'{name}/MaxBoxAccV2_ci_low'][0]:.1f}, {table[a][f'{name}/MaxBoxAccV2_ci_high'][0]:.1f}]"
            for a in arms
        )
        lines.append(
            f"| MaxBoxAccV2 95 % interval (bootstrap over test images, mean over seeds): {MAP_NAMES[name]} | {bounds} |"
        )
    for measure in ("MaxBoxAccV2", "MaxBoxAcc", "PxAP"):
        for name in MAPS:
            if measure == "PxAP" and name in ("full_image", "train_mean_box"):
                continue
            values = " | ".join(cell(table[a][f"{name}/{measure}"], 1) for a in arms)
            lines.append(f"| {measure}: {MAP_NAMES[name]} | {values} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="bench/ablation_runs")
    parser.add_argument("--arms", nargs="+", default=["cxr", "paper", "no_scm"], choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (the cores are split between them)")
    parser.add_argument(
        "--regimes", nargs="+", default=["scratch"], help='"scratch" and/or NAME=DIR (a run_pretrain.py checkpoint)'
    )
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more run_wsol.py flags, after --")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    extra = [a for a in args.extra if a != "--"]
    regimes = dict(item.split("=", 1) if "=" in item else (item, "") for item in args.regimes)
    unknown = [name for name, path in regimes.items() if name != "scratch" and not Path(path).is_dir()]
    if unknown:
        parser.error(f"--regimes: no checkpoint folder for {unknown}")
    # Seed-major order: with the runs cut short, every arm still has the same seeds done.
    jobs = [(regime, arm, seed) for seed in args.seeds for regime in regimes for arm in args.arms]
    run_all(jobs, output_dir, extra, args.parallel, regimes)
    table = {
        (arm if regime == "scratch" else f"{regime}/{arm}"): summarize(
            [measures(load_run(run_folder(output_dir, regime, arm, seed))) for seed in args.seeds]
        )
        for regime in regimes
        for arm in args.arms
    }
    (output_dir / "ablation.md").write_text(markdown(table, args.seeds))
    report = {"seeds": args.seeds, "regimes": regimes, "extra_flags": extra, "table": table}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
