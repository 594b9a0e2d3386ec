"""Smoothing SLQ quadrature (nodes, weights) into a spectral density on a grid.

Follows PyHessian's ``density_generate``: a grid of ``num_bins`` points over
[mean_runs(min node) - overhead, mean_runs(max node) + overhead]; each node is replaced by a
Gaussian of variance ``sigma_squared * max(1, grid width)`` weighted by its weight; the runs are
averaged and the result is normalised to integrate to 1 on the grid (rectangle rule).
"""
from __future__ import annotations

import numpy as np

__all__ = ["gaussian_density"]


def gaussian_density(nodes, weights, *, num_bins: int = 10000, sigma_squared: float = 1e-5,
                     overhead: float = 0.01):
    """Per-run lists of nodes and weights (runs may differ in length) -> (grid, density).

    Returns two float64 numpy arrays of length ``num_bins``; ``density`` integrates to 1.
    """
    if len(nodes) == 0 or len(nodes) != len(weights):
        raise ValueError("need one list of weights per list of nodes, and at least one run")
    runs = [(np.asarray(n, dtype=np.float64), np.asarray(w, dtype=np.float64))
            for n, w in zip(nodes, weights)]
    if any(n.size == 0 or n.shape != w.shape for n, w in runs):
        raise ValueError("every run needs as many weights as nodes, and at least one node")
    lam_max = np.mean([n.max() for n, _ in runs]) + overhead
    lam_min = np.mean([n.min() for n, _ in runs]) - overhead
    grid = np.linspace(lam_min, lam_max, num=num_bins)
    var = sigma_squared * max(1.0, lam_max - lam_min)
    density = np.zeros(num_bins)
    for n, w in runs:
        # (bins, nodes) Gaussian kernel, weighted sum over nodes
        k = np.exp(-((grid[:, None] - n[None, :]) ** 2) / (2.0 * var)) / np.sqrt(2 * np.pi * var)
        density += k @ w
    density /= len(runs)
    density /= density.sum() * (grid[1] - grid[0])
    return grid, density
