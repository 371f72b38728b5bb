"""DeiT with the Semantic/Spatial Calibration Module (SCM) for weakly supervised localization.

References:
    Bai, Zhang, Wang, Wan. "Weakly Supervised Object Localization via Transformer with Implicit
    Spatial Calibration." ECCV 2022 (arXiv:2207.10447); official code: hbai98/SCM.
    Touvron et al. "Training data-efficient image transformers & distillation through attention."
    ICML 2021.
    Gao et al. "TS-CAM: Token Semantic Coupled Attention Map for Weakly Supervised Object
    Localization." ICCV 2021 (the conv head on patch tokens and the F0 * S0 map).

The model classifies from image labels only and returns, per class, a localization map on the patch
grid. This file is uploaded with the weights and run as remote code: it imports only torch,
transformers, the configuration and `scm_diffusion.py` (the SCM operator, its solvers and blocks).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .configuration_deit_scm import DeiTSCMConfig, _pair
from .scm_diffusion import (
    _MINMAX_EPS,
    ClsAttention,
    ClsQuery,
    DeiTSCMClassPooling,
    DeiTSCMDiffusionBlock,
    DeiTSCMSpatialCalibration,
    _wide,
    cls_attention_rows,
    minmax_normalize,
    resolve_solver,
)

# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


@dataclass
class DeiTSCMModelOutput(ModelOutput):
    """Output of [`DeiTSCMModel`].

    Args:
        last_hidden_state (`torch.Tensor` of shape `(batch, 1 + h * w, hidden_size)`):
            tokens after the final LayerNorm, CLS first.
        cls_attention (`torch.Tensor` of shape `(batch, h, w)`):
            CLS->patch attention (softmax row of the CLS query, mean over heads), summed over the
            layers `config.scm_attention_layers` selects; not normalized.
        hidden_states (`tuple(torch.Tensor)`, *optional*): the embeddings and the output of
            every layer, each `(batch, 1 + h * w, hidden_size)`, when `output_hidden_states=True`.
    """

    last_hidden_state: Optional[torch.Tensor] = None
    cls_attention: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None


@dataclass
class DeiTSCMImageClassifierOutput(ModelOutput):
    """Output of [`DeiTSCMForImageClassification`].

    Args:
        loss (`torch.Tensor` of shape `()`, *optional*): class-weighted, label-smoothed
            cross-entropy, when `labels` are given.
        logits (`torch.Tensor` of shape `(batch, num_labels)`): the semantic maps pooled
            (`config.scm_pooling`): after the SCM blocks when they ran (training), S0 otherwise.
        coupled_maps (`torch.Tensor` of shape `(batch, num_labels, h, w)`): F0 coupled with S0, the
            map the paper localizes with at inference: F0 * S0 (`config.scm_coupling="product"`, the
            official definition) or F0 * minmax(S0) (`"minmax"`, never inverted where S0 is negative).
        attention_maps (`torch.Tensor` of shape `(batch, h, w)`): F0, the min-max normalized
            CLS->patch attention.
        semantic_maps (`torch.Tensor` of shape `(batch, num_labels, h, w)`): S0, the conv head on
            the patch tokens.
        calibrated_attention_maps (`torch.Tensor` of shape `(batch, h, w)`, *optional*): F after
            the last SCM block, when the blocks ran.
        probabilities (`torch.Tensor` of shape `(batch, num_labels)`): calibrated class probabilities,
            softmax(logits / `config.calibration_temperature`) (temperature scaling fitted on validation).
        cls_logits (`torch.Tensor` of shape `(batch, num_labels)`, *optional*): the auxiliary CLS
            token classifier's logits, when `config.cls_loss_weight > 0`.
        hidden_states (`tuple(torch.Tensor)`, *optional*): as in [`DeiTSCMModelOutput`].
        pooled_features (`torch.Tensor` of shape `(batch, hidden_size)`, *optional*): the mean of the final
            patch tokens, the features the out-of-distribution score measures (`output_pooled_features`).
        ood_scores (`torch.Tensor` of shape `(batch,)`, *optional*): squared Mahalanobis distance of
            `pooled_features` to the nearest training class mean (tied covariance; Lee et al., NeurIPS 2018),
            when the config holds the statistics; above `config.ood_threshold` the image is unlike the
            training data.
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    coupled_maps: Optional[torch.Tensor] = None
    attention_maps: Optional[torch.Tensor] = None
    semantic_maps: Optional[torch.Tensor] = None
    calibrated_attention_maps: Optional[torch.Tensor] = None
    probabilities: Optional[torch.Tensor] = None
    cls_logits: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    # Last, so that the tuple form keeps the positions it had before they existed.
    pooled_features: Optional[torch.Tensor] = None
    ood_scores: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------


def interpolate_position_embeddings(
    position_embeddings: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int = 1
) -> torch.Tensor:
    """Resize `(1, num_prefix + h*w, D)` position embeddings to another patch grid, bicubically.

    The prefix (CLS) embeddings are kept as they are.
    """
    if tuple(old_grid) == tuple(new_grid):
        return position_embeddings
    prefix, grid = position_embeddings[:, :num_prefix], position_embeddings[:, num_prefix:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    # Bicubic in fp32: half-precision bicubic is not implemented on every device.
    grid = F.interpolate(_wide(grid), size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.to(position_embeddings.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix, grid], dim=1)


def _check_channels(pixel_values: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Validate (B, C, H, W) input; repeat a 1-channel radiograph to a 3-channel model's channels."""
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (batch, channels, height, width), got {tuple(pixel_values.shape)}")
    channels = pixel_values.shape[1]
    if channels == num_channels:
        return pixel_values
    if channels == 1:
        # Radiographs are grayscale: a 3-channel (ImageNet-pretrained) model takes them repeated.
        return pixel_values.expand(-1, num_channels, -1, -1)
    raise ValueError(f"pixel_values has {channels} channels, the model expects {num_channels} (or 1)")


class DeiTSCMPatchEmbeddings(nn.Module):
    """Non-overlapping patches projected to tokens by a strided convolution."""

    def __init__(self, config: DeiTSCMConfig) -> None:
        super().__init__()
        patch = _pair(config.patch_size)
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=patch, stride=patch)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        patches = self.projection(_check_channels(pixel_values, self.num_channels))
        grid = (patches.shape[-2], patches.shape[-1])
        return patches.flatten(2).transpose(1, 2), grid


class DeiTSCMConvStem(nn.Module):
    """Convolutional stem in place of the patch projection (Xiao et al., NeurIPS 2021).

    log2(patch) stages of Conv kxk stride 2 padding 1 + BatchNorm + ReLU, widths doubling up to
    `hidden_size`, then a 1x1 convolution to the token width: the same grid as the patch projection, with
    overlapping, translation-aware receptive fields that a from-scratch transformer otherwise learns slowly.
    k = 3 is Xiao et al.'s stem; k = 4 (`config.conv_stem_kernel_size`) centres every token on its patch.
    """

    def __init__(self, config: DeiTSCMConfig) -> None:
        super().__init__()
        patch = _pair(config.patch_size)
        self.num_channels = config.num_channels
        stages = max(patch).bit_length() - 1
        kernel = config.conv_stem_kernel_size
        layers: list[nn.Module] = []
        channels = config.num_channels
        for index in range(stages):
            stride = (2 if (patch[0] >> index) > 1 else 1, 2 if (patch[1] >> index) > 1 else 1)
            width = max(config.hidden_size >> (stages - 1 - index), 8)
            layers += [
                # A stride-1 side (non-square patches) keeps the 3-wide kernel: 4 would shrink the grid.
                nn.Conv2d(
                    channels,
                    width,
                    kernel_size=(kernel if stride[0] == 2 else 3, kernel if stride[1] == 2 else 3),
                    stride=stride,
                    padding=1,
                    bias=False,
                ),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        layers.append(nn.Conv2d(channels, config.hidden_size, kernel_size=1))
        self.stem = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        features = self.stem(_check_channels(pixel_values, self.num_channels))
        return features.flatten(2).transpose(1, 2), (features.shape[-2], features.shape[-1])


class DeiTSCMEmbeddings(nn.Module):
    """CLS token + patch embeddings + learned position embeddings (interpolated for other sizes)."""

    def __init__(self, config: DeiTSCMConfig) -> None:
        super().__init__()
        self.grid_size = config.grid_size
        stem = DeiTSCMConvStem if config.patch_embedding == "conv_stem" else DeiTSCMPatchEmbeddings
        self.patch_embeddings = stem(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        num_positions = self.grid_size[0] * self.grid_size[1] + 1
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, grid = self.patch_embeddings(pixel_values)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        position = interpolate_position_embeddings(self.position_embeddings, self.grid_size, grid)
        return self.dropout(tokens + position), grid


class DeiTSCMAttention(nn.Module):
    """Multi-head self-attention that also returns the CLS query's attention row.

    The output always comes from `scaled_dot_product_attention` (fused). When SCM needs the CLS->token
    row, it is recomputed from this layer's own q and K: softmax(q_cls K^T / sqrt(d)), mean over
    heads. That is one row per head instead of the full (N+1)^2 matrix, so the fused kernel stays
    in use. `fused_attn = False` switches to the explicit softmax(QK^T)V path, kept for testing.

    With `config.attention_locality > 0` every head adds -m_h * d(i, j) to its logits (`distances`, the grid
    distance of two tokens), m_h = softplus(learned) starting at attention_locality * 4^-h.
    """

    def __init__(self, config: DeiTSCMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_probs_dropout_prob
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.fused_attn = True
        self.locality_slope = None
        if float(config.attention_locality) > 0:
            slopes = float(config.attention_locality) * 4.0 ** -torch.arange(self.num_heads, dtype=torch.float32)
            self.locality_slope = nn.Parameter(torch.log(torch.expm1(slopes)))  # softplus^-1

    def locality_bias(self, distances: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(heads, N+1, N+1) additive attention bias, or None without locality."""
        if self.locality_slope is None or distances is None:
            return None
        return -F.softplus(self.locality_slope).view(-1, 1, 1) * distances

    def forward(
        self, hidden: torch.Tensor, need_cls_attention: bool = False, distances: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[ClsAttention]]:
        """The attended tokens and, when asked, the CLS row: computed (eager path) or as the `ClsQuery` that
        `cls_attention_rows` turns into it (fused path), so that an encoder can take all its layers' rows
        in one batch."""
        batch, tokens, dim = hidden.shape
        qkv = self.qkv(hidden).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        dropout = self.attention_dropout if self.training else 0.0
        cls_attention: Union[ClsQuery, torch.Tensor, None] = None
        bias = self.locality_bias(distances)
        if self.fused_attn:
            mask = bias.to(q.dtype) if bias is not None else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
            if need_cls_attention:
                cls_attention = ClsQuery(q[:, :, :1], k, bias[:, :1] if bias is not None else None, self.scale)
        else:
            scores = _wide((q * self.scale) @ k.transpose(-2, -1))
            probs = (scores + bias.to(scores.dtype) if bias is not None else scores).softmax(dim=-1)
            if need_cls_attention:
                cls_attention = probs[:, :, 0].mean(dim=1)
            probs = F.dropout(probs.to(v.dtype), p=dropout, training=self.training)
            out = probs @ v
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_dropout(self.proj(out)), cls_attention


class DeiTSCMMLP(nn.Module):
    def __init__(self, config: DeiTSCMConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(hidden)))))


class DeiTSCMDropPath(nn.Module):
    """Stochastic depth (Huang et al., ECCV 2016): drops the residual branch per sample."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden
        keep = 1.0 - self.drop_prob
        mask = hidden.new_empty((hidden.shape[0],) + (1,) * (hidden.ndim - 1)).bernoulli_(keep)
        return hidden * mask / keep


class DeiTSCMLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: DeiTSCMConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DeiTSCMAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = DeiTSCMMLP(config)
        self.drop_path = DeiTSCMDropPath(drop_path)

    def forward(
        self, hidden: torch.Tensor, need_cls_attention: bool = False, distances: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[ClsAttention]]:
        attended, cls_attention = self.attention(self.layernorm_before(hidden), need_cls_attention, distances)
        hidden = hidden + self.drop_path(attended)
        hidden = hidden + self.drop_path(self.mlp(self.layernorm_after(hidden)))
        return hidden, cls_attention


def token_distances(grid: tuple[int, int], device: Optional[torch.device] = None) -> torch.Tensor:
    """(N+1, N+1) Euclidean distances between the tokens' grid positions, in patches (row-major patches
    after the CLS token, which is at distance 0 from every token)."""
    # Built where it is used (no host-to-device copy each forward) and from exact differences: cdist's
    # matrix-product path rounds, so a token's distance to itself could come out non-zero on some devices.
    rows, columns = torch.meshgrid(
        torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij"
    )
    points = torch.stack([rows.flatten(), columns.flatten()], dim=1).float()
    distances = torch.zeros(len(points) + 1, len(points) + 1, device=device)
    distances[1:, 1:] = (points[:, None] - points[None]).pow(2).sum(-1).sqrt()
    return distances


class DeiTSCMEncoder(nn.Module):
    def __init__(self, config: DeiTSCMConfig) -> None:
        super().__init__()
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers).tolist()
        self.local = float(config.attention_locality) > 0
        self.layer = nn.ModuleList([DeiTSCMLayer(config, rate) for rate in rates])
        last = config.num_hidden_layers - 1
        self.attention_layers = (
            frozenset(range(config.num_hidden_layers)) if config.scm_attention_layers == "all" else frozenset({last})
        )

    def forward(
        self, hidden: torch.Tensor, output_hidden_states: bool = False, grid: Optional[tuple[int, int]] = None
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
        """`grid` (rows, columns) of the patch tokens: needed only with `attention_locality`."""
        all_hidden: Optional[tuple[torch.Tensor, ...]] = (hidden,) if output_hidden_states else None
        rows: list[torch.Tensor] = []
        queries: list[ClsQuery] = []
        distances = token_distances(grid, hidden.device) if self.local and grid is not None else None
        for index, layer in enumerate(self.layer):
            hidden, row = layer(hidden, need_cls_attention=index in self.attention_layers, distances=distances)
            if isinstance(row, ClsQuery):
                queries.append(row)
            elif row is not None:
                rows.append(row)
            if all_hidden is not None:
                all_hidden = all_hidden + (hidden,)
        if queries:
            rows.append(cls_attention_rows(queries))
        cls_attention = rows[0] if len(rows) == 1 else torch.stack(rows).sum(dim=0)
        return hidden, cls_attention, all_hidden


# --------------------------------------------------------------------------------------------------
# Pretrained models
# --------------------------------------------------------------------------------------------------

# `config.custom_pipelines` for pipeline_cxr.py (kept here too: this file may not import that one, which
# needs the pipeline machinery only when the task is used).
_PIPELINE_ENTRY = {
    "chest-xray-localization": {
        "impl": "pipeline_cxr.ChestXrayLocalizationPipeline",
        "pt": ["AutoModelForImageClassification"],
        "type": "image",
        "default": {},
    }
}

_AUTO_MAP = {
    "AutoConfig": "configuration_deit_scm.DeiTSCMConfig",
    "AutoModel": "modeling_deit_scm.DeiTSCMModel",
    "AutoModelForImageClassification": "modeling_deit_scm.DeiTSCMForImageClassification",
}

# Parameters that take no weight decay besides biases and norm weights.
_NO_DECAY_NAMES = ("cls_token", "position_embeddings", "lam", "beta", "log_r", "locality_slope")


class DeiTSCMPreTrainedModel(PreTrainedModel):
    config_class = DeiTSCMConfig
    base_model_prefix = "deit"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeiTSCMLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if module is getattr(self, "head", None):
            # The official SCM code leaves its 3x3 head conv at PyTorch's default init (kaiming-uniform
            # with a = sqrt(5): U(+-1/sqrt(fan_in)), weight std ~0.0098 at 384 -> C; bias likewise).
            bound = 1.0 / math.sqrt(module.weight[0].numel())
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DeiTSCMEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DeiTSCMDiffusionBlock):
            init.constant_(module.lam, float(self.config.scm_lambda_init))
            init.constant_(module.beta, float(self.config.scm_beta_init))
        elif isinstance(module, DeiTSCMClassPooling) and module.log_r is not None:
            init.constant_(module.log_r, math.log(module.initial_r))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, then every weight checked: a NaN or infinite value, a floating
        weight stored as integers (a retyped safetensors header, which loading would cast without a word), or
        weights that do not match the configuration (unused, missing or of another shape) raise `ValueError`
        naming the folder and the weight. With `output_loading_info=True` the caller gets the report instead
        of the last check."""
        asked = bool(kwargs.get("output_loading_info"))
        kwargs["output_loading_info"] = True
        loaded: Any = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model, info = loaded
        check_weights(model, str(pretrained_model_name_or_path))
        if not asked:  # a caller who asked for the loading report judges it; everyone else gets the weights whole
            # The backbone alone from a classifier's folder (AutoModel) leaves the head's weights unused, rightly.
            part = cls.__name__ not in (model.config.architectures or [cls.__name__])
            check_loading_report(info, str(pretrained_model_name_or_path), unused_allowed=part)
        folder = Path(str(pretrained_model_name_or_path))
        for name in ("model.safetensors",) if folder.is_dir() else ():
            if (folder / name).is_file():
                check_stored_dtypes(folder / name, model)
        return loaded if asked else model

    def set_fused_attention(self, fused: bool = True) -> None:
        """Switch every attention layer between the fused kernel and the explicit (testing) path."""
        for module in self.modules():
            if isinstance(module, DeiTSCMAttention):
                module.fused_attn = fused

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        # Remote code: every Auto class resolves to this repository's files.
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **_AUTO_MAP}
        # The chest-xray-localization pipeline travels with the model when its file is beside this one
        # (a checkout, or a folder saved from one), so `pipeline(model=folder)` finds the task.
        pipeline_file = Path(__file__).with_name("pipeline_cxr.py")
        if pipeline_file.is_file():
            self.config.custom_pipelines = _PIPELINE_ENTRY
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if pipeline_file.is_file() and Path(save_directory).resolve() != pipeline_file.parent.resolve():
            shutil.copyfile(pipeline_file, Path(save_directory) / pipeline_file.name)
        return result


class DeiTSCMModel(DeiTSCMPreTrainedModel):
    """The DeiT backbone: tokens after the final LayerNorm and the CLS->patch attention."""

    def __init__(self, config: DeiTSCMConfig) -> None:
        super().__init__(config)
        self.embeddings = DeiTSCMEmbeddings(config)
        self.encoder = DeiTSCMEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward_features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], Optional[tuple[torch.Tensor, ...]]]:
        """Tokens after the final norm, CLS attention (B, N), patch grid (h, w), hidden states."""
        hidden, grid = self.embeddings(pixel_values)
        hidden, cls_attention, all_hidden = self.encoder(hidden, output_hidden_states, grid)
        return self.layernorm(hidden), cls_attention, grid, all_hidden

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[DeiTSCMModelOutput, tuple]:
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        hidden, cls_attention, grid, all_hidden = self.forward_features(pixel_values, output_hidden_states)
        patch_attention = cls_attention[:, 1:].reshape(-1, grid[0], grid[1])
        output = DeiTSCMModelOutput(last_hidden_state=hidden, cls_attention=patch_attention, hidden_states=all_hidden)
        return output if return_dict is not False else output.to_tuple()


class DeiTSCMForImageClassification(DeiTSCMPreTrainedModel):
    """DeiT + conv head + SCM: classification and per-class localization maps from image labels.

    * S0 = Conv(hidden -> num_labels) over the final-LayerNorm patch tokens: 3x3 as TS-CAM's head, or
      1x1 (`config.head_kernel_size`), a per-token classifier.
    * F0 = minmax(sum over the selected layers of the head-mean CLS->patch attention).
    * Training (or `run_scm=True`): the SCM blocks calibrate (S, F); logits = pooled S (global
      average, or log-sum-exp: `config.scm_pooling`).
    * `config.cls_loss_weight > 0`: a linear classifier on the CLS token adds its weighted
      cross-entropy to the loss (it trains F0 from scratch); logits stay the pooled maps.
    * `config.semantic_loss_weight > 0`: while the blocks run, the cross-entropy of the pooled S0 (the
      inference logits) is added at that weight; logits stay SCM's.
    * Inference: blocks skipped; logits = pooled S0, with the same pooling; localization map of class c
      is F0 * S0[c].
    """

    def __init__(self, config: DeiTSCMConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.deit = DeiTSCMModel(config)
        kernel = config.head_kernel_size
        labels = len(config.id2label or {})
        self.head = nn.Conv2d(config.hidden_size, labels, kernel_size=kernel, padding=kernel // 2)
        self.scm = DeiTSCMSpatialCalibration(config)
        self.pooling = DeiTSCMClassPooling(config)
        self.cls_classifier = (
            nn.Linear(config.hidden_size, labels) if float(config.cls_loss_weight) > 0 else None
        )
        weights = torch.tensor(config.class_weights, dtype=torch.float32) if config.class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)
        # The config's out-of-distribution statistics as tensors, built on first use and again when the
        # config's lists are replaced (`run_wsol.py` sets them after training) or the device changes.
        self._ood_statistics: Optional[tuple[Any, torch.Tensor, torch.Tensor]] = None
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        run_scm: Optional[bool] = None,
        output_pooled_features: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[DeiTSCMImageClassifierOutput, tuple]:
        """
        Args:
            pixel_values: `(batch, channels, height, width)`; any size divisible by the patch size.
            labels: `(batch,)` class indices; when given, `loss` is computed.
            run_scm: run the SCM blocks; defaults to `self.training`, as in the paper.
            output_pooled_features: return `pooled_features`; defaults to whether the config holds the
                out-of-distribution statistics (which score them).
        """
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        hidden, cls_attention, (height, width), all_hidden = self.deit.forward_features(
            pixel_values, output_hidden_states
        )
        patches = hidden[:, 1:].transpose(1, 2).reshape(hidden.shape[0], -1, height, width)
        semantic = self.head(patches)
        gpu_path = resolve_solver(self.config.scm_solver, pixel_values.device) == "dense"
        attention = minmax_normalize(_wide(cls_attention[:, 1:]), short_backward=gpu_path)
        calibrated = None
        semantic_logits = None  # the pooled S0 beside SCM's logits, for `config.semantic_loss_weight`
        if self.training if run_scm is None else run_scm:
            guide = attention.detach() if self.config.scm_detach_attention else attention
            final_semantic, calibrated = self.scm(semantic, guide)
            logits = self.pooling(final_semantic)
            calibrated = calibrated.view(-1, height, width)
            if float(self.config.semantic_loss_weight) > 0 and self.config.scm_num_blocks > 0:
                semantic_logits = self.pooling(semantic)
        else:
            logits = self.pooling(semantic)
        attention = attention.view(-1, 1, height, width)
        cls_logits = self.cls_classifier(hidden[:, 0]) if self.cls_classifier is not None else None
        if output_pooled_features is None:
            output_pooled_features = self.config.ood_threshold is not None
        pooled = hidden[:, 1:].mean(dim=1) if output_pooled_features else None
        output = DeiTSCMImageClassifierOutput(
            loss=self.total_loss(logits, cls_logits, labels, semantic_logits) if labels is not None else None,
            logits=logits,
            coupled_maps=couple(attention, semantic, self.config.scm_coupling),
            attention_maps=attention[:, 0],
            semantic_maps=semantic,
            calibrated_attention_maps=calibrated,
            probabilities=(_wide(logits.detach()) / float(self.config.calibration_temperature)).softmax(-1),
            cls_logits=cls_logits,
            hidden_states=all_hidden,
            pooled_features=pooled,
            ood_scores=self.ood_scores(pooled.detach()) if pooled is not None else None,
        )
        return output if return_dict is not False else output.to_tuple()

    def ood_scores(self, features: torch.Tensor) -> Optional[torch.Tensor]:
        """(batch,) squared Mahalanobis distances of pooled features to the nearest class mean, or None when
        the config holds no statistics (`run_wsol.py` fits them after training)."""
        if self.config.ood_threshold is None:
            return None
        # The config's lists themselves are the key (held, so compared by identity): an id() alone could be
        # reused by a new list once the old one is freed, and stale statistics would be scored silently.
        key = (self.config.ood_class_means, self.config.ood_precision, features.device)
        cached = self._ood_statistics
        if cached is None or not (cached[0][0] is key[0] and cached[0][1] is key[1] and cached[0][2] == key[2]):
            means = torch.tensor(self.config.ood_class_means, dtype=torch.float64, device=features.device)
            precision = torch.tensor(self.config.ood_precision, dtype=torch.float64, device=features.device)
            self._ood_statistics = (key, means, precision)
        _, means, precision = self._ood_statistics  # type: ignore[misc]  # set just above
        centred = _wide(features).to(torch.float64)[:, None, :] - means[None]  # (B, C, D)
        distances = torch.einsum("bcd,de,bce->bc", centred, precision, centred)
        return distances.amin(dim=-1).to(features.dtype)

    def total_loss(
        self,
        logits: torch.Tensor,
        cls_logits: Optional[torch.Tensor],
        labels: torch.Tensor,
        semantic_logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The loss of the pooled class maps, plus the CLS token's at `config.cls_loss_weight` when it has a
        classifier, plus the pooled S0's at `config.semantic_loss_weight` when the SCM blocks ran."""
        loss = self.compute_loss(logits, labels)
        if cls_logits is not None:
            loss = loss + float(self.config.cls_loss_weight) * self.compute_loss(cls_logits, labels)
        if semantic_logits is not None:
            loss = loss + float(self.config.semantic_loss_weight) * self.compute_loss(semantic_logits, labels)
        return loss

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with `config.class_weights` and `config.label_smoothing` (PyTorch semantics:
        the mean is weighted by the target classes' weights)."""
        logits = _wide(logits)
        class_weights: Optional[torch.Tensor] = self.class_weights  # type: ignore[assignment]  # a buffer or None
        weights = class_weights.to(logits.device, logits.dtype) if class_weights is not None else None
        return F.cross_entropy(
            logits, labels.to(logits.device).long(), weight=weights, label_smoothing=self.config.label_smoothing
        )

    def parameter_groups(
        self, learning_rate: float = 5e-5, scm_learning_rate: float = 5e-4, weight_decay: float = 0.05
    ) -> list[dict[str, Any]]:
        """AdamW parameter groups: backbone vs SCM and head, each split into decay / no decay.

        No decay on biases, norm weights, the CLS token, position embeddings and SCM's lambda/beta.
        The original scripts trained the backbone at 5e-5 and SCM with the head at 5e-4.
        """
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            is_backbone = name.startswith(f"{self.base_model_prefix}.")
            no_decay = parameter.ndim <= 1 or name.rsplit(".", 1)[-1] in _NO_DECAY_NAMES
            groups.setdefault((is_backbone, no_decay), []).append(parameter)
        return [
            {
                "params": params,
                "lr": learning_rate if is_backbone else scm_learning_rate,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "name": f"{'backbone' if is_backbone else 'scm_head'}{'_no_decay' if no_decay else ''}",
            }
            for (is_backbone, no_decay), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1]))
        ]


def check_loading_report(info: dict[str, Any], source: str, unused_allowed: bool = False) -> None:
    """Raise `ValueError` when the weights file and the configuration disagree: weights the model has no place
    for (a config edited to fewer layers) or parameters the file lacks (they would stay random), which
    transformers only logs."""
    unexpected = [] if unused_allowed else sorted(map(str, info.get("unexpected_keys") or ()))
    missing = sorted(map(str, info.get("missing_keys") or ())) + sorted(map(str, info.get("mismatched_keys") or ()))
    for problem, keys in (("holds weights this configuration has no place for", unexpected),
                          ("lacks weights this configuration needs (they would stay random)", missing)):  # fmt: skip
        if keys:
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            raise ValueError(f"{source}: the weights file {problem}: {shown}; was config.json edited?")


def check_weights(module: nn.Module, source: str) -> None:
    """Raise `ValueError` naming `source` and the first weight (parameter or buffer) with a NaN or infinite value."""
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{source}: weight {name} holds NaN or infinite values (a damaged or diverged model)")


def check_stored_dtypes(path: Union[str, Path], model: nn.Module) -> None:
    """Raise `ValueError` when a safetensors file stores a weight that `model` holds in floating point as anything
    else: an integer header (a retyped or damaged file) would be cast silently into garbage on load. Integer
    buffers (BatchNorm's batch counter) stay integers."""
    from safetensors import safe_open

    floating = {name for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            dtype = handle.get_slice(key).get_dtype()
            if key in floating and dtype not in ("F16", "BF16", "F32", "F64"):
                raise ValueError(f"{path}: weight {key} is stored as {dtype}, not as floating point (a damaged file)")


def couple(attention: torch.Tensor, semantic: torch.Tensor, coupling: str) -> torch.Tensor:
    """The coupled map: F0 `(B, 1, h, w)` with S0 `(B, C, h, w)` -> `(B, C, h, w)`.

    `"product"`: F0 * S0, as the official SCM and TS-CAM code compute it. `"minmax"`: F0 * S0 min-max
    normalized per image and class, so that the peak of F0 on the finding stays a peak when S0 is negative
    there (see `DeiTSCMConfig.scm_coupling`).
    """
    if coupling == "product":
        return attention * semantic
    # F0 / span times (S0 - min): the min-max normalization folded into the product, one operation fewer on
    # the inference path (a GPU's kernel launches).
    low, high = torch.aminmax(semantic.flatten(2), dim=-1)
    span = (high - low).clamp_min(_MINMAX_EPS)[..., None, None]
    return (attention / span) * (semantic - low[..., None, None])


def select_class_maps(
    maps: torch.Tensor, labels: Optional[torch.Tensor] = None, logits: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Pick one class's map per image: `maps` (B, C, h, w) -> (B, h, w).

    Uses `labels` when given (ground-truth-known localization), else the argmax of `logits`. A map with
    no class axis (B, h, w), as F0 (`attention_maps`), is every class's and is returned as it is.
    """
    if maps.ndim == 3:
        return maps
    if labels is None:
        if logits is None:
            raise ValueError("select_class_maps needs labels or logits")
        labels = logits.argmax(dim=-1)
    index = labels.to(maps.device).long().view(-1, 1, 1, 1).expand(-1, 1, *maps.shape[-2:])
    return maps.gather(1, index)[:, 0]


DeiTSCMConfig.register_for_auto_class()
DeiTSCMModel.register_for_auto_class("AutoModel")
DeiTSCMForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "DeiTSCMModelOutput",
    "DeiTSCMImageClassifierOutput",
    "DeiTSCMPreTrainedModel",
    "DeiTSCMModel",
    "DeiTSCMForImageClassification",
    "DeiTSCMSpatialCalibration",
    "DeiTSCMClassPooling",
    "DeiTSCMConvStem",
    "DeiTSCMDiffusionBlock",
    "minmax_normalize",
    "select_class_maps",
    "couple",
    "check_weights",
    "check_stored_dtypes",
    "interpolate_position_embeddings",
    "token_distances",
]
