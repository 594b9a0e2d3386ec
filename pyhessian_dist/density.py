"""Smoothing SLQ quadrature (nodes, weights) into a spectral density on a grid.

Follows PyHessian's ``density_generate``: a grid of ``num_bins`` points over
[mean_runs(min node) - overhead, mean_runs(max node) + overhead]; each node is replaced by a
Gaussian of variance ``sigma_squared * max(1, grid width)`` weighted by its weight; the runs are
averaged and the result is normalised to integrate to 1 on the grid (rectangle rule).
"""
from __future__ import annotations

import numpy as np

__all__ = ["gaussian_density", "jensen_shannon_distance", "spectral_js_distances"]


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


def _block_probabilities(nodes, weights, grid, scale, bandwidth):
    """One block's SLQ runs, nodes divided by ``scale``, smoothed by Gaussians of standard
    deviation ``bandwidth`` on ``grid``, averaged over runs, as probabilities summing to 1."""
    density = np.zeros_like(grid)
    for n, w in zip(nodes, weights):
        x = np.asarray(n, dtype=np.float64) / scale
        k = np.exp(-((grid[:, None] - x[None, :]) ** 2) / (2.0 * bandwidth ** 2))
        density += k @ np.asarray(w, dtype=np.float64)
    return density / density.sum()


def jensen_shannon_distance(p, q) -> float:
    """The square root of the Jensen-Shannon divergence in bits of two probability vectors: 0 for
    equal ones, 1 for disjoint supports (a metric, Endres & Schindelin 2003)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = 0.5 * (p + q)

    def kl(a):
        mask = (a > 0) & (m > 0)  # m > 0 wherever a > 0, unless a underflows when halved
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return float(np.sqrt(max(0.0, 0.5 * kl(p) + 0.5 * kl(q))))


def spectral_js_distances(spectra, *, normalise: bool = True, bandwidth: float = 0.05,
                          num_bins: int = 2001) -> dict:
    """Mean pairwise Jensen-Shannon distance between the spectral densities of several
    blocks (Zhang et al. 2024's measure of block heterogeneity), each block given as its SLQ
    runs ``(nodes, weights)``.

    Each block's nodes are divided by a scale: its own spectral radius ``max |node|`` over its
    runs (``normalise=True``: the shapes of the spectra are compared, whatever their size), or
    the largest spectral radius of all blocks (``normalise=False``: sizes count too). On a
    common grid of ``num_bins`` points over [-1 - 4h, 1 + 4h] every node becomes a Gaussian of
    standard deviation ``h = bandwidth`` (in units of the scale) times its weight; runs are
    averaged and each block's density is normalised to a probability vector on the grid. The
    JS distance of two blocks is sqrt of their JS divergence in bits, in [0, 1].

    Returns ``{"js_distance": mean over the G (G - 1) / 2 pairs (None for one block),
    "pairwise": G x G list, "grid": the grid, "densities": G probability vectors, "scales":
    the G scales}``.
    """
    if len(spectra) == 0:
        raise ValueError("need at least one block")
    radii = [max((abs(x) for n in nodes for x in n), default=0.0) for nodes, _w in spectra]
    common = max(radii) or 1.0
    scales = [(r or 1.0) if normalise else common for r in radii]
    h = float(bandwidth)
    grid = np.linspace(-1.0 - 4 * h, 1.0 + 4 * h, num_bins)
    densities = [_block_probabilities(nodes, weights, grid, s, h)
                 for (nodes, weights), s in zip(spectra, scales)]
    g = len(densities)
    pairwise = np.zeros((g, g))
    for i in range(g):
        for j in range(i + 1, g):
            pairwise[i, j] = pairwise[j, i] = jensen_shannon_distance(densities[i], densities[j])
    mean = float(pairwise[np.triu_indices(g, 1)].mean()) if g > 1 else None
    return {"js_distance": mean, "pairwise": pairwise.tolist(), "grid": grid,
            "densities": densities, "scales": scales}
