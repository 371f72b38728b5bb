"""Data for `run_wsol.py`: the splits (phantoms or NIH), the preprocessed uint8 cache, loaders and
augmentation. A split is decoded, windowed, CLAHE'd and resized once (`cached_preprocess`); training
then reads arrays."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from deit_scm_cxr.data import load_dataset_module
from deit_scm_cxr.data.cxr import patient_bucket, write_problem_list
from deit_scm_cxr.errors import refuse
from deit_scm_cxr.hub.image_processing_cxr import CXRImageError, CXRImageProcessor

logger = logging.getLogger("run_wsol")


# wsolevaluation resizes every image, map and box to 224 x 224: the WSOL metrics are computed in that frame
# whatever the model's input size, so they compare with published numbers.
EVALUATION_FRAME = (224, 224)




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


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    """Where a run's images come from and how they are prepared (`run_wsol.py`'s data flags, resolved)."""

    dataset: str  # phantoms | nih
    data_dir: Optional[str]  # the NIH ChestX-ray14 folder
    view: str  # NIH view position kept: all | PA | AP
    num_phantoms: int
    num_eval_phantoms: Optional[int]  # sizes validation and test; None: num_phantoms
    phantom_size: int
    seed: int  # the phantoms' series and the NIH patient split
    report_dir: Optional[str]  # where the problem-image lists go (the run's output folder)
    max_train_samples: Optional[int]
    max_eval_samples: Optional[int]
    cache_dir: Optional[str]  # the preprocessed cache; default under HF_DATASETS_CACHE
    preprocessing_num_workers: int

    @property
    def reports(self) -> Optional[Path]:
        return Path(self.report_dir) if self.report_dir else None


def load_raw_splits(settings: DataSettings) -> dict[str, Any]:
    """The source splits: train / validation / test (classification) and, for localization,
    loc_validation (calibration of the heatmap threshold) and loc_test."""
    if settings.dataset == "phantoms":
        phantoms = load_dataset_module("phantoms")
        count = settings.num_phantoms
        # Disjoint index ranges: a bigger training split leaves the evaluation images as they were.
        evaluation = settings.num_eval_phantoms or count
        splits = phantoms.build_phantom_dataset(
            num_train=count,
            num_validation=max(evaluation // 6, 12),
            num_test=max(evaluation // 4, 12),
            size=settings.phantom_size,
            seed=settings.seed,
        )
        splits = dict(splits)
        splits["loc_validation"], splits["loc_test"] = splits["validation"], splits["test"]
        return splits
    nih = load_dataset_module("nih")
    try:
        splits = dict(nih.build_dataset_dict(settings.data_dir, "three_class", report_dir=settings.reports,
                                             view=settings.view, seed=settings.seed))  # fmt: skip
        boxed = nih.build_dataset_dict(settings.data_dir, "bbox", report_dir=settings.reports)["test"]
    except nih.NIHMetadataError as error:
        refuse(f"NIH metadata in {settings.data_dir}: {error}")
    empty = [name for name, split in {**splits, "bbox": boxed}.items() if len(split) == 0]
    if empty:
        refuse(
            f"no usable images for the {', '.join(empty)} split(s) in {settings.data_dir} (looked for the "
            "metadata's PNG files in that folder and its subfolders, e.g. images_001/images/)"
        )
    # The box set is the localization data; half of its patients calibrate the threshold, half test it.
    halves = np.array([patient_bucket(pid, settings.seed) < 0.5 for pid in boxed["patient_id"]])
    splits["loc_validation"] = boxed.select(np.flatnonzero(halves))
    splits["loc_test"] = boxed.select(np.flatnonzero(~halves))
    return splits


def _digest(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def _image_identity(image: dict[str, Any]) -> Any:
    """What determines one image's pixels: its bytes when the dataset embeds them (hashed), else its file's
    path, size and modification time (a replaced or rewritten file changes them; hashing 45 GB of NIH
    images on every start would not be affordable)."""
    if image.get("bytes"):
        return hashlib.sha256(image["bytes"]).hexdigest()
    path = image.get("path")
    try:
        status = os.stat(path)
    except (OSError, TypeError):
        return [path, None]
    return [path, status.st_size, status.st_mtime_ns]


def source_fingerprint(dataset: Any) -> str:
    """Identity of a split's content: its ids, labels and boxes, each image's content (`_image_identity`),
    and the code that made it (phantom images are drawn by `cxr_phantoms.py`)."""
    from datasets import Image as ImageFeature

    code = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "datasets").rglob("*.py")):
        code.update(path.read_bytes())
    # Columns are lazy in datasets >= 4 and their repr is truncated: materialize them.
    boxes = [[list(box) for box in image_boxes] for image_boxes in dataset["boxes"]]
    images = [_image_identity(image) for image in dataset.cast_column("image", ImageFeature(decode=False))["image"]]
    return _digest(list(dataset["image_id"]), list(dataset["label"]), boxes, images, code.hexdigest())


def processor_code_digest() -> str:
    """SHA-256 of the preprocessing code: an edited processor must not reuse arrays the old one made."""
    import deit_scm_cxr.hub.image_processing_cxr as image_processing_cxr

    return hashlib.sha256(Path(image_processing_cxr.__file__).read_bytes()).hexdigest()


def _cache_files(cache_file: Path) -> list[Path]:
    """The Arrow file(s) `datasets` wrote for `cache_file` (one, or one per process with num_proc)."""
    if cache_file.is_file():
        return [cache_file]
    return sorted(cache_file.parent.glob(f"{cache_file.stem}_*_of_*{cache_file.suffix}"))


def _cache_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _drop_unverified_cache(cache_file: Path) -> None:
    """Delete a cache whose checksum is missing or wrong (flipped bytes, a write cut short), so that it is
    rebuilt instead of training on whatever it now holds."""
    files, sidecar = _cache_files(cache_file), cache_file.with_name(cache_file.name + ".sha256")
    if not files:
        sidecar.unlink(missing_ok=True)  # a checksum without its cache would condemn the next one
        return
    recorded = sidecar.read_text().strip() if sidecar.is_file() else None
    if recorded == _cache_digest(files):
        return
    logger.warning("preprocessed cache %s %s; rebuilding it", cache_file.name,
                   "has no checksum" if recorded is None else "does not match its checksum")  # fmt: skip
    for path in [*files, sidecar]:
        path.unlink(missing_ok=True)


def _record_cache_checksum(cache_file: Path) -> None:
    files, sidecar = _cache_files(cache_file), cache_file.with_name(cache_file.name + ".sha256")
    if files and not sidecar.is_file():
        sidecar.write_text(_cache_digest(files) + "\n")


CACHE_VERSION = "pixels-geometry-error-v3"


class _ProcessBatch:
    """`datasets.map`'s function: a batch of undecoded images -> uint8 arrays, geometry and error texts.

    The images are decoded by the processor, not by `datasets`: a file that passed the readability check and
    then fails to decode (a PNG with valid CRCs and a corrupt stream) is a CXRImageError naming it, one problem
    image, not a dead run."""

    def __init__(self, processor: CXRImageProcessor) -> None:
        self.processor = processor

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        height, width = self.processor.size["height"], self.processor.size["width"]
        pixels, geometry, errors = [], [], []
        for image, image_id in zip(batch["image"], batch["image_id"]):
            try:
                gray, geo = self.processor.process_one(image["bytes"] or image["path"], source=image_id)
                error = ""
            except CXRImageError as failure:
                gray, geo = np.zeros((height, width), np.uint8), [0] * 8
                error = f"{type(failure).__name__}: {failure}"[:500]
            pixels.append(gray)
            geometry.append(geo)
            errors.append(error)
        return {"pixels": pixels, "geometry": geometry, "error": errors}


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
    settings = _digest(processor.to_dict(), CACHE_VERSION, processor_code_digest())
    fingerprint = f"{source_fingerprint(dataset)}-{settings}"
    height, width = processor.size["height"], processor.size["width"]
    features = Features(
        {
            "pixels": Array2D(shape=(height, width), dtype="uint8"),
            "geometry": List(Value("int64"), length=8),
            "error": Value("string"),
        }
    )

    cache_file = str(cache_dir / f"{name}-{fingerprint}.arrow") if cache_dir else None
    if cache_dir:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _drop_unverified_cache(Path(cache_file))
    processed = dataset.cast_column("image", ImageFeature(decode=False)).map(
        _ProcessBatch(processor),
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
    if cache_dir:
        _record_cache_checksum(Path(cache_file))
    return processed


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
        where = write_problem_list(problems, report_dir, name)
        logger.warning("%s: dropped %d image(s) that could not be preprocessed, e.g. %s: %s; list: %s",
                       name, len(failed), problems[0][0], problems[0][1], where)  # fmt: skip
        if len(failed) == len(dataset):
            refuse(f"no image of the {name} split could be read (first: {problems[0]})")
        keep = [i for i in range(len(dataset)) if not errors[i]]
        dataset, processed = dataset.select(keep), processed.select(keep)
    pixels = torch.from_numpy(_uint8_pixels(processed))
    geometry = np.asarray(processed.with_format("numpy")["geometry"], dtype=np.int64)
    return PreparedSplit(
        name=name,
        pixels=pixels,
        labels=torch.tensor(dataset["label"], dtype=torch.long),
        frame_boxes=[
            CXRImageProcessor.boxes_to_input(b, g, EVALUATION_FRAME) for b, g in zip(dataset["boxes"], geometry)
        ],
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
    """uint8 (B, H, W) -> normalized float (B, C, H, W) on whatever device the batch is on: the
    processor's own normalization (`CXRImageProcessor.normalization`), as one batched affine map, so that
    training sees the values `processor(...)` gives at inference, bit for bit (a test holds it to that)."""

    def __init__(self, processor: CXRImageProcessor) -> None:
        super().__init__()
        scale, shift = processor.normalization()
        self.register_buffer("scale", torch.from_numpy(scale).view(1, -1, 1, 1))
        self.register_buffer("shift", torch.from_numpy(shift).view(1, -1, 1, 1))

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


class DevicePrefetcher:
    """Iterate a loader of tensor tuples with the next batch already on `device`: on CUDA its copy from
    pinned memory runs on a side stream while the current batch computes; elsewhere a plain pass-through."""

    def __init__(self, loader: Any, device: torch.device | str) -> None:
        self.loader, self.device = loader, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _send(self, batch: Any) -> Any:
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def __iter__(self):
        if self.stream is None:
            yield from (self._send(batch) for batch in self.loader)
            return
        iterator = iter(self.loader)
        with torch.cuda.stream(self.stream):
            upcoming = next(iterator, None)
            upcoming = self._send(upcoming) if upcoming is not None else None
        while upcoming is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            current = upcoming
            for tensor in current:
                tensor.record_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                upcoming = next(iterator, None)
                upcoming = self._send(upcoming) if upcoming is not None else None
            yield current


def build_processor(model_name_or_path: Optional[str], image_size: int) -> CXRImageProcessor:
    """The saved model's processor (its preprocessing, released map and threshold) when one is loaded,
    else a new one at `image_size`. A local model folder without `preprocessor_config.json` is refused:
    other preprocessing, threshold and map would be used without a word."""
    if model_name_or_path and Path(model_name_or_path).is_dir():
        if not Path(model_name_or_path, "preprocessor_config.json").is_file():
            refuse(
                f"--model_name_or_path {model_name_or_path} has no preprocessor_config.json: the model's "
                "preprocessing, released map and threshold are unknown (save the processor beside the model)"
            )
        return CXRImageProcessor.from_pretrained(model_name_or_path)
    if model_name_or_path:  # a Hub id
        return CXRImageProcessor.from_pretrained(model_name_or_path)
    return CXRImageProcessor(size={"height": image_size, "width": image_size})


def prepare_all(settings: DataSettings, processor: CXRImageProcessor, accelerator: Any) -> dict[str, PreparedSplit]:
    """Every split preprocessed once (the main process builds the cache, the others read it); a split
    serving twice (phantom validation = loc_validation) is shared."""
    import datasets as hf_datasets

    raw = load_raw_splits(settings)
    limits = {"train": settings.max_train_samples}
    # Outside the output folder: --overwrite_output_dir must not throw away a cache that still matches.
    default_cache = Path(hf_datasets.config.HF_DATASETS_CACHE) / "deit_scm_preprocessed"
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache
    if not accelerator.is_local_main_process:
        hf_datasets.disable_progress_bars()
    prepared: dict[str, PreparedSplit] = {}
    done: dict[int, PreparedSplit] = {}
    with accelerator.main_process_first():
        for name, dataset in raw.items():
            if id(dataset) not in done:
                limit = limits.get(name, settings.max_eval_samples)
                done[id(dataset)] = prepare_split(
                    name, dataset, processor, limit, cache_dir, settings.preprocessing_num_workers,
                    settings.reports,
                )
            prepared[name] = done[id(dataset)]
    return prepared
