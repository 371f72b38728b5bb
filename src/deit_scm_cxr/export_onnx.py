"""Export a saved DeiT-SCM model's inference graph to ONNX, and check it against PyTorch with onnxruntime.

    deit-scm-export-onnx --model outputs/wsol --output outputs/wsol/model.onnx

The graph is the inference path (the SCM blocks do not run at inference): `pixel_values` (batch, 3, H, W)
-> `logits` (batch, C), `probabilities` (batch, C; temperature-scaled), `coupled_maps` (batch, C,
h, w; F0 * S0), `semantic_maps` (batch, C, h, w; S0) and `attention_maps` (batch, h, w; F0). The batch
axis is dynamic. torch.onnx's TorchDynamo exporter writes it (opset `OPSET`); `optimum` was not used: its
exporters need a model-type config of their own for every architecture, which a custom remote-code model
does not have, while `torch.onnx.export` takes the module as it is. Preprocessing stays in Python
(`CXRImageProcessor`: DICOM decoding, windowing, CLAHE), as in every other entry point.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

logger = logging.getLogger("export_onnx")

OPSET = 18
# torch.onnx.export (dynamo) translates to opset 18 and converts upwards; below it the converter fails and keeps 18.
MIN_OPSET = 18
OUTPUT_NAMES = ("logits", "probabilities", "coupled_maps", "semantic_maps", "attention_maps")


class InferenceGraph(torch.nn.Module):
    """The model's inference outputs as a tuple (what ONNX needs), in `OUTPUT_NAMES` order."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values)
        return tuple(outputs[name] for name in OUTPUT_NAMES)


def load_model(model_dir: str) -> Any:
    from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMForImageClassification

    model = DeiTSCMForImageClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    model.set_fused_attention(False)  # the explicit softmax(QK^T)V path: plain ONNX operators
    return model


def export(model: torch.nn.Module, output: str | Path, image_size: Sequence[int], opset: int = OPSET) -> Path:
    """Write the inference graph of `model` for inputs of `image_size` (height, width), dynamic batch."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, *image_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        InferenceGraph(model),
        (example,),
        str(output),
        input_names=["pixel_values"],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={"pixel_values": {0: batch}},
        opset_version=opset,
        dynamo=True,
        external_data=False,
    )
    return output


def written_opset(onnx_path: str | Path) -> int:
    """The default-domain opset the file declares (what a runtime will hold it to)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return next(int(entry.version) for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def parity(model: torch.nn.Module, onnx_path: str | Path, pixel_values: torch.Tensor) -> dict[str, float]:
    """Max absolute difference per output between onnxruntime (CPU) and PyTorch on the same inputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    theirs = session.run(list(OUTPUT_NAMES), {"pixel_values": pixel_values.numpy()})
    with torch.no_grad():
        ours = InferenceGraph(model)(pixel_values)
    return {name: float(np.abs(a - b.numpy()).max()) for name, a, b in zip(OUTPUT_NAMES, theirs, ours)}


def cli() -> None:
    """The console script (deit-scm-export-onnx): `main`, with its return value kept from the exit status."""
    main()


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved DeiT-SCM folder")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=OPSET)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not Path(args.model, "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json (not a saved model folder)")
    if args.opset < MIN_OPSET:
        parser.error(f"--opset {args.opset}: torch's exporter writes opset {MIN_OPSET} or later")
    model = load_model(args.model)
    size = model.config.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    path = export(model, args.output, size, args.opset)
    written = written_opset(path)
    if written != args.opset:  # the converter may fall back to another version: say so, never the asked one
        sys.stderr.write(f"deit-scm-export-onnx: error: asked for opset {args.opset}, the file holds opset {written}\n")
        raise SystemExit(1)
    check = parity(model, path, torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(0)))
    report = {"onnx": str(path), "opset": written, "image_size": list(size), "max_abs_difference": check}
    print(json.dumps(report))
    if max(check.values()) > 1e-4:
        sys.stderr.write(f"deit-scm-export-onnx: error: ONNX and PyTorch differ by more than 1e-4: {check}\n")
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    cli()
