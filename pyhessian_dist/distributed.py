"""Everything the library knows about torch.distributed, in one place.

All functions are safe without a process group: rank 0 of a world of size 1, and
``all_reduce_`` is a no-op. The library never spawns processes and never creates
process groups itself; scripts do that (see ``setup``/``cleanup``, which they call).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed", "get_rank", "get_world_size", "print0", "all_reduce_",
    "backend_for", "broadcast_seed", "setup", "cleanup", "launched_by_torchrun", "CommTimer",
]


def is_distributed() -> bool:
    """True when a default process group is initialised (of any size)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """The rank of this process in the default group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The default group's size (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only (flushes, so progress shows up under mp.spawn). When stdout is
    closed (piped into ``head``), printing stops quietly and the computation goes on."""
    global _stdout_closed
    if get_rank() != 0 or _stdout_closed:
        return
    kwargs.setdefault("flush", True)
    try:
        print(*args, **kwargs)
    except BrokenPipeError:
        _stdout_closed = True
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


_stdout_closed = False


class CommTimer:
    """Accumulates wall time spent in collectives (synchronising CUDA around them)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0


def all_reduce_(tensor: torch.Tensor, timer: CommTimer | None = None) -> torch.Tensor:
    """In-place SUM all-reduce of one tensor over the default group; no-op without one."""
    if not is_distributed() or get_world_size() == 1:
        return tensor
    if timer is not None:
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        t0 = time.perf_counter()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    if timer is not None:
        if tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        timer.seconds += time.perf_counter() - t0
        timer.calls += 1
    return tensor


def broadcast_seed(device: torch.device | str = "cpu") -> int:
    """A seed drawn from torch's global RNG; rank 0's on every rank when distributed (one
    broadcast), so that random vectors agree across ranks whatever their global RNG states."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    if is_distributed() and get_world_size() > 1:
        t = torch.tensor([seed], dtype=torch.int64, device=device)
        dist.broadcast(t, src=0)
        seed = int(t.item())
    return seed


def backend_for(device: torch.device | str, requested: str = "auto") -> str:
    """'nccl' for CUDA devices, 'gloo' otherwise, unless a backend is requested explicitly."""
    if requested not in ("auto", "nccl", "gloo"):
        raise ValueError(f"unknown backend {requested!r}: use auto, nccl or gloo")
    if requested != "auto":
        if requested == "nccl" and torch.device(device).type != "cuda":
            raise ValueError("the nccl backend needs CUDA devices; use --backend gloo on CPU")
        return requested
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """True when RANK, WORLD_SIZE and LOCAL_RANK are set (torchrun / torch.distributed.run)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def setup(backend: str, rank: int | None = None, world_size: int | None = None,
          init_method: str | None = None, device: torch.device | None = None,
          timeout_s: float = 600.0) -> None:
    """Initialise the default process group.

    With ``init_method=None`` the rendezvous comes from the environment (env://, as set by
    torchrun). ``device`` (a CUDA device) is bound so that NCCL knows which GPU a rank owns.
    """
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(device)
    kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=rank, world_size=world_size)
    if backend == "nccl" and device is not None:
        kwargs["device_id"] = torch.device(device)
    dist.init_process_group(**kwargs)


def cleanup() -> None:
    """Destroy the default process group if there is one (safe to call on any exit path)."""
    if is_distributed():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - never mask the original error on the way out
            print(f"warning: destroy_process_group failed: {exc}", file=sys.stderr)
