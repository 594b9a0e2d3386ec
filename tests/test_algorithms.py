"""Matrix-free algorithms on dense symmetric matrices with known spectra."""
import math

import pytest
import torch

from pyhessian_dist import (
    CallableOperator,
    DenseOperator,
    gaussian_density,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_eigenpairs,
    lanczos_group_eigenpairs,
    power_iteration_eigenpairs,
    slq_density,
)
from pyhessian_dist.results import Step

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


# ----------------------------------------------------------------------------- operators
def test_operators_check_shapes_and_count_products():
    A = random_sym(6)
    op = DenseOperator(A)
    v = torch.arange(6, dtype=F64)
    torch.testing.assert_close(op.matvec(v), A @ v)
    torch.testing.assert_close(op @ torch.stack([v, -v]), torch.stack([A @ v, -(A @ v)]))
    assert op.num_matvecs == 3
    with pytest.raises(ValueError, match=r"expected shape \(6,\)"):
        op.matvec(torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match="not symmetric"):
        DenseOperator(torch.triu(torch.ones(3, 3, dtype=F64)))
    fn = CallableOperator(lambda x: A @ x, 6)  # one vector at a time
    torch.testing.assert_close(fn.matvec(torch.stack([v, v])), torch.stack([A @ v, A @ v]))


# ----------------------------------------------------------------------------- Lanczos
@pytest.mark.parametrize("k", [1, 3])
def test_lanczos_top_k_matches_eigvalsh(k):
    A = random_sym(60)
    exact = torch.linalg.eigvalsh(A).flip(0)[:k]
    res = lanczos_eigenpairs(DenseOperator(A), k, tol=1e-10, generator=gen())
    assert res.converged and res.num_matvecs <= 60
    torch.testing.assert_close(torch.tensor(res.eigenvalues, dtype=F64), exact, rtol=1e-8,
                               atol=1e-8)
    V = res.eigenvectors
    for lam, v in zip(res.eigenvalues, V):
        assert torch.linalg.norm(A @ v - lam * v) <= 1e-4 * abs(lam)
    torch.testing.assert_close(V @ V.T, torch.eye(k, dtype=F64), atol=1e-10, rtol=0)
    # the products come from the Lanczos relation, without extra products: exact
    torch.testing.assert_close(res.products, V @ A, atol=1e-9, rtol=1e-9)


def test_lanczos_smallest_algebraic_finds_negative_curvature():
    eigs = [9.0, 4.0, 1.0] + torch.linspace(-0.2, 0.5, 40).tolist() + [-3.0, -2.5]
    A = sym_with_spectrum(eigs, seed=3)
    res = lanczos_eigenpairs(DenseOperator(A), 2, which="SA", tol=1e-10, generator=gen(1))
    assert res.which == "SA" and res.converged
    assert res.eigenvalues == pytest.approx([-3.0, -2.5], rel=1e-8)
    for lam, v in zip(res.eigenvalues, res.eigenvectors):
        assert torch.linalg.norm(A @ v - lam * v) <= 1e-4


def test_lanczos_error_bound_means_eigenvalue_accuracy():
    """--tol is the relative eigenvalue error: the reported bounds hold at the end, and the
    residuals they come from are the true residuals of the returned pairs."""
    eigs = [100.0, 97.0, 60.0] + torch.linspace(-1, 55, 197).tolist()
    A = sym_with_spectrum(eigs)
    exact = [100.0, 97.0, 60.0]
    for tol in (1e-3, 1e-6):
        res = lanczos_eigenpairs(DenseOperator(A), 3, tol=tol, generator=gen())
        assert res.converged and res.num_matvecs < 100
        assert max(res.error_bounds) <= tol
        errors = [abs(a - b) / b for a, b in zip(res.eigenvalues, exact)]
        assert all(e <= b * (1 + 1e-9) for e, b in zip(errors, res.error_bounds))
        for lam, v, rel in zip(res.eigenvalues, res.eigenvectors, res.residuals):
            true = torch.linalg.norm(A @ v - lam * v).item() / abs(lam)
            assert true == pytest.approx(rel, rel=1e-3, abs=1e-13)
    h = res.history
    assert isinstance(h[-1], Step) and h[-1].matvecs == res.num_matvecs
    assert h[-1].error_kind == "eigenvalue error bound" and len(h[-1].values) == 3


def test_lanczos_which_LM_finds_dominant_negative():
    A = sym_with_spectrum([5.0, 1.0, 0.5, -9.0, -0.1])
    la = lanczos_eigenpairs(DenseOperator(A), 1, generator=gen(), which="LA", tol=1e-9)
    lm = lanczos_eigenpairs(DenseOperator(A), 1, generator=gen(), which="LM", tol=1e-9)
    assert la.eigenvalues[0] == pytest.approx(5.0) and lm.eigenvalues[0] == pytest.approx(-9.0)


def test_lanczos_full_dimension_reproduces_whole_spectrum():
    """dim steps of Lanczos (via SLQ's tridiagonal) give every eigenvalue, even repeated ones."""
    eigs = [3.0, 3.0, 2.0, -1.0, 0.5, 0.5, 0.5, 7.0]
    A = sym_with_spectrum(eigs)
    d = slq_density(DenseOperator(A), num_steps=100, generator=gen())
    assert d.num_steps == 8
    torch.testing.assert_close(torch.tensor(sorted(d.nodes[0]), dtype=F64),
                               torch.tensor(sorted(eigs), dtype=F64), atol=1e-8, rtol=0)
    k = lanczos_eigenpairs(DenseOperator(A), 3, max_steps=8, tol=1e-12, generator=gen())
    assert k.eigenvalues == pytest.approx([7.0, 3.0, 3.0], abs=1e-8)


def test_lanczos_bad_arguments():
    A = random_sym(4)
    with pytest.raises(ValueError, match="top_n must be between 1 and 4"):
        lanczos_eigenpairs(DenseOperator(A), 5, generator=gen())
    with pytest.raises(ValueError, match="which"):
        lanczos_eigenpairs(DenseOperator(A), 1, which="BE")
    with pytest.raises(ValueError, match="top_n"):
        power_iteration_eigenpairs(DenseOperator(A), 0, generator=gen())


def test_group_lanczos_matches_eigvalsh_of_each_diagonal_block():
    A = random_sym(30, seed=11) + torch.diag(torch.linspace(0, 5, 30, dtype=F64))
    groups = [slice(0, 12), slice(12, 13), torch.arange(13, 30)]
    results = lanczos_group_eigenpairs(DenseOperator(A), groups, k=2, tol=1e-10,
                                       max_steps=30, generator=gen(2))
    for g, res in zip(groups, results):
        block = A[g][:, g]
        exact = torch.linalg.eigvalsh(block).flip(0)[: min(2, block.shape[0])]
        assert res.eigenvalues == pytest.approx(exact.tolist(), rel=1e-8, abs=1e-10)
        assert res.eigenvectors.shape[1] == block.shape[0]
    assert results[1].num_matvecs == 1  # a one-coordinate block is exact after one product


def test_group_runs_store_their_basis_at_their_own_size_and_share_one_call(monkeypatch):
    """A group's Lanczos basis is (steps, group size), never (steps, dim); the groups still
    iterating share one operator call per step."""
    import pyhessian_dist.estimators.lanczos as lanczos_module

    runs = []

    class Recorded(lanczos_module.Lanczos):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runs.append(self)

    monkeypatch.setattr(lanczos_module, "Lanczos", Recorded)
    dim = 200
    A = random_sym(dim, seed=12)
    calls = []

    def product(V):
        calls.append(V.shape[0])
        return V @ A

    groups = [slice(0, 5), torch.arange(5, 25), slice(25, dim)]
    results = lanczos_group_eigenpairs(CallableOperator(product, dim, batched=True), groups,
                                       k=1, tol=1e-10, max_steps=30, generator=gen(0))
    for run, n, res in zip(runs, (5, 20, 175), results):
        assert run.n == n and run.Q.shape == (res.num_matvecs, n)
        assert run.Q.untyped_storage().nbytes() <= 30 * n * 8  # the whole buffer, float64
        assert res.eigenvectors.shape == (1, n)
    small = results[0]  # a block spanned in full after 5 steps: its top eigenvalue exactly
    assert small.num_matvecs == 5 and small.converged
    assert small.eigenvalues[0] == pytest.approx(torch.linalg.eigvalsh(A[:5, :5])[-1].item())
    assert len(calls) == max(r.num_matvecs for r in results)  # one call per step
    assert sum(calls) == sum(r.num_matvecs for r in results)


# ----------------------------------------------------------------------------- power
def test_power_iteration_top3_distinct_and_correct():
    eigs = [10.0, 6.0, 3.0] + [0.3 * math.sin(i) for i in range(47)]
    A = sym_with_spectrum(eigs)
    res = power_iteration_eigenpairs(DenseOperator(A), 3, max_iter=1000, tol=1e-10,
                                     generator=gen())
    assert res.converged
    assert res.eigenvalues == pytest.approx([10.0, 6.0, 3.0], rel=1e-6)
    V = res.eigenvectors
    torch.testing.assert_close(V @ V.T, torch.eye(3, dtype=F64), atol=1e-6, rtol=0)
    assert [s.label for s in res.history][-1] == "eigenvalue 3"


def test_power_iteration_paper_rule_stops_at_max_iter():
    A = sym_with_spectrum([1.0, 0.999, 0.5])
    res = power_iteration_eigenpairs(DenseOperator(A), 1, max_iter=5, tol=0.0, generator=gen())
    assert res.num_matvecs == 5 and not res.converged


# ----------------------------------------------------------------------------- trace
def test_hutchinson_within_three_standard_errors():
    A = random_sym(80, seed=2) + 2 * torch.eye(80, dtype=F64)
    exact = A.trace().item()
    res = hutchinson_trace(DenseOperator(A), max_iter=400, tol=0.0, generator=gen(),
                           block_size=16)
    assert len(res.samples) == 400 and res.num_matvecs == 400
    assert abs(res.trace - exact) <= 3 * res.stderr
    assert res.stderr == pytest.approx(torch.tensor(res.samples, dtype=F64).std().item() / 20,
                                       rel=1e-9)
    assert not res.converged and res.stopping_rule == "budget"


def test_hutchinson_block_size_does_not_change_the_estimate():
    A = random_sym(30, seed=4) + 5 * torch.eye(30, dtype=F64)
    one = hutchinson_trace(DenseOperator(A), generator=gen(7))
    blk = hutchinson_trace(DenseOperator(A), generator=gen(7), block_size=8)
    assert one.samples == blk.samples and one.converged == blk.converged
    assert blk.num_matvecs >= len(blk.samples)


def test_hutchinson_stops_at_requested_relative_standard_error():
    A = random_sym(50, seed=5) + 3 * torch.eye(50, dtype=F64)
    res = hutchinson_trace(DenseOperator(A), max_iter=2000, rse=0.05, generator=gen(3))
    assert res.converged and res.stopping_rule.startswith("relative standard error")
    assert res.stderr <= 0.05 * abs(res.trace) and len(res.samples) >= 10
    assert abs(res.trace - A.trace().item()) <= 4 * res.stderr


def _spiked(dim=300, seed=0):
    """A few large eigenvalues over a bulk: the case deflation is for."""
    g = torch.Generator().manual_seed(seed)
    eigs = torch.cat([torch.tensor([400.0, 250.0, 180.0, 120.0, 90.0, 60.0], dtype=F64),
                      torch.rand(dim - 6, generator=g, dtype=F64) * 4 - 1])
    return sym_with_spectrum(eigs.tolist(), seed)


def test_deflated_trace_is_unbiased_and_cuts_the_variance():
    A = _spiked()
    exact = A.trace().item()
    op = DenseOperator(A)
    plain = hutchinson_trace(op, max_iter=200, tol=0.0, generator=gen(1))
    defl = hutchinson_trace(op, max_iter=200, tol=0.0, deflate=12, generator=gen(1))
    assert defl.deflation["dimension"] == 12 and defl.method == "deflated hutchinson"
    sd_plain = plain.stderr * math.sqrt(200)
    sd_defl = defl.stderr * math.sqrt(200)
    assert sd_defl < sd_plain / 5
    assert abs(defl.trace - exact) <= 4 * defl.stderr
    # exactness of the split: a fully deflated space leaves nothing to estimate
    full = hutchinson_trace(op, max_iter=3, tol=0.0, deflate=300, generator=gen(1))
    assert full.trace == pytest.approx(exact, rel=1e-9) and full.stderr < 1e-6 * abs(exact)


def test_deflated_trace_auto_reaches_rse_in_fewer_products():
    A = _spiked(seed=2)
    exact = A.trace().item()
    plain = hutchinson_trace(DenseOperator(A), max_iter=5000, rse=0.02, generator=gen(4))
    auto = hutchinson_trace(DenseOperator(A), max_iter=5000, rse=0.02, deflate="auto",
                            generator=gen(4))
    assert plain.converged and auto.converged
    assert auto.num_matvecs < plain.num_matvecs / 3
    assert abs(auto.trace - exact) <= 3 * auto.stderr
    assert auto.deflation["chosen"] == "auto" and auto.deflation["dimension"] >= 1
    assert [s.label for s in auto.history].count("deflation") >= auto.deflation["dimension"]


def test_auto_deflation_stops_once_the_probes_floor_binds():
    """When the pilot predicts that min_probes probes reach rse, another Lanczos step could only
    add a product: the deflation stops there (it used to run three steps past the optimum)."""
    A = _spiked(seed=2)
    loose = hutchinson_trace(DenseOperator(A), max_iter=5000, rse=0.2, deflate="auto",
                             generator=gen(4))
    assert loose.converged and loose.deflation["dimension"] == 1
    assert len(loose.samples) == 10 and loose.num_matvecs == 1 + 10  # 8 pilots among the probes
    assert abs(loose.trace - A.trace().item()) <= 3 * loose.stderr


def test_group_shares_sum_to_samples_and_estimate_block_traces():
    A = random_sym(40, seed=9) + torch.diag(torch.linspace(1, 8, 40, dtype=F64))
    groups = [slice(0, 10), torch.arange(10, 25), slice(25, 40)]
    for deflate in (0, 6):
        res = hutchinson_trace(DenseOperator(A), max_iter=600, tol=0.0, deflate=deflate,
                               groups=groups, diagonal=True, generator=gen(5), block_size=50)
        torch.testing.assert_close(res.group_samples.sum(1),
                                   torch.tensor(res.samples, dtype=F64), rtol=1e-12, atol=1e-9)
        means, ses = res.group_traces()
        for g, m, se in zip(groups, means, ses):
            assert abs(m - A[g][:, g].trace().item()) <= 4 * se
        d = res.diagonal
        assert d.num_probes == 600
        z = (d.diagonal - torch.diagonal(A)) / d.stderr
        assert (z.abs() <= 4.5).all()  # every coordinate within 4.5 standard errors


def test_diagonal_is_exact_for_a_diagonal_matrix():
    D = torch.diag(torch.linspace(-2, 3, 25, dtype=F64))
    res = hutchinson_trace(DenseOperator(D), max_iter=3, tol=0.0, diagonal=True,
                           generator=gen())
    torch.testing.assert_close(res.diagonal.diagonal, torch.diagonal(D), rtol=0, atol=1e-14)
    assert float(res.diagonal.stderr.max()) < 1e-12


def test_trace_bad_arguments():
    op = DenseOperator(random_sym(5))
    with pytest.raises(ValueError, match="rse"):
        hutchinson_trace(op, deflate="auto", tol=1e-3)
    with pytest.raises(ValueError, match="deflate"):
        hutchinson_trace(op, deflate=-1)
    with pytest.raises(ValueError, match="stopping rule"):
        hutchinson_trace(op, tol=None)


def test_hutchpp_within_three_standard_errors_and_exact_on_low_rank():
    A = random_sym(80, seed=3) + 2 * torch.eye(80, dtype=F64)
    res = hutchpp_trace(DenseOperator(A), 60, generator=gen())
    assert res.num_matvecs == 60 and len(res.samples) == 20 and res.stderr > 0
    assert abs(res.trace - A.trace().item()) <= 3 * res.stderr
    assert res.converged is False and res.stopping_rule == "budget"
    g = torch.Generator().manual_seed(5)
    B = torch.randn(100, 4, generator=g, dtype=F64)
    L = B @ B.T  # rank-4 PSD
    low = hutchpp_trace(DenseOperator(L), 15, generator=gen())  # 5 sketch vectors >= rank
    assert low.trace == pytest.approx(L.trace().item(), rel=1e-10)
    assert low.stderr == pytest.approx(0.0, abs=1e-8)


def test_results_are_strict_json():
    import json

    A = random_sym(10)
    one = hutchinson_trace(DenseOperator(A), max_iter=1, tol=0.0, generator=gen())
    d = one.to_dict()
    assert d["stderr"] is None and d["num_probes"] == 1
    json.dumps(d, allow_nan=False)  # raises on NaN
    json.dumps(lanczos_eigenpairs(DenseOperator(A), 2, generator=gen()).to_dict(),
               allow_nan=False)


# ----------------------------------------------------------------------------- density
def test_slq_weights_sum_to_one_and_first_moment_is_trace_over_dim():
    A = random_sym(40, seed=6)
    d = slq_density(DenseOperator(A), num_steps=40, num_runs=200, generator=gen(),
                    runs_per_pass=50)
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
    a = slq_density(DenseOperator(A), num_steps=10, num_runs=3, generator=gen(1),
                    callback=steps.append)
    assert len(steps) == 30 and steps[-1].matvecs == 30 and steps[-1].label == "run 3/3"
    assert steps[-1].max_matvecs == 30 and len(steps[-1].values) == 2
    b = slq_density(DenseOperator(A), num_steps=10, num_runs=3, generator=gen(1),
                    runs_per_pass=3)
    for x, y in zip(a.nodes, b.nodes):
        assert x == pytest.approx(y, abs=1e-10)


def test_gaussian_density_integrates_to_one_and_peaks_at_nodes():
    grid, dens = gaussian_density([[1.0, 5.0]], [[0.25, 0.75]])
    assert len(grid) == 10000 and grid[0] == pytest.approx(0.99)
    assert grid[-1] == pytest.approx(5.01)
    assert (dens * (grid[1] - grid[0])).sum() == pytest.approx(1.0)
    left = dens[grid < 3].sum()
    right = dens[grid > 3].sum()
    assert right / left == pytest.approx(3.0, rel=1e-3)
    with pytest.raises(ValueError):
        gaussian_density([[1.0, 2.0]], [[1.0]])
