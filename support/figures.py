"""Every figure the scripts draw, in one place.

* the ESD as the original draws it: ``density_generate`` (10,000-point grid, Gaussians of
  variance 1e-5 x max(1, range), integrating to 1; PyHessian's ``(density, grids)``) and
  ``get_esd_plot`` (log-scale density against eigenvalue, a PDF and a PNG beside it), and
  several ESDs overlaid (``plot_esd_overlay``: the curvatures of one run);
* the convergence figure (``plot_convergence``): the panels the analysis units contribute
  (``Panel`` of ``Series``: estimates against products or probes, with ± bands);
* the per-layer figure (``plot_per_layer``), the loss landscape (``plot_landscape``), the
  curvature during training (``plot_curvature``);
* the comparison of several runs (``plot_compare``): panels the units contribute
  (``SpectrumOverlay``, ``RunPoints``), one colour per run.

Each ``*_figure`` function builds a matplotlib figure (tests read what was drawn from it); each
``plot_*`` function builds, saves atomically and closes it. matplotlib is imported on first use,
on the Agg backend (files only, no display), so a run that draws nothing never imports it.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import sys
from dataclasses import dataclass

from pyhessian_dist.density import gaussian_density, spectral_js_distances

__all__ = ["Panel", "RunPoints", "Series", "SpectrumOverlay", "block_spectra_figure",
           "compare_figure", "convergence_figure", "curvature_figure", "density_generate",
           "esd_figure", "esd_overlay_figure", "get_esd_plot", "is_number", "landscape_figure",
           "per_layer_figure", "plot_block_spectra", "plot_compare", "plot_convergence",
           "plot_curvature", "plot_esd_overlay", "plot_landscape", "plot_per_layer",
           "save_figure"]

_POSITIVE, _NEGATIVE = "tab:blue", "tab:red"


def _pyplot():
    """pyplot on the Agg backend, imported when the first figure is drawn.

    An import cut short (a cancel while it runs, in a process that goes on: a test, a
    notebook) takes back every module it had loaded: Python drops only the module whose code
    was interrupted, and a later import would find its half-initialised siblings (``module
    'matplotlib' has no attribute ...`` in every later figure)."""
    before = set(sys.modules)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except BaseException:
        for name in set(sys.modules) - before:
            del sys.modules[name]
        raise
    return plt


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


def _save_pair(fig, path, png_path=None) -> list[str]:
    """Write ``fig`` to ``path`` and, unless ``path`` is one, a 150-dpi PNG beside it (or at
    ``png_path``); return the paths written."""
    png = png_path or os.path.splitext(path)[0] + ".png"
    if os.path.abspath(png) == os.path.abspath(path):
        return [save_figure(fig, path, dpi=150)]
    return [save_figure(fig, path), save_figure(fig, png, dpi=150)]


def _closing(fig, save):
    """``save(fig)``'s value; the figure is closed whatever happens (no figure leaks)."""
    try:
        return save(fig)
    finally:
        _pyplot().close(fig)


@contextlib.contextmanager
def _closed_on_error(fig):
    """Close ``fig`` if drawing it fails (a failed figure must not stay in pyplot's list)."""
    try:
        yield
    except BaseException:
        _pyplot().close(fig)
        raise


def is_number(x) -> bool:
    """A finite real number (not a bool, not None)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---------------------------------------------------------------------------- ESD
def density_generate(eigenvalues, weights, num_bins=10000, sigma_squared=1e-5, overhead=0.01):
    """Per-run SLQ nodes and weights -> ``(density, grids)`` (PyHessian's order); the density
    integrates to 1 on the grid."""
    grids, density = gaussian_density(eigenvalues, weights, num_bins=num_bins,
                                      sigma_squared=sigma_squared, overhead=overhead)
    return density, grids


def esd_figure(eigenvalues, weights, title=None):
    """The original's ESD: density + 1e-7 on a log axis against the eigenvalue."""
    density, grids = density_generate(eigenvalues, weights)
    fig, ax = _pyplot().subplots(figsize=(6, 4.2))
    with _closed_on_error(fig):
        ax.semilogy(grids, density + 1.0e-7)
        ax.set_ylabel("Density (log scale)", fontsize=13)
        ax.set_xlabel("Eigenvalue", fontsize=13)
        ax.set_xlim(grids[0] - 1, grids[-1] + 1)
        ax.set_title(title or "", fontsize=11)
        fig.tight_layout()
    return fig


def get_esd_plot(eigenvalues, weights, path="example.pdf", png_path=None, title=None):
    """Write the ESD (log-scale density vs eigenvalue) to ``path`` and a PNG (``png_path``,
    default: beside it). Returns the paths written; each is written under a temporary name
    and renamed, so an interrupted run never leaves a truncated figure."""
    return _closing(esd_figure(eigenvalues, weights, title),
                    lambda fig: _save_pair(fig, path, png_path))


def esd_overlay_figure(items, labels, title=None):
    """Several ESDs on one log axis, one colour each: ``items`` are ``(density, grids,
    lambda_1 or None)`` (``density_generate``'s curve; lambda_1 dashed), ``labels`` their
    names (the curvatures of one run)."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 4.4))
    with _closed_on_error(fig):
        SpectrumOverlay(title or "eigenvalue spectral densities (dashed: each $\\lambda_1$)"
                        ).draw(ax, items, labels, [f"C{i % 10}" for i in range(len(items))])
        fig.tight_layout()
    return fig


def plot_esd_overlay(items, labels, path, png_path=None, title=None) -> list[str]:
    """Write ``esd_overlay_figure`` to ``path`` and a PNG (``png_path``, default: beside it);
    returns the paths written."""
    return _closing(esd_overlay_figure(items, labels, title),
                    lambda fig: _save_pair(fig, path, png_path))


# ---------------------------------------------------------------------------- convergence
@dataclass
class Series:
    """One line of a convergence panel; ``err`` (same length as ``y``) draws a ± band."""

    label: str
    x: list
    y: list
    err: list | None = None


@dataclass
class Panel:
    """One panel of convergence.png, contributed by an analysis unit."""

    title: str
    xlabel: str
    ylabel: str
    series: list


def convergence_figure(panels):
    """The panels side by side, each estimate against its products (or probes)."""
    if not panels:
        raise ValueError("nothing to plot: no analysis contributed a convergence panel")
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    with _closed_on_error(fig):
        for ax, panel in zip(axes[0], panels):
            for s in panel.series:
                ax.plot(s.x, s.y, marker=".", label=s.label)
                if s.err is not None:
                    ax.fill_between(s.x, [a - b for a, b in zip(s.y, s.err)],
                                    [a + b for a, b in zip(s.y, s.err)], alpha=0.3,
                                    label="± 1 standard error")
            ax.set_xlabel(panel.xlabel)
            ax.set_ylabel(panel.ylabel)
            ax.set_title(panel.title)
            ax.legend(fontsize=8)
        fig.tight_layout()
    return fig


def plot_convergence(panels, path="convergence.png"):
    """Write ``convergence_figure(panels)`` to ``path`` (PNG, atomically); returns ``path``."""
    return _closing(convergence_figure(panels), lambda fig: save_figure(fig, path, dpi=120))


# ---------------------------------------------------------------------------- scales
def _symlog(ax, values, axis: str, lows=()):
    """Put ``axis`` ("x" or "y") of ``ax`` on a symmetric log scale fitted to ``values``.

    Linear within ±linthresh, logarithmic beyond, so zero and negative values keep their place
    and sign. linthresh is the power of ten at or below the smallest nonzero |value| (at most
    six decades below the largest), so every nonzero value lies on the logarithmic part; the
    linear part is wider when the axis also shows negative values (or error bars reaching
    below zero: ``lows``), so that "-10^k", "0" and "10^k" do not collide.
    Returns linthresh, or None when no value is a nonzero number (the axis stays linear)."""
    mags = [abs(v) for v in values if is_number(v) and v != 0]
    if not mags:
        return None
    lin = max(min(mags), max(mags) * 1e-6)
    lin = 10.0 ** math.floor(math.log10(lin))
    both_signs = any(is_number(v) and v < 0 for v in (*values, *lows))
    (ax.set_xscale if axis == "x" else ax.set_yscale)("symlog", linthresh=lin,
                                                      linscale=1.0 if both_signs else 0.4)
    return lin


def _limits(lows, highs, lin):
    """Axis limits covering 0 and [lows, highs], with a margin of half a decade (symlog) or
    5% (linear)."""
    lo, hi = min([0.0, *lows]), max([0.0, *highs])
    if lin is None:
        return (-1.0, 1.0) if lo == hi else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    grow = 10 ** 0.35
    return (lo * grow if lo < 0 else 0.0), (hi * grow if hi > 0 else 0.0)


def _scale_note(lin) -> str:
    if lin is None:
        return "linear scale (every value is 0 or n/a)"
    return f"symmetric log scale (linear within ±{lin:g})"


def _count(n) -> str:
    """12345 -> '12.3k'."""
    if not is_number(n):
        return "?"
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{int(n)}"


# ---------------------------------------------------------------------------- per layer
def per_layer_figure(per_layer, title=None):
    """``results.per_layer`` (dicts with ``name``, ``num_parameters``, ``trace``,
    ``trace_stderr``, ``top_eigenvalue``, ``top_eigenvalue_error_bound`` and optionally
    ``top_eigenvalue_converged``) as two bar panels, one row per group in the given order (top
    to bottom), labelled with its name and number of parameters; left: the trace of the
    group's diagonal block ± 1 standard error; right: the block's top eigenvalue ± its error
    bound (relative in results.json, drawn as bound x |value|).

    Horizontal bars on a *symmetric* log axis (linear within ±linthresh, the power of ten at or
    below the smallest nonzero |value| of the panel): log scale without lying about signs.
    Negative values are red bars left of 0, an exact zero is a "0" at the axis, a missing value
    (null) an "n/a"; a block whose Lanczos did not converge is hatched. The figure's height
    grows with the number of groups (readable from 5 stages to ~40 modules and beyond)."""
    from matplotlib.patches import Patch

    rows = list(per_layer)
    if not rows:
        raise ValueError("nothing to plot: the per-layer list is empty")
    n = len(rows)
    y = list(range(n))
    labels = [f"{r['name']} ({_count(r.get('num_parameters'))})" for r in rows]
    width = 11.0 + 0.05 * max(0, max(len(s) for s in labels) - 24)
    fig, (ax_t, ax_e) = _pyplot().subplots(1, 2, figsize=(width, max(3.2, 0.24 * n + 1.8)),
                                           sharey=True)
    with _closed_on_error(fig):
        eig = [r.get("top_eigenvalue") for r in rows]
        eig_err = [abs(v) * b if is_number(v) and is_number(b) else None
                   for v, b in zip(eig, [r.get("top_eigenvalue_error_bound") for r in rows])]
        unconverged = [r.get("top_eigenvalue_converged") is False for r in rows]
        neg = _bar_panel(ax_t, y, [r.get("trace") for r in rows],
                         [r.get("trace_stderr") for r in rows], [False] * n)
        neg |= _bar_panel(ax_e, y, eig, eig_err, unconverged)
        ax_t.set_title("trace of each diagonal block (± 1 standard error)", fontsize=10)
        ax_e.set_title("top eigenvalue of each diagonal block", fontsize=10)
        ax_t.set_yticks(y, labels, fontsize=9 if n <= 20 else 8)
        ax_t.set_ylim(n - 0.5, -0.5)  # first group on top
        ax_t.tick_params(axis="y", length=0)
        ax_e.tick_params(axis="y", length=0)
        handles = []
        if neg:
            handles.append(Patch(color=_NEGATIVE, label="negative (left of 0)"))
        if any(unconverged):
            handles.append(Patch(facecolor="white", edgecolor=_POSITIVE, hatch="///",
                                 label="block Lanczos not converged"))
        if title:
            fig.suptitle(title, fontsize=11)
        bottom = 0.0
        if handles:
            bottom = 0.45 / fig.get_figheight()
            fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
                       frameon=False)
        fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def plot_per_layer(per_layer, path, title=None):
    """Write ``per_layer_figure`` to ``path`` (PNG, atomically); returns ``path``."""
    return _closing(per_layer_figure(per_layer, title),
                    lambda fig: save_figure(fig, path, dpi=150))


# ---------------------------------------------------------------------------- block spectra
def block_spectra_figure(entry, title=None):
    """``results.block_spectra`` as small multiples, one panel per group in the given order
    (row by row): the group's SLQ density as the JS distance compares it -- eigenvalues divided
    by the block's own spectral radius rho, Gaussians of width ``entry["smoothing"]
    ["bandwidth"]`` of it -- as a density (+1e-7) on a log axis over lambda / rho in about
    [-1, 1]; each panel names the group, its parameters and rho; the title gives the mean
    pairwise JS distance."""
    groups = list(entry["groups"])
    if not groups:
        raise ValueError("nothing to plot: no groups")
    bandwidth = entry.get("smoothing", {}).get("bandwidth", 0.05)
    js = spectral_js_distances([(g["nodes"], g["weights"]) for g in groups], normalise=True,
                               bandwidth=bandwidth, num_bins=801)
    grid, step = js["grid"], js["grid"][1] - js["grid"][0]
    ncols = min(6, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = _pyplot().subplots(nrows, ncols, figsize=(2.3 * ncols, 1.75 * nrows + 0.7),
                                   sharex=True, sharey=True, squeeze=False)
    with _closed_on_error(fig):
        for ax, g, p, rho in zip(axes.flat, groups, js["densities"], js["scales"]):
            ax.semilogy(grid, p / step + 1e-7, lw=1.0)
            ax.set_title(f"{g['name']} ({_count(g.get('num_parameters'))})\nrho {rho:.3g}",
                         fontsize=7)
            ax.tick_params(labelsize=6)
        for i, ax in enumerate(axes.flat):
            if i >= len(groups):
                ax.axis("off")
            elif i + ncols >= len(groups):  # the lowest panel of its column
                ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_xlabel("eigenvalue / rho", fontsize=7)
        value = entry.get("js_distance")
        head = title or "block spectra"
        fig.suptitle(f"{head}: mean pairwise JS distance "
                     f"{value:.3f}" if is_number(value) else f"{head} (one block)", fontsize=10)
        fig.tight_layout()
    return fig


def plot_block_spectra(entry, path, title=None):
    """Write ``block_spectra_figure`` to ``path`` (PNG, atomically); returns ``path``."""
    return _closing(block_spectra_figure(entry, title),
                    lambda fig: save_figure(fig, path, dpi=130))


def _bar_panel(ax, y, values, errors, hatched) -> bool:
    """Horizontal bars of ``values`` (None: n/a) with ``errors`` (absolute, None: none) on a
    symlog axis; returns whether a value is negative."""
    vals = [float(v) if is_number(v) else None for v in values]
    errs = [float(e) if is_number(e) and e > 0 else 0.0 for e in errors]
    lin = _symlog(ax, vals, "x", lows=[v - e for v, e in zip(vals, errs) if v is not None])
    widths = [v if v is not None else 0.0 for v in vals]
    colors = [_NEGATIVE if v is not None and v < 0 else _POSITIVE for v in vals]
    bars = ax.barh(y, widths, height=0.72, color=colors, edgecolor=colors, linewidth=0.5,
                   xerr=errs if any(errs) else None,
                   error_kw={"ecolor": "black", "elinewidth": 0.8, "capsize": 2})
    for bar, hatch in zip(bars, hatched):
        if hatch:
            bar.set_facecolor("white")
            bar.set_hatch("///")
    for yi, v in zip(y, vals):
        if v is None or v == 0:
            ax.text(0, yi, " n/a" if v is None else " 0", va="center", ha="left", fontsize=7,
                    color="0.35", style="italic" if v is None else "normal")
    ax.axvline(0, color="0.3", linewidth=0.8)
    known = [(v, e) for v, e in zip(vals, errs) if v is not None]
    ax.set_xlim(*_limits([v - e for v, e in known], [v + e for v, e in known], lin))
    ax.grid(axis="x", which="major", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_xlabel(_scale_note(lin), fontsize=9)
    return any(v is not None and v < 0 for v in vals)


# ---------------------------------------------------------------------------- landscape
_DIRECTION_COLORS = {"top eigenvector": "C0", "random": "C2", "random (filter-normalized)": "C2",
                     "gradient": "C1"}


def landscape_figure(data):
    """A landscape (the ``results.landscape`` dict of results.json): loss and accuracy against
    the offset for each direction, with the quadratic model L(0) + (g.v1) a + lambda_1 a^2 / 2
    along v1 dashed; 2d: the loss contours over the v1 x v2 plane beside them."""
    has_acc = any(c["accuracy"] is not None for c in data["directions"])
    has_grid = data.get("grid") is not None
    n = 1 + has_acc + has_grid
    fig, axes = _pyplot().subplots(1, n, figsize=(5.2 * n, 4.4), squeeze=False)
    with _closed_on_error(fig):
        axes = list(axes[0])
        if has_grid:
            _landscape_grid(fig, axes.pop(0), data)
        _landscape_loss(axes.pop(0), data)
        if has_acc:
            _landscape_accuracy(axes.pop(0), data)
        fig.tight_layout()
    return fig


def plot_landscape(data, png_path, pdf_path=None):
    """Write ``landscape_figure(data)`` to ``png_path`` (and ``pdf_path``); returns the paths
    written."""
    def save(fig):
        paths = [save_figure(fig, png_path, dpi=130)]
        if pdf_path:
            paths.append(save_figure(fig, pdf_path))
        return paths

    return _closing(landscape_figure(data), save)


def _direction_label(name):
    return {"top eigenvector": "top eigenvector v1",
            "gradient": "gradient (ascent for a > 0)"}.get(name, name)


def _nan_for_none(values) -> list:
    """Values of results.json with null (a non-finite number) as NaN: a gap in a line."""
    return [math.nan if v is None else v for v in values]


def _landscape_loss(ax, data):
    a = data["offsets"]
    finite = [v for c in data["directions"] for v in c["loss"] if is_number(v)]
    lo, hi = min(finite), max(finite)  # the loss at 0 is finite: checked when the run starts
    for c in data["directions"]:
        ax.plot(a, _nan_for_none(c["loss"]), marker=".", color=_DIRECTION_COLORS.get(c["name"]),
                label=_direction_label(c["name"]))
    v1 = data["directions"][0]
    L0, slope, lam = data["loss_at_zero"], v1["slope"], data["lambda_1"]
    fine = [a[0] + (a[-1] - a[0]) * i / 200 for i in range(201)]
    ax.plot(fine, [L0 + slope * x + 0.5 * lam * x * x for x in fine], "--", color="C0",
            alpha=0.6, label=f"quadratic model, lambda_1 = {lam:.4g}")
    pad = 0.06 * (hi - lo) if hi > lo else 0.1 * max(abs(hi), 1e-3)
    ax.set_ylim(lo - pad, hi + pad)  # the quadratic model may run far above the data
    ax.axvline(0.0, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel("offset a along a unit direction")
    ax.set_ylabel("loss")
    c = data["curvature_check"]
    ax.set_title(f"loss at theta + a d\ncurvature check: 2nd difference along v1 = "
                 f"{c['second_difference']:.4g} (h = {c['h']:.1e})", fontsize=10)
    ax.legend(fontsize=8)


def _landscape_accuracy(ax, data):
    a = data["offsets"]
    for c in data["directions"]:
        if c["accuracy"] is not None:
            ax.plot(a, [100 * x for x in c["accuracy"]], marker=".",
                    color=_DIRECTION_COLORS.get(c["name"]), label=_direction_label(c["name"]))
    ax.axvline(0.0, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel("offset a along a unit direction")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"accuracy on the {data['num_samples']} Hessian samples", fontsize=10)
    ax.legend(fontsize=8)


def _landscape_grid(fig, ax, data):
    import numpy as np
    from matplotlib import colors

    a = np.asarray(data["offsets"])
    # rows of the stored grid run along v1 (x); a non-finite loss (null) is left blank
    Z = np.array([_nan_for_none(row) for row in data["grid"]["loss"]], dtype=float).T
    lo, hi = float(np.nanmin(Z)), float(np.nanmax(Z))
    if lo > 0 and hi / lo > 50:  # spans decades: log-spaced levels keep the basin visible
        levels = np.geomspace(lo, hi, 25)
        norm = colors.LogNorm(lo, hi)
    else:
        levels = np.linspace(lo, hi, 25) if hi > lo else 5
        norm = None
    filled = ax.contourf(a, a, Z, levels=levels, norm=norm, cmap="viridis")
    ax.contour(a, a, Z, levels=filled.levels[::3], colors="white", linewidths=0.5, alpha=0.6)
    fig.colorbar(filled, ax=ax, label="loss", format="%.3g")
    ax.plot([0], [0], marker="+", color="red", ms=10, mew=2)
    ax.set_xlabel("offset along v1 (top eigenvector)")
    ax.set_ylabel("offset along v2")
    ax.set_title(f"loss over the v1 x v2 plane\nlambda_1 = {data['lambda_1']:.4g}, "
                 f"lambda_2 = {data['lambda_2']:.4g}", fontsize=10)
    ax.set_aspect("equal")


# ---------------------------------------------------------------------------- training
def curvature_figure(checks: list, epochs: list, momentum: float = 0.0,
                     loss_name: str = "mean cross-entropy"):
    """lambda_1 (and the trace) against epoch with the 2/lr line on a log axis (the
    edge-of-stability picture; with ``momentum`` also heavy-ball SGD's (2 + 2 momentum)/lr,
    Cohen et al. 2021); below, the train/test loss and the learning rate."""
    fig, (top, bottom) = _pyplot().subplots(2, 1, figsize=(7, 7), sharex=True)
    with _closed_on_error(fig):
        _curvature_series(top, checks)
        lr_ep = [e["epoch"] for e in epochs]
        if epochs:
            top.step(lr_ep, [2.0 / e["lr"] for e in epochs], where="post", color="k", ls="--",
                     label="2 / lr")
            if momentum:  # heavy-ball SGD is stable on a quadratic up to (2 + 2 beta) / lr
                top.step(lr_ep, [(2.0 + 2.0 * momentum) / e["lr"] for e in epochs], where="post",
                         color="k", ls=":", label=f"(2 + 2·{momentum:g}) / lr (momentum)")
        top.set_yscale("log")
        top.set_ylabel("curvature")
        top.legend(fontsize=8)
        top.grid(alpha=0.3, which="both")
        if epochs:
            bottom.plot(lr_ep, [e["train_loss"] for e in epochs], label="train loss")
            bottom.plot(lr_ep, [e["test_loss"] for e in epochs], label="test loss")
            lr_axis = bottom.twinx()
            lr_axis.step(lr_ep, [e["lr"] for e in epochs], where="post", color="tab:red",
                         alpha=0.6, label="learning rate")
            lr_axis.set_yscale("log")
            lr_axis.set_ylabel("learning rate", color="tab:red")
            bottom.legend(fontsize=8, loc="upper right")
        bottom.set_xlabel("epoch")
        bottom.set_ylabel(f"loss ({loss_name})")
        bottom.grid(alpha=0.3)
        fig.tight_layout()
    return fig


_CURVATURE_NAMES = {"hessian": "Hessian", "ggn": "GGN", "ef": "empirical Fisher"}


def _curvature_series(ax, checks: list) -> None:
    """lambda_1 (and the trace, ± s.e.) against epoch for each curvature the checks measured
    (records without a "curvature" are the Hessian's), one colour each."""
    groups: dict = {}
    for c in checks:
        groups.setdefault(c.get("curvature", "hessian"), []).append(c)
    for i, (name, cs) in enumerate(groups.items()):
        ep, words = [c["epoch"] for c in cs], _CURVATURE_NAMES.get(name, name)
        ax.errorbar(ep, [c["lambda_1"] for c in cs],
                    yerr=[_finite(c["lambda_1_error_bound"]) for c in cs], marker="o", ms=4,
                    color=f"C{i}", label=rf"$\lambda_1$ (top {words} eigenvalue)")
        if "trace" in cs[0]:
            ax.errorbar(ep, [c["trace"] for c in cs], yerr=[_finite(c["trace_stderr"])
                        for c in cs], marker="s", ms=3, color="0.55" if len(groups) == 1
                        else f"C{i}", ls="-" if len(groups) == 1 else ":",
                        label="trace (± s.e.)" if len(groups) == 1 else f"{words} trace (± s.e.)")


def plot_curvature(checks: list, epochs: list, momentum: float = 0.0,
                   loss_name: str = "mean cross-entropy") -> bytes:
    """``curvature_figure`` as PNG bytes (the caller writes them atomically)."""
    def png(fig):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        return buf.getvalue()

    return _closing(curvature_figure(checks, epochs, momentum, loss_name), png)


def _finite(x):
    return x if is_number(x) else 0.0


# ---------------------------------------------------------------------------- comparison
@dataclass
class SpectrumOverlay:
    """A comparison panel over the eigenvalue axis: each run's ESD (an item ``(density, grids,
    mark)``: ``density_generate``'s curve and an eigenvalue marked dashed, or None), log
    density, labelled in a legend."""

    title: str = "eigenvalue spectral density (dashed: each run's $\\lambda_1$)"
    width = 2.3
    per_run = False

    def draw(self, ax, items, labels, colors):
        lo, hi, top, bottom = math.inf, -math.inf, 0.0, math.inf
        for item, label, c in zip(items, labels, colors):
            if item is None:
                ax.plot([], [], linestyle="none", label=f"{label}: no density (n/a)")
                continue
            density, grid, mark = item
            ax.semilogy(grid, density + 1.0e-7, color=c, linewidth=1.2, label=label)
            lo, hi = min(lo, grid[0]), max(hi, grid[-1])
            top, bottom = max(top, density.max() + 1e-7), min(bottom, density.min() + 1e-7)
            if mark is not None:
                ax.axvline(mark, color=c, linestyle="--", linewidth=0.9, alpha=0.6)
        if math.isfinite(lo):
            pad = 0.03 * (hi - lo)
            ax.set_xlim(lo - pad, hi + pad)
            decades = math.log10(top / bottom)  # headroom: the legend sits above every curve
            ax.set_ylim(bottom / 10 ** (0.05 * decades),
                        top * 10 ** (0.08 * len(items) * decades + 0.1 * decades))
        else:
            ax.text(0.5, 0.5, "no run has a density (n/a)", transform=ax.transAxes,
                    ha="center", va="center", color="0.4")
            ax.set_yscale("log")
        ax.set_xlabel("Eigenvalue")
        ax.set_ylabel("Density (log scale)")
        ax.set_title(self.title, fontsize=10)
        ax.legend(fontsize=8, loc="upper right")


@dataclass
class RunPoints:
    """A comparison panel with one column per run: each run's item is a list of (value, error)
    points (the first filled and labelled, the others open; error bars smaller than the marker
    are left out) or None ("n/a"). All positive: a log axis, else a symmetric log axis. A point
    (value, error, sampling s.e.) also gets the sampling error bar (``--sampling-error``):
    dashed, wide caps, just right of the marker, so the two are told apart."""

    title: str
    marker: str = "o"
    width = 1.0
    per_run = True

    def draw(self, ax, items, labels, colors):
        from matplotlib.transforms import blended_transform_factory

        na = blended_transform_factory(ax.transData, ax.transAxes)
        lows, highs, values = [], [], []
        any_sampled = False
        for i, (pts, c) in enumerate(zip(items, colors)):
            if not pts:
                ax.text(i, 0.5, "n/a", transform=na, ha="center", va="center", color="0.4",
                        style="italic")
                continue
            for j, (v, e, *sampled) in enumerate(pts):
                first = j == 0
                if sampled and sampled[0]:
                    _sampling_bar(ax, i, v, sampled[0], c)
                    e = max(e, sampled[0])  # the axis limits cover both bars
                    any_sampled = True
                visible = e > 2e-3 * abs(v)  # smaller bars would hide inside the marker
                ax.errorbar([i], [v], yerr=[e] if visible else None, color=c, capsize=5,
                            marker=self.marker, markersize=6 if first else 4.5,
                            markerfacecolor=c if first else "white", linestyle="none",
                            zorder=3 if first else 2)
                if first:
                    ax.annotate(f"{v:.4g}", (i, v), xytext=(7, 0), textcoords="offset points",
                                va="center", fontsize=8, color=c)
                lows.append(v - e)
                highs.append(v + e)
                values.append(v)
        if values and min(lows) > 0:  # all positive: a plain log axis
            ax.set_yscale("log")
            ax.set_ylim(min(lows) / 10 ** 0.3, max(highs) * 10 ** 0.3)
            note = "log scale"
        else:  # zero or negative values keep their place and sign
            lin = _symlog(ax, values, "y", lows)
            note = _scale_note(lin)
            if values:
                ax.set_ylim(*_limits(lows, highs, lin))
                ax.axhline(0, color="0.3", linewidth=0.8)
            else:
                ax.set_yticks([])
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_ylabel(note, fontsize=8)
        ax.set_title(self.title, fontsize=10)
        if any_sampled:
            ax.text(0.02, 0.02, "dashed, right: ± sampling s.e.", transform=ax.transAxes,
                    fontsize=7, color="0.3")


def _sampling_bar(ax, i, v, se, color) -> None:
    """The sampling s.e. of a run's point: a dashed bar with wide caps, offset to the right."""
    bar = ax.errorbar([i + 0.12], [v], yerr=[se], color=color, capsize=8, linestyle="none",
                      elinewidth=1.2, alpha=0.8, zorder=1)
    for line in bar[2]:
        line.set_linestyle("--")


def compare_figure(panels, labels, title=None):
    """Several runs in one figure, one colour per run: ``panels`` is a list of (panel, items),
    a ``SpectrumOverlay`` or ``RunPoints`` with one item per run (in the order of ``labels``).
    Panels over the eigenvalue axis come first, then those with a column per run (their ticks
    are the runs' labels, in the runs' colours)."""
    panels = sorted(panels, key=lambda p: p[0].per_run)  # stable: the units' order otherwise
    colors = [f"C{i % 10}" for i in range(len(labels))]
    widths = [p.width for p, _ in panels]
    # 13.5 inches for the ESD (2.3) and two per-run panels (1 each); more panels, wider
    fig = _pyplot().figure(figsize=(13.5 * sum(widths) / 4.3, 5.0))
    grid = fig.add_gridspec(1, len(panels), width_ratios=widths)
    with _closed_on_error(fig):
        long = max(len(s) for s in labels) > 8 or len(labels) > 3
        for i, (panel, items) in enumerate(panels):
            ax = fig.add_subplot(grid[0, i])
            panel.draw(ax, items, labels, colors)
            if panel.per_run:
                ax.set_xticks(range(len(labels)), labels, rotation=35 if long else 0,
                              ha="right" if long else "center", fontsize=8,
                              rotation_mode="anchor" if long else "default")
                for tick, c in zip(ax.get_xticklabels(), colors):
                    tick.set_color(c)
                ax.set_xlim(-0.6, len(labels) - 0.4)
        if title:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
    return fig


def plot_compare(panels, labels, path, png_path=None, title=None) -> list[str]:
    """Write ``compare_figure`` to ``path`` and a PNG beside it (``png_path``); returns the
    paths written."""
    return _closing(compare_figure(panels, labels, title),
                    lambda fig: _save_pair(fig, path, png_path))
