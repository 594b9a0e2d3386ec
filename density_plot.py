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

__all__ = ["density_generate", "get_esd_plot"]


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
        written = []
        for out, kw in ((path, {}), (png, {"dpi": 150})):
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            tmp = f"{out}.tmp-{os.getpid()}{os.path.splitext(out)[1]}"
            fig.savefig(tmp, **kw)
            os.replace(tmp, out)
            written.append(out)
        return written
    finally:
        plt.close(fig)
