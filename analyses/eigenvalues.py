"""Top eigenvalues (``--eigenvalue``): Lanczos (default) or PyHessian's power iteration.

Other units may ask it for eigenpairs (``Request(need="eigenpairs", value=k)``): it computes
the largest of --top-n and what they ask for."""
from __future__ import annotations

from pyhessian_dist import lanczos_eigenpairs, power_iteration_eigenpairs
from support.cli import positive_int
from support.errors import UserError
from support.figures import Panel, RunPoints, Series, is_number

from . import sampling
from .base import Analysis, fmt_values


class TopEigenvalues(Analysis):
    name = "eigenvalue"
    flag = "--eigenvalue"
    help = "compute the top eigenvalues"
    serves = ("eigenpairs",)
    compare_columns = ("lambda_1 (± bound)",)
    compare_panel = RunPoints(r"top eigenvalues (filled: $\lambda_1$, open: $\lambda_2, \ldots$)",
                              marker="o")

    def add_options(self, p):
        p.add_argument("--top-n", type=positive_int, default=1, help="number of top eigenpairs")
        p.add_argument("--eigen-method", choices=("lanczos", "power"), default="lanczos",
                       help="lanczos (stops when the relative eigenvalue error bound <= --tol) "
                            "or power (PyHessian's rule: relative change < --tol)")

    def wanted(self, args, asked) -> tuple[int, str]:
        """(how many eigenpairs, who wants that many: "--top-n K" or the asking flag)."""
        k, who = args.top_n, f"--top-n {args.top_n}"
        for r in asked:
            if r.value > k:
                k, who = r.value, f"{r.by} ({r.value} eigenpairs)"
        return k, who

    def check(self, args, selection):
        if args.eigen_method == "lanczos":
            check_steps(*self.wanted(args, selection.asked(self)), args)

    def check_model(self, args, selection, model):
        k, who = self.wanted(args, selection.asked(self))
        check_count(who, k, model.num_trainable, "--top-n" if who.startswith("--top-n") else "")

    def run(self, ctx):
        a, op = ctx.args, ctx.op
        k, _ = self.wanted(a, ctx.asked(self))
        if a.eigen_method == "lanczos":
            r = lanczos_eigenpairs(op, k, max_steps=a.max_iter, tol=a.tol,
                                   generator=ctx.generator(self),
                                   callback=ctx.progress("eigenvalue"))
        else:
            r = power_iteration_eigenpairs(op, k, max_iter=a.max_iter, tol=a.tol,
                                           generator=ctx.generator(self),
                                           callback=ctx.progress("eigenvalue"))
        return sampling.run_eigen(r, ctx, self)

    def summary(self, r, ctx):
        lines = [f"***Top Eigenvalues:  {list(r.eigenvalues)}",
                 f"    {r.method}, {ctx.cost_line(self)}, {stopping_note(r, ctx.args.tol)}"]
        return lines + (sampling.eigen_lines(r, ctx, "λ") if r.sampling else [])

    def to_json(self, r, ctx):
        return sampling.eigen_json(r.to_dict(), r)

    def convergence(self, entry):
        """Each eigenvalue estimate against the products."""
        series: dict[int, tuple] = {}
        for step in entry["history"]:
            for i, value in enumerate(step["values"]):
                if value is not None:
                    xs, ys = series.setdefault(i, ([], []))
                    xs.append(step["matvecs"])
                    ys.append(value)
        return Panel(f"top eigenvalues ({entry['method']})", "Hessian-vector products",
                     "eigenvalue estimate",
                     [Series(f"lambda_{i + 1}", *xy) for i, xy in sorted(series.items())])

    def compare_cells(self, entry):
        values, bounds = _values_and_bounds(entry)
        if not values or values[0] is None:
            return ("n/a",)
        lam, bound = values[0], bounds[0]
        text = f"{lam:.6g}"
        if bound is not None:
            if entry.get("method") == "power":
                text += f" (rel. residual {bound:.1e})"
            else:
                text += f" ± {abs(lam) * bound:.2g}"
        se = (entry.get("sampling_stderr") or [None])[0]
        if is_number(se):
            text += f" ± {se:.2g} sampling"
        return (text + ("" if entry.get("converged") is not False else " *"),)

    def compare_item(self, entry, results):
        """(eigenvalue, absolute error = relative bound x |eigenvalue|[, sampling s.e.])
        points."""
        sampled = entry.get("sampling_stderr") or []
        out = []
        for i, (v, b) in enumerate(zip(*_values_and_bounds(entry))):
            if v is not None:
                point = (v, abs(v) * b if b is not None else 0.0)
                se = sampled[i] if i < len(sampled) else None
                out.append(point + ((float(se),) if is_number(se) else ()))
        return out


def _values_and_bounds(entry) -> tuple[list, list]:
    """The eigenvalues and relative error bounds of a results.json entry, None where not a
    number (a missing bound: None too)."""
    values = [float(v) if is_number(v) else None for v in entry["eigenvalues"]]
    bounds = [float(b) if is_number(b) else None for b in entry.get("error_bounds") or []]
    return values, bounds + [None] * (len(values) - len(bounds))


def check_steps(k: int, who: str, args) -> None:
    """k eigenpairs need at least k Lanczos steps within --max-iter."""
    if k > args.max_iter:
        raise UserError(f"{who} needs at least as many Lanczos steps: pass --max-iter {k} "
                        "or more")


def check_count(who: str, k: int, trainable: int, flag: str) -> None:
    """k eigenpairs need at least k trainable parameters (``flag``: the option to lower)."""
    if k > trainable:
        fix = f"pass {flag} {trainable} or less" if flag else "use a larger model"
        raise UserError(f"{who} exceeds the model's {trainable:,} trainable parameters; {fix}")


def stopping_note(r, tol) -> str:
    """What the stopping rule established, in words."""
    state = "converged" if r.converged else "NOT converged (budget used up)"
    if r.method == "lanczos":
        return (f"{state}: relative eigenvalue error <= {max(r.error_bounds):.1e} "
                f"(bound from the Ritz residuals and gaps; --tol {tol:g})")
    return (f"{state}: relative change between iterations < --tol {tol:g} "
            f"(relative residual {max(r.residuals):.1e}; not an error bound)")


__all__ = ["TopEigenvalues", "check_count", "check_steps", "fmt_values", "stopping_note"]
