"""Training and inference throughput of DeiT-SCM against timm's DeiT of the same dimensions.

Prints progress to stderr and one JSON object as the last line of stdout:

    {"device": ..., "config": {...}, "results": {variant: {"train_img_s", "infer_img_s", ...}},
     "ratios": {"train_vs_timm": {variant: r}, "infer_vs_timm": {variant: r}}}

Variants, all timed in the same run with the same batch, interleaved round by round so that load on a
shared machine hits them alike (the median round is reported):
    timm          timm `deit_*_patch16_224` (fused attention), 3 classes
    paper, cxr    ours with the two SCM variants (fused attention)
    eager         ours, paper variant, with the explicit softmax(QK^T)V attention
    *_compiled    the same under torch.compile, with --compile

CPU by default: DeiT-Tiny dimensions at 224x224, batch 8, fp32 (about half a minute on 2 cores).
On CUDA: DeiT-Small, batch 256, bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

from deit_scm_cxr.hub.configuration_deit_scm import BACKBONE_PRESETS, DeiTSCMConfig
from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification
from deit_scm_cxr.hub.scm_diffusion import resolve_solver
from timing import timed

logger = logging.getLogger("bench_model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DeiT-SCM vs timm DeiT throughput")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(BACKBONE_PRESETS), default=None)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument(
        "--compile_mode",
        default=None,
        help='torch.compile mode, e.g. "reduce-overhead" (CUDA graphs); default: default',
    )
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--variants", default="timm,paper,cxr,eager")
    parser.add_argument("--solver", default=None, help="scm_solver for our variants (default: the config's)")
    parser.add_argument("--profile", action="store_true", help="top kernels of one training step per eager variant")
    parser.add_argument(
        "--count_ops",
        action="store_true",
        help="only count compute operations per training step (forward + backward) for timm and every solver",
    )
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("deit-small" if cuda else "deit-tiny")
    args.batch_size = args.batch_size or (256 if cuda else 8)
    args.steps = args.steps or (10 if cuda else 2)
    args.bf16 = cuda if args.bf16 is None else args.bf16
    return args


@dataclass(frozen=True)
class Bench:
    """The measurement's settings, unpacked from the flags once (`main`)."""

    device: str = "cpu"
    preset: str = "deit-tiny"
    image_size: int = 224
    batch_size: int = 8
    steps: int = 2  # timed steps per round
    rounds: int = 3
    compile_mode: Optional[str] = None
    bf16: bool = False
    solver: Optional[str] = None  # scm_solver of our variants; None: the config's


def build_model(
    variant: str, preset: str, image_size: int, device: str = "cpu", solver: Optional[str] = None
) -> torch.nn.Module:
    """timm's DeiT ("timm"), ours ("paper", "cxr"; "eager": paper on the explicit-softmax attention path)."""
    base = variant.removesuffix("_compiled")
    if base == "timm":
        import timm

        name = "deit_" + preset.split("-")[1] + "_patch16_224"
        model = timm.create_model(name, pretrained=False, num_classes=3, img_size=image_size)
    else:
        scm_variant = "paper" if base == "eager" else base
        config = DeiTSCMConfig.from_preset(
            preset, scm_variant, image_size=image_size, **({"scm_solver": solver} if solver else {})
        )
        model = DeiTSCMForImageClassification(config)
        model.set_fused_attention(base != "eager")
    return model.to(device)


def logits_of(output: object) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output  # type: ignore[return-value]


def make_steps(model: torch.nn.Module, bench: Bench, compiled: bool) -> tuple[Callable, Callable]:
    device_type = "cuda" if bench.device.startswith("cuda") else "cpu"
    forward = torch.compile(model, mode=bench.compile_mode) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    size = bench.image_size
    pixels = torch.randn(bench.batch_size, 3, size, size, generator=generator).to(bench.device)
    labels = torch.randint(0, 3, (bench.batch_size,), generator=generator).to(bench.device)

    def train_step() -> None:
        model.train()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bench.bf16):
            loss = F.cross_entropy(logits_of(forward(pixels)).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step() -> None:
        model.eval()
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bench.bf16):
            logits_of(forward(pixels))

    return train_step, infer_step


def top_kernels(step: Callable, device: str, count: int = 12) -> list[dict[str, object]]:
    """The operators that take most of one training step's time (device time on CUDA, CPU time
    otherwise), from `torch.profiler`: where the time goes when a ratio misses its goal."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:count]
    return [
        {"name": e.key[:90], "self_ms_per_step": round(getattr(e, key, 0.0) / 1000 / 2, 3), "calls": e.count // 2}
        for e in events
    ]


def warm_runners(variants: list[str], bench: Bench, cuda: bool) -> tuple[dict, dict, dict, dict, dict]:
    """Build each variant, run two warm-up steps of each mode; (runners, solvers, train peak, infer peak,
    seconds of the first training step: the compile time of a compiled variant)."""
    runners: dict[str, dict[str, Callable]] = {}
    solvers: dict[str, str] = {}
    peak_memory: dict[str, float] = {}
    infer_peak_memory: dict[str, float] = {}
    warm_seconds: dict[str, float] = {}
    for variant in variants:
        model = build_model(variant, bench.preset, bench.image_size, bench.device, bench.solver)
        if hasattr(model, "config") and hasattr(model.config, "scm_solver"):
            solvers[variant] = model.config.scm_solver
        train_step, infer_step = make_steps(model, bench, variant.endswith("_compiled"))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        warm_seconds[variant] = round(timed(train_step, bench.device, repeat=1), 2)  # warm-up (and compilation)
        train_step()
        if cuda:
            peak_memory[variant] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        infer_step()
        infer_step()
        if cuda:
            infer_peak_memory[variant] = torch.cuda.max_memory_allocated() / 2**30
        runners[variant] = {"train": train_step, "infer": infer_step}
        logger.info("built and warmed %s", variant)
    return runners, solvers, peak_memory, infer_peak_memory, warm_seconds


def ratios_to_timm(results: dict[str, dict], peak_memory: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each variant's throughput (and training peak memory) over timm's, eager against eager and compiled
    against compiled."""

    def reference(variant: str) -> str:
        return "timm_compiled" if variant.endswith("_compiled") else "timm"

    ratios: dict[str, dict[str, float]] = {"train_vs_timm": {}, "infer_vs_timm": {}}
    for variant in results:
        if variant.removesuffix("_compiled") == "timm":
            continue
        for mode in ("train", "infer"):
            ratios[f"{mode}_vs_timm"][variant] = round(
                results[variant][f"{mode}_img_s"] / results[reference(variant)][f"{mode}_img_s"], 3
            )
    memory_ratios = {
        variant: round(peak_memory[variant] / peak_memory[reference(variant)], 3)
        for variant in peak_memory
        if not variant.startswith("timm") and ("timm" in peak_memory)
    }
    if memory_ratios:
        ratios["train_peak_mem_vs_timm"] = memory_ratios
    return ratios


def count_operations(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, int]:
    """Compute operations (aten calls, view-like ones excluded) that one training step (forward +
    backward) and one inference pass dispatch: what a GPU would launch as kernels, counted on any device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - PyTorch's protocol
            if not func.is_view:
                self.count += 1
            return func(*args, **(kwargs or {}))

    model.train()
    with torch.no_grad():
        model(pixels)  # once before counting: what is built on the first call only (the grid's Laplacian)
    with Counter() as train:
        F.cross_entropy(logits_of(model(pixels)).float(), labels).backward()
    model.eval()
    with torch.no_grad(), Counter() as infer:
        model(pixels)
    return {"train": train.count, "infer": infer.count}


def operation_table(device: str, preset: str, image_size: int) -> dict:
    """`--count_ops`: operations per step of timm's DeiT and of ours with every solver (DeiT-S
    dimensions unless --preset, batch 2), and each one's ratio to timm's."""
    from deit_scm_cxr.hub.configuration_deit_scm import SCM_SOLVERS

    preset = preset if preset != "deit-tiny" or device.startswith("cuda") else "deit-small"
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.tensor([0, 2]).to(device)
    counts = {"timm": count_operations(build_model("timm", preset, image_size, device), pixels, labels)}
    for variant in ("paper", "cxr"):
        for solver in SCM_SOLVERS:
            model = build_model(variant, preset, image_size, device, solver)
            counts[f"{variant}/{solver}"] = count_operations(model, pixels, labels)
    reference = counts["timm"]
    return {
        "device": device,
        "preset": preset,
        "image_size": image_size,
        "batch_size": 2,
        "auto_resolves_to": resolve_solver("auto", torch.device(device)),
        "operations": counts,
        "train_vs_timm": {k: round(v["train"] / reference["train"], 2) for k, v in counts.items()},
        "infer_vs_timm": {k: round(v["infer"] / reference["infer"], 2) for k, v in counts.items()},
    }


def interleaved_seconds(runners: dict[str, dict[str, Callable]], bench: Bench) -> dict[str, dict]:
    """Seconds per round of `bench.steps` steps, every variant and mode in turn each round (the machine's load
    drifts; interleaving spreads it over all of them alike)."""
    seconds: dict[str, dict[str, list[float]]] = {v: {"train": [], "infer": []} for v in runners}
    for round_index in range(bench.rounds):
        for variant, modes in runners.items():
            for mode in ("train", "infer"):
                seconds[variant][mode].append(timed(modes[mode], bench.device, repeat=bench.steps))
        logger.info("round %d/%d done", round_index + 1, bench.rounds)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    args = parse_args(argv)
    if args.count_ops:
        report = operation_table(args.device, args.preset, args.image_size)
        print(json.dumps(report))
        return report
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    variants = args.variants.split(",")
    if args.compile:
        variants += [f"{v}_compiled" for v in variants if v != "eager"]
    bench = Bench(**{f.name: getattr(args, f.name) for f in fields(Bench)})
    runners, solvers, peak_memory, infer_peak_memory, warm_seconds = warm_runners(variants, bench, cuda)
    seconds = interleaved_seconds(runners, bench)
    images = args.batch_size * args.steps
    results = {
        variant: {
            "train_img_s": round(images / statistics.median(seconds[variant]["train"]), 2),
            "infer_img_s": round(images / statistics.median(seconds[variant]["infer"]), 2),
            **({"train_peak_mem_gib": round(peak_memory[variant], 3)} if variant in peak_memory else {}),
            **({"infer_peak_mem_gib": round(infer_peak_memory[variant], 3)} if variant in infer_peak_memory else {}),
        }
        for variant in variants
    }
    report = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "config": {
            "preset": args.preset,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "steps_per_round": args.steps,
            "rounds": args.rounds,
            "bf16": args.bf16,
            "torch": torch.__version__,
            "compile_mode": args.compile_mode,
        },
        "first_step_seconds": warm_seconds,
        "scm_solver": {v: f"{s} -> {resolve_solver(s, torch.device(args.device))}" for v, s in solvers.items()},
        "results": results,
        "ratios": ratios_to_timm(results, peak_memory),
    }
    if args.profile:
        eager = [v for v in variants if not v.endswith("_compiled")]
        report["profile"] = {v: top_kernels(runners[v]["train"], args.device) for v in eager}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
