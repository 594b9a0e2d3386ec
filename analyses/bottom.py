"""Negative curvature (``--bottom-n K``): the K smallest (most negative) eigenvalues by Lanczos."""
from __future__ import annotations

from pyhessian_dist import lanczos_eigenpairs
from support.cli import nonnegative_int
from support.errors import UserError

from .base import Analysis
from .eigenvalues import check_steps, convergence


class BottomEigenvalues(Analysis):
    name = "bottom"
    flag = "--bottom-n"
    help = "the K smallest (most negative) eigenvalues and their eigenvectors (0: off)"
    seed_offset = 4

    def add_arguments(self, p):
        p.add_argument("--bottom-n", type=nonnegative_int, default=0, help=self.help)

    def requested(self, args):
        return args.bottom_n > 0

    def check(self, args):
        check_steps("--bottom-n", args.bottom_n, args)

    def run(self, ctx):
        a, op = ctx.args, ctx.op
        if a.bottom_n > op.dim:
            raise UserError(f"--bottom-n {a.bottom_n} exceeds the model's {op.dim} trainable "
                            "parameters")
        return lanczos_eigenpairs(op, a.bottom_n, which="SA", max_steps=a.max_iter, tol=a.tol,
                                  generator=ctx.generator(self),
                                  callback=ctx.progress("bottom"))

    def summary(self, r, ctx):
        return [f"***Bottom Eigenvalues:  {list(r.eigenvalues)}",
                f"    lanczos (smallest algebraic), {ctx.cost_line(self)}, "
                f"{convergence(r, ctx.args.tol)}"]
