"""The Hessian diagonal (``--diagonal``): Hutchinson's estimate mean(z * Hz) from the trace's
probes (asked of the trace unit), with a summary per ``--group-by`` group, saved as
hessian_diagonal.pt."""
from __future__ import annotations

import torch

from .base import Analysis


class Diagonal(Analysis):
    name = "diagonal"
    flag = "--diagonal"
    help = ("estimate the Hessian diagonal (from the trace's probes) and save it as "
            "hessian_diagonal.pt")
    requires = ("trace",)
    files = ("hessian_diagonal.pt",)

    def requests(self, args):
        return [self.ask("trace", "diagonal")]

    def run(self, ctx):
        trace = ctx.results["trace"]
        d = trace.diagonal
        if trace.sampling is not None:
            d.sampling_stderr = trace.sampling.diagonal_stderr
        return d

    def _per_group(self, d, ctx):
        rows = []
        for g in ctx.groups():
            values, se = d.diagonal[g.index], d.stderr[g.index]
            rows.append({"name": g.name, "num_parameters": g.num_parameters,
                         "sum": float(values.sum()), "mean": float(values.mean()),
                         "min": float(values.min()), "max": float(values.max()),
                         "mean_stderr": float(se.mean()),
                         **({} if d.sampling_stderr is None else {"mean_sampling_stderr": float(
                             d.sampling_stderr[g.index].mean())}),
                         "negative_share": float((values < 0).double().mean())})
        return rows

    def summary(self, d, ctx):
        rows = self._per_group(d, ctx)
        width = max(len(r["name"]) for r in rows)
        sampled = d.sampling_stderr is not None
        lines = [f"***Diagonal: from {d.num_probes} probes (those of the trace; no extra "
                 "HVPs); per group:",
                 f"    {'group':<{width}}  {'mean':>10}  {'min':>10}  {'max':>10}  "
                 f"{'mean s.e.':>10}" + (f"  {'sampling':>10}" if sampled else "")]
        for r in rows:
            lines.append(f"    {r['name']:<{width}}  {r['mean']:>10.3g}  {r['min']:>10.3g}  "
                         f"{r['max']:>10.3g}  {r['mean_stderr']:>10.3g}"
                         + (f"  {r['mean_sampling_stderr']:>10.3g}" if sampled else ""))
        if sampled:
            lines.append("    (mean s.e.: the probes'; sampling: the mean elementwise jackknife "
                         "s.e. for another sample, with the same probes)")
        return lines

    def to_json(self, d, ctx):
        out = {**d.to_dict(), "file": "hessian_diagonal.pt",
               "per_group": self._per_group(d, ctx)}
        if d.sampling_stderr is not None:
            out["sampling_stderr_mean"] = float(d.sampling_stderr.mean())
        return out

    def write(self, d, ctx, outputs):
        op = ctx.op

        def save(path):
            tensors = {name: t.detach().to("cpu", torch.float64).clone()
                       for name, t in zip(op.param_names, op.to_list(d.diagonal.to(op.device)))}
            stderr = {name: t.detach().to("cpu", torch.float64).clone()
                      for name, t in zip(op.param_names, op.to_list(d.stderr.to(op.device)))}
            saved = {"diagonal": tensors, "stderr": stderr, "num_probes": d.num_probes}
            if d.sampling_stderr is not None:
                saved["sampling_stderr"] = {
                    name: t.detach().to("cpu", torch.float64).clone() for name, t in
                    zip(op.param_names, op.to_list(d.sampling_stderr.to(op.device, op.dtype)))}
            torch.save(saved, path)

        outputs.write("hessian_diagonal.pt", save)
