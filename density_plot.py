"""Figures of an analysis: the eigenvalue spectral density (ESD) as the original draws it, the
convergence of the estimates, the per-layer Hessian, and several runs compared.

``density_generate`` smooths SLQ nodes and weights onto a grid (10,000 points, Gaussian of
variance 1e-5 * max(1, range), integrating to 1) and returns ``(density, grids)`` in
PyHessian's order; ``get_esd_plot`` writes the log-scale figure to a PDF (example.pdf by
default) and a PNG beside it; ``plot_convergence`` draws the estimates of a results.json
against the number of Hessian-vector products; ``plot_per_layer`` draws ``results.per_layer``
(per_layer.png); ``plot_compare`` and ``compare_table`` put several runs side by side.

As a script, from the results.json files an analysis wrote (or their folders)::

    python density_plot.py RUN/results.json -o esd.pdf
    python density_plot.py --compare RUN_A/results.json RUN_B/results.json -o compare.pdf \\
        [--labels A B]

The first redraws one run's ESD; the second overlays the runs' ESDs, draws their top
eigenvalues and traces with error bars (compare.pdf and compare.png) and prints a table.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

from pyhessian_dist.density import gaussian_density
from support.errors import UserError

__all__ = ["Run", "compare_table", "density_generate", "get_esd_plot", "load_run", "main",
           "plot_compare", "plot_convergence", "plot_per_layer", "run_labels", "save_figure"]

_POSITIVE, _NEGATIVE = "tab:blue", "tab:red"


def density_generate(eigenvalues, weights, num_bins=10000, sigma_squared=1e-5, overhead=0.01):
    """Per-run SLQ nodes and weights -> ``(density, grids)`` (PyHessian's order); the density
    integrates to 1 on the grid."""
    grids, density = gaussian_density(eigenvalues, weights, num_bins=num_bins,
                                      sigma_squared=sigma_squared, overhead=overhead)
    return density, grids


def get_esd_plot(eigenvalues, weights, path="example.pdf", png_path=None, title=None):
    """Write the ESD (log-scale density vs eigenvalue) to ``path`` and a PNG (``png_path``,
    default: beside it). Returns the paths written; each is written under a temporary name
    and renamed, so an interrupted run never leaves a truncated figure."""
    density, grids = density_generate(eigenvalues, weights)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    try:
        ax.semilogy(grids, density + 1.0e-7)
        ax.set_ylabel("Density (log scale)", fontsize=13)
        ax.set_xlabel("Eigenvalue", fontsize=13)
        ax.set_xlim(grids[0] - 1, grids[-1] + 1)
        ax.set_title(title or "", fontsize=11)
        fig.tight_layout()
        return _save_pair(fig, path, png_path)
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
            x = list(range(1, len(hist) + 1))  # probes (a block of probes shares its products)
            m = [h["values"][0] for h in hist]
            se = [h["errors"][0] or 0.0 for h in hist]  # null (one probe) -> no band
            ax.plot(x, m, marker=".", label="estimate")
            ax.fill_between(x, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)],
                            alpha=0.3, label="± 1 standard error")
            spent = (trace.get("deflation") or {}).get("num_matvecs")
            ax.set_xlabel("probes" + (f" (after {spent} products of deflation)" if spent else ""))
            ax.set_ylabel("trace estimate")
            ax.set_title(f"trace ({trace['method']})")
            ax.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


def _save_pair(fig, path, png_path=None) -> list[str]:
    """Write ``fig`` to ``path`` and, unless ``path`` is one, a 150-dpi PNG beside it (or at
    ``png_path``); return the paths written."""
    png = png_path or os.path.splitext(path)[0] + ".png"
    if os.path.abspath(png) == os.path.abspath(path):
        return [save_figure(fig, path, dpi=150)]
    return [save_figure(fig, path), save_figure(fig, png, dpi=150)]


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


# ---------------------------------------------------------------------------- scales
def _number(x) -> bool:
    """A finite real number (not a bool, not None)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _symlog(ax, values, axis: str, lows=()):
    """Put ``axis`` ("x" or "y") of ``ax`` on a symmetric log scale fitted to ``values``.

    Linear within ±linthresh, logarithmic beyond, so zero and negative values keep their place
    and sign. linthresh is the power of ten at or below the smallest nonzero |value| (at most
    six decades below the largest), so every nonzero value lies on the logarithmic part; the
    linear part is wider when the axis also shows negative values (or error bars reaching
    below zero: ``lows``), so that "-10^k", "0" and "10^k" do not collide.
    Returns linthresh, or None when no value is a nonzero number (the axis stays linear)."""
    mags = [abs(v) for v in values if _number(v) and v != 0]
    if not mags:
        return None
    lin = max(min(mags), max(mags) * 1e-6)
    lin = 10.0 ** math.floor(math.log10(lin))
    both_signs = any(_number(v) and v < 0 for v in (*values, *lows))
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
    if not _number(n):
        return "?"
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{int(n)}"


# ---------------------------------------------------------------------------- per layer
def plot_per_layer(per_layer, path, title=None):
    """Draw ``results.per_layer`` (a list of dicts with ``name``, ``num_parameters``,
    ``trace``, ``trace_stderr``, ``top_eigenvalue``, ``top_eigenvalue_error_bound`` and
    optionally ``top_eigenvalue_converged``) to ``path`` (PNG, written atomically); returns
    ``path``.

    One row per group, in the given order (top to bottom), labelled with its name and number
    of parameters; left: the trace of the group's diagonal block with ± 1 standard error;
    right: the block's top eigenvalue with its error bound (relative in results.json, drawn
    as ± bound x |value|; Lanczos bounds are usually far smaller than the bar ends).

    Scale: horizontal bars on a *symmetric* log axis (matplotlib's symlog), linear within
    ±linthresh where linthresh is the power of ten at or below the smallest nonzero |value|
    of the panel. Log scale without lying about signs: negative values are red bars to the
    left of 0, an exact zero is a "0" at the axis, a missing value (null) an "n/a"; a block
    whose Lanczos did not converge is hatched. The figure's height grows with the number of
    groups (readable from 5 stages to ~40 modules and beyond)."""
    rows = list(per_layer)
    if not rows:
        raise ValueError("nothing to plot: the per-layer list is empty")
    n = len(rows)
    y = np.arange(n)
    labels = [f"{r['name']} ({_count(r.get('num_parameters'))})" for r in rows]
    width = 11.0 + 0.05 * max(0, max(len(s) for s in labels) - 24)
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(width, max(3.2, 0.24 * n + 1.8)),
                                     sharey=True)
    try:
        traces = [r.get("trace") for r in rows]
        se = [r.get("trace_stderr") for r in rows]
        eig = [r.get("top_eigenvalue") for r in rows]
        eig_err = [abs(v) * b if _number(v) and _number(b) else None
                   for v, b in zip(eig, [r.get("top_eigenvalue_error_bound") for r in rows])]
        unconverged = [r.get("top_eigenvalue_converged") is False for r in rows]
        neg = _bar_panel(ax_t, y, traces, se, [False] * n)
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
        return save_figure(fig, path, dpi=150)
    finally:
        plt.close(fig)


def _bar_panel(ax, y, values, errors, hatched) -> bool:
    """Horizontal bars of ``values`` (None: n/a) with ``errors`` (absolute, None: none) on a
    symlog axis; returns whether a value is negative."""
    vals = [float(v) if _number(v) else None for v in values]
    errs = [float(e) if _number(e) and e > 0 else 0.0 for e in errors]
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


# ---------------------------------------------------------------------------- runs
@dataclass
class Run:
    """What the comparison needs from one results.json; None where the run has no data."""

    path: str
    record: dict
    model_label: str | None
    model: str
    eigenvalues: list | None
    eigen_bounds: list | None          # relative, one per eigenvalue (None entries allowed)
    eigen_method: str | None
    eigen_converged: bool | None
    trace: float | None
    stderr: float | None
    trace_converged: bool | None
    nodes: list | None
    weights: list | None
    num_samples: int | None
    products: int | None

    @property
    def where(self) -> str:
        """The run's folder name (its --output-dir)."""
        return os.path.basename(os.path.dirname(os.path.abspath(self.path))) or self.path


def load_run(path) -> Run:
    """Read a results.json (or the folder holding one); UserError if it is missing, not JSON
    or not a pyhessian-dist results.json."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; pass the results.json an analysis wrote "
                        "(in its --output-dir)")
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" (line {exc.lineno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) \
            else ""
        raise UserError(f"{path} is not JSON{where}; pass the results.json an analysis "
                        "wrote") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("results"), dict):
        raise UserError(f"{path} is not a pyhessian-dist results.json (no \"results\" "
                        "entry); pass the results.json an analysis wrote")
    try:
        return _summarize(path, record)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} has a malformed entry ({type(exc).__name__}: {exc}); pass "
                        "a results.json written by example_pyhessian_analysis.py") from None


def _summarize(path, record) -> Run:
    results = record["results"]
    eig, tr, dens = results.get("eigenvalue"), results.get("trace"), results.get("density")
    eigenvalues = bounds = method = eig_conv = None
    if eig:
        eigenvalues = [float(v) if _number(v) else None for v in eig["eigenvalues"]]
        raw = eig.get("error_bounds") or []
        bounds = [float(b) if _number(b) else None for b in raw]
        bounds += [None] * (len(eigenvalues) - len(bounds))
        method, eig_conv = eig.get("method"), eig.get("converged")
        if not eigenvalues:
            eigenvalues = None
    trace = stderr = tr_conv = None
    if tr:
        trace = float(tr["trace"]) if _number(tr.get("trace")) else None
        stderr = float(tr["stderr"]) if _number(tr.get("stderr")) else None
        tr_conv = tr.get("converged")
    nodes = weights = None
    if dens:
        nodes, weights = dens["nodes"], dens["weights"]
        gaussian_density(nodes, weights, num_bins=2)  # ValueError on a malformed entry
    data, model = record.get("data") or {}, record.get("model") or {}
    operator, costs = record.get("operator") or {}, record.get("costs") or {}
    products = operator.get("num_matvecs")
    if not _number(products) and costs:
        products = sum(c.get("num_matvecs", 0) for c in costs.values())
    label = _model_label(record)
    desc = [label or "model ?"]
    if _number(model.get("num_parameters")):
        desc.append(f"{int(model['num_parameters']):,} params")
    if data.get("dataset"):
        desc.append(str(data["dataset"]))
    samples = data.get("num_samples")
    return Run(path=path, record=record, model_label=label, model=", ".join(desc),
               eigenvalues=eigenvalues, eigen_bounds=bounds, eigen_method=method,
               eigen_converged=eig_conv, trace=trace, stderr=stderr, trace_converged=tr_conv,
               nodes=nodes, weights=weights,
               num_samples=int(samples) if _number(samples) else None,
               products=int(products) if _number(products) else None)


def _model_label(record) -> str | None:
    """"ResNet20 BN", "ResNet20 no-BN", "ResNet20 BN no-residual"; a --model run: the
    callable of its module:callable ("resnet18"); None when the record does not say."""
    arch = (record.get("model") or {}).get("arch")
    if isinstance(arch, dict) and arch.get("name") == "resnet" and arch.get("depth"):
        parts = [f"ResNet{arch['depth']}"]
        if arch.get("batch_norm") is not None:
            parts.append("BN" if arch["batch_norm"] else "no-BN")
        if arch.get("residual") is False:
            parts.append("no-residual")
        return " ".join(parts)
    name = None
    if isinstance(arch, dict):  # a --model checkpoint: {"name": "custom", "spec": "m:f"}
        name = arch.get("spec") if arch.get("name") == "custom" else arch.get("name")
    name = name or (record.get("config") or {}).get("model")
    return str(name).rsplit(":", 1)[-1] if name else None


def run_labels(runs, labels=None) -> list[str]:
    """The runs' labels: ``labels`` as given, else each run's model ("ResNet20 BN"), with the
    folder name added where two runs would share a label (then the path, then a number)."""
    if labels is not None:
        if len(labels) != len(runs):
            raise UserError(f"--labels gives {len(labels)} label(s) for {len(runs)} results "
                            "file(s); pass one label per file")
        return [str(s) for s in labels]
    out = [r.model_label or r.where for r in runs]
    steps = [lambda r, s: f"{s} ({r.where})" if r.model_label else s,
             lambda r, s: f"{r.model_label or 'run'} ({os.path.relpath(r.path)})"]
    for step in steps:
        dup = {s for s, c in Counter(out).items() if c > 1}
        out = [step(r, s) if s in dup else s for r, s in zip(runs, out)]
    seen: Counter = Counter()
    dup = {s for s, c in Counter(out).items() if c > 1}
    for i, s in enumerate(out):
        if s in dup:
            seen[s] += 1
            out[i] = f"{s} #{seen[s]}"
    return out


# ---------------------------------------------------------------------------- table
def _fmt_lambda(run: Run) -> str:
    if not run.eigenvalues or run.eigenvalues[0] is None:
        return "n/a"
    lam, bound = run.eigenvalues[0], run.eigen_bounds[0]
    text = f"{lam:.6g}"
    if bound is not None:
        if run.eigen_method == "power":
            text += f" (rel. residual {bound:.1e})"
        else:
            text += f" ± {abs(lam) * bound:.2g}"
    return text + ("" if run.eigen_converged is not False else " *")


def _fmt_trace(run: Run) -> str:
    if run.trace is None:
        return "n/a"
    text = f"{run.trace:.6g}"
    if run.stderr is not None:
        rel = f" ({100 * run.stderr / abs(run.trace):.1f}%)" if run.trace else ""
        text += f" ± {run.stderr:.3g}{rel}"
    return text + ("" if run.trace_converged is not False else " *")


def compare_table(runs, labels) -> list[str]:
    """One line per run: label, model, lambda_1 (± absolute error bound), trace ± standard
    error (relative %), Hessian samples, Hessian-vector products; "n/a" where a run lacks it."""
    head = ("run", "model", "lambda_1 (± bound)", "trace ± s.e. (rel.)", "samples", "products")
    rows = [(label, r.model, _fmt_lambda(r), _fmt_trace(r),
             "n/a" if r.num_samples is None else f"{r.num_samples:,}",
             "n/a" if r.products is None else f"{r.products:,}")
            for label, r in zip(labels, runs)]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    right = (False, False, False, False, True, True)

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w)
                         for c, w, r in zip(cells, widths, right)).rstrip()

    lines = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
    if any("*" in row[2] or "*" in row[3] for row in rows):
        lines.append("* not converged (the budget ran out first)")
    return lines


# ---------------------------------------------------------------------------- figure
def plot_compare(runs, labels, path, png_path=None, title=None) -> list[str]:
    """Several runs in one figure: their ESDs overlaid (log density), their top eigenvalues
    (lambda_1 filled, the others open; error bars: relative bound x |value|, mostly smaller
    than the marker) and their traces (± 1 standard error) on symmetric log axes, one colour
    per run; "n/a" where a run lacks the analysis. Writes ``path`` and a PNG beside it
    (``png_path``); returns the paths written."""
    colors = [f"C{i % 10}" for i in range(len(runs))]
    fig = plt.figure(figsize=(13.5, 5.0))
    grid = fig.add_gridspec(1, 3, width_ratios=(2.3, 1, 1))
    ax_d, ax_e, ax_t = (fig.add_subplot(grid[0, i]) for i in range(3))
    try:
        _compare_esd(ax_d, runs, labels, colors)
        _compare_points(ax_e, runs, colors, "eigen")
        _compare_points(ax_t, runs, colors, "trace")
        ax_e.set_title(r"top eigenvalues (filled: $\lambda_1$, open: $\lambda_2, \ldots$)",
                       fontsize=10)
        ax_t.set_title("trace (± 1 standard error)", fontsize=10)
        long = max(len(s) for s in labels) > 8 or len(runs) > 3
        for ax in (ax_e, ax_t):
            ax.set_xticks(range(len(runs)), labels, rotation=35 if long else 0,
                          ha="right" if long else "center", fontsize=8,
                          rotation_mode="anchor" if long else "default")
            for tick, c in zip(ax.get_xticklabels(), colors):
                tick.set_color(c)
            ax.set_xlim(-0.6, len(runs) - 0.4)
        if title:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        return _save_pair(fig, path, png_path)
    finally:
        plt.close(fig)


def _compare_esd(ax, runs, labels, colors):
    lo, hi, top, bottom = math.inf, -math.inf, 0.0, math.inf
    for run, label, c in zip(runs, labels, colors):
        if run.nodes is None:
            ax.plot([], [], linestyle="none", label=f"{label}: no density (n/a)")
            continue
        density, grid = density_generate(run.nodes, run.weights)
        ax.semilogy(grid, density + 1.0e-7, color=c, linewidth=1.2, label=label)
        lo, hi = min(lo, grid[0]), max(hi, grid[-1])
        top, bottom = max(top, density.max() + 1e-7), min(bottom, density.min() + 1e-7)
        if run.eigenvalues and run.eigenvalues[0] is not None:
            ax.axvline(run.eigenvalues[0], color=c, linestyle="--", linewidth=0.9, alpha=0.6)
    if math.isfinite(lo):
        pad = 0.03 * (hi - lo)
        ax.set_xlim(lo - pad, hi + pad)
        decades = math.log10(top / bottom)  # headroom: the legend sits above every curve
        ax.set_ylim(bottom / 10 ** (0.05 * decades), top * 10 ** (0.08 * len(runs) * decades
                                                                   + 0.1 * decades))
    else:
        ax.text(0.5, 0.5, "no run has a density (n/a)", transform=ax.transAxes,
                ha="center", va="center", color="0.4")
        ax.set_yscale("log")
    ax.set_xlabel("Eigenvalue")
    ax.set_ylabel("Density (log scale)")
    ax.set_title("eigenvalue spectral density (dashed: each run's $\\lambda_1$)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")


def _compare_points(ax, runs, colors, what):
    """Top eigenvalues or the trace of each run at x = its index, with error bars."""
    na = blended_transform_factory(ax.transData, ax.transAxes)
    lows, highs, values = [], [], []
    for i, (run, c) in enumerate(zip(runs, colors)):
        if what == "eigen":
            pts = [(v, abs(v) * b if b is not None else 0.0)
                   for v, b in zip(run.eigenvalues or [], run.eigen_bounds or [])
                   if v is not None]
        else:
            pts = [] if run.trace is None else [(run.trace, run.stderr or 0.0)]
        if not pts:
            ax.text(i, 0.5, "n/a", transform=na, ha="center", va="center", color="0.4",
                    style="italic")
            continue
        for j, (v, e) in enumerate(pts):
            first = j == 0
            visible = e > 2e-3 * abs(v)  # smaller bars would hide inside the marker
            ax.errorbar([i], [v], yerr=[e] if visible else None, color=c, capsize=5,
                        marker="o" if what == "eigen" else "s",
                        markersize=6 if first else 4.5,
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


# ---------------------------------------------------------------------------- script
def _parser():
    import argparse

    from support.cli import ArgumentParser, HelpFormatter

    class Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Flag help as the other scripts; description and examples as written."""

    p = ArgumentParser(
        prog="density_plot.py", formatter_class=Formatter,
        description="Redraw the ESD of one analysis run, or compare several runs: overlaid\n"
                    "ESDs, top eigenvalues and traces with error bars, and a table.",
        epilog="examples:\n"
               "  python density_plot.py RUN/results.json -o esd.pdf\n"
               "  python density_plot.py --compare A/results.json B/results.json \\\n"
               "      -o compare.pdf --labels 'with BN' 'without BN'")
    p.add_argument("results", nargs="*", metavar="RESULTS_JSON",
                   help="results.json written by example_pyhessian_analysis.py (or its "
                        "--output-dir)")
    p.add_argument("--compare", action="store_true",
                   help="compare the runs in one figure (a PNG beside it) and print a table")
    p.add_argument("-o", "--output", default=None,
                   help="the figure to write (.pdf, .png, .svg, ...; a PNG is written beside "
                        "it); default esd.pdf, or compare.pdf with --compare")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="one label per results file (default: from each run's model, e.g. "
                        "'ResNet20 BN', with the folder name where two would be the same)")
    p.add_argument("--title", default=None, help="a title for the figure")
    return p


def _check_output(path):
    from matplotlib.backend_bases import FigureCanvasBase

    ext = os.path.splitext(path)[1].lstrip(".").lower()
    kinds = FigureCanvasBase.get_supported_filetypes()
    if ext not in kinds:
        raise UserError(f"-o {path}: the name must end in a figure format such as .pdf, .png "
                        "or .svg")
    if os.path.isdir(path):
        raise UserError(f"-o {path} is a folder; pass a file name such as {path}/compare.pdf")


def _draw(args):
    if not args.results:
        raise UserError("no results.json given; pass RUN/results.json to redraw its ESD, or "
                        "two or more with --compare")
    if len(args.results) > 1 and not args.compare:
        raise UserError(f"{len(args.results)} results files given without --compare; pass "
                        "--compare to compare them, or one file to redraw its ESD")
    output = args.output or ("compare.pdf" if args.compare else "esd.pdf")
    _check_output(output)
    runs = [load_run(p) for p in args.results]
    labels = run_labels(runs, args.labels)
    try:
        if args.compare:
            for line in compare_table(runs, labels):
                print(line)
            written = plot_compare(runs, labels, output, title=args.title)
        else:
            run = runs[0]
            if run.nodes is None:
                raise UserError(f"{run.path} holds no density (results.density); run the "
                                "analysis with --density, or use --compare to draw what it "
                                "holds")
            written = get_esd_plot(run.nodes, run.weights, output, title=args.title or labels[0])
    except OSError as exc:
        raise UserError(f"cannot write {output} ({exc.strerror or exc}); pass -o in a folder "
                        "you can write to") from None
    print("wrote " + ", ".join(written))


def main(argv=None) -> int:
    """The script: parse ``argv``, draw, print; returns the exit status (2: a user error,
    with one ``error:`` line on stderr)."""
    from support.launch import run_main

    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a one-line argparse error (2)
        return exc.code if isinstance(exc.code, int) else 2
    return run_main(lambda: _draw(args), what="drawing")


if __name__ == "__main__":
    sys.exit(main())
