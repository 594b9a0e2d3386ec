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

import time
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .distributed import CommTimer, all_reduce_
from .operators import LinearOperator

__all__ = ["HVP_MODES", "HessianOperator", "available_memory_bytes"]

HVP_MODES = ("double_backward", "forward_over_reverse")


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on the device (CUDA) or MemAvailable from /proc/meminfo (CPU; 4 GiB when
    unknown)."""
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


class HessianOperator(LinearOperator):
    """H v for the mean loss over every rank's mini-batches (see the module docstring).

    Args:
        model: an ``nn.Module``; put in eval mode here.
        criterion: ``criterion(model(x), y)`` must be the MEAN loss over the batch's samples
            (e.g. ``nn.CrossEntropyLoss()`` with its default reduction).
        batches: this rank's mini-batches, an iterable of ``(x, y)``; sizes may differ.
        device: where products are computed (default: the device of the first parameter).
        reuse_graph: keep each mini-batch's first-order graph so a product costs one extra
            backward pass instead of forward + backward + backward. ``"auto"`` keeps the graphs
            of as many mini-batches as fit in ``memory_budget_bytes`` (the rest are recomputed
            per product); ``True`` keeps all, ``False`` none.
        data_on_device: ``"auto"`` moves the data to ``device`` once when it fits in a quarter of
            the budget, else keeps it where it is (pinned host memory for CUDA) and moves one
            mini-batch at a time per product; ``True`` / ``False`` force either.
        memory_budget_bytes: budget for the ``"auto"`` choices (default: half of the free
            device memory, or of MemAvailable on CPU, shared by ``local_processes``).
        local_processes: processes of this job sharing this machine's memory (CPU budget).
        hvp_mode: ``"double_backward"`` (Pearlmutter's trick through reverse mode twice; the
            faster on CPU in our measurements, and the only one that reuses graphs) or
            ``"forward_over_reverse"`` (``torch.func.jvp`` of ``torch.func.grad``).
        vectorize: for a ``(k, dim)`` block, run one vmapped backward (``is_grads_batched``)
            instead of k backward passes over the shared graph. Off by default: on CPU it
            measured slower than the loop for a ResNet20.

    Vectors are flat 1-D tensors of size ``dim`` (or 2-D ``(k, dim)`` blocks: ``k`` products
    at once) in the parameters' dtype on ``device``. Parameters with ``requires_grad=False``
    are left out; parameters the forward does not use get zero rows/columns. What is resident
    (data, graphs) is in ``stats()`` and ``describe_memory()``.
    """

    def __init__(self, model: nn.Module, criterion: Callable, batches: Iterable,
                 *, device: torch.device | str | None = None, reuse_graph: bool | str = "auto",
                 data_on_device: bool | str = "auto", memory_budget_bytes: int | None = None,
                 local_processes: int = 1, hvp_mode: str = "double_backward",
                 vectorize: bool = False):
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode must be one of {HVP_MODES}, got {hvp_mode!r}")
        for name, value in (("reuse_graph", reuse_graph), ("data_on_device", data_on_device)):
            if value not in (True, False, "auto"):
                raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
        self.model = model.eval()
        self.criterion = criterion
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (all have requires_grad="
                             "False); unfreeze the parameters whose Hessian you want")
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        super().__init__(sum(self.numels), self.params[0].dtype,
                         device if device is not None else self.params[0].device)
        self.hvp_mode = hvp_mode
        self._theta = None
        self.comm = CommTimer()
        self.compute_seconds = 0.0
        self.vectorize = vectorize

        if memory_budget_bytes is None:
            memory_budget_bytes = available_memory_bytes(self.device) // 2
            if self.device.type == "cpu":
                memory_budget_bytes //= max(1, int(local_processes))
        self.memory_budget_bytes = int(memory_budget_bytes)
        self._set_data(batches, data_on_device)
        self.graph_bytes_estimate = None
        self._graphs: list[torch.Tensor] = []
        self._first_order_pass(reuse_graph)

    # ------------------------------------------------------------------ data
    def _set_data(self, batches, data_on_device) -> None:
        """Keep this rank's non-empty mini-batches, on the device or on the host (see class)."""
        kept = [(b[0], b[1]) for b in batches if len(b[1]) > 0]
        self.local_num_samples = sum(len(y) for _x, y in kept)
        total = torch.tensor([float(self.local_num_samples)], dtype=torch.float64,
                             device=self.device)
        all_reduce_(total)
        self.num_samples = int(round(total.item()))
        if self.num_samples == 0:
            raise ValueError("no data: every rank was given zero samples; pass at least one "
                             "non-empty mini-batch")
        # n_b / N folds the weighting into each mini-batch's loss, so sums need no division.
        self.weights = [len(y) / self.num_samples for _x, y in kept]
        self.data_bytes = sum(_nbytes(x) + _nbytes(y) for x, y in kept)
        if data_on_device == "auto":
            data_on_device = self.data_bytes <= self.memory_budget_bytes // 4
        self.data_on_device = bool(data_on_device) or self.device.type == "cpu"
        if self.data_on_device:
            kept = [(self._to_device(x), self._to_device(y)) for x, y in kept]
        elif self.device.type == "cuda":
            kept = [(_pin(x), _pin(y)) for x, y in kept]
        self.batches = kept

    def _to_device(self, x):
        if isinstance(x, (tuple, list)):
            return type(x)(self._to_device(t) for t in x)
        return x.to(self.device, non_blocking=True)

    def _batch(self, b: int):
        x, y = self.batches[b]
        if self.data_on_device:
            return x, y
        return self._to_device(x), self._to_device(y)

    def _forward_loss(self, b: int) -> torch.Tensor:
        x, y = self._batch(b)
        out = self.model(*x) if isinstance(x, (tuple, list)) else self.model(x)
        return self.criterion(out, y) * self.weights[b]

    # ------------------------------------------------------------------ vectors
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
        """The trainable parameters as one flat vector (detached)."""
        return self.flatten([p.detach() for p in self.params])

    def parameter_slices(self) -> list[tuple[str, slice]]:
        """(name, slice of the flat vector) of every trainable parameter, in order."""
        out, start = [], 0
        for name, n in zip(self.param_names, self.numels):
            out.append((name, slice(start, start + n)))
            start += n
        return out

    # --------------------------------------------------------- first-order pass
    def _grad(self, loss: torch.Tensor, create_graph: bool) -> torch.Tensor:
        grads = torch.autograd.grad(loss, self.params, create_graph=create_graph,
                                    allow_unused=True, materialize_grads=True)
        return self.flatten(grads)

    def _first_order_pass(self, reuse_graph) -> None:
        """Loss and gradient over all data (one all-reduce); keeps the graphs of as many
        mini-batches as ``reuse_graph`` allows (their size measured on the first one)."""
        keep = 0 if reuse_graph is False or self.hvp_mode != "double_backward" else None
        buf = torch.zeros(self.dim + 1, dtype=torch.float64, device=self.device)
        graphs = []
        for b in range(len(self.batches)):
            if keep is None:  # first mini-batch: measure what a graph holds
                counter = _SavedBytes()
                with counter.hooks():
                    loss = self._forward_loss(b)
                    g = self._grad(loss, create_graph=True)
                per_batch = max(counter.bytes, 1)
                self.graph_bytes_estimate = per_batch * len(self.batches)
                keep = len(self.batches) if reuse_graph is True else min(
                    len(self.batches), self.memory_budget_bytes // per_batch)
            elif b < keep:
                loss = self._forward_loss(b)
                g = self._grad(loss, create_graph=True)
            else:
                loss = self._forward_loss(b)
                g = self._grad(loss, create_graph=False)
            if b < keep:
                graphs.append(g)
            buf[:-1] += g.detach().to(torch.float64)
            buf[-1] += loss.detach().to(torch.float64)
        all_reduce_(buf, self.comm)
        if not torch.isfinite(buf[-1]):
            raise FloatingPointError(
                f"the loss on the Hessian data is {buf[-1].item()}: the model or data give "
                "non-finite values; check the checkpoint and the input normalisation")
        self._gradient = buf[:-1].to(self.dtype)
        self._loss = buf[-1].item()
        self._graphs = graphs

    @property
    def reuse_graph(self) -> bool:
        """True when every mini-batch's first-order graph is kept."""
        return len(self._graphs) == len(self.batches) and len(self.batches) > 0

    def gradient(self) -> torch.Tensor:
        """Flat gradient of the mean loss over all ranks' data (computed at construction)."""
        return self._gradient

    def loss(self) -> float:
        """Mean loss over all ranks' data (computed at construction)."""
        return self._loss

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
        from torch.func import functional_call, grad, jvp, vmap

        x, y = self._batch(b)
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
            return vmap(hvp)(V) if self.vectorize else torch.stack([hvp(v) for v in V])

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H applied to the rows of V (k, dim): this rank's sum over its mini-batches, then ONE
        all-reduce of the (k, dim) result, whatever k and the number of mini-batches."""
        t0 = time.perf_counter()
        out = torch.zeros_like(V)
        with torch.enable_grad():
            for b in range(len(self.batches)):
                if self.hvp_mode == "forward_over_reverse":
                    out += self._forward_over_reverse(b, V)
                    continue
                kept = b < len(self._graphs)
                g = self._graphs[b] if kept else self._grad(self._forward_loss(b), True)
                if g.requires_grad:  # else the loss is linear in theta here: H_b = 0
                    out += self._second_backward(g, V, retain=kept)
        all_reduce_(out, self.comm)
        self.compute_seconds += time.perf_counter() - t0
        return out

    def release(self) -> None:
        """Drop the retained graphs (frees their memory; later products recompute)."""
        self._graphs = []

    def describe_memory(self) -> str:
        """One line: where the data lives and how many first-order graphs are kept."""
        n = len(self.batches)
        data = (f"data {self.data_bytes / 2**20:.0f} MiB on {self.device.type}"
                if self.data_on_device else
                f"data {self.data_bytes / 2**20:.0f} MiB on the host, moved per mini-batch")
        if self.hvp_mode != "double_backward":
            graphs = "no graphs kept (forward-over-reverse)"
        elif not self._graphs:
            graphs = "first-order graphs recomputed per product"
        else:
            per = (self.graph_bytes_estimate or 0) / max(n, 1)
            graphs = (f"first-order graphs kept for {len(self._graphs)}/{n} mini-batches "
                      f"(~{per * len(self._graphs) / 2**20:.0f} MiB)")
        return (f"{data}; {graphs}; budget {self.memory_budget_bytes / 2**20:.0f} MiB per "
                "process")

    def stats(self) -> dict:
        """Counters for reports: products, seconds in products and in all-reduce, memory."""
        return {
            "num_matvecs": self.num_matvecs,
            "matvec_seconds": self.compute_seconds,
            "allreduce_seconds": self.comm.seconds,
            "allreduce_calls": self.comm.calls,
            "hvp_mode": self.hvp_mode,
            "graphs_kept": len(self._graphs),
            "num_mini_batches": len(self.batches),
            "graph_bytes_estimate": self.graph_bytes_estimate,
            "data_bytes": self.data_bytes,
            "data_on_device": self.data_on_device,
            "memory_budget_bytes": self.memory_budget_bytes,
        }


def _nbytes(x) -> int:
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(t) for t in x)
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def _pin(x):
    if isinstance(x, (tuple, list)):
        return type(x)(_pin(t) for t in x)
    try:
        return x.pin_memory()
    except RuntimeError:  # no CUDA driver: leave it as it is
        return x
