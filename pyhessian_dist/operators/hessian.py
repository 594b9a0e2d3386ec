"""The Hessian of a model's mean loss over a sharded data set, as a linear operator.

With L = sum_ranks sum_b w_b L_b (w_b = n_b / N, see ``model.py``),

    H = d^2 L / d theta^2,        H V = sum_ranks sum_b w_b H_b V,

and ``w_b H_b v`` is Pearlmutter's product: the gradient of ``(w_b grad L_b) . v``, a second
backward pass through the first-order graph of mini-batch b (or ``torch.func.jvp`` of
``torch.func.grad`` in forward-over-reverse mode).
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..attention import math_attention
from .conv import SecondOrderConv
from .model import ModelOperator, kept_phrase

__all__ = ["HVP_MODES", "HessianOperator"]

HVP_MODES = ("double_backward", "forward_over_reverse")


class _SavedBytes:
    """Counts the bytes autograd saves for backward while active (distinct storages only)."""

    def __init__(self):
        self.bytes = 0
        self._seen = set()

    def _pack(self, t):
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), t.device)
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += storage.nbytes()
        except Exception:  # noqa: BLE001 - some tensor subclasses have no storage
            pass
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


_BATCH_NORM = inspect.signature(F.batch_norm)


class _EvalBatchNormAsAffine(TorchFunctionMode):
    """``F.batch_norm`` with running statistics and ``training=False`` computed as the affine
    map it is, ``x * s + t`` per channel (s = weight / sqrt(running_var + eps), t = bias -
    running_mean * s); every other call runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            a = _BATCH_NORM.bind(*args, **kwargs)
            a.apply_defaults()
            p = a.arguments
            if not p["training"] and p["running_mean"] is not None \
                    and p["running_var"] is not None:
                scale = torch.rsqrt(p["running_var"] + p["eps"])
                if p["weight"] is not None:
                    scale = scale * p["weight"]
                shift = -p["running_mean"] * scale
                if p["bias"] is not None:
                    shift = shift + p["bias"]
                shape = [1, -1] + [1] * (p["input"].dim() - 2)
                return p["input"] * scale.view(shape) + shift.view(shape)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _second_order_graph(channels_last: bool = True):
    """Where a graph that is differentiated twice is built (or used): attention on the math
    kernel (the fused ones have no double backward), eval-mode BatchNorm as its affine map
    (torch's double backward of ``batch_norm`` costs much more than the map's; the same
    function, equal to rounding: measured 1.1x per ResNet20 HVP on a batch of 128, the same
    graph built both ways, interleaved) and CPU convolutions with a fused double backward,
    channels-last with ``channels_last`` (``conv.py``: 1.27x more per HVP)."""
    with math_attention(), _EvalBatchNormAsAffine(), SecondOrderConv(channels_last):
        yield


def _measure_graphs(op, build):
    """``build()`` (the first mini-batch's graphs) under saved-tensor hooks: sets
    ``op.graph_bytes_estimate`` (its bytes times the mini-batches) and ``op._keep`` (how many
    graphs to keep: all, or as many as fit ``op.memory_budget_bytes``, as
    ``op._reuse_request`` says); returns what ``build`` returns."""
    counter = _SavedBytes()
    with counter.hooks():
        out = build()
    per_batch = max(counter.bytes, 1)
    n = len(op.batches)
    op.graph_bytes_estimate = per_batch * n
    op._keep = n if op._reuse_request is True else min(n, op.memory_budget_bytes // per_batch)
    return out


class _Forward(nn.Module):
    """``forward_fn(model, batch)`` as a module, so that ``torch.func.functional_call`` can swap
    the model's parameters (named ``model.<name>``) under any forward."""

    def __init__(self, model: nn.Module, forward_fn: Callable):
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, batch):
        return self.forward_fn(self.model, batch)


class HessianOperator(ModelOperator):
    """H v for the mean loss over every rank's mini-batches (see the module docstring).

    Args (besides ``ModelOperator``'s: model, criterion or loss, batches, forward, device,
    data_on_device, memory_budget_bytes, local_processes, batch_ids):
        reuse_graph: keep each mini-batch's first-order graph so a product costs one extra
            backward pass instead of forward + backward + backward. ``"auto"`` keeps the graphs
            of as many mini-batches as fit in ``memory_budget_bytes`` (the size of one measured
            on the first mini-batch with saved-tensor hooks; the rest are recomputed per
            product); ``True`` keeps all, ``False`` none.
        hvp_mode: ``"double_backward"`` (Pearlmutter's trick through reverse mode twice; the
            faster on CPU in our measurements, and the only one that reuses graphs) or
            ``"forward_over_reverse"`` (``torch.func.jvp`` of ``torch.func.grad``).
        vectorize: for a ``(k, dim)`` block, run one vmapped backward (``is_grads_batched``)
            instead of k backward passes over the shared graph. Off by default: on CPU it
            measured slower than the loop for a ResNet20.

    Parameters the forward does not use get zero rows/columns. What is resident (data,
    graphs) is in ``stats()`` and ``describe_memory()``.
    """

    product_label = "HVP"

    def __init__(self, model: nn.Module, criterion: Callable | None = None,
                 batches: Iterable = (), *, forward: Callable | None = None,
                 loss: Callable | None = None, device: torch.device | str | None = None,
                 reuse_graph: bool | str = "auto", data_on_device: bool | str = "auto",
                 memory_budget_bytes: int | None = None, local_processes: int = 1,
                 hvp_mode: str = "double_backward", vectorize: bool = False,
                 batch_ids=None):
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode must be one of {HVP_MODES}, got {hvp_mode!r}")
        if reuse_graph not in (True, False, "auto"):
            raise ValueError(f"reuse_graph must be True, False or 'auto', got {reuse_graph!r}")
        # set before ModelOperator.__init__, whose first-order pass calls _loss_and_gradient
        self.hvp_mode = hvp_mode
        self.vectorize = vectorize
        self._reuse_request = reuse_graph
        # graphs to keep: None until the first mini-batch's graph is measured
        self._keep = 0 if reuse_graph is False or hvp_mode != "double_backward" else None
        self._graphs: list[torch.Tensor] = []
        self.graph_bytes_estimate = None
        self._theta = None
        # whether second-order graphs lay CPU float32 convolutions out channels-last: None
        # until one is built, False once a model failed with it (see ``_second_order``)
        self.channels_last: bool | None = None
        super().__init__(model, criterion, batches, forward=forward, loss=loss, device=device,
                         data_on_device=data_on_device, memory_budget_bytes=memory_budget_bytes,
                         local_processes=local_processes, batch_ids=batch_ids)

    # --------------------------------------------------------- first-order pass
    def _loss_and_gradient(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``ModelOperator``'s, keeping the first-order graphs of as many mini-batches as
        ``reuse_graph`` allows (their size measured on the first one)."""
        def build():  # a kept graph is differentiated again
            loss = self._weighted_loss(b)
            return loss, self._grad(loss, create_graph=True)

        if self._keep is None:  # first mini-batch: measure what a graph holds
            loss, g = _measure_graphs(self, lambda: self._second_order(build))
        elif b < self._keep:
            loss, g = self._second_order(build)
        else:
            loss = self._weighted_loss(b)
            g = self._grad(loss, create_graph=False)
        if b < self._keep:
            self._graphs.append(g)
        return loss, g

    def _second_order(self, build: Callable):
        """``build()`` under ``_second_order_graph``: channels-last first; if that raises (a
        model that calls ``.view`` where channels-last strides forbid it) before it ever
        worked, the plain layout from then on (``self.channels_last`` says which)."""
        if self.channels_last is not False:
            try:
                with _second_order_graph(channels_last=True):
                    out = build()
                self.channels_last = True
                return out
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                if self.channels_last:  # it worked before: a real error
                    raise
                self.channels_last = False
        with _second_order_graph(channels_last=False):
            return build()

    @property
    def reuse_graph(self) -> bool:
        """True when every mini-batch's first-order graph is kept."""
        return len(self._graphs) == len(self.batches) and len(self.batches) > 0

    def release(self) -> None:
        """Drop the retained graphs (frees their memory; later products recompute)."""
        self._graphs = []

    # ----------------------------------------------------------------- products
    def _second_backward(self, g: torch.Tensor, V: torch.Tensor, retain: bool) -> torch.Tensor:
        """Rows of V (k, dim) times the Jacobian of g (= H_b V for g = grad L_b)."""
        if self.vectorize and len(V) > 1:
            try:
                out = torch.autograd.grad(g, self.params, grad_outputs=V, retain_graph=True,
                                          allow_unused=True, materialize_grads=True,
                                          is_grads_batched=True)
                return self.flatten(out, batched=True)
            except RuntimeError:
                # some ops lack batching rules for their double backward: loop instead
                self.vectorize = False
        rows = []
        for i in range(len(V)):
            out = torch.autograd.grad(g, self.params, grad_outputs=V[i],
                                      retain_graph=retain or i < len(V) - 1,
                                      allow_unused=True, materialize_grads=True)
            rows.append(self.flatten(out))
        return torch.stack(rows)

    def _forward_over_reverse(self, b: int, V: torch.Tensor) -> torch.Tensor:
        """``w_b H_b V`` as ``jvp`` of ``grad`` of the flat parameters' weighted loss."""
        from torch.func import functional_call, grad, jvp, vmap

        batch = self._batch(b)
        w = self.weights[b]
        module = _Forward(self.model, self.forward_fn)
        names = [f"model.{n}" for n in self.param_names]

        def loss_of(flat):
            ps = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, self.numels),
                                                   self.shapes)}
            out = functional_call(module, ps, (batch,), strict=False)
            return self.loss_fn(out, batch) * w

        grad_fn = grad(loss_of)
        if self._theta is None:  # the point the Hessian is taken at, flattened once
            self._theta = self.parameters_vector()
        theta = self._theta

        def hvp(t):
            return jvp(grad_fn, (theta,), (t,))[1]

        with warnings.catch_warnings():
            # torch's forward-AD decompositions still call torch.jit.script on first use
            warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
            return vmap(hvp)(V) if self.vectorize else torch.stack([hvp(v) for v in V])

    def _batch_matmat(self, b: int, V: torch.Tensor) -> torch.Tensor:
        """``w_b H_b V``: a second backward through mini-batch b's first-order graph (kept, or
        recomputed here, with eval-mode BatchNorm as its affine map), or forward-over-reverse;
        attention on the math kernel (the fused ones have no double backward or forward AD,
        see ``pyhessian_dist.attention``)."""
        if self.hvp_mode == "forward_over_reverse":
            with math_attention():
                return self._forward_over_reverse(b, V)
        kept = b < len(self._graphs)
        g = self._graphs[b] if kept else \
            self._second_order(lambda: self._grad(self._weighted_loss(b), True))
        if not g.requires_grad:  # the loss is linear in theta here: H_b = 0
            return torch.zeros_like(V)
        with _second_order_graph(bool(self.channels_last)):
            return self._second_backward(g, V, retain=kept)

    # ----------------------------------------------------------------- reports
    def describe_product(self) -> str:
        """``"HVP: <hvp_mode>"``."""
        return f"HVP: {self.hvp_mode}"

    def _describe_kept(self) -> str:
        """The first-order graphs kept, in words."""
        n = len(self.batches)
        if self.hvp_mode != "double_backward":
            return "no graphs kept (forward-over-reverse)"
        per = (self.graph_bytes_estimate or 0) / max(n, 1)
        return kept_phrase("first-order graphs", len(self._graphs), n, per * len(self._graphs))

    def stats(self) -> dict:
        """``ModelOperator.stats()`` with the HVP mode and the graphs kept."""
        return {**super().stats(), "hvp_mode": self.hvp_mode, "graphs_kept": len(self._graphs),
                "graph_bytes_estimate": self.graph_bytes_estimate}
