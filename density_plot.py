"""The eigenvalue spectral density (ESD) figure, as the original draws it.

`density_generate` smooths SLQ nodes and weights onto a grid (10,000 points, Gaussian of
variance 1e-5 * max(1, range), integrating to 1); `get_esd_plot` writes the log-scale figure to a
PDF (example.pdf by default) and a PNG beside it.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402

from pyhessian_dist.density import gaussian_density  # noqa: E402

__all__ = ["density_generate", "get_esd_plot", "plot_convergence"]


def density_generate(eigenvalues, weights, num_bins=10000, sigma_squared=1e-5, overhead=0.01):
    """Per-run SLQ nodes and weights -> (grid, density), density integrating to 1."""
    return gaussian_density(eigenvalues, weights, num_bins=num_bins,
                            sigma_squared=sigma_squared, overhead=overhead)


def get_esd_plot(eigenvalues, weights, path="example.pdf", title=None):
    """Write the ESD (log-scale density vs eigenvalue) to ``path`` and a .png beside it.

    Returns the two paths written. Each file is written to a temporary name and renamed, so an
    interrupted run never leaves a truncated figure.
    """
    grid, density = density_generate(eigenvalues, weights)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    try:
        ax.semilogy(grid, density + 1.0e-7)
        ax.set_ylabel("Density (log scale)", fontsize=13)
        ax.set_xlabel("Eigenvalue", fontsize=13)
        ax.set_xlim(grid[0] - 1, grid[-1] + 1)
        if title:
            ax.set_title(title, fontsize=11)
        fig.tight_layout()
        png = os.path.splitext(path)[0] + ".png"
        return [_save(fig, path), _save(fig, png, dpi=150)]
    finally:
        plt.close(fig)


def plot_convergence(eigen=None, trace=None, path="convergence.png"):
    """Estimates against the number of HVPs: eigenvalues (left), trace ± standard error (right).

    ``eigen`` / ``trace`` are the dicts the analysis stores in results.json (with "history").
    """
    panels = [p for p in (eigen, trace) if p is not None]
    if not panels:
        raise ValueError("nothing to plot: pass eigen and/or trace results")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    try:
        axes = list(axes[0])
        if eigen is not None:
            ax = axes.pop(0)
            hist = eigen["history"]
            if eigen["method"] == "lanczos":
                k = len(hist[-1]["estimates"])
                for i in range(k):
                    pts = [(h["matvecs"], h["estimates"][i]) for h in hist]
                    ax.plot(*zip(*pts), marker=".", label=f"lambda_{i + 1}")
            else:
                for i in sorted({h["index"] for h in hist}):
                    pts = [(h["matvecs"], h["estimate"]) for h in hist if h["index"] == i]
                    ax.plot(*zip(*pts), marker=".", label=f"lambda_{i + 1}")
            ax.set_xlabel("Hessian-vector products")
            ax.set_ylabel("eigenvalue estimate")
            ax.set_title(f"top eigenvalues ({eigen['method']})")
            ax.legend(fontsize=8)
        if trace is not None:
            ax = axes.pop(0)
            hist = trace["history"]
            x = [h["matvecs"] for h in hist]
            m = [h["estimate"] for h in hist]
            se = [h["stderr"] if h["stderr"] == h["stderr"] else 0.0 for h in hist]  # nan -> 0
            ax.plot(x, m, marker=".", label="estimate")
            ax.fill_between(x, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)],
                            alpha=0.3, label="± 1 standard error")
            ax.set_xlabel("Hessian-vector products")
            ax.set_ylabel("trace estimate")
            ax.set_title(f"trace ({trace['method']})")
            ax.legend(fontsize=8)
        fig.tight_layout()
        return _save(fig, path, dpi=120)
    finally:
        plt.close(fig)


def _save(fig, path, **kw):
    """Save atomically: a temporary file in the same folder, then a rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}{os.path.splitext(path)[1]}"
    fig.savefig(tmp, **kw)
    os.replace(tmp, path)
    return path
