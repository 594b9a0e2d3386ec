"""The sampling error (delete-a-group jackknife over groups of mini-batches) against exact
float64 references: per-group products, reduced-sample eigenvalues and traces, world sizes."""
import pytest
import torch
from torch import nn

from dist_harness import run_distributed
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


def test_coverage_and_bias_over_many_disjoint_samples():
    """Where the truth is known: R disjoint samples of n from one distribution (a softmax
    teacher on Gaussian inputs), a tiny float64 MLP. The spread of lambda_1 and of the trace
    across the samples matches the mean reported jackknife s.e., and the mean of lambda_1 on
    n samples minus lambda_1 on 4,000 (the truth, up to its own bias, n/4000 of ours) matches
    the mean reported bias. Tolerances come from R: the standard deviation of R values is
    within ~3 sqrt(1 / (2 (R - 1))) of its own value, a mean within 3 standard errors."""
    R, n, mb, G = 60, 40, 5, 8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(R * n + 4000, 5, generator=g, dtype=torch.float64)
    Y = torch.distributions.Categorical(
        logits=X @ torch.randn(5, 3, generator=g, dtype=torch.float64)).sample()
    truth = float(torch.linalg.eigvalsh(dense_hessian(model, CE, X[R * n:], Y[R * n:]))[-1])
    lam, se, bias, tr, tr_se = [], [], [], [], []
    for r in range(R):
        x, y = X[r * n:(r + 1) * n], Y[r * n:(r + 1) * n]
        op = HessianOperator(model, CE, [(x[i:i + mb], y[i:i + mb]) for i in range(0, n, mb)])
        e = lanczos_eigenpairs(op, 1, tol=1e-10, max_steps=op.dim,
                               generator=torch.Generator().manual_seed(r))
        s = eigenvalue_sampling_error(op, e, G, generator=torch.Generator().manual_seed(r))
        t = hutchinson_trace(op, max_iter=8, tol=0.0, block_size=8, sampling_groups=G,
                             generator=torch.Generator().manual_seed(5))   # the same probes
        lam.append(e.eigenvalues[0])
        se.append(s.stderr[0])
        bias.append(s.bias[0])
        tr.append(t.trace)
        tr_se.append(t.sampling.stderr[0])
    lam, se, bias, tr, tr_se = (torch.tensor(v, dtype=torch.float64)
                                for v in (lam, se, bias, tr, tr_se))
    slack = 3 * (1 / (2 * (R - 1))) ** 0.5          # ~0.28 for R = 60
    for values, reported in ((lam, se), (tr, tr_se)):
        ratio = float(values.std() / reported.mean())
        assert 1 - slack < ratio < 1 + slack, ratio
    true_bias = float(lam.mean()) - truth
    assert true_bias > 0 and float(bias.mean()) > 0      # lambda_1 of a sample is biased up
    tol = 3 * ((lam.var() + bias.var()) / R) ** 0.5
    assert abs(float(bias.mean()) - true_bias) < float(tol), (float(bias.mean()), true_bias)


def test_facade_keyword():
    from pyhessian_dist import hessian

    model, x, y = make("mlp")
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 23, 4)]   # 6 mini-batches
    h = hessian(model, CE, dataloader=batches, cuda=False, seed=0)
    vals, _vecs = h.eigenvalues(top_n=2, method="lanczos", tol=1e-8, sampling_error=3)
    s = h.last_result.sampling
    assert len(s.stderr) == len(s.bias) == 2 and s.num_groups == 3 and s.num_matvecs > 0
    samples = h.trace(maxIter=6, tol=0.0, method="hutchinson", per_layer=True, sampling_error=3)[0]
    t = h.last_result.sampling
    assert len(samples) == 6 and t.stderr[0] > 0 and len(t.group_stderr) == 2
    diag = h.diagonal(maxIter=4, tol=0.0, sampling_error=2)
    assert h.last_result.diagonal.sampling_stderr.shape == (sum(d.numel() for d in diag),)
    h.eigenvalues(top_n=1)   # PyHessian's call: no sampling error
    assert h.last_result.sampling is None
    with pytest.raises(ValueError, match="at least 2 groups"):
        h.eigenvalues(sampling_error=1)
    with pytest.raises(ValueError, match="need at least 7 mini-batches"):
        h.trace(sampling_error=7)


def _sampled(rank, world_size):
    model, x, y = make("cnn")
    batches = split_uneven(x, y, SIZES)
    op = HessianOperator(model, CE, batches[rank::world_size])   # dealt round-robin
    e = lanczos_eigenpairs(op, 1, tol=1e-10, max_steps=op.dim,
                           generator=torch.Generator().manual_seed(0))
    s = eigenvalue_sampling_error(op, e, 3, tol=1e-8, generator=torch.Generator().manual_seed(1))
    t = hutchinson_trace(op, max_iter=6, tol=0.0, deflate=4, block_size=3, sampling_groups=3,
                         generator=torch.Generator().manual_seed(2))
    return {"reps": s.replicates, "trace": t.sampling.replicates, "matvecs": s.num_matvecs}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_same_on_any_world_size(world_size):
    ref = _sampled(0, 1)
    for out in run_distributed(_sampled, world_size):
        assert out["matvecs"] == ref["matvecs"]
        torch.testing.assert_close(torch.tensor(out["reps"]), torch.tensor(ref["reps"]),
                                   rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(torch.tensor(out["trace"]), torch.tensor(ref["trace"]),
                                   rtol=1e-7, atol=1e-9)
