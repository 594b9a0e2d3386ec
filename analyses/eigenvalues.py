"""Top eigenvalues (``--eigenvalue``): Lanczos (default) or PyHessian's power iteration."""
from __future__ import annotations

from pyhessian_dist import lanczos_eigenpairs, power_iteration_eigenpairs
from support.cli import positive_int
from support.errors import UserError

from .base import Analysis, fmt_values


class TopEigenvalues(Analysis):
    name = "eigenvalue"
    flag = "--eigenvalue"
    help = "compute the top eigenvalues"
    seed_offset = 1

    def add_options(self, p):
        p.add_argument("--top-n", type=positive_int, default=1, help="number of top eigenpairs")
        p.add_argument("--eigen-method", choices=("lanczos", "power"), default="lanczos",
                       help="lanczos (stops when the relative eigenvalue error bound <= --tol) "
                            "or power (PyHessian's rule: relative change < --tol)")

    def check(self, args):
        if args.eigen_method == "lanczos":
            check_steps("--top-n", args.top_n, args)

    def run(self, ctx):
        a, op = ctx.args, ctx.op
        if a.top_n > op.dim:
            raise UserError(f"--top-n {a.top_n} exceeds the model's {op.dim} trainable "
                            "parameters")
        if a.eigen_method == "lanczos":
            return lanczos_eigenpairs(op, a.top_n, max_steps=a.max_iter, tol=a.tol,
                                      generator=ctx.generator(self),
                                      callback=ctx.progress("eigenvalue"))
        return power_iteration_eigenpairs(op, a.top_n, max_iter=a.max_iter, tol=a.tol,
                                          generator=ctx.generator(self),
                                          callback=ctx.progress("eigenvalue"))

    def summary(self, r, ctx):
        return [f"***Top Eigenvalues:  {list(r.eigenvalues)}",
                f"    {r.method}, {ctx.cost_line(self)}, {convergence(r, ctx.args.tol)}"]


def check_steps(flag: str, k: int, args) -> None:
    """k eigenpairs need at least k Lanczos steps within --max-iter."""
    if k > args.max_iter:
        raise UserError(f"{flag} {k} needs at least as many Lanczos steps: pass --max-iter {k} "
                        "or more")


def convergence(r, tol) -> str:
    """What the stopping rule established, in words."""
    state = "converged" if r.converged else "NOT converged (budget used up)"
    if r.method == "lanczos":
        return (f"{state}: relative eigenvalue error <= {max(r.error_bounds):.1e} "
                f"(bound from the Ritz residuals and gaps; --tol {tol:g})")
    return (f"{state}: relative change between iterations < --tol {tol:g} "
            f"(relative residual {max(r.residuals):.1e}; not an error bound)")


__all__ = ["TopEigenvalues", "check_steps", "convergence", "fmt_values"]
