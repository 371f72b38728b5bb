"""Checkpoints of `run_wsol.py`: Accelerate state written atomically (a half-written folder is never
`latest`), the run's `TrainState`, early stopping's best weights, pruning, and resolving what to resume;
and the run folder: what a run wrote there, the only thing `--overwrite_output_dir` may remove."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from deit_scm_cxr.errors import RunWriteError, free_mib, refuse
from deit_scm_cxr.hub.modeling_deit_scm import check_loading_report
from deit_scm_cxr.training.recipes import current_flag_values

logger = logging.getLogger("run_wsol")


CHECKPOINT_PREFIX = "step_"
COMPLETE_MARKER = "COMPLETE"
BEST_WEIGHTS_FILE = "best_model.safetensors"
ABANDONED_PREFIX = "abandoned_"
# What a run of run_wsol.py writes at the top of --output_dir: the only entries --overwrite_output_dir
# removes. Anything else there (a user's notes, data, a model being fine-tuned) is never touched.
RUN_OUTPUT_PATTERNS = (
    "all_results.json", "README.md", "config.json", "preprocessor_config.json", "model.safetensors",
    "configuration_deit_scm.py", "modeling_deit_scm.py", "scm_diffusion.py", "image_processing_cxr.py",
    "cxr_decoding.py", "localization.py", "pipeline_cxr.py",
    "metrics_plots", "heatmap_comparisons", "localization_samples", "checkpoints",
    "predictions", "problem_images_*.csv", "run_wsol", "recipe.json",
)  # fmt: skip
# Where --overwrite_output_dir sets the finished run aside until its replacement is complete.
PREVIOUS_RUN_DIR = ".previous_run"
# Inside the folders above, what a run writes; a user's file kept there survives an overwrite.
RUN_FOLDER_PATTERNS = {
    "checkpoints": (f"{CHECKPOINT_PREFIX}*", f"{ABANDONED_PREFIX}*"),
    "run_wsol": ("*",),  # the trackers' own logs
}
RUN_FILE_SUFFIXES = (".png", ".jpg", ".json", ".jsonl", ".csv")
# The model card's title line (wsol_card.model_card): a README.md without it is not a run's.
MODEL_CARD_TITLE = "# DeiT-SCM ("


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
    settings: dict[str, Any] = field(default_factory=dict)  # the flags that determine training (`run_settings`)


# Flags a resumed run may change: where things go, how they are reported, what runs after training.
# Any other flag shapes the training itself (a rate, the data, the schedule's length...).
RESUMABLE_CHANGES = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "report_to", "num_workers",
    "preprocessing_num_workers", "per_device_eval_batch_size", "do_eval", "do_predict", "predict_files",
    "push_to_hub", "hub_model_id", "hub_space_id", "cache_dir", "data_dir", "checkpointing_steps",
    "checkpoints_total_limit", "cpu", "cpu_threads", "torch_compile", "map_smoothing_sigmas",
})  # fmt: skip


def run_settings(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags that determine what training does, as JSON values (what a checkpoint records)."""
    return json.loads(json.dumps({k: v for k, v in sorted(flags.items()) if k not in RESUMABLE_CHANGES}, default=str))


def check_resumed_settings(recorded: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse (one line) to resume with flags other than the checkpoint's: the results would record settings
    the model never trained with. Checkpoints written before settings were recorded pass."""
    if not recorded:
        return
    recorded = run_settings(current_flag_values(recorded))
    now = run_settings(current)
    changed = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    if changed:
        details = ", ".join(f"--{k} {recorded.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        refuse(
            f"--resume_from_checkpoint {checkpoint}: the checkpoint was trained with other settings ({details}); "
            "resume with the same flags, or start a new run"
        )


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
            # The marker holds every file's SHA-256: a resume verifies them before trusting the folder.
            (partial / COMPLETE_MARKER).write_text(json.dumps(folder_checksums(partial), indent=1))
    except (OSError, RuntimeError) as error:
        free = free_mib(partial.parent)
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise RunWriteError(
            f"could not write checkpoint {final}: {error} ({free:.0f} MiB free on that disk; "
            "a full disk is the usual cause: free space or lower --checkpoints_total_limit)"
        ) from error
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        if total_limit:
            # Only checkpoints older than this one: a newer one would belong to another timeline.
            older = [path for path in completed_checkpoints(output_dir) if checkpoint_step(path) < state.global_step]
            for old in older[: max(0, len(older) - (total_limit - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def set_aside_later_checkpoints(output_dir: Path, resumed_step: int) -> list[Path]:
    """Rename the checkpoints of `output_dir` newer than the step a run resumes from to `abandoned_step_N`
    (kept, never `latest`, never pruned): they belong to the timeline the resumed run replaces."""
    moved = []
    for path in completed_checkpoints(output_dir):
        if checkpoint_step(path) > resumed_step:
            target = path.with_name(f"{ABANDONED_PREFIX}{path.name}")
            if target.exists():
                target = path.with_name(f"{ABANDONED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}_{path.name}")
            path.rename(target)
            moved.append(target)
    if moved:
        logger.warning(
            "resuming at step %d: set aside %d later checkpoint(s) of the abandoned run as %s",
            resumed_step, len(moved), ", ".join(p.name for p in moved),
        )  # fmt: skip
    return moved


def run_outputs(output_dir: Path) -> list[Path]:
    """The entries of `output_dir` that a run writes (`RUN_OUTPUT_PATTERNS`)."""
    if not output_dir.is_dir():
        return []
    return sorted(
        entry
        for entry in output_dir.iterdir()
        if any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in RUN_OUTPUT_PATTERNS)
    )


def _json_field(path: Path, key: str) -> Any:
    try:
        return json.loads(path.read_text()).get(key)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None


def written_by_a_run(entry: Path) -> bool:
    """Whether a top-level entry whose name a run writes holds what a run wrote: a README.md, config.json,
    preprocessor_config.json or code file of the same name as ours but not ours (a project's own files,
    `--output_dir .` in a repository) is not, and must neither be deleted nor written over."""
    if entry.name == "config.json":
        return _json_field(entry, "model_type") == "deit_scm"
    if entry.name == "preprocessor_config.json":
        return _json_field(entry, "image_processor_type") == "CXRImageProcessor"
    if entry.name == "README.md":
        try:
            return MODEL_CARD_TITLE in entry.read_text(errors="replace")
        except OSError:
            return False
    if entry.suffix == ".py":  # the remote code saved beside a model of ours
        return written_by_a_run(entry.parent / "config.json")
    return True


def foreign_outputs(output_dir: Path) -> list[Path]:
    """Entries of `output_dir` a run would write over or delete that no run of ours wrote."""
    return [entry for entry in run_outputs(output_dir) if entry.is_file() and not written_by_a_run(entry)]


def _written_in_run_folder(child: Path) -> bool:
    """Whether an entry inside one of a run's folders is the run's (`RUN_FOLDER_PATTERNS`, else a plot, picture
    or table file), not a user's note kept there."""
    patterns = RUN_FOLDER_PATTERNS.get(child.parent.name)
    if patterns:
        return any(fnmatch.fnmatchcase(child.name, p) for p in patterns)
    return child.is_file() and child.suffix in RUN_FILE_SUFFIXES


def _remove_run_folder(folder: Path) -> list[Path]:
    """A run's folder emptied of what a run writes there; anything else (a user's notes) stays with the
    folder. Returns what was kept."""
    for child in folder.iterdir():
        if not _written_in_run_folder(child):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    kept = sorted(folder.iterdir())
    if not kept:
        folder.rmdir()
    return kept


LOCK_FILE = ".run.lock"


def acquire_output_lock(output_dir: Path) -> Path:
    """Mark `output_dir` as being written by this process, so that a second run started into it is refused
    (two runs at once would leave one's model beside the other's processor). The lock is a file created
    exclusively, holding the host and pid; one left by a process that no longer exists (kill -9) is taken over,
    so a killed run still resumes. Returns the lock's path, for `release_output_lock`."""
    lock = output_dir / LOCK_FILE
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _json_field(lock, "pid")
            host = _json_field(lock, "host")
            if host == socket.gethostname() and isinstance(holder, int) and not _process_alive(holder):
                lock.unlink(missing_ok=True)  # stale: its run died without releasing it
                continue
            refuse(f"--output_dir {output_dir} is being written by another run (pid {holder} on {host}); "
                   f"wait for it, or choose another folder (delete {lock} if that run is gone)")  # fmt: skip
        with os.fdopen(descriptor, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, handle)
        return lock
    refuse(f"--output_dir {output_dir}: could not take the run lock {lock}")


def release_output_lock(lock: Path) -> None:
    """Remove the lock if it is still this process's."""
    if _json_field(lock, "pid") == os.getpid():
        lock.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def clear_run_outputs(output_dir: Path, keep: list[Path]) -> list[Path]:
    """--overwrite_output_dir: set what an earlier run wrote in `output_dir` aside (`PREVIOUS_RUN_DIR`,
    nothing else is touched) until the new run completes (`discard_previous_run`): a finished result is never
    destroyed before its replacement is complete; a replacement that fails or is killed leaves it there. Refuses
    (one line, nothing moved) when a path the new run reads (`keep`: the model to fine-tune, backbone
    weights, files to predict, data, cache) is `output_dir` itself or lies inside an entry to remove."""
    entries = run_outputs(output_dir)
    root = output_dir.resolve()
    for path in keep:
        resolved = Path(path).resolve()
        inside = [entry for entry in entries if resolved == entry.resolve() or entry.resolve() in resolved.parents]
        if resolved == root or inside:
            where = inside[0] if inside else output_dir
            refuse(
                f"--overwrite_output_dir would delete {where}, which holds {path} that this run reads; "
                "nothing was deleted: choose another --output_dir"
            )
    foreign = foreign_outputs(output_dir)
    if foreign:
        refuse(
            f"--overwrite_output_dir would delete {', '.join(str(p) for p in foreign)}, which no run wrote; "
            "nothing was deleted: choose another --output_dir"
        )
    previous = output_dir / PREVIOUS_RUN_DIR
    if previous.exists():
        # An earlier replacement never completed: what is here is that unfinished run; the finished one stays
        # set aside until this replacement completes.
        _delete_entries(entries)
        logger.info("--overwrite_output_dir: removed an unfinished run's %s; the finished run stays in %s",
                    ", ".join(e.name for e in entries) or "nothing", previous)  # fmt: skip
        return entries
    kept: list[Path] = []
    for entry in entries:
        kept += _move_run_entry(entry, previous / entry.name)
    if kept:
        logger.warning("--overwrite_output_dir kept what no run wrote: %s", ", ".join(map(str, kept)))
    if entries:
        logger.info("--overwrite_output_dir: the finished run's %s set aside in %s until this run completes",
                    ", ".join(e.name for e in entries), previous)  # fmt: skip
    return entries


def discard_previous_run(output_dir: Path) -> None:
    """The replacement is complete: the run set aside by --overwrite_output_dir goes."""
    previous = output_dir / PREVIOUS_RUN_DIR
    if previous.is_dir():
        shutil.rmtree(previous)
        logger.info("--overwrite_output_dir: the replaced run in %s removed", previous)


def _delete_entries(entries: list[Path]) -> list[Path]:
    kept: list[Path] = []
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            kept += _remove_run_folder(entry)
        else:
            entry.unlink()
    return kept


def _move_run_entry(entry: Path, target: Path) -> list[Path]:
    """Move what a run wrote at `entry` to `target` (a rename: no space needed); inside a run's folder only
    the run's files move, a user's stay where they are. Returns what stayed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not entry.is_dir() or entry.is_symlink():
        os.replace(entry, target)
        return []
    target.mkdir(exist_ok=True)
    for child in entry.iterdir():
        if _written_in_run_folder(child):
            os.replace(child, target / child.name)
    kept = sorted(entry.iterdir())
    if not kept:
        entry.rmdir()
    return kept


def load_checkpoint(
    accelerator: Any, checkpoint: Path, flags: dict[str, Any]
) -> tuple[TrainState, Optional[dict[str, torch.Tensor]]]:
    """What `save_checkpoint` wrote: Accelerate's state restored into `accelerator`, the run's `TrainState`,
    and the best-epoch weights (present when early stopping is on, else None). The recorded settings are
    checked against `flags` (the current run's) first: a changed model shape is refused in one line, not
    by a size mismatch deep in `load_state`."""
    state = TrainState(**json.loads((checkpoint / "train_state.json").read_text()))
    check_resumed_settings(state.settings, flags, checkpoint)
    accelerator.load_state(str(checkpoint))
    best = checkpoint / BEST_WEIGHTS_FILE
    if not best.is_file():
        return state, None
    from safetensors.torch import load_file

    return state, load_file(str(best))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` but the completion marker, by relative path."""
    return {
        str(path.relative_to(folder)): file_sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != COMPLETE_MARKER
    }


def checkpoint_damage(checkpoint: Path) -> Optional[str]:
    """None when every file of `checkpoint` matches the checksums its marker recorded, else what is wrong.
    Markers written before checksums existed ("ok") cannot be verified and are accepted."""
    try:
        recorded = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        marker = checkpoint / COMPLETE_MARKER
        legacy = marker.is_file() and marker.read_bytes().strip() == b"ok"
        return None if legacy else f"{marker} is unreadable"
    if not isinstance(recorded, dict):
        return f"{checkpoint / COMPLETE_MARKER} is not a checksum list"
    for name, expected in recorded.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if file_sha256(path) != expected:
            return f"{path} does not match its recorded SHA-256 (flipped or truncated bytes)"
    return None


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def holds_finished_run(output_dir: Path) -> bool:
    """Whether `output_dir` holds a saved model or results of an earlier run."""
    return any((output_dir / name).exists() for name in ("all_results.json", "model.safetensors", "config.json"))


def resolve_checkpoint(resume_from_checkpoint: Optional[str], output_dir: Path) -> Optional[Path]:
    """The checkpoint to resume: None for a fresh start; for "latest", the newest undamaged one in
    `output_dir` (falling back past damaged ones with a line saying so); else the named one, refused in one
    line when incomplete or damaged."""
    if not resume_from_checkpoint:
        return None
    output_dir = Path(output_dir)
    if resume_from_checkpoint == "latest":
        done = completed_checkpoints(output_dir)
        if not done:
            if holds_finished_run(output_dir):
                refuse(
                    f"--resume_from_checkpoint latest: {output_dir} holds a finished run and no checkpoint to resume; "
                    "training would start over it (use --overwrite_output_dir to replace it, or another --output_dir)"
                )
            logger.warning("no complete checkpoint in %s; starting from scratch", output_dir)
            return None
        for candidate in reversed(done):
            damage = checkpoint_damage(candidate)
            if damage is None:
                return candidate
            logger.warning("checkpoint %s is damaged (%s); falling back to the one before it", candidate.name, damage)
        refuse(f"every checkpoint in {output_dir / 'checkpoints'} is damaged; nothing to resume from")
    path = Path(resume_from_checkpoint)
    if not (path / COMPLETE_MARKER).is_file():
        refuse(f"{path} is not a complete checkpoint")
    damage = checkpoint_damage(path)
    if damage is not None:
        refuse(f"checkpoint {path} is damaged: {damage}; resume from another one (or 'latest')")
    return path


def load_model_folder(source: str, model_class: Any, overrides: dict[str, Any]) -> Any:
    """`--model_name_or_path`, safetensors only, loaded whole or refused in one line naming the folder and the
    problem: a pickle-only folder, an unreadable config or weights file, weights of another shape, or weights
    that leave parameters at their random initialisation (a missing head or position embedding would
    predict without a word)."""
    folder = Path(source)
    if folder.is_dir() and not (folder / "model.safetensors").is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        refuse(
            f"--model_name_or_path {folder} has no model.safetensors"
            + (f" (only {', '.join(pickles)}: pickle files are never loaded)" if pickles else "")
        )
    if folder.is_dir() and not (folder / "config.json").is_file():
        refuse(f"--model_name_or_path {folder} has no config.json")
    try:
        model, info = model_class.from_pretrained(
            source, use_safetensors=True, output_loading_info=True, **overrides
        )
    except Exception as error:  # transformers, safetensors and JSON errors alike: the user's folder is wrong
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        refuse(f"--model_name_or_path {source} cannot be loaded: {type(error).__name__}: {first_line}")
    # The model's own check of its loading report. With --config_overrides the user changed the architecture
    # on purpose, and the weights it leaves unused are theirs to drop.
    try:
        check_loading_report(info, source, unused_allowed=bool(overrides))
    except ValueError as error:
        refuse(f"--model_name_or_path {error}")
    return model

