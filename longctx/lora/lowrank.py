"""Low-rank factorization of a weight delta: the pure math behind extract-lora.

For a delta D (out x in) we want LoRA factors B (out x r) and A (r x in) with B @ A close
to D in the Frobenius norm. The best rank-r approximation is the truncated SVD
(Eckart-Young); we split the singular values as sqrt(S) between the two factors, so
A = diag(sqrt(s)) Vh[:r] and B = U[:, :r] diag(sqrt(s)), and scaling stays 1.

A full SVD costs O(m n min(m, n)). When r is well below min(m, n), a randomized SVD
(Halko, Martinsson & Tropp 2011: a Gaussian sketch with oversampling, a few power
iterations with re-orthonormalization, then the SVD of the small projected matrix) costs
O(m n k) for a sketch of k = r + oversampling columns and loses almost nothing when the
spectrum decays. For an energy target the sketch grows (doubling) until it holds the
requested fraction of ||D||_F^2, which is exact and cheap; when the sketch would be a
large fraction of the matrix, an exact SVD is cheaper and is used instead.

The reported error is measured, not inferred: ||D - B A||_F is computed from the factors
as they will be saved (after the cast to the output dtype), in row blocks so it needs
no second full-size matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# A sketch larger than this fraction of min(m, n) costs about as much as an exact SVD.
EXACT_FRACTION = 0.25
MIN_OVERSAMPLE = 8
# Two power iterations: one leaves the error on a low-rank-plus-flat-noise delta (a fine-tune's
# shape, the hardest for a sketch) above the 1% of the exact SVD's that the tests hold us to.
POWER_ITERATIONS = 2
ERROR_BLOCK_ROWS = 4096
# float32 singular values sum to ||D||^2 only up to rounding: without a tolerance,
# energy=1.0 would ask for every last rounding-error direction.
ENERGY_TOLERANCE = 1e-5


@dataclass
class Factorization:
    """B @ A approximates the delta; rank = A.shape[0]."""

    A: torch.Tensor  # rank x in
    B: torch.Tensor  # out x rank
    method: str  # "exact" or "randomized"


@dataclass
class FactorStats:
    rank: int
    retained_energy: float  # 1 - relative_error**2: the fraction of ||D||^2 that B A keeps
    relative_error: float  # ||D - B A||_F / ||D||_F


def oversampling(rank: int) -> int:
    return max(MIN_OVERSAMPLE, rank // 2)


def frobenius_sq(matrix: torch.Tensor) -> float:
    """||M||_F^2: row norms in the matrix's dtype, their squares summed in float64.

    As accurate as a float64 norm (a single float32 norm of a large matrix accumulates
    rounding error), without the float64 norm's copy of the whole matrix to float64.
    Figures: benchmarks/extract_lora.py --step kernels.
    """
    rows = matrix.reshape(matrix.shape[0], -1) if matrix.dim() > 1 else matrix.reshape(1, -1)
    return float(torch.linalg.vector_norm(rows, dim=1).double().square().sum())


def _orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(matrix).Q


def _factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:rank].clamp_min(0).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root[None, :]


def range_sketch(delta: torch.Tensor, columns: int, *, generator: torch.Generator, power_iterations: int = POWER_ITERATIONS,
                 against: torch.Tensor | None = None) -> torch.Tensor:
    """An orthonormal basis (m x columns) of the dominant column space of delta.

    With `against` (an orthonormal basis already found), the new basis is orthogonal to
    it, so a sketch can grow block by block without repeating work.
    """
    omega = torch.randn(delta.shape[1], columns, generator=generator, dtype=delta.dtype, device="cpu").to(delta.device)

    def project_out(block: torch.Tensor) -> torch.Tensor:
        if against is None:
            return block
        return block - against @ (against.T @ block)

    q = _orthonormal(project_out(delta @ omega))
    for _ in range(power_iterations):
        z = _orthonormal(delta.T @ q)
        q = _orthonormal(project_out(delta @ z))
    if against is None:
        return q
    return _orthonormal(project_out(q))  # second pass: keeps q orthogonal to `against` in float32


def exact_svd(delta: torch.Tensor):
    return torch.linalg.svd(delta, full_matrices=False)


def svd_wide(matrix: torch.Tensor):
    """Thin SVD of a wide k x n matrix (k <= n) through the QR of its transpose and the SVD
    of the k x k triangle: the same factors to float32 rounding, faster than LAPACK's gesdd
    on the k x n matrix at the sizes of a sketch (benchmarks/extract_lora.py --step kernels)."""
    q, r = torch.linalg.qr(matrix.T)  # matrix = r^T q^T
    u, s, wh = torch.linalg.svd(r.T)
    return u, s, wh @ q.T


def _svd_in_basis(delta: torch.Tensor, q: torch.Tensor):
    """SVD of the projection Q Q^T delta: (U, S, Vh) with U = Q @ U_small."""
    projected = q.T @ delta
    if projected.shape[0] <= projected.shape[1]:
        u_small, s, vh = svd_wide(projected)
    else:
        u_small, s, vh = torch.linalg.svd(projected, full_matrices=False)
    return q @ u_small, s, vh


def factor_fixed_rank(delta: torch.Tensor, rank: int, *, generator: torch.Generator) -> Factorization:
    """Rank-r factors: randomized SVD when r + oversampling is well below min(m, n), exact otherwise."""
    smaller = min(delta.shape)
    rank = min(rank, smaller)
    columns = rank + oversampling(rank)
    if columns > EXACT_FRACTION * smaller:
        a, b = _factors(*exact_svd(delta), rank)
        return Factorization(a, b, "exact")
    q = range_sketch(delta, columns, generator=generator)
    a, b = _factors(*_svd_in_basis(delta, q), rank)
    return Factorization(a, b, "randomized")


def rank_for_energy(singular_values: torch.Tensor, energy: float, total_energy: float) -> int:
    """The smallest r with sum(s[:r]^2) >= energy * total_energy (at least 1)."""
    cumulative = torch.cumsum(singular_values.double() ** 2, dim=0)
    target = energy * total_energy
    reached = torch.nonzero(cumulative >= target * (1 - ENERGY_TOLERANCE))
    r = int(reached[0]) + 1 if len(reached) else len(singular_values)
    return max(1, r)


def factor_for_energy(delta: torch.Tensor, energy: float, *, max_rank: int | None, generator: torch.Generator,
                      initial_columns: int = 32) -> Factorization:
    """Factors of the smallest rank keeping `energy` of ||delta||_F^2, capped at max_rank.

    The randomized sketch grows (doubling, each new block orthogonal to the old ones)
    until it captures the target energy with room for oversampling, or reaches the cap;
    a sketch wider than EXACT_FRACTION of min(m, n) gives way to an exact SVD.
    """
    smaller = min(delta.shape)
    cap = min(max_rank or smaller, smaller)
    total = frobenius_sq(delta)
    widest = cap + oversampling(cap)  # enough for any rank up to the cap
    q = None
    columns = min(initial_columns, widest)
    while columns <= EXACT_FRACTION * smaller:
        grown = range_sketch(delta, columns - (0 if q is None else q.shape[1]), generator=generator, against=q)
        q = grown if q is None else torch.cat([q, grown], dim=1)
        u, s, vh = _svd_in_basis(delta, q)
        rank = min(rank_for_energy(s, energy, total), cap)
        captured = float((s[:rank].double() ** 2).sum())
        reached = captured >= energy * total * (1 - ENERGY_TOLERANCE) or rank == cap
        if (reached and q.shape[1] >= rank + oversampling(rank)) or q.shape[1] >= widest:
            a, b = _factors(u, s, vh, rank)
            return Factorization(a, b, "randomized")
        columns = min(2 * columns, widest)
    u, s, vh = exact_svd(delta)
    rank = min(rank_for_energy(s, energy, total), cap)
    a, b = _factors(u, s, vh, rank)
    return Factorization(a, b, "exact")


def residual_stats(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, total_energy: float | None = None) -> FactorStats:
    """Measured ||delta - b @ a|| / ||delta|| (row blocks; factors as given, e.g. already cast)."""
    total = frobenius_sq(delta) if total_energy is None else total_energy
    a = a.to(delta.dtype)
    b = b.to(delta.dtype)
    residual_sq = 0.0
    for start in range(0, delta.shape[0], ERROR_BLOCK_ROWS):
        rows = slice(start, start + ERROR_BLOCK_ROWS)
        residual_sq += frobenius_sq(torch.addmm(delta[rows], b[rows], a, alpha=-1))
    relative_error = math.sqrt(residual_sq / total) if total > 0 else 0.0
    return FactorStats(rank=a.shape[0], retained_energy=1.0 - relative_error**2, relative_error=relative_error)
