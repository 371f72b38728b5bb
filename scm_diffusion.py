"""SCM, the activation diffusion of Bai et al., "Weakly Supervised Object Localization via Transformer with
Implicit Spatial Calibration", ECCV 2022 (official code: hbai98/SCM): the diffusion operator on the patch
grid, its solvers (the official detached-X0 Newton-Schulz iteration, its Horner form on stencil products,
a dense batched form with a hand-written backward), the diffusion blocks, the spatial calibration stack
and the class pooling.

Uploaded with the model beside `modeling_deit_scm.py`, which imports it relatively; it imports only torch
and the configuration.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    from .configuration_deit_scm import DeiTSCMConfig
except ImportError:
    from configuration_deit_scm import DeiTSCMConfig

_MINMAX_EPS = 1e-12


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 are widened; float64 stays float64, so a double model matches the
    official code to double precision, not to float32's)."""
    # A Python-level dtype test: torch.promote_types would dispatch an operation in every layer.
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def minmax_normalize(maps: torch.Tensor, start_dim: int = 1) -> torch.Tensor:
    """(x - min) / (max - min) over the dimensions from `start_dim` on; constant maps become 0."""
    flat = maps.flatten(start_dim)
    low = flat.amin(dim=-1, keepdim=True)
    high = flat.amax(dim=-1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(_MINMAX_EPS)).view_as(maps)


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
        coefficients, degree = [], 0
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


def dense_operator(semantic: torch.Tensor, lam: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
    """L = lap * (lambda * E - 1) as a (batch, N, N) matrix, E = cos(S_i, S_j) from one batched product."""
    unit = F.normalize(semantic.flatten(2), dim=1, eps=_MINMAX_EPS)  # (B, C, N)
    similarity = torch.bmm(unit.transpose(1, 2), unit)
    return laplacian * (lam * similarity - 1.0)


class _DenseNewtonSchulz(torch.autograd.Function):
    """v^T X_k for the official iteration X0 = alpha * L^T (no gradient), X <- 2X - X M with M = L X, and its
    backward written by hand: per iteration, with G the gradient of X_{j+1} and A = X_j^T G,
        dL += -A X_j^T,   dX_j = 2G - G M_j^T - L^T A,
    four batched products (autograd's own graph dispatches about twelve operations per iteration)."""

    @staticmethod
    def forward(ctx: Any, operator: torch.Tensor, vectors: torch.Tensor, iterations: int, alpha: float) -> torch.Tensor:
        iterate = alpha * operator.detach().transpose(-2, -1)
        iterates, products = [], []
        for _ in range(iterations):
            product = torch.bmm(operator, iterate)
            iterates.append(iterate)
            products.append(product)
            iterate = torch.baddbmm(iterate, iterate, product, beta=2.0, alpha=-1.0)
        ctx.save_for_backward(operator, vectors, iterate, *iterates, *products)
        ctx.iterations = iterations
        return torch.bmm(vectors.unsqueeze(1), iterate).squeeze(1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        operator, vectors, last, *saved = ctx.saved_tensors
        iterates, products = saved[: ctx.iterations], saved[ctx.iterations :]
        grad_vectors = torch.bmm(last, grad.unsqueeze(-1)).squeeze(-1) if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return None, grad_vectors, None, None
        grad_iterate = vectors.unsqueeze(-1) * grad.unsqueeze(1)  # d(v^T X)/dX = v g^T
        grad_operator = torch.zeros_like(operator)
        for iterate, product in zip(reversed(iterates), reversed(products)):
            inner = torch.bmm(iterate.transpose(-2, -1), grad_iterate)
            grad_operator = torch.baddbmm(grad_operator, inner, iterate.transpose(-2, -1), alpha=-1.0)
            grad_iterate = torch.baddbmm(grad_iterate, grad_iterate, product.transpose(-2, -1), beta=2.0, alpha=-1.0)
            grad_iterate = torch.baddbmm(grad_iterate, operator.transpose(-2, -1), inner, alpha=-1.0)
        return grad_operator, grad_vectors, None, None


def newton_schulz_dense(operator: torch.Tensor, vectors: torch.Tensor, iterations: int, alpha: float) -> torch.Tensor:
    """X_k^T v by the official iteration on a dense L: X0 = alpha * L^T built without gradient, then
    X <- 2X - X (L X), two batched matrix products per iteration and four in the backward (the GPU path:
    a handful of large kernels per block instead of thousands of small stencil ones)."""
    if iterations == 0:
        return torch.bmm(vectors.unsqueeze(1), alpha * operator.detach().transpose(-2, -1)).squeeze(1)
    return _DenseNewtonSchulz.apply(operator, vectors, iterations, alpha)


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
        self.connectivity = config.scm_connectivity
        self.solver = config.scm_solver
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
            operator = dense_operator(semantic, self.lam, laplacian)
            diffused = newton_schulz_dense(operator, attention, self.iterations, self.alpha)
        elif solver == "newton_schulz":
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

    def forward(self, semantic: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """semantic (B, C, h, w), attention (B, N) in [0, 1] -> calibrated (semantic, attention)."""
        # Newton-Schulz needs fp32: in bf16 the iteration does not converge to the inverse.
        with torch.autocast(device_type=semantic.device.type, enabled=False):
            dtype = torch.promote_types(semantic.dtype, torch.float32)
            semantic, attention = semantic.to(dtype), attention.to(dtype)
            laplacian = None
            if self.blocks and resolve_solver(self.blocks[0].solver, semantic.device) == "dense":
                height, width = semantic.shape[-2:]
                laplacian = grid_laplacian(height, width, self.blocks[0].connectivity, semantic.device, dtype)
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
