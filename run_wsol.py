"""Train, evaluate and predict with DeiT-SCM for weakly supervised localization on chest radiographs.

    accelerate launch run_wsol.py                         # the embedded phantom dataset, CPU-friendly defaults
    accelerate launch run_wsol.py --dataset nih --data_dir /data/nih --preset deit-small \
        --backbone_weights deit_small_patch16_224.pth --image_size 224
    python run_wsol.py --do_train false --do_eval false --model_name_or_path outputs/wsol \
        --predict_files patient.dcm other.png          # prediction only: JSON + overlays

Everything lands in `--output_dir`: the model and processor (remote code, safetensors) with a model card,
`all_results.json`, `metrics_plots/`, `heatmap_comparisons/`, `localization_samples/`, `checkpoints/`.
Classification is trained from image labels only; boxes are used for evaluation, with the heatmap
threshold calibrated on a validation split and the test-set oracle reported beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from configuration_deit_scm import BACKBONE_PRESETS, SCM_VARIANTS, DeiTSCMConfig
from cxr_data import CLASS_NAMES, load_dataset_module, patient_bucket
from image_processing_cxr import CXRImageProcessor, overlay_heatmap
from localization import (
    FINE_THRESHOLDS,
    EvaluationSplit,
    LocalizationScores,
    classification_metrics,
    cxr_protocol,
    localization_table,
    plot_localization_table,
    scoremap_to_boxes,
    upsample_scoremap,
)
from modeling_deit_scm import DeiTSCMForImageClassification, select_class_maps
from wsol_recipes import RECIPE_CHOICES, apply_recipe, resolve_recipe

logger = logging.getLogger("run_wsol")
CHECKPOINT_PREFIX = "step_"
COMPLETE_MARKER = "COMPLETE"
OVERLAY_SAMPLES = 8
# wsolevaluation resizes every image, map and box to 224 x 224: the WSOL metrics are computed in that frame
# whatever the model's input size, so they compare with published numbers.
EVALUATION_FRAME = (224, 224)


# ================================================================================================
# Arguments
# ================================================================================================


class OneLineArgumentParser(argparse.ArgumentParser):
    """Bad flags end with one line on stderr and exit code 2, not a usage block or a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def cli_error(message: str) -> NoReturn:
    """A mistake in what the user gave (flags, data folder): one line on stderr and exit status 2, as
    argparse does, instead of a traceback."""
    sys.stderr.write(f"run_wsol.py: error: {message}\n")
    raise SystemExit(2)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y"):
        return True
    if text.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="run_wsol.py", description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=("phantoms", "nih"), default="phantoms")
    data.add_argument("--data_dir", help="NIH ChestX-ray14 folder (images, Data_Entry_2017*.csv, BBox_List_2017.csv)")
    data.add_argument("--num_phantoms", type=_positive_int, default=1200, help="phantom training images")
    data.add_argument("--phantom_size", type=_positive_int, default=256)
    data.add_argument("--max_train_samples", type=_positive_int)
    data.add_argument("--max_eval_samples", type=_positive_int)
    data.add_argument("--view", choices=("all", "PA", "AP"), default="all")
    data.add_argument("--augment", type=_bool, default=True, help="random affine jitter of training images")
    data.add_argument("--cache_dir", help="preprocessed-array cache (default: HF_DATASETS_CACHE/deit_scm_preprocessed)")
    data.add_argument(
        "--preprocessing_num_workers",
        type=_positive_int,
        default=max(1, min(8, (os.cpu_count() or 1))),
        help="processes for the one-time preprocessing map",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="a saved DeiT-SCM folder or Hub id (instead of --preset)")
    model.add_argument("--preset", choices=sorted(BACKBONE_PRESETS), default="deit-micro")
    model.add_argument("--scm_variant", choices=sorted(SCM_VARIANTS), default="cxr")
    model.add_argument("--config_overrides", help='e.g. "hidden_size=64,num_hidden_layers=4"')
    model.add_argument("--backbone_weights", help="timm/transformers DeiT checkpoint, or timm:<name>")
    model.add_argument("--image_size", type=_positive_int, default=96)
    model.add_argument("--torch_compile", action="store_true")
    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="outputs/wsol")
    train.add_argument("--overwrite_output_dir", action="store_true")
    train.add_argument(
        "--recipe",
        choices=RECIPE_CHOICES,
        default="auto",
        help="defaults of the training flags below (wsol_recipes.py): scratch when nothing pretrained is loaded, "
        "else the SCM variant's (paper: the official SCM training; cxr: the chest X-ray fine-tuning)",
    )
    train.add_argument("--num_train_epochs", type=_positive_int)
    train.add_argument("--max_train_steps", type=_positive_int)
    train.add_argument("--per_device_train_batch_size", type=_positive_int)
    train.add_argument("--per_device_eval_batch_size", type=_positive_int, default=64)
    train.add_argument(
        "--learning_rate", type=float, help="backbone; SCM and head follow at the recipe's ratio unless given"
    )
    train.add_argument("--scm_learning_rate", type=float, help="SCM blocks and head")
    train.add_argument("--weight_decay", type=float)
    train.add_argument(
        "--lr_scheduler_type", help='a transformers scheduler name, or "step" (x0.1 at --lr_step_epochs)'
    )
    train.add_argument("--lr_step_epochs", type=int, nargs="*", default=[30], help='epochs of the "step" decay')
    train.add_argument("--num_warmup_steps", type=int)
    train.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    train.add_argument("--max_grad_norm", type=float, help="0 = no clipping")
    train.add_argument("--label_smoothing", type=float, help="defaults to the SCM variant's")
    train.add_argument(
        "--class_weights",
        help='"auto" (inverse train frequency), "none", "variant" (the SCM variant\'s NIH weights), or "w0,w1,w2"',
    )
    train.add_argument("--drop_path_rate", type=float)
    train.add_argument(
        "--scm_warmup_epochs",
        type=int,
        help="epochs trained without the SCM blocks first (logits from S0), so that attention means something "
        "before SCM diffuses it; default 0 with pretrained weights, half the epochs from scratch",
    )
    train.add_argument("--early_stopping_patience", type=int, help="epochs without improvement; 0 = off")
    train.add_argument(
        "--metric_for_best_model", default="macro_f1", choices=("macro_f1", "accuracy", "loss", "max_box_acc")
    )
    train.add_argument("--checkpointing_steps", help='N steps or "epoch"')
    train.add_argument("--resume_from_checkpoint", help='a checkpoint folder or "latest"')
    train.add_argument(
        "--checkpoints_total_limit", type=_positive_int, help="keep only the newest N checkpoints (default: all)"
    )
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    train.add_argument(
        "--cpu", action="store_true", help="train on CPU (automatic for multi-process runs without a GPU)"
    )
    train.add_argument("--report_to", default="none", help='"none", "all", or tracker names (tensorboard, wandb...)')
    train.add_argument("--num_workers", type=int, default=0)
    train.add_argument("--push_to_hub", action="store_true")
    train.add_argument("--hub_model_id")
    train.add_argument(
        "--hub_space_id", help="with --push_to_hub: also push the demo (demo/) as this Space and link it from the card"
    )
    actions = parser.add_argument_group("what to run")
    actions.add_argument("--do_train", type=_bool, default=True)
    actions.add_argument("--do_eval", type=_bool, default=True)
    actions.add_argument("--do_predict", type=_bool, default=None, help="default: when --predict_files are given")
    actions.add_argument("--predict_files", nargs="*", default=[], help="PNG/JPEG/DICOM files to predict")
    args = parser.parse_args(argv)
    apply_recipe(args)
    validate_args(args, parser)
    return args


PREDICT_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


def expand_predict_files(paths: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Files as given; a folder stands for its images (DICOM/PNG/JPEG/TIFF by suffix, sorted, not recursive)."""
    files: list[str] = []
    for path in paths:
        entry = Path(path)
        if entry.is_dir():
            found = sorted(str(p) for p in entry.iterdir() if p.is_file() and p.suffix.lower() in PREDICT_SUFFIXES)
            if not found:
                parser.error(f"--predict_files: the folder {path} holds no {'/'.join(PREDICT_SUFFIXES)} files")
            files += found
        elif entry.is_file():
            files.append(path)
        else:
            parser.error(f"--predict_files: {path} does not exist")
    return files


def validate_model_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The config the flags would build, trackers, workers and schedule milestones, checked before any
    data is built: a typo in --config_overrides or an image size the patch does not divide is one line."""
    from accelerate.utils import LoggerType

    overrides = parse_overrides(args.config_overrides)
    unknown = sorted(set(overrides) - set(DeiTSCMConfig().to_dict()))
    if unknown:
        parser.error(
            f"--config_overrides: unknown config field(s) {', '.join(unknown)} (see configuration_deit_scm.py)"
        )
    if not args.model_name_or_path:
        try:
            settings = {**resolve_recipe(args).config, "drop_path_rate": args.drop_path_rate, **overrides}
            if args.label_smoothing is not None:
                settings["label_smoothing"] = args.label_smoothing
            DeiTSCMConfig.from_preset(args.preset, args.scm_variant, image_size=args.image_size, **settings)
        except (ValueError, TypeError) as error:
            parser.error(f"these flags make an invalid model: {error}")
    trackers = {t.value for t in LoggerType} | {"none"}
    bad = [name for name in args.report_to.split(",") if name.strip() not in trackers]
    if bad:
        parser.error(f"--report_to: unknown tracker(s) {', '.join(bad)}; choose from {', '.join(sorted(trackers))}")
    for name in ("num_workers", "preprocessing_num_workers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be non-negative, got {getattr(args, name)}")
    if any(epoch < 0 for epoch in args.lr_step_epochs):
        parser.error(f"--lr_step_epochs must be non-negative epochs, got {args.lr_step_epochs}")


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Check what argparse cannot; every failure is one line (`parser.error`)."""
    if args.dataset == "nih":
        if not args.data_dir:
            parser.error("--dataset nih needs --data_dir")
        if not Path(args.data_dir).is_dir():
            parser.error(f"--data_dir {args.data_dir} is not a folder")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        if not Path(args.resume_from_checkpoint).is_dir():
            parser.error(f"--resume_from_checkpoint {args.resume_from_checkpoint} does not exist")
    if args.checkpointing_steps and args.checkpointing_steps != "epoch" and not args.checkpointing_steps.isdigit():
        parser.error(f'--checkpointing_steps must be a number or "epoch", got {args.checkpointing_steps}')
    if args.checkpointing_steps and args.checkpointing_steps.isdigit() and int(args.checkpointing_steps) <= 0:
        parser.error("--checkpointing_steps must be positive")
    if (
        args.model_name_or_path
        and not Path(args.model_name_or_path).exists()
        and os.environ.get("HF_HUB_OFFLINE") == "1"
    ):
        parser.error(f"--model_name_or_path {args.model_name_or_path} is not a folder and the hub is offline")
    args.predict_files = expand_predict_files(args.predict_files, parser)
    if args.do_predict is None:
        args.do_predict = bool(args.predict_files)
    if args.do_predict and not args.predict_files:
        parser.error("--do_predict needs --predict_files")
    if not args.do_train and (args.do_eval or args.do_predict) and not args.model_name_or_path:
        parser.error("evaluation or prediction without training needs --model_name_or_path")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    validate_model_flags(args, parser)
    for name in ("learning_rate", "scm_learning_rate"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{name} must be a positive number, got {value}")
    for name in ("weight_decay", "max_grad_norm", "drop_path_rate"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name} must be a non-negative number, got {value}")
    for name in ("num_warmup_steps", "early_stopping_patience"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be non-negative, got {getattr(args, name)}")
    if args.label_smoothing is not None and not 0 <= args.label_smoothing < 1:
        parser.error(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.class_weights not in ("auto", "none", "variant"):
        try:
            weights = [float(v) for v in args.class_weights.split(",")]
        except ValueError:
            parser.error(f"--class_weights: not numbers: {args.class_weights}")
        if len(weights) != len(CLASS_NAMES):
            parser.error(f"--class_weights needs {len(CLASS_NAMES)} comma-separated numbers, auto, none, or variant")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            parser.error(f"--class_weights must be finite, non-negative and not all zero, got {args.class_weights}")
    output = Path(args.output_dir)
    if (
        args.do_train
        and output.is_dir()
        and any(output.iterdir())
        and not (args.overwrite_output_dir or args.resume_from_checkpoint)
    ):
        has_model = (output / "config.json").exists() or (output / "checkpoints").exists()
        if has_model:
            parser.error(
                f"--output_dir {output} already holds a run; add --overwrite_output_dir or --resume_from_checkpoint"
            )


# ================================================================================================
# Data
# ================================================================================================


@dataclass
class PreparedSplit:
    """A split preprocessed once to uint8 at training resolution, with what evaluation needs."""

    name: str
    pixels: torch.Tensor  # (N, H, W) uint8: the processor's output before rescale/normalize
    labels: torch.Tensor  # (N,) int64
    frame_boxes: list[np.ndarray]  # ground-truth boxes in the evaluation frame, EVALUATION_FRAME (N x (K, 4))
    findings: list[list[str]]
    geometry: np.ndarray  # (N, 8), the processor's geometry rows
    image_ids: list[str]
    source: Any  # the datasets.Dataset, for decoding originals of a few samples

    def __len__(self) -> int:
        return len(self.labels)


def load_raw_splits(args: argparse.Namespace) -> dict[str, Any]:
    """The source splits: train / validation / test (classification) and, for localization,
    loc_validation (calibration of the heatmap threshold) and loc_test."""
    if args.dataset == "phantoms":
        phantoms = load_dataset_module("phantoms")
        count = args.num_phantoms
        splits = phantoms.build_phantom_dataset(
            num_train=count,
            num_validation=max(count // 6, 12),
            num_test=max(count // 4, 12),
            size=args.phantom_size,
            seed=args.seed,
        )
        splits = dict(splits)
        splits["loc_validation"], splits["loc_test"] = splits["validation"], splits["test"]
        return splits
    nih = load_dataset_module("nih")
    reports = Path(args.output_dir)
    try:
        splits = dict(
            nih.build_dataset_dict(args.data_dir, "three_class", report_dir=reports, view=args.view, seed=args.seed)
        )
        boxed = nih.build_dataset_dict(args.data_dir, "bbox", report_dir=reports)["test"]
    except nih.NIHMetadataError as error:
        cli_error(f"NIH metadata in {args.data_dir}: {error}")
    empty = [name for name, split in {**splits, "bbox": boxed}.items() if len(split) == 0]
    if empty:
        cli_error(
            f"no usable images for the {', '.join(empty)} split(s) in {args.data_dir} (looked for the metadata's PNG "
            "files in that folder and its subfolders, e.g. images_001/images/)"
        )
    # The box set is the localization data; half of its patients calibrate the threshold, half test it.
    halves = np.array([patient_bucket(pid, args.seed) < 0.5 for pid in boxed["patient_id"]])
    splits["loc_validation"] = boxed.select(np.flatnonzero(halves))
    splits["loc_test"] = boxed.select(np.flatnonzero(~halves))
    return splits


def frame_boxes(
    boxes: Sequence[Sequence[float]], geometry: Sequence[int], frame: Sequence[int] = EVALUATION_FRAME
) -> np.ndarray:
    """Boxes in original pixels -> the evaluation frame, truncated to integers as wsolevaluation's
    `resize_bbox` does it: `int(x * new_size / old_size)`, multiplication first.

    The frame is the model input (content scaled, then offset by the padding) stretched to `frame`. With
    a squashed resize (no padding) that is the reference's own formula, original -> frame in one step.
    """
    original_h, original_w, content_h, content_w, top, left, input_h, input_w = (int(v) for v in geometry[:8])
    frame_h, frame_w = int(frame[0]), int(frame[1])
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if (content_h, content_w, top, left) == (input_h, input_w, 0, 0):
        scaled = boxes * np.array([frame_w, frame_h] * 2) / np.array([original_w, original_h] * 2)
    else:
        inside = boxes * np.array([content_w, content_h] * 2) / np.array([original_w, original_h] * 2)
        inside = inside + np.array([left, top, left, top])
        scaled = inside * np.array([frame_w, frame_h] * 2) / np.array([input_w, input_h] * 2)
    return scaled.astype(np.int64)


def _digest(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def source_fingerprint(dataset: Any) -> str:
    """Identity of a split's content: its ids, labels and boxes, and the code that made it (phantom
    images are drawn by `cxr_phantoms.py`, so a change there must rebuild the cache)."""
    code = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "datasets").rglob("*.py")):
        code.update(path.read_bytes())
    # Columns are lazy in datasets >= 4 and their repr is truncated: materialize them.
    boxes = [[list(box) for box in image_boxes] for image_boxes in dataset["boxes"]]
    return _digest(list(dataset["image_id"]), list(dataset["label"]), boxes, code.hexdigest())


def cached_preprocess(
    dataset: Any, processor: CXRImageProcessor, cache_dir: Optional[Path], num_proc: int, name: str
) -> Any:
    """Map a split once through the processor into uint8 arrays at training resolution.

    The cache file is keyed by the source content and the processor's settings, so changing any
    setting (size, CLAHE, windowing...) rebuilds it and nothing else does. Training then reads arrays:
    no decoding and no CLAHE per step."""
    from datasets import Array2D, Features, List, Value
    from datasets import Image as ImageFeature

    # CACHE_VERSION: the cached columns' layout; a cache of another layout is never read back.
    settings = _digest(processor.to_dict(), CACHE_VERSION)
    fingerprint = f"{source_fingerprint(dataset)}-{settings}"
    height, width = processor.size["height"], processor.size["width"]
    features = Features(
        {
            "pixels": Array2D(shape=(height, width), dtype="uint8"),
            "geometry": List(Value("int64"), length=8),
            "error": Value("string"),
        }
    )

    def process(batch: dict[str, list]) -> dict[str, list]:
        pixels, geometry, errors = [], [], []
        for image, image_id in zip(batch["image"], batch["image_id"]):
            # Decoded here, not by `datasets`: a file that passed the readability check and then fails to
            # decode (a PNG with valid CRCs and a corrupt stream) is one problem image, not a dead run.
            try:
                gray, geo = processor.process_one(_decode(image, image_id), source=image_id)
                error = ""
            except Exception as failure:  # any decoder or processor failure is this image's problem
                gray, geo = np.zeros((height, width), np.uint8), [0] * 8
                error = f"{type(failure).__name__}: {failure}"[:500]
            pixels.append(gray)
            geometry.append(geo)
            errors.append(error)
        return {"pixels": pixels, "geometry": geometry, "error": errors}

    cache_file = str(cache_dir / f"{name}-{fingerprint}.arrow") if cache_dir else None
    if cache_dir:
        cache_dir.mkdir(parents=True, exist_ok=True)
    return dataset.cast_column("image", ImageFeature(decode=False)).map(
        process,
        batched=True,
        batch_size=32,
        num_proc=num_proc if num_proc > 1 and len(dataset) >= 64 else None,
        remove_columns=[c for c in dataset.column_names if c not in ("image_id",)],
        features=Features({"image_id": dataset.features["image_id"], **features}),
        cache_file_name=cache_file,
        load_from_cache_file=True,
        new_fingerprint=fingerprint,
        desc=f"preprocessing {name}",
    )


CACHE_VERSION = "pixels-geometry-error-v2"


def _decode(image: dict[str, Any], image_id: str) -> np.ndarray:
    """An undecoded `datasets` image ({"bytes", "path"}) -> array, with the file named on failure."""
    import io

    from PIL import Image

    source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    with Image.open(source) as opened:
        opened.load()
        return np.asarray(opened)


def prepare_split(
    name: str,
    dataset: Any,
    processor: CXRImageProcessor,
    limit: Optional[int],
    cache_dir: Optional[Path] = None,
    num_proc: int = 1,
    report_dir: Optional[Path] = None,
) -> PreparedSplit:
    """A split as uint8 tensors at training resolution (from the cache) with its labels and boxes.
    Images that fail to decode or preprocess are dropped, logged and listed in
    `report_dir/problem_images_<split>.csv`."""
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    processed = cached_preprocess(dataset, processor, cache_dir, num_proc, name)
    errors = processed["error"]
    failed = [i for i, error in enumerate(errors) if error]
    if failed:
        problems = [(processed[i]["image_id"], errors[i]) for i in failed]
        where = "not written"
        if report_dir is not None:
            import pandas as pd

            report = Path(report_dir) / f"problem_images_{name}.csv"
            report.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(problems, columns=["image_id", "problem"]).to_csv(report, index=False)
            where = str(report)
        logger.warning("%s: dropped %d image(s) that could not be preprocessed, e.g. %s: %s; list: %s",
                       name, len(failed), problems[0][0], problems[0][1], where)  # fmt: skip
        if len(failed) == len(dataset):
            cli_error(f"no image of the {name} split could be read (first: {problems[0]})")
        keep = [i for i in range(len(dataset)) if not errors[i]]
        dataset, processed = dataset.select(keep), processed.select(keep)
    pixels = torch.from_numpy(_uint8_pixels(processed))
    geometry = np.asarray(processed.with_format("numpy")["geometry"], dtype=np.int64)
    return PreparedSplit(
        name=name,
        pixels=pixels,
        labels=torch.tensor(dataset["label"], dtype=torch.long),
        frame_boxes=[frame_boxes(b, g) for b, g in zip(dataset["boxes"], geometry)],
        findings=[list(f) for f in dataset["findings"]],
        geometry=geometry,
        image_ids=list(dataset["image_id"]),
        source=dataset,
    )


def _uint8_pixels(processed: Any) -> np.ndarray:
    """The `pixels` column as one (N, H, W) uint8 array, read from Arrow's buffers. The numpy formatter
    of `datasets` returns int64 here: 8x the memory (37 GB instead of 4.7 GB for NIH at 224x224)."""
    column = processed.with_format("arrow")["pixels"].combine_chunks()  # follows a selection's indices
    storage = getattr(column, "storage", column)
    flat = storage.flatten().flatten().to_numpy(zero_copy_only=False)
    height, width = processed.features["pixels"].shape
    # A copy: the Arrow buffers are read-only (often a memory-mapped cache file); training wants RAM.
    return np.array(flat.reshape(len(processed), height, width), dtype=np.uint8, copy=True)


class PixelNormalizer(torch.nn.Module):
    """uint8 (B, H, W) -> normalized float (B, C, H, W), the processor's rescale and normalize, on
    whatever device the batch is on."""

    def __init__(self, processor: CXRImageProcessor) -> None:
        super().__init__()
        channels = processor.num_channels
        mean = processor.image_mean[:channels] if processor.do_normalize else [0.0] * channels
        std = processor.image_std[:channels] if processor.do_normalize else [1.0] * channels
        scale = processor.rescale_factor if processor.do_rescale else 1.0
        self.register_buffer("scale", torch.tensor(scale / np.asarray(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer(
            "shift", torch.tensor(np.asarray(mean) / np.asarray(std), dtype=torch.float32).view(1, -1, 1, 1)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.unsqueeze(1).float() * self.scale - self.shift


def augment_batch(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random affine jitter (rotation +-7 deg, scale 0.9-1.1, shift +-6%) of uint8 images, as
    one batched resampling; no flips (the heart's side is anatomy, not noise)."""
    batch = pixels.shape[0]
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(7)
    scale = 0.9 + torch.rand(batch, generator=generator) * 0.2
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * 0.06
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    theta = theta.to(pixels.device)
    grid = F.affine_grid(theta, (batch, 1, *pixels.shape[-2:]), align_corners=False)
    moved = F.grid_sample(
        pixels.unsqueeze(1).float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return moved.squeeze(1).round().clamp(0, 255).to(torch.uint8)


def make_loader(split: PreparedSplit, batch_size: int, shuffle: bool, num_workers: int) -> torch.utils.data.DataLoader:
    """Batches of the in-memory uint8 arrays. Workers are off by default: there is nothing to decode,
    and process hand-off would cost more than the indexing; pinned memory speeds the copy to a GPU."""
    indices = torch.arange(len(split))
    dataset = torch.utils.data.TensorDataset(split.pixels, split.labels, indices)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        drop_last=False,
    )


# ================================================================================================
# Model, optimizer
# ================================================================================================


def parse_overrides(text: Optional[str]) -> dict[str, Any]:
    """ "a=1,b=0.5,c=last" -> {"a": 1, "b": 0.5, "c": "last"}."""
    overrides: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()
    return overrides


def class_weights_from(
    args: argparse.Namespace, labels: torch.Tensor, default: Optional[list[float]]
) -> Optional[list[float]]:
    if args.class_weights == "variant":
        return default
    if args.class_weights == "none":
        return None
    if args.class_weights == "auto":
        return class_weights_from_counts(labels)
    return [float(v) for v in args.class_weights.split(",")]


def class_weights_from_counts(labels: torch.Tensor) -> list[float]:
    """Inverse class frequency, normalized to sum to 1 (the form of the project's NIH weights)."""
    counts = torch.bincount(labels, minlength=len(CLASS_NAMES)).double().clamp_min(1)
    inverse = 1.0 / counts
    return [round(float(w), 4) for w in inverse / inverse.sum()]


def build_model(args: argparse.Namespace, train_labels: torch.Tensor) -> DeiTSCMForImageClassification:
    overrides = parse_overrides(args.config_overrides)
    if args.model_name_or_path:
        # safetensors only: a model folder never needs pickle (a pytorch_model.bin alone is refused).
        model = DeiTSCMForImageClassification.from_pretrained(
            args.model_name_or_path, use_safetensors=True, **overrides
        )
    else:
        variant = SCM_VARIANTS[args.scm_variant]
        config = DeiTSCMConfig.from_preset(
            args.preset,
            args.scm_variant,
            image_size=args.image_size,
            drop_path_rate=args.drop_path_rate,
            class_weights=class_weights_from(args, train_labels, variant["class_weights"]),
            label_smoothing=variant["label_smoothing"] if args.label_smoothing is None else args.label_smoothing,
            **{**resolve_recipe(args).config, **overrides},
        )
        model = DeiTSCMForImageClassification(config)
    if args.backbone_weights:
        from convert_deit_weights import load_backbone_weights

        report = load_backbone_weights(model, args.backbone_weights)
        logger.info(
            "backbone weights: %d missing, %d unused keys", len(report.missing_keys), len(report.unexpected_keys)
        )
    return model


def build_optimizer(args: argparse.Namespace, model: DeiTSCMForImageClassification) -> torch.optim.Optimizer:
    groups = model.parameter_groups(args.learning_rate, args.scm_learning_rate, args.weight_decay)
    return torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups])


# ================================================================================================
# Checkpoints
# ================================================================================================


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


BEST_WEIGHTS_FILE = "best_model.safetensors"


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


def load_best_weights(checkpoint: Path) -> Optional[dict[str, torch.Tensor]]:
    """The best-epoch weights a checkpoint carries (written when early stopping is on), else None."""
    path = checkpoint / BEST_WEIGHTS_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


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


# ================================================================================================
# Training
# ================================================================================================


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


def build_components(args, accelerator, model, train_split: PreparedSplit, normalizer: PixelNormalizer) -> Components:
    from transformers import get_scheduler

    loader = make_loader(train_split, args.per_device_train_batch_size, shuffle=True, num_workers=args.num_workers)
    optimizer = build_optimizer(args, model)
    updates_per_epoch = math.ceil(len(loader) / max(accelerator.num_processes, 1) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    if args.lr_scheduler_type == "step":
        # The official SCM schedule: x0.1 at each of --lr_step_epochs. Accelerate steps a prepared
        # scheduler once per process for every optimizer step.
        per_epoch = updates_per_epoch * accelerator.num_processes
        milestones = sorted(args.lr_step_epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.1 ** sum(step // per_epoch >= m for m in milestones)
        )
    else:
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
            num_training_steps=max_steps * accelerator.num_processes,
        )
    switch = scm_warmup_epochs(args, math.ceil(max_steps / updates_per_epoch))
    if switch > 0:  # the SCM blocks switch on mid-training: re-warm from there
        rewarm_learning_rate(
            scheduler,
            switch * updates_per_epoch * accelerator.num_processes,
            updates_per_epoch * accelerator.num_processes,
        )
    if args.torch_compile:
        model = torch.compile(model)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    normalizer = normalizer.to(accelerator.device)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
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


def scm_warmup_epochs(args: argparse.Namespace, epochs: int) -> int:
    """The SCM paper trains from an ImageNet-pretrained DeiT, whose attention is meaningful from the first
    step. From scratch, diffusing random attention slows learning (on the phantoms: validation loss 0.84
    against 0.75 after 40 epochs), so the `scratch` recipe runs its first half without the blocks."""
    if args.scm_warmup_epochs is not None:
        return args.scm_warmup_epochs
    return int(epochs * resolve_recipe(args).scm_warmup_fraction)


def train(args, parts: Components, state: TrainState, validation: PreparedSplit, output_dir: Path) -> TrainState:
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
        train_one_epoch(args, parts, state, progress, output_dir)
        metrics = validation_metrics(args, parts, validation)
        metrics.update(epoch=state.epoch, step=state.global_step)
        state.history.append(metrics)
        logger.info("epoch %d: %s", state.epoch, {k: round(v, 4) for k, v in metrics.items()})
        if accelerator.trackers:
            accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=state.global_step)
        score = -metrics["loss"] if args.metric_for_best_model == "loss" else metrics[args.metric_for_best_model]
        if state.best_metric is None or score > state.best_metric:
            state.best_metric, state.best_epoch, state.epochs_without_improvement = score, state.epoch, 0
            if args.early_stopping_patience:
                parts.best_weights = {
                    k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(parts.model).state_dict().items()
                }
        else:
            state.epochs_without_improvement += 1
        state.epoch += 1
        state.step_in_epoch = 0
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, output_dir, state, parts.best_weights, args.checkpoints_total_limit)
        if args.early_stopping_patience and state.epochs_without_improvement >= args.early_stopping_patience:
            logger.info("early stopping after epoch %d (best: epoch %d)", state.epoch - 1, state.best_epoch)
            break
    progress.close()
    if parts.best_weights is not None and args.early_stopping_patience:
        accelerator.unwrap_model(parts.model).load_state_dict(parts.best_weights)
        logger.info("restored the best weights (epoch %d)", state.best_epoch)
    return state


def train_one_epoch(args, parts: Components, state: TrainState, progress: Any, output_dir: Path) -> None:
    accelerator, model = parts.accelerator, parts.model
    if state.global_step >= parts.max_steps:
        return
    model.train()
    loader = parts.train_loader
    loader.set_epoch(state.epoch)
    batches_done = state.step_in_epoch * args.gradient_accumulation_steps
    if batches_done:
        loader = accelerator.skip_first_batches(loader, batches_done)
    if state.epoch == state.scm_warmup_epochs > 0 and state.step_in_epoch == 0:
        # The SCM phase starts with fresh AdamW moments (see `rewarm_learning_rate`).
        parts.optimizer.optimizer.state.clear()
    for pixels, labels, _ in loader:
        with accelerator.accumulate(model):
            # Every random draw of a step (augmentation, stochastic depth) derives from (seed, step,
            # process), so a resumed run repeats them exactly whatever else used the generator before.
            step_seed = args.seed * 1_000_003 + state.global_step * 7919 + accelerator.process_index
            torch.manual_seed(step_seed)
            if args.augment:
                pixels = augment_batch(pixels, torch.Generator().manual_seed(step_seed))
            run_scm = state.epoch >= state.scm_warmup_epochs
            loss = model(parts.normalizer(pixels), labels=labels, run_scm=run_scm).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            parts.optimizer.step()
            parts.scheduler.step()
            parts.optimizer.zero_grad()
        if accelerator.sync_gradients:
            state.global_step += 1
            state.step_in_epoch += 1
            state.train_losses.append(float(accelerator.gather(loss.detach().reshape(1)).mean()))
            progress.update(1)
            progress.set_postfix(loss=f"{state.train_losses[-1]:.3f}")
            checkpoint_every = args.checkpointing_steps
            if checkpoint_every and checkpoint_every.isdigit() and state.global_step % int(checkpoint_every) == 0:
                save_checkpoint(accelerator, output_dir, state, parts.best_weights, args.checkpoints_total_limit)
            if state.global_step >= parts.max_steps:
                break


# ================================================================================================
# Evaluation
# ================================================================================================


@dataclass
class Predictions:
    """Everything the evaluation needs from one pass over a split, gathered over processes."""

    logits: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,)
    indices: np.ndarray  # (N,) positions in the split
    attention: np.ndarray  # (N, h, w) F0
    semantic: np.ndarray  # (N, h, w) S0 of the ground-truth class
    scm: np.ndarray  # (N, h, w) F0 * S0 of the ground-truth class
    loss: float


@torch.no_grad()
def predict_split(args, parts: Components, split: PreparedSplit) -> Predictions:
    accelerator = parts.accelerator
    loader = accelerator.prepare(
        make_loader(split, args.per_device_eval_batch_size, shuffle=False, num_workers=args.num_workers)
    )
    model = parts.model
    model.eval()
    collected: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("logits", "labels", "indices", "attention", "semantic", "scm", "loss")
    }
    for pixels, labels, indices in tqdm(
        loader, desc=f"evaluating {split.name}", disable=not accelerator.is_local_main_process, leave=False
    ):
        outputs = model(parts.normalizer(pixels), labels=labels)
        per_sample_loss = F.cross_entropy(outputs.logits.float(), labels, reduction="none")
        batch = {
            "logits": outputs.logits.float(),
            "labels": labels,
            "indices": indices,
            "attention": outputs.attention_maps.float(),
            "semantic": select_class_maps(outputs.semantic_maps.float(), labels=labels),
            "scm": select_class_maps(outputs.localization_maps.float(), labels=labels),
            "loss": per_sample_loss,
        }
        for key, value in accelerator.gather_for_metrics(batch).items():
            collected[key].append(value.cpu())
    merged = {k: torch.cat(v).numpy() for k, v in collected.items()}
    return Predictions(
        merged["logits"],
        merged["labels"],
        merged["indices"],
        merged["attention"],
        merged["semantic"],
        merged["scm"],
        float(merged["loss"].mean()),
    )


def evaluation_split(split: PreparedSplit, predictions: Predictions) -> EvaluationSplit:
    """The boxed images of a split, in the evaluation frame, for the localization harness."""
    keep = [i for i, index in enumerate(predictions.indices) if len(split.frame_boxes[index]) > 0]
    order = predictions.indices[keep]
    correct = predictions.logits[keep].argmax(1) == predictions.labels[keep]
    frame = EVALUATION_FRAME
    return EvaluationSplit(
        maps={
            "attention": predictions.attention[keep],
            "semantic": predictions.semantic[keep],
            "scm": predictions.scm[keep],
        },
        gt_boxes=[split.frame_boxes[i] for i in order],
        frame_size=frame,
        correct_class=correct,
        gt_findings=[split.findings[i] for i in order],
    )


def classification_scores(predictions: Predictions) -> dict[str, Any]:
    probabilities = torch.softmax(torch.from_numpy(predictions.logits), -1).numpy()
    return classification_metrics(predictions.labels, probabilities, CLASS_NAMES)


def validation_metrics(args, parts: Components, validation: PreparedSplit) -> dict[str, float]:
    predictions = predict_split(args, parts, validation)
    scores = classification_scores(predictions)
    metrics = {"loss": predictions.loss, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}
    boxed = evaluation_split(validation, predictions)
    if boxed.gt_boxes:
        maps = [upsample_scoremap(m, boxed.frame_size) for m in boxed.maps["scm"]]
        metrics["max_box_acc"] = LocalizationScores.from_maps(maps, boxed.gt_boxes).oracle()["MaxBoxAcc"]
    return metrics


def mean_prior_box(split: PreparedSplit) -> Optional[np.ndarray]:
    boxes = [b for b in split.frame_boxes if len(b)]
    return np.concatenate(boxes).mean(axis=0) if boxes else None


# The model's maps by their name in the results, and the output each one is.
MAP_OUTPUTS = {"scm": "localization_maps", "semantic": "semantic_maps", "attention": "attention_maps"}


def choose_localization_map(table: dict[str, dict]) -> str:
    """The map the released model localizes with: the best MaxBoxAccV2 on the validation boxes (at the
    thresholds calibrated there), F0*S0 -- the paper's -- on ties. Test never enters the choice."""
    scores = {name: table[name]["validation"]["MaxBoxAccV2"] for name in MAP_OUTPUTS if name in table}
    return max(scores, key=lambda name: (scores[name], name == "scm"))


def final_evaluation(
    args, parts: Components, splits: dict[str, PreparedSplit]
) -> tuple[dict[str, Any], dict[str, Predictions]]:
    """Classification on validation and test; localization (with baselines) on the box splits."""
    # A split serving twice (phantom validation = loc_validation) is predicted once.
    by_split: dict[int, Predictions] = {}
    predictions = {}
    for name in ("validation", "test", "loc_validation", "loc_test"):
        if id(splits[name]) not in by_split:
            by_split[id(splits[name])] = predict_split(args, parts, splits[name])
        predictions[name] = by_split[id(splits[name])]
    results: dict[str, Any] = {"classification": {}}
    for name in ("validation", "test"):
        results["classification"][name] = classification_scores(predictions[name])
        results["classification"][name]["loss"] = predictions[name].loss
        results["classification"][name]["num_samples"] = int(len(predictions[name].labels))
    val_boxed = evaluation_split(splits["loc_validation"], predictions["loc_validation"])
    test_boxed = evaluation_split(splits["loc_test"], predictions["loc_test"])
    prior = mean_prior_box(splits["train"]) if args.dataset == "phantoms" else mean_prior_box(splits["loc_validation"])
    table = localization_table(val_boxed, test_boxed, prior_box=prior, seed=args.seed, thresholds=FINE_THRESHOLDS)
    chosen = choose_localization_map(table)
    threshold = table[chosen]["calibrated_on_validation"]["threshold"]
    test_maps = [upsample_scoremap(m, test_boxed.frame_size) for m in test_boxed.maps[chosen]]
    predicted = [scoremap_to_boxes(m, threshold, multi_contour=True, normalized=True) for m in test_maps]
    results["localization"] = {
        "frame": list(test_boxed.frame_size),
        "images_validation": len(val_boxed.gt_boxes),
        "images_test": len(test_boxed.gt_boxes),
        "localization_map": chosen,
        "localization_map_output": MAP_OUTPUTS[chosen],
        "heatmap_threshold_from_validation": threshold,
        "threshold_step": float(FINE_THRESHOLDS[1] - FINE_THRESHOLDS[0]),
        "note": "calibrated_on_validation: thresholds chosen on the validation boxes, applied to test; "
        "test_oracle_max_over_thresholds: the best threshold on test itself, as WSOL papers report; "
        "maps and boxes in the 224x224 frame of wsolevaluation",
        "methods": table,
        "cxr_protocol_at_calibrated_threshold": cxr_protocol(predicted, test_boxed.gt_boxes, test_boxed.gt_findings),
    }
    return results, predictions


# ================================================================================================
# Outputs
# ================================================================================================


def write_plots(output_dir: Path, state: TrainState, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = output_dir / "metrics_plots"
    folder.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in state.history]
    curves = {
        "loss.png": ("loss", "validation loss"),
        "accuracy.png": ("accuracy", "validation accuracy"),
        "macro_f1.png": ("macro_f1", "validation macro F1"),
        "localization.png": ("max_box_acc", "validation MaxBoxAcc (SCM map, %)"),
    }
    for filename, (key, title) in curves.items():
        figure, axis = plt.subplots(figsize=(5, 3.2))
        if key == "loss" and state.train_losses:
            steps = np.arange(1, len(state.train_losses) + 1)
            axis.plot(
                steps / max(len(steps), 1) * max(len(epochs), 1) - 1,
                state.train_losses,
                alpha=0.4,
                label="train (per step)",
            )
        axis.plot(epochs, [h.get(key, np.nan) for h in state.history], marker="o", label=title)
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(folder / filename, dpi=110)
        plt.close(figure)
    matrix = np.asarray(results["classification"]["test"]["confusion_matrix"])
    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.imshow(matrix, cmap="Blues")
    for (row, col), value in np.ndenumerate(matrix):
        axis.text(col, row, str(value), ha="center", va="center")
    axis.set_xticks(range(len(CLASS_NAMES)), [n.replace("_", "\n") for n in CLASS_NAMES], fontsize=8)
    axis.set_yticks(range(len(CLASS_NAMES)), [n.replace("_", "\n") for n in CLASS_NAMES], fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title("test confusion matrix")
    figure.tight_layout()
    figure.savefig(folder / "confusion_matrix.png", dpi=110)
    plt.close(figure)
    plot_localization_table(results["localization"]["methods"], str(folder / "localization_baselines.png"))


def _save_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(rgb).save(path)


def write_overlays(
    output_dir: Path, split: PreparedSplit, predictions: Predictions, processor: CXRImageProcessor
) -> list[str]:
    """heatmap_comparisons/: the released map (the processor's `localization_map`), its predicted and the
    ground-truth boxes on the original image; localization_samples/: attention vs semantic vs SCM map,
    boxes on the released one. A fixed sample: the first boxed images."""
    comparisons, samples = output_dir / "heatmap_comparisons", output_dir / "localization_samples"
    comparisons.mkdir(parents=True, exist_ok=True)
    samples.mkdir(parents=True, exist_ok=True)
    position = {int(index): row for row, index in enumerate(predictions.indices)}
    chosen = [i for i in range(len(split)) if len(split.frame_boxes[i])][:OVERLAY_SAMPLES]
    written = []
    for index in chosen:
        row = position[index]
        image = np.asarray(split.source[index]["image"].convert("L"))
        geometry = split.geometry[index]
        original_boxes = np.asarray(split.source[index]["boxes"], dtype=np.float64).reshape(-1, 4)
        panels = {}
        for name in ("attention", "semantic", "scm"):
            heat = processor.heatmap_to_original(getattr(predictions, name)[row], geometry)
            released = MAP_OUTPUTS[name] == processor.localization_map
            boxes = scoremap_to_boxes(heat, processor.localization_threshold, normalized=True) if released else None
            panels[name] = overlay_heatmap(image, heat, boxes=boxes, gt_boxes=original_boxes)
        released_name = next(n for n, key in MAP_OUTPUTS.items() if key == processor.localization_map)
        name = f"{split.image_ids[index]}.png"
        _save_png(comparisons / name, panels[released_name])
        _save_png(samples / name, np.concatenate(list(panels.values()), axis=1))
        written.append(name)
    return written


def model_card(args: argparse.Namespace, results: dict[str, Any]) -> str:
    """A Hub model card: YAML metadata (model-index from the results) and a usage snippet."""
    test = results["classification"]["test"]
    released = results["localization"].get("localization_map", "scm")
    scm = results["localization"]["methods"][released]
    dataset_name = "CXR phantoms (synthetic)" if args.dataset == "phantoms" else "NIH ChestX-ray14"
    dataset_type = "cxr-phantoms" if args.dataset == "phantoms" else "nih-chestxray14"

    def metric(kind: str, value: float, name: str) -> str:
        return f"      - type: {kind}\n        value: {value:.4f}\n        name: {name}\n"

    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-classification",
        "license: apache-2.0",
        "tags:\n- medical\n- chest-x-ray\n- weakly-supervised-object-localization\n- deit\n- scm\n- custom_code",
        f"datasets:\n- {dataset_type}",
        "metrics:\n- accuracy\n- f1\n- roc_auc\n- maxboxacc",
        "model-index:",
        f"- name: deit-scm-{args.preset}-{args.scm_variant}",
        "  results:",
        "  - task:\n      type: image-classification\n      name: Three-class chest X-ray classification",
        f"    dataset:\n      name: {dataset_name}\n      type: {dataset_type}\n      split: test",
        "    metrics:",
        metric("accuracy", test["accuracy"], "Accuracy").rstrip("\n"),
        metric("f1", test["macro_f1"], "Macro F1").rstrip("\n"),
        metric("roc_auc", test["macro_roc_auc_ovr"], "Macro one-vs-rest ROC-AUC").rstrip("\n"),
        "  - task:\n      type: object-detection\n      name: Weakly supervised localization (heatmap boxes)",
        f"    dataset:\n      name: {dataset_name}\n      type: {dataset_type}\n      split: test",
        "    metrics:",
        metric(
            "maxboxacc",
            scm["calibrated_on_validation"]["MaxBoxAcc"],
            f"BoxAcc@0.5 of the {released} map, threshold from validation",
        ).rstrip("\n"),
        metric(
            "maxboxacc",
            scm["test_oracle_max_over_thresholds"]["MaxBoxAcc"],
            f"MaxBoxAcc of the {released} map (test oracle)",
        ).rstrip("\n"),
        metric(
            "maxboxaccv2",
            scm["calibrated_on_validation"]["MaxBoxAccV2"],
            f"MaxBoxAccV2 of the {released} map, thresholds from validation",
        ).rstrip("\n"),
        "---",
        "",
        f"# DeiT-SCM ({args.preset}, `{args.scm_variant}` SCM) — {dataset_name}",
        "",
        "DeiT with the Semantic/Spatial Calibration Module (Bai et al., ECCV 2022): classifies a chest radiograph as "
        "Atelectasis / Other pathologies / No pathologies and localizes the finding from image labels only.",
        "" if args.dataset == "nih" else "**Trained on synthetic phantoms: a demonstration, not a medical device.**",
        "",
        "## Results (test split)",
        "",
        "Maps and boxes in wsolevaluation's 224×224 frame, thresholds on a 0.001 grid. Box measures: the "
        "largest-contour box at the threshold chosen on validation against the ground-truth box it overlaps most.",
        "",
        "| method | BoxAcc@0.5 (τ from validation) | MaxBoxAcc (test oracle) | MaxBoxAccV2 (τ from validation) "
        "| top-1 Loc | PxAP | mean IoU | mean GIoU | Hausdorff (px) | avg. boundary distance (px) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["localization"]["methods"].items():
        cal, oracle = row["calibrated_on_validation"], row["test_oracle_max_over_thresholds"]
        box = row.get("box_measures") or {}
        lines.append(
            f"| {name} | {cal['MaxBoxAcc']:.1f} | {oracle['MaxBoxAcc']:.1f} | {cal['MaxBoxAccV2']:.1f} "
            f"| {cal['top1_loc']:.1f} | {row['PxAP']:.1f} | {box.get('mean_iou', float('nan')):.3f} "
            f"| {box.get('mean_giou', float('nan')):.3f} | {box.get('mean_hausdorff', float('nan')):.1f} "
            f"| {box.get('mean_average_boundary_distance', float('nan')):.1f} |"
        )
    lines += [
        "",
        f"Classification: accuracy {test['accuracy']:.3f}, balanced accuracy {test['balanced_accuracy']:.3f}, macro F1 "
        f"{test['macro_f1']:.3f}, macro ROC-AUC {test['macro_roc_auc_ovr']:.3f}.",
        "",
        "## Try it",
        "",
        *try_it_lines(args),
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoImageProcessor, AutoModelForImageClassification",
        "",
        'repo = "path/or/hub-id"',
        "processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)",
        "model = AutoModelForImageClassification.from_pretrained(",
        "    repo, trust_remote_code=True, use_safetensors=True",
        ").eval()",
        'inputs = processor(["patient.dcm"])            # DICOM, PNG, JPEG, arrays',
        'outputs = model(inputs["pixel_values"])',
        "result = processor.post_process_localization(outputs, geometry=inputs, id2label=model.config.id2label)[0]",
        'print(result["label_name"], result["score"])',
        'heatmap, boxes = result["heatmap"], result["boxes"]  # original pixels',
        "```",
        "",
        f"`post_process_localization` localizes with the `{released}` map "
        f"(`{MAP_OUTPUTS.get(released, released)}`) at a threshold of "
        f"{results['localization']['heatmap_threshold_from_validation']:.2f} of the maximum: the map that localized "
        "best on the validation boxes, and its threshold there, both stored in the processor "
        "(`localization_map`, `localization_threshold`).",
    ]
    return "\n".join(lines) + "\n"


def try_it_lines(args: argparse.Namespace) -> list[str]:
    """The card's pointer to the demo: the Space when one is pushed, else the local command."""
    if args.push_to_hub and args.hub_space_id:
        return [f"A demo page: [{args.hub_space_id}](https://huggingface.co/spaces/{args.hub_space_id})."]
    return [
        "Run the demo page (Gradio, offline) from a clone of the project's repository:",
        "",
        "```bash",
        f"python demo/app.py --model {args.hub_model_id or args.output_dir}",
        "```",
    ]


def save_model(accelerator, model, processor: CXRImageProcessor, output_dir: Path) -> None:
    """Weights, config and processor: written before anything else at the end of a run, so that a full
    disk or a crash while plotting cannot lose the trained model."""
    unwrapped = accelerator.unwrap_model(model)
    unwrapped = getattr(unwrapped, "_orig_mod", unwrapped)
    unwrapped.save_pretrained(str(output_dir), safe_serialization=True)
    processor.save_pretrained(str(output_dir))


def push_to_hub(args: argparse.Namespace, output_dir: Path) -> None:
    """Upload the output folder (checkpoints excluded). Offline, fail at once with a clear message."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise SystemExit(
            f"run_wsol.py: error: cannot push: the hub is offline (HF_HUB_OFFLINE=1); "
            f"everything is saved in {output_dir}"
        )
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(args.hub_model_id, exist_ok=True)
        api.upload_folder(
            repo_id=args.hub_model_id, folder_path=str(output_dir), ignore_patterns=["checkpoints/*", "*.tmp"]
        )
        if args.hub_space_id:
            sys.path.insert(0, str(Path(__file__).resolve().parent / "demo"))
            from push_space import push_space

            logger.info("demo Space: %s", push_space(args.hub_model_id, args.hub_space_id))
    except Exception as error:  # network and auth errors of every kind end the same way
        raise SystemExit(
            f"run_wsol.py: error: push to {args.hub_model_id} failed ({type(error).__name__}: {error}); "
            f"everything is saved in {output_dir}"
        ) from error


def overlay_name(path: str) -> str:
    """A unique, stable overlay file name: the stem, the suffix and a hash of the absolute path
    (`good.png`, `good.jpg` and `sub/good.png` must not overwrite each other)."""
    source = Path(path)
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:8]
    return f"{source.stem}{source.suffix.replace('.', '_')}_{digest}_overlay.png"


def predict_files(args, model, processor: CXRImageProcessor, output_dir: Path) -> list[dict[str, Any]]:
    """Predict PNG/JPEG/DICOM files: predictions.json plus an overlay per file in predictions/."""
    folder = output_dir / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    inputs = processor(list(args.predict_files), on_error="skip")
    model.eval()
    with torch.no_grad():
        outputs = model(inputs["pixel_values"].to(next(model.parameters()).device))
    results = processor.post_process_localization(outputs, geometry=inputs, id2label=model.config.id2label)
    records = []
    for index, result in zip(inputs["indices"].tolist(), results):
        path = args.predict_files[index]
        overlay = overlay_heatmap(processor.decode(path), result["heatmap"], boxes=result["boxes"])
        name = overlay_name(path)
        _save_png(folder / name, overlay)
        records.append(
            {
                "file": str(path),
                "label": result["label_name"],
                "score": result["score"],
                "boxes": result["boxes"].tolist(),
                "box_scores": result["box_scores"].tolist(),
                "overlay": str(folder / name),
            }
        )
    records += [{"file": args.predict_files[i], "error": message} for i, message in inputs.get("skipped", [])]
    (folder / "predictions.json").write_text(json.dumps(records, indent=2))
    return records


# ================================================================================================
# Main
# ================================================================================================


def make_accelerator(args: argparse.Namespace) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration

    report_to = None if args.report_to == "none" else args.report_to
    # Accelerate runs several CPU processes (gloo) only when told it is on CPU.
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=args.cpu or (several and not torch.cuda.is_available()),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # SCM's lambda and beta get no gradient while the blocks are warming up.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def build_processor(args: argparse.Namespace) -> CXRImageProcessor:
    if args.model_name_or_path and Path(args.model_name_or_path, "preprocessor_config.json").exists():
        return CXRImageProcessor.from_pretrained(args.model_name_or_path)
    return CXRImageProcessor(size={"height": args.image_size, "width": args.image_size})


def prepare_all(args, processor: CXRImageProcessor, accelerator: Any) -> dict[str, PreparedSplit]:
    """Every split preprocessed once (the main process builds the cache, the others read it); a split
    serving twice (phantom validation = loc_validation) is shared."""
    import datasets as hf_datasets

    raw = load_raw_splits(args)
    limits = {"train": args.max_train_samples}
    # Outside the output folder: --overwrite_output_dir must not throw away a cache that still matches.
    cache_dir = (
        Path(args.cache_dir) if args.cache_dir else Path(hf_datasets.config.HF_DATASETS_CACHE) / "deit_scm_preprocessed"
    )
    if not accelerator.is_local_main_process:
        hf_datasets.disable_progress_bars()
    prepared: dict[str, PreparedSplit] = {}
    done: dict[int, PreparedSplit] = {}
    with accelerator.main_process_first():
        for name, dataset in raw.items():
            if id(dataset) not in done:
                limit = limits.get(name, args.max_eval_samples)
                done[id(dataset)] = prepare_split(
                    name, dataset, processor, limit, cache_dir, args.preprocessing_num_workers, Path(args.output_dir)
                )
            prepared[name] = done[id(dataset)]
    return prepared


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    from accelerate.utils import set_seed

    accelerator = make_accelerator(args)
    logging.basicConfig(
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        if args.overwrite_output_dir and args.do_train and not args.resume_from_checkpoint and output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    processor = build_processor(args)
    results: dict[str, Any] = {
        "args": dict(vars(args)),
        "num_processes": accelerator.num_processes,
    }
    splits = prepare_all(args, processor, accelerator) if (args.do_train or args.do_eval) else {}
    model = build_model(args, splits["train"].labels if splits else torch.zeros(0, dtype=torch.long))
    if args.report_to != "none":
        accelerator.init_trackers(
            "run_wsol", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )
    normalizer = PixelNormalizer(processor)
    parts = build_components(args, accelerator, model, splits["train"], normalizer) if splits else None
    state = TrainState()
    if args.do_train:
        checkpoint = resolve_checkpoint(args)
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint))
            state = TrainState(**json.loads((checkpoint / "train_state.json").read_text()))
            parts.best_weights = load_best_weights(checkpoint)
            logger.info("resumed from %s at step %d", checkpoint, state.global_step)
        state = train(args, parts, state, splits["validation"], output_dir)
        results["training"] = {
            "steps": state.global_step,
            "epochs": state.epoch,
            "best_epoch": state.best_epoch,
            "scm_warmup_epochs": state.scm_warmup_epochs,
            "history": state.history,
        }
    if args.do_eval:
        evaluation, predictions = final_evaluation(args, parts, splits)
        results.update(evaluation)
        processor.localization_threshold = float(evaluation["localization"]["heatmap_threshold_from_validation"])
        processor.localization_map = evaluation["localization"]["localization_map_output"]
    if accelerator.is_main_process and (args.do_train or args.do_eval):
        save_model(accelerator, parts.model, processor, output_dir)
        (output_dir / "all_results.json").write_text(json.dumps(_jsonable(results), indent=2))
        if args.do_eval:
            write_plots(output_dir, state, results)
            results["overlays"] = write_overlays(output_dir, splits["loc_test"], predictions["loc_test"], processor)
            (output_dir / "all_results.json").write_text(json.dumps(_jsonable(results), indent=2))
        (output_dir / "README.md").write_text(model_card(args, results if args.do_eval else _empty_results()))
    if args.do_predict and accelerator.is_main_process:
        model_for_prediction = accelerator.unwrap_model(parts.model) if parts else model
        results["predictions"] = predict_files(args, model_for_prediction, processor, output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        push_to_hub(args, output_dir)
    return results


def _empty_results() -> dict[str, Any]:
    nan = float("nan")
    row = {
        "calibrated_on_validation": {"MaxBoxAcc": nan, "MaxBoxAccV2": nan, "top1_loc": nan},
        "test_oracle_max_over_thresholds": {"MaxBoxAcc": nan},
        "PxAP": nan,
    }
    return {
        "classification": {
            "test": {"accuracy": nan, "macro_f1": nan, "balanced_accuracy": nan, "macro_roc_auc_ovr": nan}
        },
        "localization": {"methods": {"scm": row}, "heatmap_threshold_from_validation": nan},
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


if __name__ == "__main__":
    main()
