"""bench/peers.py calls the peer libraries correctly: their top eigenvalue matches the exact one.

Skipped unless the bench-only peers are installed (pip install -r bench/requirements.txt).
"""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

pytest.importorskip("scipy")
pytest.importorskip("pyhessian")
pytest.importorskip("hessian_eigenthings")
pytest.importorskip("curvlinops")

from bench import peers

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")]


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    loss_fn = nn.CrossEntropyLoss()

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = math.prod(shape)
            params[name] = theta[offset:offset + size].view(shape)
            offset += size
        return loss_fn(functional_call(model, params, (x,)), y)  # mean over all 40 samples

    hess = torch.func.hessian(loss)(flat)
    evals = torch.linalg.eigvalsh(hess)
    # PyHessian and eigenthings' power iteration find the largest-magnitude eigenvalue; the test
    # compares them with the largest algebraic one, so it must also be the largest in magnitude.
    assert evals[-1] > 0 and abs(evals[0]) < 0.9 * evals[-1]
    return model, loss_fn, batches, float(evals[-1]), evals.flip(0)[:5].tolist(), \
        float(torch.trace(hess))


TIGHT = {
    "pyhessian": {"max_iter": 5000, "tol": 1e-10},
    "eigenthings": {"max_iter": 5000, "tol": 1e-9},
    "curvlinops": {},  # eigsh's default tol=0 is machine precision already
}


@pytest.mark.parametrize("peer", ["pyhessian", "eigenthings", "curvlinops"])
def test_top1_matches_exact_hessian(problem, peer):
    model, loss_fn, batches, top, _, _ = problem
    out = peers.run(peer, "top1", model, loss_fn, batches, "cpu", 0, **TIGHT[peer])
    assert out["value"] == pytest.approx(top, rel=1e-3)
    assert out["matvecs"] >= 1 and out["seconds"] > 0 and out["stderr"] is None


def test_eigenthings_lanczos_top1_and_top5(problem):
    model, loss_fn, batches, _, top5, _ = problem
    out = peers.eigenthings_top1(model, loss_fn, batches, seed=0, method="lanczos", max_iter=40)
    assert out["value"] == pytest.approx(top5[0], rel=1e-3)
    assert out["matvecs"] == 40
    out = peers.eigenthings_top5(model, loss_fn, batches, seed=0, method="lanczos", max_iter=40)
    assert out["value"] == pytest.approx(top5, rel=1e-3)
    # Past 50 steps the peer drops re-orthogonalisation unless asked, and ghosts appear.
    out = peers.eigenthings_top5(model, loss_fn, batches, seed=0, method="lanczos", max_iter=56,
                                 reorthogonalize=True)
    assert out["value"] == pytest.approx(top5, rel=1e-3)


def test_curvlinops_top5_matches_exact_hessian(problem):
    model, loss_fn, batches, _, top5, _ = problem
    out = peers.curvlinops_top5(model, loss_fn, batches, seed=0)
    assert out["value"] == pytest.approx(top5, rel=1e-3)
    assert out["info"]["setup_matvecs"] == 2  # the determinism check's two products


@pytest.mark.parametrize("peer", ["pyhessian", "eigenthings", "curvlinops"])
def test_trace_within_error_bar(problem, peer):
    model, loss_fn, batches, _, _, trace = problem
    options = {"probes": 30}
    if peer == "eigenthings":
        options["method"] = "hutchinson"
    out = peers.run(peer, "trace", model, loss_fn, batches, "cpu", 0, **options)
    assert out["stderr"] is not None and out["stderr"] > 0
    assert abs(out["value"] - trace) < 5 * out["stderr"]


@pytest.mark.parametrize("peer", ["pyhessian", "eigenthings"])
def test_density_quadrature_weights_sum_to_one(problem, peer):
    model, loss_fn, batches, top, _, _ = problem
    out = peers.run(peer, "density", model, loss_fn, batches, "cpu", 0, steps=20)
    (nodes,), (weights,) = out["value"]["nodes"], out["value"]["weights"]
    assert sum(weights) == pytest.approx(1.0, abs=1e-4)
    assert max(nodes) == pytest.approx(top, rel=1e-3)  # 20 Lanczos steps find the top one
