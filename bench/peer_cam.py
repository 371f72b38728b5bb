"""A peer for the ablation: a timm ResNet trained from scratch on the same phantoms, localizing with CAM and
Grad-CAM at the DeiT's token grid, scored by the project's own evaluation code.

What a practitioner would pick instead of a DeiT-SCM: a small CNN with class activation maps. CAM (Zhou et
al., "Learning deep features for discriminative localization", CVPR 2016) is the classifier's weights over the
last feature map; Grad-CAM (Selvaraju et al., ICCV 2017) weighs the same maps by the spatial mean of the
class score's gradient and keeps the positive part. Both are the standard WSOL baselines of wsolevaluation
(Choe et al., CVPR 2020). The ResNet runs at output stride 8 (timm's dilated last stages), so at the default
96x96 input its maps are 12x12: the DeiT's token grid, no resolution advantage either way.

Same data as `run_wsol.py --seed S` (the phantom series of that seed, the same splits, the same preprocessing
and augmentation), the same class weights and label smoothing as the `cxr` variant, and a wall-clock budget
(`--max_seconds`: `bench/ablation.py` passes the `cxr` DeiT arm's wall time on that seed; training stops at
the end of the epoch that crosses it, a tenth kept for evaluation). Writes
`all_results.json` in the shape `bench/ablation.py` reads (each map smoothed on its grid with the width chosen
on validation, as the DeiT's maps are) (classification, localization with every baseline)
and `wall_seconds.txt`.

    python bench/peer_cam.py --seed 0 --output_dir /tmp/peer --max_seconds 480
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deit_scm_cxr.data.cxr import CLASS_NAMES
from deit_scm_cxr.data.prepare import (
    PixelNormalizer,
    PreparedSplit,
    augment_batch,
    build_processor,
    make_loader,
    prepare_all,
)
from deit_scm_cxr.evaluation.boxes import FINE_THRESHOLDS
from deit_scm_cxr.evaluation.evaluator import (
    Predictions,
    boxed_patients,
    evaluation_split,
    map_choice_score,
    mean_prior_box,
    predict_each_split,
)
from deit_scm_cxr.evaluation.metrics import classification_metrics, localization_table, pointing_game_per_finding
from deit_scm_cxr.evaluation.reporting import resample_weights, softmax
from deit_scm_cxr.hub.configuration_deit_scm import SCM_VARIANTS
from deit_scm_cxr.hub.localization import SMOOTHING_SIGMAS, check_smoothing
from deit_scm_cxr.training.arguments import ModelArguments
from deit_scm_cxr.training.run import settings_for

logger = logging.getLogger("peer_cam")
PEER_MAPS = {"cam": "CAM (ResNet)", "gradcam": "Grad-CAM (ResNet)"}
# The `cxr` variant's loss, so that the peer learns the same imbalanced task the DeiT arms do.
CLASS_WEIGHTS = SCM_VARIANTS["cxr"]["class_weights"]
LABEL_SMOOTHING = SCM_VARIANTS["cxr"]["label_smoothing"]
IMAGE_SIZE = int(ModelArguments.image_size)  # run_wsol's default input side (a dataclass field's default)
# run_wsol.py's data flags a peer passes on as they are (unset: run_wsol's own default), so that it sees the DeiT
# arms' images; `bench/ablation.py` hands them over under these names.
FORWARDED_DATA_FLAGS = {
    "num_phantoms": "phantom training images",
    "num_eval_phantoms": "sizes validation and test (default: --num_phantoms)",
    "phantom_size": "phantom side in pixels",
    "max_eval_samples": "keep the first N of each evaluation split",
    "preprocessing_num_workers": "processes for the one-time preprocessing map",
}


def build_peer(arch: str, num_labels: int, output_stride: int, width: float) -> torch.nn.Module:
    """A timm ResNet from scratch at `output_stride` (8: dilated stages 3-4), on the same normalized 3-channel input
    the DeiT gets."""
    import timm

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": num_labels, "in_chans": 3,
                              "output_stride": output_stride}  # fmt: skip
    if width != 1.0:
        kwargs["channels"] = tuple(max(8, int(round(c * width))) for c in (64, 128, 256, 512))
    return timm.create_model(arch, **kwargs)


def class_maps(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Logits and the CAM and Grad-CAM maps (B, h, w) of the given class per image."""
    features = model.forward_features(pixels)
    logits = model.forward_head(features)
    chosen = logits.gather(1, labels.view(-1, 1)).sum()
    (gradients,) = torch.autograd.grad(chosen, features)
    weight = model.get_classifier().weight  # (C, K)
    cam = torch.einsum("bk,bkhw->bhw", weight[labels], features)
    gradcam = F.relu((gradients.mean(dim=(2, 3), keepdim=True) * features).sum(dim=1))
    return {"logits": logits.detach(), "cam": cam.detach(), "gradcam": gradcam.detach()}


def autocast(device: torch.device, bf16: bool) -> Any:
    """bf16 autocast where asked for (as `run_wsol.py --mixed_precision bf16`), else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def predict(model: torch.nn.Module, split: PreparedSplit, normalizer: PixelNormalizer, batch_size: int,
            bf16: bool = False) -> Predictions:  # fmt: skip
    """The peer's `Predictions` of a split: logits and the true class's maps."""
    model.eval()
    device = normalizer.scale.device
    collected: dict[str, list[np.ndarray]] = {key: [] for key in ("logits", "labels", "indices", *PEER_MAPS)}
    for pixels, labels, indices in make_loader(split, batch_size, shuffle=False, num_workers=0):
        inputs = normalizer(pixels.to(device, non_blocking=True)).requires_grad_(False)
        with torch.enable_grad(), autocast(device, bf16):
            out = class_maps(model, inputs, labels.to(device))
        for key, value in (("labels", labels), ("indices", indices), *((k, out[k]) for k in ("logits", *PEER_MAPS))):
            collected[key].append(value.float().cpu().numpy() if key not in ("labels", "indices") else value.numpy())
    merged = {key: np.concatenate(value) for key, value in collected.items()}
    return Predictions(merged["logits"], merged["labels"], merged["indices"],
                       {name: merged[name] for name in PEER_MAPS}, float("nan"))  # fmt: skip


def train(model: torch.nn.Module, split: PreparedSplit, normalizer: PixelNormalizer, epochs: int, batch_size: int,
          learning_rate: float, max_seconds: float, seed: int, bf16: bool = False) -> dict[str, Any]:  # fmt: skip
    """AdamW with a cosine schedule, the phantoms' affine jitter; stops at `epochs` or at `max_seconds`. Runs on
    the device the normalizer is on (the model there too)."""
    device = normalizer.scale.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(split) / batch_size)
    total = epochs * steps_per_epoch
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    weights = torch.tensor(CLASS_WEIGHTS, device=device)
    torch.manual_seed(seed)
    started, step = time.perf_counter(), 0
    progress = tqdm(total=total, desc="training peer")
    for epoch in range(epochs):
        model.train()
        for pixels, labels, _ in make_loader(split, batch_size, shuffle=True, num_workers=0):
            pixels = augment_batch(pixels.to(device, non_blocking=True),
                                   torch.Generator().manual_seed(seed * 1_000_003 + step))  # fmt: skip
            with autocast(device, bf16):
                logits = model(normalizer(pixels))
            loss = F.cross_entropy(logits.float(), labels.to(device), weight=weights, label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
        if time.perf_counter() - started > max_seconds:
            logger.info("wall-clock budget of %.0f s spent after epoch %d", max_seconds, epoch + 1)
            break
    progress.close()
    return {"epochs": epoch + 1, "steps": step, "train_seconds": time.perf_counter() - started}


def evaluate(model: torch.nn.Module, splits: dict[str, PreparedSplit], normalizer: PixelNormalizer, seed: int,
             batch_size: int, smoothing_sigmas: tuple[float, ...], bf16: bool = False) -> dict[str, Any]:  # fmt: skip
    """Classification on validation and test, and localization of both maps with every baseline, thresholds
    and each map's smoothing width from validation: the code, the choices and the frame `run_wsol.py` reports
    with."""
    predictions = predict_each_split(splits, lambda split: predict(model, split, normalizer, batch_size, bf16))
    results: dict[str, Any] = {"classification": {}}
    for name in ("validation", "test"):
        scores = classification_metrics(predictions[name].labels, softmax(predictions[name].logits), CLASS_NAMES)
        results["classification"][name] = {**scores, "num_samples": int(len(predictions[name].labels))}
    val_boxed = evaluation_split(splits["loc_validation"], predictions["loc_validation"])
    test_boxed = evaluation_split(splits["loc_test"], predictions["loc_test"])
    weights = resample_weights(boxed_patients(splits["loc_test"], predictions["loc_test"]), seed=seed)
    frames: dict[str, list[np.ndarray]] = {}
    table = localization_table(val_boxed, test_boxed, mean_prior_box(splits["train"]), seed=seed,
                               thresholds=FINE_THRESHOLDS, resample_weights=weights,
                               smoothing_sigmas=smoothing_sigmas, upsampled_test_maps=frames)  # fmt: skip
    chosen = max(PEER_MAPS, key=lambda name: map_choice_score(table[name]["validation"]))  # the DeiT's rule
    results["localization"] = {
        "methods": table, "localization_map": chosen, "map_names": PEER_MAPS,
        "pointing_game_per_finding": pointing_game_per_finding(frames[chosen], test_boxed.gt_boxes,
                                                               test_boxed.gt_findings),
    }  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=42, help="the phantom series and the run's seed (run_wsol's)")
    parser.add_argument("--arch", default="resnet10t", help="a timm ResNet")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier of the ResNet's four stages")
    parser.add_argument("--output_stride", type=int, default=8, choices=(8, 16, 32))
    # The data flags carry run_wsol.py's names: bench/ablation.py hands a peer the DeiT arms' own.
    parser.add_argument("--image_size", type=int, default=IMAGE_SIZE, help="input side (run_wsol's default)")
    for name, text in FORWARDED_DATA_FLAGS.items():
        parser.add_argument(f"--{name}", type=int, help=f"run_wsol's: {text}")
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), default="no", help="bf16 autocast (a GPU run)")
    parser.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu, cuda, ...")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--max_seconds", type=float, default=float("inf"),
                        help="wall-clock budget of the whole run (data, training, evaluation), as the DeiT arm's")
    parser.add_argument("--batch_size", "--per_device_train_batch_size", dest="batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--cache_dir")
    parser.add_argument("--evaluate_only", action="store_true",
                        help="evaluate the weights a finished run left in --output_dir again, without training")
    parser.add_argument("--map_smoothing_sigmas", type=float, nargs="+", default=list(SMOOTHING_SIGMAS),
                        help="Gaussian widths (tokens) a map may be smoothed with, chosen on validation (as run_wsol)")
    args = parser.parse_args(argv)
    for sigma in args.map_smoothing_sigmas:  # refused now, not after the training budget is spent
        try:
            check_smoothing(sigma, "--map_smoothing_sigmas")
        except ValueError as error:
            parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from accelerate import Accelerator

    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    processor = build_processor(None, args.image_size)
    flags = ["--seed", str(args.seed), "--output_dir", str(output_dir)]
    for name in (*FORWARDED_DATA_FLAGS, "cache_dir"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    data = settings_for(*flags).data
    splits = prepare_all(data, processor, Accelerator(cpu=True))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    bf16 = args.mixed_precision == "bf16"
    normalizer = PixelNormalizer(processor).to(device)
    model = build_peer(args.arch, len(CLASS_NAMES), args.output_stride, args.width).to(device)
    weights = output_dir / "peer_weights.pt"
    if args.evaluate_only:  # score a finished peer again (new evaluation code), its training record kept
        model.load_state_dict(torch.load(weights, map_location=device))
        training = json.loads((output_dir / "all_results.json").read_text())["training"]
    else:
        # What is left of the run's budget goes to training, less a tenth kept for the evaluation passes.
        train_budget = 0.9 * args.max_seconds - (time.perf_counter() - started)
        training = train(model, splits["train"], normalizer, args.epochs, args.batch_size, args.learning_rate,
                         train_budget, args.seed, bf16)  # fmt: skip
        torch.save(model.state_dict(), weights)
    results = evaluate(model, splits, normalizer, args.seed, batch_size=64,
                       smoothing_sigmas=tuple(args.map_smoothing_sigmas), bf16=bf16)
    results["training"] = training
    results["args"] = vars(args)
    results["environment"] = {"device": str(device), "torch_threads": torch.get_num_threads()}
    (output_dir / "all_results.json").write_text(json.dumps(results, indent=2, default=float))
    if not args.evaluate_only:  # the wall time stays the training run's
        (output_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}")
    logger.info("peer %s: %s", output_dir, json.dumps({k: v for k, v in training.items()}))
    return results


if __name__ == "__main__":
    main()
