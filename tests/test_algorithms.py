"""Matrix-free algorithms on dense symmetric matrices with known spectra."""
import math

import pytest
import torch

from pyhessian_dist import (gaussian_density, hutchinson_trace, hutchpp_trace,
                            lanczos_top_eigenpairs, power_iteration_top_eigenpairs,
                            slq_density)

F64 = torch.float64


def sym_with_spectrum(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return Q @ torch.diag(torch.tensor(eigs, dtype=F64)) @ Q.T


def random_sym(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=F64)
    return (A + A.T) / 2


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batched", [False, True])
def test_lanczos_top_k_matches_eigvalsh(k, batched):
    A = random_sym(60)
    exact = torch.linalg.eigvalsh(A).flip(0)[:k]
    res = lanczos_top_eigenpairs(lambda v: v @ A, 60, k, tol=1e-6, generator=gen(),
                                 batched=batched)
    assert res.converged and res.num_matvecs <= 60
    torch.testing.assert_close(torch.tensor(res.eigenvalues, dtype=F64), exact, rtol=1e-8,
                               atol=1e-8)
    V = res.eigenvectors
    for lam, v in zip(res.eigenvalues, V):
        assert torch.linalg.norm(A @ v - lam * v) <= 1e-5 * abs(lam)
    torch.testing.assert_close(V @ V.T, torch.eye(k, dtype=F64), atol=1e-10, rtol=0)


def test_lanczos_stops_early_on_a_gap_and_reports_history():
    eigs = [100.0, 50.0, 30.0] + torch.linspace(-1, 1, 197).tolist()
    A = sym_with_spectrum(eigs)
    res = lanczos_top_eigenpairs(lambda v: v @ A, 200, 3, tol=1e-3, generator=gen())
    assert res.converged and res.num_matvecs < 40
    assert res.eigenvalues == pytest.approx([100.0, 50.0, 30.0], rel=1e-6)
    assert len(res.history) >= 1 and res.history[-1]["matvecs"] == res.num_matvecs
    assert all(r <= 1e-3 for r in res.residuals)


def test_lanczos_which_LM_finds_dominant_negative():
    A = sym_with_spectrum([5.0, 1.0, 0.5, -9.0, -0.1])
    la = lanczos_top_eigenpairs(lambda v: v @ A, 5, 1, generator=gen(), which="LA")
    lm = lanczos_top_eigenpairs(lambda v: v @ A, 5, 1, generator=gen(), which="LM")
    assert la.eigenvalues[0] == pytest.approx(5.0) and lm.eigenvalues[0] == pytest.approx(-9.0)


def test_lanczos_full_dimension_reproduces_whole_spectrum():
    """dim steps of Lanczos (via SLQ's tridiagonal) give every eigenvalue, even repeated ones."""
    eigs = [3.0, 3.0, 2.0, -1.0, 0.5, 0.5, 0.5, 7.0]
    A = sym_with_spectrum(eigs)
    d = slq_density(lambda v: v @ A, 8, num_steps=100, generator=gen())
    assert d.num_steps == 8
    torch.testing.assert_close(torch.tensor(sorted(d.nodes[0]), dtype=F64),
                               torch.tensor(sorted(eigs), dtype=F64), atol=1e-8, rtol=0)
    k = lanczos_top_eigenpairs(lambda v: v @ A, 8, 3, max_steps=8, tol=1e-12, generator=gen())
    assert k.eigenvalues == pytest.approx([7.0, 3.0, 3.0], abs=1e-8)


def test_power_iteration_top3_distinct_and_correct():
    eigs = [10.0, 6.0, 3.0] + [0.3 * math.sin(i) for i in range(47)]
    A = sym_with_spectrum(eigs)
    res = power_iteration_top_eigenpairs(lambda v: v @ A, 50, 3, max_iter=1000, tol=1e-10,
                                         generator=gen())
    assert res.converged
    assert res.eigenvalues == pytest.approx([10.0, 6.0, 3.0], rel=1e-6)
    V = res.eigenvectors
    torch.testing.assert_close(V @ V.T, torch.eye(3, dtype=F64), atol=1e-6, rtol=0)


def test_power_iteration_paper_rule_stops_at_max_iter():
    A = sym_with_spectrum([1.0, 0.999, 0.5])
    res = power_iteration_top_eigenpairs(lambda v: v @ A, 3, 1, max_iter=5, tol=0.0,
                                         generator=gen())
    assert res.num_matvecs == 5 and not res.converged


def test_top_n_larger_than_dimension_is_an_error():
    A = random_sym(4)
    with pytest.raises(ValueError, match="top_n must be between 1 and 4"):
        lanczos_top_eigenpairs(lambda v: v @ A, 4, 5, generator=gen())
    with pytest.raises(ValueError, match="top_n"):
        power_iteration_top_eigenpairs(lambda v: v @ A, 4, 0, generator=gen())


def test_hutchinson_within_three_standard_errors():
    A = random_sym(80, seed=2) + 2 * torch.eye(80, dtype=F64)
    exact = A.trace().item()
    res = hutchinson_trace(lambda v: v @ A, 80, max_iter=400, tol=0.0, generator=gen(),
                           batched=True, block_size=16)
    assert len(res.samples) == 400 and res.num_matvecs == 400
    assert abs(res.trace - exact) <= 3 * res.stderr
    assert res.stderr == pytest.approx(torch.tensor(res.samples, dtype=F64).std().item() / 20, rel=1e-9)


def test_hutchinson_block_size_does_not_change_the_estimate():
    A = random_sym(30, seed=4) + 5 * torch.eye(30, dtype=F64)
    one = hutchinson_trace(lambda v: v @ A, 30, generator=gen(7))
    blk = hutchinson_trace(lambda v: v @ A, 30, generator=gen(7), batched=True, block_size=8)
    assert one.samples == blk.samples and one.converged == blk.converged
    assert blk.num_matvecs >= len(blk.samples)


def test_hutchpp_within_three_standard_errors_and_exact_on_low_rank():
    A = random_sym(80, seed=3) + 2 * torch.eye(80, dtype=F64)
    res = hutchpp_trace(lambda v: v @ A, 80, 60, generator=gen(), batched=True)
    assert res.num_matvecs == 60 and len(res.samples) == 20 and res.stderr > 0
    assert abs(res.trace - A.trace().item()) <= 3 * res.stderr
    g = torch.Generator().manual_seed(5)
    B = torch.randn(100, 4, generator=g, dtype=F64)
    L = B @ B.T  # rank-4 PSD
    low = hutchpp_trace(lambda v: v @ L, 100, 15, generator=gen())  # 5 sketch vectors >= rank
    assert low.trace == pytest.approx(L.trace().item(), rel=1e-10)
    assert low.stderr == pytest.approx(0.0, abs=1e-8)


def test_slq_weights_sum_to_one_and_first_moment_is_trace_over_dim():
    A = random_sym(40, seed=6)
    d = slq_density(lambda v: v @ A, 40, num_steps=40, num_runs=200, generator=gen(),
                    batched=True, runs_per_pass=50)
    assert len(d.nodes) == 200 and d.num_matvecs == 200 * 40
    for w in d.weights:
        assert sum(w) == pytest.approx(1.0, abs=1e-12)
    # each run's first moment is z^T A z / dim for a Rademacher z: Hutchinson in disguise
    moments = torch.tensor([sum(n * w for n, w in zip(ns, ws)) for ns, ws in zip(d.nodes,
                                                                                   d.weights)])
    se = moments.std().item() / math.sqrt(len(moments))
    assert abs(moments.mean().item() - A.trace().item() / 40) <= 3 * se


def test_slq_batched_runs_equal_sequential_runs():
    A = random_sym(25, seed=8)
    steps = []
    a = slq_density(lambda v: v @ A, 25, num_steps=10, num_runs=3, generator=gen(1),
                    callback=steps.append)
    assert len(steps) == 30 and steps[-1]["matvecs"] == 30 and steps[-1]["runs"] == (3, 3)
    b = slq_density(lambda v: v @ A, 25, num_steps=10, num_runs=3, generator=gen(1),
                    batched=True, runs_per_pass=3)
    for x, y in zip(a.nodes, b.nodes):
        assert x == pytest.approx(y, abs=1e-10)


def test_gaussian_density_integrates_to_one_and_peaks_at_nodes():
    grid, dens = gaussian_density([[1.0, 5.0]], [[0.25, 0.75]])
    assert len(grid) == 10000 and grid[0] == pytest.approx(0.99) and grid[-1] == pytest.approx(5.01)
    assert (dens * (grid[1] - grid[0])).sum() == pytest.approx(1.0)
    left = dens[grid < 3].sum()
    right = dens[grid > 3].sum()
    assert right / left == pytest.approx(3.0, rel=1e-3)
    with pytest.raises(ValueError):
        gaussian_density([[1.0, 2.0]], [[1.0]])
