"""Training for `run_wsol.py`: the optimizer, the schedule (with the SCM switch-on re-warm), the epoch loop
with validation, checkpoints and early stopping, and resuming. Everything here takes `TrainingSettings`,
the training flags resolved once (recipe applied) by `run_wsol.py`."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from deit_scm_cxr.data.prepare import PixelNormalizer, PreparedSplit, augment_batch, make_loader
from deit_scm_cxr.evaluation.evaluator import EvaluationSettings, validation_metrics
from deit_scm_cxr.training.checkpoints import (
    TrainState,
    load_checkpoint,
    resolve_checkpoint,
    run_settings,
    save_checkpoint,
    set_aside_later_checkpoints,
)

logger = logging.getLogger("run_wsol")


@dataclass(frozen=True, kw_only=True)
class TrainingSettings:
    """The training flags of `run_wsol.py`, resolved (the recipe's values filled in)."""

    learning_rate: float
    scm_learning_rate: float
    weight_decay: float
    per_device_train_batch_size: int
    num_train_epochs: int
    max_train_steps: Optional[int]  # overrides the epochs
    gradient_accumulation_steps: int
    lr_scheduler_type: str  # a transformers scheduler name, or "step"
    lr_step_epochs: tuple[int, ...]  # the "step" schedule's x0.1 epochs
    num_warmup_steps: int
    scm_warmup_epochs: Optional[int]  # epochs before the SCM blocks run; None: the recipe's share
    scm_warmup_fraction: float  # the recipe's share of epochs before the SCM blocks run
    max_grad_norm: Optional[float]  # 0 or None: no clipping
    augment: bool
    torch_compile: bool
    metric_for_best_model: str
    early_stopping_patience: Optional[int]  # 0 or None: off
    checkpointing_steps: Optional[str]  # N steps, "epoch", or None
    checkpoints_total_limit: int  # 0 = all
    num_workers: int
    seed: int


def build_optimizer(settings: TrainingSettings, model: Any) -> torch.optim.Optimizer:
    groups = model.parameter_groups(settings.learning_rate, settings.scm_learning_rate, settings.weight_decay)
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups])




@dataclass
class Components:
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    normalizer: PixelNormalizer
    steps_per_epoch: int
    max_steps: int
    scm_warmup_epochs: int  # epochs before the SCM blocks run; the schedule re-warms at that epoch
    # The best epoch's weights (CPU), which early stopping restores at the end; every checkpoint carries
    # them, so a resumed run restores the same ones.
    best_weights: Optional[dict[str, torch.Tensor]] = None


def build_components(
    settings: TrainingSettings, accelerator: Any, model: Any, train_split: PreparedSplit, normalizer: PixelNormalizer
) -> Components:
    from transformers import get_scheduler

    batch, accumulation = settings.per_device_train_batch_size, settings.gradient_accumulation_steps
    loader = make_loader(train_split, batch, shuffle=True, num_workers=settings.num_workers)
    optimizer = build_optimizer(settings, model)
    updates_per_epoch = math.ceil(len(loader) / max(accelerator.num_processes, 1) / accumulation)
    max_steps = settings.max_train_steps or settings.num_train_epochs * updates_per_epoch
    if settings.lr_scheduler_type == "step":
        # The official SCM schedule: x0.1 at each of --lr_step_epochs. Accelerate steps a prepared
        # scheduler once per process for every optimizer step.
        per_epoch = updates_per_epoch * accelerator.num_processes
        milestones = sorted(settings.lr_step_epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.1 ** sum(step // per_epoch >= m for m in milestones)
        )
    else:
        scheduler = get_scheduler(
            settings.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=settings.num_warmup_steps * accelerator.num_processes,
            num_training_steps=max_steps * accelerator.num_processes,
        )
    switch = scm_warmup_epochs(settings, math.ceil(max_steps / updates_per_epoch))
    if switch > 0:  # the SCM blocks switch on mid-training: re-warm from there
        rewarm_learning_rate(
            scheduler,
            switch * updates_per_epoch * accelerator.num_processes,
            updates_per_epoch * accelerator.num_processes,
        )
    if settings.torch_compile:
        model = torch.compile(model)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    normalizer = normalizer.to(accelerator.device)
    steps_per_epoch = math.ceil(len(loader) / settings.gradient_accumulation_steps)
    return Components(accelerator, model, optimizer, scheduler, loader, normalizer, steps_per_epoch, max_steps, switch)


def rewarm_learning_rate(scheduler: torch.optim.lr_scheduler.LambdaLR, start: int, length: int) -> None:
    """Multiply the schedule by a linear ramp from 0 over `length` scheduler steps from `start` on.

    When the SCM blocks switch on mid-training, the logits jump (S grows by up to (1 + F')^blocks where the
    diffused attention peaks) and the loss with them; AdamW's second moments still hold the small
    gradients of before and turn the new large ones into steps several times the learning rate, which
    threw one phantom run from validation macro F1 0.90 to 0.25 for the rest of training. The SCM phase
    therefore starts like a fine-tuning run: fresh AdamW moments (`train_one_epoch`) and this warmup.
    """

    def ramp(step: int) -> float:
        return 1.0 if step < start else min(1.0, (step - start + 1) / length)

    # ramp(0) = 1 (start > 0), so the learning rate the scheduler already set for step 0 stands.
    scheduler.lr_lambdas = [lambda step, f=f: f(step) * ramp(step) for f in scheduler.lr_lambdas]


def scm_warmup_epochs(settings: TrainingSettings, epochs: int) -> int:
    """The SCM paper trains from an ImageNet-pretrained DeiT, whose attention is meaningful from the first
    step. From scratch, diffusing random attention slows learning (on the phantoms: validation loss 0.84
    against 0.75 after 40 epochs), so the `scratch` recipe runs its first half without the blocks."""
    if settings.scm_warmup_epochs is not None:
        return settings.scm_warmup_epochs
    return int(epochs * settings.scm_warmup_fraction)


def train(
    settings: TrainingSettings,
    evaluation: EvaluationSettings,
    parts: Components,
    state: TrainState,
    validation: PreparedSplit,
    output_dir: Path,
) -> TrainState:
    """Epoch loop with per-epoch validation, checkpoints, early stopping; restores the best weights."""
    accelerator = parts.accelerator
    epochs = math.ceil(parts.max_steps / parts.steps_per_epoch)
    state.scm_warmup_epochs = parts.scm_warmup_epochs
    progress = tqdm(
        total=parts.max_steps, initial=state.global_step, desc="training", disable=not accelerator.is_local_main_process
    )
    # An epoch whose steps are done but whose validation is not (a run stopped after a step checkpoint)
    # is finished first: its history entry and the early-stopping decision must not be lost.
    while state.epoch < epochs and (state.global_step < parts.max_steps or state.step_in_epoch > 0):
        train_one_epoch(settings, parts, state, progress, output_dir)
        metrics = validation_metrics(evaluation, parts, validation)
        metrics.update(epoch=state.epoch, step=state.global_step)
        state.history.append(metrics)
        logger.info("epoch %d: %s", state.epoch, {k: round(v, 4) for k, v in metrics.items()})
        if accelerator.trackers:
            accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=state.global_step)
        best_by = settings.metric_for_best_model
        score = -metrics["loss"] if best_by == "loss" else metrics[best_by]
        if state.best_metric is None or score > state.best_metric:
            state.best_metric, state.best_epoch, state.epochs_without_improvement = score, state.epoch, 0
            if settings.early_stopping_patience:
                parts.best_weights = {
                    k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(parts.model).state_dict().items()
                }
        else:
            state.epochs_without_improvement += 1
        state.epoch += 1
        state.step_in_epoch = 0
        if settings.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, output_dir, state, parts.best_weights, settings.checkpoints_total_limit)
        if settings.early_stopping_patience and state.epochs_without_improvement >= settings.early_stopping_patience:
            logger.info("early stopping after epoch %d (best: epoch %d)", state.epoch - 1, state.best_epoch)
            break
    progress.close()
    if parts.best_weights is not None and settings.early_stopping_patience:
        accelerator.unwrap_model(parts.model).load_state_dict(parts.best_weights)
        logger.info("restored the best weights (epoch %d)", state.best_epoch)
    return state


def train_one_epoch(
    settings: TrainingSettings, parts: Components, state: TrainState, progress: Any, output_dir: Path
) -> None:
    accelerator, model = parts.accelerator, parts.model
    if state.global_step >= parts.max_steps:
        return
    model.train()
    loader = parts.train_loader
    loader.set_epoch(state.epoch)
    batches_done = state.step_in_epoch * settings.gradient_accumulation_steps
    if batches_done:
        loader = accelerator.skip_first_batches(loader, batches_done)
    if state.epoch == state.scm_warmup_epochs > 0 and state.step_in_epoch == 0:
        # The SCM phase starts with fresh AdamW moments (see `rewarm_learning_rate`).
        parts.optimizer.optimizer.state.clear()
    for pixels, labels, _ in loader:
        with accelerator.accumulate(model):
            # Every random draw of a step (augmentation, stochastic depth) derives from (seed, step,
            # process), so a resumed run repeats them exactly whatever else used the generator before.
            step_seed = settings.seed * 1_000_003 + state.global_step * 7919 + accelerator.process_index
            torch.manual_seed(step_seed)
            if settings.augment:
                pixels = augment_batch(pixels, torch.Generator().manual_seed(step_seed))
            run_scm = state.epoch >= state.scm_warmup_epochs
            loss = model(parts.normalizer(pixels), labels=labels, run_scm=run_scm).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and settings.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            parts.optimizer.step()
            parts.scheduler.step()
            parts.optimizer.zero_grad()
        if accelerator.sync_gradients:
            state.global_step += 1
            state.step_in_epoch += 1
            state.train_losses.append(float(accelerator.gather(loss.detach().reshape(1)).mean()))
            progress.update(1)
            progress.set_postfix(loss=f"{state.train_losses[-1]:.3f}")
            checkpoint_every = settings.checkpointing_steps
            if checkpoint_every and checkpoint_every.isdigit() and state.global_step % int(checkpoint_every) == 0:
                save_checkpoint(accelerator, output_dir, state, parts.best_weights, settings.checkpoints_total_limit)
            if state.global_step >= parts.max_steps:
                break


def resume_and_train(
    settings: TrainingSettings,
    evaluation: EvaluationSettings,
    parts: Components,
    validation: PreparedSplit,
    output_dir: Path,
    resume_from_checkpoint: Optional[str],
    flags: dict[str, Any],
) -> TrainState:
    """Train from scratch or from the checkpoint `resume_from_checkpoint` names (with its best weights);
    `flags` are the run's flags as given, which a checkpoint records and a resume must match."""
    state = TrainState()
    checkpoint = resolve_checkpoint(resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        state, parts.best_weights = load_checkpoint(parts.accelerator, checkpoint, flags)
        logger.info("resumed from %s at step %d", checkpoint, state.global_step)
        if parts.accelerator.is_main_process:
            set_aside_later_checkpoints(output_dir, state.global_step)
        parts.accelerator.wait_for_everyone()
    state.settings = run_settings(flags)
    return train(settings, evaluation, parts, state, validation, output_dir)
