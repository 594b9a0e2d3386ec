"""CUDA / NCCL paths (marked gpu; skipped without a GPU): torchrun with NCCL, every analysis on
CUDA, TF32 off vs on. Run them on a GPU machine with `python -m pytest -m gpu`."""
import json
import os
import subprocess
import sys

import pytest
import torch

from test_analysis import ROOT, SCRIPT

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SMALL = ["--hessian-batch-size", "64", "--mini-hessian-batch-size", "32", "--top-n", "2",
         "--max-iter", "40", "--lanczos-iter", "20", "--trace-rse", "0.1", "--port", "0"]


def run(args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def results(folder):
    with open(os.path.join(folder, "results.json")) as fh:
        return json.load(fh)


def test_torchrun_nccl_world_size_one(checkpoint, tmp_path):
    proc = run(["-m", "torch.distributed.run", "--nproc_per_node", "1", SCRIPT, "--resume",
                checkpoint, "--cuda", "--eigenvalue", "--output-dir", str(tmp_path), *SMALL])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = results(tmp_path)
    assert record["launch"] == "torchrun" and record["device"]["type"] == "cuda"


def test_every_analysis_on_cuda_matches_cpu(checkpoint, tmp_path):
    every = ["--eigenvalue", "--bottom-n", "1", "--save-eigenvectors", "--trace", "--per-layer",
             "--group-by", "stage", "--diagonal", "--density", "--landscape", "1d",
             "--landscape-points", "5", *SMALL]
    gpu, cpu = tmp_path / "gpu", tmp_path / "cpu"
    for folder, flag in ((gpu, "--cuda"), (cpu, "--no-cuda")):
        proc = run([SCRIPT, "--resume", checkpoint, flag, "--output-dir", str(folder), *every])
        assert proc.returncode == 0, proc.stderr[-3000:]
    g, c = results(gpu)["results"], results(cpu)["results"]
    assert g["eigenvalue"]["eigenvalues"] == pytest.approx(c["eigenvalue"]["eigenvalues"],
                                                           rel=1e-3)
    assert abs(g["trace"]["trace"] - c["trace"]["trace"]) <= 3 * (
        g["trace"]["stderr"] + c["trace"]["stderr"])
    assert set(g) == set(c)


def test_tf32_off_is_float32_accurate_and_on_is_close(checkpoint, tmp_path):
    values = {}
    for flag in ("--no-tf32", "--tf32", "--no-cuda"):
        out = tmp_path / flag.strip("-")
        proc = run([SCRIPT, "--resume", checkpoint, "--cuda" if flag != "--no-cuda" else flag,
                    *( [flag] if flag != "--no-cuda" else []), "--eigenvalue", "--tol", "1e-6",
                    "--output-dir", str(out), *SMALL])
        assert proc.returncode == 0, proc.stderr[-3000:]
        values[flag] = results(out)["results"]["eigenvalue"]["eigenvalues"][0]
    assert values["--no-tf32"] == pytest.approx(values["--no-cuda"], rel=1e-4)
    assert values["--tf32"] == pytest.approx(values["--no-cuda"], rel=1e-2)
