"""The original's ESD figure, and several runs compared.

``density_generate`` smooths SLQ nodes and weights onto a grid (10,000 points, Gaussian of
variance 1e-5 * max(1, range), integrating to 1) and returns ``(density, grids)`` in
PyHessian's order; ``get_esd_plot`` writes the log-scale figure to a PDF (example.pdf by
default) and a PNG beside it. Both, like every figure, live in ``support/figures.py``.

As a script, from the results.json files an analysis wrote (or their folders)::

    python density_plot.py RUN/results.json -o esd.pdf
    python density_plot.py --compare RUN_A/results.json RUN_B/results.json -o compare.pdf \\
        [--labels A B]

The first redraws one run's ESD; the second prints a table and draws one figure (compare.pdf
and compare.png) of what the analysis units contribute from each run's results.json (their
``compare_columns`` / ``compare_cells`` and ``compare_panel`` / ``compare_item``): from the
built-in units, the lambda_1 and trace columns, and the overlaid ESDs, the top eigenvalues and
the traces with error bars. A results.json of several curvatures (``--curvature
hessian,ggn``) contributes one run per curvature; when the runs are not all of the Hessian,
each label says its curvature ("ResNet20 BN (ggn)"). Redrawing such a file overlays its ESDs.
"""
from __future__ import annotations

if __name__ == "__main__":  # a cancel while importing: one line, not a traceback
    from support.cancel import exit_on_cancel_while_starting

    exit_on_cancel_while_starting()

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass

from analyses import REGISTRY
from support.errors import UserError
from support.figures import (
    density_generate,
    get_esd_plot,
    is_number,
    plot_compare,
    plot_esd_overlay,
)

__all__ = ["Run", "compare_panels", "compare_table", "density_generate", "get_esd_plot",
           "load_run", "load_runs", "main", "run_labels"]


# ---------------------------------------------------------------------------- runs
@dataclass
class Run:
    """What the comparison shows of one results.json: the run, and per analysis unit its
    table cells (``cells``) and its panel data (``items``; None where the run lacks it)."""

    path: str
    record: dict
    model_label: str | None
    model: str
    num_samples: int | None
    products: int | None
    cells: dict
    items: dict
    curvature: str = "hessian"

    @property
    def where(self) -> str:
        """The run's folder name (its --output-dir)."""
        return os.path.basename(os.path.dirname(os.path.abspath(self.path))) or self.path


def load_run(path) -> Run:
    """The run of a results.json of one curvature (``load_runs``; UserError for several)."""
    runs = load_runs(path)
    if len(runs) > 1:
        raise UserError(f"{runs[0].path} holds {len(runs)} curvatures "
                        f"({', '.join(r.curvature for r in runs)}); read it with load_runs")
    return runs[0]


def load_runs(path) -> list[Run]:
    """The runs of a results.json (or the folder holding one): one, or one per curvature of a
    run of several; UserError if it is missing, not JSON or not a pyhessian-dist
    results.json."""
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
        names = record.get("curvatures") or ["hessian"]
        if len(names) == 1:
            return [_summarize(path, record, names[0])]
        return [_summarize(path, _curvature_view(record, name), name) for name in names]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path} has a malformed entry ({type(exc).__name__}: {exc}); pass "
                        "a results.json written by example_pyhessian_analysis.py") from None


def _curvature_view(record, name) -> dict:
    """One curvature's record of a run of several: its results, costs and operator."""
    results = record["results"][name]
    if not isinstance(results, dict):
        raise TypeError(f"results.{name} is a {type(results).__name__}, not a dict")
    return {**record, "results": results,
            "operator": (record.get("operator") or {}).get(name) or {},
            "costs": (record.get("costs") or {}).get(name) or {}}


def _summarize(path, record, curvature) -> Run:
    results = record["results"]
    cells, items = {}, {}
    for a in REGISTRY:
        entry = results.get(a.name)
        if a.compare_columns:
            cells[a.name] = tuple(a.compare_cells(entry)) if entry else \
                ("n/a",) * len(a.compare_columns)
        if a.compare_panel is not None:
            items[a.name] = a.compare_item(entry, results) if entry else None
    data, model = record.get("data") or {}, record.get("model") or {}
    operator, costs = record.get("operator") or {}, record.get("costs") or {}
    products = operator.get("num_matvecs")
    if not is_number(products) and costs:
        products = sum(c.get("num_matvecs", 0) for c in costs.values())
    label = _model_label(record)
    desc = [label or "model ?"]
    if is_number(model.get("num_parameters")):
        desc.append(f"{int(model['num_parameters']):,} params")
    if data.get("dataset"):
        desc.append(str(data["dataset"]))
    samples = data.get("num_samples")
    return Run(path=path, record=record, model_label=label, model=", ".join(desc),
               num_samples=int(samples) if is_number(samples) else None,
               products=int(products) if is_number(products) else None,
               cells=cells, items=items, curvature=str(curvature))


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
    """The runs' labels: ``labels`` as given, else each run's model ("ResNet20 BN") followed by
    its curvature ("ResNet20 BN (ggn)") unless every run is of the Hessian, with the folder
    name added where two runs would share a label (then the path, then a number)."""
    if labels is not None:
        if len(labels) != len(runs):
            files = len({r.path for r in runs})
            what = f"{len(runs)} results file(s)" if files == len(runs) else (
                f"{len(runs)} runs ({files} results file(s); a file of several curvatures "
                "gives one run per curvature)")
            raise UserError(f"--labels gives {len(labels)} label(s) for {what}; pass one "
                            "label per run")
        return [str(s) for s in labels]
    by_curvature = any(r.curvature != "hessian" for r in runs)
    out = [(r.model_label or r.where) + (f" ({r.curvature})" if by_curvature else "")
           for r in runs]
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
def compare_table(runs, labels) -> list[str]:
    """One line per run: label, model, the analysis units' columns (lambda_1 ± absolute error
    bound, trace ± standard error (relative %), ...), Hessian samples, Hessian-vector products;
    "n/a" where a run lacks it; "*" marks an estimate that did not converge."""
    units = [a for a in REGISTRY if a.compare_columns]
    head = ("run", "model", *[c for a in units for c in a.compare_columns], "samples",
            "products")
    rows = [(label, r.model, *[c for a in units for c in r.cells[a.name]],
             "n/a" if r.num_samples is None else f"{r.num_samples:,}",
             "n/a" if r.products is None else f"{r.products:,}")
            for label, r in zip(labels, runs)]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    right = [False] * (len(head) - 2) + [True, True]

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w)
                         for c, w, r in zip(cells, widths, right)).rstrip()

    lines = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
    if any(cell.endswith(" *") for row in rows for cell in row[2:-2]):
        lines.append("* not converged (the budget ran out first)")
    return lines


def compare_panels(runs) -> list:
    """(panel, one item per run) of every analysis unit with a ``compare_panel``, for
    ``support.figures.plot_compare``."""
    return [(a.compare_panel, [r.items[a.name] for r in runs]) for a in REGISTRY
            if a.compare_panel is not None]


def _redraw(runs, labels, output, title) -> list[str]:
    """One results file's ESD (its curvatures' ESDs overlaid when it holds several)."""
    lacking = [r for r in runs if not r.record["results"].get("density")]
    if lacking:
        raise UserError(f"{lacking[0].path} holds no density (results.density); run the "
                        "analysis with --density, or use --compare to draw what it holds")
    if len(runs) == 1:
        density = runs[0].record["results"]["density"]
        return get_esd_plot(density["nodes"], density["weights"], output,
                            title=title or labels[0])
    items = [r.items["density"] for r in runs]
    return plot_esd_overlay(items, [r.curvature for r in runs], output, title=title)


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
    runs = [run for p in args.results for run in load_runs(p)]
    labels = run_labels(runs, args.labels)
    try:
        if args.compare:
            for line in compare_table(runs, labels):
                print(line)
            written = plot_compare(compare_panels(runs), labels, output, title=args.title)
        else:
            written = _redraw(runs, labels, output, args.title)
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
    from support.cancel import ignore_cancels_from_now

    status = main()
    ignore_cancels_from_now()  # the run is over: Python's shutdown is not cancelled
    sys.exit(status)
