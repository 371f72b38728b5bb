"""The CLS attention F0 of pretrained backbones on boxed validation phantoms, as a picture (issue 21).

Each row is one boxed validation phantom of `run_wsol.py --seed SEED` (the split the thresholds are chosen
on); the columns are the image with its boxes, then per backbone F0 of the last layer (what the `cxr`
variant reads) and F0 summed over layers (the `paper` variant's). The maps are min-max normalized per image,
as the localization metrics see them.

    python bench/attention_picture.py --backbones supervised=outputs/pretrain-supervised \
        patchcam=outputs/pretrain-patchcam --output attention.png [--count 8 --seed 42]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from deit_scm_cxr.data.prepare import EVALUATION_FRAME, PixelNormalizer
from deit_scm_cxr.pretraining.run import deit_scm_model, phantom_validation_split

VARIANTS = (("cxr", "last layer"), ("paper", "all layers"))


@torch.no_grad()
def attention_maps(directory: Path, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """F0 (N, h, w) of the backbone in `directory`, through the converter, for each variant."""
    return {variant: deit_scm_model(directory, variant)(pixels).attention_maps.float().numpy()
            for variant, _ in VARIANTS}  # fmt: skip


def draw(backbones: dict[str, Path], output: Path, count: int, seed: int, image_size: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from deit_scm_cxr.hub.image_processing_cxr import CXRImageProcessor

    split = phantom_validation_split(seed, image_size)
    boxed = [i for i, boxes in enumerate(split.frame_boxes) if len(boxes)][:count]
    processor = CXRImageProcessor(size={"height": image_size, "width": image_size})
    pixels = PixelNormalizer(processor)(split.pixels[boxed])
    maps = {name: attention_maps(folder, pixels) for name, folder in backbones.items()}
    columns = 1 + 2 * len(backbones)
    figure, axes = plt.subplots(len(boxed), columns, figsize=(1.6 * columns, 1.6 * len(boxed)), squeeze=False)
    for row, index in enumerate(boxed):
        image = split.pixels[index].numpy()
        panels = [("image", image, None)]
        for name in backbones:
            for variant, label in VARIANTS:
                panels.append((f"{name}\n{label}", image, maps[name][variant][row]))
        for column, (title, base, heat) in enumerate(panels):
            axis = axes[row][column]
            axis.imshow(base, cmap="gray")
            if heat is not None:
                span = heat.max() - heat.min()
                normalized = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
                axis.imshow(normalized, cmap="jet", alpha=0.45, extent=(-0.5, image.shape[1] - 0.5,
                                                                         image.shape[0] - 0.5, -0.5))  # fmt: skip
            scale = image.shape[1] / EVALUATION_FRAME[1]  # boxes are in the evaluation frame
            for x0, y0, x1, y1 in split.frame_boxes[index]:
                axis.add_patch(Rectangle((x0 * scale, y0 * scale), (x1 - x0) * scale, (y1 - y0) * scale,
                                         fill=False, edgecolor="red", linewidth=1))  # fmt: skip
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(title, fontsize=7)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", required=True, help="NAME=FOLDER of run_pretrain.py outputs")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--count", type=int, default=8, help="boxed validation phantoms (rows)")
    parser.add_argument("--seed", type=int, default=42, help="the fine-tuning run's seed (its validation split)")
    parser.add_argument("--image_size", type=int, default=96)
    args = parser.parse_args(argv)
    backbones = dict(item.split("=", 1) for item in args.backbones)
    return draw({k: Path(v) for k, v in backbones.items()}, args.output, args.count, args.seed, args.image_size)


if __name__ == "__main__":
    print(main())
