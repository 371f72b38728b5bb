"""The pictures a run of `run_wsol.py` leaves: training curves, the confusion matrix, the baselines chart
(`metrics_plots/`) and the heatmap overlays (`heatmap_comparisons/`, `localization_samples/`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from deit_scm_cxr.data.cxr import CLASS_NAMES
from deit_scm_cxr.data.prepare import PreparedSplit
from deit_scm_cxr.evaluation.evaluator import Predictions
from deit_scm_cxr.evaluation.reporting import softmax
from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor, overlay_heatmap
from deit_scm_cxr.hub.localization import MAP_LABELS, map_output
from deit_scm_cxr.predict import save_png

OVERLAY_SAMPLES = 8
# The panel titles' names of the maps: OpenCV's Hershey fonts draw ASCII only (no subscript zero, no odot).
PANEL_NAMES = {"coupled": "F0*S0 (coupled)", "semantic": "S0 (semantic, CAM)", "attention": "F0 (attention)"}


def write_plots(output_dir: Path, state: Any, results: dict[str, Any]) -> None:
    """metrics_plots/: per-epoch curves from `state` (a `TrainState`: `history`, `train_losses`), the
    confusion matrix and the baselines chart."""
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
    _plot_epoch_localization(epochs, state.history, folder / "localization.png")
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


def _plot_epoch_localization(epochs: list[int], history: list[dict[str, float]], path: Path) -> None:
    """Every map's validation pointing game per epoch, and the oracle MaxBoxAcc of the map that points best
    (`epoch_localization`); runs without boxed validation images draw empty axes."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.2))
    for name, label in MAP_LABELS.items():
        axis.plot(epochs, [h.get(f"pointing_game_{name}", np.nan) for h in history], label=f"pointing game, {label}")
    axis.plot(epochs, [h.get("max_box_acc", np.nan) for h in history], "k--", marker="o", markersize=3,
              label="MaxBoxAcc, best-pointing map")  # fmt: skip
    axis.set_xlabel("epoch")
    axis.set_ylabel("%")
    axis.set_title("validation localization (unsmoothed maps)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_overlays(
    output_dir: Path, split: PreparedSplit, predictions: Predictions, processor: CXRImageProcessor,
    temperature: float = 1.0,
) -> list[str]:  # fmt: skip
    """heatmap_comparisons/: the released map (the processor's `localization_map`), its predicted and the
    ground-truth boxes on the original image; localization_samples/: the coupled, semantic and attention
    maps side by side, boxes on the released one. A fixed sample: the first boxed images. Each panel is
    titled with its map, the threshold, the predicted class and its probability (scaled by `temperature`,
    the run's calibration), the true class, and a legend of the box colours."""
    comparisons, samples = output_dir / "heatmap_comparisons", output_dir / "localization_samples"
    comparisons.mkdir(parents=True, exist_ok=True)
    samples.mkdir(parents=True, exist_ok=True)
    position = {int(index): row for row, index in enumerate(predictions.indices)}
    chosen = [i for i in range(len(split)) if len(split.frame_boxes[i])][:OVERLAY_SAMPLES]
    probabilities = softmax(predictions.logits, temperature)
    tau = processor.localization_threshold
    written = []
    for index in chosen:
        row = position[index]
        image = np.asarray(split.source[index]["image"].convert("L"))
        geometry = split.geometry[index]
        original_boxes = np.asarray(split.source[index]["boxes"], dtype=np.float64).reshape(-1, 4)
        predicted = int(probabilities[row].argmax())
        verdict = (f"pred. {CLASS_NAMES[predicted]} {probabilities[row, predicted]:.0%}, "
                   f"true {CLASS_NAMES[int(predictions.labels[row])]}")  # fmt: skip
        panels = {}
        for name in MAP_LABELS:
            grid = torch.from_numpy(np.asarray(predictions.maps[name][row], dtype=np.float32))
            # The same post-processing users get: the map of the ground-truth class (the one kept in
            # `predictions`) back in original pixels, and its box at the calibrated threshold.
            post = processor.post_process_localization(
                {"logits": torch.zeros(1, 1), map_output(name): grid[None, None]},
                geometry=np.asarray(geometry)[None],
                labels=[0],
                localization_map=map_output(name),
            )[0]
            released = map_output(name) == processor.localization_map
            boxes = post["boxes"] if released else None
            heading = f"{PANEL_NAMES[name]}, true-class map"
            threshold = f"released: boxes at {tau:.2f} x max" if released else "not released: no boxes"
            title = [heading, threshold, verdict]
            panels[name] = overlay_heatmap(image, post["heatmap"], boxes=boxes, gt_boxes=original_boxes, title=title)
        released_name = next(n for n in MAP_LABELS if map_output(n) == processor.localization_map)
        name = f"{split.image_ids[index]}.png"
        save_png(comparisons / name, panels[released_name])
        save_png(samples / name, np.concatenate(list(panels.values()), axis=1))
        written.append(name)
    return written


def plot_localization_table(table: dict[str, dict], path: str) -> None:
    """Bar chart of calibrated MaxBoxAcc / MaxBoxAccV2 / top-1 Loc per row, the oracle as outlines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from error
    names = list(table)
    measures = ("MaxBoxAcc", "MaxBoxAccV2", "top1_loc")
    figure, axis = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    width = 0.8 / len(measures)
    for k, measure in enumerate(measures):
        positions = np.arange(len(names)) + (k - 1) * width
        calibrated = [table[n]["calibrated_on_validation"][measure] for n in names]
        oracle = [table[n]["test_oracle_max_over_thresholds"][measure] for n in names]
        axis.bar(positions, calibrated, width, label=f"{measure} (τ from validation)")
        axis.bar(positions, oracle, width, fill=False, edgecolor="black", linewidth=0.6)
    axis.set_xticks(np.arange(len(names)), [MAP_LABELS.get(n, n) for n in names], rotation=20)
    axis.set_ylabel("percent of test images")
    axis.set_title("Localization on test (outlines: test oracle)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
