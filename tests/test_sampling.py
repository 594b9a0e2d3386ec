"""The sampling error (delete-a-group jackknife over groups of mini-batches) against exact
float64 references: per-group products, reduced-sample eigenvalues and traces, world sizes."""
import pytest
import torch
from torch import nn

from pyhessian_dist import (
    GGNOperator,
    HessianOperator,
    eigenvalue_sampling_error,
    hutchinson_trace,
    jackknife,
    lanczos_eigenpairs,
)
from pyhessian_dist.groups import parameter_groups
from tiny import dense_ggn, dense_hessian, make, split_uneven

CE = nn.CrossEntropyLoss()
SIZES = [3, 4, 2, 5, 3, 4, 2]   # 23 samples in 7 unequal mini-batches


def groups_of(sizes, G):
    """Global mini-batch j is in group j * G // B: the samples of each group (start, stop)."""
    B, out, start = len(sizes), [], 0
    bounds = [0] * G
    for j, n in enumerate(sizes):
        bounds[j * G // B] += n
    for n in bounds:
        out.append((start, start + n))
        start += n
    return out


def reduced_dense(model, x, y, G, dense=dense_hessian, loss=CE):
    """M_{-g} for each group g, from the dense curvature of the samples left."""
    out = []
    for a, b in groups_of(SIZES, G):
        keep = torch.cat([torch.arange(0, a), torch.arange(b, len(y))])
        out.append(dense(model, loss, x[keep], y[keep]))
    return out


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_group_and_reduced_products_are_exact(kind):
    model, x, y = make(kind)
    G = 3
    op = HessianOperator(model, CE, split_uneven(x, y, SIZES))
    H = dense_hessian(model, CE, x, y)
    V = torch.randn(2, op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = op.comm.calls
    P = op.group_matmat(V, G)
    assert P.shape == (G, 2, op.dim) and op.num_matvecs == 2
    torch.testing.assert_close(P.sum(0), V @ H, rtol=1e-8, atol=1e-10)
    Ng = op.group_num_samples(G)
    for g, (a, b) in enumerate(groups_of(SIZES, G)):
        assert Ng[g] == b - a
        Hg = dense_hessian(model, CE, x[a:b], y[a:b])
        torch.testing.assert_close(P[g], (b - a) / 23 * V @ Hg, rtol=1e-8, atol=1e-10)
    W = torch.stack([V, 2 * V, torch.zeros_like(V)])   # the last group's run has stopped
    R = op.reduced_matmat(W, Ng)
    for g, Hm in enumerate(reduced_dense(model, x, y, G)):
        torch.testing.assert_close(R[g], W[g] @ Hm, rtol=1e-8, atol=1e-10)
    # 2 rows per group, groups 0 and 1 active: 2 * ((1 - N_0/N) + (1 - N_1/N)) products
    assert op.num_matvecs == 2 + int(torch.ceil(2 * (2 - (Ng[0] + Ng[1]) / 23)))
    assert op.comm.calls == calls  # one process: no collectives at all


def test_jackknife_formula():
    reps = torch.tensor([[1.0], [2.0], [4.0]])
    se, bias = jackknife(torch.tensor([2.0]), reps)
    mean = 7 / 3
    torch.testing.assert_close(se, torch.tensor([(2 / 3 * ((reps - mean) ** 2).sum()) ** 0.5],
                                                dtype=torch.float64))
    torch.testing.assert_close(bias, torch.tensor([2 * (mean - 2.0)], dtype=torch.float64))


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_eigenvalue_replicates_match_dense(which):
    model, x, y = make("cnn")
    G = 4
    op = HessianOperator(model, CE, split_uneven(x, y, SIZES))
    res = lanczos_eigenpairs(op, 2, which=which, tol=1e-10, max_steps=op.dim,
                             generator=torch.Generator().manual_seed(1))
    before = op.num_matvecs
    s = eigenvalue_sampling_error(op, res, G, tol=1e-10, max_steps=op.dim,
                                  generator=torch.Generator().manual_seed(2))
    assert s.num_matvecs == op.num_matvecs - before > 0
    exact = []
    for Hm in reduced_dense(model, x, y, G):
        ev = torch.linalg.eigvalsh(Hm)
        exact.append((ev.flip(0)[:2] if which == "LA" else ev[:2]).tolist())
    torch.testing.assert_close(torch.tensor(s.replicates, dtype=torch.float64),
                               torch.tensor(exact, dtype=torch.float64),
                               rtol=1e-6, atol=1e-8)
    se, bias = jackknife(torch.tensor(res.eigenvalues), torch.tensor(exact, dtype=torch.float64))
    torch.testing.assert_close(torch.tensor(s.stderr, dtype=torch.float64), se, rtol=1e-5,
                               atol=1e-8)
    torch.testing.assert_close(torch.tensor(s.bias, dtype=torch.float64), bias, rtol=1e-5,
                               atol=1e-7)


def test_trace_replicates_match_dense_with_the_whole_space_deflated():
    """Deflating the whole space makes every per-group part exact: the replicates are
    tr(M_{-g}), diag(M_{-g}) and the block traces of M_{-g}, for the GGN too."""
    model, x, y = make("mlp")
    G = 5
    for cls, dense in ((HessianOperator, dense_hessian), (GGNOperator, dense_ggn)):
        op = cls(model, CE, split_uneven(x, y, SIZES))
        groups = [g.index for g in parameter_groups(op.param_names, op.numels, "module")]
        r = hutchinson_trace(op, max_iter=3, tol=0.0, deflate=op.dim, groups=groups,
                             diagonal=True, sampling_groups=G,
                             generator=torch.Generator().manual_seed(0))
        Ms = reduced_dense(model, x, y, G, dense)
        M = dense(model, CE, x, y)
        reps = torch.stack([torch.diagonal(Mm) for Mm in Ms])
        se, _bias = jackknife(torch.diagonal(M), reps)
        torch.testing.assert_close(r.sampling.diagonal_stderr.cpu(), se, rtol=1e-6, atol=1e-9)
        tr_se, _ = jackknife(M.trace()[None], reps.sum(1)[:, None])
        assert r.sampling.stderr[0] == pytest.approx(float(tr_se), rel=1e-6)
        blocks = torch.stack([torch.stack([reps[g_][i].sum() for i in groups])
                              for g_ in range(G)])
        block_se, _ = jackknife(torch.zeros(len(groups)), blocks)
        torch.testing.assert_close(torch.tensor(r.sampling.group_stderr, dtype=torch.float64),
                                   block_se,
                                   rtol=1e-6, atol=1e-9)
        assert r.sampling.num_matvecs == op.dim   # the per-group exact part
        assert r.trace == pytest.approx(float(M.trace()), rel=1e-8)
