"""The sampling error (``--sampling-error G``) of the analyses it applies to: how far each
number would move with another sample of ``--hessian-batch-size`` from the same data, by the
delete-a-group jackknife over G groups of whole mini-batches (``pyhessian_dist.estimators.
sampling``). Not a unit: the units it applies to (``APPLIES``) compute it in their ``run`` and
print it next to their algorithm's error with the helpers here; the script adds the option and
calls ``check``."""
from __future__ import annotations

import math

from support.errors import UserError

#: the units whose numbers get a sampling error, and the flags that ask for them
APPLIES = {"eigenvalue": "--eigenvalue", "bottom": "--bottom-n", "trace": "--trace",
           "per_layer": "--per-layer", "diagonal": "--diagonal"}
#: above this many times the algorithm's error, the summary advises on --hessian-batch-size
DOMINANT = 3.0


def add_option(p) -> None:
    """``--sampling-error G`` (off by default)."""
    p.add_argument("--sampling-error", type=int, default=None, metavar="G",
                   help="also the sampling error of the eigenvalues, traces and diagonal: "
                        "their standard error for another sample of --hessian-batch-size "
                        "from the same data (and the eigenvalues' bias), by a jackknife over G "
                        "groups of whole mini-batches (2 <= G <= the mini-batches; off by "
                        "default)")


def groups(args) -> int | None:
    """G of ``--sampling-error`` (None: off)."""
    return getattr(args, "sampling_error", None)


def check(args, selection) -> None:
    """One ``error:`` line for G < 2, G above the number of mini-batches, or nothing it
    applies to."""
    g = groups(args)
    if g is None:
        return
    if g < 2:
        raise UserError(f"--sampling-error {g}: the jackknife needs at least 2 groups of "
                        "mini-batches; pass --sampling-error 2 or more (e.g. 10)")
    if not selection.names & set(APPLIES):
        raise UserError(f"--sampling-error applies to {', '.join(APPLIES.values())}; pass "
                        "one of them, or drop --sampling-error")
    batches = math.ceil(args.hessian_batch_size / args.mini_hessian_batch_size)
    if g > batches:
        fewer = f"--sampling-error {batches} or less, or " if batches >= 2 else ""
        raise UserError(
            f"--sampling-error {g} needs at least {g} mini-batches (a group never splits one); "
            f"--hessian-batch-size {args.hessian_batch_size} in mini-batches of "
            f"{args.mini_hessian_batch_size} makes {batches}: pass {fewer}"
            f"--mini-hessian-batch-size {max(1, args.hessian_batch_size // g)} or less")
    if "trace" in selection.names and args.trace_method == "hutchpp":
        raise UserError("--sampling-error splits the probes of the Hutchinson trace by group; "
                        "pass --trace-method deflated or hutchinson, not hutchpp")


def setup_phrase(s, product_label: str) -> str:
    """"jackknife over G groups of n samples; m extra products"."""
    sizes = sorted({int(n) for n in s.group_samples})
    n = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    return (f"jackknife over {s.num_groups} groups of {n} samples; {s.num_matvecs} extra "
            f"{product_label}s")


def eigen_lines(r, ctx, symbol: str) -> list[str]:
    """One line per eigenvalue with both errors, and the advice when sampling dominates."""
    s = r.sampling
    kind = "Lanczos error ≤" if r.method == "lanczos" else "relative residual"
    errs = r.error_bounds if r.method == "lanczos" else r.residuals
    how = setup_phrase(s, ctx.product_label)
    lines, ratios = [], []
    for i, (lam, rel, se, bias) in enumerate(zip(r.eigenvalues, errs, s.stderr, s.bias)):
        lines.append(f"    {symbol}{i + 1} = {lam:.6g} ({kind} {rel:.0e} relative) ± {se:.3g} "
                     f"sampling s.e., bias {bias:+.3g} ({how})")
        ratios.append(se / max(abs(rel * lam), 1e-300))
    if not s.converged:
        lines.append(f"    (the reduced samples' eigenvalues: worst relative error bound "
                     f"{s.replicate_error_bound:.1e}, not converged)")
    return lines + advice(min(ratios), ctx.args)


def advice(ratio: float, args, knob: str = "--tol") -> list[str]:
    """The advice line when the sampling s.e. is DOMINANT times the algorithm's error or more."""
    if not ratio >= DOMINANT:
        return []
    n = args.hessian_batch_size
    return [f"    note: the sampling error is {ratio:.0f}x the algorithm's: the sample, not the "
            f"algorithm, limits these numbers; the s.e. falls like 1/sqrt(N): --hessian-batch-"
            f"size {4 * n} would halve it, and a looser {knob} would save products"]


def eigen_json(out: dict, r) -> dict:
    """``sampling_stderr`` and ``sampling_bias`` (one per eigenvalue) and ``sampling`` (how)."""
    if r.sampling is not None:
        out["sampling_stderr"] = r.sampling.stderr
        out["sampling_bias"] = r.sampling.bias
        out["sampling"] = r.sampling.to_dict()
    return out


def run_eigen(result, ctx, analysis):
    """Attach the jackknife of ``result``'s eigenvalues when --sampling-error is given."""
    G = groups(ctx.args)
    if G is not None:
        from pyhessian_dist import eigenvalue_sampling_error

        result.sampling = eigenvalue_sampling_error(
            ctx.op, result, G, max_steps=max(ctx.args.max_iter, 3), tol=min(ctx.args.tol, 1e-4),
            generator=ctx.generator(analysis), callback=ctx.progress(f"{analysis.name} sampling"))
    return result
