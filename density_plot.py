"""Figures of an analysis: the eigenvalue spectral density (ESD) as the original draws it, and
the convergence of the estimates.

``density_generate`` smooths SLQ nodes and weights onto a grid (10,000 points, Gaussian of
variance 1e-5 * max(1, range), integrating to 1) and returns ``(density, grids)`` in
PyHessian's order; ``get_esd_plot`` writes the log-scale figure to a PDF (example.pdf by
default) and a PNG beside it; ``plot_convergence`` draws the estimates of a results.json
against the number of Hessian-vector products.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

from pyhessian_dist.density import gaussian_density  # noqa: E402

__all__ = ["density_generate", "get_esd_plot", "plot_convergence", "save_figure"]


def density_generate(eigenvalues, weights, num_bins=10000, sigma_squared=1e-5, overhead=0.01):
    """Per-run SLQ nodes and weights -> ``(density, grids)`` (PyHessian's order); the density
    integrates to 1 on the grid."""
    grids, density = gaussian_density(eigenvalues, weights, num_bins=num_bins,
                                      sigma_squared=sigma_squared, overhead=overhead)
    return density, grids


def get_esd_plot(eigenvalues, weights, path="example.pdf", png_path=None, title=None):
    """Write the ESD (log-scale density vs eigenvalue) to ``path`` and a PNG (``png_path``,
    default: beside it). Returns the two paths; each is written under a temporary name and
    renamed, so an interrupted run never leaves a truncated figure."""
    density, grids = density_generate(eigenvalues, weights)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    try:
        ax.semilogy(grids, density + 1.0e-7)
        ax.set_ylabel("Density (log scale)", fontsize=13)
        ax.set_xlabel("Eigenvalue", fontsize=13)
        ax.set_xlim(grids[0] - 1, grids[-1] + 1)
        if title:
            ax.set_title(title, fontsize=11)
        fig.tight_layout()
        png = png_path or os.path.splitext(path)[0] + ".png"
        return [save_figure(fig, path), save_figure(fig, png, dpi=150)]
    finally:
        plt.close(fig)


def _series(history):
    """Per index i, the (products, value_i) points of a Step history (results.json dicts)."""
    series: dict[int, list] = {}
    for step in history:
        for i, value in enumerate(step["values"]):
            if value is not None:
                series.setdefault(i, []).append((step["matvecs"], value))
    return series


def plot_convergence(results, path="convergence.png"):
    """Estimates against the number of HVPs: eigenvalues (left), trace ± standard error
    (right), from the ``results`` of a results.json (its "eigenvalue" / "trace" entries)."""
    eigen, trace = results.get("eigenvalue"), results.get("trace")
    panels = [p for p in (eigen, trace) if p is not None]
    if not panels:
        raise ValueError("nothing to plot: the results hold no eigenvalue or trace history")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    try:
        axes = list(axes[0])
        if eigen is not None:
            ax = axes.pop(0)
            for i, pts in sorted(_series(eigen["history"]).items()):
                ax.plot(*zip(*pts), marker=".", label=f"lambda_{i + 1}")
            ax.set_xlabel("Hessian-vector products")
            ax.set_ylabel("eigenvalue estimate")
            ax.set_title(f"top eigenvalues ({eigen['method']})")
            ax.legend(fontsize=8)
        if trace is not None:
            ax = axes.pop(0)
            hist = [h for h in trace["history"] if h["label"] != "deflation"]
            x = [h["matvecs"] for h in hist]
            m = [h["values"][0] for h in hist]
            se = [h["errors"][0] or 0.0 for h in hist]  # null (one probe) -> no band
            ax.plot(x, m, marker=".", label="estimate")
            ax.fill_between(x, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)],
                            alpha=0.3, label="± 1 standard error")
            ax.set_xlabel("Hessian-vector products (deflation included)")
            ax.set_ylabel("trace estimate")
            ax.set_title(f"trace ({trace['method']})")
            ax.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


def save_figure(fig, path, **kw):
    """Save atomically: a temporary file in the same folder, then a rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}{os.path.splitext(path)[1]}"
    try:
        fig.savefig(tmp, **kw)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
