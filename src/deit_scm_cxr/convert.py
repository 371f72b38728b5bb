"""Load pretrained DeiT/ViT weights into the DeiT-SCM backbone.

Accepted sources:
* timm `deit_*_patch16_224` / `vit_*` state dicts (`cls_token`, `pos_embed`, `blocks.N.attn.qkv`, ...),
  distilled variants included (the distillation token is dropped);
* transformers ViT/DeiT checkpoints, in the v4 layout (`encoder.layer.N.attention.attention.query`)
  or the v5 layout (`layers.N.attention.q_proj`), with or without the `vit.`/`deit.` prefix.

Position embeddings are interpolated (bicubic) when the checkpoint's grid differs from the model's.
Nothing is downloaded unless the source is `timm:<name>` and the machine is online.

CLI::

    deit-scm-convert --source deit_small.pth --preset deit-small --scm_variant cxr \
        --output_dir ./deit-scm-small-init
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from deit_scm_cxr.hub.configuration_deit_scm import BACKBONE_PRESETS, SCM_VARIANTS, DeiTSCMConfig
from deit_scm_cxr.hub.modeling_deit_scm import (
    DeiTSCMForImageClassification,
    DeiTSCMModel,
    interpolate_position_embeddings,
)

logger = logging.getLogger(__name__)


class WeightConversionError(ValueError):
    """A checkpoint that cannot be read or mapped onto the backbone."""


@dataclass
class LoadReport:
    """What `load_backbone_weights` did: keys the backbone lacked from the checkpoint, keys of the
    checkpoint that were not used, and whether the position embeddings were resized."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    interpolated_position_embeddings: Optional[tuple[tuple[int, int], tuple[int, int]]] = None


_TIMM_LAYER = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.qkv": "attention.qkv",
    "attn.proj": "attention.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_V4_LAYER = {
    "layernorm_before": "layernorm_before",
    "layernorm_after": "layernorm_after",
    "attention.output.dense": "attention.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_V5_LAYER = {
    "layernorm_before": "layernorm_before",
    "layernorm_after": "layernorm_after",
    "attention.o_proj": "attention.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_V4_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_HF_V5_QKV = ("attention.q_proj", "attention.k_proj", "attention.v_proj")


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (.safetensors, .pth/.pt/.bin) or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "model.pth"):
            if (path / name).is_file():
                return read_state_dict(path / name)
        raise WeightConversionError(f"{path}: no model.safetensors or pytorch_model.bin in this directory")
    if not path.is_file():
        raise WeightConversionError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # any reader failure becomes one typed error naming the file
        raise WeightConversionError(f"{path}: cannot read checkpoint ({error})") from error
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise WeightConversionError(f"{path}: expected a state dict, got {type(state).__name__}")
    return dict(state)


def _strip_prefix(key: str) -> str:
    return re.sub(r"^(vit|deit)\.", "", re.sub(r"^(module\.|model\.)", "", key))


def _convert_layer(rest: str, table: Mapping[str, str]) -> Optional[str]:
    for source, target in table.items():
        if rest.startswith(source + "."):
            return target + rest[len(source) :]
    return None


_SIMPLE_KEYS = {
    "cls_token": "embeddings.cls_token",
    "embeddings.cls_token": "embeddings.cls_token",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
    "layernorm.weight": "layernorm.weight",
    "layernorm.bias": "layernorm.bias",
    "pos_embed": "embeddings.position_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
}


def _convert_encoder_key(
    key: str, value: torch.Tensor, qkv_parts: dict[tuple[int, str], dict[int, torch.Tensor]]
) -> Optional[tuple[str, torch.Tensor]]:
    """One encoder-layer key -> (target key, value); separate query/key/value tensors are collected in
    `qkv_parts` (returned as `("", value)`: used, fused later). None when the key is not a layer's."""
    match = re.match(r"^(?:blocks|encoder\.layer|layers)\.(\d+)\.(.+)$", key)
    if not match:
        return None
    index, rest = int(match.group(1)), match.group(2)
    for qkv_names in (_HF_V4_QKV, _HF_V5_QKV):
        for part, name in enumerate(qkv_names):
            if rest.startswith(name + "."):
                qkv_parts.setdefault((index, rest[len(name) + 1 :]), {})[part] = value
                return "", value
    target = (_convert_layer(rest, _TIMM_LAYER) if key.startswith("blocks.") else None) or _convert_layer(
        rest, _HF_V4_LAYER if key.startswith("encoder.") else _HF_V5_LAYER
    )
    return (f"encoder.layer.{index}.{target}", value) if target is not None else None


def _fit_position_embeddings(
    position: torch.Tensor, num_prefix_tokens: int, config: DeiTSCMConfig
) -> tuple[torch.Tensor, Optional[tuple[tuple[int, int], tuple[int, int]]]]:
    """Drop a distillation token's position and interpolate the grid to the config's."""
    if num_prefix_tokens == 2:
        position = torch.cat([position[:, :1], position[:, 2:]], dim=1)
    tokens = position.shape[1] - 1
    side = int(math.isqrt(tokens))
    if side * side != tokens:
        raise WeightConversionError(f"position embeddings of {tokens} patches are not a square grid")
    new_grid = config.grid_size
    if (side, side) == tuple(new_grid):
        return position, None
    return interpolate_position_embeddings(position, (side, side), new_grid), ((side, side), tuple(new_grid))


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: DeiTSCMConfig
) -> tuple[dict[str, torch.Tensor], list[str], Optional[tuple[tuple[int, int], tuple[int, int]]]]:
    """Map a timm or transformers DeiT/ViT state dict onto `DeiTSCMModel` key names.

    Returns the converted dict (keys relative to `DeiTSCMModel`), the unused source keys, and the
    (old, new) grid when position embeddings were interpolated.
    """
    names = {_strip_prefix(key): key for key in state_dict}
    source = {stripped: state_dict[original] for stripped, original in names.items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    qkv_parts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    num_prefix_tokens = 2 if ("dist_token" in source or "embeddings.distillation_token" in source) else 1
    for key, value in source.items():
        converted = (_SIMPLE_KEYS[key], value) if key in _SIMPLE_KEYS else _convert_encoder_key(key, value, qkv_parts)
        if converted is None:
            continue
        used.add(key)
        if converted[0]:
            out[converted[0]] = converted[1]
    for (index, suffix), parts in qkv_parts.items():
        if len(parts) != 3:
            raise WeightConversionError(f"layer {index}: query/key/value {suffix} incomplete ({sorted(parts)})")
        out[f"encoder.layer.{index}.attention.qkv.{suffix}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    resized = None
    if "embeddings.position_embeddings" in out:
        out["embeddings.position_embeddings"], resized = _fit_position_embeddings(
            out["embeddings.position_embeddings"], num_prefix_tokens, config
        )
    unused = sorted(original for stripped, original in names.items() if stripped not in used)
    return out, unused, resized


def load_backbone_weights(
    model: Union[DeiTSCMModel, DeiTSCMForImageClassification],
    source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    allow_missing: bool = False,
) -> LoadReport:
    """Load DeiT/ViT weights into `model`'s backbone and report what did not match.

    `source` is a state dict, a checkpoint path, or `timm:<model name>` (timm's hub; needs network).
    Shape mismatches raise `WeightConversionError`; so do backbone keys the checkpoint lacks (they would stay
    randomly initialized, silently) unless `allow_missing`. Unused checkpoint keys are reported and logged.
    """
    backbone = model.deit if isinstance(model, DeiTSCMForImageClassification) else model
    if isinstance(source, Mapping):
        state = dict(source)
    elif str(source).startswith("timm:"):
        import timm

        state = timm.create_model(str(source)[5:], pretrained=True).state_dict()
    else:
        state = read_state_dict(source)
    converted, unused, resized = convert_state_dict(state, backbone.config)
    for key, value in converted.items():  # NaN weights would load and give NaN logits without a word
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise WeightConversionError(f"{key}: the checkpoint holds NaN or infinite values")
    expected = backbone.state_dict()
    for key, value in converted.items():
        if key in expected and expected[key].shape != value.shape:
            raise WeightConversionError(
                f"{key}: checkpoint shape {tuple(value.shape)} does not fit the model's {tuple(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(converted))
    if missing and not allow_missing:
        raise WeightConversionError(
            f"{len(missing)} of {len(expected)} backbone weights are not in the checkpoint (e.g. {missing[:3]}); "
            "they would stay randomly initialized. Pass allow_missing=True (--allow_missing_keys) to accept that."
        )
    result = backbone.load_state_dict(converted, strict=False)
    report = LoadReport(list(result.missing_keys), sorted(set(unused) | set(result.unexpected_keys)), resized)
    if report.missing_keys:
        logger.warning("backbone keys not in the checkpoint (left as initialized): %s", report.missing_keys)
    if report.unexpected_keys:
        logger.info("checkpoint keys not used: %s", report.unexpected_keys)
    if resized:
        logger.info("position embeddings interpolated from grid %s to %s", *resized)
    return report


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="checkpoint file or directory, or timm:<model name>")
    parser.add_argument("--preset", default="deit-small", choices=sorted(BACKBONE_PRESETS))
    parser.add_argument("--scm_variant", default="paper", choices=sorted(SCM_VARIANTS))
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--allow_missing_keys", action="store_true", help="save even when backbone weights are missing from --source"
    )
    return parser.parse_args(argv)


def cli() -> None:
    """The console script (deit-scm-convert): `main`, with its return value kept from the exit status."""
    raise SystemExit(main())


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    config = DeiTSCMConfig.from_preset(args.preset, args.scm_variant, image_size=args.image_size)
    model = DeiTSCMForImageClassification(config)
    try:
        report = load_backbone_weights(model, args.source, allow_missing=args.allow_missing_keys)
    except WeightConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model.save_pretrained(args.output_dir)
    logger.info(
        "saved to %s (missing %d, unused %d)", args.output_dir, len(report.missing_keys), len(report.unexpected_keys)
    )
    return 0


if __name__ == "__main__":
    cli()
