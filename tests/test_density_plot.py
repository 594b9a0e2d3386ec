import json
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

from density_plot import (
    compare_panels,
    density_generate,
    get_esd_plot,
    load_run,
    load_runs,
    main,
    run_labels,
)
from support import figures
from support.figures import compare_figure, esd_figure, per_layer_figure, plot_per_layer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def magic(path, n):
    with open(path, "rb") as fh:
        return fh.read(n)


@pytest.fixture
def drawn():
    """Figures built by a test, closed afterwards; asserts none was left open."""
    before = plt.get_fignums()
    made = []
    yield made.append
    for fig in made:
        plt.close(fig)
    assert plt.get_fignums() == before


# ---------------------------------------------------------------------------- ESD
def test_density_generate_matches_original_grid_rule():
    nodes = [[-1.0, 0.0, 2.0], [-0.5, 0.1, 1.5, 3.0]]  # runs may differ in length
    weights = [[0.2, 0.5, 0.3], [0.1, 0.4, 0.4, 0.1]]
    dens, grid = density_generate(nodes, weights)  # PyHessian's order: (density, grids)
    assert len(grid) == len(dens) == 10000
    assert grid[0] == pytest.approx((-1.0 - 0.5) / 2 - 0.01)
    assert grid[-1] == pytest.approx((2.0 + 3.0) / 2 + 0.01)
    assert (dens.sum() * (grid[1] - grid[0])) == pytest.approx(1.0)


def test_esd_figure_draws_the_log_density_on_the_original_grid(drawn):
    nodes, weights = [[0.0, 1.0, 5.0]], [[0.5, 0.3, 0.2]]
    fig = esd_figure(nodes, weights, title="a run")
    drawn(fig)
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    x, y = line.get_xdata(), line.get_ydata()
    density, grids = density_generate(nodes, weights)
    assert len(x) == 10000 and np.array_equal(x, grids)
    np.testing.assert_array_equal(y, density + 1e-7)  # the original's floor for the log
    assert np.sum(y - 1e-7) * (x[1] - x[0]) == pytest.approx(1.0)
    assert x[0] == pytest.approx(-0.01) and x[-1] == pytest.approx(5.01)
    # three Gaussians: the peaks sit at the nodes, in the order of their weights
    peaks = [y[np.argmin(abs(x - n))] for n in nodes[0]]
    assert peaks[0] > peaks[1] > peaks[2] > 1e3 * y.min()
    assert ax.get_yscale() == "log"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Eigenvalue", "Density (log scale)")
    assert ax.get_xlim() == pytest.approx((grids[0] - 1, grids[-1] + 1))
    assert ax.get_title() == "a run"


def test_get_esd_plot_writes_pdf_and_png_and_closes_figure(tmp_path):
    before = len(plt.get_fignums())
    out = get_esd_plot([[0.0, 1.0, 5.0]], [[0.5, 0.3, 0.2]], str(tmp_path / "sub" / "esd.pdf"))
    assert out == [str(tmp_path / "sub" / "esd.pdf"), str(tmp_path / "sub" / "esd.png")]
    assert magic(out[0], 5) == b"%PDF-"
    assert magic(out[1], 8) == PNG
    assert len(plt.get_fignums()) == before
    assert not [f for f in os.listdir(tmp_path / "sub") if ".tmp" in f]


# ---------------------------------------------------------------------------- convergence
def test_convergence_figure_draws_each_panel_with_its_bands(drawn):
    panels = [figures.Panel("top eigenvalues (lanczos)", "Hessian-vector products",
                            "eigenvalue estimate",
                            [figures.Series("lambda_1", [1, 2, 3], [4.0, 5.0, 5.5]),
                             figures.Series("lambda_2", [2, 3], [1.0, 2.0])]),
              figures.Panel("trace (deflated hutchinson)", "probes", "trace estimate",
                            [figures.Series("estimate", [1, 2], [10.0, 12.0], err=[0.0, 1.5])])]
    fig = figures.convergence_figure(panels)
    drawn(fig)
    eig, tr = fig.axes
    assert [ln.get_label() for ln in eig.get_lines()] == ["lambda_1", "lambda_2"]
    assert list(eig.get_lines()[1].get_xydata().ravel()) == [2, 1.0, 3, 2.0]
    assert (eig.get_title(), eig.get_xlabel()) == ("top eigenvalues (lanczos)",
                                                 "Hessian-vector products")
    (band,) = tr.collections  # ± 1 standard error around the estimate
    assert band.get_label() == "± 1 standard error"
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(10.0) and ys.max() == pytest.approx(13.5)
    assert tr.get_ylabel() == "trace estimate"
    with pytest.raises(ValueError, match="no analysis contributed"):
        figures.convergence_figure([])


# ---------------------------------------------------------------------------- per layer
def layer_rows(n):
    rows = []
    for i in range(n):
        t = 10.0 ** (i % 7 - 3)  # seven decades
        rows.append({"name": f"layer{i // 6}.{i % 6}.conv{i % 2 + 1}", "parameters": ["w"],
                     "num_parameters": 9 * 16 * 16 * (i + 1), "trace": t,
                     "trace_stderr": 0.1 * t, "trace_per_parameter": t / (2304 * (i + 1)),
                     "top_eigenvalue": 0.3 * t, "top_eigenvalue_error_bound": 1e-3,
                     "top_eigenvalue_converged": True, "num_matvecs": 12})
    rows[0].update(trace=-0.5, trace_stderr=None)             # negative, no standard error
    rows[1].update(top_eigenvalue=0.0)                       # exactly zero
    rows[2].update(top_eigenvalue=None, top_eigenvalue_error_bound=None)  # missing
    rows[3].update(top_eigenvalue=-2.0, top_eigenvalue_converged=False)
    return rows


@pytest.mark.parametrize("n", [5, 40])
def test_plot_per_layer_writes_png_with_zero_negative_and_missing_values(tmp_path, n):
    before = plt.get_fignums()
    path = str(tmp_path / "out" / "per_layer.png")
    assert plot_per_layer(layer_rows(n), path) == path
    assert magic(path, 8) == PNG
    assert plt.get_fignums() == before
    assert os.listdir(tmp_path / "out") == ["per_layer.png"]  # no temporary file left


def _bars(ax):
    return [p for p in ax.patches if p.get_height() == pytest.approx(0.72)]


def test_per_layer_figure_draws_the_rows_values(drawn):
    rows = layer_rows(5)
    fig = per_layer_figure(rows, title="ResNet8")
    drawn(fig)
    ax_t, ax_e = fig.axes
    assert [t.get_text() for t in ax_t.get_yticklabels()] == [
        "layer0.0.conv1 (2.3k)", "layer0.1.conv2 (4.61k)", "layer0.2.conv1 (6.91k)",
        "layer0.3.conv2 (9.22k)", "layer0.4.conv1 (11.5k)"]
    assert ax_t.get_ylim() == (4.5, -0.5)  # the first group on top
    traces, eigs = _bars(ax_t), _bars(ax_e)
    assert [b.get_width() for b in traces] == pytest.approx([r["trace"] for r in rows])
    # the top eigenvalues: 0 and a missing value are drawn as zero-width bars with a note
    assert [b.get_width() for b in eigs] == pytest.approx([3e-4, 0.0, 0.0, -2.0, 3e-1 * 10])
    red = plt.matplotlib.colors.to_rgba("tab:red")
    assert traces[0].get_facecolor() == red and traces[1].get_facecolor() != red
    assert eigs[3].get_hatch() == "///"  # not converged
    assert sorted(t.get_text() for t in ax_e.texts) == [" 0", " n/a"]
    assert ax_t.get_xscale() == ax_e.get_xscale() == "symlog"
    # linthresh: the decade at or below the smallest nonzero |trace| (1e-2 x 0.1)
    assert ax_t.get_xlabel() == "symmetric log scale (linear within ±0.01)"
    assert fig.texts[0].get_text() == "ResNet8"  # the suptitle
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["negative (left of 0)", "block Lanczos not converged"]


def test_plot_per_layer_grows_with_the_number_of_groups(drawn):
    small, large = per_layer_figure(layer_rows(5)), per_layer_figure(layer_rows(40))
    drawn(small)
    drawn(large)
    assert large.get_figheight() > 3 * small.get_figheight()  # rows keep their height
    assert len(_bars(large.axes[0])) == 40


def test_plot_per_layer_all_zero_or_missing_and_empty(tmp_path, drawn):
    rows = [{"name": "fc", "num_parameters": 650, "trace": 0.0, "trace_stderr": None,
             "trace_per_parameter": 0.0, "top_eigenvalue": None,
             "top_eigenvalue_error_bound": None}]
    fig = per_layer_figure(rows)
    drawn(fig)
    for ax, note in zip(fig.axes, (" 0", " n/a")):
        assert ax.get_xscale() == "linear" and [t.get_text() for t in ax.texts] == [note]
        assert ax.get_xlabel() == "linear scale (every value is 0 or n/a)"
    assert magic(plot_per_layer(rows, str(tmp_path / "p.png")), 8) == PNG
    with pytest.raises(ValueError, match="empty"):
        plot_per_layer([], str(tmp_path / "q.png"))


def test_symlog_threshold_is_the_decade_below_the_smallest_nonzero_magnitude():
    fig, ax = plt.subplots()
    try:
        assert figures._symlog(ax, [-0.4, 0.0, None, 3e-3, 50.0], "x") == 1e-3
        assert ax.get_xscale() == "symlog"
        # at most six decades below the largest value
        assert figures._symlog(ax, [1e-12, 10.0], "y") == pytest.approx(1e-5)
        assert figures._symlog(ax, [0.0, None], "x") is None
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------- comparison
def record(depth=20, batch_norm=True, residual=True, eig=None, bounds=None, trace=None,
           stderr=None, density=True, samples=40, products=144):
    """A small results.json as example_pyhessian_analysis.py writes it."""
    results = {}
    if eig is not None:
        results["eigenvalue"] = {
            "method": "lanczos", "which": "LA", "eigenvalues": eig, "residuals": bounds,
            "error_bounds": bounds, "num_matvecs": 8, "converged": True,
            "history": [{"matvecs": 8, "values": eig, "errors": bounds,
                         "error_kind": "eigenvalue error bound", "label": "",
                         "max_matvecs": 100}]}
    if trace is not None:
        results["trace"] = {
            "method": "deflated", "trace": trace, "stderr": stderr,
            "relative_stderr": None if stderr is None else stderr / abs(trace),
            "num_probes": 10, "samples": [trace] * 10, "num_matvecs": 126, "converged": True,
            "stopping_rule": "relative standard error <= 0.02", "deflation": None,
            "history": []}
    if density:
        results["density"] = {
            "method": "slq", "nodes": [[-1.0, 0.0, 3.0, 20.0]],
            "weights": [[0.01, 0.95, 0.03, 0.01]], "num_steps": 4, "num_runs": 1,
            "num_matvecs": 4, "history": []}
    return {
        "config": {"resume": "net.pkl", "eigenvalue": eig is not None}, "launch": "single process",
        "world_size": 1, "backend": None, "device": {"type": "cpu"},
        "versions": {"pyhessian_dist": "0"},
        "model": {"arch": {"name": "resnet", "depth": depth, "batch_norm": batch_norm,
                           "residual": residual, "num_classes": 10},
                  "num_parameters": 272474, "num_trainable": 272474, "checkpoint": {}},
        "data": {"dataset": "cifar10", "num_samples": samples},
        "loss": 0.5, "gradient_norm": 0.1,
        "operator": {"num_matvecs": products}, "results": results,
        "costs": {}, "seconds_total": 1.0}


def write_run(tmp_path, folder, rec):
    path = tmp_path / folder / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return str(path)


def table_row(out, label):
    rows = [line for line in out.splitlines() if line.startswith(label + "  ")]
    assert len(rows) == 1, out
    return rows[0]


@pytest.fixture
def two_runs(tmp_path):
    a = write_run(tmp_path, "run_a", record(eig=[176.6507, 95.12], bounds=[8.3e-11, 1.3e-4],
                                            trace=453.866, stderr=9.04, products=144))
    b = write_run(tmp_path, "run_b", record(batch_norm=False, eig=[2.68525, 2.1],
                                            bounds=[1.4e-6, 2e-3], trace=7.13246,
                                            stderr=0.675, samples=80, products=1280))
    return a, b


def test_compare_writes_pdf_png_and_prints_the_table(tmp_path, two_runs, capsys):
    before = plt.get_fignums()
    out = str(tmp_path / "figs" / "compare.pdf")
    assert main(["--compare", *two_runs, "-o", out]) == 0
    assert magic(out, 5) == b"%PDF-"
    assert magic(str(tmp_path / "figs" / "compare.png"), 8) == PNG
    assert plt.get_fignums() == before
    text = capsys.readouterr().out
    bn = table_row(text, "ResNet20 BN")
    assert "ResNet20 BN, 272,474 params, cifar10" in bn
    assert "176.651 ± 1.5e-08" in bn                 # lambda_1 ± |lambda_1| x relative bound
    assert "453.866 ± 9.04 (2.0%)" in bn             # trace ± stderr (relative)
    assert bn.split()[-2:] == ["40", "144"]          # samples, products
    nobn = table_row(text, "ResNet20 no-BN")
    assert "2.68525 ± 3.8e-06" in nobn
    assert "7.13246 ± 0.675 (9.5%)" in nobn
    assert nobn.split()[-2:] == ["80", "1,280"]
    assert text.splitlines()[0].split()[:2] == ["run", "model"]
    assert f"wrote {out}, {out[:-4]}.png" in text


def test_compare_figure_shows_each_runs_esd_eigenvalues_and_trace(two_runs, drawn):
    runs = [load_run(p) for p in two_runs]
    labels = run_labels(runs)
    fig = compare_figure(compare_panels(runs), labels)
    drawn(fig)
    esd, eig, tr = fig.axes  # the ESD overlay first, then the units' per-run panels
    curves = [ln for ln in esd.get_lines() if ln.get_linestyle() == "-"]
    assert [ln.get_label() for ln in curves] == labels == ["ResNet20 BN", "ResNet20 no-BN"]
    density, grids = density_generate([[-1.0, 0.0, 3.0, 20.0]], [[0.01, 0.95, 0.03, 0.01]])
    for ln in curves:
        np.testing.assert_array_equal(ln.get_xdata(), grids)
        np.testing.assert_array_equal(ln.get_ydata(), density + 1e-7)
    marks = [ln.get_xdata()[0] for ln in esd.get_lines() if ln.get_linestyle() == "--"]
    assert marks == [176.6507, 2.68525]  # each run's lambda_1, dashed
    assert esd.get_yscale() == "log" and esd.get_xlabel() == "Eigenvalue"
    points = [(c.lines[0].get_xdata()[0], c.lines[0].get_ydata()[0], c.has_yerr)
              for c in eig.containers]
    # error bars of at most 0.2% of the value would hide inside the marker: none drawn
    assert points == [(0, 176.6507, False), (0, 95.12, False), (1, 2.68525, False),
                      (1, 2.1, False)]
    filled = [c.lines[0].get_markerfacecolor() for c in eig.containers]
    assert filled[1] == filled[3] == "white" != filled[0]  # lambda_1 filled, others open
    (bar_a, bar_b) = [c.lines[2][0].get_segments()[0][:, 1] for c in tr.containers]
    assert list(bar_a) == pytest.approx([453.866 - 9.04, 453.866 + 9.04])
    assert list(bar_b) == pytest.approx([7.13246 - 0.675, 7.13246 + 0.675])
    for ax in (eig, tr):
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
        assert ax.get_yscale() == "log" and ax.get_ylabel() == "log scale"
    assert tr.get_title() == "trace (± 1 standard error)"
    assert eig.get_title().startswith("top eigenvalues")


def test_compare_labels_from_the_flag(tmp_path, two_runs, capsys):
    out = str(tmp_path / "c.pdf")
    assert main(["--compare", *two_runs, "-o", out, "--labels", "with BN", "without"]) == 0
    text = capsys.readouterr().out
    assert "176.651" in table_row(text, "with BN")
    assert "7.13246" in table_row(text, "without")
    assert "ResNet20 BN  " not in text  # the model's label is not used as the run's


def test_duplicate_labels_get_the_folder_name(tmp_path, capsys):
    a = write_run(tmp_path, "seed1", record(eig=[10.0], bounds=[1e-3], trace=50.0, stderr=1.0))
    b = write_run(tmp_path, "seed2", record(eig=[12.0], bounds=[1e-3], trace=60.0, stderr=1.0))
    c = write_run(tmp_path, "other", record(batch_norm=False, eig=[3.0], bounds=[1e-3]))
    assert main(["--compare", a, b, c, "-o", str(tmp_path / "c.pdf")]) == 0
    text = capsys.readouterr().out
    assert "10 ± 0.01" in table_row(text, "ResNet20 BN (seed1)")
    assert "12 ± 0.012" in table_row(text, "ResNet20 BN (seed2)")
    assert "3 ± 0.003" in table_row(text, "ResNet20 no-BN")  # unique: no folder added


def test_run_labels_fall_back_to_the_path_then_a_number(tmp_path):
    rec = record(eig=[1.0], bounds=[0.0])
    a = load_run(write_run(tmp_path, "x/run", rec))
    b = load_run(write_run(tmp_path, "y/run", rec))
    labels = run_labels([a, b])
    assert labels[0] != labels[1] and all(s.startswith("ResNet20 BN (") for s in labels)
    assert os.path.join("x", "run", "results.json") in labels[0]
    assert run_labels([a, a]) == [f"{labels[0]} #1", f"{labels[0]} #2"]
    rec["model"]["arch"].update(residual=False)
    rec["model"]["arch"].update(depth=56)
    assert run_labels([load_run(write_run(tmp_path, "z", rec))]) == ["ResNet56 BN no-residual"]
    rec["model"]["arch"] = {"name": "custom", "spec": "torchvision.models:resnet18",
                            "num_classes": 10}
    assert run_labels([load_run(write_run(tmp_path, "tv", rec))]) == ["resnet18"]
    del rec["model"]
    assert run_labels([load_run(write_run(tmp_path, "plain", rec))]) == ["plain"]


def test_runs_without_some_analyses_are_marked_na(tmp_path, capsys):
    eig_only = write_run(tmp_path, "eig", record(eig=[5.0], bounds=[None], density=False))
    trace_only = write_run(tmp_path, "tr", record(batch_norm=False, trace=-3.0, stderr=5.0,
                                                  density=False))
    out = str(tmp_path / "c.pdf")
    assert main(["--compare", eig_only, trace_only, "-o", out]) == 0
    text = capsys.readouterr().out
    eig_row = table_row(text, "ResNet20 BN")
    assert " 5 " in eig_row and "n/a" in eig_row.split("5", 1)[1]
    tr_row = table_row(text, "ResNet20 no-BN")
    assert tr_row.split("cifar10", 1)[1].split()[0] == "n/a"
    assert "-3 ± 5 (166.7%)" in tr_row
    assert magic(str(tmp_path / "c.png"), 8) == PNG
    runs = [load_run(eig_only), load_run(trace_only)]
    fig = compare_figure(compare_panels(runs), run_labels(runs))
    plt.close(fig)
    esd, eig, tr = fig.axes
    assert [t.get_text() for t in esd.texts] == ["no run has a density (n/a)"]
    def notes(ax):  # "n/a" at a run's column; each value annotated beside its point
        return sorted((t.get_text(), t.xy[0] if hasattr(t, "xy") else t.get_position()[0])
                      for t in ax.texts)

    assert notes(eig) == [("5", 0), ("n/a", 1)]
    assert notes(tr) == [("-3", 1), ("n/a", 0)]
    assert tr.get_yscale() == "symlog"  # a negative trace keeps its sign


def test_one_run_redraws_its_esd(tmp_path, two_runs, capsys):
    out = str(tmp_path / "esd.pdf")
    assert main([os.path.dirname(two_runs[0]), "-o", out]) == 0  # a run's folder works too
    assert magic(out, 5) == b"%PDF-"
    assert magic(str(tmp_path / "esd.png"), 8) == PNG
    assert capsys.readouterr().out.strip() == f"wrote {out}, {out[:-4]}.png"


@pytest.mark.parametrize("case, argv_tail, message", [
    ("missing", ["{tmp}/nowhere/results.json"], "does not exist"),
    ("not-json", ["{tmp}/bad.json"], "is not JSON (line 1"),
    ("binary", ["{tmp}/bin.json"], "is not JSON"),
    ("no-results", ["{tmp}/other.json"], "is not a pyhessian-dist results.json"),
    ("a-list", ["{tmp}/list.json"], "is not a pyhessian-dist results.json"),
    ("malformed", ["{tmp}/malformed.json"], "malformed entry"),
    ("no-files", [], "no results.json given"),
    ("labels", ["{a}", "{b}", "--labels", "one"], "1 label(s) for 2 results file(s)"),
    ("no-compare", ["{a}", "{b}"], "without --compare"),
    ("extension", ["{a}", "-o", "{tmp}/figure"], "must end in a figure format"),
    ("no-density", ["{tmp}/nodens/results.json"], "holds no density"),
    ("argparse", ["{a}", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_input_gives_one_error_line_and_exit_2(tmp_path, two_runs, capsys, case,
                                                   argv_tail, message):
    (tmp_path / "bad.json").write_text("not json {")
    (tmp_path / "bin.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (tmp_path / "other.json").write_text(json.dumps({"config": {}}))
    (tmp_path / "list.json").write_text("[1, 2]")
    bad = record(eig=[1.0], bounds=[0.0])
    bad["results"]["density"]["weights"] = [[1.0]]  # one weight for four nodes
    (tmp_path / "malformed.json").write_text(json.dumps(bad))
    write_run(tmp_path, "nodens", record(eig=[1.0], bounds=[0.0], density=False))
    compare = ["--compare"] if case in ("missing", "not-json", "binary", "no-results",
                                        "a-list", "malformed", "labels") else []
    argv = compare + [s.format(tmp=tmp_path, a=two_runs[0], b=two_runs[1]) for s in argv_tail]
    if case in ("extension",):
        argv = ["--compare", *argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.slow
def test_script_exit_status_and_import_without_side_effects(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "density_plot.py"),
                          str(tmp_path / "missing.json")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.json'} does not exist; pass the results.json an "
        "analysis wrote (in its --output-dir)"]
    quiet = subprocess.run([sys.executable, "-c", "import density_plot"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    assert os.listdir(tmp_path) == []


def curvatures_record(names=("hessian", "ggn")):
    """A results.json of several curvatures: ``results``, ``costs`` and ``operator`` map each
    curvature to what one curvature's run holds."""
    runs = {"hessian": record(eig=[176.6507, 95.12], bounds=[8.3e-11, 1.3e-4], trace=453.866,
                              stderr=9.04, products=144),
            "ggn": record(eig=[170.25, 90.5], bounds=[1e-9, 1e-4], trace=440.5, stderr=8.5,
                          products=120),
            "ef": record(eig=[300.0], bounds=[1e-9], trace=600.0, stderr=10.0, products=30)}
    rec = dict(runs["hessian"])
    rec["curvatures"] = list(names)
    for key in ("results", "operator", "costs"):
        rec[key] = {n: runs[n][key] for n in names}
    return rec


def test_a_file_of_several_curvatures_gives_one_run_each_labelled_by_curvature(tmp_path,
                                                                               capsys):
    multi = write_run(tmp_path, "both", curvatures_record())
    one = write_run(tmp_path, "ef", {**record(eig=[300.0], bounds=[1e-9], trace=600.0,
                                              stderr=10.0), "curvatures": ["ef"]})
    runs = load_runs(multi)
    assert [r.curvature for r in runs] == ["hessian", "ggn"]
    assert [r.products for r in runs] == [144, 120]
    assert load_run(one).curvature == "ef"
    with pytest.raises(Exception, match="holds 2 curvatures"):
        load_run(multi)
    assert main(["--compare", multi, one, "-o", str(tmp_path / "c.pdf")]) == 0
    text = capsys.readouterr().out
    assert "176.651" in table_row(text, "ResNet20 BN (hessian)")
    assert "170.25" in table_row(text, "ResNet20 BN (ggn)")
    assert "600 ± 10" in table_row(text, "ResNet20 BN (ef)")
    # runs of the Hessian alone keep their labels (no curvature added)
    assert run_labels([load_run(write_run(tmp_path, "h", record(eig=[1.0])))]) == \
        ["ResNet20 BN"]


def test_redrawing_a_file_of_several_curvatures_overlays_their_esds(tmp_path, capsys, drawn):
    multi = write_run(tmp_path, "both", curvatures_record())
    out = str(tmp_path / "esd.pdf")
    assert main([multi, "-o", out]) == 0
    assert os.path.getsize(out) > 0 and magic(out[:-4] + ".png", 8) == PNG
    runs = load_runs(multi)
    fig = figures.esd_overlay_figure([r.items["density"] for r in runs], ["hessian", "ggn"])
    drawn(fig)
    (ax,) = fig.axes
    curves = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    assert [ln.get_label() for ln in curves] == ["hessian", "ggn"]
    assert [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"] == \
        [176.6507, 170.25]
    assert ax.get_yscale() == "log"
    bad = {**curvatures_record(), "results": {"hessian": {}, "ggn": [1, 2]}}
    assert main(["--compare", write_run(tmp_path, "bad", bad), "-o",
                 str(tmp_path / "b.pdf")]) == 2
    assert "malformed" in capsys.readouterr().err


def test_side_by_side_lines_and_tagged_files():
    from analyses import REGISTRY
    from support.outputs import tagged_name
    from support.report import output_files, side_by_side

    rec = curvatures_record(("hessian", "ggn", "ef"))
    for name in rec["curvatures"]:
        rec["costs"][name] = {"eigenvalue": {"num_matvecs": 8, "seconds": 1.5},
                              "trace": {"num_matvecs": 20, "seconds": 2.0}}
    rec["results"]["ggn"]["density"]["spectral_mass"] = {"negative": 0.0}
    rec["results"]["hessian"]["density"]["spectral_mass"] = {"negative": 0.0125}
    lines = side_by_side(rec)
    assert lines[1].split()[:3] == ["curvature", "top", "eigenvalues"]
    assert "[176.65, 95.12]" in lines[2] and "453.866 ± 9.04" in lines[2]
    assert lines[2].split()[-3] == "1.25%" and lines[3].split()[-3] == "0.00%"
    assert lines[3].split()[0] == "ggn" and "440.5 ± 8.5" in lines[3]
    assert lines[4].split()[-2:] == ["28", "3.5"]  # products and seconds of what ran
    assert tagged_name("per_layer.png", "ggn") == "per_layer.ggn.png"
    files, single = output_files(REGISTRY, ("hessian", "ggn")), output_files(REGISTRY)
    assert files[:len(single)] == single
    assert len(files) == len(single) + 2 * (len(single) - 1)  # all but results.json, tagged
    assert "example.ggn.pdf" in files and "convergence.hessian.png" in files
    assert "results.hessian.json" not in files
