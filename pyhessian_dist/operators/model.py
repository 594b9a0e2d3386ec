"""A curvature matrix of a model's MEAN loss over mini-batches sharded across ranks.

For parameters theta (the trainable ones, flattened into one vector of size ``dim``) and the
mean loss over all N samples held by all ranks, each rank holds mini-batches b with n_b
samples and mean loss ``L_b = loss(forward(model, batch_b), batch_b)``, so that

    L(theta) = (1/N) sum_i loss_i(theta) = sum_ranks sum_b w_b L_b(theta),   w_b = n_b / N.

A curvature matrix M of L that is a sum over samples (the Hessian, a generalised Gauss-Newton
matrix, an empirical Fisher) splits the same way, and so does its product with a block V:

    M V = sum_ranks sum_b w_b M_b V.

Every rank computes its local sum into ONE flat ``(k, dim)`` buffer and a single SUM
all-reduce of that buffer gives M V on every rank. N is all-reduced once, at construction.
Shards may be of any size, including empty on some ranks; nothing relies on equal shards or
padding. :class:`ModelOperator` holds all of this; a subclass supplies only its per-mini-batch
product ``_batch_matmat(b, V) = w_b M_b V``.

The model is put in eval mode: BatchNorm then uses its running statistics, so each sample's
loss depends on that sample alone and the shard sums above are exact (in train mode a BN
layer couples the samples of a mini-batch and M would depend on how data is batched).
Dropout is off in eval mode too.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..attention import AttentionWatch, default_kernel
from ..batches import (
    batch_nbytes,
    batch_size,
    criterion_loss,
    default_forward,
    move_batch,
    pin_batch,
)
from ..distributed import CommTimer, all_reduce_, get_rank, get_world_size
from .base import LinearOperator

__all__ = ["ModelOperator", "available_memory_bytes", "checking_loss", "kept_phrase",
           "resolve_loss", "scalar_loss"]


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


def scalar_loss(loss) -> torch.Tensor:
    """``loss`` when it is a 0-dim tensor (the mean loss of a batch), else a ValueError."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError("loss(outputs, batch) must return the mean loss over the batch's "
                         f"samples, a 0-dim tensor; got {shape}")
    return loss


def resolve_loss(criterion: Callable | None, forward: Callable | None,
                 loss: Callable | None) -> tuple[Callable, Callable]:
    """``(forward, loss)`` callables from the constructor's arguments: exactly one of
    ``criterion`` (PyHessian's form) or ``loss``; the default forward when none is given."""
    if (criterion is None) == (loss is None):
        raise ValueError("pass exactly one of criterion (the loss is criterion(outputs, "
                         "batch[1])) or loss=fn(outputs, batch) (the mean loss)")
    return (forward if forward is not None else default_forward,
            loss if loss is not None else criterion_loss(criterion))


@contextlib.contextmanager
def checking_loss(model: nn.Module, batch, criterion: Callable | None,
                  forward: Callable | None, loss: Callable | None):
    """For a ``check_loss``: yields ``(forward, loss, batch)`` (the callables resolved, the
    batch on the device of the model's first trainable parameter) with the model in eval mode,
    its mode restored afterwards."""
    forward_fn, loss_fn = resolve_loss(criterion, forward, loss)
    device = next(p for p in model.parameters() if p.requires_grad).device
    was_training = model.training
    model.eval()
    try:
        yield forward_fn, loss_fn, move_batch(batch, device)
    finally:
        model.train(was_training)


def kept_phrase(what: str, kept: int, n: int, nbytes: float) -> str:
    """"<what> kept for k/n mini-batches (~X MiB)", or "<what> recomputed per product"."""
    if not kept:
        return f"{what} recomputed per product"
    return f"{what} kept for {kept}/{n} mini-batches (~{nbytes / 2**20:.0f} MiB)"


class ModelOperator(LinearOperator):
    """Base of the curvature operators of a model's mean loss (see the module docstring).

    Args:
        model: an ``nn.Module``; put in eval mode here.
        criterion: PyHessian's form: the loss is ``criterion(outputs, batch[1])``, which must be
            the MEAN over the batch (e.g. ``nn.CrossEntropyLoss()``). Give it or ``loss``.
        batches: this rank's mini-batches, an iterable of batches as torch's default collate
            makes them (tensors, tuples, lists, dicts, nested); a batch's sample count n_b is
            the leading size of its tensors (see ``batches.batch_size``); sizes may differ;
            batches of zero samples are skipped.
        forward: ``forward(model, batch) -> outputs`` (default: ``model(batch[0])``, or
            ``model(*batch[0])`` when ``batch[0]`` is a tuple or list).
        loss: ``loss(outputs, batch)``: the MEAN loss over the batch's samples, a 0-dim tensor.
        device: where products are computed (default: the device of the first parameter).
        data_on_device: ``"auto"`` moves the data to ``device`` once when it fits in a quarter of
            the budget, else keeps it where it is (pinned host memory for CUDA) and moves one
            mini-batch at a time per product; ``True`` / ``False`` force either.
        memory_budget_bytes: budget for the ``"auto"`` choices (default: half of the free
            device memory, or of MemAvailable on CPU, shared by ``local_processes``).
        local_processes: processes of this job sharing this machine's memory (CPU budget).
        batch_ids: the GLOBAL index of each of ``batches`` among the mini-batches of all ranks
            (default: ``rank + world_size * i`` for this rank's i-th batch, the round-robin
            deal of ``support.datasets.shard_batches``); used only by the per-group products
            (``group_matmat``, ``reduced_matmat``), whose groups of mini-batches are then the
            same on any world size.

    Vectors are flat 1-D tensors of size ``dim`` (or ``(k, dim)`` blocks: ``k`` products at
    once) in the parameters' dtype on ``device``. Parameters with ``requires_grad=False`` are
    left out. Construction runs the first-order pass: ``loss()`` and ``gradient()`` of L over
    every rank's data (one all-reduce; ``FloatingPointError`` on a non-finite loss).
    ``forward_fn`` and ``loss_fn`` are the callables in use; ``local_batches()`` yields this
    rank's mini-batches on the device with their sizes.

    A product is ``M V = sum_ranks sum_b w_b M_b V`` (V: ``(k, dim)``): ``_matmat`` sums this
    rank's ``_batch_matmat(b, V) = w_b M_b V`` (``_local_matmat``) and all-reduces the
    ``(k, dim)`` result once. A subclass implements ``_batch_matmat``; it may override
    ``_loss_and_gradient(b)`` to keep what the first-order pass computes (set what that needs
    before calling ``ModelOperator.__init__``, which runs the pass), ``_describe_kept()`` and
    ``stats()``. Its helpers: ``_batch(b)`` (mini-batch b on the device), ``weights[b]``
    (n_b / N), ``batch_sizes[b]``, ``_weighted_loss(b)`` (w_b L_b), ``_grad(loss,
    create_graph)`` (flat gradient), ``flatten``, ``params``. A subclass names its product
    (``product_label``, e.g. "HVP"; ``describe_product()``) and may check a loss before any
    data is loaded (``check_loss``).
    """

    #: what one product is called in reports ("10 HVPs")
    product_label = "product"
    _forwards_in_first_pass = 1  # forward passes of a mini-batch in _loss_and_gradient

    @classmethod
    def check_loss(cls, model: nn.Module, batch, *, criterion: Callable | None = None,
                   forward: Callable | None = None, loss: Callable | None = None) -> None:
        """Raise ``ValueError`` (a sentence saying what to change) when this curvature cannot
        be taken of ``loss`` on ``batch`` (a first batch, checked before the data is loaded).
        Every mean loss has a Hessian: nothing to check here; subclasses check more."""
        resolve_loss(criterion, forward, loss)

    def __init__(self, model: nn.Module, criterion: Callable | None = None,
                 batches: Iterable = (), *, forward: Callable | None = None,
                 loss: Callable | None = None, device: torch.device | str | None = None,
                 data_on_device: bool | str = "auto", memory_budget_bytes: int | None = None,
                 local_processes: int = 1, batch_ids: Sequence[int] | None = None):
        self.forward_fn, self.loss_fn = resolve_loss(criterion, forward, loss)
        if data_on_device not in (True, False, "auto"):
            raise ValueError(f"data_on_device must be True, False or 'auto', got "
                             f"{data_on_device!r}")
        self.model = model.eval()
        self.criterion = criterion
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (all have requires_grad="
                             "False); unfreeze the parameters whose curvature you want")
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        super().__init__(sum(self.numels), self.params[0].dtype,
                         device if device is not None else self.params[0].device)
        self.comm = CommTimer()
        self.compute_seconds = 0.0
        if memory_budget_bytes is None:
            memory_budget_bytes = available_memory_bytes(self.device) // 2
            if self.device.type == "cpu":
                memory_budget_bytes //= max(1, int(local_processes))
        self.memory_budget_bytes = int(memory_budget_bytes)
        self._set_data(batches, data_on_device, batch_ids)
        self._first_order_pass()

    # ------------------------------------------------------------------ data
    def _set_data(self, batches, data_on_device, batch_ids=None) -> None:
        """Keep this rank's non-empty mini-batches (and their global indices), on the device or
        on the host (see class). ONE all-reduce: N and the number of mini-batches in all."""
        given = list(batches)
        if batch_ids is None:
            rank, world = get_rank(), get_world_size()
            batch_ids = [rank + world * i for i in range(len(given))]
        batch_ids = [int(j) for j in batch_ids]
        if len(batch_ids) != len(given):
            raise ValueError(f"batch_ids has {len(batch_ids)} entries for {len(given)} batches")
        kept = [(batch, n, j) for batch, j in zip(given, batch_ids)
                if (n := batch_size(batch)) > 0]
        self.batch_sizes = [n for _batch, n, _j in kept]
        self.batch_ids = [j for _batch, _n, j in kept]
        self.local_num_samples = sum(self.batch_sizes)
        total = torch.tensor([float(self.local_num_samples), float(len(given))],
                             dtype=torch.float64, device=self.device)
        all_reduce_(total)
        self.num_samples = int(round(total[0].item()))
        self.num_global_batches = int(round(total[1].item()))
        if self.num_samples == 0:
            raise ValueError("no data: every rank was given zero samples; pass at least one "
                             "non-empty mini-batch")
        # n_b / N folds the weighting into each mini-batch's loss, so sums need no division.
        self.weights = [n / self.num_samples for n in self.batch_sizes]
        self.data_bytes = sum(batch_nbytes(batch) for batch, _n, _j in kept)
        if data_on_device == "auto":
            data_on_device = self.data_bytes <= self.memory_budget_bytes // 4
        self.data_on_device = bool(data_on_device) or self.device.type == "cpu"
        if self.data_on_device:
            self.batches = [move_batch(batch, self.device, True) for batch, _n, _j in kept]
        elif self.device.type == "cuda":
            self.batches = [pin_batch(batch) for batch, _n, _j in kept]
        else:
            self.batches = [batch for batch, _n, _j in kept]

    def _batch(self, b: int):
        """Mini-batch ``b`` of this rank, on the device."""
        batch = self.batches[b]
        return batch if self.data_on_device else move_batch(batch, self.device, True)

    def local_batches(self) -> Iterator[tuple[object, int]]:
        """``(batch on the device, n_b)`` for each of this rank's non-empty mini-batches, in
        order (a host-resident batch is moved to the device as it is yielded)."""
        for b, n in enumerate(self.batch_sizes):
            yield self._batch(b), n

    def _weighted_loss(self, b: int) -> torch.Tensor:
        """``w_b L_b`` for mini-batch ``b``: its mean loss times n_b / N."""
        batch = self._batch(b)
        return scalar_loss(self.loss_fn(self.forward_fn(self.model, batch), batch)) \
            * self.weights[b]

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
        """The flat gradient of ``loss`` (zeros for parameters it does not use)."""
        grads = torch.autograd.grad(loss, self.params, create_graph=create_graph,
                                    allow_unused=True, materialize_grads=True)
        return self.flatten(grads)

    def _loss_and_gradient(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_b L_b, w_b grad L_b)`` of mini-batch ``b`` for the first-order pass; a subclass
        may keep what it computes here (the Hessian keeps first-order graphs)."""
        loss = self._weighted_loss(b)
        return loss, self._grad(loss, create_graph=False)

    def _first_order_pass(self) -> None:
        """Mean loss and gradient over every rank's data: ONE all-reduce of [grad, loss].
        The first mini-batch's pass also records whether the model calls
        ``scaled_dot_product_attention`` (``attention``: calls per forward, the kernel
        products use, torch's default kernel; None without attention)."""
        buf = torch.zeros(self.dim + 1, dtype=torch.float64, device=self.device)
        watch = AttentionWatch()
        with torch.enable_grad():
            for b in range(len(self.batches)):
                with watch if b == 0 else contextlib.nullcontext():
                    loss, g = self._loss_and_gradient(b)
                buf[:-1] += g.detach().to(torch.float64)
                buf[-1] += loss.detach().to(torch.float64)
        self.attention = None if watch.first is None else {
            "calls_per_forward": watch.calls // self._forwards_in_first_pass,
            "products_kernel": "math",
            "default_kernel": default_kernel(watch.first)}
        all_reduce_(buf, self.comm)
        if not torch.isfinite(buf[-1]):
            raise FloatingPointError(
                f"the loss on the data is {buf[-1].item()}: the model or data give "
                "non-finite values; check the checkpoint and the input normalisation")
        self._gradient = buf[:-1].to(self.dtype)
        self._loss = buf[-1].item()

    def gradient(self) -> torch.Tensor:
        """Flat gradient of the mean loss over all ranks' data (computed at construction)."""
        return self._gradient

    def loss(self) -> float:
        """Mean loss over all ranks' data (computed at construction)."""
        return self._loss

    # ----------------------------------------------------------------- products
    def _batch_matmat(self, b: int, V: torch.Tensor) -> torch.Tensor:
        """``w_b M_b`` applied to the rows of ``V`` (k, dim) for this rank's mini-batch ``b``:
        what a subclass supplies (called with autograd enabled)."""
        raise NotImplementedError

    def _local_matmat(self, V: torch.Tensor) -> torch.Tensor:
        """The share ``sum_b w_b M_b V`` (k, dim) of this rank's mini-batches in the product."""
        out = torch.zeros_like(V)
        with torch.enable_grad():
            for b in range(len(self.batches)):
                out += self._batch_matmat(b, V)
        return out

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        """M applied to the rows of V (k, dim): this rank's sum over its mini-batches, then ONE
        all-reduce of the (k, dim) result, whatever k and the number of mini-batches."""
        t0 = time.perf_counter()
        out = self._local_matmat(V)
        all_reduce_(out, self.comm)
        self.compute_seconds += time.perf_counter() - t0
        return out

    # --------------------------------------------------------- per-group products
    def batch_groups(self, num_groups: int) -> list[int]:
        """The group of each of this rank's mini-batches when the ``B`` mini-batches of all
        ranks are cut, in their global order, into ``num_groups`` contiguous groups of whole
        mini-batches: global mini-batch j is in group ``j * G // B`` (sizes differ by at most
        one mini-batch; the same on any world size)."""
        G, B = int(num_groups), self.num_global_batches
        if not 1 <= G <= B:
            raise ValueError(f"num_groups must be between 1 and the {B} mini-batches, got {G}")
        if any(not 0 <= j < B for j in self.batch_ids):
            raise ValueError(f"batch_ids must lie in [0, {B}) (the mini-batches of all ranks); "
                             "pass batch_ids= to the operator when the batches are not dealt "
                             "round-robin")
        return [j * G // B for j in self.batch_ids]

    def group_num_samples(self, num_groups: int) -> torch.Tensor:
        """``N_g`` (G,) float64: the samples in each group of mini-batches. ONE all-reduce,
        which also checks that every global mini-batch index is held exactly once."""
        G, B = int(num_groups), self.num_global_batches
        buf = torch.zeros(G + B, dtype=torch.float64, device=self.device)
        for g, n, j in zip(self.batch_groups(G), self.batch_sizes, self.batch_ids):
            buf[g] += n
            buf[G + j] += 1
        all_reduce_(buf, self.comm)
        if bool((buf[G:] > 1).any()):
            raise ValueError("two ranks hold mini-batches with the same global index; pass "
                             "batch_ids= to the operator (the index of each batch among all "
                             "ranks' mini-batches)")
        return buf[:G]

    def group_matmat(self, V: torch.Tensor, num_groups: int) -> torch.Tensor:
        """The per-group partial products ``P_g V = sum_{b in g} w_b M_b V`` (G, k, dim) of the
        rows of ``V`` (k, dim), which sum to ``M V``: every mini-batch's product goes to its
        group's slot (``batch_groups``), then ONE all-reduce of the (G, k, dim) buffer. As the
        mean curvature of group g is ``M_g = (N / N_g) P_g``, the curvature of the sample
        without group g is ``M_{-g} = (M - P_g) N / (N - N_g)``. Counts k products."""
        V = V.to(self.device, self.dtype)
        groups = self.batch_groups(num_groups)
        t0 = time.perf_counter()
        out = torch.zeros(int(num_groups), *V.shape, dtype=V.dtype, device=self.device)
        with torch.enable_grad():
            for b, g in enumerate(groups):
                out[g] += self._batch_matmat(b, V)
        all_reduce_(out, self.comm)
        self.compute_seconds += time.perf_counter() - t0
        self.num_matvecs += V.shape[0]
        return out

    def reduced_matmat(self, V: torch.Tensor, group_samples: torch.Tensor) -> torch.Tensor:
        """``M_{-g} V[g]`` (G, k, dim) for a block of k rows per group ``V`` (G, k, dim), with
        ``M_{-g} = (N / (N - N_g)) sum_{b not in g} w_b M_b`` the curvature of the sample
        without group g (``group_samples``: the N_g of ``group_num_samples``). A mini-batch of
        group h multiplies the rows of every group g != h whose block is not all zero (a group
        whose run has stopped passes zeros), then ONE all-reduce. In full-sample products
        that is ``k sum_g (1 - N_g / N)`` over the non-zero groups ((G - 1) k for all), which
        is what ``num_matvecs`` counts (rounded up)."""
        V = V.to(self.device, self.dtype)
        G, k = V.shape[0], V.shape[1]
        groups = self.batch_groups(G)
        active = [g for g in range(G) if bool(V[g].any())]
        t0 = time.perf_counter()
        out = torch.zeros_like(V)
        with torch.enable_grad():
            for b, h in enumerate(groups):
                rows = [g for g in active if g != h]
                if rows:
                    out[rows] += self._batch_matmat(b, V[rows].reshape(-1, self.dim)) \
                        .reshape(len(rows), k, self.dim)
        all_reduce_(out, self.comm)
        N = float(self.num_samples)
        scale = (N / (N - group_samples.to(torch.float64))).to(out.dtype)
        out *= scale[:, None, None]
        self.compute_seconds += time.perf_counter() - t0
        share = sum(1.0 - float(group_samples[g]) / N for g in active)
        self.num_matvecs += int(math.ceil(k * share - 1e-9))
        return out

    def release(self) -> None:
        """Drop what a subclass keeps for its products (graphs, gradients): later products
        recompute it. Nothing here."""

    # ----------------------------------------------------------------- reports
    def _describe_kept(self) -> str | None:
        """What a subclass keeps resident besides the data, in words (None: nothing)."""
        return None

    def describe_product(self) -> str:
        """One phrase: how a product is computed."""
        return f"{self.product_label}: {type(self).__name__}"

    def describe_memory(self) -> str:
        """One line: where the data lives (and what a subclass keeps, e.g. graphs)."""
        data = (f"data {self.data_bytes / 2**20:.0f} MiB on {self.device.type}"
                if self.data_on_device else
                f"data {self.data_bytes / 2**20:.0f} MiB on the host, moved per mini-batch")
        kept = self._describe_kept()
        parts = [data] if kept is None else [data, kept]
        return "; ".join(parts) + f"; budget {self.memory_budget_bytes / 2**20:.0f} MiB per process"

    def stats(self) -> dict:
        """Counters for reports: products, seconds in products and in all-reduce, memory."""
        return {
            "num_matvecs": self.num_matvecs,
            "matvec_seconds": self.compute_seconds,
            "allreduce_seconds": self.comm.seconds,
            "allreduce_calls": self.comm.calls,
            "num_mini_batches": len(self.batches),
            "data_bytes": self.data_bytes,
            "data_on_device": self.data_on_device,
            "memory_budget_bytes": self.memory_budget_bytes,
            "attention": self.attention,
        }
