import json
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest

import density_plot
from density_plot import density_generate, get_esd_plot, load_run, main, plot_per_layer, run_labels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def magic(path, n):
    with open(path, "rb") as fh:
        return fh.read(n)


def png_size(path):
    """(width, height) from the PNG header (IHDR)."""
    head = magic(path, 24)
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


# ---------------------------------------------------------------------------- ESD
def test_density_generate_matches_original_grid_rule():
    nodes = [[-1.0, 0.0, 2.0], [-0.5, 0.1, 1.5, 3.0]]  # runs may differ in length
    weights = [[0.2, 0.5, 0.3], [0.1, 0.4, 0.4, 0.1]]
    dens, grid = density_generate(nodes, weights)  # PyHessian's order: (density, grids)
    assert len(grid) == len(dens) == 10000
    assert grid[0] == pytest.approx((-1.0 - 0.5) / 2 - 0.01)
    assert grid[-1] == pytest.approx((2.0 + 3.0) / 2 + 0.01)
    assert (dens.sum() * (grid[1] - grid[0])) == pytest.approx(1.0)


def test_get_esd_plot_writes_pdf_and_png_and_closes_figure(tmp_path):
    before = len(plt.get_fignums())
    out = get_esd_plot([[0.0, 1.0, 5.0]], [[0.5, 0.3, 0.2]], str(tmp_path / "sub" / "esd.pdf"))
    assert out == [str(tmp_path / "sub" / "esd.pdf"), str(tmp_path / "sub" / "esd.png")]
    assert magic(out[0], 5) == b"%PDF-"
    assert magic(out[1], 8) == PNG
    assert len(plt.get_fignums()) == before
    assert not [f for f in os.listdir(tmp_path / "sub") if ".tmp" in f]


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


def test_plot_per_layer_grows_with_the_number_of_groups(tmp_path):
    small = plot_per_layer(layer_rows(5), str(tmp_path / "five.png"))
    large = plot_per_layer(layer_rows(40), str(tmp_path / "forty.png"))
    assert png_size(large)[1] > 3 * png_size(small)[1]  # rows keep their height


def test_plot_per_layer_all_zero_or_missing_and_empty(tmp_path):
    rows = [{"name": "fc", "num_parameters": 650, "trace": 0.0, "trace_stderr": None,
             "trace_per_parameter": 0.0, "top_eigenvalue": None,
             "top_eigenvalue_error_bound": None}]
    assert magic(plot_per_layer(rows, str(tmp_path / "p.png")), 8) == PNG
    with pytest.raises(ValueError, match="empty"):
        plot_per_layer([], str(tmp_path / "q.png"))


def test_symlog_threshold_is_the_decade_below_the_smallest_nonzero_magnitude():
    fig, ax = plt.subplots()
    try:
        assert density_plot._symlog(ax, [-0.4, 0.0, None, 3e-3, 50.0], "x") == 1e-3
        assert ax.get_xscale() == "symlog"
        # at most six decades below the largest value
        assert density_plot._symlog(ax, [1e-12, 10.0], "y") == pytest.approx(1e-5)
        assert density_plot._symlog(ax, [0.0, None], "x") is None
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
