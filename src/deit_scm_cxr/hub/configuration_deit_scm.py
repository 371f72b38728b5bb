"""Configuration of DeiT-SCM: a DeiT backbone with the Semantic/Spatial Calibration Module.

SCM is from Bai et al., "Weakly Supervised Object Localization via Transformer with Implicit
Spatial Calibration", ECCV 2022 (arXiv:2207.10447). DeiT is from Touvron et al., "Training
data-efficient image transformers & distillation through attention", ICML 2021.

This file is uploaded next to the weights and loaded as remote code, so it imports only installed
packages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

from transformers import PretrainedConfig

DEFAULT_ID2LABEL = {0: "Atelectasis", 1: "Other_pathologies", 2: "No_pathologies"}

# timm's `deit_{tiny,small,base}_patch16_224` dimensions, and a micro size (not a timm model) for
# training from scratch on a CPU in minutes: the default of run_wsol.py on the phantoms.
BACKBONE_PRESETS: dict[str, dict[str, int]] = {
    "deit-micro": {
        "hidden_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "intermediate_size": 384,
        "patch_size": 8,
    },
    "deit-tiny": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},
    "deit-small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
    "deit-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}

SCM_VARIANTS: dict[str, dict[str, Any]] = {
    # The official SCM code (hbai98/SCM, lib/models/deit.py): CLS->patch attention summed over all
    # layers, loss_rate (lambda) 1, thred (beta) 0.5, four encoder blocks, Newton-Schulz with 16
    # iterations in the first block and 4 in the others; plain cross-entropy.
    "paper": {
        "scm_attention_layers": "all",
        "scm_lambda_init": 1.0,
        "scm_beta_init": 0.5,
        "scm_num_blocks": 4,
        "scm_first_block_iterations": 16,
        "scm_iterations": 4,
        "class_weights": None,
        "label_smoothing": 0.0,
        "scm_pooling": "mean",
        # The official inference map, F0 * S0 as it comes (TS-CAM's and SCM's `cams = attn * feature_map`).
        "scm_coupling": "product",
    },
    # This project's chest X-ray defaults (the original training scripts): last-layer attention only,
    # lambda 2, beta 0.1, four blocks of four diffusion steps, class weights for the imbalanced
    # three-class NIH set, label smoothing 0.1; and log-sum-exp pooling for small findings.
    "cxr": {
        "scm_attention_layers": "last",
        "scm_lambda_init": 2.0,
        "scm_beta_init": 0.1,
        "scm_num_blocks": 4,
        "scm_first_block_iterations": 4,
        "scm_iterations": 4,
        "class_weights": [0.7045, 0.1181, 0.1774],
        "label_smoothing": 0.1,
        # A finding covers a few patches: log-sum-exp pooling (Wang et al., CVPR 2017) lets those patches
        # decide the logit. On the phantoms, from scratch, the global mean reached test balanced accuracy
        # 0.45-0.49; LSE (r = 5) 0.96 (bench/RESULTS.md).
        "scm_pooling": "lse",
        "scm_lse_r": 5.0,
        "scm_coupling": "minmax",
    },
}

_ATTENTION_LAYER_CHOICES = ("all", "last")
_CONNECTIVITY_CHOICES = (4, 8)
# How SCM computes X^T F (see `scm_solver`). "auto": "dense" on a GPU, "polynomial" elsewhere.
SCM_SOLVERS = ("auto", "polynomial", "dense", "newton_schulz", "polynomial_full_gradient")
_SOLVER_CHOICES = SCM_SOLVERS
_POOLING_CHOICES = ("mean", "lse")
_COUPLING_CHOICES = ("minmax", "product")
_PATCH_EMBEDDING_CHOICES = ("patch", "conv_stem")
_CONV_STEM_KERNELS = (3, 4)


def _pair(value: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair of ints, got {value!r}")
    return value  # type: ignore[return-value]


class DeiTSCMConfig(PretrainedConfig):
    r"""Configuration of [`DeiTSCMForImageClassification`].

    Backbone fields carry the names transformers' ViT/DeiT configurations use; the defaults are
    DeiT-Small at 224x224 with the official SCM semantics (`scm_variant="paper"`).

    Args:
        image_size (`int` or `(int, int)`, defaults to 224): input resolution the position embeddings
            are made for; other sizes are served by interpolating them.
        patch_size (`int` or `(int, int)`, defaults to 16): side of the square patches.
        num_channels (`int`, defaults to 3): input channels. A 3-channel model also accepts
            1-channel input, repeated to 3 channels.
        hidden_size (`int`, defaults to 384): token width.
        num_hidden_layers (`int`, defaults to 12): transformer blocks.
        num_attention_heads (`int`, defaults to 6): heads per block; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 1536): MLP width.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (a key of `transformers.activations.ACT2FN`).
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon (DeiT uses 1e-6).
        qkv_bias (`bool`, defaults to `True`): bias on the query/key/value projection.
        hidden_dropout_prob (`float`, defaults to 0.0): dropout after the attention projection and the MLP.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on the attention probabilities.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth, increasing linearly with depth to this value.
        patch_embedding (`str`, defaults to `"patch"`): how pixels become tokens. `"patch"` is DeiT's
            strided patch projection (what pretrained DeiT weights hold). `"conv_stem"` replaces it with
            log2(patch_size) 3x3 stride-2 convolutions (BatchNorm + ReLU) and a 1x1 projection, as in
            Xiao et al., "Early Convolutions Help Transformers See Better" (NeurIPS 2021): a transformer
            trained from scratch on a few thousand images learns far faster with it. Needs a
            power-of-two patch size.
        conv_stem_kernel_size (`int`, defaults to 3): kernel side of the stem's stride-2 convolutions (padding 1):
            3 (Xiao et al.) or 4. With 3, each stage centres its output half a step before the centre of the
            two inputs it replaces, so a token's receptive field is centred (patch_size - 1) / 2 pixels up
            and left of its patch's centre (3.5 px at patch 8), while every consumer of the grid (SCM's
            graph, the processor's map-to-image transform, wsolevaluation's resize) puts the token at the
            patch centre: the maps land shifted by almost half a cell. With 4 the centres coincide exactly.
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal initializer.
        scm_num_blocks (`int`, defaults to 4): SCM diffusion blocks run in training.
        scm_lambda_init (`float`, defaults to 1.0): initial lambda of each block (learnable; scales the
            semantic similarity in L = lap * (lambda * E - 1)).
        scm_beta_init (`float`, defaults to 0.5): initial beta of each block (learnable; the tanhshrink
            threshold relative to the map's maximum).
        scm_first_block_iterations (`int`, defaults to 16): Newton-Schulz iterations in the first block.
        scm_iterations (`int`, defaults to 4): Newton-Schulz iterations in every later block.
        scm_schulz_alpha (`float`, defaults to 0.002): Newton-Schulz start X0 = alpha * L^T.
        scm_attention_layers (`str`, defaults to `"all"`): which layers' CLS->patch attention forms
            the initial map: `"all"` (summed over layers, as the official code) or `"last"`.
        scm_connectivity (`int`, defaults to 4): neighbours per patch in the grid graph: 4 or 8.
        scm_solver (`str`, defaults to `"auto"`): how X^T F is computed (`SCM_SOLVERS`). `"auto"` picks
            `"dense"` on a GPU and `"polynomial"` elsewhere, by the device of the input. `"dense"` forms L
            as one (B, N, N) matrix (a batched product for E, a constant grid Laplacian) and runs the
            official iteration X <- X (2I - L X) with two batched matrix products per iteration: few,
            large kernels, the GPU's strength. `"newton_schulz"` runs the same official iteration with L
            as a stencil (X0 built without gradient in both). `"polynomial"` uses that L is
            symmetric, so the k-th iterate is a closed-form polynomial,
            X_k = alpha * Lb * sum_{j < 2^k} (I - alpha L Lb)^j with Lb = L without gradient (the official
            X0): the official values and gradients, with fewer dense products.
            `"polynomial_full_gradient"` is the same polynomial with gradient through X0 as well (Lb = L),
            which the official code does not have.
        scm_pooling (`str`, defaults to `"mean"`): how a class map becomes the class's logit, in training
            (after the SCM blocks) and inference (S0) alike. `"mean"` is the official code's global
            average. `"lse"` is log-sum-exp pooling, (1/r) log(mean exp(r S)), which moves from the mean
            (r -> 0) to the max (r -> inf); Wang et al., "ChestX-ray8", CVPR 2017, pool their chest X-ray
            maps with it because a finding covers a few percent of the film: averaging over every
            patch dilutes the evidence of a 1-4 token lesion 40-150x.
        scm_lse_r (`float`, defaults to 5.0; in (0, 1000]): the sharpness r of `"lse"` pooling (its starting value when
            learnable).
        scm_lse_learnable (`bool`, defaults to `False`): learn r (kept positive through its logarithm).
        scm_coupling (`str`, *optional*): how the coupled map (`coupled_maps`) joins F0 and S0.
            `"product"` is the official definition, F0 * S0[c] (TS-CAM, Gao et al., ICCV 2021; SCM, Bai et al.,
            ECCV 2022): right when S0[c] is positive where the class is, as under global average pooling, but
            where S0[c] is negative (log-sum-exp pooling leaves it negative over most of the image) the
            product turns F0's peak into the map's minimum, and the min-max normalization every consumer
            applies then draws the finding as the coldest spot. `"minmax"` multiplies F0 by S0[c] min-max
            normalized per image and class, F0 * (S0[c] - min) / (max - min): both factors lie in [0, 1], so
            a token where both are high stays the peak whatever the pooling and the sign of S0. The `paper`
            variant keeps `"product"` (bit-exact with the official code); `cxr` uses `"minmax"`. Left unset (as in
            every config saved before the field existed), it follows the pooling: `"product"` under `"mean"`,
            where the official definition holds, `"minmax"` under `"lse"`.
        ood_threshold (`float`, *optional*): the out-of-distribution alarm level of `ood_scores` (the squared
            Mahalanobis distance of the pooled features to the nearest class mean under the training split's
            tied covariance, Lee et al., NeurIPS 2018), chosen on the validation split at the false-alarm rate
            `ood_false_alarm_rate`. None (the default, and every model saved before it existed): no score.
        ood_false_alarm_rate (`float`, *optional*): the fraction of validation images above `ood_threshold`.
        ood_class_means (`list[list[float]]`, *optional*): (num_labels, hidden_size) class means of the pooled
            features on the training split.
        ood_precision (`list[list[float]]`, *optional*): (hidden_size, hidden_size) inverse of their tied
            (shrunk) covariance.
        calibration_temperature (`float`, defaults to 1.0): T of temperature scaling (Guo et al., ICML
            2017): the model's `probabilities` are softmax(logits / T); logits are untouched. `run_wsol.py`
            fits T on the validation split after training.
        cls_loss_weight (`float`, defaults to 0.0): weight of an auxiliary cross-entropy on the CLS
            token (a linear classifier on the final CLS token, as ViT and DeiT classify), added to the
            loss when labels are given; 0 (the paper) builds no such classifier. Logits and maps are
            unchanged. Why: F0 is the CLS token's attention, and with a pretrained DeiT that attention
            already looks at objects. From scratch nothing asks the CLS query to look anywhere in
            particular (only the SCM diffusion reads F0), so F0 settles on a fixed spot; a CLS loss makes
            the CLS token gather the evidence of the class, i.e. attend to the finding.
        semantic_loss_weight (`float`, defaults to 0.0): weight of an auxiliary cross-entropy on the pooled
            S0 (the logits inference uses) added to the loss while the SCM blocks run; 0 (the paper) trains
            only the pooled calibrated maps then. Why: inference skips the blocks and classifies and
            localizes with S0, which the SCM phase otherwise trains only through the diffusion; from
            scratch the switch to that objective knocked one seed's validation macro F1 from 0.92 to 0.53.
        attention_locality (`float`, defaults to 0.0): a learnable penalty on attention logits that grows with
            the distance between two patches on the grid, -m_h * d(i, j) (the CLS token is at distance 0 from
            every patch), per head h with slopes starting at attention_locality * 4^-h; 0 (DeiT, the paper)
            adds nothing. The 2D form of ALiBi (Press et al., ICLR 2022), a soft convolutional prior in the
            spirit of ConViT (d'Ascoli et al., ICML 2021): a head can still learn to look far (its slope
            decays), but from scratch a patch token starts by mixing its neighbours, so a lesion's evidence
            stays near the lesion instead of reaching every token after the first layer.
        scm_detach_attention (`bool`, defaults to `False`): SCM diffuses a detached copy of F0, so the loss through
            the SCM blocks trains S0 but not the attention; `False` (the official code) lets it train both.
            Why: from scratch on the phantoms, the runs with SCM leave F0 at chance (pointing game 4.5 %,
            random 5.5 %), while without SCM one seed of three grew an F0 that points at findings (38 %); if the
            gradient SCM sends into F0 parks it on distractors, a detached F0 should behave like the latter
            (measured in bench/RESULTS.md, issue 31).
        head_kernel_size (`int`, defaults to 3): side of the convolution that turns the final patch tokens
            into the class maps S0 (odd; same padding). 3 is TS-CAM's and the SCM code's head. 1 makes S0 a
            per-token linear classifier, the CAM of Zhou et al. (CVPR 2016): a token's class score then
            depends on that token alone, not on its eight neighbours, so S0 cannot place a finding's
            evidence one cell beside it.
        class_weights (`list[float]`, *optional*): per-class weights of the cross-entropy loss.
        label_smoothing (`float`, defaults to 0.0): label smoothing of the cross-entropy loss.
        kwargs: `PretrainedConfig`'s; `id2label` defaults to Atelectasis / Other_pathologies /
            No_pathologies (and `label2id` to its inverse).
    """

    model_type = "deit_scm"

    def __init__(
        self,
        image_size: Union[int, Sequence[int]] = 224,
        patch_size: Union[int, Sequence[int]] = 16,
        num_channels: int = 3,
        hidden_size: int = 384,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 6,
        intermediate_size: int = 1536,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.0,
        initializer_range: float = 0.02,
        patch_embedding: str = "patch",
        conv_stem_kernel_size: int = 3,
        scm_num_blocks: int = 4,
        scm_lambda_init: float = 1.0,
        scm_beta_init: float = 0.5,
        scm_first_block_iterations: int = 16,
        scm_iterations: int = 4,
        scm_schulz_alpha: float = 0.002,
        scm_attention_layers: str = "all",
        scm_connectivity: int = 4,
        scm_solver: str = "auto",
        scm_pooling: str = "mean",
        scm_lse_r: float = 5.0,
        scm_lse_learnable: bool = False,
        scm_coupling: Optional[str] = None,
        cls_loss_weight: float = 0.0,
        semantic_loss_weight: float = 0.0,
        calibration_temperature: float = 1.0,
        attention_locality: float = 0.0,
        scm_detach_attention: bool = False,
        head_kernel_size: int = 3,
        class_weights: Optional[Sequence[float]] = None,
        label_smoothing: float = 0.0,
        ood_threshold: Optional[float] = None,
        ood_false_alarm_rate: Optional[float] = None,
        ood_class_means: Optional[Sequence[Sequence[float]]] = None,
        ood_precision: Optional[Sequence[Sequence[float]]] = None,
        **kwargs: Any,
    ) -> None:
        # Every named argument is a config field of the same name (sequences stored as lists, for JSON).
        fields = {name: value for name, value in locals().items() if name not in ("self", "kwargs", "__class__")}
        if fields["scm_coupling"] is None:
            fields["scm_coupling"] = "product" if scm_pooling == "mean" else "minmax"
        for name in ("image_size", "patch_size", "class_weights"):
            if fields[name] is not None and not isinstance(fields[name], int):
                fields[name] = list(fields[name])
        for name, value in fields.items():
            setattr(self, name, value)
        if "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["id2label"] = dict(DEFAULT_ID2LABEL)
            kwargs.setdefault("label2id", {name: index for index, name in DEFAULT_ID2LABEL.items()})
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the field when a value cannot build a model."""
        image_hw = _pair(self.image_size)
        patch_hw = _pair(self.patch_size)
        for name, value in (
            ("num_channels", self.num_channels),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("patch_size", min(patch_hw)),
            ("image_size", min(image_hw)),
            ("scm_first_block_iterations", self.scm_first_block_iterations),
            ("scm_iterations", self.scm_iterations),
            ("head_kernel_size", self.head_kernel_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.scm_num_blocks, int) or self.scm_num_blocks < 0:
            raise ValueError(f"scm_num_blocks must be a non-negative integer, got {self.scm_num_blocks!r}")
        if self.head_kernel_size % 2 == 0:
            raise ValueError(f"head_kernel_size must be odd (the maps keep the grid), got {self.head_kernel_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if image_hw[0] % patch_hw[0] or image_hw[1] % patch_hw[1]:
            raise ValueError(f"image_size {image_hw} must be divisible by patch_size {patch_hw}")
        for name, choices in (
            ("scm_attention_layers", _ATTENTION_LAYER_CHOICES), ("scm_connectivity", _CONNECTIVITY_CHOICES),
            ("scm_solver", _SOLVER_CHOICES), ("scm_pooling", _POOLING_CHOICES), ("scm_coupling", _COUPLING_CHOICES),
            ("patch_embedding", _PATCH_EMBEDDING_CHOICES), ("conv_stem_kernel_size", _CONV_STEM_KERNELS),
        ):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        # Beyond 1e3 r * S overflows float32 for class scores of ordinary size: NaN logits, not an error.
        if not (isinstance(self.scm_lse_r, (int, float)) and 0.0 < float(self.scm_lse_r) <= 1e3):
            raise ValueError(f"scm_lse_r must be a number in (0, 1000], got {self.scm_lse_r!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < 1.0:
            raise ValueError(f"layer_norm_eps must be a number in (0, 1), got {eps!r} (<= 0 gives NaN)")
        if self.patch_embedding == "conv_stem":
            for side in patch_hw:
                if side < 2 or side & (side - 1):
                    raise ValueError(
                        f"patch_embedding='conv_stem' needs a power-of-two patch_size >= 2, got {patch_hw}"
                    )
        self._validate_training_fields()

    def _validate_training_fields(self) -> None:
        """SCM constants, the attention locality, loss weights, dropout rates and class weights."""
        if not 0.0 < self.scm_schulz_alpha:
            raise ValueError(f"scm_schulz_alpha must be positive, got {self.scm_schulz_alpha!r}")
        for name in ("scm_lambda_init", "scm_beta_init", "scm_schulz_alpha", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.scm_beta_init == 0:
            raise ValueError("scm_beta_init must be non-zero (it divides the diffused map)")
        temperature = self.calibration_temperature
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not 0 < temperature < float("inf")
        ):
            raise ValueError(f"calibration_temperature must be a finite number > 0, got {temperature!r}")
        if not (isinstance(self.cls_loss_weight, (int, float)) and 0.0 <= float(self.cls_loss_weight) < float("inf")):
            raise ValueError(f"cls_loss_weight must be a finite number >= 0, got {self.cls_loss_weight!r}")
        weight = self.semantic_loss_weight
        if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and 0.0 <= float(weight) < float("inf")):
            raise ValueError(f"semantic_loss_weight must be a finite number >= 0, got {weight!r}")
        if not (isinstance(self.attention_locality, (int, float)) and 0.0 <= float(self.attention_locality) < 1e3):
            raise ValueError(f"attention_locality must be a number in [0, 1000), got {self.attention_locality!r}")
        if not isinstance(self.scm_detach_attention, bool):
            raise ValueError(f"scm_detach_attention must be true or false, got {self.scm_detach_attention!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.class_weights is not None:
            if len(self.class_weights) != self.num_labels:
                raise ValueError(
                    f"class_weights has {len(self.class_weights)} entries but num_labels is {self.num_labels}"
                )
            if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in self.class_weights):
                raise ValueError(f"class_weights must be finite and non-negative, got {self.class_weights}")
        self._validate_ood()

    def _validate_ood(self) -> None:
        """The out-of-distribution fields: all absent, or a finite threshold with statistics of the right shape."""
        statistics = (self.ood_threshold, self.ood_class_means, self.ood_precision)
        if all(value is None for value in statistics):
            return
        if any(value is None for value in statistics):
            raise ValueError("ood_threshold, ood_class_means and ood_precision must be given together")
        if not (isinstance(self.ood_threshold, (int, float)) and math.isfinite(self.ood_threshold)):
            raise ValueError(f"ood_threshold must be a finite number, got {self.ood_threshold!r}")
        for name, rows, columns in (("ood_class_means", self.num_labels, self.hidden_size),
                                    ("ood_precision", self.hidden_size, self.hidden_size)):  # fmt: skip
            value = getattr(self, name)
            shape_ok = isinstance(value, (list, tuple)) and len(value) == rows
            shape_ok = shape_ok and all(isinstance(row, (list, tuple)) and len(row) == columns for row in value)
            if not shape_ok:
                raise ValueError(f"{name} must be a {rows} x {columns} list of lists")
            if not all(isinstance(x, (int, float)) and math.isfinite(x) for row in value for x in row):
                raise ValueError(f"{name} holds a value that is not a finite number")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns) at `image_size`."""
        image_hw, patch_hw = _pair(self.image_size), _pair(self.patch_size)
        return image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1]

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """`PretrainedConfig.from_dict`, refusing a dictionary of another model type (transformers only warns,
        then builds this configuration from fields it does not have)."""
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"the configuration is for model_type {model_type!r}, not {cls.model_type!r}")
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def _dict_from_json_file(cls, json_file: Any) -> Any:
        # json raises RecursionError on deeply nested input, which transformers does not catch.
        try:
            return super()._dict_from_json_file(json_file)
        except RecursionError:
            raise ValueError(f"{json_file}: the JSON nests too deeply to be a configuration") from None

    @classmethod
    def from_preset(cls, backbone: str = "deit-small", scm_variant: str = "paper", **overrides: Any) -> DeiTSCMConfig:
        """Build a configuration from a named backbone and SCM variant.

        Args:
            backbone: `"deit-tiny"`, `"deit-small"` or `"deit-base"` (timm's `deit_*_patch16_224`), or
                `"deit-micro"` (96 wide, 2 layers, patch 8: a CPU demo size with no pretrained weights;
                2 layers, not 4, because over seeds 0-2 it classified better on validation and trained in
                less time; with the centred stem, 1 layer and a 1x1 head localized no better on the
                validation boxes of seeds 0-2 and classified worse: bench/RESULTS.md).
            scm_variant: `"paper"` (the official SCM code's semantics) or `"cxr"` (this project's
                chest X-ray defaults). See `SCM_VARIANTS`.
            **overrides: any configuration field, applied last.
        """
        if backbone not in BACKBONE_PRESETS:
            raise ValueError(f"backbone must be one of {sorted(BACKBONE_PRESETS)}, got {backbone!r}")
        if scm_variant not in SCM_VARIANTS:
            raise ValueError(f"scm_variant must be one of {sorted(SCM_VARIANTS)}, got {scm_variant!r}")
        kwargs: dict[str, Any] = {**BACKBONE_PRESETS[backbone], **SCM_VARIANTS[scm_variant], **overrides}
        return cls(**kwargs)


__all__ = ["DeiTSCMConfig", "BACKBONE_PRESETS", "SCM_SOLVERS", "SCM_VARIANTS"]
