"""Per-block spectra (``--per-layer --density``): one SLQ spectral density per parameter group
(``--group-by``) and their heterogeneity, the mean pairwise Jensen-Shannon distance between
the groups' smoothed densities (Zhang et al., "Why Transformers Need Adam: A Hessian
Perspective", 2024).

Each block's density is its SLQ quadrature (``--lanczos-iter`` steps, ``--n-v`` runs, as the
global density) with the eigenvalues divided by the block's own spectral radius (the largest
|Ritz value|), smoothed by Gaussians of standard deviation ``BANDWIDTH`` (in units of that
radius) on a common grid over [-1, 1] and normalised to a probability vector; the JS distance
of two blocks is sqrt(JS divergence in bits), in [0, 1]. Dividing by the radius compares the
spectra's shapes, as Zhang et al. normalise their plotted block spectra (by the 10th largest
eigenvalue; the largest is what Lanczos resolves best and exists for every block). How far
the blocks' sizes differ is reported beside it: the spread of the radii in decades,
log10(max rho / min rho). (The JS distance on one common scale is no measure of that: every
block smaller than the bandwidth times the largest collapses into the same spike at 0.)

Cost: block g takes min(steps, n_g) products per run; the blocks still iterating share one
operator call per Lanczos step (``slq_group_densities``).
"""
from __future__ import annotations

import math

from pyhessian_dist.density import spectral_js_distances
from pyhessian_dist.estimators import slq_group_densities
from support.figures import plot_block_spectra

from .base import Analysis

#: Gaussian smoothing of the normalised block spectra, as a fraction of each block's spectral
#: radius (measured: blocks drawn from one random-matrix ensemble are 0.06-0.11 apart with
#: 100 SLQ steps, blocks of different ensembles 0.56-0.78; tests/test_block_spectra.py)
BANDWIDTH = 0.05


class BlockSpectra(Analysis):
    name = "block_spectra"
    flag = "--per-layer --density"
    help = ("with --per-layer and --density: an SLQ density per --group-by group and their "
            "mean pairwise Jensen-Shannon distance (block_spectra.png)")
    files = ("block_spectra.png",)
    compare_columns = ("block JS",)

    def add_arguments(self, parser):
        """No switch of its own: --per-layer and --density together ask for it; it uses the
        density's --lanczos-iter and --n-v and the shared --group-by."""

    def requested(self, args):
        return bool(getattr(args, "per_layer", False) and getattr(args, "density", False))

    def run(self, ctx):
        a, groups = ctx.args, ctx.groups()
        densities = slq_group_densities(
            ctx.op, [g.index for g in groups], num_steps=a.lanczos_iter, num_runs=a.n_v,
            generator=ctx.generator(self),
            callback=ctx.progress("block spectra", every=10 * len(groups)))
        spectra = [(d.nodes, d.weights) for d in densities]
        shape = spectral_js_distances(spectra, normalise=True, bandwidth=BANDWIDTH)
        radii = [rho for rho in shape["scales"] if rho > 0]
        return {"groups": [{"name": g.name, "num_parameters": g.num_parameters,
                            "nodes": d.nodes, "weights": d.weights, "num_steps": d.num_steps,
                            "spectral_radius": rho}
                           for g, d, rho in zip(groups, densities, shape["scales"])],
                "js_distance": shape["js_distance"],
                "radius_spread_decades": math.log10(max(radii) / min(radii)) if radii else None,
                "pairwise_js_distance": shape["pairwise"],
                "smoothing": {"normalised_by": "each block's spectral radius (max |Ritz value|)",
                              "bandwidth": BANDWIDTH, "kernel": "gaussian",
                              "grid": [float(shape["grid"][0]), float(shape["grid"][-1]),
                                       len(shape["grid"])],
                              "distance": "sqrt(Jensen-Shannon divergence, bits)"},
                "group_by": a.group_by, "num_runs": a.n_v, "lanczos_steps": a.lanczos_iter,
                "num_matvecs": sum(d.num_matvecs for d in densities),
                "operator_calls": a.n_v * max(d.num_steps for d in densities),
                "history": [s.to_dict() for s in densities[0].history]}

    def summary(self, r, ctx):
        groups = r["groups"]
        js = r["js_distance"]
        head = (f"***Block spectra ({r['group_by']}: {len(groups)} groups, SLQ "
                f"{r['lanczos_steps']} steps x {r['num_runs']} run(s) per block): ")
        head += (f"mean pairwise JS distance {js:.4f} over {len(groups) * (len(groups) - 1) // 2}"
                 f" pairs (0 = alike, 1 = disjoint); spectral radii span "
                 f"{r['radius_spread_decades']:.2f} decades" if js is not None
                 else "one group, no pairs")
        lines = [head,
                 f"    each block: eigenvalues / its spectral radius rho, Gaussians of width "
                 f"{BANDWIDTH:g} rho; cost {r['num_matvecs']} block products (sum over blocks "
                 f"of min(steps, size) x runs) in {r['operator_calls']} batched passes, "
                 f"{ctx.costs.get(self.name, {}).get('seconds', 0.0):.1f} s"]
        width = max(len(g["name"]) for g in groups)
        lines.append(f"    {'group':<{width}}  {'params':>9}  {'rho':>10}  "
                     f"{'Ritz values':>23}  mean JS to the others")
        pairwise = r["pairwise_js_distance"]
        for i, g in enumerate(groups):
            lo = min(min(n) for n in g["nodes"])
            hi = max(max(n) for n in g["nodes"])
            others = [d for j, d in enumerate(pairwise[i]) if j != i]
            mean = f"{sum(others) / len(others):.3f}" if others else "n/a"
            lines.append(f"    {g['name']:<{width}}  {g['num_parameters']:>9,}  "
                         f"{g['spectral_radius']:>10.4g}  [{lo:>10.4g}, {hi:>10.4g}]  {mean}")
        return lines

    def to_json(self, r, ctx):
        return r

    def write(self, r, ctx, outputs):
        outputs.write("block_spectra.png", lambda path: plot_block_spectra(r, path))

    def compare_cells(self, entry):
        js = entry.get("js_distance")
        return (f"{js:.3f}" if isinstance(js, (int, float)) else "n/a",)
