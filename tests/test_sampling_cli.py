"""--sampling-error in the analysis units (in-process, tiny float64 model) and the script: the
printed lines, the results.json keys, --compare's error bars, and bad input."""
import json

import pytest
import torch
from test_analysis_units import run_units
from torch import nn

from analyses import by_name
from test_analysis import run
from tiny import analysis_args, make

CE = nn.CrossEntropyLoss()


def sampled_ctx(*flags):
    model, x, y = make("cnn")
    batches = [(x[i:i + 3], y[i:i + 3]) for i in range(0, 23, 3)]   # 8 mini-batches
    args = analysis_args(*flags, sampling_error=4, hessian_batch_size=23)
    return run_units(args, model, batches)


def test_units_report_and_record_the_sampling_error():
    ctx = sampled_ctx("--eigenvalue", "--top-n", "2", "--bottom-n", "1", "--per-layer",
                      "--diagonal", "--trace-method", "deflated", "--trace-deflate", "5",
                      "--trace-rse", "0.2", "--max-iter", "60", "--tol", "1e-8")
    out = {}
    for name in ("eigenvalue", "bottom", "trace", "per_layer", "diagonal"):
        unit, result = by_name(name), ctx.results[name]
        out[name] = unit.to_json(result, ctx)
        lines = unit.summary(result, ctx)
        assert json.dumps(out[name])   # strict JSON
        if name in ("eigenvalue", "bottom"):
            assert len(out[name]["sampling_stderr"]) == len(out[name]["sampling_bias"]) \
                == len(result.eigenvalues)
            assert sum("sampling s.e., bias" in line and "jackknife over 4 groups" in line
                       for line in lines) == len(result.eigenvalues)
    assert out["trace"]["sampling_stderr"] > 0
    assert out["trace"]["sampling_total_stderr"] >= out["trace"]["sampling_stderr"]
    assert out["trace"]["sampling"]["num_matvecs"] == 5     # the deflated space's group parts
    assert any("probe s.e. ±" in line for line in by_name("trace").summary(
        ctx.results["trace"], ctx))
    assert all(r["trace_sampling_stderr"] > 0 for r in out["per_layer"])
    assert out["diagonal"]["sampling_stderr_mean"] > 0
    assert all("mean_sampling_stderr" in r for r in out["diagonal"]["per_group"])
    # --compare: the sampling s.e. rides along as the third element of each point, drawn as a
    # second, dashed error bar
    from support.figures import compare_figure

    panels = []
    for name in ("eigenvalue", "trace"):
        item = by_name(name).compare_item(out[name], out)
        assert all(len(point) == 3 for point in item)
        panels.append((by_name(name).compare_panel, [item]))
    fig = compare_figure(panels, ["run"])
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert notes.count("dashed, right: ± sampling s.e.") == 2
    cells = by_name("trace").compare_cells(out["trace"])
    assert "sampling" in cells[0]


def test_advice_when_the_sampling_error_dominates():
    ctx = sampled_ctx("--eigenvalue", "--max-iter", "60", "--tol", "1e-10")
    lines = by_name("eigenvalue").summary(ctx.results["eigenvalue"], ctx)
    assert any(line.strip().startswith("note: the sampling error is") and
               "--hessian-batch-size 92 would halve it" in line for line in lines), lines


@pytest.mark.parametrize("args, message", [
    (["--eigenvalue", "--sampling-error", "1"], "needs at least 2 groups"),
    (["--eigenvalue", "--hessian-batch-size", "40", "--mini-hessian-batch-size", "10",
      "--sampling-error", "5"],
     "pass --sampling-error 4 or less, or --mini-hessian-batch-size 8 or less"),
    (["--eigenvalue", "--sampling-error", "10"], "pass --mini-hessian-batch-size 20 or less"),
    (["--density", "--sampling-error", "3"], "--sampling-error applies to --eigenvalue"),
    (["--trace", "--trace-method", "hutchpp", "--mini-hessian-batch-size", "20",
      "--sampling-error", "3"], "not hutchpp"),
])
def test_bad_input_one_error_line(checkpoint, args, message):
    proc = run(["--resume", checkpoint, "--no-cuda", *args], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow
def test_script_end_to_end_on_two_ranks(checkpoint, tmp_path):
    proc = run(["--resume", checkpoint, "--output-dir", str(tmp_path), "--no-cuda",
                "--hessian-batch-size", "40", "--mini-hessian-batch-size", "5",
                "--device_count", "2", "--port", "0", "--eigenvalue", "--trace",
                "--trace-method", "hutchinson", "--trace-rse", "0.3", "--max-iter", "20",
                "--sampling-error", "4", "--curvature", "hessian,ggn"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sampling s.e., bias") == 2, proc.stdout
    record = json.loads((tmp_path / "results.json").read_text())
    for curvature in ("hessian", "ggn"):
        r = record["results"][curvature]
        assert len(r["eigenvalue"]["sampling_stderr"]) == 1
        assert r["eigenvalue"]["sampling"]["num_groups"] == 4
        assert r["trace"]["sampling_stderr"] > 0
    assert torch.isfinite(torch.tensor(record["results"]["hessian"]["eigenvalue"]
                                       ["sampling_bias"])).all()


@pytest.mark.slow
def test_validation_benchmark_runs_small(checkpoint, tmp_path):
    import subprocess
    import sys

    from test_analysis import ROOT

    out = tmp_path / "sampling.json"
    proc = subprocess.run([sys.executable, "-m", "bench.bench_sampling", "--checkpoint",
                           checkpoint, "--dataset", "synthetic", "--draws", "3", "--samples",
                           "12", "--mini-batch", "3", "--groups", "4", "--large", "24",
                           "--probes", "2", "--threads", "1", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert len(record["draws"]) == 3 and record["summary"]["draws"] == 3
    assert record["summary"]["lambda_1_spread_ratio"] > 0
    assert "bias_ratio" in record["summary"] and "| bias_ratio |" in proc.stdout
