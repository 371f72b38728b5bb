"""End-to-end training throughput from the preprocessed cache against synthetic in-memory tensors, and
the cache build rate. Prints one JSON object on the last line of stdout.

    from_cache:  phantoms -> CXRImageProcessor once (datasets.map, cached) -> uint8 arrays -> DataLoader ->
                 augmentation on the training device -> normalize -> DeiT-SCM step
    synthetic:   the same model and optimizer step on a fixed, already-normalized batch on the device

The ratio from_cache / synthetic is what the data path costs. CPU by default (deit-micro, 96x96,
batch 32); on CUDA: DeiT-S at 224x224, batch 256, bf16 autocast, channels of work on the GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

import deit_scm_cxr.data.prepare as wsol_data
from deit_scm_cxr.data import load_dataset_module
from deit_scm_cxr.hub.configuration_deit_scm import DeiTSCMConfig
from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor
from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification
from timing import timed


@dataclass(frozen=True)
class TrainBench:
    """The measurement's settings, unpacked from the flags once (`parse_args`)."""

    device: str
    preset: str
    scm_variant: str
    image_size: int
    batch_size: int
    images: int  # phantoms in the cached split
    steps: int
    rounds: int
    num_proc: int
    compile: bool


def parse_args(argv: list[str] | None = None) -> TrainBench:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--scm_variant", default="cxr")
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--images", type=int, default=None, help="phantoms in the cached split")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num_proc", type=int, default=None)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("deit-small" if cuda else "deit-micro")
    args.image_size = args.image_size or (224 if cuda else 96)
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.images = args.images or (4096 if cuda else 256)
    args.steps = args.steps or (10 if cuda else 4)
    args.num_proc = args.num_proc or (8 if cuda else 2)
    return TrainBench(**{f.name: getattr(args, f.name) for f in fields(TrainBench)})


def build_cache(bench: TrainBench, cache_dir: Path) -> tuple[wsol_data.PreparedSplit, dict[str, float]]:
    phantoms = load_dataset_module("phantoms")
    start = time.perf_counter()
    dataset = phantoms.build_phantom_dataset(num_train=bench.images, num_validation=0, num_test=0, size=256)["train"]
    generate_seconds = time.perf_counter() - start
    processor = CXRImageProcessor(size={"height": bench.image_size, "width": bench.image_size})
    start = time.perf_counter()
    split = wsol_data.prepare_split("train", dataset, processor, None, cache_dir, bench.num_proc)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    split = wsol_data.prepare_split("train", dataset, processor, None, cache_dir, bench.num_proc)
    warm = time.perf_counter() - start
    rates = {
        "phantom_generation_img_s": round(bench.images / generate_seconds, 1),
        "cache_build_img_s": round(bench.images / cold, 1),
        "cache_load_img_s": round(bench.images / warm, 1),
        "cache_num_proc": bench.num_proc,
    }
    return split, rates


def make_step(bench: TrainBench, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    device_type = "cuda" if bench.device.startswith("cuda") else "cpu"
    forward = torch.compile(model) if bench.compile else model

    def step(pixel_values: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
            loss = forward(pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_runs(bench: TrainBench, split: wsol_data.PreparedSplit) -> tuple[Callable[[], None], Callable[[], None]]:
    """Two ways of running `bench.steps` training steps of one model: from the uint8 cache through the
    loader, augmentation and normalization (the real path), and on tensors already on the device."""
    config = DeiTSCMConfig.from_preset(bench.preset, bench.scm_variant, image_size=bench.image_size)
    model = DeiTSCMForImageClassification(config).to(bench.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = make_step(bench, model, optimizer)
    processor = CXRImageProcessor(size={"height": bench.image_size, "width": bench.image_size})
    normalizer = wsol_data.PixelNormalizer(processor).to(bench.device)
    loader = wsol_data.make_loader(split, bench.batch_size, shuffle=True, num_workers=0)
    generator = torch.Generator().manual_seed(0)
    synthetic = torch.randn(bench.batch_size, 3, bench.image_size, bench.image_size, device=bench.device)
    synthetic_labels = torch.randint(0, 3, (bench.batch_size,), device=bench.device)

    def from_cache() -> None:
        done = 0
        while done < bench.steps:
            for pixels, labels, _ in wsol_data.DevicePrefetcher(loader, bench.device):
                step(normalizer(wsol_data.augment_batch(pixels, generator)), labels)
                done += 1
                if done == bench.steps:
                    return

    def from_memory() -> None:
        for _ in range(bench.steps):
            step(synthetic, synthetic_labels)

    return from_cache, from_memory


def main(argv: list[str] | None = None) -> dict:
    bench = parse_args(argv)
    torch.manual_seed(0)
    if bench.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    cache_dir = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        split, rates = build_cache(bench, cache_dir)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    from_cache, from_memory = make_runs(bench, split)
    from_memory()  # warm-up (and compilation)
    from_cache()
    cache_times, memory_times = [], []
    for _ in range(bench.rounds):
        cache_times.append(timed(from_cache, bench.device))
        memory_times.append(timed(from_memory, bench.device))
    images = bench.steps * bench.batch_size
    cache_rate = images / statistics.median(cache_times)
    memory_rate = images / statistics.median(memory_times)
    report = {
        "device": torch.cuda.get_device_name() if bench.device.startswith("cuda") else "cpu",
        "config": {
            "preset": bench.preset,
            "scm_variant": bench.scm_variant,
            "image_size": bench.image_size,
            "batch_size": bench.batch_size,
            "compile": bench.compile,
        },
        **rates,
        "train_img_s_from_cache": round(cache_rate, 1),
        "train_img_s_synthetic": round(memory_rate, 1),
        "ratio_cache_vs_synthetic": round(cache_rate / memory_rate, 3),
        "target_ratio": 0.9,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
