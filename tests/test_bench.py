"""Smoke tests of the benchmarks: each entry point runs end to end on a ResNet8 with a handful of
samples and writes a JSON record with the expected keys (the numbers themselves are measured by
the full runs, not here). The peer parts are skipped when the bench-only peers are absent."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--samples", "16", "--mini-batch", "8", "--threads", "1", "--reference-steps", "12",
        "--trace-reference", "10"]


def run_module(module, *args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_hvp_every_section(checkpoint, tmp_path):
    out, png = tmp_path / "hvp.json", tmp_path / "hvp.png"
    stdout = run_module(
        "bench.bench_hvp", "--checkpoint", checkpoint, *TINY, "--repeats", "1", "--block", "2",
        "--power-max-iter", "5", "--trace-max", "12", "--density-steps", "3",
        "--memory-sizes", "16", "--memory-library-sizes", "24", "--memory-library-steps", "2",
        "--threads-samples", "16",
        "--sections", "products,threads,conv,eigen,trace,slq,scaling,memory",
        "--out", str(out), "--plot", str(png))
    rec = json.loads(out.read_text())
    assert rec["sections_failed"] == []
    assert rec["sections_done"] == ["products", "threads", "conv", "eigen", "trace", "slq",
                                    "scaling", "memory"]
    assert rec["problem"]["model"] == "ResNet8" and rec["problem"]["samples"] == 16
    p = rec["products"]
    assert {"gradient", "double_backward+reuse", "double_backward", "forward_over_reverse",
            "library_overhead"} <= set(p)
    assert p["double_backward+reuse"]["block2"]["vectors_per_s"] > 0
    assert p["library_overhead"]["relative_difference"] < 1e-4
    for key in ("omp_wait_policy_default", "omp_wait_policy_passive"):
        assert rec["threads"][key]["hvp_1"] > 0 and rec["threads"][key]["gradient_1"] > 0
    c = rec["conv"]
    assert set(c) == {"torch", "fused", "fused+channels_last"}
    assert c["torch"]["relative_difference"] == 0 and c["torch"]["speedup"] == 1
    assert max(c[k]["relative_difference"] for k in c) < 1e-4
    e = rec["eigen"]
    assert len(e["reference_top5"]) == 5
    assert e["top1"]["lanczos"]["rel_error"] < 1e-2
    assert {"lanczos", "power"} <= set(e["top5"])
    t = rec["trace"]
    assert {"reference", "hutchinson", "deflated", "hutchinson_pyhessian_rule",
            "hutchpp_equal_cost", "targets"} <= set(t)
    assert t["deflated"]["deflation"]["dimension"] >= 1
    assert rec["slq"]["matvecs"] == 3
    assert rec["scaling"]["throughput_ratio"] > 0
    assert len(rec["scaling"]["world_2"]["ranks"]) == 2
    m = rec["memory"]
    assert m["script"][0]["returncode"] == 0 and m["library"][0]["returncode"] == 0
    for row in m["script"] + m["library"]:
        assert row["peak_rss_mib"] > 50
        assert row["resident_line"].startswith("HVP:")
    assert png.exists()
    assert "trace, deflated" in stdout


def test_bench_hvp_reference_from_resume_and_sections(checkpoint, tmp_path):
    """--reference-from reuses the references of an earlier record of the same problem,
    --resume continues a record; a record of another problem is refused."""
    first = tmp_path / "a.json"
    run_module("bench.bench_hvp", "--checkpoint", checkpoint, *TINY, "--sections", "slq",
               "--density-steps", "2", "--out", str(first))
    rec = json.loads(first.read_text())
    assert rec["sections_done"] == ["slq"] and "reference" not in rec
    # give it references to reuse
    rec["reference"] = {"eigen": {"top5": [3.0, 2.0, 1.0, 0.5, 0.25]},
                        "trace": {"trace": 10.0, "stderr": 1.0, "per_probe_sd": 3.0}}
    first.write_text(json.dumps(rec))
    second = tmp_path / "b.json"
    run_module("bench.bench_hvp", "--checkpoint", checkpoint, *TINY, "--sections", "eigen",
               "--skip-power-top5", "--reference-from", str(first), "--out", str(second))
    rec2 = json.loads(second.read_text())
    assert rec2["eigen"]["reference_top5"] == [3.0, 2.0, 1.0, 0.5, 0.25]
    # --resume continues the first record: slq is kept (not rerun), eigen is added
    run_module("bench.bench_hvp", "--checkpoint", checkpoint, *TINY, "--sections", "slq,eigen",
               "--skip-power-top5", "--resume", "--out", str(first))
    rec3 = json.loads(first.read_text())
    assert rec3["sections_done"] == ["slq", "eigen"]
    assert rec3["slq"] == rec["slq"] and len(rec3["earlier_runs"]) == 1
    assert rec3["eigen"]["reference_top5"] == [3.0, 2.0, 1.0, 0.5, 0.25]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "bench.bench_hvp", "--checkpoint", checkpoint,
                           "--samples", "20", *TINY[2:], "--sections", "eigen", "--reference-from",
                           str(first), "--out", str(tmp_path / "c.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "another problem" in proc.stderr + proc.stdout
    # the same path holding another checkpoint (a retrain) is another problem too
    rec3["problem"]["checkpoint_sha256"] = "0" * 64
    other = tmp_path / "d.json"
    other.write_text(json.dumps(rec3))
    proc = subprocess.run([sys.executable, "-m", "bench.bench_hvp", "--checkpoint", checkpoint,
                           *TINY, "--sections", "eigen", "--reference-from", str(other),
                           "--out", str(tmp_path / "e.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "another problem" in proc.stderr + proc.stdout


def test_bench_compile_tiny_cnn():
    """The torch.compile section on a tiny CNN: it either measures both or records why the
    compiler failed; eager and compiled products agree."""
    import argparse

    from bench.bench_hvp import bench_compile
    from bench.common import Problem

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).eval()
    x, y = torch.randn(12, 3, 4, 4), torch.randint(0, 3, (12,))
    problem = Problem(model, [(x[:6], y[:6]), (x[6:], y[6:])], {}, "random", "-", 12, 6, 0)
    out = bench_compile(argparse.Namespace(repeats=1), problem)
    assert out["eager"]["median_s"] > 0
    d = out["default"]
    assert "error" in d or (d["relative_difference"] < 1e-4 and d["steady"]["median_s"] > 0
                            and d["speedup_vs_double_backward_reuse"] > 0)


def test_bench_peers_ours_only(checkpoint, tmp_path):
    """Without the peers (as in CI) the benchmark still runs ours and the whole-process part."""
    out, png = tmp_path / "peers.json", tmp_path / "peers.png"
    stdout = run_module(
        "bench.bench_peers", "--checkpoint", checkpoint, *TINY, "--density-steps", "3",
        "--trace-max-probes", "12", "--whole-repeats", "1", "--whole-top-n", "1",
        "--skip-peer", "pyhessian", "--skip-peer", "eigenthings", "--skip-peer", "curvlinops",
        "--out", str(out), "--plot", str(png))
    rec = json.loads(out.read_text())
    assert rec["sections_failed"] == []
    assert rec["tools"] == ["ours"]
    for task in ("top1", "top5", "trace", "density"):
        row = rec[task]["ours"]
        assert {"value", "matvecs", "seconds", "accuracy", "ratio_to_ours"} <= set(row)
    assert rec["top1"]["ours"]["accuracy"]["rel_error"] < 1e-2
    runs = rec["whole"]["runs"]
    assert [r["tool"] for r in runs] == ["ours"] and runs[0]["returncode"] == 0
    assert runs[0]["matvecs"] >= 1 and 0 < runs[0]["setup_share"] < 1
    assert rec["whole"]["summary"]["top1"]["ours"]["runs"] == 1
    assert "| top1 | ours |" in stdout and png.exists()


def test_bench_peers_with_peers(checkpoint, tmp_path):
    pytest.importorskip("scipy")
    pytest.importorskip("pyhessian")
    pytest.importorskip("hessian_eigenthings")
    pytest.importorskip("curvlinops")
    out = tmp_path / "peers.json"
    run_module("bench.bench_peers", "--checkpoint", checkpoint, *TINY, "--density-steps", "3",
               "--trace-max-probes", "6", "--whole-repeats", "1", "--whole-top-n", "1",
               "--sections", "top1,trace,density,whole", "--out", str(out), "--plot",
               str(tmp_path / "peers.png"))
    rec = json.loads(out.read_text())
    assert rec["sections_failed"] == []
    assert rec["tools"] == ["ours", "pyhessian", "eigenthings", "curvlinops"]
    for task in ("top1", "trace", "density"):
        for tool in rec["tools"]:
            row = rec[task][tool]
            assert "error" not in row, (task, tool, row)
            assert {"value", "matvecs", "seconds", "accuracy", "ratio_to_ours"} <= set(row)
    for tool in rec["tools"]:
        assert rec["top1"][tool]["accuracy"]["rel_error"] < 2e-2
    assert rec["trace"]["probes_for_peers"] <= 6
    summary = rec["whole"]["summary"]["top1"]
    assert {"ours", "pyhessian", "speedup_ours_vs_pyhessian"} <= set(summary)
    assert summary["pyhessian"]["max_rel_error"] < 5e-2
    assert "| whole process top1 | pyhessian |" in rec["markdown"]


def test_bench_facade_replays_pyhessians_trace_rule_as_a_loop_would():
    """The vectorised replay of PyHessian's trace stopping rule stops where its loop stops."""
    from bench.bench_facade import pyhessian_rule

    g = torch.Generator().manual_seed(0)
    draws = 100 + 40 * torch.randn(300, 100, generator=g, dtype=torch.float64)
    draws[:3] = 7.0  # constant rows: the change after probe 2 is zero
    draws[3, :2] = torch.tensor([5.0, -20.0])  # mean_2 < 0: the next probe always stops it
    probes, means = pyhessian_rule(draws, tol=1e-3)
    for row, k, m in zip(draws.tolist(), probes.tolist(), means.tolist()):
        prev, total = 0.0, 0.0
        for n, x in enumerate(row, 1):  # PyHessian 0.1's loop (hessian.trace)
            total += x
            mean = total / n
            if abs(mean - prev) / (prev + 1e-6) < 1e-3:
                break
            prev = mean
        assert (k, m) == (n, pytest.approx(mean, rel=1e-12))
    assert probes[:4].tolist() == [2, 2, 2, 3] and 2 < float(probes.float().mean()) < 100
