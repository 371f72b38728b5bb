"""CPU latency of the exported ONNX graph (onnxruntime) against PyTorch eager, same inputs, one run.

    python bench/bench_onnx.py --model outputs/wsol      # the default run's model

Exports the model (`export_onnx.export`), checks parity, then times batches of 1 and 16, interleaved round
by round (the median round is reported). Prints one JSON object: per batch size the milliseconds per
image of each engine and the ratio onnxruntime / PyTorch (below 1: ONNX is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import deit_scm_cxr.export_onnx as export_onnx
from timing import timed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch_sizes", default="1,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=10, help="calls per round")
    args = parser.parse_args(argv)
    import onnxruntime

    model = export_onnx.load_model(args.model)
    size = model.config.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    folder = Path(tempfile.mkdtemp(prefix="onnx_bench_"))
    path = export_onnx.export(model, folder / "model.onnx", size)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph = export_onnx.InferenceGraph(model)
    report: dict = {"model": args.model, "image_size": list(size), "threads": torch.get_num_threads(), "batches": {}}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        pixels = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
        feed = {"pixel_values": pixels.numpy()}
        report["batches"][batch] = {"max_abs_difference": export_onnx.parity(model, path, pixels)}

        def run_torch(pixels: torch.Tensor = pixels) -> None:
            with torch.inference_mode():
                graph(pixels)

        def run_onnx(feed: dict = feed) -> None:
            session.run(None, feed)

        run_torch(), run_onnx()  # warm-up
        times = {"pytorch": [], "onnxruntime": []}
        for _ in range(args.rounds):
            times["pytorch"].append(timed(run_torch, "cpu", repeat=args.repeat))
            times["onnxruntime"].append(timed(run_onnx, "cpu", repeat=args.repeat))
        per_image = {k: 1000 * statistics.median(v) / (args.repeat * batch) for k, v in times.items()}
        report["batches"][batch].update(
            {f"{k}_ms_per_image": round(v, 3) for k, v in per_image.items()},
            onnx_vs_pytorch=round(per_image["onnxruntime"] / per_image["pytorch"], 3),
        )
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
