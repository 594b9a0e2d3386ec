"""Symmetric linear operators known through their products: what every algorithm takes.

A :class:`LinearOperator` has a size ``dim``, the ``dtype`` and ``device`` of the vectors it
multiplies, and ``matvec(V)`` for one vector ``(dim,)`` or a block ``(k, dim)`` of ``k`` row
vectors (returned row-wise: row i is ``A V[i]``). Subclasses implement ``_matmat`` on blocks.

* :class:`DenseOperator` wraps a dense symmetric matrix (tests, small problems).
* :class:`CallableOperator` wraps a function ``v -> A v``.
* :class:`BlockOperator` restricts an operator to a subset of coordinates: ``P^T A P`` with
  ``P`` the embedding of those coordinates, e.g. one layer's diagonal block of a Hessian.
* ``HessianOperator`` (in ``operator.py``) is the Hessian of a model's loss.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["LinearOperator", "DenseOperator", "CallableOperator", "BlockOperator"]


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


class BlockOperator(LinearOperator):
    """``P^T A P``: ``A`` restricted to the coordinates ``index`` (a slice or index tensor).

    A product embeds the vector into ``A``'s space (zeros elsewhere), multiplies, and reads the
    same coordinates back: it costs one product of ``A``. With several index sets use
    :meth:`restrict_many`, which shares one batched product among them.
    """

    def __init__(self, op: LinearOperator, index: slice | torch.Tensor | Sequence[int]):
        self.op = op
        self.index = _as_index(index, op.dim)
        size = len(range(op.dim)[self.index]) if isinstance(self.index, slice) else len(self.index)
        super().__init__(size, op.dtype, op.device)

    def embed(self, V: torch.Tensor) -> torch.Tensor:
        """Rows of ``V`` (k, size) placed on the block's coordinates (zeros elsewhere)."""
        full = torch.zeros(V.shape[0], self.op.dim, dtype=V.dtype, device=V.device)
        full[:, self.index] = V
        return full

    def _matmat(self, V):
        return self.op.matvec(self.embed(V))[:, self.index]


def _as_index(index, dim):
    if isinstance(index, slice):
        return index
    t = torch.as_tensor(index, dtype=torch.long)
    if t.dim() != 1 or t.numel() == 0 or t.min() < 0 or t.max() >= dim:
        raise ValueError(f"index must be a non-empty 1-D set of coordinates in [0, {dim})")
    return t
