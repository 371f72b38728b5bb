"""Ablation with seeds and peers: the default recipe with SCM `cxr`, SCM `paper`, the same backbone without SCM,
and a peer a practitioner would train instead (`resnet_cam`: a timm ResNet with CAM and Grad-CAM at the same
token grid, `bench/peer_cam.py`), side by side on the same data.

Each DeiT arm trains the main job (`run_wsol.py`, the embedded phantoms, the `scratch` recipe) once per seed;
a peer trains on the same seed's phantoms within the `cxr` arm's wall time on that seed. The tables give
mean ± std over seeds (and per seed) of balanced accuracy, macro F1 and, for every map and baseline,
MaxBoxAcc and MaxBoxAccV2 at thresholds chosen on validation, PxAP and the pointing game (test split, 224x224
frame, threshold step 0.001), with 95 % bootstrap intervals over the test images. Runs already finished (an
`all_results.json` in their folder) are read, not retrained, so the script can be stopped and started again.

    python bench/ablation.py --output_dir bench/ablation_runs --parallel 2  # 4 arms x 3 seeds, ~1.5 h on 2 cores
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

from deit_scm_cxr.hub.localization import MAP_LABELS, current_map_names

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
    # Issue 31's levers, each within the default's budget and on the default's evaluation images:
    # twice the distinct training phantoms at half the epochs (the same optimizer steps);
    "cxr_data2x": ["--scm_variant", "cxr", "--num_phantoms", "2400", "--num_eval_phantoms", "1200",
                   "--num_train_epochs", "20"],
    # the official code's GAP pooling and all-layer attention with the cxr recipe's other settings.
    "cxr_gap": ["--scm_variant", "cxr", "--config_overrides", "scm_pooling=mean,scm_attention_layers=all"],
    # GAP pooling alone (the cxr recipe's last-layer attention kept): did cxr_gap's classification gain come from
    # the pooling, and is S0's collapse on seeds 1-2 the pooling's or the all-layer attention's?
    "cxr_mean": ["--scm_variant", "cxr", "--config_overrides", "scm_pooling=mean"],
    # Sharper log-sum-exp pooling (r 10 against 5): nearer max pooling, so a class's logit rests on fewer
    # tokens and its map should peak where the evidence is (the pointing game).
    "cxr_lse10": ["--scm_variant", "cxr", "--config_overrides", "scm_lse_r=10"],
    # Softer log-sum-exp pooling (r 3): between r 5 and GAP, which collapses S0. Chosen on validation, it is the
    # scratch recipe's since, so this arm is now the default (`cxr`) and `cxr_lse5` the former default.
    "cxr_lse3": ["--scm_variant", "cxr", "--config_overrides", "scm_lse_r=3"],
    "cxr_lse5": ["--scm_variant", "cxr", "--config_overrides", "scm_lse_r=5"],
    # SCM diffusing a detached F0: the loss through SCM trains S0 only. The runs with SCM leave F0 at chance;
    # without SCM one seed of three grew an F0 that points at findings: is SCM's gradient into F0 the cause?
    "cxr_detach": ["--scm_variant", "cxr", "--config_overrides", "scm_detach_attention=true"],
    # A finer token grid: 128-pixel inputs at the same 8-pixel patches give 16x16 tokens instead of 12x12 (a
    # token covers 14 px of the 224 evaluation frame instead of 19: a small nodule's box is about one token, and
    # a peak one token off misses it in the pointing game); a step costs about 1.7 times as much, so 30 epochs
    # instead of the default's 50 keep its wall clock.
    "cxr_grid16": ["--scm_variant", "cxr", "--image_size", "128", "--num_train_epochs", "30"],
    # A CPU run now trains on both cores (--cpu_threads; accelerate launch had left it one): 40 epochs take
    # ~5.5 minutes instead of ~9, which leaves the 10-minute budget room for a quarter more epochs. 50 epochs
    # won on validation and are the `scratch` recipe's since; `cxr_e40` is the former default.
    "cxr_e50": ["--scm_variant", "cxr", "--num_train_epochs", "50"],
    "cxr_e40": ["--scm_variant", "cxr", "--num_train_epochs", "40"],
    # 60 epochs: the 40 -> 50 step raised the validation pointing game on every seed; does the next 10 (about
    # 1.5 minutes more on two cores, still inside the 10-minute budget) raise it again?
    "cxr_e60": ["--scm_variant", "cxr", "--num_train_epochs", "60"],
    # The SCM phase also trains the pooled S0, the logits and map inference uses (`semantic_loss_weight`): does
    # it keep the classifier through the switch (seed 2: validation macro F1 0.92 -> 0.53) and S0 on the finding?
    # Chosen on validation, it is the scratch recipe's since, so this arm now runs the default (`cxr`) and
    # `cxr_s0loss0` the former default.
    "cxr_s0loss": ["--scm_variant", "cxr", "--config_overrides", "semantic_loss_weight=1.0"],
    "cxr_s0loss0": ["--scm_variant", "cxr", "--config_overrides", "semantic_loss_weight=0.0"],
    # Softer still (r 2): r 10 -> 5 -> 3 improved S0's boxes, pixels and pointing each time, and GAP (r -> 0)
    # collapses S0; where between 3 and GAP does the trend turn?
    "cxr_lse2": ["--scm_variant", "cxr", "--config_overrides", "scm_lse_r=2"],
}
# Peers: what a practitioner would train instead, on the same seeds' data and budget (`bench/peer_cam.py`).
PEERS: dict[str, list[str]] = {
    # timm's ResNet-10-T (its smallest ResNet) at output stride 8: CAM and Grad-CAM on the DeiT's 12x12 grid.
    # Half width (32-256 channels): at one thread the full width takes 1.85 s a step against 0.79 s, so in the
    # DeiT's ~10 minutes it would see 6-7 epochs instead of ~15; the narrower net is the stronger peer there.
    "resnet_cam": ["--arch", "resnet10t", "--output_stride", "8", "--width", "0.5"],
    # The GPU regime (deit-tiny at 224 with 16-pixel patches: a 14x14 grid): there a practitioner trains a
    # full ResNet-18, at output stride 16 for the same grid; compute is no longer what limits its epochs.
    "resnet18_cam": ["--arch", "resnet18", "--output_stride", "16"],
}
PEER_BUDGET_ARM = "cxr"  # a peer's wall-clock budget is this arm's time on the same seed
# run_wsol.py flags a peer takes under the same name (`bench/peer_cam.py`).
PEER_SHARED_FLAGS = ("--num_phantoms", "--num_eval_phantoms", "--phantom_size", "--image_size", "--max_eval_samples",
                     "--preprocessing_num_workers", "--per_device_train_batch_size", "--mixed_precision")  # fmt: skip
MAPS = (*MAP_LABELS, "random", "full_image", "train_mean_box")
PEER_MAP_NAMES = {"cam": "CAM (ResNet peer)", "gradcam": "Grad-CAM (ResNet peer)"}
MAP_NAMES = {
    **MAP_LABELS,
    **PEER_MAP_NAMES,
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
    def ready(job: tuple[str, str, int]) -> bool:
        """A peer waits for the run whose wall time is its budget, when that run is still to come."""
        regime, arm, seed = job
        budget_job = (regime, PEER_BUDGET_ARM, seed)
        budget_folder = run_folder(output_dir, *budget_job)
        waiting = budget_job in pending or any(folder == budget_folder for _, folder, _, _ in running)
        return arm not in PEERS or not waiting

    while pending or running:
        while len(running) < parallel and any(ready(job) for job in pending):
            regime, arm, seed = pending.pop(next(i for i, job in enumerate(pending) if ready(job)))
            folder = run_folder(output_dir, regime, arm, seed)
            if arm in PEERS:
                budget = peer_budget(output_dir, regime, seed)
                command = [sys.executable, str(ROOT / "bench" / "peer_cam.py"), *PEERS[arm], *data_flags(extra),
                           "--seed", str(seed), "--max_seconds", str(budget)]  # fmt: skip
            else:
                flags = merge_flags(ARMS[arm], [*regime_flags(regimes, regime), *extra])
                command = [sys.executable, str(ROOT / "run_wsol.py"), *flags, "--seed", str(seed),
                           "--overwrite_output_dir", "--cpu_threads", str(threads)]  # fmt: skip
            command += ["--output_dir", str(folder), "--cache_dir", str(output_dir / "cache" / folder.name)]
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


def data_flags(extra: list[str]) -> list[str]:
    """The flags of `extra` that choose the data (a peer must see the same images) and how it is fed (batch,
    autocast), with their values."""
    kept, items = [], iter(extra)
    for flag in items:
        if flag in PEER_SHARED_FLAGS:
            kept += [flag, next(items)]
    return kept


def peer_budget(output_dir: Path, regime: str, seed: int, default: float = 600.0) -> float:
    """The wall time of `PEER_BUDGET_ARM` on this seed (finished before the peer: jobs run arms first), else
    `default` (the default job's 10-minute budget)."""
    wall = run_folder(output_dir, regime, PEER_BUDGET_ARM, seed) / "wall_seconds.txt"
    return float(wall.read_text()) if wall.is_file() else default


def load_run(folder: Path) -> dict:
    """One finished run's all_results.json with its wall time added."""
    results = current_map_names(json.loads((folder / "all_results.json").read_text()))
    wall = folder / "wall_seconds.txt"
    results["wall_seconds"] = float(wall.read_text()) if wall.is_file() else float("nan")
    return results


def measures(results: dict) -> dict[str, float]:
    """The numbers one run contributes to the tables: every map and baseline it has, and its released map
    (chosen on validation) under the name `released`."""
    test = results["classification"]["test"]
    row = {"balanced_accuracy": test["balanced_accuracy"], "macro_f1": test["macro_f1"]}
    methods = results["localization"]["methods"]
    released = results["localization"].get("localization_map", "coupled")
    for name, method in [*methods.items(), ("released", methods[released])]:
        calibrated = method["calibrated_on_validation"]
        row[f"{name}/MaxBoxAcc"] = calibrated["MaxBoxAcc"]
        row[f"{name}/MaxBoxAccV2"] = calibrated["MaxBoxAccV2"]
        row[f"{name}/PxAP"] = method["PxAP"]
        row[f"{name}/pointing_game"] = method.get("pointing_game", float("nan"))
        row[f"{name}/mean_iou"] = method.get("box_measures", {}).get("mean_iou", float("nan"))
        for measure in ("MaxBoxAccV2", "PxAP", "pointing_game"):
            low, high = method.get("ci95", {}).get(measure, (float("nan"), float("nan")))
            row[f"{name}/{measure}_ci_low"], row[f"{name}/{measure}_ci_high"] = low, high
    row["wall_seconds"] = results["wall_seconds"]
    return row


def summarize(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds of every measure, and the per-seed values."""
    summary: dict[str, Any] = {}
    for key in rows[0]:
        values = np.array([r.get(key, float("nan")) for r in rows], dtype=np.float64)
        summary[key] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
    summary["per_seed"] = rows
    return summary


def _cell(value: tuple[float, float], digits: int) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def side_by_side(table: dict[str, dict[str, Any]], released_names: dict[str, list[str]]) -> list[str]:
    """One row per localizing map of every arm, DeiT and peers alike: balanced accuracy and the three
    threshold-free or validation-thresholded measures, mean ± std over seeds with the mean bootstrap interval,
    and the per-seed values of MaxBoxAccV2."""
    lines = [
        "| arm | map | balanced accuracy | MaxBoxAccV2 [95 % interval] | PxAP [95 %] | pointing game, % [95 %] "
        "| MaxBoxAccV2 per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, summary in table.items():
        maps = [("released", f"released ({', '.join(released_names[arm])})")]
        maps += [(name, MAP_NAMES.get(name, name)) for name in (*MAP_LABELS, *PEER_MAP_NAMES, "random")
                 if f"{name}/MaxBoxAccV2" in summary]  # fmt: skip
        for name, label in maps:
            cells = []
            for measure in ("MaxBoxAccV2", "PxAP", "pointing_game"):
                low, high = summary[f"{name}/{measure}_ci_low"][0], summary[f"{name}/{measure}_ci_high"][0]
                cells.append(f"{_cell(summary[f'{name}/{measure}'], 1)} [{low:.1f}, {high:.1f}]")
            seeds = ", ".join(f"{r[f'{name}/MaxBoxAccV2']:.1f}" for r in summary["per_seed"])
            lines.append(f"| `{arm}` | {label} | {_cell(summary['balanced_accuracy'], 3)} | {' | '.join(cells)} "
                         f"| {seeds} |")  # fmt: skip
    return lines


def markdown(table: dict[str, dict[str, Any]], seeds: list[int], released_names: dict[str, list[str]]) -> str:
    arms = [arm for arm in table if "coupled/MaxBoxAccV2" in table[arm]]  # the DeiT arms
    lines = [
        f"Mean ± std over seeds {', '.join(map(str, seeds))} (test split; τ from validation; 224×224 frame; "
        "intervals: 95 % bootstrap over the test images, mean over seeds).",
        "",
        *side_by_side(table, released_names),
        "",
        "DeiT arms, every map and baseline:",
        "",
        "| | " + " | ".join(f"`{a}`" for a in arms) + " |",
        "|---" * (len(arms) + 1) + "|",
        "| balanced accuracy | " + " | ".join(_cell(table[a]["balanced_accuracy"], 3) for a in arms) + " |",
        "| macro F1 | " + " | ".join(_cell(table[a]["macro_f1"], 3) for a in arms) + " |",
        "| wall time, s | " + " | ".join(_cell(table[a]["wall_seconds"], 0) for a in arms) + " |",
    ]
    for measure in ("MaxBoxAccV2", "MaxBoxAcc", "PxAP", "pointing_game"):
        for name in MAPS:
            if measure in ("PxAP", "pointing_game") and name in ("full_image", "train_mean_box"):
                continue
            values = " | ".join(_cell(table[a][f"{name}/{measure}"], 1) for a in arms)
            lines.append(f"| {measure}: {MAP_NAMES[name]} | {values} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="bench/ablation_runs")
    parser.add_argument("--arms", nargs="+", default=["cxr", "paper", "no_scm", "resnet_cam"],
                        choices=[*ARMS, *PEERS], help="DeiT arms first: a peer's budget is the cxr arm's time")
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
    table, released_names = {}, {}
    for regime in regimes:
        for arm in args.arms:
            runs = [load_run(run_folder(output_dir, regime, arm, seed)) for seed in args.seeds]
            key = arm if regime == "scratch" else f"{regime}/{arm}"
            table[key] = summarize([measures(results) for results in runs])
            released_names[key] = [results["localization"].get("localization_map", "coupled") for results in runs]
    (output_dir / "ablation.md").write_text(markdown(table, args.seeds, released_names))
    report = {"seeds": args.seeds, "regimes": regimes, "extra_flags": extra, "table": table,
              "released": released_names}  # fmt: skip
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
