"""The Hessian of a model's mean loss over a sharded data set, as a linear operator.

For parameters theta (the trainable ones, flattened into one vector of size ``dim``) and
the mean loss over all N samples held by all ranks,

    L(theta) = (1/N) sum_i loss(f_theta(x_i), y_i),      H = d^2 L / d theta^2,

each rank holds mini-batches b with n_b samples and mean loss L_b, so that
L = sum_b (n_b / N) L_b and

    H v = sum_ranks sum_b (n_b / N) H_b v.

Every rank computes its local sum into ONE flat buffer and a single SUM all-reduce of that
buffer gives H v on every rank. N is all-reduced once, at construction. Shards may be of any
size, including empty on some ranks; nothing relies on equal shards or padding.

The model is put in eval mode: BatchNorm then uses its running statistics, so each sample's
loss depends on that sample alone and the shard sums above are exact (in train mode a BN
layer couples the samples of a mini-batch and H would depend on how data is batched).
Dropout is off in eval mode too.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .distributed import CommTimer, all_reduce_
from .distributed import get_world_size as _world

__all__ = ["HessianOperator", "HVP_MODES"]

HVP_MODES = ("double_backward", "forward_over_reverse")  # and "auto": measured at set-up


def _available_memory_bytes(device: torch.device) -> int:
    """Free memory on the device (CUDA) or MemAvailable from /proc/meminfo (CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


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


class HessianOperator:
    """H v for the mean loss over every rank's mini-batches (see the module docstring).

    Args:
        model: an ``nn.Module``; put in eval mode here.
        criterion: ``criterion(model(x), y)`` must be the MEAN loss over the batch's samples
            (e.g. ``nn.CrossEntropyLoss()`` with its default reduction).
        batches: this rank's mini-batches, an iterable of ``(x, y)``; sizes may differ. They
            are moved to ``device`` once, here.
        device: where data and vectors live (default: the device of the first parameter).
        reuse_graph: keep each mini-batch's first-order graph so a product costs one extra
            backward pass instead of forward + backward + backward. ``"auto"`` keeps it when
            the estimated graph memory fits in ``memory_budget_bytes``.
        memory_budget_bytes: budget for ``reuse_graph="auto"`` (default: half of the free
            device memory, or of MemAvailable on CPU).
        hvp_mode: ``"double_backward"`` (Pearlmutter's trick through reverse mode twice) or
            ``"forward_over_reverse"`` (``torch.func.jvp`` of ``torch.func.grad``; no graph
            reuse), or ``"auto"``: time two products of each at set-up (timings summed over
            ranks, so every rank picks the same) and keep the faster; see ``mode_timings``.
        vectorize: for a ``(k, dim)`` block, run one vmapped backward (``is_grads_batched``)
            instead of k backward passes over the shared graph. Off by default: on CPU it
            measured several times slower than the loop for a ResNet20.

    Vectors are flat 1-D tensors of size ``dim`` (or 2-D ``(k, dim)`` blocks: ``k`` products
    at once) in the parameters' dtype on ``device``. Parameters with ``requires_grad=False``
    are left out; parameters the forward does not use get zero rows/columns.
    """

    def __init__(self, model: nn.Module, criterion: Callable, batches: Iterable,
                 *, device: torch.device | str | None = None, reuse_graph: bool | str = "auto",
                 memory_budget_bytes: int | None = None, hvp_mode: str = "double_backward",
                 vectorize: bool = False):
        if hvp_mode not in HVP_MODES + ("auto",):
            raise ValueError(f"hvp_mode must be 'auto' or one of {HVP_MODES}, got {hvp_mode!r}")
        if reuse_graph not in (True, False, "auto"):
            raise ValueError("reuse_graph must be True, False or 'auto'")
        self.model = model.eval()
        self.criterion = criterion
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (all have requires_grad="
                             "False); unfreeze the parameters whose Hessian you want")
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.device = torch.device(device) if device is not None else self.params[0].device
        self.dtype = self.params[0].dtype
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        self.hvp_mode = "double_backward" if hvp_mode == "auto" else hvp_mode
        self.mode_timings = None
        self._theta = None
        self.comm = CommTimer()
        self.num_matvecs = 0
        self.compute_seconds = 0.0

        self.batches = []
        for batch in batches:
            x, y = batch[0], batch[1]
            if len(y) == 0:
                continue
            self.batches.append((self._to_device(x), y.to(self.device, non_blocking=True)))
        self.local_num_samples = sum(len(y) for _x, y in self.batches)
        total = torch.tensor([float(self.local_num_samples)], dtype=torch.float64,
                             device=self.device)
        all_reduce_(total)
        self.num_samples = int(round(total.item()))
        if self.num_samples == 0:
            raise ValueError("no data: every rank was given zero samples; pass at least one "
                             "non-empty mini-batch")
        # n_b / N folds the weighting into each mini-batch's loss, so sums need no division.
        self.weights = [len(y) / self.num_samples for _x, y in self.batches]

        if memory_budget_bytes is None:
            memory_budget_bytes = _available_memory_bytes(self.device) // 2
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.graph_bytes_estimate = None
        self._graphs: list[torch.Tensor] | None = None
        self.vectorize = vectorize
        self._first_order_pass(reuse_graph)
        if hvp_mode == "auto":
            self._choose_mode()

    # ------------------------------------------------------------------ helpers
    def _to_device(self, x):
        if isinstance(x, (tuple, list)):
            return type(x)(self._to_device(t) for t in x)
        return x.to(self.device, non_blocking=True)

    def _forward_loss(self, b: int) -> torch.Tensor:
        x, y = self.batches[b]
        out = self.model(*x) if isinstance(x, (tuple, list)) else self.model(x)
        return self.criterion(out, y) * self.weights[b]

    def flatten(self, tensors: Sequence[torch.Tensor], batched: bool = False) -> torch.Tensor:
        """Per-parameter tensors -> one flat vector (or (k, dim) block when batched)."""
        if batched:
            k = tensors[0].shape[0]
            return torch.cat([t.reshape(k, -1) for t in tensors], dim=1)
        return torch.cat([t.reshape(-1) for t in tensors])

    def to_list(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Flat vector -> list of tensors shaped like the trainable parameters (views)."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of size {self.dim}, got {tuple(v.shape)}")
        return [t.view(s) for t, s in zip(torch.split(v, self.numels), self.shapes)]

    def from_list(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """List of per-parameter tensors -> flat vector on the operator's device and dtype."""
        if len(tensors) != len(self.params):
            raise ValueError(f"expected {len(self.params)} tensors, got {len(tensors)}")
        return self.flatten([t.to(self.device, self.dtype) for t in tensors])

    def parameters_vector(self) -> torch.Tensor:
        return self.flatten([p.detach() for p in self.params])

    # --------------------------------------------------------- first-order pass
    def _grad(self, loss: torch.Tensor, create_graph: bool) -> torch.Tensor:
        grads = torch.autograd.grad(loss, self.params, create_graph=create_graph,
                                    allow_unused=True, materialize_grads=True)
        return self.flatten(grads)

    def _first_order_pass(self, reuse_graph) -> None:
        """Loss and gradient over all data (one all-reduce); keeps graphs when reusing."""
        keep = reuse_graph is not False and self.hvp_mode == "double_backward"
        buf = torch.zeros(self.dim + 1, dtype=torch.float64, device=self.device)
        graphs = []
        for b in range(len(self.batches)):
            if keep:
                counter = _SavedBytes()  # measured on the first mini-batch only
                with counter.hooks() if b == 0 else contextlib.nullcontext():
                    loss = self._forward_loss(b)
                    g = self._grad(loss, create_graph=True)
                if b == 0:
                    self.graph_bytes_estimate = counter.bytes * len(self.batches)
                    if reuse_graph == "auto" and self.graph_bytes_estimate > self.memory_budget_bytes:
                        keep = False
                if keep:
                    graphs.append(g)
            else:
                loss = self._forward_loss(b)
                g = self._grad(loss, create_graph=False)
            buf[:-1] += g.detach().to(torch.float64)
            buf[-1] += loss.detach().to(torch.float64)
        all_reduce_(buf, self.comm)
        if not torch.isfinite(buf[-1]):
            raise FloatingPointError(
                f"the loss on the Hessian data is {buf[-1].item()}: the model or data give "
                "non-finite values; check the checkpoint and the input normalisation")
        self._gradient = buf[:-1].to(self.dtype)
        self._loss = buf[-1].item()
        self._graphs = graphs if keep else None
        self.reuse_graph = keep

    def _choose_mode(self) -> None:
        """Time both HVP modes on the real data (second call of each counts) and keep the
        faster. The timings are all-reduced so that all ranks take the same decision."""
        v = torch.ones(self.dim, dtype=self.dtype, device=self.device)
        seconds = torch.zeros(len(HVP_MODES), dtype=torch.float64, device=self.device)
        for i, mode in enumerate(HVP_MODES):
            self.hvp_mode = mode
            for _ in range(2):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t0 = time.perf_counter()
                self.matvec(v)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            seconds[i] = time.perf_counter() - t0
        all_reduce_(seconds)
        self.hvp_mode = HVP_MODES[int(torch.argmin(seconds))]
        self.mode_timings = dict(zip(HVP_MODES, (seconds / max(1, _world())).tolist()))
        if self.hvp_mode != "double_backward":
            self.release()
        self.num_matvecs, self.compute_seconds = 0, 0.0
        self.comm.seconds, self.comm.calls = 0.0, 0

    def gradient(self) -> torch.Tensor:
        """Flat gradient of the mean loss over all ranks' data (computed at construction)."""
        return self._gradient

    def loss(self) -> float:
        """Mean loss over all ranks' data (computed at construction)."""
        return self._loss

    # ----------------------------------------------------------------- products
    def _second_backward(self, g: torch.Tensor, V: torch.Tensor, retain: bool) -> torch.Tensor:
        """Rows of V times the Jacobian of g (= H_b V for g = grad L_b)."""
        batched = V.dim() == 2
        if batched and self.vectorize:
            try:
                out = torch.autograd.grad(g, self.params, grad_outputs=V, retain_graph=True,
                                          allow_unused=True, materialize_grads=True,
                                          is_grads_batched=True)
                return self.flatten(out, batched=True)
            except RuntimeError:
                # some ops lack batching rules for their double backward: loop instead
                self.vectorize = False
        if batched:
            rows = [self._second_backward(g, V[i], retain=retain or i < len(V) - 1)
                    for i in range(len(V))]
            return torch.stack(rows)
        out = torch.autograd.grad(g, self.params, grad_outputs=V, retain_graph=retain,
                                  allow_unused=True, materialize_grads=True)
        return self.flatten(out)

    def _forward_over_reverse(self, b: int, V: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, grad, jvp, vmap

        x, y = self.batches[b]
        w = self.weights[b]
        names = self.param_names

        def loss_of(flat):
            ps = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, self.numels),
                                                   self.shapes)}
            args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            out = functional_call(self.model, ps, args, strict=False)
            return self.criterion(out, y) * w

        grad_fn = grad(loss_of)
        if self._theta is None:  # the point the Hessian is taken at, flattened once
            self._theta = self.parameters_vector()
        theta = self._theta

        def hvp(t):
            return jvp(grad_fn, (theta,), (t,))[1]

        with warnings.catch_warnings():
            # torch's forward-AD decompositions still call torch.jit.script on first use
            warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
            if V.dim() == 1:
                return hvp(V)
            return vmap(hvp)(V) if self.vectorize else torch.stack([hvp(v) for v in V])

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat ``v`` of size ``dim``, or H V^T row-wise for a ``(k, dim)`` block.

        One all-reduce of the result per call, whatever ``k`` and the number of batches.
        """
        if v.dim() not in (1, 2) or v.shape[-1] != self.dim:
            raise ValueError(f"expected shape ({self.dim},) or (k, {self.dim}), got {tuple(v.shape)}")
        t0 = time.perf_counter()
        v = v.to(self.device, self.dtype)
        out = torch.zeros_like(v)
        with torch.enable_grad():
            for b in range(len(self.batches)):
                if self.hvp_mode == "forward_over_reverse":
                    out += self._forward_over_reverse(b, v)
                    continue
                if self._graphs is not None:
                    g = self._graphs[b]
                else:
                    g = self._grad(self._forward_loss(b), create_graph=True)
                if g.requires_grad:  # else the loss is linear in theta here: H_b = 0
                    out += self._second_backward(g, v, retain=self._graphs is not None)
        all_reduce_(out, self.comm)
        self.num_matvecs += 1 if v.dim() == 1 else v.shape[0]
        self.compute_seconds += time.perf_counter() - t0
        return out

    __call__ = matvec

    def release(self) -> None:
        """Drop the retained graphs (frees their memory; later products recompute)."""
        self._graphs = None
        self.reuse_graph = False

    def stats(self) -> dict:
        """Counters for reports: products, seconds in products, seconds in all-reduce."""
        return {
            "num_matvecs": self.num_matvecs,
            "matvec_seconds": self.compute_seconds,
            "allreduce_seconds": self.comm.seconds,
            "allreduce_calls": self.comm.calls,
            "reuse_graph": self.reuse_graph,
            "graph_bytes_estimate": self.graph_bytes_estimate,
            "hvp_mode": self.hvp_mode,
            "hvp_mode_timings_s": self.mode_timings,
        }
