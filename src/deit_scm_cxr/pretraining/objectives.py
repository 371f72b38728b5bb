"""The pretraining objectives of `run_pretrain.py`, on timm's `VisionTransformer`: multi-label BCE with the
optional attention-MIL, patch-CAM and attention-guidance terms (`SupervisedObjective`), and DINO
(`DINOTrainer`; Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F

from deit_scm_cxr.data.prepare import PixelNormalizer


def random_resized_crops(
    pixels: torch.Tensor, out_size: int, scale: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """One random crop per image of uint8 (B, H, W): area share in `scale`, aspect ratio in [3/4, 4/3],
    resampled to `out_size` as one batched bilinear sampling (DINO's RandomResizedCrop, no flips: the
    heart's side is anatomy)."""
    batch = pixels.shape[0]
    area = scale[0] + torch.rand(batch, generator=generator) * (scale[1] - scale[0])
    log_ratio = (torch.rand(batch, generator=generator) * 2 - 1) * math.log(4 / 3)
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(batch, generator=generator) * 2 - 1) * (1 - height)
    zero = torch.zeros(batch)
    theta = torch.stack([torch.stack([width, zero, centre_x], 1), torch.stack([zero, height, centre_y], 1)], 1)
    grid = F.affine_grid(theta.to(pixels.device), (batch, 1, out_size, out_size), align_corners=False)
    crops = F.grid_sample(
        pixels.unsqueeze(1).float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    # Exposure jitter: brightness and contrast +-20 %, as a film's window varies.
    gain = 0.8 + torch.rand(batch, 1, 1, 1, generator=generator).to(pixels.device) * 0.4
    offset = (torch.rand(batch, 1, 1, 1, generator=generator).to(pixels.device) * 2 - 1) * 25
    mean = crops.mean(dim=(2, 3), keepdim=True)
    crops = (crops - mean) * gain + mean + offset
    return crops.squeeze(1).round().clamp(0, 255).to(torch.uint8)




def cls_attention_row(attention: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The CLS token's attention over all tokens, head mean (B, T), of a timm `Attention` module given
    its input: the row DeiT-SCM reads as F0."""
    batch, count, _ = tokens.shape
    qkv = attention.qkv(tokens).reshape(batch, count, 3, attention.num_heads, attention.head_dim)
    q, k = qkv.permute(2, 0, 3, 1, 4)[:2]
    q, k = attention.q_norm(q), attention.k_norm(k)
    scores = (q[:, :, :1] * attention.scale) @ k.transpose(-2, -1)  # (B, heads, 1, T)
    return scores.softmax(dim=-1).mean(dim=1)[:, 0]


class SupervisedObjective(torch.nn.Module):
    """Multi-label BCE of the CLS-token head, plus three optional terms, all from image labels only and
    all leaving the backbone timm's own class (the head is shared, so nothing is added to the checkpoint):

    - `mil_weight`: the same head on every patch token, pooled with the last layer's CLS attention as the
      weights: attention-based multiple-instance pooling (Ilse et al., *Attention-based Deep Multiple
      Instance Learning*, ICML 2018).
    - `patch_cam_weight`: the same head on every patch token, log-sum-exp pooled (sharpness `lse_r`;
      Pinheiro & Collobert, CVPR 2015): a class activation map (Zhou et al., CVPR 2016) in the patch
      tokens, as the fine-tuning head reads them.
    - `guidance_weight`: the cross-entropy from the image's own CAM, sum over its positive findings of
      ReLU(CAM), detached and normalized over patches, to every layer's CLS attention row. SCM assumes
      F0 already points at the object (Bai et al., ECCV 2022); a backbone pretrained on thousands of
      classes gets there on its own, one pretrained on seven findings does not (bench/RESULTS.md), so this
      term asks for it directly. It is ramped in linearly over `guidance_warmup_steps` while the CAM forms.
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        mil_weight: float = 0.0,
        patch_cam_weight: float = 0.0,
        guidance_weight: float = 0.0,
        lse_r: float = 5.0,
        guidance_warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.mil_weight = mil_weight
        self.patch_cam_weight = patch_cam_weight
        self.guidance_weight = guidance_weight
        self.lse_r = lse_r
        self.guidance_warmup_steps = guidance_warmup_steps
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=False)
        self._attention_inputs: dict[int, torch.Tensor] = {}
        for index, block in enumerate(backbone.blocks):
            block.attn.register_forward_pre_hook(partial(self._keep_input, index))

    def _keep_input(self, index: int, module: torch.nn.Module, inputs: tuple) -> None:
        self._attention_inputs[index] = inputs[0]

    def _cls_rows(self, layers: Sequence[int]) -> list[torch.Tensor]:
        """The CLS rows over the patch tokens (B, N) of `layers`, renormalized over the patches."""
        prefix = self.backbone.num_prefix_tokens
        rows = []
        for index in layers:
            row = cls_attention_row(self.backbone.blocks[index].attn, self._attention_inputs[index])[:, prefix:]
            rows.append(row / row.sum(dim=-1, keepdim=True).clamp_min(1e-12))
        return rows

    def forward(self, pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(pixels)
        loss = F.binary_cross_entropy_with_logits(self.backbone.forward_head(tokens), targets)
        if not (self.mil_weight or self.patch_cam_weight or self.guidance_weight):
            return loss
        patch_logits = self.backbone.head(tokens[:, self.backbone.num_prefix_tokens :])  # (B, N, K)
        if self.mil_weight:
            (weights,) = self._cls_rows([len(self.backbone.blocks) - 1])
            pooled = (weights.unsqueeze(-1) * patch_logits).sum(dim=1)
            loss = loss + self.mil_weight * F.binary_cross_entropy_with_logits(pooled, targets)
        if self.patch_cam_weight:
            r = self.lse_r
            pooled = (torch.logsumexp(r * patch_logits, dim=1) - math.log(patch_logits.shape[1])) / r
            loss = loss + self.patch_cam_weight * F.binary_cross_entropy_with_logits(pooled, targets)
        if self.guidance_weight:
            loss = loss + self._ramp() * self.guidance_weight * self._guidance(patch_logits.detach(), targets)
        if self.training:
            self.step += 1
        return loss

    def _ramp(self) -> float:
        if self.guidance_warmup_steps <= 0:
            return 1.0
        return min(1.0, float(self.step) / self.guidance_warmup_steps)

    def _guidance(self, patch_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over layers and over images with a positive finding of -sum_i t_i log a_i."""
        target = (F.relu(patch_logits) * targets.unsqueeze(1)).sum(dim=-1)  # (B, N)
        mass = target.sum(dim=-1, keepdim=True)
        keep = mass.squeeze(-1) > 0
        if not bool(keep.any()):
            return patch_logits.new_zeros(())
        target = target[keep] / mass[keep]
        rows = self._cls_rows(range(len(self.backbone.blocks)))
        terms = [-(target * torch.log(row[keep].clamp_min(1e-12))).sum(dim=-1).mean() for row in rows]
        return torch.stack(terms).mean()


class DINOHead(torch.nn.Module):
    """Projection head of DINO: a 3-layer MLP to a bottleneck, L2-normalized, then a weight-normalized
    linear layer to `out_dim` prototypes (Caron et al. 2021, sizes scaled down for a 96-wide backbone)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 128) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(in_dim, hidden), torch.nn.GELU(),
            torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
            torch.nn.Linear(hidden, bottleneck),
        )  # fmt: skip
        self.prototypes = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(bottleneck, out_dim, bias=False))
        with torch.no_grad():
            self.prototypes.parametrizations.weight.original0.fill_(1.0)  # fixed norm, as in DINO
        self.prototypes.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.prototypes(F.normalize(self.mlp(features), dim=-1))


def dino_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], centre: torch.Tensor,
    student_temperature: float, teacher_temperature: float,
) -> torch.Tensor:  # fmt: skip
    """Cross-entropy between the teacher's centred, sharpened distribution of each global crop and the
    student's distribution of every other crop, averaged over pairs (DINO's loss)."""
    targets = [F.softmax((t - centre) / teacher_temperature, dim=-1).detach() for t in teacher]
    logs = [F.log_softmax(s / student_temperature, dim=-1) for s in student]
    total, pairs = 0.0, 0
    for i, target in enumerate(targets):
        for j, log_probs in enumerate(logs):
            if i == j:
                continue
            total = total + torch.sum(-target * log_probs, dim=-1).mean()
            pairs += 1
    return total / pairs


class DINOTrainer(torch.nn.Module):
    """Student backbone + head, EMA teacher and centre: one `step` computes the loss of a batch."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        embed_dim: int,
        out_dim: int,
        image_size: int,
        patch_size: int,
        local_crops: int = 4,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
    ) -> None:
        super().__init__()
        import copy

        self.student = backbone
        self.student_head = DINOHead(embed_dim, out_dim)
        self.teacher = copy.deepcopy(backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.student_head).requires_grad_(False)
        self.register_buffer("centre", torch.zeros(1, out_dim))
        self.image_size, self.patch_size, self.local_crops = image_size, patch_size, local_crops
        self.temperatures = (student_temperature, teacher_temperature)

    def loss(self, pixels: torch.Tensor, normalizer: PixelNormalizer, generator: torch.Generator) -> torch.Tensor:
        size, patch = self.image_size, self.patch_size
        local_size = max(patch * 2, (size // 2) // patch * patch)
        global_crops = [normalizer(random_resized_crops(pixels, size, (0.4, 1.0), generator)) for _ in range(2)]
        local_crops = [
            normalizer(random_resized_crops(pixels, local_size, (0.1, 0.4), generator))
            for _ in range(self.local_crops)
        ]
        with torch.no_grad():
            teacher = [self.teacher_head(self.teacher(crop)) for crop in global_crops]
        student = [self.student_head(self.student(crop)) for crop in global_crops + local_crops]
        loss = dino_loss(student, teacher, self.centre, *self.temperatures)
        with torch.no_grad():
            batch_centre = torch.cat(teacher).mean(dim=0, keepdim=True)
            self.centre.mul_(0.9).add_(batch_centre, alpha=0.1)
        return loss

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        pairs = [(self.student, self.teacher), (self.student_head, self.teacher_head)]
        for source, target in pairs:
            for p_s, p_t in zip(source.parameters(), target.parameters()):
                p_t.mul_(momentum).add_(p_s.detach(), alpha=1 - momentum)
