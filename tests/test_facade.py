"""The PyHessian-compatible `hessian` class gives the numbers of the underlying functions."""
import warnings

import pytest
import torch
from torch import nn

from pyhessian_dist import (HessianOperator, hessian, hutchinson_trace, hutchpp_trace,
                            lanczos_top_eigenpairs, power_iteration_top_eigenpairs,
                            slq_density)
from tiny import SIZES, dense_hessian, make, split_uneven

CE = nn.CrossEntropyLoss()


def setup():
    model, x, y = make("cnn")
    batches = split_uneven(x, y, SIZES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = hessian(model, CE, dataloader=batches, cuda=False, seed=5)
    op = HessianOperator(model, CE, batches)
    kw = dict(dtype=op.dtype, device=op.device)
    return h, op, kw, dense_hessian(model, CE, x, y)


def gen():
    return torch.Generator().manual_seed(5)


def test_eigenvalues_power_and_lanczos_match_functions_and_exact():
    h, op, kw, H = setup()
    vals, vecs = h.eigenvalues(top_n=2, maxIter=200, tol=1e-8)
    ref = power_iteration_top_eigenpairs(op, op.dim, 2, max_iter=200, tol=1e-8,
                                         generator=gen(), **kw)
    assert vals == pytest.approx(ref.eigenvalues, rel=1e-10)
    assert len(vecs) == 2 and [t.shape for t in vecs[0]] == [p.shape for p in h.params]
    exact = torch.linalg.eigvalsh(H)
    lvals, lvecs = h.eigenvalues(top_n=3, method="lanczos", tol=1e-8)
    lref = lanczos_top_eigenpairs(op, op.dim, 3, tol=1e-8, generator=gen(), batched=True, **kw)
    assert lvals == pytest.approx(lref.eigenvalues, rel=1e-10)
    assert lvals == pytest.approx(exact.flip(0)[:3].tolist(), rel=1e-6)
    v = op.from_list(lvecs[0])
    assert torch.linalg.norm(H @ v - lvals[0] * v) < 1e-5 * abs(lvals[0])
    assert h.last_result.method == "lanczos" and h.last_result.converged


def test_trace_and_density_match_functions():
    h, op, kw, H = setup()
    samples = h.trace(maxIter=50, tol=1e-3)
    ref = hutchinson_trace(op, op.dim, max_iter=50, tol=1e-3, generator=gen(), **kw)
    assert samples == pytest.approx(ref.samples, rel=1e-10)
    pp = h.trace(method="hutchpp", num_matvecs=30)
    ref_pp = hutchpp_trace(op, op.dim, 30, generator=gen(), **kw)
    assert pp == pytest.approx(ref_pp.samples, rel=1e-9)
    assert h.last_result.trace == pytest.approx(H.trace().item(), abs=3 * h.last_result.stderr)
    nodes, weights = h.density(iter=15, n_v=2)
    d = slq_density(op, op.dim, num_steps=15, num_runs=2, generator=gen(), **kw)
    assert len(nodes) == 2 and len(nodes[0]) == 15
    for a, b in zip(nodes, d.nodes):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
    assert sum(weights[1]) == pytest.approx(1.0)


def test_single_batch_data_and_gradsH():
    model, x, y = make("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = hessian(model, CE, data=(x, y), cuda=False)
    loss = CE(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(h.gradsH, grads):
        torch.testing.assert_close(a, b)


def test_cuda_true_without_gpu_warns_once_and_runs_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    model, x, y = make("mlp")
    with pytest.warns(UserWarning, match="no GPU") as rec:
        h = hessian(model, CE, data=(x, y), cuda=True)
    assert len(rec) == 1 and h.device.type == "cpu"


def test_bad_arguments():
    model, x, y = make("mlp")
    with pytest.raises(ValueError, match="exactly one"):
        hessian(model, CE, cuda=False)
    with pytest.raises(ValueError, match="exactly one"):
        hessian(model, CE, data=(x, y), dataloader=[(x, y)], cuda=False)
    h = hessian(model, CE, data=(x, y), cuda=False)
    with pytest.raises(ValueError, match="top_n"):
        h.eigenvalues(top_n=10_000)
    with pytest.raises(ValueError, match="method"):
        h.trace(method="magic")
