"""The trace (``--trace``): Hutchinson after deflating a Krylov space (default), plain
Hutchinson, or Hutch++; with a standard error, stopping at a relative standard error."""
from __future__ import annotations

import argparse

from pyhessian_dist import hutchinson_trace, hutchpp_trace
from support.cli import nonnegative_float
from support.errors import UserError

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


def check_uses_trace_probes(flag: str, args) -> None:
    """Per-layer traces and the diagonal come from the Hutchinson probes, not Hutch++'s."""
    if args.trace_method == "hutchpp":
        raise UserError(f"{flag} uses the probes of the Hutchinson trace; pass --trace-method "
                        "deflated or hutchinson, not hutchpp")


class Trace(Analysis):
    name = "trace"
    flag = "--trace"
    help = "estimate the trace, with a standard error"
    seed_offset = 2

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

    def check(self, args):
        if args.trace_method == "hutchpp" and args.max_iter < 3:
            raise UserError("--trace-method hutchpp needs --max-iter 3 or more (its product "
                            "budget)")
        if args.trace_method == "deflated" and args.trace_deflate == "auto" \
                and not args.trace_rse:
            raise UserError("--trace-deflate auto chooses the deflation for a target "
                            "--trace-rse; pass --trace-rse R (e.g. 0.02) or --trace-deflate N")

    def run(self, ctx):
        a, op = ctx.args, ctx.op
        groups = [g.index for g in ctx.groups()]
        progress = ctx.progress("trace", every=5)
        if a.trace_method == "hutchpp":
            return hutchpp_trace(op, a.max_iter, generator=ctx.generator(self),
                                 callback=progress)
        deflate = 0 if a.trace_method == "hutchinson" else a.trace_deflate
        # the Krylov basis and its products, float64: keep them within a quarter of the budget
        cap = max(1, min(50, op.memory_budget_bytes // 4 // (3 * 8 * op.dim)))
        return hutchinson_trace(op, max_iter=a.max_iter, tol=a.tol, rse=a.trace_rse or None,
                                deflate=deflate, max_deflation_steps=cap, groups=groups,
                                diagonal=bool(getattr(a, "diagonal", False)),
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
        return [f"***Trace:  {r.trace:.6g} ± {se} (1 standard error, {rel}; "
                f"{len(r.samples)} probes)",
                f"    {how}; {ctx.cost_line(self)}; {state}"]

    def to_json(self, r, ctx):
        out = r.to_dict()
        if r.group_samples is not None:
            out["group_by"] = getattr(ctx.args, "group_by", "module")
        return out
