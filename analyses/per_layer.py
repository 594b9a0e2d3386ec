"""Per-layer Hessian (``--per-layer``): for each parameter group (``--group-by``) the trace of
its diagonal block (from the trace's own probes, so the groups add up to the global estimate
probe by probe) and the top eigenvalue of the block (Lanczos on the block)."""
from __future__ import annotations

import math

from pyhessian_dist import lanczos_group_eigenpairs
from support.cli import positive_float
from support.figures import plot_per_layer

from .base import Analysis


class PerLayer(Analysis):
    name = "per_layer"
    flag = "--per-layer"
    help = ("trace and top eigenvalue of every layer's diagonal block of the Hessian; with "
            "--density also each block's spectral density and their mean pairwise "
            "Jensen-Shannon distance (results.block_spectra, block_spectra.png)")
    requires = ("trace",)
    files = ("per_layer.png",)

    def add_options(self, p):
        p.add_argument("--per-layer-tol", type=positive_float, default=1e-2,
                       help="relative eigenvalue error bound of each block's top eigenvalue")

    def requests(self, args):
        return [self.ask("trace", "group_samples")]

    def run(self, ctx):
        groups = ctx.groups()
        blocks = lanczos_group_eigenpairs(ctx.op, [g.index for g in groups], k=1,
                                          max_steps=ctx.args.max_iter,
                                          tol=ctx.args.per_layer_tol,
                                          generator=ctx.generator(self),
                                          callback=ctx.progress("per-layer", every=20))
        trace = ctx.results["trace"]
        traces, stderrs = trace.group_traces()
        sampled = trace.sampling.group_stderr if trace.sampling is not None else None
        rows = []
        for i, (g, b, t, se) in enumerate(zip(groups, blocks, traces, stderrs)):
            rows.append({"name": g.name, "parameters": list(g.parameters),
                         "num_parameters": g.num_parameters, "trace": t,
                         "trace_stderr": se if not math.isnan(se) else None,
                         **({} if sampled is None else {"trace_sampling_stderr": sampled[i]}),
                         "trace_per_parameter": t / g.num_parameters,
                         "top_eigenvalue": b.eigenvalues[0],
                         "top_eigenvalue_error_bound": b.error_bounds[0],
                         "top_eigenvalue_converged": b.converged,
                         "num_matvecs": b.num_matvecs})
        return rows

    def summary(self, rows, ctx):
        width = max(len(r["name"]) for r in rows)
        probes = len(ctx.results["trace"].samples)
        head = (f"***Per-layer ({ctx.args.group_by}; traces from the {probes} trace probes, "
                f"top eigenvalues by block Lanczos: {ctx.cost_line(self)})")
        sampled = "trace_sampling_stderr" in rows[0]
        extra = f"  {'± sampling':>10}" if sampled else ""
        lines = [head, f"    {'group':<{width}}  {'params':>9}  {'trace ± s.e.':>22}{extra}  "
                       f"{'trace/param':>11}  {'top eigenvalue':>14}"]
        for r in rows:
            se = f"{r['trace_stderr']:.3g}" if r["trace_stderr"] is not None else "n/a"
            flag = "" if r["top_eigenvalue_converged"] else " (not converged)"
            samp = f"  {r['trace_sampling_stderr']:>10.3g}" if sampled else ""
            lines.append(f"    {r['name']:<{width}}  {r['num_parameters']:>9,}  "
                         f"{r['trace']:>12.5g} ± {se:<7}{samp}  "
                         f"{r['trace_per_parameter']:>11.3g}  "
                         f"{r['top_eigenvalue']:>14.6g}{flag}")
        total = sum(r["trace"] for r in rows)
        lines.append(f"    sum of the group traces {total:.6g} = the trace estimate "
                     f"{ctx.results['trace'].trace:.6g} (same probes)")
        return lines

    def to_json(self, rows, ctx):
        return rows

    def write(self, rows, ctx, outputs):
        outputs.write("per_layer.png", lambda path: plot_per_layer(rows, path))
