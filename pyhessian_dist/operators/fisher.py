"""The empirical Fisher matrix of a model's mean loss over a sharded data set.

With the gradient g_i = grad l_i(theta) of sample i's loss (the loss of the batch made of
sample i alone) over all N samples of every rank,

    F = (1/N) sum_i g_i g_i^T,        F V = (1/N) sum_i g_i (g_i . V)  (rows of a block V),

so that mini-batch b contributes ``w_b F_b V = (1/N) (V G_b^T) G_b`` with G_b its (n_b, dim)
per-sample gradients. F is the "empirical" Fisher (Kunstner, Hennig & Balles 2019): the
observed labels take the place of samples from the model's predictive distribution, so it is
not the Fisher information nor, in general, a curvature of the loss; it is positive
semidefinite of rank at most N. It needs the loss to be a MEAN of per-sample losses (checked
on the first mini-batch: the mean of the one-sample losses must equal the batch's loss).

Per-sample gradients come from ``torch.func``: ``vmap(grad(...))`` over the samples of a
chunk, with the parameters swapped in by ``functional_call`` (a model that ``vmap`` cannot
run falls back to one backward pass per sample). Costs: computing G_b takes about one
per-sample-gradient pass over the mini-batch (measured in bench/bench_curvature.py against a
gradient) and n_b x dim numbers of memory per chunk; G_b is kept for as many mini-batches as
fit in the memory budget, and a product with kept G_b costs two matrix products (4 k n_b dim
flops for k vectors, no pass through the network); the rest are recomputed per product (one
per-sample-gradient pass per block of vectors).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..attention import math_attention
from ..batches import _map, batch_size
from .hessian import _Forward
from .model import ModelOperator, checking_loss, kept_phrase, scalar_loss

__all__ = ["EmpiricalFisherOperator", "per_sample_gradients"]


def _rtol(dtype: torch.dtype) -> float:
    """How far a mean of one-sample losses may be from the batch's loss in ``dtype``."""
    return 1e-9 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 1e-2


def _sample_function(module: nn.Module, loss_fn: Callable, batch):
    """``(fn, leaves)``: ``fn(params, *xs)`` is the loss of the batch of one sample whose
    batched tensors are ``xs`` (each without its sample dimension), ``leaves`` the batched
    tensors of ``batch`` (the others enter ``fn`` as they are)."""
    flat, spec = tree_flatten(batch)
    where = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.dim() > 0]

    def fn(params, *xs):
        items = list(flat)
        for i, x in zip(where, xs):
            items[i] = x.unsqueeze(0)
        sample = tree_unflatten(items, spec)
        out = torch.func.functional_call(module, params, (sample,), strict=False)
        return scalar_loss(loss_fn(out, sample))

    return fn, [flat[i] for i in where]


def _slice(batch, start: int, stop: int):
    """Samples ``start:stop`` of ``batch``."""
    return _map(lambda t: t[start:stop] if t.dim() > 0 else t, batch)


def per_sample_gradients(model: nn.Module, batch, forward: Callable, loss: Callable,
                         params: dict, *, chunk_size: int | None = None,
                         mode: str = "vmap") -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(G, losses, mode)``: the (n, dim) gradients of the one-sample losses of ``batch``
    (rows in sample order, columns in the order of ``params``, a dict name -> tensor of
    ``model``'s parameters) and the (n,) losses, in chunks of ``chunk_size`` samples;
    ``mode`` "vmap" (``torch.func``) or "loop" (one backward pass per sample); "vmap" falls
    back to "loop" for a model ``vmap`` cannot run, and the mode used is returned."""
    module = _Forward(model, forward)
    ps = {f"model.{n}": p.detach() for n, p in params.items()}
    n = batch_size(batch)
    chunk = n if chunk_size is None else max(1, int(chunk_size))
    rows, losses = [], []
    for start in range(0, n, chunk):
        part = _slice(batch, start, start + chunk)
        fn, xs = _sample_function(module, loss, part)
        if mode == "vmap":
            try:  # attention on the math kernel: the fused ones have no batching rule
                with math_attention():
                    grads, values = torch.func.vmap(torch.func.grad_and_value(fn),
                                                    in_dims=(None, *[0] * len(xs)))(ps, *xs)
            except RuntimeError:  # e.g. .item() or in-place updates in the forward
                mode = "loop"
        if mode == "loop":
            pairs = [torch.func.grad_and_value(fn)(ps, *[x[i] for x in xs])
                     for i in range(len(xs[0]))]
            grads = {k: torch.stack([g[k] for g, _v in pairs]) for k in ps}
            values = torch.stack([v for _g, v in pairs])
        k = len(values)
        rows.append(torch.cat([grads[name].reshape(k, -1) for name in ps], dim=1))
        losses.append(values.detach())
    return torch.cat(rows), torch.cat(losses), mode


class EmpiricalFisherOperator(ModelOperator):
    """F v for the mean loss over every rank's mini-batches (see the module docstring).

    Args (besides ``ModelOperator``'s: model, criterion or loss, batches, forward, device,
    data_on_device, memory_budget_bytes, local_processes):
        keep_gradients: keep each mini-batch's per-sample gradients (n_b x dim numbers) so a
            product is two matrix products. ``"auto"`` keeps as many mini-batches as fit in
            ``memory_budget_bytes`` (after the chunk being computed), ``True`` all, ``False``
            none (every product recomputes them, once per block of vectors).
        chunk_size: samples per ``vmap`` call (default: as many as the memory budget allows
            for their gradients, a quarter of it, at most the mini-batch).

    The loss must be a mean of per-sample losses (``ValueError`` otherwise, checked on the
    first mini-batch; ``EmpiricalFisherOperator.check_loss`` runs the same check before any
    data is loaded). The loss and gradient of the first-order pass are the means of the
    per-sample ones.
    """

    product_label = "EF product"
    _forwards_in_first_pass = 2  # the per-sample pass and the mean check of the first batch

    def __init__(self, model: nn.Module, criterion: Callable | None = None,
                 batches: Iterable = (), *, keep_gradients: bool | str = "auto",
                 chunk_size: int | None = None, **kwargs):
        if keep_gradients not in (True, False, "auto"):
            raise ValueError(f"keep_gradients must be True, False or 'auto', got "
                             f"{keep_gradients!r}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        # set before ModelOperator.__init__, whose first-order pass calls _loss_and_gradient
        self._keep_request = keep_gradients
        self._kept: list[torch.Tensor] = []
        self._chunk_request = chunk_size
        self.per_sample_mode = "vmap"
        super().__init__(model, criterion, batches, **kwargs)

    @classmethod
    def check_loss(cls, model: nn.Module, batch, *, criterion: Callable | None = None,
                   forward: Callable | None = None, loss: Callable | None = None) -> None:
        """ValueError unless the loss of ``batch`` (moved to the model's device; the model in
        eval mode) is the mean of its samples' one-sample losses."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with checking_loss(model, batch, criterion, forward, loss) as (forward_fn, loss_fn,
                                                                      batch):
            with torch.no_grad():
                whole = scalar_loss(loss_fn(forward_fn(model, batch), batch))
            _G, losses, _mode = per_sample_gradients(model, batch, forward_fn, loss_fn, params)
        _check_mean(float(whole), losses, whole.dtype)

    # --------------------------------------------------------- per-sample gradients
    @property
    def chunk_size(self) -> int:
        """Samples per ``vmap`` call: the given size, else as many as a quarter of the budget
        holds (their gradients, three times over for vmap's intermediates), at most the
        largest mini-batch."""
        if self._chunk_request is not None:
            return int(self._chunk_request)
        per_sample = 3 * self.dim * torch.finfo(self.dtype).bits // 8
        return max(1, min(max(self.batch_sizes, default=1),
                          self.memory_budget_bytes // 4 // per_sample))

    def _per_sample(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mini-batch b's (n_b, dim) per-sample gradients and (n_b,) losses."""
        params = dict(zip(self.param_names, self.params))
        G, losses, self.per_sample_mode = per_sample_gradients(
            self.model, self._batch(b), self.forward_fn, self.loss_fn, params,
            chunk_size=self.chunk_size, mode=self.per_sample_mode)
        return G, losses

    def _loss_and_gradient(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_b L_b, w_b grad L_b)`` as means of the per-sample ones, keeping G_b when the
        budget allows (the first mini-batch's loss is checked to be a mean)."""
        G, losses = self._per_sample(b)
        if b == 0:
            with torch.no_grad():
                _check_mean(float(self._weighted_loss(b)) / self.weights[b], losses, self.dtype)
        held = sum(t.numel() for t in self._kept) * G.element_size()
        room = self.memory_budget_bytes - self.chunk_size * 3 * G.shape[1] * G.element_size()
        if len(self._kept) == b and (self._keep_request is True or (
                self._keep_request == "auto" and held + G.numel() * G.element_size() <= room)):
            self._kept.append(G)
        return losses.sum() / self.num_samples, G.sum(0) / self.num_samples

    # ----------------------------------------------------------------- products
    def release(self) -> None:
        """Drop the kept per-sample gradients (later products recompute them)."""
        self._kept = []

    def _batch_matmat(self, b: int, V: torch.Tensor) -> torch.Tensor:
        """``(1/N) (V G_b^T) G_b``: kept G_b, or recomputed once for the whole block."""
        G = self._kept[b] if b < len(self._kept) else self._per_sample(b)[0]
        return (V @ G.T) @ G / self.num_samples

    # ----------------------------------------------------------------- reports
    def describe_product(self) -> str:
        """How an EF product is computed."""
        return (f"EF product: per-sample gradients ({self.per_sample_mode}, chunks of <= "
                f"{self.chunk_size} samples), (1/N) G^T (G v)")

    def _describe_kept(self) -> str:
        """The per-sample gradients kept, in words."""
        return kept_phrase("per-sample gradients", len(self._kept), len(self.batches),
                           sum(t.numel() * t.element_size() for t in self._kept))

    def stats(self) -> dict:
        """``ModelOperator.stats()`` with what is kept and how per-sample gradients are made."""
        return {**super().stats(), "curvature": "ef", "gradients_kept": len(self._kept),
                "gradient_bytes_kept": sum(t.numel() * t.element_size() for t in self._kept),
                "per_sample_mode": self.per_sample_mode, "chunk_size": self.chunk_size}


def _check_mean(whole: float, losses: torch.Tensor, dtype: torch.dtype) -> None:
    """ValueError unless ``whole`` (a batch's loss) is the mean of ``losses`` (its samples'
    one-sample losses), to a tolerance for ``dtype``."""
    mean = float(losses.double().mean())
    scale = max(abs(whole), float(losses.double().abs().mean()), 1e-30)
    if math.isfinite(whole) and abs(whole - mean) <= _rtol(dtype) * scale:
        return
    n = len(losses)
    ratio = f"; the batch's loss is {whole / mean:.4g} times the mean" if mean else ""
    raise ValueError(
        f"the empirical Fisher needs loss(outputs, batch) to be the MEAN of per-sample losses, "
        f"but on a first batch of {n} samples the batch's loss is {whole:.6g} while the mean of "
        f"the {n} one-sample losses (each sample as a batch of its own) is {mean:.6g}{ratio}; "
        "return the mean over the batch's samples (e.g. reduction='mean', not 'sum', and no "
        "weighting across samples), or use the Hessian or the GGN")
