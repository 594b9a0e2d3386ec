"""The trace (``--trace``): Hutchinson after deflating a Krylov space (default), plain
Hutchinson, or Hutch++; with a standard error, stopping at a relative standard error.

Other units may ask it for what its Hutchinson probes give besides the trace, at no extra
products: ``group_samples`` (every probe's share per ``--group-by`` group) and ``diagonal``
(Hutchinson's estimate of diag(H)); Hutch++ cannot serve them (a UserError names the asking
flag)."""
from __future__ import annotations

import argparse

from pyhessian_dist import hutchinson_trace, hutchpp_trace
from support.cli import nonnegative_float
from support.errors import UserError
from support.figures import Panel, RunPoints, Series, is_number

from . import sampling
from .base import Analysis


def deflate_value(text):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'auto' or a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or >= 0, got {text!r}")
    return value


class Trace(Analysis):
    name = "trace"
    flag = "--trace"
    help = "estimate the trace, with a standard error"
    serves = ("group_samples", "diagonal")
    compare_columns = ("trace ± s.e. (rel.)",)
    compare_panel = RunPoints("trace (± 1 standard error)", marker="s")

    def add_options(self, p):
        p.add_argument("--trace-method", choices=("deflated", "hutchinson", "hutchpp"),
                       default="deflated",
                       help="deflated: Hutchinson after removing a Krylov space exactly; "
                            "hutchinson: plain (PyHessian's); hutchpp: Hutch++ with a fixed "
                            "budget of --max-iter products")
        p.add_argument("--trace-rse", type=nonnegative_float, default=0.02,
                       help="stop when the standard error is this fraction of the estimate "
                            "(at least 10 probes); 0 uses PyHessian's rule (relative change "
                            "< --tol)")
        p.add_argument("--trace-deflate", type=deflate_value, default="auto",
                       help="deflated: Lanczos steps whose Krylov space is removed exactly "
                            "('auto' chooses from 8 pilot probes and --trace-rse)")

    def check(self, args, selection):
        for r in selection.asked(self):  # what is asked of the trace comes from its probes
            if args.trace_method == "hutchpp":
                raise UserError(f"{r.by} uses the probes of the Hutchinson trace; pass "
                                "--trace-method deflated or hutchinson, not hutchpp")
        if args.trace_method == "hutchpp" and args.max_iter < 3:
            raise UserError("--trace-method hutchpp needs --max-iter 3 or more (its product "
                            "budget)")
        if args.trace_method == "deflated" and args.trace_deflate == "auto" \
                and not args.trace_rse:
            raise UserError("--trace-deflate auto chooses the deflation for a target "
                            "--trace-rse; pass --trace-rse R (e.g. 0.02) or --trace-deflate N")

    def run(self, ctx):
        a, op = ctx.args, ctx.op
        needs = {r.need for r in ctx.asked(self)}
        groups = [g.index for g in ctx.groups()] if "group_samples" in needs else None
        progress = ctx.progress("trace", every=5)
        if a.trace_method == "hutchpp":
            return hutchpp_trace(op, a.max_iter, generator=ctx.generator(self),
                                 callback=progress)
        deflate = 0 if a.trace_method == "hutchinson" else a.trace_deflate
        # the Krylov basis and its products, float64: keep them within a quarter of the budget
        cap = max(1, min(50, op.memory_budget_bytes // 4 // (3 * 8 * op.dim)))
        return hutchinson_trace(op, max_iter=a.max_iter, tol=a.tol, rse=a.trace_rse or None,
                                deflate=deflate, max_deflation_steps=cap, groups=groups,
                                diagonal="diagonal" in needs,
                                sampling_groups=sampling.groups(a),
                                block_size=1 if not a.trace_rse else 4,
                                generator=ctx.generator(self), callback=progress)

    def summary(self, r, ctx):
        rel = f"{100 * r.relative_stderr:.1f}% relative" if r.stderr == r.stderr else "n/a"
        se = f"{r.stderr:.3g}" if r.stderr == r.stderr else "n/a (one probe)"
        how = r.method
        if r.deflation is not None and r.method != "hutchpp":
            d = r.deflation
            how = (f"deflated Hutchinson: a {d['dimension']}-dimensional Krylov space exactly "
                   f"({d['exact_part']:.6g}), the rest from the probes")
        state = (f"converged: {r.stopping_rule}" if r.converged else
                 f"NOT converged ({r.stopping_rule}; the error bar is still honest)")
        lines = [f"***Trace:  {r.trace:.6g} ± {se} (1 standard error, {rel}; "
                 f"{len(r.samples)} probes)",
                 f"    {how}; {ctx.cost_line(self)}; {state}"]
        return lines + (self._sampling_lines(r, ctx) if r.sampling is not None else [])

    def _sampling_lines(self, r, ctx):
        """Both errors side by side, their sum in quadrature, and the advice."""
        s = r.sampling
        probe = f"{r.stderr:.3g}" if r.stderr == r.stderr else "n/a"
        lines = [f"    trace = {r.trace:.6g} ± {probe} probe s.e. ± {s.stderr[0]:.3g} sampling "
                 f"s.e. (together ± {s.total_stderr[0]:.3g}; "
                 f"{sampling.setup_phrase(s, ctx.product_label)})"]
        ratio = s.stderr[0] / r.stderr if r.stderr else 0.0
        return lines + sampling.advice(ratio, ctx.args, "--trace-rse")

    def to_json(self, r, ctx):
        out = r.to_dict()
        if r.group_samples is not None:
            out["group_by"] = ctx.args.group_by
        if r.sampling is not None:
            out["sampling_stderr"] = r.sampling.stderr[0]
            out["sampling_total_stderr"] = r.sampling.total_stderr[0]
            out["sampling"] = {k: v for k, v in r.sampling.to_dict().items() if k != "bias"}
        return out

    def convergence(self, entry):
        """The estimate ± its standard error against the probes (a block of probes shares
        its products, so probes, not products, are the axis)."""
        hist = [h for h in entry["history"] if h["label"] != "deflation"]
        spent = (entry.get("deflation") or {}).get("num_matvecs")
        return Panel(f"trace ({entry['method']})",
                     "probes" + (f" (after {spent} products of deflation)" if spent else ""),
                     "trace estimate",
                     [Series("estimate", list(range(1, len(hist) + 1)),
                             [h["values"][0] for h in hist],
                             err=[h["errors"][0] or 0.0 for h in hist])])  # null: no band

    def compare_cells(self, entry):
        trace, stderr = _trace_and_stderr(entry)
        if trace is None:
            return ("n/a",)
        text = f"{trace:.6g}"
        if stderr is not None:
            rel = f" ({100 * stderr / abs(trace):.1f}%)" if trace else ""
            text += f" ± {stderr:.3g}{rel}"
        if is_number(entry.get("sampling_stderr")):
            text += f" ± {entry['sampling_stderr']:.3g} sampling"
        return (text + ("" if entry.get("converged") is not False else " *"),)

    def compare_item(self, entry, results):
        trace, stderr = _trace_and_stderr(entry)
        se = entry.get("sampling_stderr")
        return [] if trace is None else [(trace, stderr or 0.0)
                                         + ((float(se),) if is_number(se) else ())]


def _trace_and_stderr(entry) -> tuple:
    """The trace and its standard error of a results.json entry (None where not a number)."""
    return tuple(float(entry[k]) if is_number(entry.get(k)) else None
                 for k in ("trace", "stderr"))
