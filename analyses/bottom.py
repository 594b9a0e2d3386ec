"""Negative curvature (``--bottom-n K``): the K smallest (most negative) eigenvalues by Lanczos."""
from __future__ import annotations

from pyhessian_dist import lanczos_eigenpairs
from support.cli import nonnegative_int

from . import sampling
from .base import Analysis
from .eigenvalues import check_count, check_steps, stopping_note


class BottomEigenvalues(Analysis):
    name = "bottom"
    flag = "--bottom-n"
    help = "the K smallest (most negative) eigenvalues and their eigenvectors (0: off)"

    def add_arguments(self, p):
        p.add_argument("--bottom-n", type=nonnegative_int, default=0, help=self.help)

    def requested(self, args):
        return args.bottom_n > 0

    def check(self, args, selection):
        check_steps(args.bottom_n, f"--bottom-n {args.bottom_n}", args)

    def check_model(self, args, selection, model):
        check_count(f"--bottom-n {args.bottom_n}", args.bottom_n, model.num_trainable,
                    "--bottom-n")

    def run(self, ctx):
        a = ctx.args
        r = lanczos_eigenpairs(ctx.op, a.bottom_n, which="SA", max_steps=a.max_iter,
                               tol=a.tol, generator=ctx.generator(self),
                               callback=ctx.progress("bottom"))
        return sampling.run_eigen(r, ctx, self)

    def summary(self, r, ctx):
        lines = [f"***Bottom Eigenvalues:  {list(r.eigenvalues)}",
                 f"    lanczos (smallest algebraic), {ctx.cost_line(self)}, "
                 f"{stopping_note(r, ctx.args.tol)}"]
        return lines + (sampling.eigen_lines(r, ctx, "λ_min,") if r.sampling else [])

    def to_json(self, r, ctx):
        return sampling.eigen_json(r.to_dict(), r)
