"""A drop-in replacement for PyHessian's ``hessian`` class, built on HessianOperator.

    from pyhessian_dist import hessian          # instead of: from pyhessian import hessian
    h = hessian(model, criterion, dataloader=loader, cuda=True)
    top_eigenvalues, top_eigenvectors = h.eigenvalues(top_n=3)
    trace_samples = h.trace()
    eigen_list_full, weight_list_full = h.density(iter=100, n_v=1)

Defaults reproduce PyHessian's algorithms (power iteration, Hutchinson, SLQ). When a
torch.distributed process group is initialised and each rank passes its own shard, every rank
gets the numbers of the union of the shards. Extra keyword arguments give the better methods
(``method="lanczos"`` for eigenvalues, ``method="hutchpp"`` for the trace). The full result of
the last call (error bars, products used, convergence history) is kept in ``last_result``.
"""
from __future__ import annotations

import warnings

import torch

from .algorithms import (hutchinson_trace, hutchpp_trace, lanczos_top_eigenpairs,
                         power_iteration_top_eigenpairs, slq_density)
from .operator import HessianOperator

__all__ = ["hessian"]


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
        seed: seed of the ``torch.Generator`` behind every random vector (same on all ranks).
        **operator_kwargs: passed to ``HessianOperator`` (``reuse_graph``, ``hvp_mode``, ...).
    """

    def __init__(self, model, criterion, data=None, dataloader=None, cuda=True, *, seed: int = 0,
                 **operator_kwargs):
        if (data is None) == (dataloader is None):
            raise ValueError("pass exactly one of data=(inputs, targets) or dataloader=...")
        self.device = _facade_device(cuda)
        self.model = model.to(self.device)
        self.criterion = criterion
        self.full_dataset = dataloader is not None
        batches = [data] if data is not None else list(dataloader)
        self.operator = HessianOperator(self.model, criterion, batches, device=self.device,
                                        **operator_kwargs)
        self.params = self.operator.params
        self.gradsH = self.operator.to_list(self.operator.gradient())
        self.seed = seed
        self.last_result = None

    def _kwargs(self):
        op = self.operator
        gen = torch.Generator(device=op.device).manual_seed(self.seed)
        return dict(dtype=op.dtype, device=op.device, generator=gen)

    def eigenvalues(self, maxIter: int = 100, tol: float = 1e-3, top_n: int = 1, *,
                    method: str = "power", which: str = "LA"):
        """Top ``top_n`` eigenvalues and eigenvectors (lists of per-parameter tensors).

        ``method="power"`` (default, PyHessian's, up to maxIter products per eigenvalue) or
        ``"lanczos"`` (up to maxIter products in all; ``which`` = "LA" or "LM").
        """
        op = self.operator
        if method == "power":
            res = power_iteration_top_eigenpairs(op, op.dim, top_n, max_iter=maxIter, tol=tol,
                                                 **self._kwargs())
        elif method == "lanczos":
            res = lanczos_top_eigenpairs(op, op.dim, top_n, max_steps=maxIter, tol=tol,
                                         which=which, batched=True, **self._kwargs())
        else:
            raise ValueError(f"unknown eigenvalue method {method!r}: use 'power' or 'lanczos'")
        self.last_result = res
        vectors = [op.to_list(v.to(op.dtype)) for v in res.eigenvectors]
        return list(res.eigenvalues), vectors

    def trace(self, maxIter: int = 100, tol: float = 1e-3, *, method: str = "hutchinson",
              num_matvecs: int | None = None):
        """Per-probe trace estimates (their mean estimates tr(H)).

        ``method="hutchinson"`` (default, PyHessian's stopping rule) or ``"hutchpp"`` with a
        fixed budget of ``num_matvecs`` products (default ``maxIter``).
        """
        op = self.operator
        if method == "hutchinson":
            res = hutchinson_trace(op, op.dim, max_iter=maxIter, tol=tol, batched=True,
                                   **self._kwargs())
        elif method == "hutchpp":
            res = hutchpp_trace(op, op.dim, num_matvecs or maxIter, batched=True,
                                **self._kwargs())
        else:
            raise ValueError(f"unknown trace method {method!r}: use 'hutchinson' or 'hutchpp'")
        self.last_result = res
        return list(res.samples)

    def density(self, iter: int = 100, n_v: int = 1):  # noqa: A002 - PyHessian's name
        """SLQ: ``n_v`` runs of ``iter`` Lanczos steps -> (eigen_list_full, weight_list_full)."""
        op = self.operator
        res = slq_density(op, op.dim, num_steps=iter, num_runs=n_v, batched=True,
                          **self._kwargs())
        self.last_result = res
        return res.nodes, res.weights
