"""What the benchmarks share: the problem (model + Hessian samples), references, timing,
subprocess measurement, and a results record written after every section.

Run the benchmarks from the repository root as modules (``python -m bench.bench_hvp``,
``python -m bench.bench_peers``) or after ``pip install -e .``; nothing here patches sys.path.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch
from torch import nn

import pyhessian_dist
from problems import load_checkpoint
from pyhessian_dist import HessianOperator, hutchinson_trace, lanczos_eigenpairs
from pyhessian_dist.results import json_safe
from support.datasets import get_datasets, hessian_subset, shard_batches
from support.files import atomic_write_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL_CHECKPOINT = os.path.join(ROOT, "..", "shared", "fixtures", "original-net.pkl")
CE = nn.CrossEntropyLoss()
_T0 = time.perf_counter()


def say(*parts) -> None:
    """A progress line with the seconds since the benchmark started (flushed at once)."""
    print(f"[{time.perf_counter() - _T0:7.1f} s]", *parts, flush=True)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# ---------------------------------------------------------------------------- command line
def add_problem_arguments(p: argparse.ArgumentParser, samples: int, mini_batch: int) -> None:
    """The flags that choose the model and the Hessian samples (shared by every benchmark)."""
    p.add_argument("--checkpoint", default=os.path.join("checkpoints", "net.pkl"),
                   help="model: a checkpoint of ours (training.py) or the original's plain "
                        "state_dict; 'original' = ../shared/fixtures/original-net.pkl "
                        "(trained on CIFAR-10: out of distribution on synthetic images)")
    p.add_argument("--dataset", default=None,
                   help="data set of the Hessian samples (default: the checkpoint's, else "
                        "synthetic)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--samples", type=int, default=samples, help="Hessian samples")
    p.add_argument("--mini-batch", type=int, default=mini_batch, help="samples per mini-batch")
    p.add_argument("--seed", type=int, default=1,
                   help="sample choice (the analysis script's --seed, so both see the same "
                        "samples)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in this process (default: torch's, all cores)")
    p.add_argument("--sections", default="all",
                   help="comma-separated subset of the sections to run (see the docstring)")
    p.add_argument("--reference-from", default=None,
                   help="reuse the references (tight Lanczos top-5, long Hutchinson trace) of an "
                        "earlier results JSON of either benchmark with the same checkpoint, "
                        "samples and mini-batch size")
    p.add_argument("--resume", action="store_true",
                   help="continue the record at --out (same problem): keep its finished "
                        "sections and references, run the selected sections it lacks (to split "
                        "a long run over several sittings, or to finish an interrupted one)")
    p.add_argument("--reference-steps", type=int, default=150,
                   help="most Lanczos steps of the eigenvalue reference (tol 1e-9)")
    p.add_argument("--trace-reference", type=int, default=300,
                   help="probes of the reference trace (plain Hutchinson, all of them run)")
    p.add_argument("--subprocess-timeout", type=float, default=3600.0,
                   help="seconds before a measured subprocess is killed")


def checkpoint_path(text: str) -> str:
    return os.path.normpath(ORIGINAL_CHECKPOINT) if text == "original" else text


def sections(args, known: tuple, done: tuple = ()) -> list[str]:
    """The sections --sections selects, in their fixed order, less those already ``done``."""
    if args.sections == "all":
        wanted = list(known)
    else:
        wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in known]
        if unknown:
            raise SystemExit(f"error: unknown section(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(known)}")
    return [s for s in known if s in wanted and s not in done]


# ---------------------------------------------------------------------------- the problem
@dataclass
class Problem:
    """A model in eval mode and its Hessian mini-batches (CPU tensors), with what they are."""

    model: nn.Module
    batches: list
    meta: dict
    dataset: str
    checkpoint: str
    samples: int
    mini_batch: int
    seed: int
    notes: list = field(default_factory=list)
    checkpoint_sha256: str | None = None

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def model_copy(self) -> nn.Module:
        return copy.deepcopy(self.model).eval()

    def operator(self, **kwargs) -> HessianOperator:
        """A fresh operator on a copy of the model (library defaults unless overridden)."""
        return HessianOperator(self.model_copy(), CE, self.batches, **kwargs)

    def describe(self) -> dict:
        arch = self.meta.get("arch") or {}
        return {"checkpoint": self.checkpoint, "source": self.meta.get("source"),
                "arch": arch, "model": f"ResNet{arch.get('depth', '?')}",
                "num_parameters": self.dim, "dataset": self.dataset,
                "checkpoint_dataset": self.meta.get("dataset"), "samples": self.samples,
                "mini_batch": self.mini_batch, "seed": self.seed, "notes": self.notes,
                "checkpoint_sha256": self.checkpoint_sha256}


def load_problem(args, rank: int = 0, world_size: int = 1) -> Problem:
    """The checkpoint and ``args.samples`` samples chosen as the analysis script chooses them
    (``hessian_subset(train split, N, --seed)``), cut into mini-batches of ``args.mini_batch``."""
    path = checkpoint_path(args.checkpoint)
    model, meta = load_checkpoint(path)
    name = args.dataset or meta.get("dataset") or "synthetic"
    notes = []
    if meta.get("source") == "original-state-dict" and name == "synthetic":
        notes.append("the original's ResNet20 was trained on CIFAR-10: on the synthetic images "
                     "it is out of distribution (a valid Hessian, not a CIFAR-10 one)")
    bundle = get_datasets(name, args.data_dir, normalization=meta.get("normalization"),
                          download=False)
    idx = hessian_subset(bundle.train_eval, args.samples, args.seed)
    batches, _ = shard_batches(bundle.train_eval, idx, args.mini_batch, rank, world_size)
    with open(path, "rb") as fh:  # the file, not its path, names the model
        sha = hashlib.sha256(fh.read()).hexdigest()
    return Problem(model.eval(), batches, meta, name, path, args.samples, args.mini_batch,
                   args.seed, notes, sha)


def environment() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "pyhessian_dist": pyhessian_dist.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "argv": sys.argv}


# ---------------------------------------------------------------------------- timing
def timed(fn):
    """(fn(), seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def time_calls(fn, repeats: int, warmup: int = 1) -> dict:
    """Median and minimum seconds of ``repeats`` calls after ``warmup`` calls (the first of
    which is ``first_s``: what a fresh process pays once)."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "all_s": times,
            "first_s": first}


def time_interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Like ``time_calls`` for several functions, called in turn (a, b, a, b, ...) so that a
    change in the machine's load hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(t), "min_s": min(t), "all_s": t}
            for k, t in times.items()}


def first_within(steps, reference: float, rel: float):
    """Products used when the estimates first came within ``rel`` of ``reference`` and stayed
    there; ``steps`` is a list of (matvecs, estimate). None if never."""
    hit = None
    for n, value in steps:
        if abs(value - reference) <= rel * abs(reference):
            hit = n if hit is None else hit
        else:
            hit = None
    return hit


def rel_error(value, reference):
    if value is None or reference is None:
        return None
    return abs(value - reference) / max(abs(reference), 1e-300)


def max_rel_error(values, references):
    if not values or not references:
        return None
    vals = sorted(values, reverse=True)[: len(references)]
    return max(abs(a - b) / max(abs(b), 1e-300) for a, b in zip(vals, references))


# ---------------------------------------------------------------------------- references
def references(args, problem: Problem, record: Record, need: tuple) -> dict:
    """The tight eigenvalue reference ("eigen") and the long trace reference ("trace"),
    computed once per run (or read from ``--reference-from``) and kept in ``record``."""
    ref = record.data.setdefault("reference", {})
    if args.reference_from and not ref.get("_loaded"):
        ref["_loaded"] = True
        ref.update(_read_references(args.reference_from, problem))
    if "eigen" in need and "eigen" not in ref:
        say(f"reference: Lanczos top-5, tol 1e-9, at most {args.reference_steps} steps ...")
        op = problem.operator()
        res, secs = timed(lambda: lanczos_eigenpairs(op, 5, tol=1e-9,
                                                     max_steps=args.reference_steps,
                                                     generator=generator(11)))
        # check the Ritz pairs with real products: |lambda - theta| <= ||H y - theta y||
        Y = res.eigenvectors
        HY = op.matvec(Y.to(op.dtype)).to(torch.float64)
        theta = torch.tensor(res.eigenvalues, dtype=torch.float64)
        resid = ((HY - theta[:, None] * Y).norm(dim=1) / theta.abs()).tolist()
        ref["eigen"] = {"top5": res.eigenvalues, "error_bounds": res.error_bounds,
                        "checked_relative_residuals": resid,
                        "converged": res.converged, "matvecs": res.num_matvecs,
                        "seconds": secs, "method": "lanczos tol 1e-9",
                        "note": "float32 products: relative errors below ~1e-6 are rounding; "
                                "checked_relative_residuals = ||H y - theta y|| / |theta| from "
                                "5 extra products bound each relative error"}
        say(f"reference top-5 {fmt_list(res.eigenvalues)} ({res.num_matvecs} products, "
            f"{secs:.0f} s, converged={res.converged}; checked relative residuals <= "
            f"{max(resid):.1e})")
        record.save()
    if "trace" in need and "trace" not in ref:
        n = args.trace_reference
        say(f"reference: plain Hutchinson trace, {n} probes ...")
        op = problem.operator()
        res, secs = timed(lambda: hutchinson_trace(op, max_iter=n, tol=0.0, block_size=4,
                                                   generator=generator(100)))
        sd = float(torch.tensor(res.samples, dtype=torch.float64).std())
        ref["trace"] = {"trace": res.trace, "stderr": res.stderr, "probes": len(res.samples),
                        "per_probe_sd": sd, "matvecs": res.num_matvecs, "seconds": secs,
                        "method": f"plain Hutchinson, {n} Rademacher probes"}
        say(f"reference trace {res.trace:.6g} ± {res.stderr:.3g} ({len(res.samples)} probes, "
            f"per-probe sd {sd:.4g}, {secs:.0f} s)")
        record.save()
    return ref


# the checkpoint's hash too: training a checkpoint again on another CPU gives another model at
# the same path (measured: lambda_1 167.3 vs 50.8 on one batch of 128 after a retrain)
_PROBLEM_KEYS = ("checkpoint", "checkpoint_sha256", "samples", "mini_batch", "seed", "dataset")


def same_problem(old: dict, problem: Problem) -> bool:
    """Whether a record's "problem" is this one (checkpoint path and hash, samples, batches,
    data); a record without a hash is never the same."""
    p, mine = old.get("problem", {}), problem.describe()
    return all(os.path.abspath(str(p.get(k))) == os.path.abspath(str(mine[k]))
               if k == "checkpoint" else p.get(k) == mine[k] for k in _PROBLEM_KEYS)


def _read_references(path: str, problem: Problem) -> dict:
    with open(path) as fh:
        old = json.load(fh)
    if not same_problem(old, problem):
        p = old.get("problem", {})
        raise SystemExit(f"error: --reference-from {path} was measured on another problem "
                         f"({ {k: p.get(k) for k in _PROBLEM_KEYS} }); drop the flag")
    out = {k: v for k, v in old.get("reference", {}).items() if k in ("eigen", "trace") and v}
    say(f"references read from {path}: {', '.join(out) or 'none'}")
    return out


def fmt_list(values, digits: int = 7) -> str:
    return "[" + ", ".join(f"{v:.{digits}g}" for v in values) + "]"


# ---------------------------------------------------------------------------- the record
class Record:
    """The results JSON, rewritten (atomically) after every section, so a crash late in an
    unattended run keeps the sections that finished. A section that raises is recorded as
    ``{"error": ...}`` and the run goes on."""

    def __init__(self, path: str, header: dict, resume_problem: Problem | None = None):
        """``resume_problem``: continue the record already at ``path`` when it was measured on
        this problem (its finished sections and references are kept; ``done`` lists them)."""
        self.path = path
        self.data = dict(header)
        self.done: list[str] = []
        if resume_problem is not None and os.path.exists(path):
            with open(path) as fh:
                old = json.load(fh)
            if not same_problem(old, resume_problem):
                raise SystemExit(f"error: --resume: {path} was measured on another problem; "
                                 "pass another --out or drop --resume")
            self.done = list(old.get("sections_done", []))
            runs = old.pop("earlier_runs", []) + [{k: old.get(k) for k in ("args",
                                                                            "environment")}]
            self.data = {**old, **header, "earlier_runs": runs,
                         "sections_failed": [s for s in old.get("sections_failed", [])]}
            say(f"resuming {path}: sections done {', '.join(self.done) or 'none'}")
        self.data.setdefault("sections_done", [])
        self.data.setdefault("sections_failed", [])
        self.save()

    def save(self) -> None:
        text = json.dumps(json_safe(self.data), indent=1, allow_nan=False, default=str)
        atomic_write_bytes(self.path, (text + "\n").encode())

    def section(self, name: str, fn) -> dict | None:
        say(f"== section {name} ==")
        t0 = time.perf_counter()
        try:
            out = fn()
            self.data[name] = out
            if name not in self.data["sections_done"]:
                self.data["sections_done"].append(name)
            if name in self.data["sections_failed"]:
                self.data["sections_failed"].remove(name)
            return out
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one failed section must not cost the others
            traceback.print_exc()
            self.data[name] = {"error": f"{type(exc).__name__}: {exc}"}
            if name in self.data["sections_done"]:
                self.data["sections_done"].remove(name)
            if name not in self.data["sections_failed"]:
                self.data["sections_failed"].append(name)
            return None
        finally:
            self.data.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
            self.save()
            say(f"== section {name} done in {time.perf_counter() - t0:.1f} s; "
                f"wrote {self.path} ==")


# ---------------------------------------------------------------------------- scaling
def scaling_worker(ctx, args, repeats):
    """One rank: its shard, graphs kept, warm-up, then ``repeats`` timed products."""
    problem = load_problem(args, ctx.rank, ctx.world_size)
    op = HessianOperator(problem.model, CE, problem.batches, reuse_graph=True,
                         local_processes=ctx.world_size)
    v = torch.randn(op.dim, generator=generator(0))
    op.matvec(v)
    op.compute_seconds, op.comm.seconds, op.comm.calls = 0.0, 0.0, 0
    t0 = time.perf_counter()
    for _ in range(repeats):
        op.matvec(v)
    wall = time.perf_counter() - t0
    return {"rank": ctx.rank, "samples": op.local_num_samples,
            "seconds_per_product": wall / repeats,
            "allreduce_seconds_per_product": op.comm.seconds / repeats,
            "allreduce_share": op.comm.seconds / max(op.compute_seconds, 1e-12)}


# ---------------------------------------------------------------------------- subprocesses
# A tiny parent for the measured command: Linux starts a forked child's peak-RSS counter at
# the forking process's resident size (kept across exec), so a child of this (torch-sized)
# process would report at least our own ~1 GB. This wrapper imports nothing heavy, runs the
# command, and writes the command's ru_maxrss (RUSAGE_CHILDREN: the command and the children
# it waited for) and its wall time from start to exit.
_WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as fh:
    json.dump({"rc": rc, "wall_s": wall, "maxrss_kib": usage.ru_maxrss}, fh)
sys.exit(0)
"""


def run_process(cmd: list, *, timeout: float, cwd: str = ROOT, env: dict | None = None,
                echo: str | None = None) -> dict:
    """Run ``cmd`` as a fresh process: wall time from start to exit, peak resident memory
    (``ru_maxrss`` of the process and the children it waited for), exit status, and every
    output line with the second it arrived (since the start). ``echo``: print each line with
    this prefix as it arrives."""
    env = dict(os.environ if env is None else env)
    env["PYTHONUNBUFFERED"] = "1"
    fd, stats_path = tempfile.mkstemp(prefix="bench-proc-", suffix=".json")
    os.close(fd)
    t0 = time.perf_counter()
    p = subprocess.Popen([python(), "-c", _WRAPPER, stats_path, *cmd], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    killed = threading.Event()

    def kill():
        killed.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # the wrapper's session: it and the command

    timer = threading.Timer(timeout, kill)
    timer.start()
    lines = []
    try:
        for line in p.stdout:
            lines.append((round(time.perf_counter() - t0, 3), line.rstrip("\n")))
            if echo is not None:
                print(f"{echo}{line.rstrip()}", flush=True)
        p.wait()
        outer_wall = time.perf_counter() - t0
    finally:
        timer.cancel()
        p.stdout.close()
    try:
        with open(stats_path) as fh:
            stats = json.load(fh)
    except (OSError, ValueError):
        stats = {"rc": None, "wall_s": outer_wall, "maxrss_kib": None}
    finally:
        with contextlib.suppress(OSError):
            os.unlink(stats_path)
    last = lines[-1][0] if lines else 0.0
    return {"cmd": cmd, "wall_s": stats["wall_s"], "returncode": stats["rc"],
            "timed_out": killed.is_set(), "exit_after_last_line_s": outer_wall - last,
            "peak_rss_mib": None if stats["maxrss_kib"] is None else stats["maxrss_kib"] / 1024,
            "lines": lines}


def first_line_time(lines, predicate):
    """(seconds, text) of the first output line satisfying ``predicate``, or (None, None)."""
    for t, text in lines:
        if predicate(text):
            return t, text
    return None, None


def tail(lines, n: int = 5) -> list:
    return [text for _t, text in lines[-n:]]


def python() -> str:
    return sys.executable


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b))
