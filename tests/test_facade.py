"""The PyHessian-compatible `hessian` class against exact references, and PyHessian's helpers."""
import warnings

import pytest
import torch
from torch import nn

from pyhessian_dist import hessian
from pyhessian_dist.utils import (
    get_params_grad,
    group_add,
    group_product,
    hessian_vector_product,
    normalization,
    orthnormal,
)
from tiny import SIZES, dense_empirical_fisher, dense_ggn, dense_hessian, make, split_uneven

CE = nn.CrossEntropyLoss()
F64 = torch.float64


def build(seed=None, **kw):
    model, x, y = make("cnn")
    batches = split_uneven(x, y, SIZES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = hessian(model, CE, dataloader=batches, cuda=False, seed=seed, **kw)
    return h, dense_hessian(model, CE, x, y)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_eigenvalues_power_and_lanczos_match_eigvalsh():
    h, H = build(seed=5)
    exact = torch.linalg.eigvalsh(H).flip(0)
    vals, vecs = h.eigenvalues(top_n=2, maxIter=60, tol=1e-5, method="power")
    assert h.last_result.method == "power"
    # power iteration finds the largest magnitudes; this Hessian's are its top two
    assert vals == pytest.approx(exact[:2].tolist(), rel=2e-2)
    assert len(vecs) == 2 and [t.shape for t in vecs[0]] == [p.shape for p in h.params]
    lvals, lvecs = h.eigenvalues(top_n=3, method="lanczos", tol=1e-10)
    assert lvals == pytest.approx(exact[:3].tolist(), rel=1e-8)
    v = flat(lvecs[0])
    assert torch.linalg.norm(H @ v - lvals[0] * v) < 1e-5 * abs(lvals[0])
    assert h.last_result.method == "lanczos" and h.last_result.converged


def test_default_eigenvalues_are_lanczos_within_its_bound():
    """PyHessian's call ``eigenvalues(top_n=2)`` runs Lanczos: its relative error bound <= tol
    holds against eigvalsh, in fewer products than power iteration needs at the same tol."""
    h, H = build(seed=5)
    exact = torch.linalg.eigvalsh(H).flip(0)
    vals, vecs = h.eigenvalues(top_n=2, tol=1e-6)
    res = h.last_result
    assert res.method == "lanczos" and res.converged
    assert isinstance(vals, list) and all(isinstance(v, float) for v in vals)
    assert [t.shape for t in vecs[1]] == [p.shape for p in h.params]
    for v, e, bound in zip(vals, exact[:2].tolist(), res.error_bounds):
        assert bound <= 1e-6 and abs(v - e) <= bound * abs(e) + 1e-12
    h.eigenvalues(top_n=2, tol=1e-6, method="power")
    assert res.num_matvecs < h.last_result.num_matvecs


def test_smallest_eigenvalues_with_which_SA():
    h, H = build(seed=1)
    exact = torch.linalg.eigvalsh(H)
    assert exact[0] < 0  # this tiny CNN has negative curvature
    vals, vecs = h.eigenvalues(top_n=2, which="SA", tol=1e-10)
    assert vals == pytest.approx(exact[:2].tolist(), rel=1e-7, abs=1e-10)
    v = flat(vecs[0])
    assert torch.linalg.norm(H @ v - vals[0] * v) < 1e-5 * max(1.0, abs(vals[0]))
    with pytest.raises(ValueError, match="method='lanczos'"):
        h.eigenvalues(which="SA", method="power")


def test_trace_and_density_match_exact():
    h, H = build(seed=5)
    samples = h.trace(maxIter=300, tol=0.0, method="hutchinson")
    res = h.last_result
    assert len(samples) == 300 and res.trace == sum(samples) / len(samples)
    assert abs(res.trace - H.trace().item()) <= 4 * res.stderr
    h.trace(method="hutchpp", num_matvecs=60)
    assert abs(h.last_result.trace - H.trace().item()) <= 4 * h.last_result.stderr
    nodes, weights = h.density(iter=120, n_v=1)  # more steps than dim: the exact spectrum
    torch.testing.assert_close(torch.tensor(sorted(nodes[0]), dtype=F64),
                               torch.linalg.eigvalsh(H), atol=1e-8, rtol=1e-8)
    assert sum(weights[0]) == pytest.approx(1.0)


def test_default_trace_is_deflated_and_stops_at_its_standard_error():
    """trace() without arguments: deflated Hutchinson to TRACE_RSE; what it returns means what
    PyHessian's samples mean (their mean estimates the trace), per layer too."""
    from pyhessian_dist.hessian import TRACE_RSE

    h, H = build(seed=4)
    exact = H.trace().item()
    samples = h.trace(maxIter=1000)  # this tiny indefinite H needs more than 100 probes
    res = h.last_result
    assert res.method == "deflated hutchinson" and res.deflation["chosen"] == "auto"
    assert res.converged and res.stopping_rule.startswith("relative standard error")
    assert len(samples) >= 10 and res.trace == pytest.approx(sum(samples) / len(samples))
    assert res.stderr <= TRACE_RSE * abs(res.trace)
    assert abs(res.trace - exact) <= 4 * res.stderr
    assert res.num_matvecs == res.deflation["num_matvecs"] + len(samples)
    tight = h.trace(rse=0.005, deflate=40)  # 40 Lanczos steps: most of this small H is exact
    assert h.last_result.deflation["dimension"] == 40
    assert abs(sum(tight) / len(tight) - exact) <= 4 * h.last_result.stderr
    samples, per_layer = h.trace(per_layer=True)
    sums = torch.tensor(list(per_layer.values()), dtype=F64).sum(0)
    torch.testing.assert_close(sums, torch.tensor(samples, dtype=F64))  # probe by probe
    plain = h.trace(method="hutchinson", maxIter=7, tol=0.0)  # PyHessian's estimator
    assert len(plain) == 7 and h.last_result.method == "hutchinson"


def test_per_layer_trace_and_diagonal_against_exact_blocks():
    h, H = build(seed=2)
    samples, per_layer = h.trace(maxIter=300, tol=0.0, method="hutchinson", per_layer=True)
    assert list(per_layer) == ["conv", "bn", "fc"]
    sums = torch.tensor(list(per_layer.values()), dtype=F64).sum(0)
    torch.testing.assert_close(sums, torch.tensor(samples, dtype=F64))  # probe by probe
    offsets = [0]
    for n in h.operator.numels:
        offsets.append(offsets[-1] + n)
    bounds = {"conv": (0, offsets[2]), "bn": (offsets[2], offsets[4]),
              "fc": (offsets[4], offsets[6])}
    for name, col in per_layer.items():
        a, b = bounds[name]
        t = torch.tensor(col, dtype=F64)
        se = t.std() / len(col) ** 0.5
        assert abs(t.mean() - H[a:b, a:b].trace()) <= 4 * se
    diag = flat(h.diagonal(maxIter=300, tol=0.0))
    se = h.last_result.diagonal.stderr
    assert ((diag - torch.diagonal(H)).abs() <= 4.5 * se + 1e-12).all()


def test_global_rng_by_default_and_reproducible_with_seed():
    h, _ = build()
    torch.manual_seed(0)
    first = h.trace(maxIter=5, tol=0.0, method="hutchinson")
    second = h.trace(maxIter=5, tol=0.0, method="hutchinson")
    assert first != second  # repeated calls draw new probes, as PyHessian's do
    torch.manual_seed(0)
    assert h.trace(maxIter=5, tol=0.0, method="hutchinson") == first  # ... from torch's global RNG
    s, H = build(seed=3)
    g = torch.Generator().manual_seed(3)  # seed=3: every call starts from this generator
    Z = torch.cat([torch.randint(0, 2, (1, H.shape[0]), generator=g) for _ in range(5)])
    Z = Z.to(F64) * 2 - 1  # the five Rademacher probes, drawn one per product
    exact = [float(z @ H @ z) for z in Z]
    for _call in range(2):  # the same exact numbers on every call
        assert s.trace(maxIter=5, tol=0.0, method="hutchinson") == pytest.approx(
            exact, rel=1e-9, abs=1e-12)


def test_single_batch_gradsH_and_pyhessian_helpers():
    model, x, y = make("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = hessian(model, CE, data=(x, y), cuda=False)
    H = dense_hessian(model, CE, x, y)
    grads = torch.autograd.grad(CE(model(x), y), list(model.parameters()))
    for a, b in zip(h.gradsH, grads):
        torch.testing.assert_close(a.detach(), b)
    v = [torch.randn_like(p) for p in h.params]
    Hv = hessian_vector_product(h.gradsH, h.params, v)  # PyHessian's way, through gradsH
    torch.testing.assert_close(flat(Hv), H @ flat(v))
    vHv, THv = h.dataloader_hv_product(v)
    torch.testing.assert_close(flat(THv), H @ flat(v))
    assert vHv == pytest.approx(float(flat(v) @ H @ flat(v)))
    # the list helpers mean what PyHessian's mean
    assert float(group_product(v, v)) == pytest.approx(float(flat(v) @ flat(v)))
    u = normalization(v)
    assert float(group_product(u, u)) == pytest.approx(1.0, abs=1e-5)
    other = [torch.randn_like(t) for t in v]
    w = orthnormal([t.clone() for t in other], [u])
    assert abs(float(group_product(w, u))) < 1e-6
    assert float(group_product(w, w)) == pytest.approx(1.0, abs=1e-5)
    before = [t.clone() for t in v]
    group_add(v, u, alpha=2.0)
    torch.testing.assert_close(flat(v), flat(before) + 2.0 * flat(u))
    model.zero_grad()
    CE(model(x), y).backward()
    params, g = get_params_grad(model)
    assert len(params) == len(g) == 4
    torch.testing.assert_close(flat(g), flat(grads))


def test_dataloader_gradsH_is_the_full_data_gradient():
    h, H = build()
    model, x, y = make("cnn")
    grads = torch.autograd.grad(CE(model.eval()(x), y), list(model.parameters()))
    torch.testing.assert_close(flat([g.detach() for g in h.gradsH]), flat(grads))
    v = [torch.randn_like(p) for p in h.params]
    torch.testing.assert_close(flat(hessian_vector_product(h.gradsH, h.params, v)),
                               H @ flat(v), rtol=1e-6, atol=1e-10)


def test_data_can_stay_on_the_host():
    h, H = build(seed=0, data_on_device=False, reuse_graph=False)
    assert "on the host" in h.operator.describe_memory() or h.device.type == "cpu"
    v = [torch.randn_like(p) for p in h.params]
    _vHv, THv = h.dataloader_hv_product(v)
    torch.testing.assert_close(flat(THv), H @ flat(v), rtol=1e-6, atol=1e-10)


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
    with pytest.raises(ValueError, match="group_by"):
        h.trace(per_layer=True, group_by="magic")


def test_a_torch_dataloader_with_extra_fields_works_as_before():
    """DataLoader batches are lists [x, y, index]: the criterion still sees (outputs, y)."""
    from torch.utils.data import DataLoader, TensorDataset

    model, x, y = make("mlp")
    H = dense_hessian(model, CE, x, y)
    loader = DataLoader(TensorDataset(x, y, torch.arange(len(y))), batch_size=7)
    h = hessian(model, CE, dataloader=loader, cuda=False)
    assert h.operator.batch_sizes == [7, 7, 7, 2]
    v = [torch.randn_like(p) for p in h.params]
    _vHv, THv = h.dataloader_hv_product(v)
    torch.testing.assert_close(flat(THv), H @ flat(v), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("curvature, dense", [("ggn", dense_ggn), ("ef", dense_empirical_fisher)])
def test_curvature_keyword_analyses_the_ggn_or_the_empirical_fisher(curvature, dense):
    """Every method on G or F: eigenvalues, trace, density, the product and the gradient."""
    model, x, y = make("cnn")
    M = dense(model, CE, x, y)
    h = hessian(model, CE, dataloader=split_uneven(x, y, SIZES), cuda=False, seed=3,
                curvature=curvature)
    assert h.curvature == curvature and type(h.operator).__name__ != "HessianOperator"
    exact = torch.linalg.eigvalsh((M + M.T) / 2)
    vals, _ = h.eigenvalues(top_n=2, method="lanczos", tol=1e-10)
    assert vals == pytest.approx(exact.flip(0)[:2].tolist(), rel=1e-8)
    h.trace(maxIter=200, tol=0.0, method="hutchinson")
    assert abs(h.last_result.trace - M.trace().item()) <= 4 * h.last_result.stderr
    nodes, _ = h.density(iter=120)
    assert max(nodes[0]) == pytest.approx(exact[-1].item(), rel=1e-8)
    v = [torch.randn_like(p) for p in h.params]
    _vMv, Mv = h.dataloader_hv_product(v)
    torch.testing.assert_close(flat(Mv), M @ flat(v), rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(CE(model(x), y), list(model.parameters()))
    torch.testing.assert_close(flat(h.gradsH), flat(grads))
    with pytest.raises(ValueError, match="unknown curvature 'fisher'"):
        hessian(model, CE, data=(x, y), cuda=False, curvature="fisher")
