"""example_pyhessian_analysis.py --curvature: the GGN and the empirical Fisher end to end on the
float64 regression problem against dense references (1 and 3 processes), the layouts of
results.json, the files, and the bad inputs (one error line, exit 2)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_problems import GOOD

from problems import FileProblem, build_model
from support.datasets import hessian_subset
from tiny import dense_empirical_fisher, dense_ggn, dense_hessian

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGRESSION = os.path.join(ROOT, "examples", "regression.py")
# 50 samples in mini-batches of 20 -> [20, 20, 10]: uneven shards on 3 ranks
SAMPLES = ["--hessian-batch-size", "50", "--mini-hessian-batch-size", "20", "--seed", "3"]


def script(args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "example_pyhessian_analysis.py"),
                           *args, "--no-cuda", "--port", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def mse(outputs, y):
    return ((outputs.squeeze(-1) - y) ** 2).mean()


def dense_curvatures():
    """H, G and F of the regression problem's mean loss over the analysis's 50 samples."""
    problem = FileProblem(REGRESSION, seed=3)
    model = build_model(problem)
    train = problem.dataset("train")
    x, y = torch.utils.data.default_collate([train[i] for i in hessian_subset(train, 50, 3)])
    return {"hessian": dense_hessian(model, mse, x, y), "ggn": dense_ggn(model, mse, x, y),
            "ef": dense_empirical_fisher(model, mse, x, y)}


@pytest.fixture(scope="module")
def dense():
    return dense_curvatures()


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """hessian,ggn,ef on the regression problem, one process."""
    return run_three(tmp_path_factory.mktemp("three"), 1)


def run_three(out, world):
    proc = script(["--problem", REGRESSION, *SAMPLES, "--device_count", str(world),
                   "--curvature", "hessian,ggn,ef", "--eigenvalue", "--top-n", "3", "--tol",
                   "1e-6", "--max-iter", "200", "--bottom-n", "1", "--trace", "--density",
                   "--lanczos-iter", "30", "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc, out


def assert_exact(results, dense):
    for name, M in dense.items():
        r = results[name]
        exact = torch.linalg.eigvalsh((M + M.T) / 2)
        top = exact.flip(0)[:3].tolist()
        assert r["eigenvalue"]["eigenvalues"] == pytest.approx(top, rel=1e-6), name
        assert r["bottom"]["eigenvalues"][0] == pytest.approx(exact[0].item(), rel=1e-4,
                                                              abs=1e-6 * top[0]), name
        tr = r["trace"]
        assert abs(tr["trace"] - M.trace().item()) <= 4 * tr["stderr"], (name, tr)


@pytest.mark.slow
def test_three_curvatures_against_dense_references(three, dense):
    record, proc, out = three
    assert record["curvatures"] == ["hessian", "ggn", "ef"]
    assert_exact(record["results"], dense)
    # G and F are positive semidefinite, the Hessian here is not
    assert record["results"]["hessian"]["bottom"]["eigenvalues"][0] < 0
    for name in ("ggn", "ef"):
        top = record["results"][name]["eigenvalue"]["eigenvalues"][0]
        assert record["results"][name]["bottom"]["eigenvalues"][0] >= -1e-8 * top
        assert record["results"][name]["density"]["spectral_mass"]["negative"] == 0.0
    assert set(record["costs"]) == set(record["operator"]) == {"hessian", "ggn", "ef"}
    assert record["operator"]["ggn"]["curvature"] == "ggn"
    assert record["costs"]["ef"]["eigenvalue"]["num_matvecs"] \
        == record["results"]["ef"]["eigenvalue"]["num_matvecs"]
    files = set(os.listdir(out))
    for name in ("hessian", "ggn", "ef"):
        assert {f"example.{name}.pdf", f"example.{name}.png", f"convergence.{name}.png"} <= files
    assert {"example.pdf", "example.png", "results.json"} <= files
    assert "convergence.png" not in files
    text = proc.stdout
    assert text.count("loading the model") == 1  # one data load
    for name, product in (("hessian", "HVP"), ("ggn", "GGN product"), ("ef", "EF product")):
        assert f"=== {name}:" in text and f"[{name}] ***Top Eigenvalues:" in text
        assert f"[{name} eigenvalue] {product}" in text
    side = text[text.index("***Side by side"):]
    assert all(f"    {name} " in side for name in ("hessian", "ggn", "ef"))


@pytest.mark.slow
def test_three_processes_give_the_same_numbers(three, dense, tmp_path):
    record, _proc, _out = run_three(tmp_path, 3)
    assert record["world_size"] == 3 and record["data"]["samples_per_rank"] == [20, 20, 10]
    assert_exact(record["results"], dense)
    for name in ("hessian", "ggn", "ef"):
        ours, one = record["results"][name], three[0]["results"][name]
        assert ours["eigenvalue"]["eigenvalues"] == pytest.approx(
            one["eigenvalue"]["eigenvalues"], rel=1e-9)
        assert ours["trace"]["trace"] == pytest.approx(one["trace"]["trace"], rel=1e-9)


@pytest.mark.slow
def test_one_curvature_keeps_the_layout(tmp_path, dense):
    proc = script(["--problem", REGRESSION, *SAMPLES, "--curvature", "ggn", "--eigenvalue",
                   "--top-n", "2", "--tol", "1e-8", "--density", "--lanczos-iter", "10",
                   "--output-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["curvatures"] == ["ggn"] and set(record["results"]) == {"eigenvalue",
                                                                           "density"}
    assert record["operator"]["curvature"] == "ggn" and "eigenvalue" in record["costs"]
    exact = torch.linalg.eigvalsh(dense["ggn"]).flip(0)[:2].tolist()
    assert record["results"]["eigenvalue"]["eigenvalues"] == pytest.approx(exact, rel=1e-8)
    assert {"example.pdf", "example.png", "convergence.png"} <= set(os.listdir(tmp_path))
    assert "[ggn] ***Top Eigenvalues:" in proc.stdout and "GGN products" in proc.stdout


SUM_LOSS = """
    def loss(outputs, batch):
        return ((outputs.squeeze(-1) - batch[1]) ** 2).sum()
"""
# the model a problem file's model() built, for a loss() that reaches around the outputs
KEEPS_ITS_MODEL = GOOD + textwrap.dedent("""
    import torch.nn.functional as F

    _MODELS = []

    def model():
        m = nn.Linear(3, 2)
        _MODELS.append(m)
        return m
""")
NOT_OF_OUTPUTS = KEEPS_ITS_MODEL + textwrap.dedent("""
    def loss(outputs, batch):
        return F.cross_entropy(_MODELS[-1](batch[0]), batch[1])
""")
PENALTY = KEEPS_ITS_MODEL + textwrap.dedent("""
    def loss(outputs, batch):
        return F.cross_entropy(outputs, batch[1]) + 1e-3 * _MODELS[-1].weight.square().sum()
""")


@pytest.mark.parametrize("args, problem, message", [
    (["--curvature", "fisher"], None, "unknown curvature 'fisher'"),
    (["--curvature", "hessian,ggn,hessian"], None, "hessian given twice"),
    (["--curvature", "ef"], "regression+sum",
     "--curvature ef: the empirical Fisher needs loss(outputs, batch) to be the MEAN"),
    (["--curvature", "hessian,ggn"], "not of outputs",
     "--curvature ggn: the GGN needs loss(outputs, batch) to be a function of the outputs"),
    (["--curvature", "ggn"], "penalty",
     "--curvature ggn: the GGN needs loss(outputs, batch) to depend on the parameters only "
     "through the outputs"),
])
def test_bad_curvature_input_is_one_line(tmp_path, args, problem, message):
    if problem is None:
        path = REGRESSION
    elif problem == "regression+sum":
        path = tmp_path / "p.py"
        path.write_text(Path(REGRESSION).read_text() + textwrap.dedent(SUM_LOSS))
    else:
        path = tmp_path / "p.py"
        path.write_text(NOT_OF_OUTPUTS if problem == "not of outputs" else PENALTY)
    proc = script(["--problem", str(path), "--eigenvalue", "--output-dir", str(tmp_path / "o"),
                   "--hessian-batch-size", "8", "--mini-hessian-batch-size", "4", *args],
                  timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "loading the model" not in proc.stdout
