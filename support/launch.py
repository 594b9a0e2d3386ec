"""Launching the scripts' workers: one process, N spawned processes, or torchrun.

One shape for training, the analysis, the benchmark and the tests (pytorch/examples):
``launch(fn, args, nprocs=N, ...)`` calls ``fn(ctx, *args)`` on every rank, where ``ctx`` is a
:class:`WorkerContext` (rank, world size, device, launch mode). It

* runs ``fn`` in this process when N == 1 (a debugger works), with no process group;
* under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) runs ``fn`` in this process with the
  rendezvous from the environment (env://), one rank of a possibly multi-node job;
* otherwise spawns N workers that meet at a TCP store this (parent) process holds on
  ``ip:port`` for the whole run, so a busy port or a foreign address is found before any
  worker starts and two runs can never race for the same port.

The parent supervises the workers: the first worker to fail (an exception, a signal such as
SIGKILL from the out-of-memory killer, a non-zero exit) stops all the others within seconds
and becomes one :class:`WorkerFailed`; SIGTERM, SIGINT and SIGHUP stop every worker
(SIGTERM, then SIGKILL after a grace period, also for a stopped or hung worker) and become
:class:`Interrupted` (support.cancel: a ``BaseException``, so no ``except Exception`` swallows
it). A worker turns the parent's SIGTERM into ``Interrupted`` too, so its ``finally`` blocks
run (a staging folder is removed) before it dies by the signal. Workers die with the parent
(PR_SET_PDEATHSIG on Linux). They report to the parent through one pipe each (no semaphores:
a parent killed with SIGKILL leaves nothing for multiprocessing's resource tracker to warn of).
``run_main`` turns all of these, and :class:`~support.errors.UserError`, into one line and an
exit status: 2 for a user error, 1 for a failure, 128 + signal number for a signal.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from pyhessian_dist import available_memory_bytes
from pyhessian_dist.distributed import (
    all_reduce_,
    backend_for,
    cleanup,
    get_world_size,
    launched_by_torchrun,
    setup,
)
from support.cancel import CANCEL_SIGNALS as SIGNALS
from support.cancel import (
    Interrupted,
    cancel_line,
    cancels_ignored,
    cancels_raise,
    outputs_written,
    run_started,
)
from support.errors import DataError, UserError

__all__ = ["Interrupted", "LaunchError", "WorkerContext", "WorkerFailed", "agree",
           "broadcast_module", "check_same_data", "gather_objects",
           "check_cpu_workers", "free_port", "launch", "resolve_device", "run_main"]

WORKER_MEMORY_BYTES = 600 * 2**20  # measured: one CPU worker holds ~0.6 GB before its data


class LaunchError(UserError):
    """The workers cannot be started as asked (port, address, device count)."""


class PeerFailed(UserError):
    """Raised by ``agree`` on the ranks whose own step succeeded while another rank's failed."""


class WorkerFailed(Exception):
    """A worker failed; ``kind`` is "user" (a UserError), "crash", "signal" or "exit"."""

    def __init__(self, rank, world_size, kind, message, details=""):
        super().__init__(message)
        self.rank, self.world_size, self.kind = rank, world_size, kind
        self.message, self.details = message, details


@dataclass
class WorkerContext:
    """What a rank knows about the launch."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    mode: str                      # "single process", "spawn", "torchrun"
    _channel: object = None        # spawn: this worker's pipe to the parent

    def committed(self, note: str) -> None:
        """This rank's outputs are in place (a later signal loses nothing): ``note`` says what,
        for the line a cancel prints (support.cancel.outputs_written, in the parent)."""
        if self._channel is not None:
            self._channel.send(("committed", self.rank, note))
        else:
            outputs_written(note)


# ------------------------------------------------------------------------------- devices
def resolve_device(cuda: bool, local_rank: int = 0, warn: bool = True) -> torch.device:
    """``cuda:<local_rank>`` when ``cuda`` is asked for and available, else the CPU (one
    warning line on stderr unless ``warn`` is false)."""
    if cuda and torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if cuda and warn:
        print("warning: --cuda requested but no GPU is available; running on CPU",
              file=sys.stderr)
    return torch.device("cpu")


def _available_memory() -> int:
    return available_memory_bytes(torch.device("cpu"))


def check_cpu_workers(n: int, flag: str = "--device_count") -> str | None:
    """Refuse N CPU workers whose memory (~0.6 GB each before data) would not fit; return a
    warning line when N exceeds the cores (slower than fewer workers, but it works)."""
    cores = os.cpu_count() or 1
    avail = _available_memory()
    need = n * WORKER_MEMORY_BYTES
    if need > 0.8 * avail:
        fit = max(1, int(0.8 * avail // WORKER_MEMORY_BYTES))
        raise LaunchError(f"{flag} {n} starts {n} CPU worker processes (~0.6 GB each, "
                          f"~{need / 2**30:.0f} GB in all) but only {avail / 2**30:.1f} GB "
                          f"are available; pass {flag} {min(fit, cores)} or less")
    if n > cores:
        return (f"warning: {flag} {n} starts {n} CPU workers on {cores} cores; they will "
                f"share the cores (pass {flag} {cores} for one core each)")
    return None


# ------------------------------------------------------------------------------- ports
def free_port(ip: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``ip`` right now (tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _open_store(ip: str, port: int):
    """The rendezvous store of a spawned run, held by this process on ``ip:port``."""
    import torch.distributed as dist

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except (OSError, OverflowError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise LaunchError(f"--ip {ip} is not an address of this machine ({reason}); pass "
                              "one of its addresses, e.g. 127.0.0.1") from None
    try:
        return dist.TCPStore(ip, port, None, is_master=True, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=60))
    except Exception as exc:  # noqa: BLE001 - torch raises DistNetworkError / RuntimeError
        if "EADDRINUSE" in str(exc) or "in use" in str(exc):
            raise LaunchError(f"port {port} on {ip} is not available (address already in "
                              "use); pass another with --port N, or --port 0 to pick a free "
                              "one") from None
        raise LaunchError(f"cannot listen on {ip}:{port}: {str(exc).splitlines()[0]}") from None


# ------------------------------------------------------------------------------- launch
def launch(fn, args=(), *, nprocs: int = 1, cuda: bool = False, backend: str = "auto",
           ip: str = "127.0.0.1", port: int = 0, threads: int | None = None,
           grace_s: float = 5.0, timeout_s: float | None = None) -> list:
    """Run ``fn(ctx, *args)`` on every rank (see the module docstring); return the values of
    this process's rank(s): all N for spawn, one for single process and torchrun."""
    if launched_by_torchrun():
        return [_run_torchrun(fn, args, cuda, backend)]
    device_type = "cuda" if cuda and torch.cuda.is_available() else "cpu"
    try:
        backend = backend_for(torch.device(device_type), backend)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    if threads is None and device_type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // nprocs)
    if nprocs == 1:
        if threads:
            torch.set_num_threads(threads)
        ctx = WorkerContext(0, 1, 0, 1, resolve_device(cuda, 0, warn=False), "single process")
        with cancels_raise():
            return [fn(ctx, *args)]
    store = _open_store(ip, port)
    return _Supervisor(fn, args, nprocs, cuda, backend, ip, store.port, threads,
                       grace_s, timeout_s, store).run()


def _run_torchrun(fn, args, cuda, backend):
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(cuda, local_rank, warn=False)
    try:
        backend = backend_for(device, backend)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    setup(backend, device=device)
    ctx = WorkerContext(int(os.environ["RANK"]), get_world_size(), local_rank,
                        int(os.environ.get("LOCAL_WORLD_SIZE", 1)), device, "torchrun")
    try:
        with cancels_raise():
            return fn(ctx, *args)
    finally:
        cleanup()


def gather_objects(ctx: WorkerContext, value) -> list:
    """``value`` of every rank, in rank order, on every rank (one all_gather_object)."""
    if ctx.world_size == 1:
        return [value]
    values = [None] * ctx.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def broadcast_module(ctx: WorkerContext, module) -> None:
    """Rank 0's parameters and buffers on every rank (one broadcast per tensor)."""
    if ctx.world_size == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            torch.distributed.broadcast(t.data, src=0)


def check_same_data(ctx: WorkerContext, dataset, indices, label: str) -> None:
    """DataError on every rank when ranks see different samples at the first and last Hessian
    index (a data set generated at random without a fixed seed would make each rank's shard
    a sample of another data set): a float64 checksum of both samples, all-gathered."""
    if ctx.world_size == 1 or not indices:
        return
    total = 0.0
    for i in {indices[0], indices[-1]}:
        for t in _tensors(torch.utils.data.default_collate([dataset[i]])):
            t = t.double()
            total += float(t.sum()) + float((t * t).sum())
    sums = gather_objects(ctx, total)
    if any(abs(x - sums[0]) > 1e-9 * max(1.0, abs(sums[0])) for x in sums):
        raise DataError(f"{label}: dataset('train') gives different samples in different "
                        "processes; make it deterministic (e.g. draw generated data from a "
                        "torch.Generator with a fixed seed)")


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)


def agree(ctx: WorkerContext, step):
    """Run ``step()`` on every rank; if it raises a UserError on any rank, raise on all (the
    failing rank's own error there, a short note elsewhere), so no rank waits forever."""
    error, value = None, None
    try:
        value = step()
    except UserError as exc:
        error = exc
    if ctx.world_size > 1:
        flag = torch.tensor([0.0 if error is None else 1.0], device=ctx.device)
        all_reduce_(flag)
        if flag.item() and error is None:
            error = PeerFailed("another rank failed (see its message)")
    if error is not None:
        raise error
    return value


# ------------------------------------------------------------------------------- workers
def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def _worker(rank, fn, args, nprocs, cuda, backend, ip, port, threads, channel):
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent handles Ctrl-C for everyone
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        signal.signal(signal.SIGTERM, _raise_interrupted)  # the parent's stop: unwind, then die
        if threads:
            torch.set_num_threads(threads)
        import torch.distributed as dist

        device = resolve_device(cuda, rank, warn=False)
        store = dist.TCPStore(ip, port, None, is_master=False,
                              timeout=datetime.timedelta(seconds=60))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, store=store, rank=rank, world_size=nprocs,
                                timeout=datetime.timedelta(seconds=600), **kwargs)
        try:
            ctx = WorkerContext(rank, nprocs, rank, nprocs, device, "spawn", channel)
            channel.send(("ok", rank, fn(ctx, *args)))
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # from here on a stop just ends it
            cleanup()
    except Interrupted as stop:  # its finally blocks have run: now die by the signal
        signal.signal(stop.signum, signal.SIG_DFL)
        os.kill(os.getpid(), stop.signum)
    except UserError as exc:
        _report(channel, "peer" if isinstance(exc, PeerFailed) else "user", rank, str(exc))
        sys.exit(2)
    except BaseException as exc:  # noqa: BLE001 - everything goes to the parent
        _report(channel, "crash", rank, f"{type(exc).__name__}: {exc}".splitlines()[0]
                + "\x00" + traceback.format_exc())
        sys.exit(1)


def _report(channel, kind, rank, payload):
    with contextlib.suppress(OSError):  # the parent is gone: nobody to tell
        channel.send((kind, rank, payload))


class _Supervisor:
    """Starts the workers, watches them and the signals, stops them all on the first failure."""

    def __init__(self, fn, args, nprocs, cuda, backend, ip, port, threads, grace_s,
                 timeout_s, store):
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        pipes = [self.ctx.Pipe(duplex=False) for _ in range(nprocs)]
        self.readers = [reader for reader, _ in pipes]
        self.writers = [writer for _, writer in pipes]
        self.n, self.grace_s, self.timeout_s = nprocs, grace_s, timeout_s
        self.store = store  # held until the end: the port stays ours
        self.procs = [self.ctx.Process(target=_worker, daemon=False, args=(
            r, fn, args, nprocs, cuda, backend, ip, port, threads, writer))
            for r, writer in enumerate(self.writers)]
        self.results, self.errors = {}, []

    def run(self) -> list:
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        with cancels_raise():
            try:
                self._start()
                while len(self.results) < self.n:
                    self._drain(0.2)
                    failed = self._failure()
                    if failed is not None:
                        raise failed
                    if deadline is not None and time.monotonic() > deadline:
                        raise WorkerFailed(0, self.n, "crash",
                                           f"timed out after {self.timeout_s:.0f} s")
            except Interrupted as stop:
                with cancels_ignored():  # a second Ctrl-C must not cut the stop short
                    self._stop_all()
                    self._drain(0.2)  # a "committed" report may still be in a pipe
                raise Interrupted(stop.signum, self.n) from None
            except BaseException:
                with cancels_ignored():
                    self._stop_all()
                raise
        for p in self.procs:
            p.join(timeout=30)
        return [self.results[r] for r in range(self.n)]

    def _start(self):
        for p in self.procs:
            p.start()
        for writer in self.writers:  # the workers hold them: a dead worker's pipe reads EOF
            writer.close()

    def _drain(self, timeout):
        """Read every report that arrives within ``timeout`` seconds (and those queued)."""
        from multiprocessing.connection import wait

        if not self.readers:
            time.sleep(timeout)
            return
        for conn in wait(self.readers, timeout):
            try:
                while True:
                    self._record(*conn.recv())
                    if not conn.poll():
                        break
            except (EOFError, OSError):  # the worker has exited and said all it had to
                self.readers.remove(conn)
                conn.close()

    def _record(self, kind, rank, payload):
        if kind == "ok":
            self.results[rank] = payload
        elif kind == "committed":
            outputs_written(payload)
        else:
            self.errors.append((time.monotonic(), kind, rank, payload))

    def _failure(self):
        dead = [(r, p.exitcode) for r, p in enumerate(self.procs)
                if p.exitcode not in (None, 0)]
        if not dead and not self.errors:
            return None
        time.sleep(0.5)  # let the first failure's report and its echoes arrive
        self._drain(0.5)
        return _root_cause(self.errors, dead, self.n)

    def _stop_all(self):
        alive = [p for p in self.procs if p.is_alive()]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)   # a stopped worker cannot act on SIGTERM
                p.terminate()
        end = time.monotonic() + self.grace_s
        for p in alive:
            p.join(timeout=max(0.0, end - time.monotonic()))
        for p in alive:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def _root_cause(errors, dead, n) -> WorkerFailed | Interrupted:
    """The failure that started it: a user error, then a worker killed by a signal, then the
    first crash whose message is not a broken connection to a dead peer."""
    users = [e for e in errors if e[1] == "user"] or [e for e in errors if e[1] == "peer"]
    if users:
        _, _, rank, msg = users[0]
        return WorkerFailed(rank, n, "user", msg)
    signalled = [(r, -code) for r, code in dead if code < 0]
    cancelled = [s for _, s in signalled if s in SIGNALS]
    if cancelled and not users:  # a worker was sent SIGTERM/SIGINT/SIGHUP: a cancel, not a bug
        return Interrupted(cancelled[0], workers=n)
    crashes = sorted(e for e in errors if e[1] == "crash")
    echoes = ("connection", "peer", "gloo", "nccl", "socket", "closed", "timed out")
    primary = [e for e in crashes if not any(w in e[3].split("\x00")[0].lower() for w in echoes)]
    if signalled and not primary:
        rank, signum = signalled[0]
        name = signal.Signals(signum).name
        hint = " (out of memory?)" if signum == signal.SIGKILL else ""
        return WorkerFailed(rank, n, "signal", f"worker {rank} of {n} was killed by {name}{hint}")
    if primary or crashes:
        _, _, rank, payload = (primary or crashes)[0]
        head, _, tb = payload.partition("\x00")
        return WorkerFailed(rank, n, "crash", f"worker {rank} of {n} failed: {head}", tb)
    rank, code = dead[0]
    return WorkerFailed(rank, n, "exit", f"worker {rank} of {n} exited with status {code}")


# ------------------------------------------------------------------------------- main
def run_main(body, *, what: str = "the run") -> int:
    """Call ``body()`` and turn every way it can end into one stderr line and an exit status;
    SIGTERM/SIGINT/SIGHUP become ``Interrupted`` while it runs."""
    run_started()
    try:
        with cancels_raise():
            body()
        return 0
    except UserError as exc:
        _err(f"error: {exc}")
        return 2
    except WorkerFailed as exc:
        if exc.kind == "user":
            _err(f"error: {exc.message}")
            return 2
        if exc.details:
            _err(exc.details.rstrip())
        _err(f"error: {exc.message}; {what} was stopped (all workers ended)")
        return 1
    except Interrupted as exc:
        _err(cancel_line(exc.signum, exc.workers))
        return 128 + exc.signum
    except KeyboardInterrupt:  # SIGINT while its handler was Python's own
        _err(cancel_line(signal.SIGINT))
        return 130
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _err(line: str) -> None:
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)
