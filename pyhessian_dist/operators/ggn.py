"""The generalized Gauss-Newton matrix of a model's mean loss over a sharded data set.

With outputs z_b = f(theta, x_b) of mini-batch b (``forward(model, batch)``), its mean loss
L_b = l(z_b, batch_b) (``loss(outputs, batch)``), the Jacobian J_b = dz_b / dtheta and the
Hessian of the loss with respect to the outputs H_L,b = d^2 l / dz_b^2 (Schraudolph 2002;
Martens 2020), and w_b = n_b / N as in ``model.py``,

    G = sum_ranks sum_b w_b J_b^T H_L,b J_b,        H = G + sum_b w_b sum_j (dl/dz_bj) d^2 z_bj,

so G is the Hessian without the second-order term of the network (Papyan 2019 splits the
Hessian this way). G is positive semidefinite when the loss is convex in the outputs
(cross-entropy, squared error), and G = H for a model linear in theta with a squared loss.

A product is matrix-free, with no per-sample Jacobians: for each row v of a block,

1. ``J_b v``: a Jacobian-vector product, by the double-backward trick: the vector-Jacobian
   product ``J_b^T u`` is built once with a symbolic u (``create_graph=True``) and
   differentiated with respect to u along v;
2. ``w_b H_L,b (J_b v)``: a Hessian-vector product in output space, through the graph of the
   gradient of ``w_b l`` with respect to a detached copy of the outputs;
3. ``J_b^T (...)``: a vector-Jacobian product, one backward pass through the forward graph.

Steps 1-3 need the forward graph and the graph of ``J_b^T u``; they are kept for as many
mini-batches as the memory budget allows (measured on the first one, as ``HessianOperator``
does) and recomputed per product for the rest, one forward pass shared by a block of vectors.
A product with a kept graph costs about one forward-mode and one reverse-mode pass through
the network (measured in bench/bench_curvature.py against an HVP and a gradient). BatchNorm in
eval mode is the per-channel affine map ``x * s + t`` (s, t from its running statistics and
weights); the graphs are built with ``F.batch_norm`` computed as that map, because torch's
double backward of ``batch_norm`` costs as much as the convolutions' (measured: the GGN product
of ResNet20 1.7x faster; the same function, equal to rounding).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..attention import math_attention
from ..batches import _map
from .hessian import _EvalBatchNormAsAffine, _measure_graphs
from .model import ModelOperator, checking_loss, kept_phrase, scalar_loss

__all__ = ["GGNOperator"]


@dataclass
class _OutputGraph:
    """What the products of one mini-batch need (see the module docstring)."""

    z: list            # the outputs' tensors that depend on theta (with the forward graph)
    zd: list           # detached copies of z, leaves of the loss's graph
    gz: list           # w_b dl/dz (graph kept: its gradient is H_L times a vector)
    loss: torch.Tensor  # w_b L_b
    u: list | None = None      # the symbolic vector of J^T u
    JTu: list | None = None    # J^T u per parameter (None where a parameter is unused)


def _detached_outputs(outputs) -> tuple[object, list, list]:
    """``(outputs with every tensor detached, z, zd)``: z are the floating tensors of
    ``outputs`` that depend on the parameters, zd their detached copies (requiring grad), in
    the order ``outputs`` holds them; other tensors are detached as they are."""
    z, zd = [], []

    def swap(t):
        if t.is_floating_point() and t.requires_grad:
            d = t.detach().requires_grad_()
            z.append(t)
            zd.append(d)
            return d
        return t.detach()

    return _map(swap, outputs), z, zd


def _loss_of_outputs(outputs, batch, loss_fn, params) -> tuple[torch.Tensor, list, list]:
    """``(loss(outputs detached, batch), z, zd)``, with the checks that the loss is a function
    of the outputs alone (ValueError saying what was found otherwise)."""
    detached, z, zd = _detached_outputs(outputs)
    if not z:
        raise ValueError("the GGN needs outputs that depend on the parameters: forward(model, "
                         "batch) returned no floating-point tensor with a gradient")
    loss = scalar_loss(loss_fn(detached, batch))
    if not loss.requires_grad or all(g is None for g in torch.autograd.grad(
            loss, zd, retain_graph=True, allow_unused=True)):
        raise ValueError("the GGN needs loss(outputs, batch) to be a function of the outputs, "
                         "but its value does not depend on them (checked on a first batch: "
                         "no gradient reaches a detached copy of the outputs); compute the "
                         "loss from the outputs it is given, or use the Hessian")
    if any(g is not None for g in torch.autograd.grad(loss, params, retain_graph=True,
                                                        allow_unused=True)):
        raise ValueError("the GGN needs loss(outputs, batch) to depend on the parameters only "
                         "through the outputs, but it depends on them directly (checked on a "
                         "first batch with the outputs detached: a gradient still reaches the "
                         "parameters; e.g. a weight penalty or a second forward pass inside "
                         "loss()); move that term out of loss(), or use the Hessian")
    return loss, z, zd


class GGNOperator(ModelOperator):
    """G v for the mean loss over every rank's mini-batches (see the module docstring).

    Args (besides ``ModelOperator``'s: model, criterion or loss, batches, forward, device,
    data_on_device, memory_budget_bytes, local_processes):
        reuse_graph: keep each mini-batch's forward graph and the graph of ``J^T u`` so a
            product needs no forward pass. ``"auto"`` keeps as many as fit in
            ``memory_budget_bytes`` (measured on the first mini-batch), ``True`` all,
            ``False`` none (each product recomputes them, once per block of vectors).

    ``loss(outputs, batch)`` must be a function of the outputs alone (checked on the first
    mini-batch: ``ValueError`` otherwise; ``GGNOperator.check_loss`` runs the same check
    before any data is loaded). The outputs may be a tensor or any nesting of tuples, lists
    and dicts of tensors; J is taken with respect to every floating tensor among them that
    depends on the parameters.
    """

    product_label = "GGN product"

    def __init__(self, model: nn.Module, criterion: Callable | None = None,
                 batches: Iterable = (), *, reuse_graph: bool | str = "auto", **kwargs):
        if reuse_graph not in (True, False, "auto"):
            raise ValueError(f"reuse_graph must be True, False or 'auto', got {reuse_graph!r}")
        # set before ModelOperator.__init__, whose first-order pass calls _loss_and_gradient
        self._reuse_request = reuse_graph
        self._keep = 0 if reuse_graph is False else None
        self._graphs: list[_OutputGraph] = []
        self.graph_bytes_estimate = None
        super().__init__(model, criterion, batches, **kwargs)

    @classmethod
    def check_loss(cls, model: nn.Module, batch, *, criterion: Callable | None = None,
                   forward: Callable | None = None, loss: Callable | None = None) -> None:
        """ValueError unless ``loss`` is a function of the outputs alone on ``batch`` (moved to
        the model's device; the model in eval mode for the check)."""
        params = [p for p in model.parameters() if p.requires_grad]
        with checking_loss(model, batch, criterion, forward, loss) as (forward_fn, loss_fn,
                                                                      batch), \
                torch.enable_grad():
            _loss_of_outputs(forward_fn(model, batch), batch, loss_fn, params)

    # --------------------------------------------------------- per mini-batch graphs
    def _output_graph(self, b: int, jvp: bool, check: bool = False) -> _OutputGraph:
        """Forward pass of mini-batch b, the loss's gradient in output space (its graph kept)
        and, with ``jvp``, the graph of ``J^T u``; ``check``: check the loss as
        ``check_loss`` does."""
        batch = self._batch(b)
        # the graphs are differentiated twice: attention on the math kernel, which supports it
        with _EvalBatchNormAsAffine(), math_attention():
            outputs = self.forward_fn(self.model, batch)
        if check:
            loss, z, zd = _loss_of_outputs(outputs, batch, self.loss_fn, self.params)
        else:
            detached, z, zd = _detached_outputs(outputs)
            loss = scalar_loss(self.loss_fn(detached, batch))
        loss = loss * self.weights[b]
        gz = torch.autograd.grad(loss, zd, create_graph=True, allow_unused=True,
                                 materialize_grads=True)
        graph = _OutputGraph(z=z, zd=zd, gz=list(gz), loss=loss)
        if jvp:
            graph.u = [torch.zeros_like(t, requires_grad=True) for t in z]
            graph.JTu = list(torch.autograd.grad(z, self.params, grad_outputs=graph.u,
                                                 create_graph=True, allow_unused=True))
        return graph

    def _vjp(self, graph: _OutputGraph, w: list, retain: bool) -> torch.Tensor:
        """``J^T w`` (flat) for output-space tensors ``w``: one backward pass."""
        return self.flatten(torch.autograd.grad(graph.z, self.params, grad_outputs=w,
                                                retain_graph=retain, allow_unused=True,
                                                materialize_grads=True))

    def _loss_and_gradient(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_b L_b, w_b grad L_b = J^T w_b dl/dz)``, keeping the graphs of as many
        mini-batches as ``reuse_graph`` allows (their size measured on the first one)."""
        if self._keep is None:  # first mini-batch: measure what its graphs hold
            graph = _measure_graphs(self, lambda: self._output_graph(b, jvp=True, check=True))
        else:
            graph = self._output_graph(b, jvp=b < self._keep)
        kept = b < self._keep
        g = self._vjp(graph, [t.detach() for t in graph.gz], retain=kept)
        if kept:
            self._graphs.append(graph)
        return graph.loss, g

    @property
    def reuse_graph(self) -> bool:
        """True when every mini-batch's graphs are kept."""
        return len(self._graphs) == len(self.batches) and len(self.batches) > 0

    def release(self) -> None:
        """Drop the kept graphs (frees their memory; later products recompute)."""
        self._graphs = []

    # ----------------------------------------------------------------- products
    def _batch_matmat(self, b: int, V: torch.Tensor) -> torch.Tensor:
        """``w_b J_b^T H_L,b J_b V``: per row, a JVP, an output-space HVP and a VJP."""
        kept = b < len(self._graphs)
        graph = self._graphs[b] if kept else self._output_graph(b, jvp=True)
        used = [(i, t) for i, t in enumerate(graph.JTu) if t is not None and t.requires_grad]
        curved = [(i, t) for i, t in enumerate(graph.gz) if t.requires_grad]
        if not used or not curved:  # the outputs do not move with theta, or l is linear
            return torch.zeros_like(V)
        rows = []
        for r, v in enumerate(V):
            retain = kept or r < len(V) - 1
            vs = torch.split(v, self.numels)
            Jv = torch.autograd.grad([t for _i, t in used], graph.u,
                                     grad_outputs=[vs[i].view(t.shape) for i, t in used],
                                     retain_graph=True, allow_unused=True,
                                     materialize_grads=True)
            HJv = torch.autograd.grad([t for _i, t in curved], graph.zd,
                                      grad_outputs=[Jv[i] for i, _t in curved],
                                      retain_graph=True, allow_unused=True,
                                      materialize_grads=True)
            rows.append(self._vjp(graph, list(HJv), retain))
        return torch.stack(rows)

    # ----------------------------------------------------------------- reports
    def describe_product(self) -> str:
        """How a GGN product is computed."""
        return ("GGN product: J v (double-backward JVP), output-space Hessian, J^T (VJP); no "
                "per-sample Jacobians")

    def _describe_kept(self) -> str:
        """The graphs kept, in words."""
        n = len(self.batches)
        per = (self.graph_bytes_estimate or 0) / max(n, 1)
        return kept_phrase("output graphs (forward and J^T u)", len(self._graphs), n,
                           per * len(self._graphs))

    def stats(self) -> dict:
        """``ModelOperator.stats()`` with the graphs kept."""
        return {**super().stats(), "curvature": "ggn", "graphs_kept": len(self._graphs),
                "graph_bytes_estimate": self.graph_bytes_estimate}
