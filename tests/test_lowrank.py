"""The factorization math: ranks, energy targets, and accuracy against the exact SVD."""

import pytest
import torch

from longctx.lora.lowrank import (
    exact_svd,
    factor_fixed_rank,
    factor_for_energy,
    frobenius_sq,
    rank_for_energy,
    residual_stats,
    svd_wide,
)


@pytest.fixture(autouse=True)
def single_thread():
    """Small LAPACK calls are much faster on one thread on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def matrix_with_spectrum(rows, cols, singular_values, seed=0):
    generator = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u = torch.linalg.qr(torch.randn(rows, k, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(cols, k, generator=generator)).Q
    return (u * torch.tensor(singular_values, dtype=torch.float32)) @ v.T


def exact_error(delta, rank):
    s = torch.linalg.svdvals(delta).double()
    return float((s[rank:] ** 2).sum().sqrt() / (s**2).sum().sqrt())


@pytest.mark.parametrize("decay", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("rank", [8, 32])
def test_randomized_error_within_one_percent_of_exact(decay, rank):
    spectrum = (torch.arange(1, 385, dtype=torch.float64) ** -decay).tolist()
    delta = matrix_with_spectrum(768, 384, spectrum)
    factors = factor_fixed_rank(delta, rank, generator=torch.Generator().manual_seed(0))
    assert factors.method == "randomized"
    assert factors.A.shape == (rank, 384) and factors.B.shape == (768, rank)
    ours = residual_stats(delta, factors.A, factors.B).relative_error
    assert ours <= exact_error(delta, rank) * 1.01


def test_large_rank_uses_exact_svd_and_full_rank_is_float32_exact():
    delta = torch.randn(48, 40, generator=torch.Generator().manual_seed(1))
    factors = factor_fixed_rank(delta, 40, generator=torch.Generator().manual_seed(0))
    assert factors.method == "exact"
    stats = residual_stats(delta, factors.A, factors.B)
    assert stats.rank == 40 and stats.relative_error < 1e-5
    # a rank above min(m, n) is clamped
    assert factor_fixed_rank(delta, 100, generator=torch.Generator()).A.shape[0] == 40


def test_sqrt_singular_values_split_between_factors():
    delta = matrix_with_spectrum(64, 64, [9.0, 4.0, 1.0])
    factors = factor_fixed_rank(delta, 3, generator=torch.Generator().manual_seed(0))
    a_norms = torch.linalg.vector_norm(factors.A, dim=1)
    b_norms = torch.linalg.vector_norm(factors.B, dim=0)
    torch.testing.assert_close(a_norms, torch.tensor([3.0, 2.0, 1.0]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b_norms, a_norms, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("true_rank", [1, 5, 40])
def test_energy_finds_the_rank_of_a_known_low_rank_delta(true_rank):
    spectrum = [float(2 ** -(i / 16)) for i in range(true_rank)]
    delta = matrix_with_spectrum(1024, 512, spectrum, seed=true_rank)
    factors = factor_for_energy(delta, 0.9999, max_rank=None, generator=torch.Generator().manual_seed(0))
    assert factors.A.shape[0] == true_rank
    assert factors.method == "randomized"  # found without a full SVD
    assert residual_stats(delta, factors.A, factors.B).relative_error < 1e-3


def test_energy_rank_is_the_smallest_reaching_the_fraction():
    spectrum = [4.0, 2.0, 1.0, 0.5]  # energies 16, 4, 1, 0.25 of 21.25
    delta = matrix_with_spectrum(256, 256, spectrum)
    for energy, expected in [(0.5, 1), (0.76, 2), (0.94, 2), (0.95, 3), (1.0, 4)]:
        factors = factor_for_energy(delta, energy, max_rank=None, generator=torch.Generator().manual_seed(0))
        assert factors.A.shape[0] == expected, energy
        stats = residual_stats(delta, factors.A, factors.B)
        assert stats.retained_energy >= energy - 1e-4


def test_energy_capped_by_max_rank_and_falls_back_to_exact_for_flat_spectra():
    delta = torch.randn(96, 80, generator=torch.Generator().manual_seed(2))  # flat spectrum: needs a high rank
    capped = factor_for_energy(delta, 0.99, max_rank=6, generator=torch.Generator().manual_seed(0))
    assert capped.A.shape[0] == 6
    full = factor_for_energy(delta, 0.99, max_rank=None, generator=torch.Generator().manual_seed(0))
    assert full.method == "exact"
    s = exact_svd(delta).S
    assert full.A.shape[0] == rank_for_energy(s, 0.99, frobenius_sq(delta))
    assert 40 < full.A.shape[0] < 80


def test_residual_is_measured_with_the_factors_as_given():
    delta = matrix_with_spectrum(128, 96, [1.0, 0.5])
    factors = factor_fixed_rank(delta, 2, generator=torch.Generator().manual_seed(0))
    exact = residual_stats(delta, factors.A, factors.B).relative_error
    rounded = residual_stats(delta, factors.A.bfloat16(), factors.B.bfloat16()).relative_error
    assert exact < 1e-5 < rounded < 1e-2  # the bf16 cast costs precision, and the report says so


def low_rank_plus_noise(rows, cols, seed=0):
    """A fine-tune-like delta: rank 16 with decaying singular values, plus dense noise carrying
    about 1% of its energy (the flat tail that makes a randomized sketch work hardest)."""
    generator = torch.Generator().manual_seed(seed)
    structured = matrix_with_spectrum(rows, cols, [2.0 ** (-i / 4) for i in range(16)], seed=seed)
    noise = torch.randn(rows, cols, generator=generator)
    return structured + noise * (0.1 * torch.linalg.norm(structured) / torch.linalg.norm(noise))


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536)])  # SmolLM2's projections
def test_randomized_error_within_one_percent_of_exact_on_a_flat_tail(shape):
    delta = low_rank_plus_noise(*shape)
    factors = factor_fixed_rank(delta, 32, generator=torch.Generator().manual_seed(0))
    assert factors.method == "randomized"
    assert residual_stats(delta, factors.A, factors.B).relative_error <= exact_error(delta, 32) * 1.01


@pytest.mark.parametrize("shape", [(48, 576), (48, 48), (40, 1536)])
def test_wide_svd_through_qr_matches_lapack(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    u, s, vh = svd_wide(matrix)
    torch.testing.assert_close(s, torch.linalg.svdvals(matrix), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((u * s) @ vh, matrix, rtol=0, atol=1e-5)
    torch.testing.assert_close(vh @ vh.T, torch.eye(shape[0]), rtol=0, atol=1e-5)


def test_frobenius_is_float64_accurate_on_large_matrices():
    matrix = torch.randn(4096, 2048, generator=torch.Generator().manual_seed(4)) * 0.02 + 0.001
    exact = float(torch.linalg.vector_norm(matrix.double()) ** 2)
    assert abs(frobenius_sq(matrix) - exact) <= 1e-8 * exact
    assert frobenius_sq(torch.tensor([3.0, 4.0])) == 25.0
