"""Symmetric linear operators known through their products: what every algorithm takes.

A :class:`LinearOperator` has a size ``dim``, the ``dtype`` and ``device`` of the vectors it
multiplies, and ``matvec(V)`` for one vector ``(dim,)`` or a block ``(k, dim)`` of ``k`` row
vectors (returned row-wise: row i is ``A V[i]``). Subclasses implement ``_matmat`` on blocks.

* :class:`DenseOperator` wraps a dense symmetric matrix (tests, small problems).
* :class:`CallableOperator` wraps a function ``v -> A v``.
* ``ModelOperator`` (``model.py``) and its subclasses, e.g. ``HessianOperator``
  (``hessian.py``), are curvature matrices of a model's loss over sharded data.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["LinearOperator", "DenseOperator", "CallableOperator"]


class LinearOperator:
    """Base class: ``dim``, ``dtype``, ``device`` and ``matvec``; counts products in
    ``num_matvecs``."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu"):
        if int(dim) < 1:
            raise ValueError(f"an operator needs dim >= 1, got {dim}")
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_matvecs = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``(k, dim)`` block in ``dtype`` on ``device`` -> the ``k`` products, row-wise."""
        raise NotImplementedError

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for ``v`` of shape ``(dim,)``, or ``A`` applied to each row of ``(k, dim)``."""
        if v.dim() not in (1, 2) or v.shape[-1] != self.dim:
            raise ValueError(f"expected shape ({self.dim},) or (k, {self.dim}), "
                             f"got {tuple(v.shape)}")
        V = v.to(self.device, self.dtype)
        out = self._matmat(V if V.dim() == 2 else V[None])
        self.num_matvecs += V.shape[0] if V.dim() == 2 else 1
        return out if v.dim() == 2 else out[0]

    __call__ = matvec

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)


class DenseOperator(LinearOperator):
    """A dense symmetric matrix ``A`` (checked symmetric to 1e-10 relative)."""

    def __init__(self, A: torch.Tensor):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"need a square matrix, got shape {tuple(A.shape)}")
        scale = A.abs().max().clamp(min=1e-300)
        if (A - A.T).abs().max() > 1e-10 * scale:
            raise ValueError("the matrix is not symmetric")
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A = A

    def _matmat(self, V):
        return V @ self.A  # rows of V A = (A V^T)^T since A is symmetric


class CallableOperator(LinearOperator):
    """A function ``fn(v) -> A v``; with ``batched=True`` it also takes ``(k, dim)`` blocks."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], dim: int,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                 batched: bool = False):
        super().__init__(dim, dtype, device)
        self.fn = fn
        self.batched = batched

    def _matmat(self, V):
        if self.batched:
            return self.fn(V)
        return torch.stack([self.fn(v) for v in V])
