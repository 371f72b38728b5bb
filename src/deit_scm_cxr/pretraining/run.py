"""Pretrain a DeiT backbone on radiographs that the fine-tuning never sees, and write it in timm's format.

SCM (Bai et al., ECCV 2022) diffuses the CLS token's attention F0 over the patch graph; it assumes F0 already
points at the object, as it does in an ImageNet-pretrained DeiT. No pretrained weights can be downloaded
here, so the project makes its own, the way chest X-ray models are usually made: pretraining on other
radiographs. Two objectives:

* `supervised`: multi-label binary cross-entropy from the CLS token over the finding types (the
  phantoms' 7; NIH's 14 labels), as DeiT itself and most CXR backbones are pretrained;
* `dino`: self-distillation without labels (Caron et al., *Emerging Properties in Self-Supervised Vision
  Transformers*, ICCV 2021): a student matches an EMA teacher's centred, sharpened output across
  global and local crops. Its CLS attention is known to segment objects on natural images.

The backbone is timm's own `VisionTransformer` (`timm.create_model(TIMM_ARCHITECTURE, **timm_kwargs)`),
saved as `model.safetensors` with `pretrain_config.json` holding those keyword arguments, so that fine-tuning
reads exactly what a user downloads from timm: `run_wsol.py --backbone_weights DIR --recipe cxr_finetune`.

    accelerate launch run_pretrain.py --objective supervised --output_dir outputs/pretrain-supervised
    accelerate launch run_pretrain.py --objective dino --output_dir outputs/pretrain-dino
    accelerate launch run_pretrain.py --dataset nih --data_dir /data/nih --image_size 224 --patch_size 16 \\
        --embed_dim 192 --depth 12 --num_heads 3 --output_dir outputs/pretrain-nih-tiny

A finished run is not repeated: when `output_dir` holds a checkpoint made with the same settings, the job
only reports it (so the main job can call it as a cached first step).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from deit_scm_cxr.data import load_dataset_module
from deit_scm_cxr.data.prepare import PixelNormalizer, PreparedSplit, augment_batch, prepare_split
from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor
from deit_scm_cxr.pretraining.objectives import DINOTrainer, SupervisedObjective

logger = logging.getLogger("run_pretrain")

TIMM_ARCHITECTURE = "vit_tiny_patch16_224"  # the family; every dimension is overridden by `timm_kwargs`
CHECKPOINT_FILE = "model.safetensors"
CONFIG_FILE = "pretrain_config.json"
RESULTS_FILE = "pretrain_results.json"
# Series of the pretraining phantoms. Their index range (cxr_phantoms.PRETRAIN_OFFSET) is one that no
# fine-tuning split uses in any series, so they are disjoint from the fine-tuning images whatever its seed.
PRETRAIN_SERIES = 1000


@dataclass
class PretrainArguments:
    """Flags of `run_pretrain.py` (parsed by `transformers.HfArgumentParser`)."""

    objective: str = field(default="supervised", metadata={"help": "supervised | dino"})
    dataset: str = field(default="phantoms", metadata={"help": "phantoms | nih"})
    data_dir: Optional[str] = field(default=None, metadata={"help": "NIH ChestX-ray14 folder (--dataset nih)"})
    num_images: int = field(default=4800, metadata={"help": "pretraining phantoms"})
    phantom_size: int = 256
    image_size: int = 96
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 2
    num_heads: int = 3
    mlp_ratio: float = 4.0
    num_train_epochs: int = 30
    per_device_train_batch_size: int = 64
    learning_rate: Optional[float] = field(
        default=None,
        metadata={"help": "peak learning rate; default 1e-3 (supervised), DINO's rule 5e-4 x batch / 256 (dino)"},
    )
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    held_out_fraction: float = field(default=0.1, metadata={"help": "share of images kept for validation"})
    attention_mil_weight: float = field(
        default=0.0,
        metadata={"help": "supervised: weight of the loss whose pooling weights are the last layer's CLS attention"},
    )
    patch_cam_weight: float = field(
        default=0.0,
        metadata={"help": "supervised: weight of the BCE of the head applied to every patch token, LSE-pooled"},
    )
    attention_guidance_weight: float = field(
        default=0.0,
        metadata={"help": "supervised: weight of the loss that draws every layer's CLS attention onto the "
                          "image's own class activation map (the positive findings' ReLU(CAM), detached)"},
    )
    patch_cam_lse_r: float = field(default=5.0, metadata={"help": "sharpness r of the patch-CAM LSE pooling"})
    dino_out_dim: int = 1024
    dino_local_crops: int = 4
    dino_teacher_temperature: float = 0.04
    dino_student_temperature: float = 0.1
    dino_teacher_momentum: float = 0.996
    seed: int = 0
    output_dir: str = "outputs/pretrain"
    cache_dir: Optional[str] = None
    overwrite: bool = field(default=False, metadata={"help": "retrain even when output_dir holds this run"})

    def __post_init__(self) -> None:
        if self.objective not in ("supervised", "dino"):
            raise ValueError(f"--objective must be supervised or dino, got {self.objective!r}")
        if self.dataset not in ("phantoms", "nih"):
            raise ValueError(f"--dataset must be phantoms or nih, got {self.dataset!r}")
        if self.dataset == "nih" and not self.data_dir:
            raise ValueError("--dataset nih needs --data_dir")
        if self.image_size % self.patch_size:
            raise ValueError(f"--image_size {self.image_size} is not a multiple of --patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"--embed_dim {self.embed_dim} is not a multiple of --num_heads {self.num_heads}")
        if min(self.attention_mil_weight, self.patch_cam_weight, self.attention_guidance_weight) < 0:
            raise ValueError("the loss weights must be >= 0")
        if self.objective == "dino" and (self.attention_mil_weight or self.patch_cam_weight
                                         or self.attention_guidance_weight):  # fmt: skip
            raise ValueError("the attention-MIL, patch-CAM and guidance losses need labels: --objective supervised")
        if not 0 < self.patch_cam_lse_r <= 1e3:
            raise ValueError(f"--patch_cam_lse_r must be in (0, 1000], got {self.patch_cam_lse_r}")
        if not 0 < self.held_out_fraction < 0.5:
            raise ValueError(f"--held_out_fraction must be in (0, 0.5), got {self.held_out_fraction}")
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Counts, sizes and rates a run cannot use: each one line naming the flag (a NaN rate would train a
        NaN model and save it with exit 0)."""
        minimums = {"num_images": 2, "phantom_size": 16, "image_size": 1, "patch_size": 1, "embed_dim": 1, "depth": 1,
                    "num_heads": 1, "num_train_epochs": 1, "per_device_train_batch_size": 1, "dino_out_dim": 1,
                    "warmup_epochs": 0, "dino_local_crops": 0}  # fmt: skip
        for name, low in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name} must be an integer >= {low}, got {value!r}")
        positive = ("mlp_ratio", "dino_teacher_temperature", "dino_student_temperature", "patch_cam_lse_r")
        for name in positive + (("learning_rate",) if self.learning_rate is not None else ()):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{name} must be a finite number > 0, got {value!r}")
        for name in ("weight_decay", "dino_teacher_momentum"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name} must be a finite number >= 0, got {value!r}")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"--output_dir {self.output_dir} is a file, not a folder")

    def peak_learning_rate(self) -> float:
        """The learning rate given, else the objective's default (DINO scales 5e-4 linearly with the batch,
        Caron et al. 2021; a rate 8x that at batch 64 collapsed DINO to a constant output here)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 5e-4 * self.per_device_train_batch_size / 256 if self.objective == "dino" else 1e-3

    def timm_kwargs(self, num_classes: int) -> dict[str, Any]:
        """What `timm.create_model(TIMM_ARCHITECTURE, **kwargs)` needs to rebuild the saved backbone."""
        return {
            "img_size": self.image_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "num_classes": num_classes,
            "global_pool": "token",
            "dynamic_img_size": self.objective == "dino",  # DINO's local crops are smaller than the global ones
        }

    def run_key(self) -> dict[str, Any]:
        """The settings that determine the checkpoint (everything but where it goes)."""
        return {k: v for k, v in asdict(self).items() if k not in ("output_dir", "cache_dir", "overwrite")}


def create_backbone(kwargs: dict[str, Any]) -> torch.nn.Module:
    import timm

    return timm.create_model(TIMM_ARCHITECTURE, pretrained=False, **kwargs)


def load_pretrained_backbone(directory: str | os.PathLike) -> torch.nn.Module:
    """The timm model a pretraining run wrote, rebuilt from its config and loaded with `strict=True`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    model = create_backbone(config["timm_kwargs"])
    model.load_state_dict(load_file(str(directory / CHECKPOINT_FILE)), strict=True)
    return model


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def load_pretraining_images(
    args: PretrainArguments, processor: CXRImageProcessor
) -> tuple[PreparedSplit, np.ndarray, list[str]]:
    """The pretraining images (uint8 at training resolution, from the shared cache) with their
    multi-hot finding targets and the finding names."""
    if args.dataset == "phantoms":
        module = load_dataset_module("phantoms")
        dataset = module.build_pretraining_dataset(args.num_images, size=args.phantom_size, seed=PRETRAIN_SERIES)
        names = list(module.PRETRAIN_FINDINGS)
    else:
        module = load_dataset_module("nih")
        dataset = module.build_pretraining_dataset(args.data_dir, seed=args.seed, report_dir=args.output_dir)
        names = list(module.NIH_FINDINGS)
    cache_dir = Path(args.cache_dir) if args.cache_dir else _default_cache_dir()
    split = prepare_split("pretrain", dataset, processor, None, cache_dir, 1, Path(args.output_dir))
    targets = np.zeros((len(split), len(names)), dtype=np.float32)
    for row, labels in enumerate(split.source["image_labels"]):
        for name in labels:
            targets[row, names.index(name)] = 1.0
    return split, targets, names


def _default_cache_dir() -> Path:
    import datasets as hf_datasets

    return Path(hf_datasets.config.HF_DATASETS_CACHE) / "deit_scm_preprocessed"


def held_out_mask(count: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded boolean mask of the images kept out of training (for the validation ROC-AUC)."""
    order = np.random.default_rng(seed).permutation(count)
    mask = np.zeros(count, dtype=bool)
    mask[order[: max(1, int(round(count * fraction)))]] = True
    return mask


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def cosine_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to zero: the learning-rate factor at `step`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _optimizer(module: torch.nn.Module, args: PretrainArguments) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        # No decay on biases, norms, position embeddings and the CLS token (DeiT's rule).
        (no_decay if parameter.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.peak_learning_rate())


@torch.no_grad()
def held_out_auc(backbone: torch.nn.Module, pixels: torch.Tensor, targets: np.ndarray, normalizer: PixelNormalizer,
                 names: Sequence[str], batch_size: int = 128) -> dict[str, float]:  # fmt: skip
    """Per-finding and mean one-vs-rest ROC-AUC of the supervised head on held-out images."""
    from sklearn.metrics import roc_auc_score

    backbone.eval()
    device = next(backbone.parameters()).device
    scores = torch.cat([
        torch.sigmoid(backbone(normalizer(pixels[i : i + batch_size].to(device)))).cpu()
        for i in range(0, len(pixels), batch_size)
    ]).numpy()  # fmt: skip
    per_finding = {
        name: float(roc_auc_score(targets[:, k], scores[:, k]))
        for k, name in enumerate(names)
        if 0 < targets[:, k].sum() < len(targets)
    }
    return {
        "mean_roc_auc": float(np.mean(list(per_finding.values()))),
        **{f"roc_auc_{k}": v for k, v in per_finding.items()},
    }


def build_trainer(args: PretrainArguments, num_names: int, num_train: int) -> torch.nn.Module:
    """The backbone inside its objective: DINO's student/teacher pair, or the supervised heads."""
    backbone = create_backbone(args.timm_kwargs(num_names if args.objective == "supervised" else 0))
    if args.objective == "dino":
        return DINOTrainer(
            backbone, args.embed_dim, args.dino_out_dim, args.image_size, args.patch_size, args.dino_local_crops,
            args.dino_student_temperature, args.dino_teacher_temperature,
        )  # fmt: skip
    guidance_warmup_steps = (args.num_train_epochs * num_train // args.per_device_train_batch_size) // 3
    return SupervisedObjective(
        backbone, args.attention_mil_weight, args.patch_cam_weight, args.attention_guidance_weight,
        args.patch_cam_lse_r, guidance_warmup_steps=guidance_warmup_steps,
    )  # fmt: skip


def pretraining_step(
    args: PretrainArguments,
    parts: tuple,
    images: torch.Tensor,
    targets: Optional[torch.Tensor],
    first_epoch: bool,
    progress: float,
) -> float:
    """One optimizer step; `parts` = (trainer, optimizer, accelerator, normalizer, generator), `progress` the
    fraction of training done (DINO's teacher momentum schedule). Returns the loss."""
    trainer, optimizer, accelerator, normalizer, generator = parts
    if args.objective == "dino":
        loss = accelerator.unwrap_model(trainer).loss(images, normalizer, generator)
    else:
        loss = trainer(normalizer(augment_batch(images, generator)), targets)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(trainer.parameters(), 3.0)
    if args.objective == "dino" and first_epoch:
        # DINO keeps the prototypes fixed in the first epoch (freeze_last_layer): it stabilizes the start.
        accelerator.unwrap_model(trainer).student_head.prototypes.zero_grad(set_to_none=True)
    optimizer.step()
    if args.objective == "dino":
        # Teacher momentum rises from its start to 1 on a cosine (DINO's schedule).
        momentum = 1 - (1 - args.dino_teacher_momentum) * (math.cos(math.pi * progress) + 1) / 2
        accelerator.unwrap_model(trainer).update_teacher(momentum)
    return loss.item()


def train(args: PretrainArguments, split: PreparedSplit, targets: np.ndarray, names: list[str],
          normalizer: PixelNormalizer, accelerator: Any) -> tuple[torch.nn.Module, dict[str, Any]]:  # fmt: skip
    """Train the backbone with the chosen objective; returns it (the teacher for DINO) and the history."""
    held_out = held_out_mask(len(split), args.held_out_fraction, args.seed)
    train_index = torch.from_numpy(np.flatnonzero(~held_out))
    pixels, target_tensor = split.pixels, torch.from_numpy(targets)
    trainer = build_trainer(args, len(names), len(train_index))
    optimizer = _optimizer(trainer, args)
    trainer, optimizer = accelerator.prepare(trainer, optimizer)
    normalizer = normalizer.to(accelerator.device)
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(train_index) / args.per_device_train_batch_size)
    total = steps_per_epoch * args.num_train_epochs
    warmup = steps_per_epoch * args.warmup_epochs
    history, step = [], 0
    progress = tqdm(total=total, desc=f"pretraining ({args.objective})", disable=not accelerator.is_local_main_process)
    for epoch in range(args.num_train_epochs):
        trainer.train()
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        losses = []
        for start in range(0, len(order), args.per_device_train_batch_size):
            batch = order[start : start + args.per_device_train_batch_size]
            images = pixels[batch].to(accelerator.device)
            for group in optimizer.param_groups:
                group["lr"] = args.peak_learning_rate() * cosine_factor(step, total, warmup)
            targets_batch = target_tensor[batch].to(images.device) if args.objective == "supervised" else None
            parts = (trainer, optimizer, accelerator, normalizer, generator)
            losses.append(pretraining_step(args, parts, images, targets_batch, epoch == 0, step / total))
            step += 1
            progress.update(1)
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
        if args.objective == "supervised":
            record.update(held_out_auc(accelerator.unwrap_model(trainer).backbone, pixels[torch.from_numpy(held_out)],
                                       targets[held_out], normalizer, names))  # fmt: skip
        history.append(record)
        logger.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in record.items() if k != "epoch"})
    progress.close()
    unwrapped = accelerator.unwrap_model(trainer)
    final = unwrapped.teacher if args.objective == "dino" else unwrapped.backbone
    return final.eval(), {"history": history, "held_out_images": int(held_out.sum())}


# --------------------------------------------------------------------------------------------------
# The premise of SCM: does the pretrained CLS attention already point at findings?
# --------------------------------------------------------------------------------------------------


def deit_scm_model(directory: str | os.PathLike, scm_variant: str):
    """A DeiT-SCM classifier whose backbone is the checkpoint in `directory`, read through the user path
    (`convert_deit_weights.load_backbone_weights`); its head is untrained."""
    from deit_scm_cxr.convert import load_backbone_weights
    from deit_scm_cxr.hub.configuration_deit_scm import DeiTSCMConfig
    from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification

    kwargs = json.loads(Path(directory, CONFIG_FILE).read_text())["timm_kwargs"]
    config = DeiTSCMConfig.from_preset(
        "deit-micro", scm_variant,
        hidden_size=kwargs["embed_dim"], num_hidden_layers=kwargs["depth"], num_attention_heads=kwargs["num_heads"],
        intermediate_size=int(kwargs["embed_dim"] * kwargs["mlp_ratio"]), patch_size=kwargs["patch_size"],
        image_size=kwargs["img_size"],
    )  # fmt: skip
    model = DeiTSCMForImageClassification(config)
    load_backbone_weights(model, Path(directory))
    return model.eval()


def phantom_validation_split(seed: int, image_size: int, num_phantoms: int = 1200, phantom_size: int = 256,
                             cache_dir: Optional[Path] = None) -> PreparedSplit:  # fmt: skip
    """The validation split `run_wsol.py --seed SEED` chooses its thresholds on (same count rule)."""
    module = load_dataset_module("phantoms")
    splits = module.build_phantom_dataset(
        num_train=0, num_validation=max(num_phantoms // 6, 12), num_test=0, size=phantom_size, seed=seed
    )
    processor = CXRImageProcessor(size={"height": image_size, "width": image_size})
    return prepare_split("validation", splits["validation"], processor, None, cache_dir or _default_cache_dir())


@torch.no_grad()
def score_attention(directory: str | os.PathLike, split: PreparedSplit, random_seeds: int = 5) -> dict[str, float]:
    """Validation MaxBoxAccV2 (best threshold on these boxes: nothing has been calibrated before fine-tuning)
    of the pretrained CLS attention F0, last layer (`cxr`) and summed over layers (`paper`), beside the
    random map's (mean over `random_seeds` draws)."""
    from deit_scm_cxr.data.prepare import EVALUATION_FRAME
    from deit_scm_cxr.evaluation.boxes import upsample_scoremap
    from deit_scm_cxr.evaluation.metrics import LocalizationScores

    boxed = [i for i, boxes in enumerate(split.frame_boxes) if len(boxes)]
    gt_boxes = [split.frame_boxes[i] for i in boxed]
    processor = CXRImageProcessor(size={"height": split.pixels.shape[1], "width": split.pixels.shape[2]})
    normalizer = PixelNormalizer(processor)
    pixels = normalizer(split.pixels[boxed])

    def v2(maps: np.ndarray) -> float:
        frames = [upsample_scoremap(m, EVALUATION_FRAME) for m in maps]
        return LocalizationScores.from_maps(frames, gt_boxes).oracle()["MaxBoxAccV2"]

    scores: dict[str, float] = {"boxed_images": float(len(boxed))}
    for variant, name in (("cxr", "F0_last_layer"), ("paper", "F0_all_layers")):
        model = deit_scm_model(directory, variant)
        attention = torch.cat([model(pixels[i : i + 64]).attention_maps for i in range(0, len(pixels), 64)])
        scores[name] = v2(attention.float().numpy())
    grid = tuple(attention.shape[1:])
    draws = [v2(np.random.default_rng(s).random((len(boxed), *grid)).astype(np.float32)) for s in range(random_seeds)]
    scores["random"], scores["random_std"] = float(np.mean(draws)), float(np.std(draws))
    for name in ("F0_last_layer", "F0_all_layers"):
        scores[f"{name}_vs_random"] = scores[name] / max(scores["random"], 1e-9)
    return scores


# --------------------------------------------------------------------------------------------------
# Saving and the cached run
# --------------------------------------------------------------------------------------------------


def finished_run(args: PretrainArguments, attention_check: bool = True) -> bool:
    """Whether `output_dir` already holds a whole run made with exactly these settings: its config, its
    results (with the attention check when one is due: a run killed after saving but before the check is not
    finished) and a checkpoint whose every weight has the shape these settings build."""
    output = Path(args.output_dir)
    config_path, results_path = output / CONFIG_FILE, output / RESULTS_FILE
    if args.overwrite or not all(p.is_file() for p in (config_path, results_path, output / CHECKPOINT_FILE)):
        return False
    try:
        config = json.loads(config_path.read_text())
        results = json.loads(results_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if config.get("run") != args.run_key():
        return False
    if attention_check and args.dataset == "phantoms" and "attention_check" not in results:
        return False
    return checkpoint_fits(output / CHECKPOINT_FILE, config.get("timm_kwargs", {}))


def checkpoint_fits(path: Path, timm_kwargs: dict[str, Any]) -> bool:
    """Whether the checkpoint holds exactly the weights, of the same shapes, as the backbone `timm_kwargs` build."""
    from safetensors import safe_open

    try:
        expected = {k: tuple(v.shape) for k, v in create_backbone(timm_kwargs).state_dict().items()}
        with safe_open(str(path), framework="pt") as handle:
            stored = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception:  # an unreadable file or unusable kwargs: not a run to reuse
        return False
    return stored == expected


def check_output_dir(args: PretrainArguments) -> None:
    """Refuse a folder holding files this job did not write: only a pretraining run of its own (its config
    file present) may be replaced, and only with --overwrite. A user's model or notes are never touched."""
    output = Path(args.output_dir)
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not (output / CONFIG_FILE).is_file():
        names = sorted(p.name for p in output.iterdir())[:4]
        raise ValueError(f"--output_dir {output} already holds files that are not a pretraining run ({', '.join(names)}"
                         "); choose an empty or new folder")  # fmt: skip
    if not args.overwrite:
        raise ValueError(f"--output_dir {output} holds a pretraining run with other settings (or an unfinished one); "
                         "pass --overwrite to replace it, or choose another folder")  # fmt: skip


def save_backbone(
    backbone: torch.nn.Module, args: PretrainArguments, names: list[str], results: dict[str, Any]
) -> None:
    """timm state dict (safetensors) + the kwargs that rebuild it; the config is written last, so a
    folder whose config matches always holds the whole checkpoint."""
    from safetensors.torch import save_file

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(output / (CHECKPOINT_FILE + ".tmp")), metadata={"format": "pt"})
    os.replace(output / (CHECKPOINT_FILE + ".tmp"), output / CHECKPOINT_FILE)
    (output / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    config = {
        "timm_architecture": TIMM_ARCHITECTURE,
        "timm_kwargs": args.timm_kwargs(len(names) if args.objective == "supervised" else 0),
        "label_names": names if args.objective == "supervised" else [],
        "objective": args.objective,
        "run": args.run_key(),
    }
    (output / (CONFIG_FILE + ".tmp")).write_text(json.dumps(config, indent=2))
    os.replace(output / (CONFIG_FILE + ".tmp"), output / CONFIG_FILE)


def pretrain(args: PretrainArguments, attention_check_seed: Optional[int] = 42) -> dict[str, Any]:
    """Run (or reuse) the pretraining of `args`; returns its results, with the attention check on the
    validation boxes of phantom series `attention_check_seed` when given (phantoms only)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if finished_run(args, attention_check=attention_check_seed is not None):
        logger.info("%s already holds this pretraining run; reusing it (--overwrite to retrain)", args.output_dir)
        return json.loads(Path(args.output_dir, RESULTS_FILE).read_text())
    check_output_dir(args)
    accelerator = Accelerator()
    set_seed(args.seed)
    processor = CXRImageProcessor(size={"height": args.image_size, "width": args.image_size})
    split, targets, names = load_pretraining_images(args, processor)
    logger.info("pretraining on %d images; %s", len(split), dict(zip(names, targets.sum(0).astype(int).tolist())))
    backbone, results = train(args, split, targets, names, PixelNormalizer(processor), accelerator)
    results["arguments"] = asdict(args)
    if accelerator.is_main_process:
        save_backbone(backbone, args, names, results)
        if args.dataset == "phantoms" and attention_check_seed is not None:
            validation = phantom_validation_split(attention_check_seed, args.image_size, phantom_size=args.phantom_size)
            results["attention_check"] = {"phantom_series": attention_check_seed,
                                          **score_attention(args.output_dir, validation)}  # fmt: skip
            logger.info("pretrained F0 on validation boxes: %s", results["attention_check"])
            Path(args.output_dir, RESULTS_FILE).write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    return results


def cli() -> None:
    """The console script (run_pretrain.py): `main`, with its return value kept from the exit status."""
    main()


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = HfArgumentParser(PretrainArguments)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
        if not finished_run(args):
            check_output_dir(args)
    except ValueError as error:
        sys.stderr.write(f"run_pretrain.py: error: {error}\n")
        raise SystemExit(2) from error
    return pretrain(args)


if __name__ == "__main__":
    cli()
