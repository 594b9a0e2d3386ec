"""Mini-batches of any layout, and the default forward and loss of PyHessian's ``(x, y)`` form.

A batch is whatever torch's default collate makes: a tensor, a tuple or list, a dict, nested
(namedtuples too). Its samples run along the leading dimension of each of its tensors, so all
of them must agree on that size; leaves that are not tensors (strings, numbers) and 0-dim
tensors carry no sample dimension and are left alone. The helpers here recurse over tuples,
lists and dicts.

The operators see a batch only through two callables:

* ``forward(model, batch) -> outputs`` (default :func:`default_forward`: ``model(batch[0])``);
* ``loss(outputs, batch) -> 0-dim tensor``, the MEAN loss over the batch's n_b samples, so
  that n_b * loss sums to the batch's total loss (:func:`criterion_loss` wraps PyHessian's
  ``criterion(outputs, targets)`` with ``targets = batch[1]``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

__all__ = ["batch_size", "move_batch", "pin_batch", "batch_nbytes", "default_forward",
           "criterion_loss"]


def _map(fn: Callable, batch):
    """``batch`` with ``fn`` applied to each tensor leaf (containers rebuilt, other leaves kept)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: _map(fn, v) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_map(fn, v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map(fn, v) for v in batch)
    return batch


def _leaves(batch, path: str = "batch"):
    """(path, tensor) for every tensor leaf of ``batch``, depth first."""
    if isinstance(batch, torch.Tensor):
        yield path, batch
    elif isinstance(batch, Mapping):
        for k, v in batch.items():
            yield from _leaves(v, f"{path}[{k!r}]")
    elif isinstance(batch, (tuple, list)):
        for i, v in enumerate(batch):
            yield from _leaves(v, f"{path}[{i}]")


def batch_size(batch) -> int:
    """The number of samples n_b of ``batch``: the leading size of its tensors.

    Every tensor of at least one dimension must have the same leading size (``ValueError``
    naming the sizes that disagree otherwise); 0-dim tensors and non-tensor leaves are not
    counted. A batch with no tensor of at least one dimension is a ``ValueError``.
    """
    sizes = {path: t.shape[0] for path, t in _leaves(batch) if t.dim() > 0}
    if not sizes:
        raise ValueError(f"a batch needs at least one tensor with a sample dimension; got "
                         f"{type(batch).__name__} without one")
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{path}: {n}" for path, n in sizes.items())
        raise ValueError("the tensors of a batch disagree on the number of samples (their "
                         f"leading size): {listed}")
    return int(next(iter(sizes.values())))


def move_batch(batch, device: torch.device | str, non_blocking: bool = False):
    """``batch`` with every tensor moved to ``device`` (same structure)."""
    return _map(lambda t: t.to(device, non_blocking=non_blocking), batch)


def _pin(t: torch.Tensor) -> torch.Tensor:
    try:
        return t.pin_memory()
    except RuntimeError:  # no CUDA driver: leave it as it is
        return t


def pin_batch(batch):
    """``batch`` with every CPU tensor in page-locked memory (left as is without CUDA)."""
    return _map(lambda t: _pin(t) if t.device.type == "cpu" else t, batch)


def batch_nbytes(batch) -> int:
    """Bytes held by the tensors of ``batch`` (numel * element size, summed)."""
    return sum(t.numel() * t.element_size() for _path, t in _leaves(batch))


def default_forward(model: nn.Module, batch):
    """PyHessian's forward: ``model(batch[0])``, or ``model(*batch[0])`` when ``batch[0]`` is a
    tuple or list (models of several inputs); ``model(batch)`` for a batch that is a tensor."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if not isinstance(batch, (tuple, list)):
        raise TypeError(f"the default forward takes batch[0] of an (inputs, targets) batch; "
                        f"for a {type(batch).__name__} batch pass forward=fn(model, batch)")
    x = batch[0]
    return model(*x) if isinstance(x, (tuple, list)) else model(x)


def criterion_loss(criterion: Callable) -> Callable:
    """``loss(outputs, batch) = criterion(outputs, batch[1])``: PyHessian's form, for a criterion
    that returns the MEAN over the batch (e.g. ``nn.CrossEntropyLoss()``, default reduction)."""

    def loss(outputs, batch):
        return criterion(outputs, batch[1])

    return loss
