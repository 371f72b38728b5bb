"""SCM, the activation diffusion of Bai et al., "Weakly Supervised Object Localization via Transformer with
Implicit Spatial Calibration", ECCV 2022 (official code: hbai98/SCM): the diffusion operator on the patch
grid, its solvers (the official detached-X0 Newton-Schulz iteration, its Horner form on stencil products,
a dense batched form with a hand-written backward), the diffusion blocks, the spatial calibration stack
and the class pooling; and F0's input, the CLS attention rows of several layers computed in one batch.

Uploaded with the model beside `modeling_deit_scm.py`, which imports it relatively; it imports only torch
and the configuration.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_deit_scm import DeiTSCMConfig

_MINMAX_EPS = 1e-12


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 are widened; float64 stays float64, so a double model matches the
    official code to double precision, not to float32's)."""
    # A Python-level dtype test: torch.promote_types would dispatch an operation in every layer.
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def minmax_normalize(maps: torch.Tensor, start_dim: int = 1, short_backward: bool = False) -> torch.Tensor:
    """(x - min) / (max - min) over the dimensions from `start_dim` on; constant maps become 0.

    `short_backward`: the hand-written backward of `_MinMax` (the GPU path's; the same gradient up to
    rounding, ties aside), else autograd's, whose rounding the CPU path's recorded runs were made with."""
    flat = maps.flatten(start_dim)
    if short_backward and torch.is_grad_enabled() and flat.requires_grad:
        return _MinMax.apply(flat).view_as(maps)
    low = flat.amin(dim=-1, keepdim=True)
    high = flat.amax(dim=-1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(_MINMAX_EPS)).view_as(maps)


def _minmax_forward(flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(normalized, span, clamped span, index of the min, index of the max) of (batch, M) rows."""
    low, low_index = flat.min(dim=-1, keepdim=True)
    high, high_index = flat.max(dim=-1, keepdim=True)
    span = high - low
    spread = span.clamp_min(_MINMAX_EPS)
    return (flat - low) / spread, span, spread, low_index, high_index


def _minmax_backward(
    grad: torch.Tensor,
    normalized: torch.Tensor,
    span: torch.Tensor,
    spread: torch.Tensor,
    low_index: torch.Tensor,
    high_index: torch.Tensor,
) -> torch.Tensor:
    """The gradient of D = (a - min a) / max(max a - min a, eps) with respect to a: grad / spread, and at the
    min and max entries the gradient of min and max (the span's only where it was not clamped). Where
    min or max ties, it goes to one of the tied entries (as `torch.max(dim)`'s), not shared among them (as
    `amax`'s): either is a subgradient."""
    scaled = grad / spread
    total = scaled.sum(dim=1, keepdim=True)
    weighted = torch.bmm(scaled.unsqueeze(1), normalized.unsqueeze(2)).squeeze(2) * (span > _MINMAX_EPS)
    return scaled.scatter_add(1, low_index, weighted - total).scatter_add(1, high_index, -weighted)


class _MinMax(torch.autograd.Function):
    """`minmax_normalize` of (batch, M) rows with a backward of ten operations (autograd's takes about
    twenty-five: a GPU launches each)."""

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor) -> torch.Tensor:
        normalized, *saved = _minmax_forward(flat)
        ctx.save_for_backward(normalized, *saved)
        return normalized

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _minmax_backward(grad, *ctx.saved_tensors)


class ClsQuery(NamedTuple):
    """What the CLS->token attention row of one layer is computed from (the fused path never forms it)."""

    query: torch.Tensor  # (batch, heads, 1, head_dim): the CLS token's query
    keys: torch.Tensor  # (batch, heads, N + 1, head_dim)
    bias: Optional[torch.Tensor]  # (heads, 1, N + 1) locality bias of the CLS row, or None
    scale: float


ClsAttention = Union[torch.Tensor, ClsQuery]


def cls_attention_rows(queries: list[ClsQuery]) -> torch.Tensor:
    """Sum over layers of softmax(q_cls K^T * scale + bias) averaged over heads: (batch, N + 1).

    Several layers are stacked and computed in one batch: a handful of operations instead of a dozen per
    layer (on a GPU each is a kernel launch, and twelve layers' rows cost more launches than the SCM blocks).
    """
    if len(queries) == 1:
        query, keys, bias, scale = queries[0]
        scores = (_wide(query) * scale) @ _wide(keys).transpose(-2, -1)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        return scores.softmax(dim=-1).mean(dim=1)[:, 0]
    query = _wide(torch.stack([q.query for q in queries])) * queries[0].scale  # (L, B, H, 1, d)
    scores = query @ _wide(torch.stack([q.keys for q in queries])).transpose(-2, -1)
    if queries[0].bias is not None:
        biases = [q.bias for q in queries if q.bias is not None]  # the layers share one distance prior or none
        scores = scores + torch.stack(biases).unsqueeze(1).to(scores.dtype)
    return scores.softmax(dim=-1).mean(dim=2).sum(dim=0)[:, 0]


def grid_offsets(connectivity: int) -> list[tuple[int, int]]:
    """Neighbour offsets (dy, dx) of a patch in the 4- or 8-connected grid graph."""
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        offsets += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    return offsets


def _shifted(padded: torch.Tensor, dy: int, dx: int, height: int, width: int) -> torch.Tensor:
    """From a grid zero-padded by one on dims 1 and 2, the view whose (y, x) holds (y + dy, x + dx)."""
    return padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]


class GridOperator:
    """L = lap * (lambda * E - 1) on the patch grid, stored as a stencil.

    lap = D - A is the Laplacian of the 4- (or 8-) connected grid graph, E the cosine similarity of
    the patches' class vectors. Only the diagonal and the grid neighbours of L are non-zero:
        L_ii = deg_i * (lambda * E_ii - 1),   L_ij = 1 - lambda * E_ij  for neighbours j,
    so L @ Y costs (1 + connectivity) * N * M instead of N^2 * M, and E is never formed. Both lap and
    E are symmetric, hence so is L.
    """

    def __init__(self, semantic: torch.Tensor, lam: torch.Tensor, connectivity: int) -> None:
        batch, _, self.height, self.width = semantic.shape
        self.offsets = grid_offsets(connectivity)
        unit = F.normalize(semantic, dim=1, eps=_MINMAX_EPS).permute(0, 2, 3, 1)  # (B, h, w, C)
        padded = F.pad(unit, (0, 0, 1, 1, 1, 1))
        inside = F.pad(unit.new_ones(1, self.height, self.width, 1), (0, 0, 1, 1, 1, 1))
        coefficients: list[torch.Tensor] = []
        degree: Any = 0
        for dy, dx in self.offsets:
            valid = _shifted(inside, dy, dx, self.height, self.width)[..., 0]
            similarity = (unit * _shifted(padded, dy, dx, self.height, self.width)).sum(dim=-1)
            coefficients.append(valid * (1.0 - lam * similarity))
            degree = degree + valid
        self.coefficients = torch.stack(coefficients, dim=-1).unsqueeze(-1)  # (B, h, w, K, 1)
        self.diagonal = (degree * (lam * unit.square().sum(dim=-1) - 1.0)).unsqueeze(-1)  # (B, h, w, 1)

    def matmul(self, other: torch.Tensor) -> torch.Tensor:
        """L @ other for `other` of shape (batch, h * w, M)."""
        batch, _, cols = other.shape
        grid = other.reshape(batch, self.height, self.width, cols)
        padded = F.pad(grid, (0, 0, 1, 1, 1, 1))
        out = self.diagonal * grid
        for k, (dy, dx) in enumerate(self.offsets):
            out = out + self.coefficients[:, :, :, k] * _shifted(padded, dy, dx, self.height, self.width)
        return out.reshape(batch, -1, cols)

    def detached(self) -> GridOperator:
        """The same operator with its gradient cut (the official Newton-Schulz start is built under no_grad)."""
        copy = object.__new__(GridOperator)
        copy.height, copy.width, copy.offsets = self.height, self.width, self.offsets
        copy.coefficients, copy.diagonal = self.coefficients.detach(), self.diagonal.detach()
        return copy

    def dense(self) -> torch.Tensor:
        """L as a dense (batch, N, N) matrix."""
        batch = self.diagonal.shape[0]
        size = self.height * self.width
        eye = torch.eye(size, device=self.diagonal.device, dtype=self.diagonal.dtype)
        return self.matmul(eye.expand(batch, size, size))


def newton_schulz_inverse(operator: GridOperator, iterations: int, alpha: float) -> torch.Tensor:
    """Approximate L^-1 with Newton-Schulz: X0 = alpha * L^T, X <- X (2I - L X).

    As in the official code, X0 is built without gradient; L carries the gradient into every
    iteration. 2X - X (L X) is one batched GEMM with the stencil product L X as its operand.
    """
    with torch.no_grad():
        inverse = alpha * operator.dense().transpose(-2, -1)
    for _ in range(iterations):
        inverse = torch.baddbmm(inverse, inverse, operator.matmul(inverse), beta=2.0, alpha=-1.0)
    return inverse


def grid_laplacian(
    height: int,
    width: int,
    connectivity: int,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """lap = D - A of the 4- or 8-connected (height x width) grid graph, as a dense (N, N) matrix."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    dy = (rows[:, None] - rows[None, :]).abs()
    dx = (cols[:, None] - cols[None, :]).abs()
    adjacent = (dy + dx == 1) if connectivity == 4 else ((dy <= 1) & (dx <= 1) & (dy + dx > 0))
    adjacency = adjacent.to(dtype)
    return torch.diag(adjacency.sum(dim=1)) - adjacency


class _DenseDiffusion(torch.autograd.Function):
    """One SCM block on the dense operator, forward and backward written by hand (the GPU path).

    Autograd would dispatch about 120 operations for a block of four iterations, most of them tiny
    element-wise ones; by hand it takes about 65. The quantities (flat semantic s (B, C, N), attention v
    (B, N)): U = s / max(|s|, eps), E = U^T U, K = -L = lap - lambda lap * E (the operator's negative, so
    that each step is one fused product), X0 = alpha L (no gradient, as the official code), X <- 2X + X (K X),
    y = X^T v, z = y / (beta max(max v, eps)), a = z - tanh z, D = (a - min a) / max(max a - min a, eps),
    s' = s (1 + D), v' = v + D. The max of v and the min-max of a take their gradients as
    `_minmax_backward` says.
    """

    @staticmethod
    def forward(
        ctx: Any,
        semantic: torch.Tensor,
        attention: torch.Tensor,
        lam: torch.Tensor,
        beta: torch.Tensor,
        laplacian: torch.Tensor,
        iterations: int,
        alpha: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        norm = torch.linalg.vector_norm(semantic, dim=1, keepdim=True)  # (B, 1, N)
        clamped = norm.clamp_min(_MINMAX_EPS)
        unit = semantic / clamped
        similarity = torch.bmm(unit.transpose(1, 2), unit)
        scaled = lam * laplacian
        negative = torch.addcmul(laplacian, scaled, similarity, value=-1.0)  # K = -L
        iterate = negative * -alpha
        iterates, products = [], []
        for _ in range(iterations):
            product = torch.bmm(negative, iterate)  # K X = -L X
            iterates.append(iterate)
            products.append(product)
            iterate = torch.baddbmm(iterate, iterate, product, beta=2.0)
        diffused = torch.bmm(attention.unsqueeze(1), iterate).squeeze(1)
        peak, peak_index = attention.max(dim=1, keepdim=True)
        peak = peak.clamp_min(_MINMAX_EPS)
        threshold = peak * beta
        scaled_diffused = diffused / threshold
        tanh = torch.tanh(scaled_diffused)
        shrunk = scaled_diffused - tanh
        normalized, span, spread, low_index, high_index = _minmax_forward(shrunk)
        ctx.save_for_backward(
            semantic, attention, beta, laplacian, scaled, norm, clamped, unit, similarity, negative, iterate,
            peak, peak_index, threshold, scaled_diffused, tanh, low_index, high_index, span, spread, normalized,
            *iterates, *products,
        )  # fmt: skip
        ctx.iterations, ctx.lam_shape = iterations, lam.shape
        return torch.addcmul(semantic, semantic, normalized.unsqueeze(1)), attention + normalized

    @staticmethod
    def backward(ctx: Any, grad_semantic: torch.Tensor, grad_attention: torch.Tensor) -> tuple[Any, ...]:
        (semantic, attention, beta, laplacian, scaled, norm, clamped, unit, similarity, negative, last, peak,
         peak_index, threshold, scaled_diffused, tanh, low_index, high_index, span, spread, normalized,
         *saved) = ctx.saved_tensors  # fmt: skip
        iterates, products = saved[: ctx.iterations], saved[ctx.iterations :]
        # s' = s (1 + D), v' = v + D
        grad_input = torch.addcmul(grad_semantic, grad_semantic, normalized.unsqueeze(1))
        grad_normalized = (grad_semantic * semantic).sum(dim=1) + grad_attention
        grad_shrunk = _minmax_backward(grad_normalized, normalized, span, spread, low_index, high_index)
        # a = z - tanh z;  z = y / threshold, threshold = beta * max(peak, eps)
        grad_diffused = grad_shrunk * tanh.square() / threshold
        # Row and whole-tensor dot products as one product each (bmm, vdot): one launch, not two.
        grad_threshold = -torch.bmm(grad_diffused.unsqueeze(1), scaled_diffused.unsqueeze(2)).squeeze(2)
        grad_beta = torch.vdot(grad_threshold.flatten(), peak.flatten()).view_as(beta)
        grad_peak = grad_threshold * beta * (peak > _MINMAX_EPS)
        # y = X_k^T v, X_k by the iteration from a start without gradient
        grad_vectors = torch.baddbmm(grad_attention.unsqueeze(-1), last, grad_diffused.unsqueeze(-1)).squeeze(-1)
        grad_vectors = grad_vectors.scatter_add(1, peak_index, grad_peak)
        grad_negative = _negative_operator_gradient(negative, iterates, products, attention, grad_diffused)
        # K = lap - lambda lap * E, E = U^T U, U = s / max(|s|, eps)
        weighted_lap = grad_negative * laplacian
        grad_lam = torch.vdot(weighted_lap.flatten(), similarity.flatten()).neg().view(ctx.lam_shape)
        # dE = -lambda lap * dK; the sign is carried to the last line.
        grad_similarity = grad_negative * scaled
        grad_unit = torch.bmm(unit, grad_similarity + grad_similarity.transpose(1, 2))
        radial = (grad_unit * unit).sum(dim=1, keepdim=True) * (norm > _MINMAX_EPS)
        grad_input = grad_input - torch.addcmul(grad_unit, unit, radial, value=-1.0) / clamped
        return grad_input, grad_vectors, grad_lam, grad_beta, None, None, None


def _negative_operator_gradient(
    negative: torch.Tensor,
    iterates: list[torch.Tensor],
    products: list[torch.Tensor],
    vectors: torch.Tensor,
    grad: torch.Tensor,
) -> torch.Tensor:
    """The gradient of y = X_k^T v with respect to K = -L, through X <- 2X + X (K X) (X0 held constant).

    With G the gradient of X_{j+1} and A = X_j^T G: G_j = 2G + G (K X_j)^T + K^T A and dK += A X_j^T. The
    A X_j^T terms are summed at the end as one product of concatenated blocks (a k-fold shorter launch
    sequence for long iterations)."""
    if not iterates:
        return torch.zeros_like(negative)
    grad_iterate = vectors.unsqueeze(-1) * grad.unsqueeze(1)  # d(v^T X)/dX = v g^T
    inners, transposed = [], []
    for iterate, product in zip(reversed(iterates), reversed(products)):
        transposed.append(iterate.transpose(1, 2))
        inners.append(torch.bmm(transposed[-1], grad_iterate))
        grad_iterate = torch.baddbmm(grad_iterate, grad_iterate, product.transpose(1, 2), beta=2.0)
        grad_iterate = torch.baddbmm(grad_iterate, negative.transpose(1, 2), inners[-1])
    return torch.bmm(torch.cat(inners, dim=2), torch.cat(transposed, dim=1))


# Up to this many Newton-Schulz iterations the polynomial is summed term by term (2^k - 1
# matrix-vector products); beyond it by doubling (k - 1 dense squarings).
_HORNER_MAX_ITERATIONS = 5


def newton_schulz_apply(
    operator: GridOperator, vectors: torch.Tensor, iterations: int, alpha: float, detach_start: bool = True
) -> torch.Tensor:
    """X_k^T v for the k-th Newton-Schulz iterate from X0 = alpha * L^T, without forming X_k.

    Write Lb for L with its gradient cut (the official code builds X0 = alpha * Lb^T under no_grad) and
    E = I - L X0 = I - alpha L Lb. The recursion X_{k+1} = X_k (2I - L X_k) gives I - L X_{k+1} =
    (I - L X_k)^2, so I - L X_k = E^(2^k) and X_{k+1} = X_k (I + E^(2^k)), that is

        X_k = alpha * Lb * sum_{j < 2^k} E^j,     X_k^T v = alpha * sum_{j < 2^k} R^j (Lb v),  R = I - alpha Lb L,

    as functions of L and Lb separately (L and Lb are symmetric, so E^T = R): this closed form has the
    official iteration's values *and* gradients. With `detach_start=False` Lb is L itself, the gradient of
    the whole expression (`scm_solver="polynomial_full_gradient"`). The sum is taken by Horner's rule with
    stencil products for small k (E is never formed), and by doubling (s_2m = s_m + P^m s_m, P^2m = P^m P^m) for large
    k, carrying Q = I - P^m rather than P^m: P's eigenvalues near 1 (1 - d, small d) would round to 1 in
    float32 under repeated squaring; Q holds d itself, and (I - Q)^2 = I - (2Q - Q^2).

    Args:
        vectors: (batch, N) attention maps F.
    Returns:
        (batch, N) X_k^T F.
    """
    start_operator = operator.detached() if detach_start else operator
    start = start_operator.matmul(vectors.unsqueeze(-1))  # Lb v
    total = start
    if iterations <= _HORNER_MAX_ITERATIONS:
        # R s = alpha Lb (L s): two stencil products per term, no dense N x N matrix at all (forming the
        # dense R cost 5x more than the whole sum on a 12 x 12 grid on CPU).
        for _ in range(2**iterations - 1):
            total = start + total - alpha * start_operator.matmul(operator.matmul(total))
    else:
        # alpha Lb L = (alpha L Lb)^T: the stencil applied to the columns of the dense Lb, transposed.
        residual = (alpha * operator.matmul(start_operator.dense())).transpose(-2, -1)
        for step in range(iterations):
            total = torch.baddbmm(total, residual, total, beta=2.0, alpha=-1.0)  # s + P^m s = 2s - Q s
            if step < iterations - 1:
                residual = torch.baddbmm(residual, residual, residual, beta=2.0, alpha=-1.0)
    return alpha * total.squeeze(-1)


def resolve_solver(solver: str, device: torch.device) -> str:
    """The solver `scm_solver` names, `"auto"` resolved by device: `"dense"` on CUDA (few large kernels),
    `"polynomial"` elsewhere (stencil products: the fastest on a few CPU cores)."""
    if solver != "auto":
        return solver
    return "dense" if device.type == "cuda" else "polynomial"


class DeiTSCMDiffusionBlock(nn.Module):
    r"""One SCM block: activation diffusion of the attention map on the semantic-aware grid graph.

    With S the class maps (B, C, h, w) and F the attention map (B, N):

    .. math::
        E = \cos(S_i, S_j), \quad L = \mathrm{lap} \odot (\lambda E - 1), \quad X \approx L^{-1}
        \text{ (Newton-Schulz)}, \\
        F' = \mathrm{minmax}\big(\mathrm{tanhshrink}(X^\top F / (\beta \max F))\big), \quad
        S \leftarrow S + S \odot F', \quad F \leftarrow F + F'.

    lambda (`lam`) and beta are learnable scalars, one each per block.
    """

    def __init__(self, config: DeiTSCMConfig, iterations: int) -> None:
        super().__init__()
        self.iterations = iterations
        self.alpha = config.scm_schulz_alpha
        self.connectivity: int = config.scm_connectivity
        self.solver: str = config.scm_solver
        self.lam = nn.Parameter(torch.full((1,), float(config.scm_lambda_init)))
        self.beta = nn.Parameter(torch.full((1,), float(config.scm_beta_init)))

    def forward(
        self, semantic: torch.Tensor, attention: torch.Tensor, laplacian: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`laplacian`: the grid's dense lap (N, N), given for the `dense` solver (built once per stack)."""
        height, width = semantic.shape[-2:]
        solver = resolve_solver(self.solver, semantic.device)
        if solver == "dense":
            if laplacian is None:
                laplacian = grid_laplacian(height, width, self.connectivity, semantic.device, semantic.dtype)
            flat, attention = _DenseDiffusion.apply(
                semantic.flatten(2), attention, self.lam, self.beta, laplacian, self.iterations, self.alpha
            )
            return flat.view_as(semantic), attention
        if solver == "newton_schulz":
            inverse = newton_schulz_inverse(
                GridOperator(semantic, self.lam, self.connectivity), self.iterations, self.alpha
            )
            diffused = torch.bmm(attention.unsqueeze(1), inverse).squeeze(1)  # X^T F
        else:
            operator = GridOperator(semantic, self.lam, self.connectivity)
            detach_start = solver == "polynomial"
            diffused = newton_schulz_apply(operator, attention, self.iterations, self.alpha, detach_start)
        # A constant (all-zero) attention map would divide by zero; the official code returns NaN.
        threshold = self.beta * attention.amax(dim=1, keepdim=True).clamp_min(_MINMAX_EPS)
        diffused = F.tanhshrink(diffused / threshold)
        diffused = minmax_normalize(diffused)
        semantic = semantic + semantic * diffused.view(-1, 1, height, width)
        return semantic, attention + diffused


class DeiTSCMSpatialCalibration(nn.Module):
    """The stack of SCM blocks (16 Newton-Schulz iterations in the first, 4 after, by default)."""

    def __init__(self, config: DeiTSCMConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                DeiTSCMDiffusionBlock(config, config.scm_first_block_iterations if i == 0 else config.scm_iterations)
                for i in range(config.scm_num_blocks)
            ]
        )
        self._laplacians: dict[tuple, torch.Tensor] = {}

    @property
    def first_block(self) -> DeiTSCMDiffusionBlock:
        return self.blocks[0]  # type: ignore[return-value]  # nn.ModuleList indexes as Module

    def laplacian(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The grid's dense lap, built once per grid, device and dtype (about fifteen operations saved per
        step); under torch.compile it is built in the graph, which makes it a constant."""
        connectivity = self.first_block.connectivity
        if torch.compiler.is_compiling():
            return grid_laplacian(height, width, connectivity, device, dtype)
        key = (height, width, str(device), dtype)
        if key not in self._laplacians:
            self._laplacians[key] = grid_laplacian(height, width, connectivity, device, dtype)
        return self._laplacians[key]

    def forward(self, semantic: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """semantic (B, C, h, w), attention (B, N) in [0, 1] -> calibrated (semantic, attention)."""
        # Newton-Schulz needs fp32: in bf16 the iteration does not converge to the inverse.
        with torch.autocast(device_type=semantic.device.type, enabled=False):
            semantic = _wide(semantic)
            attention = attention.to(semantic.dtype)
            laplacian = None
            if self.blocks and resolve_solver(self.first_block.solver, semantic.device) == "dense":
                height, width = semantic.shape[-2:]
                laplacian = self.laplacian(height, width, semantic.device, semantic.dtype)
            for block in self.blocks:
                semantic, attention = block(semantic, attention, laplacian)
        return semantic, attention


class DeiTSCMClassPooling(nn.Module):
    r"""Class maps (B, C, h, w) -> logits (B, C).

    `"mean"`: the global average (the official SCM code). `"lse"`: log-sum-exp pooling

    .. math:: \mathrm{LSE}_r(S) = \frac{1}{r} \log \Big( \frac{1}{N} \sum_i e^{r S_i} \Big),

    Wang et al., "ChestX-ray8", CVPR 2017 (eq. 1), for findings that cover a few patches. It lies between
    the mean (r -> 0) and the max (r -> inf), so a small lesion decides the logit while every patch
    still gets gradient. r is fixed (`scm_lse_r`) or learned through log r (`scm_lse_learnable`).
    """

    def __init__(self, config: DeiTSCMConfig) -> None:
        super().__init__()
        self.mode = config.scm_pooling
        self.initial_r = float(config.scm_lse_r)
        self.log_r = nn.Parameter(torch.zeros(1)) if config.scm_lse_learnable else None

    @property
    def r(self) -> torch.Tensor:
        """The LSE sharpness as a 0-dim tensor (learned or configured)."""
        if self.log_r is not None:
            return self.log_r.exp()[0]
        return torch.tensor(self.initial_r)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.mode == "mean":
            return maps.mean(dim=(2, 3))
        flat = _wide(maps.flatten(2))
        r = self.r.to(flat.device, flat.dtype)
        return (torch.logsumexp(r * flat, dim=-1) - math.log(flat.shape[-1])) / r
