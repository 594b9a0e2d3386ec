"""The shape every analysis has, and what it is given to run.

An analysis unit owns everything about itself; adding one is a new module with an ``Analysis``
subclass and one line in the registry (``analyses/__init__.py``, which lists them in the order
they run). What a unit declares (each optional but ``name``, ``flag`` and ``run``):

* ``name`` (its key in ``results.json`` and ``Context.results``; its random generator is
  seeded from ``--seed`` and this name), ``flag`` (the option that asks for it), ``help``;
* ``requires``: units whose results it uses (asking for it runs them too); ``requests(args)``:
  what it needs of them (``Request``s, e.g. the trace's per-group samples), served by the
  required unit, which lists what it can serve in ``serves`` and reads the requests addressed
  to it with ``Context.asked`` (at run time) or ``Selection.asked`` (in ``check``);
* ``files``: the files it may write into ``--output-dir`` (staged, committed together with
  results.json, removed when a later run does not write them);
* ``add_arguments(parser)`` / ``add_options(parser)``: its flag and options (shared ones such
  as ``--max-iter``, ``--tol``, ``--group-by`` are the script's); ``requested(args)`` when its
  flag is not a plain switch;
* ``check(args, selection)``: its options' combinations and the requests it cannot serve, and
  ``check_model(args, selection, model)``: what needs the model (``ModelFacts``); both raise
  ``UserError`` (the script prints one ``error:`` line before any worker starts);
* ``run(ctx)`` -> a typed result, on every rank (SPMD: the same numbers everywhere);
* ``summary(result, ctx)`` -> the lines rank 0 prints; ``to_json(result, ctx)`` -> its part of
  ``results.json``; ``write(result, ctx, outputs)`` -> its ``files`` (rank 0);
* ``convergence(entry)`` -> its panel of convergence.png (``support.figures.Panel``) from its
  part of results.json, or None;
* for ``density_plot.py --compare``: ``compare_columns`` (table headers) with
  ``compare_cells(entry)``, and ``compare_panel`` (a ``support.figures`` comparison panel)
  with ``compare_item(entry, results)``, its data of one run.
"""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field

import torch

from pyhessian_dist.distributed import print0
from pyhessian_dist.groups import parameter_groups
from pyhessian_dist.results import Step

__all__ = ["Analysis", "Context", "ModelFacts", "Request", "Selection", "fmt_values"]


@dataclass(frozen=True)
class Request:
    """What a unit asks of a unit it requires: ``to`` (that unit's name) serves ``need`` (one
    of its ``serves``) with ``value`` (e.g. at least 2 eigenpairs); ``by`` names the asking
    flag in error messages."""

    to: str
    need: str
    value: object = True
    by: str = ""


@dataclass(frozen=True)
class ModelFacts:
    """What the script knows of the model before any worker starts (for ``check_model``)."""

    num_trainable: int


class Selection(list):
    """The analyses a command line runs, in registry order, and the requests among them."""

    def __init__(self, units, requests):
        super().__init__(units)
        self.requests = list(requests)

    @property
    def names(self) -> set:
        return {a.name for a in self}

    def asked(self, analysis) -> list[Request]:
        """The requests the selected units address to ``analysis``."""
        return [r for r in self.requests if r.to == analysis.name]


class Analysis:
    """Base class: override what the analysis needs (see the module docstring)."""

    name = ""
    flag = ""
    help = ""
    requires: tuple = ()
    serves: tuple = ()             # what other units may ask of it (``Request.need``)
    files: tuple = ()              # the files it may write into --output-dir
    compare_columns: tuple = ()    # its headers in the --compare table
    compare_panel = None           # its panel in the --compare figure (support.figures)

    def add_arguments(self, parser) -> None:
        """Add ``flag`` (a switch) and this analysis's options (``add_options``)."""
        parser.add_argument(self.flag, action="store_true", help=self.help)
        self.add_options(parser)

    def add_options(self, parser) -> None:
        """Add this analysis's options besides ``flag``."""

    def requested(self, args) -> bool:
        """Whether the command line asks for this analysis (its ``flag`` was given)."""
        return bool(getattr(args, self.flag.lstrip("-").replace("-", "_")))

    def ask(self, to: str, need: str, value=True, by: str = "") -> Request:
        """A request to the required unit ``to``, naming this unit's flag (or ``by``)."""
        return Request(to, need, value, by or self.flag)

    def requests(self, args) -> list[Request]:
        """What this analysis needs of the units it requires (``ask``), given its options."""
        return []

    def check(self, args, selection: Selection) -> None:
        """Raise UserError for option combinations that cannot work, and for requests in
        ``selection.asked(self)`` this analysis cannot serve (naming the asking flag)."""

    def check_model(self, args, selection: Selection, model: ModelFacts) -> None:
        """Raise UserError for what cannot work on this model (checked before any worker)."""

    def run(self, ctx: Context):
        raise NotImplementedError

    def summary(self, result, ctx: Context) -> list[str]:
        return []

    def to_json(self, result, ctx: Context) -> dict:
        return result.to_dict()

    def write(self, result, ctx: Context, outputs) -> None:
        """Write this analysis's ``files`` with ``outputs.write(names, make)`` (rank 0 only)."""

    def convergence(self, entry: dict):
        """Its panel of convergence.png (``support.figures.Panel``) from its part of
        results.json, or None."""
        return None

    def compare_cells(self, entry: dict) -> tuple:
        """Its cells in the --compare table (one per ``compare_columns``) from one run's
        entry; a cell ending in " *" is marked not converged."""
        return ()

    def compare_item(self, entry: dict, results: dict):
        """Its data of one run for ``compare_panel``, from the run's entry (``results``: all
        of the run's results, for what the panel shows of other units)."""
        return None


@dataclass
class Context:
    """What an analysis runs on: the options, the operator, the model, the rank, and the
    results of the analyses that ran before it. ``curvature`` names the matrix ``op`` is
    ("hessian", "ggn", "ef"; units stay curvature-agnostic, the landscape's check reads it);
    ``tag`` (e.g. "ggn", or "" when only the Hessian is analysed) marks the progress lines."""

    args: object
    op: object                      # a ModelOperator (Hessian, GGN, EF) over this rank's shard
    model: object
    worker: object                  # support.launch.WorkerContext
    problem: object = None          # problems.Problem: forward, loss, accuracy
    results: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)
    curvature: str = "hessian"
    tag: str = ""
    operator_stats: dict | None = None  # op.stats() when its analyses are done
    _groups: list | None = None

    @property
    def product_label(self) -> str:
        """What one product of ``op`` is called ("HVP", "GGN product", ...)."""
        return getattr(self.op, "product_label", "product")

    @property
    def rank(self) -> int:
        return self.worker.rank

    def generator(self, analysis: Analysis) -> torch.Generator:
        """The analysis's CPU generator, seeded with the CRC-32 of its name continued from
        --seed (stable across processes, unlike hash(); one-to-one in --seed for each name):
        the same on every rank, device and world size, whatever other analyses run. 32 bits,
        because the CPU generator (mt19937) keeps only the low 32 bits of a seed."""
        return torch.Generator().manual_seed(
            zlib.crc32(analysis.name.encode(), self.args.seed % 2**32))

    def asked(self, analysis: Analysis) -> list[Request]:
        """The requests the other selected analyses address to ``analysis``."""
        from analyses import selected  # the registry imports this module

        return selected(self.args).asked(analysis)

    def groups(self):
        """The parameter groups of the shared option ``--group-by`` (module, stage or
        parameter)."""
        if self._groups is None:
            self._groups = parameter_groups(self.op.param_names, self.op.numels,
                                            self.args.group_by)
        return self._groups

    def say(self, line: str = "") -> None:
        print0(line)

    def progress(self, tag: str, every: int = 1):
        """A callback printing a Step as one line on rank 0, for every ``every``-th product."""
        last = {"m": 0, "probes": 0}
        tag = f"{self.tag} {tag}" if self.tag else tag

        def show(step: Step) -> None:
            if step.error_kind == "standard error":  # one Step per probe
                last["probes"] += 1
            if step.matvecs - last["m"] < every and step.matvecs != step.max_matvecs:
                return
            last["m"] = step.matvecs
            print0(f"  [{tag}{' ' + step.label if step.label else ''}] "
                   f"{_progress(step, last['probes'], self.product_label)}")
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
        return f"{c.get('num_matvecs', 0)} {self.product_label}s, {c.get('seconds', 0.0):.1f} s"


def fmt_values(values, digits: int = 6) -> str:
    return "[" + ", ".join(f"{v:.{digits}g}" for v in values) + "]"


def _progress(step: Step, probes: int = 0, label: str = "HVP") -> str:
    total = f"/{step.max_matvecs}" if step.max_matvecs else ""
    head = f"{label} {step.matvecs:3d}{total}: "
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
