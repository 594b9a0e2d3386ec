"""The shape every analysis has, and what it is given to run.

An analysis is a small class with:

* ``name`` (its key in ``results.json`` and in ``Context.results``), ``flag`` (the option that
  asks for it), ``help``, and ``requires`` (analyses whose results it uses; asking for it runs
  them too);
* ``add_arguments(parser)`` for its own options and ``check(args)`` for their combinations
  (raise ``UserError``: the script prints one ``error:`` line before any worker starts);
* ``run(ctx)`` -> a typed result, on every rank (SPMD: the same numbers everywhere);
* ``summary(result, ctx)`` -> the lines rank 0 prints; ``to_json(result, ctx)`` -> its part of
  ``results.json``; ``write(result, ctx, outputs)`` -> its figures or tensors (rank 0).

The registry in ``analyses/__init__.py`` lists them in the order they run.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from pyhessian_dist.distributed import print0
from pyhessian_dist.groups import parameter_groups
from pyhessian_dist.results import Step

__all__ = ["Analysis", "Context", "fmt_values"]


class Analysis:
    """Base class: override what the analysis needs (see the module docstring)."""

    name = ""
    flag = ""
    help = ""
    requires: tuple = ()
    seed_offset = 0  # its random vectors: Generator(seed * 1000 + seed_offset), whatever else runs

    def add_arguments(self, parser) -> None:
        """Add ``flag`` (a switch) and this analysis's options (``add_options``)."""
        parser.add_argument(self.flag, action="store_true", help=self.help)
        self.add_options(parser)

    def add_options(self, parser) -> None:
        """Add this analysis's options besides ``flag``."""

    def requested(self, args) -> bool:
        """Whether the command line asks for this analysis (its ``flag`` was given)."""
        return bool(getattr(args, self.flag.lstrip("-").replace("-", "_")))

    def check(self, args) -> None:
        """Raise UserError for option combinations that cannot work."""

    def run(self, ctx: Context):
        raise NotImplementedError

    def summary(self, result, ctx: Context) -> list[str]:
        return []

    def to_json(self, result, ctx: Context) -> dict:
        return result.to_dict()

    def write(self, result, ctx: Context, outputs) -> None:
        """Write this analysis's files with ``outputs.write(names, make)`` (rank 0 only)."""


@dataclass
class Context:
    """What an analysis runs on: the options, the operator, the model, the rank, and the
    results of the analyses that ran before it."""

    args: object
    op: object                      # a HessianOperator over this rank's shard
    model: object
    worker: object                  # support.launch.WorkerContext
    problem: object = None          # problems.Problem: forward, loss, accuracy
    results: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)
    _groups: list | None = None

    @property
    def rank(self) -> int:
        return self.worker.rank

    def generator(self, analysis: Analysis) -> torch.Generator:
        """The same CPU generator on every rank, device and world size."""
        return torch.Generator().manual_seed(self.args.seed * 1000 + analysis.seed_offset)

    def groups(self):
        """The parameter groups of ``--group-by`` (module, stage or parameter)."""
        if self._groups is None:
            self._groups = parameter_groups(self.op.param_names, self.op.numels,
                                            getattr(self.args, "group_by", "module"))
        return self._groups

    def say(self, line: str = "") -> None:
        print0(line)

    def progress(self, tag: str, every: int = 1):
        """A callback printing a Step as one line on rank 0, for every ``every``-th product."""
        last = {"m": 0, "probes": 0}

        def show(step: Step) -> None:
            if step.error_kind == "standard error":  # one Step per probe
                last["probes"] += 1
            if step.matvecs - last["m"] < every and step.matvecs != step.max_matvecs:
                return
            last["m"] = step.matvecs
            print0(f"  [{tag}{' ' + step.label if step.label else ''}] "
                   f"{_progress(step, last['probes'])}")
        return show

    def timed(self, analysis: Analysis, fn):
        """Run ``fn()``, recording the products, seconds and all-reduce seconds it cost."""
        before = self.op.stats()
        t0 = time.perf_counter()
        out = fn()
        after = self.op.stats()
        self.costs[analysis.name] = {
            "num_matvecs": after["num_matvecs"] - before["num_matvecs"],
            "seconds": time.perf_counter() - t0,
            "allreduce_seconds": after["allreduce_seconds"] - before["allreduce_seconds"],
        }
        return out

    def cost_line(self, analysis: Analysis) -> str:
        c = self.costs.get(analysis.name, {})
        return f"{c.get('num_matvecs', 0)} HVPs, {c.get('seconds', 0.0):.1f} s"


def fmt_values(values, digits: int = 6) -> str:
    return "[" + ", ".join(f"{v:.{digits}g}" for v in values) + "]"


def _progress(step: Step, probes: int = 0) -> str:
    total = f"/{step.max_matvecs}" if step.max_matvecs else ""
    head = f"HVP {step.matvecs:3d}{total}: "
    if step.error_kind == "standard error":
        (mean,), (se,) = step.values, step.errors
        if math.isnan(se):
            return head + f"{mean:.6g} ± n/a (one probe)"
        rel = 100 * se / abs(mean)
        return head + f"{mean:.6g} ± {se:.3g} ({rel:.1f}% relative, {probes} probes)"
    if step.error_kind:
        worst = max((e for e in step.errors if not math.isnan(e)), default=float("nan"))
        values = fmt_values(step.values) if len(step.values) <= 6 else (
            f"{len(step.values)} values in [{min(step.values):.4g}, {max(step.values):.4g}]")
        return head + f"{values}  {step.error_kind} {worst:.2e}"
    if step.label == "deflation":
        return head + f"Krylov space of dimension {step.matvecs}, exact part {step.values[0]:.6g}"
    if step.label.startswith("run"):
        return head + f"Ritz values in [{step.values[0]:.4g}, {step.values[1]:.4g}]"
    return head + fmt_values(step.values)
