"""A drop-in replacement for PyHessian's ``hessian`` class, built on HessianOperator.

    from pyhessian_dist import hessian          # instead of: from pyhessian import hessian
    h = hessian(model, criterion, dataloader=loader, cuda=True)
    top_eigenvalues, top_eigenvectors = h.eigenvalues(top_n=3)
    trace_samples = h.trace()
    eigen_list_full, weight_list_full = h.density(iter=100, n_v=1)

Defaults keep PyHessian's algorithm for ``density`` (SLQ) and its use of torch's global random
number generator, so repeated calls give different samples. Two defaults differ, each needing
fewer products for an error that is as small or smaller and stated: ``eigenvalues`` runs
Lanczos, stopping on a proven error bound (PyHessian's power iteration: ``method="power"``), and
``trace`` runs Hutchinson after deflating a Krylov space, stopping at a 5% relative standard
error (PyHessian's plain probes and stopping rule: ``method="hutchinson"``); both return what
PyHessian's return. When a
torch.distributed process group is initialised and each rank passes its own shard, every rank
gets the numbers of the union of the shards. Keyword arguments that PyHessian code never passes
give more: ``which="SA"`` (most negative eigenvalues), the trace's
``rse``/``deflate``/``per_layer``, ``diagonal()``, ``seed=`` for reproducible numbers. The full
result of the last call (error bars, products used, convergence history) is ``last_result``.
``sampling_error=G`` on ``eigenvalues``, ``trace`` and ``diagonal`` adds the sampling error
(jackknife over G groups of mini-batches) to ``last_result.sampling``.
``curvature="ggn"`` or ``"ef"`` analyses the generalized Gauss-Newton matrix or the empirical
Fisher instead of the Hessian, with the same methods; code that does not pass it gets the
Hessian, as before.
"""
from __future__ import annotations

import warnings

import torch

from .distributed import broadcast_seed
from .estimators import (
    eigenvalue_sampling_error,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_eigenpairs,
    power_iteration_eigenpairs,
    slq_density,
)
from .groups import parameter_groups
from .operators import CURVATURES

__all__ = ["TRACE_RSE", "hessian"]

# the relative standard error at which trace() stops by default (see README "Using the library")
TRACE_RSE = 0.05


def _facade_device(cuda: bool) -> torch.device:
    """The current CUDA device when asked for and present, else CPU (with one warning)."""
    if cuda and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if cuda:
        warnings.warn("cuda=True but no GPU is available: computing on the CPU", stacklevel=3)
    return torch.device("cpu")


class hessian:  # noqa: N801 - the name PyHessian users import
    """Hessian of ``criterion(model(x), y)`` (mean loss) over ``data`` or a ``dataloader``.

    Args:
        model, criterion: as in PyHessian; the model is moved to the device and put in eval mode.
        data: one ``(inputs, targets)`` batch, or
        dataloader: an iterable of ``(inputs, targets)`` mini-batches (sizes may differ).
        cuda: compute on the current CUDA device (falls back to CPU with a warning).
        seed: ``None`` (default, as PyHessian): every call draws its random vectors from
            torch's global RNG (one seed per call, taken from rank 0 when distributed); an
            int: every call starts from ``torch.Generator().manual_seed(seed)`` (reproducible).
        curvature: ``"hessian"`` (default), ``"ggn"`` (the generalized Gauss-Newton matrix,
            ``GGNOperator``) or ``"ef"`` (the empirical Fisher, ``EmpiricalFisherOperator``):
            the matrix every method below analyses.
        **operator_kwargs: passed to the operator (``HessianOperator``: ``reuse_graph``,
            ``data_on_device``, ``hvp_mode``, ``memory_budget_bytes``, ``forward`` for a model
            that is not called as ``model(inputs)``, ...; the others take theirs).

    What is resident: the mini-batches are kept where the loader put them (host memory,
    pinned for CUDA) and moved to the device one at a time per product unless they fit in a
    quarter of the memory budget, in which case they are moved once; the first-order graphs of
    as many mini-batches as fit in the budget are kept (``h.operator.describe_memory()``).

    Attributes as in PyHessian: ``params`` (trainable parameters), ``gradsH`` (the gradient of
    the mean loss, a list shaped like ``params``; connected to the graph, so
    ``utils.hessian_vector_product(h.gradsH, h.params, v)`` works, when every mini-batch's
    graph is kept - always for ``data=`` - and the process is not distributed),
    ``full_dataset``, ``device``.
    """

    def __init__(self, model, criterion, data=None, dataloader=None, cuda=True, *,
                 seed: int | None = None, curvature: str = "hessian", **operator_kwargs):
        if (data is None) == (dataloader is None):
            raise ValueError("pass exactly one of data=(inputs, targets) or dataloader=...")
        if curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {curvature!r}: use one of "
                             f"{', '.join(map(repr, CURVATURES))}")
        self.device = _facade_device(cuda)
        self.model = model.to(self.device)
        self.criterion = criterion
        self.full_dataset = dataloader is not None
        self.data = data if data is not None else dataloader
        batches = [data] if data is not None else list(dataloader)
        if data is not None and curvature != "ef":
            operator_kwargs.setdefault("reuse_graph", True)
        self.curvature = curvature
        self.operator = CURVATURES[curvature](self.model, criterion=criterion, batches=batches,
                                              device=self.device, **operator_kwargs)
        self.params = self.operator.params
        self.seed = seed
        self.last_result = None

    # ------------------------------------------------------------------ PyHessian's attributes
    @property
    def gradsH(self):  # noqa: N802 - PyHessian's name
        """Gradient of the mean loss, per parameter (graph-connected when the Hessian's graphs
        are kept)."""
        op = self.operator
        if self.curvature == "hessian" and op.reuse_graph:
            return op.to_list(torch.stack(op._graphs).sum(0))
        return op.to_list(op.gradient())

    def dataloader_hv_product(self, v):
        """PyHessian's product: ``v`` a list shaped like ``params`` -> ``(v^T H v, H v)``."""
        op = self.operator
        flat = op.from_list(v)
        Hv = op.matvec(flat)
        return float(flat.to(torch.float64) @ Hv.to(torch.float64)), op.to_list(Hv)

    # ------------------------------------------------------------------ helpers
    def _generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else broadcast_seed(self.device)
        return torch.Generator().manual_seed(int(seed))

    def _groups(self, group_by):
        op = self.operator
        return parameter_groups(op.param_names, op.numels, group_by)

    # ------------------------------------------------------------------ the three analyses
    def eigenvalues(self, maxIter: int = 100, tol: float = 1e-3, top_n: int = 1, *,
                    method: str | None = None, which: str = "LA",
                    sampling_error: int | None = None):
        """Top ``top_n`` eigenvalues and eigenvectors (lists of per-parameter tensors).

        ``method="lanczos"`` (the default: up to maxIter products in all; stops when every
        returned eigenvalue's relative error bound, from the Ritz residuals and gaps, is <= tol)
        or ``"power"`` (PyHessian's exact algorithm: power iteration with deflation, up to
        maxIter products per eigenvalue, stopping when an eigenvalue changes by less than tol
        relatively; finds the largest magnitude). ``which``: "LA" largest (default), "SA"
        smallest (most negative; Lanczos), "LM" largest magnitude. Lanczos needs fewer products
        than power iteration for the same tol (bench/bench_facade.py) and its stopping rule is
        a bound on the error, not a change between iterates.
        ``sampling_error=G``: also the jackknife over G groups of the mini-batches
        (``estimators.sampling``): ``last_result.sampling.stderr`` and ``.bias``, one per
        eigenvalue (how far each would move with another sample of the same size; its bias).
        """
        op = self.operator
        method = method or "lanczos"
        if method == "power":
            if which == "SA":
                raise ValueError("power iteration cannot find the smallest eigenvalues; pass "
                                 "method='lanczos' with which='SA'")
            res = power_iteration_eigenpairs(op, top_n, max_iter=maxIter, tol=tol,
                                             generator=self._generator())
        elif method == "lanczos":
            res = lanczos_eigenpairs(op, top_n, which=which, max_steps=maxIter, tol=tol,
                                     generator=self._generator())
        else:
            raise ValueError(f"unknown eigenvalue method {method!r}: use 'power' or 'lanczos'")
        if sampling_error is not None:
            res.sampling = eigenvalue_sampling_error(op, res, sampling_error,
                                                     generator=self._generator())
        self.last_result = res
        vectors = [op.to_list(v.to(op.dtype)) for v in res.eigenvectors]
        return list(res.eigenvalues), vectors

    def trace(self, maxIter: int = 100, tol: float = 1e-3, *,
              method: str = "deflated", rse: float | None = None,
              deflate: int | str | None = None, num_matvecs: int | None = None,
              per_layer: bool = False, group_by: str = "module",
              sampling_error: int | None = None):
        """Per-probe trace estimates (their mean estimates tr(H); PyHessian's return value).

        ``method="deflated"`` (the default): Hutchinson after removing a Krylov space exactly
        (``deflate``: "auto" (default) chooses its size from up to 8 pilot probes, or an int m
        of Lanczos steps); each sample is ``tr(Q^T H Q) + (Pz)^T H (Pz)``, so their mean is
        the estimate, and the probes stop at the relative standard error ``rse`` (default
        ``TRACE_RSE`` = 0.05, at least 10 probes, at most ``maxIter``). ``method="hutchinson"``
        is PyHessian's exact algorithm: plain Rademacher probes (unless ``deflate`` is given)
        stopping when the running mean changes by less than ``tol`` relatively (or at ``rse``
        when given), at most ``maxIter`` probes. ``method="hutchpp"``: Hutch++ with a fixed
        budget of ``num_matvecs`` products (default maxIter). The standard error, products
        used and the deflation are in ``last_result``.
        ``per_layer=True`` returns ``(samples, per_layer)`` with ``per_layer`` a dict
        group name -> that group's share of every sample (``group_by``: "module", "stage",
        "parameter"); the shares of a probe add up to its sample, and their means estimate the
        traces of the diagonal blocks. ``sampling_error=G``: also the jackknife over G groups
        of the mini-batches from the same probes (``last_result.sampling``: ``stderr``,
        ``total_stderr`` with the probes' error, ``group_stderr`` per layer; not hutchpp).
        """
        op = self.operator
        groups = self._groups(group_by) if per_layer else None
        if method in ("deflated", "hutchinson"):
            if method == "deflated":
                deflate, rse = "auto" if deflate is None else deflate, rse or TRACE_RSE
            res = hutchinson_trace(op, max_iter=maxIter, tol=tol, rse=rse, deflate=deflate or 0,
                                   groups=[g.index for g in groups] if groups else None,
                                   sampling_groups=sampling_error,
                                   generator=self._generator())
        elif method == "hutchpp":
            if per_layer or sampling_error is not None:
                raise ValueError("per_layer=True and sampling_error need method='deflated' or "
                                 "'hutchinson'")
            res = hutchpp_trace(op, num_matvecs or maxIter, generator=self._generator())
        else:
            raise ValueError(f"unknown trace method {method!r}: use 'deflated', 'hutchinson' "
                             "or 'hutchpp'")
        self.last_result = res
        if per_layer:
            cols = res.group_samples.T.tolist()
            return list(res.samples), {g.name: c for g, c in zip(groups, cols)}
        return list(res.samples)

    def diagonal(self, maxIter: int = 100, tol: float = 1e-3, *,
                 rse: float | None = None, deflate: int | str = 0,
                 sampling_error: int | None = None):
        """Hutchinson's estimate of diag(H), a list of tensors shaped like ``params``.

        The mean over Rademacher probes z of z * (H z) (Bekas, Kokiopoulou & Saad 2007); the
        probes stop as in ``trace``. ``last_result.diagonal.stderr`` holds the elementwise
        standard errors, ``last_result`` the trace from the same probes. ``sampling_error=G``:
        also their jackknife over G groups of the mini-batches,
        ``last_result.diagonal.sampling_stderr``.
        """
        op = self.operator
        res = hutchinson_trace(op, max_iter=maxIter, tol=tol, rse=rse, deflate=deflate,
                               diagonal=True, sampling_groups=sampling_error,
                               generator=self._generator())
        if res.sampling is not None:
            res.diagonal.sampling_stderr = res.sampling.diagonal_stderr
        self.last_result = res
        return op.to_list(res.diagonal.diagonal.to(op.dtype))

    def density(self, iter: int = 100, n_v: int = 1):
        """SLQ: ``n_v`` runs of ``iter`` Lanczos steps -> (eigen_list_full, weight_list_full)."""
        op = self.operator
        res = slq_density(op, num_steps=iter, num_runs=n_v, generator=self._generator())
        self.last_result = res
        return res.nodes, res.weights
