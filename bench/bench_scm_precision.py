"""How precise the SCM is in float32, with bfloat16 inputs, and (on CUDA) with TF32 matmuls.

The SCM blocks always run in float32 (autocast is switched off inside them), so lower precision reaches
them only through their inputs (S0 and F0 from a bf16 backbone) or through TF32 matrix products. On a
DeiT-S grid (14x14) with trained-like class maps, this prints one JSON object: the relative error
(||x - x64|| / ||x64||) of the calibrated semantic maps and attention map against a float64 computation,
for every solver, and in float32 the relative error of the gradients (of a fixed loss, with respect to the
input maps, lambda and beta): the dense GPU path's backward is written by hand.
"""

from __future__ import annotations

import argparse
import json

import torch

from deit_scm_cxr.hub.configuration_deit_scm import DeiTSCMConfig
from deit_scm_cxr.hub.modeling_deit_scm import DeiTSCMSpatialCalibration


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm())


def gradient_error(module: DeiTSCMSpatialCalibration, semantic: torch.Tensor, attention: torch.Tensor) -> dict:
    """Relative error of float32 gradients against float64 ones, for the loss sum(S'^2) + sum(F')."""
    grads = {}
    for dtype in (torch.float64, torch.float32):
        module.to(dtype)
        inputs = [semantic.to(dtype).requires_grad_(True), attention.to(dtype).requires_grad_(True)]
        calibrated, diffused = module(*inputs)
        parameters = [p for block in module.blocks for p in (block.lam, block.beta)]
        values = torch.autograd.grad((calibrated**2).sum() + diffused.sum(), [*inputs, *parameters])
        grads[dtype] = {"semantic": values[0], "attention": values[1], "lambda_beta": torch.cat(values[2:])}
    single, double = grads[torch.float32], grads[torch.float64]
    return {name: relative_error(single[name].cpu(), double[name].cpu()) for name in double}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    semantic = torch.randn(args.batch, 3, 14, 14, generator=generator, dtype=torch.float64) * 2
    semantic += torch.linspace(-1, 1, 14, dtype=torch.float64).view(1, 1, 14, 1)
    attention = torch.rand(args.batch, 196, generator=generator, dtype=torch.float64)
    attention = (attention - attention.amin(1, keepdim=True)) / (
        attention.amax(1, keepdim=True) - attention.amin(1, keepdim=True)
    )
    report: dict = {"device": args.device, "grid": [14, 14], "batch": args.batch, "errors": {}}
    for variant in ("paper", "cxr"):
        for solver in ("polynomial", "newton_schulz", "dense"):
            config = DeiTSCMConfig.from_preset("deit-small", variant, scm_solver=solver)
            module = DeiTSCMSpatialCalibration(config).to(args.device)
            gradient_errors = gradient_error(module, semantic.to(args.device), attention.to(args.device))
            with torch.no_grad():
                reference = [t.cpu() for t in module.double()(semantic.to(args.device), attention.to(args.device))]
                module.float()
                cases = {
                    "fp32": (semantic.float(), attention.float()),
                    "bf16_inputs": (semantic.bfloat16(), attention.bfloat16()),
                }
                errors = {}
                for name, (s, a) in cases.items():
                    outputs = module(s.to(args.device), a.to(args.device))
                    errors[name] = {
                        "semantic": relative_error(outputs[0].cpu(), reference[0]),
                        "attention": relative_error(outputs[1].cpu(), reference[1]),
                    }
                if args.device.startswith("cuda"):
                    torch.backends.cuda.matmul.allow_tf32 = True
                    outputs = module(semantic.float().to(args.device), attention.float().to(args.device))
                    torch.backends.cuda.matmul.allow_tf32 = False
                    errors["tf32"] = {
                        "semantic": relative_error(outputs[0].cpu(), reference[0]),
                        "attention": relative_error(outputs[1].cpu(), reference[1]),
                    }
            errors["fp32_gradients"] = gradient_errors
            report["errors"][f"{variant}/{solver}"] = errors
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
