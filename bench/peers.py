"""The peer side of the side-by-side benchmark: PyHessian, hessian-eigenthings and curvlinops.

Each function runs one task with one installed peer library, called the way its documentation
shows a user calling it, and returns one dict:

    {"value": ..., "stderr": float | None, "matvecs": int | None, "seconds": float, "info": {...}}

- ``value``: a float (top1, trace), a list of floats (top5, largest first) or a dict (density).
- ``stderr``: the standard error of a trace estimate (None for other tasks, or when the peer
  gives none).
- ``matvecs``: full-data Hessian-vector products (one per vector, each over every mini-batch),
  counted by wrapping the peer's product method on its own object (no peer code is changed),
  including the products a peer spends during set-up (curvlinops' determinism check).
- ``seconds``: ``time.perf_counter`` wall time of the whole call, the peer's set-up (building its
  object) included, since a user pays for it.
- ``info``: which peer routine ran, with what settings, and what the peer says about convergence.

Every function has the signature ``fn(model, loss_fn, batches, device, seed, **options)``:
``batches`` is a list of ``(x, y)`` CPU tensors (equal-size mini-batches; the peers move each one
to ``device`` as they iterate, as they would with a DataLoader), ``loss_fn`` is a mean-reduced
criterion module such as ``nn.CrossEntropyLoss()`` (curvlinops reads its ``.reduction``). The model
is moved to ``device`` and put in eval mode (BatchNorm running statistics) before each call;
torch's and NumPy's global generators are seeded with ``seed`` (PyHessian and curvlinops draw from
them), and ``seed`` is passed on where a peer takes one. Options default to the peer's own defaults.

``PEER_TASKS`` says which (peer, task) pairs exist; ``run(peer, task, ...)`` dispatches.
No peer code is copied here: the peers are optional, bench-only requirements
(bench/requirements.txt) and are imported inside the functions.

Smoke run (ResNet8, 64 random CIFAR-shaped images, CPU, ~5 min on 2 busy cores):
    python -m bench.peers            # --full: top-5 power iterations at the peers' defaults too
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import math
import time

import numpy as np
import torch
from torch import nn

TASKS = ("top1", "top5", "trace", "density")

PEER_PACKAGES = {  # import name -> distribution name (for versions)
    "pyhessian": "pyhessian",
    "eigenthings": "hessian-eigenthings",
    "curvlinops": "curvlinops-for-pytorch",
}
_IMPORT_NAMES = {"pyhessian": "pyhessian", "eigenthings": "hessian_eigenthings",
                 "curvlinops": "curvlinops"}

# Which tasks each peer can do (a function ``<peer>_<task>`` exists for each).
#   pyhessian:   hessian(...).eigenvalues / .trace / .density
#   eigenthings: deflated_power_iteration or lanczos / hutch_plus_plus or hutchinson /
#                spectral_density, on its HessianOperator
#   curvlinops:  scipy.sparse.linalg.eigsh on HessianLinearOperator.to_scipy() /
#                hutchinson_trace or hutchpp_trace / lanczos_approximate_spectrum
PEER_TASKS = {
    "pyhessian": ("top1", "top5", "trace", "density"),
    "eigenthings": ("top1", "top5", "trace", "density"),
    "curvlinops": ("top1", "top5", "trace", "density"),
}


def available():
    """{peer: version string or None when it cannot be imported}."""
    out = {}
    for peer, mod in _IMPORT_NAMES.items():
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            out[peer] = None
            continue
        try:
            out[peer] = importlib.metadata.version(PEER_PACKAGES[peer])
        except importlib.metadata.PackageNotFoundError:
            out[peer] = "unknown"
    return out


def run(peer, task, model, loss_fn, batches, device="cpu", seed=0, **options):
    """Run ``<peer>_<task>``; raises KeyError for a pair that PEER_TASKS does not list."""
    if task not in PEER_TASKS.get(peer, ()):
        raise KeyError(f"peer {peer!r} has no task {task!r}")
    return globals()[f"{peer}_{task}"](model, loss_fn, batches, device, seed, **options)


# ----------------------------------------------------------------------------- helpers

def _prepare(model, device, seed):
    device = torch.device(device)
    model.to(device)
    model.eval()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # seeds CUDA generators too
    np.random.seed(seed % (2 ** 32))
    return device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _result(value, seconds, matvecs, stderr=None, **info):
    return {"value": value, "stderr": stderr, "matvecs": matvecs, "seconds": seconds,
            "info": info}


def _floats(t):
    return [float(x) for x in (t.tolist() if torch.is_tensor(t) else t)]


def _mean_stderr(samples):
    s = np.asarray(samples, dtype=np.float64)
    if s.size < 2:
        return float(s.mean()) if s.size else math.nan, None
    return float(s.mean()), float(s.std(ddof=1) / math.sqrt(s.size))


class _Counter:
    def __init__(self):
        self.n = 0


# ----------------------------------------------------------------------------- PyHessian 0.1
#
# pyhessian.hessian(model, criterion, data=None, dataloader=None, cuda=True): model.eval() is called
# in __init__. With dataloader= every product walks all mini-batches and, per mini-batch, runs a
# forward, loss.backward(create_graph=True) and torch.autograd.grad(grads, params, v)
# (dataloader_hv_product, weighted by mini-batch size). With data= (one batch) the graph is built
# once in __init__ and each product is one double-backward. We always use dataloader=batches.
#   eigenvalues(maxIter=100, tol=1e-3, top_n=1): power iteration per eigenvalue, orthogonalised
#     against the earlier eigenvectors; stops when |λ_i - λ_{i-1}| / (|λ_{i-1}| + 1e-6) < tol or
#     after maxIter products; returns the largest-MAGNITUDE eigenvalue(s); random start
#     torch.randn (global generator).
#   trace(maxIter=100, tol=1e-3): Hutchinson with Rademacher probes (global generator); stops when
#     |mean_i - mean_{i-1}| / (mean_{i-1} + 1e-6) < tol (no abs() on the denominator); returns the
#     list of per-probe samples v^T H v. tol=0 runs exactly maxIter probes.
#   density(iter=100, n_v=1): SLQ, n_v Lanczos runs of `iter` products with full
#     re-orthogonalisation; returns (nodes, weights) per run. It calls torch.eig, which torch 2.x
#     removed (RuntimeError) -- see _torch_eig_shim.

def _pyhessian_object(model, loss_fn, batches, device):
    from pyhessian import hessian
    h = hessian(model, loss_fn, dataloader=batches, cuda=device.type == "cuda")
    counter = _Counter()
    product = h.dataloader_hv_product

    def counted(v):
        counter.n += 1
        return product(v)

    h.dataloader_hv_product = counted  # instance attribute: counts, changes nothing else
    return h, counter


def _pyhessian_eigen(model, loss_fn, batches, device, seed, top_n, max_iter, tol):
    device = _prepare(model, device, seed)
    t0 = time.perf_counter()
    h, counter = _pyhessian_object(model, loss_fn, batches, device)
    values, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n)
    _sync(device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)  # PyHessian leaves graph-carrying .grad behind
    return values, seconds, counter.n


def pyhessian_top1(model, loss_fn, batches, device="cpu", seed=0, max_iter=100, tol=1e-3):
    """hessian(...).eigenvalues(maxIter=100, tol=1e-3, top_n=1) (PyHessian's defaults)."""
    values, seconds, n = _pyhessian_eigen(model, loss_fn, batches, device, seed, 1, max_iter, tol)
    return _result(float(values[0]), seconds, n, routine="hessian.eigenvalues",
                   settings={"maxIter": max_iter, "tol": tol, "top_n": 1},
                   which="largest magnitude", stopped_before_max_iter=n < max_iter)


def pyhessian_top5(model, loss_fn, batches, device="cpu", seed=0, max_iter=100, tol=1e-3, k=5):
    """hessian(...).eigenvalues(maxIter=100, tol=1e-3, top_n=5): deflated power iteration."""
    values, seconds, n = _pyhessian_eigen(model, loss_fn, batches, device, seed, k, max_iter, tol)
    return _result(_floats(values), seconds, n, routine="hessian.eigenvalues",
                   settings={"maxIter": max_iter, "tol": tol, "top_n": k},
                   which="largest magnitude, in the order found (not sorted)")


def pyhessian_trace(model, loss_fn, batches, device="cpu", seed=0, probes=100, tol=0.0):
    """hessian(...).trace(maxIter=probes, tol=tol): mean and standard error of its samples.

    tol=0 (default here) makes PyHessian run exactly ``probes`` probes; tol=1e-3 with probes=100
    reproduces PyHessian's own default stopping rule."""
    device = _prepare(model, device, seed)
    t0 = time.perf_counter()
    h, counter = _pyhessian_object(model, loss_fn, batches, device)
    samples = h.trace(maxIter=probes, tol=tol)
    _sync(device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    mean, stderr = _mean_stderr(samples)
    return _result(mean, seconds, counter.n, stderr=stderr, routine="hessian.trace",
                   settings={"maxIter": probes, "tol": tol}, probes=len(samples))


@contextlib.contextmanager
def _torch_eig_shim():
    """Give torch back a ``torch.eig(T, eigenvectors=True)`` for PyHessian's density().

    torch.eig was removed in torch 2 (calling it raises RuntimeError). PyHessian only calls it on
    its symmetric tridiagonal Lanczos matrix, so torch.linalg.eigh gives the same answer in the
    old return format: eigenvalues as an (n, 2) [real, imag] tensor, eigenvectors as columns.
    The original attribute is put back on exit."""
    missing = object()
    old = getattr(torch, "eig", missing)

    def eig(a, eigenvectors=False):
        w, v = torch.linalg.eigh(a)
        return torch.stack([w, torch.zeros_like(w)], dim=1), (v if eigenvectors else None)

    torch.eig = eig
    try:
        yield
    finally:
        if old is missing:
            del torch.eig
        else:
            torch.eig = old


def pyhessian_density(model, loss_fn, batches, device="cpu", seed=0, steps=100, runs=1):
    """hessian(...).density(iter=steps, n_v=runs) (PyHessian's defaults: 100, 1).

    value = {"nodes": [[...] per run], "weights": [[...] per run]}. Runs under _torch_eig_shim
    because PyHessian 0.1 calls torch.eig, which torch 2.x no longer has."""
    device = _prepare(model, device, seed)
    t0 = time.perf_counter()
    h, counter = _pyhessian_object(model, loss_fn, batches, device)
    with _torch_eig_shim():
        nodes, weights = h.density(iter=steps, n_v=runs)
    _sync(device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    value = {"nodes": [_floats(r) for r in nodes], "weights": [_floats(r) for r in weights]}
    return _result(value, seconds, counter.n, routine="hessian.density",
                   settings={"iter": steps, "n_v": runs},
                   note="torch.eig shimmed with torch.linalg.eigh (removed in torch 2)")


# ------------------------------------------------------------------ hessian-eigenthings 1.0.0a5
#
# The 0.x entry point compute_hessian_eigenthings(model, dataloader, loss, num_eigenthings,
# full_dataset, mode, max_possible_gpu_samples, ...) is gone in 1.0 ("The 0.x API has been
# removed"; pin hessian-eigenthings==0.0.2 for it).
# 1.0 builds an operator and runs an algorithm on it:
#   HessianOperator(model, dataloader, loss_fn(model, batch), *, param_filter=None,
#     full_dataset=True, num_batches=None, microbatch_size=None, method="autograd", ...)
#     matvec(v) (flat 1-D v): per mini-batch a forward, autograd.grad(loss, params,
#     create_graph=True) and autograd.grad(grads, params, v); mini-batch results are averaged with
#     EQUAL weights (1 / number of batches). full_dataset=False uses one batch per product.
#   deflated_power_iteration(op, *, k=10, max_iter=100, tol=1e-4, momentum=0.0, seed=None):
#     per eigenpair stops when rel. change of λ < tol AND ||Hv - λv|| / |λ| < tol (or max_iter);
#     largest magnitude; result.iterations = products.
#   lanczos(op, *, k=10, max_iter=None -> min(2k, n-1), tol=1e-4, reorthogonalize=None -> (max_iter
#     <= 50), which="LM", seed=None): runs exactly max_iter steps (no early stop); tol only sets
#     result.converged (|β_m s_m,i| < tol |λ_i|).
#   hutchinson(op, *, num_samples=100, distribution="rademacher", seed=None) -> TraceResult
#     (estimate, stderr, samples); trace(op, *, num_matvecs=100, method="hutch++", ...) defaults to
#     hutch_plus_plus(op, *, num_matvecs=99, seed=None): thirds for sketch / exact part / residual
#     Hutchinson; its stderr covers the residual part.
#   spectral_density(op, *, num_runs=10, lanczos_steps=80, num_grid_points=10000, sigma=None,
#     grid_padding=0.1, seed=None): SLQ with full re-orthogonalisation, Rademacher starts.

def _eigenthings_operator(model, loss_fn, batches):
    from hessian_eigenthings import HessianOperator, supervised_loss
    op = HessianOperator(model, batches, supervised_loss(loss_fn))
    counter = _Counter()
    product = op.matvec

    def counted(v):
        counter.n += 1
        return product(v)

    op.matvec = counted  # the algorithms (and the deflated operator) call op.matvec
    return op, counter


def _eigenthings_eigen(model, loss_fn, batches, device, seed, k, method, max_iter, tol, which,
                       reorthogonalize):
    import hessian_eigenthings as he
    device = _prepare(model, device, seed)
    t0 = time.perf_counter()
    op, counter = _eigenthings_operator(model, loss_fn, batches)
    if method == "power":
        settings = {"k": k, "max_iter": 100 if max_iter is None else max_iter,
                    "tol": 1e-4 if tol is None else tol, "seed": seed}
        res = he.deflated_power_iteration(op, **settings)
        routine, which = "deflated_power_iteration", "largest magnitude"
    elif method == "lanczos":
        settings = {"k": k, "max_iter": max_iter, "tol": 1e-4 if tol is None else tol,
                    "which": which, "seed": seed, "reorthogonalize": reorthogonalize}
        res = he.lanczos(op, **settings)
        routine = "lanczos"
    else:
        raise ValueError(f"method must be 'power' or 'lanczos', not {method!r}")
    _sync(device)
    seconds = time.perf_counter() - t0
    info = {"routine": routine, "settings": settings, "which": which,
            "converged": [bool(c) for c in res.converged.tolist()],
            "residuals": _floats(res.residuals), "iterations": int(res.iterations)}
    return _floats(res.eigenvalues), seconds, counter.n, info


def eigenthings_top1(model, loss_fn, batches, device="cpu", seed=0, method="power",
                     max_iter=None, tol=None, which="LA", reorthogonalize=None):
    """Top eigenvalue. method="power" (default): deflated_power_iteration(op, k=1) with its
    defaults max_iter=100, tol=1e-4 -- the only eigensolver of the peer with a tolerance-based
    stopping rule. method="lanczos": lanczos(op, k=1, which="LA") with max_iter=None -> the
    peer's default min(2k, n-1) = 2 steps (pass max_iter for more). Beware: the peer turns
    re-orthogonalisation OFF when max_iter > 50 (reorthogonalize=None), which gives repeated
    "ghost" copies of the top eigenvalues; pass reorthogonalize=True for long runs."""
    values, seconds, n, info = _eigenthings_eigen(model, loss_fn, batches, device, seed, 1,
                                                  method, max_iter, tol, which,
                                                  reorthogonalize)
    return _result(values[0], seconds, n, **info)


def eigenthings_top5(model, loss_fn, batches, device="cpu", seed=0, method="power",
                     max_iter=None, tol=None, which="LA", reorthogonalize=None, k=5):
    """Top-5: deflated_power_iteration(op, k=5) (default) or lanczos(op, k=5, which="LA"), whose
    default max_iter is min(2k, n-1) = 10 steps."""
    values, seconds, n, info = _eigenthings_eigen(model, loss_fn, batches, device, seed, k,
                                                  method, max_iter, tol, which,
                                                  reorthogonalize)
    return _result(values, seconds, n, **info)


def eigenthings_trace(model, loss_fn, batches, device="cpu", seed=0, probes=100,
                      method="hutch++"):
    """method="hutch++" (the peer's trace() default): hutch_plus_plus(op, num_matvecs=probes);
    method="hutchinson": hutchinson(op, num_samples=probes). Both return estimate and stderr."""
    import hessian_eigenthings as he
    device = _prepare(model, device, seed)
    t0 = time.perf_counter()
    op, counter = _eigenthings_operator(model, loss_fn, batches)
    if method == "hutch++":
        res = he.hutch_plus_plus(op, num_matvecs=probes, seed=seed)
        settings = {"num_matvecs": probes, "seed": seed}
    elif method == "hutchinson":
        res = he.hutchinson(op, num_samples=probes, seed=seed)
        settings = {"num_samples": probes, "seed": seed}
    else:
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', not {method!r}")
    _sync(device)
    seconds = time.perf_counter() - t0
    stderr = None if math.isnan(res.stderr) else float(res.stderr)
    return _result(float(res.estimate), seconds, counter.n, stderr=stderr,
                   routine="hutch_plus_plus" if method == "hutch++" else "hutchinson",
                   settings=settings, samples=int(res.samples.numel()))


def eigenthings_density(model, loss_fn, batches, device="cpu", seed=0, steps=100, runs=1):
    """spectral_density(op, num_runs=runs, lanczos_steps=steps) (peer defaults: 10 runs x 80).

    value = {"nodes": [[...] per run], "weights": [[...] per run], "sigma": float}; the peer's
    smoothed curve (10,000 grid points) is not returned."""
    import hessian_eigenthings as he
    device = _prepare(model, device, seed)
    t0 = time.perf_counter()
    op, counter = _eigenthings_operator(model, loss_fn, batches)
    res = he.spectral_density(op, num_runs=runs, lanczos_steps=steps, seed=seed)
    _sync(device)
    seconds = time.perf_counter() - t0
    nodes = [[x for x in _floats(r) if not math.isnan(x)] for r in res.raw_eigenvalues]
    weights = [_floats(r)[:len(n)] for r, n in zip(res.raw_weights, nodes)]
    return _result({"nodes": nodes, "weights": weights, "sigma": float(res.sigma)}, seconds,
                   counter.n, routine="spectral_density",
                   settings={"num_runs": runs, "lanczos_steps": steps, "seed": seed})


# ----------------------------------------------------------------------------- curvlinops 3.0.1
#
# HessianLinearOperator(model_func, loss_func, params, data, progressbar=False,
#   check_deterministic=True, num_data=None, block_sizes=None, batch_size_fn=None):
#   __init__ counts the data (one pass, no compute) and, with check_deterministic=True, runs two
#   loss+gradient passes and two products to check determinism (BN must be in eval mode).
#   Products (op @ v, v a flat tensor or a (dim, K) matrix, or a list of parameter-shaped
#   tensors) run per mini-batch torch.func: jvp(jacrev(loss)) -- forward-over-reverse, forward and
#   backward recomputed per product -- vmapped over the K columns; mini-batches are weighted by
#   batch size / N for reduction="mean". op.to_scipy(dtype=None) gives a
#   scipy.sparse.linalg.LinearOperator (float64 unless dtype is given) for scipy routines.
#   No eigensolver of its own: its docs use scipy.sparse.linalg.eigsh(op.to_scipy(), k=k,
#   which="LM") (ARPACK implicitly restarted Lanczos; default tol=0 = machine precision,
#   ncv=max(2k+1, 20), maxiter=10n).
#   hutchinson_trace(A, num_matvecs, distribution="rademacher") and hutchpp_trace(A, num_matvecs,
#   distribution) (num_matvecs divisible by 3) return only the estimate (no standard error), draw
#   their probes from torch's global generator and multiply all of them in ONE op @ G call.
#   lanczos_approximate_spectrum(A, ncv, num_points=1024, num_repeats=1, kappa=3.0,
#   boundaries=None, margin=0.05, boundaries_tol=1e-2) (Papyan 2020): eigsh(which="BE", k=2,
#   tol=1e-2) for the spectrum's ends unless boundaries are given, then num_repeats Lanczos runs
#   of ncv products WITHOUT re-orthogonalisation (randn start); returns (grid, density) only.

def _curvlinops_operator(model, loss_fn, batches, check_deterministic=True):
    from curvlinops import HessianLinearOperator

    counter = _Counter()

    class CountingHessian(HessianLinearOperator):  # counts columns; computes the same products
        def _matmat(self, M):
            counter.n += int(M[0].shape[-1])
            return super()._matmat(M)

    params = [p for p in model.parameters() if p.requires_grad]
    op = CountingHessian(model, loss_fn, params, batches,
                         check_deterministic=check_deterministic)
    setup = counter.n
    return op, counter, setup


def _curvlinops_eigen(model, loss_fn, batches, device, seed, k, which, tol,
                      check_deterministic, scipy_dtype):
    from scipy.sparse.linalg import eigsh
    device = _prepare(model, device, seed)
    t0 = time.perf_counter()
    op, counter, setup = _curvlinops_operator(model, loss_fn, batches, check_deterministic)
    values = eigsh(op.to_scipy(dtype=scipy_dtype), k=k, which=which, tol=tol,
                   return_eigenvectors=True)[0]
    _sync(device)
    seconds = time.perf_counter() - t0
    values = sorted((float(x) for x in values), reverse=True)
    info = {"routine": "scipy.sparse.linalg.eigsh(HessianLinearOperator.to_scipy())",
            "settings": {"k": k, "which": which, "tol": tol,
                         "check_deterministic": check_deterministic,
                         "to_scipy_dtype": str(scipy_dtype)},
            "setup_matvecs": setup}
    return values, seconds, counter.n, info


def curvlinops_top1(model, loss_fn, batches, device="cpu", seed=0, which="LA", tol=0.0,
                    check_deterministic=True, scipy_dtype=None):
    """eigsh(HessianLinearOperator(...).to_scipy(), k=1, which="LA") with scipy's default tol=0."""
    values, seconds, n, info = _curvlinops_eigen(model, loss_fn, batches, device, seed, 1, which,
                                                 tol, check_deterministic, scipy_dtype)
    return _result(values[0], seconds, n, **info)


def curvlinops_top5(model, loss_fn, batches, device="cpu", seed=0, which="LA", tol=0.0,
                    check_deterministic=True, scipy_dtype=None, k=5):
    """eigsh(HessianLinearOperator(...).to_scipy(), k=5, which="LA") with scipy's default tol=0."""
    values, seconds, n, info = _curvlinops_eigen(model, loss_fn, batches, device, seed, k, which,
                                                 tol, check_deterministic, scipy_dtype)
    return _result(values, seconds, n, **info)


def curvlinops_trace(model, loss_fn, batches, device="cpu", seed=0, probes=100,
                     method="hutchinson", block=1, check_deterministic=True):
    """probes // block calls of hutchinson_trace(op, block) (or hutchpp_trace(op, block), block
    divisible by 3); value = mean of the calls' estimates, stderr = their standard error.

    The peer's estimators give no error bar, so a user who wants one repeats the call; block=1
    gives the per-probe samples (the same standard error as Hutchinson's). A larger block uses
    the peer's vmapped multi-vector product (fewer, wider calls; memory grows with block)."""
    from curvlinops import hutchinson_trace, hutchpp_trace
    if method == "hutchinson":
        estimator = hutchinson_trace
    elif method == "hutchpp":
        estimator = hutchpp_trace
        if block % 3:
            raise ValueError("hutchpp_trace needs a block divisible by 3")
    else:
        raise ValueError(f"method must be 'hutchinson' or 'hutchpp', not {method!r}")
    calls = max(1, probes // block)
    device = _prepare(model, device, seed)
    t0 = time.perf_counter()
    op, counter, setup = _curvlinops_operator(model, loss_fn, batches, check_deterministic)
    estimates = [float(estimator(op, block)) for _ in range(calls)]
    _sync(device)
    seconds = time.perf_counter() - t0
    mean, stderr = _mean_stderr(estimates)
    return _result(mean, seconds, counter.n, stderr=stderr,
                   routine=f"{estimator.__name__} x {calls}",
                   settings={"num_matvecs": block, "calls": calls,
                             "check_deterministic": check_deterministic},
                   setup_matvecs=setup)


def curvlinops_density(model, loss_fn, batches, device="cpu", seed=0, steps=100, runs=1,
                       num_points=1024, boundaries=None, check_deterministic=True):
    """lanczos_approximate_spectrum(op, ncv=steps, num_points=1024, num_repeats=runs).

    value = {"grid": [...], "density": [...]} (the peer returns no nodes or weights). Without
    ``boundaries`` the peer first runs eigsh(which="BE", tol=1e-2) to find the spectrum's ends."""
    from curvlinops import lanczos_approximate_spectrum
    device = _prepare(model, device, seed)
    t0 = time.perf_counter()
    op, counter, setup = _curvlinops_operator(model, loss_fn, batches, check_deterministic)
    grid, density = lanczos_approximate_spectrum(op, steps, num_points=num_points,
                                                 num_repeats=runs, boundaries=boundaries)
    _sync(device)
    seconds = time.perf_counter() - t0
    return _result({"grid": _floats(grid), "density": _floats(density)}, seconds, counter.n,
                   routine="lanczos_approximate_spectrum",
                   settings={"ncv": steps, "num_repeats": runs, "num_points": num_points,
                             "boundaries": boundaries,
                             "check_deterministic": check_deterministic},
                   setup_matvecs=setup,
                   boundary_matvecs=None if boundaries else counter.n - setup - steps * runs)


# ----------------------------------------------------------------------------- smoke run

def _short(obj, n=4):
    """A printable copy of a result: long lists cut to their first n items."""
    if isinstance(obj, dict):
        return {k: _short(v, n) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_short(x, n) for x in obj[:n]]
        return items + [f"... ({len(obj)} items)"] if len(obj) > n else items
    if isinstance(obj, float):
        return float(f"{obj:.6g}")
    return obj


def _smoke():
    import sys
    import warnings

    from models.resnet import resnet  # run as `python -m bench.peers` from the repository root

    print("peers:", available())
    torch.manual_seed(0)
    model = resnet(depth=8)
    x = torch.randn(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    loss_fn = nn.CrossEntropyLoss()
    dim = sum(p.numel() for p in model.parameters())
    print(f"ResNet8, {dim} parameters, 2 mini-batches of 32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    # One call per function at the peer's defaults, except where those cost hundreds of
    # products (--full runs them as is), plus the variants a benchmark would want to see.
    full = "--full" in sys.argv[1:]
    variants = {
        ("pyhessian", "top5"): [{}] if full else [{"max_iter": 20}],
        ("eigenthings", "top1"): [{}, {"method": "lanczos"}, {"method": "lanczos", "max_iter": 20}],
        ("eigenthings", "top5"): ([{}] if full else [{"max_iter": 20}])
        + [{"method": "lanczos"}, {"method": "lanczos", "max_iter": 30}],
        ("pyhessian", "trace"): [{"probes": 30}],
        ("eigenthings", "trace"): [{"probes": 30}, {"probes": 30, "method": "hutchinson"}],
        ("curvlinops", "trace"): [{"probes": 30}, {"probes": 30, "block": 10}],
        ("pyhessian", "density"): [{"steps": 30}],
        ("eigenthings", "density"): [{"steps": 30}],
        ("curvlinops", "density"): [{"steps": 30}],
    }
    for task in TASKS:
        for peer in PEER_TASKS:
            if task not in PEER_TASKS[peer]:
                continue
            for options in variants.get((peer, task), [{}]):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = run(peer, task, model, loss_fn, batches, "cpu", 0, **options)
                print(f"\n{peer} {task} {options}:")
                print(" ", _short(out))
                for w in {(w.category.__name__, str(w.message).splitlines()[0]) for w in caught}:
                    print("  warning:", *w)


if __name__ == "__main__":
    _smoke()
