"""Adding an analysis is one module and one registry line: a toy unit defined here (its flag
and option, a result, a summary line, a results.json entry, a figure file, a convergence
panel, a --compare column and panel) runs end to end in the analysis script, in this process,
on the test checkpoint, once registered with one line."""
import json
import os
import shutil

import matplotlib.pyplot as plt
import pytest
import torch

import density_plot
import example_pyhessian_analysis as script
from analyses import REGISTRY, Analysis
from support.figures import Panel, RunPoints, Series, compare_figure, plot_convergence


class Rayleigh(Analysis):
    """v'Hv of one random unit vector v: one Hessian-vector product."""

    name = "rayleigh"
    flag = "--rayleigh"
    help = "the Rayleigh quotient v'Hv of a random unit vector (a toy analysis)"
    files = ("rayleigh.png",)
    compare_columns = ("v'Hv",)
    compare_panel = RunPoints("Rayleigh quotient", marker="D")

    def add_options(self, p):
        p.add_argument("--rayleigh-scale", type=float, default=1.0,
                       help="multiplies the quotient")

    def run(self, ctx):
        op = ctx.op
        v = torch.randn(op.dim, generator=ctx.generator(self), dtype=torch.float64)
        v = (v / v.norm()).to(op.device, op.dtype)
        return {"quotient": ctx.args.rayleigh_scale * torch.dot(v, op.matvec(v)).item()}

    def summary(self, r, ctx):
        return [f"***Rayleigh: v'Hv = {r['quotient']:.6g} ({ctx.cost_line(self)})"]

    def to_json(self, r, ctx):
        return dict(r)

    def write(self, r, ctx, outputs):
        outputs.write("rayleigh.png", lambda path: plot_convergence([self.convergence(r)], path))

    def convergence(self, entry):
        return Panel("Rayleigh quotient", "Hessian-vector products", "v'Hv",
                     [Series("v'Hv", [1], [entry["quotient"]])])

    def compare_cells(self, entry):
        return (f"{entry['quotient']:.4g}",)

    def compare_item(self, entry, results):
        return [(entry["quotient"], 0.0)]


@pytest.fixture
def registered():
    REGISTRY.append(Rayleigh())  # the one registry line
    try:
        yield
    finally:
        REGISTRY.pop()


def test_flag_run_summary_json_figure_and_stale_file(registered, checkpoint, tmp_path, capsys,
                                                     single_thread):
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--rayleigh the Rayleigh quotient v'Hv" in text
    assert "--rayleigh-scale RAYLEIGH_SCALE multiplies the quotient (default: 1.0)" in text

    out = tmp_path / "run"
    argv = ["--resume", checkpoint, "--no-cuda", "--device_count", "1", "--hessian-batch-size",
            "20", "--mini-hessian-batch-size", "20", "--output-dir", str(out)]
    assert script.main([*argv, "--rayleigh", "--rayleigh-scale", "2"]) == 0
    text = capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    quotient = record["results"]["rayleigh"]["quotient"]
    assert list(record["results"]) == ["rayleigh"] and record["config"]["rayleigh_scale"] == 2
    assert record["costs"]["rayleigh"]["num_matvecs"] == 1
    assert f"***Rayleigh: v'Hv = {quotient:.6g} (1 HVPs, " in text
    # its figure and the convergence figure of its panel, committed with results.json
    assert sorted(os.listdir(out)) == ["convergence.png", "rayleigh.png", "results.json"]
    assert f"wrote {out / 'results.json'}, {out / 'rayleigh.png'}, {out / 'convergence.png'}" \
        in text
    assert (out / "rayleigh.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copytree(out, tmp_path / "first")

    # a later run without it replaces the folder's files and removes its stale figure
    assert script.main([*argv, "--eigenvalue", "--max-iter", "4"]) == 0
    text = capsys.readouterr().out
    assert f"output: {out} (at the end this run's files replace the earlier run's " \
           "results.json, rayleigh.png, convergence.png)" in text
    assert "removed rayleigh.png of an earlier run" in text
    assert sorted(os.listdir(out)) == ["convergence.png", "results.json"]

    # --compare: its column in the table and its panel in the figure, "n/a" where it did not run
    assert density_plot.main(["--compare", str(tmp_path / "first"), str(out), "-o",
                              str(tmp_path / "compare.pdf"), "--labels", "toy", "eig"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-3:] == ["v'Hv", "samples", "products"]
    assert lines[2].split()[-3:] == [f"{quotient:.4g}", "20", "1"]  # toy: 1 product in all
    assert lines[3].startswith("eig ") and lines[3].split()[-3] == "n/a"
    runs = [density_plot.load_run(p) for p in (tmp_path / "first", out)]
    fig = compare_figure(density_plot.compare_panels(runs), ["toy", "eig"])
    plt.close(fig)
    toy = [ax for ax in fig.axes if ax.get_title() == "Rayleigh quotient"]
    assert len(fig.axes) == 4 and len(toy) == 1
    (point,) = toy[0].containers
    assert point.lines[0].get_ydata()[0] == quotient
    assert [t.get_text() for t in toy[0].texts if t.get_text() == "n/a"] == ["n/a"]
