"""Checkpoints of `run_wsol.py`: Accelerate state written atomically (a half-written folder is never
`latest`), the run's `TrainState`, early stopping's best weights, pruning, and resolving what to resume."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from wsol_data import cli_error

logger = logging.getLogger("run_wsol")


CHECKPOINT_PREFIX = "step_"
COMPLETE_MARKER = "COMPLETE"
BEST_WEIGHTS_FILE = "best_model.safetensors"


@dataclass
class TrainState:
    """What a checkpoint records beyond Accelerate's own state (model, optimizer, scheduler, RNG)."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_metric: Optional[float] = None
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    scm_warmup_epochs: int = 0


def completed_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders that finished writing, oldest first. A folder without the marker (a run
    killed mid-save) is never a candidate."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        path
        for path in folder.iterdir()
        if path.is_dir()
        and path.name.startswith(CHECKPOINT_PREFIX)
        and path.name[len(CHECKPOINT_PREFIX) :].isdigit()
        and (path / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(
    accelerator: Any,
    output_dir: Path,
    state: TrainState,
    best_weights: Optional[dict[str, torch.Tensor]] = None,
    total_limit: Optional[int] = None,
) -> Path:
    """Write to a temporary folder, mark it complete, then rename it into place; keep the newest
    `total_limit` complete checkpoints. A failed write (a full disk) names the folder, the cause and
    the free space, and leaves the earlier checkpoints as they were."""
    final = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{state.global_step}"
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            if best_weights is not None:
                from safetensors.torch import save_file

                save_file(best_weights, str(partial / BEST_WEIGHTS_FILE))
            (partial / "train_state.json").write_text(json.dumps(asdict(state)))
            (partial / COMPLETE_MARKER).write_text("ok\n")
    except (OSError, RuntimeError) as error:
        free = shutil.disk_usage(partial.parent).free / 2**20 if partial.parent.exists() else float("nan")
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeError(
            f"could not write checkpoint {final}: {error} ({free:.0f} MiB free on that disk; "
            "a full disk is the usual cause: free space or lower --checkpoints_total_limit)"
        ) from error
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if total_limit:
            for old in completed_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, checkpoint: Path) -> tuple[TrainState, Optional[dict[str, torch.Tensor]]]:
    """What `save_checkpoint` wrote: Accelerate's state restored into `accelerator`, the run's `TrainState`,
    and the best-epoch weights (present when early stopping is on, else None)."""
    accelerator.load_state(str(checkpoint))
    state = TrainState(**json.loads((checkpoint / "train_state.json").read_text()))
    best = checkpoint / BEST_WEIGHTS_FILE
    if not best.is_file():
        return state, None
    from safetensors.torch import load_file

    return state, load_file(str(best))


def resolve_checkpoint(args: argparse.Namespace) -> Optional[Path]:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        done = completed_checkpoints(Path(args.output_dir))
        if not done:
            logger.warning("no complete checkpoint in %s; starting from scratch", args.output_dir)
            return None
        return done[-1]
    path = Path(args.resume_from_checkpoint)
    if not (path / COMPLETE_MARKER).is_file():
        cli_error(f"{path} is not a complete checkpoint")
    return path
