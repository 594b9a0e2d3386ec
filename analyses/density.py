"""The eigenvalue spectral density (``--density``) by stochastic Lanczos quadrature."""
from __future__ import annotations

from pyhessian_dist import slq_density
from support.cli import positive_int
from support.figures import SpectrumOverlay, density_generate, get_esd_plot

from .base import Analysis


class Density(Analysis):
    name = "density"
    flag = "--density"
    help = "estimate the eigenvalue spectral density (ESD)"
    files = ("example.pdf", "example.png")
    compare_panel = SpectrumOverlay()

    def add_options(self, p):
        p.add_argument("--lanczos-iter", type=positive_int, default=100,
                       help="Lanczos steps per SLQ run (density)")
        p.add_argument("--n-v", type=positive_int, default=1,
                       help="SLQ runs (density); all runs are kept and averaged")

    def run(self, ctx):
        a = ctx.args
        return slq_density(ctx.op, num_steps=a.lanczos_iter, num_runs=a.n_v,
                           generator=ctx.generator(self),
                           callback=ctx.progress("density", every=10))

    def summary(self, r, ctx):
        lo = min(min(n) for n in r.nodes)
        hi = max(max(n) for n in r.nodes)
        lines = [f"***Density: {r.num_runs} SLQ run(s) x {r.num_steps} Lanczos steps, "
                 f"{ctx.cost_line(self)}; Ritz values in [{lo:.4g}, {hi:.4g}]"]
        m = spectral_mass(r)
        lines.append(f"    spectral weight: {100 * m['negative']:.2f}% below -delta (negative "
                     f"mass), {100 * m['near_zero']:.2f}% within ±delta, "
                     f"{100 * m['positive']:.2f}% above; delta = 1e-3 x max |Ritz value| = "
                     f"{m['delta']:.3g}")
        top, bottom = ctx.results.get("eigenvalue"), ctx.results.get("bottom")
        if top is not None and bottom is not None and top.eigenvalues[0] > 0:
            ratio = abs(bottom.eigenvalues[0]) / top.eigenvalues[0]
            lines.append(f"    |lambda_min| / lambda_max = {ratio:.4g} (from --bottom-n and "
                         "--eigenvalue)")
        return lines

    def to_json(self, r, ctx):
        out = {**r.to_dict(), "spectral_mass": spectral_mass(r)}
        top, bottom = ctx.results.get("eigenvalue"), ctx.results.get("bottom")
        if top is not None and bottom is not None and top.eigenvalues[0] > 0:
            out["abs_lambda_min_over_lambda_max"] = abs(bottom.eigenvalues[0]) / top.eigenvalues[0]
        return out

    def write(self, r, ctx, outputs):
        outputs.write(("example.pdf", "example.png"),
                      lambda pdf, png: get_esd_plot(r.nodes, r.weights, pdf, png_path=png))

    def compare_item(self, entry, results):
        """The run's smoothed ESD (ValueError on malformed nodes and weights) and its
        lambda_1, marked when the run computed it."""
        density, grids = density_generate(entry["nodes"], entry["weights"])
        top = (results.get("eigenvalue") or {}).get("eigenvalues") or [None]
        return density, grids, top[0]


def spectral_mass(r, relative_delta: float = 1e-3) -> dict:
    """Shares of the SLQ quadrature weight (averaged over runs) on Ritz values below -delta
    (the negative mass), within ±delta, and above delta, delta = relative_delta x the largest
    |Ritz value|: SLQ lumps the bulk near zero into a few nodes whose sign means nothing, so
    "below zero" is measured from the resolution, not from 0."""
    delta = relative_delta * max(max(abs(x) for x in n) for n in r.nodes)
    shares = {"negative": 0.0, "near_zero": 0.0, "positive": 0.0}
    for nodes, weights in zip(r.nodes, r.weights):
        for x, w in zip(nodes, weights):
            key = "negative" if x < -delta else "positive" if x > delta else "near_zero"
            shares[key] += w / len(r.nodes)
    return {**shares, "delta": delta}
