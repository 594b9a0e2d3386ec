"""example_pyhessian_analysis.py end to end on CPU/gloo: world sizes, torchrun, outputs, inputs."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

import utils
from problems import image_record
from support.checkpoints import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "example_pyhessian_analysis.py")
# 50 samples in mini-batches of 20 -> [20, 20, 10]: uneven shards on 2 and 3 ranks
COMMON = ["--hessian-batch-size", "50", "--mini-hessian-batch-size", "20", "--no-cuda",
          "--eigenvalue", "--trace", "--density", "--top-n", "2", "--max-iter", "30",
          "--lanczos-iter", "12", "--n-v", "2", "--trace-rse", "0.1", "--port", "0"]


def run(args, timeout=300, env=None, script=SCRIPT):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def analyse(checkpoint, out, extra=(), env=None):
    proc = run(["--resume", checkpoint, "--output-dir", str(out), *COMMON, *extra], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh), proc


def numbers(record):
    r = record["results"]
    return (r["eigenvalue"]["eigenvalues"], r["trace"]["trace"], r["density"]["nodes"])


def assert_same(a, b, rtol=1e-5):
    ea, ta, na = numbers(a)
    eb, tb, nb = numbers(b)
    assert ea == pytest.approx(eb, rel=rtol)
    assert ta == pytest.approx(tb, rel=rtol)
    scale = max(abs(v) for run in na for v in run)
    for ra, rb in zip(na, nb):
        assert ra == pytest.approx(rb, rel=rtol, abs=rtol * scale)


@pytest.fixture(scope="module")
def single(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ws1")
    record, proc = analyse(checkpoint, out, ["--device_count", "1"])
    return record, proc, out


@pytest.mark.slow
def test_results_json_and_files(single):
    record, proc, out = single
    for key in ("config", "world_size", "backend", "versions", "device", "model", "data",
                "operator", "results", "costs", "seconds_total", "loss"):
        assert key in record
    assert record["world_size"] == 1 and record["data"]["num_samples"] == 50
    assert record["data"]["num_mini_batches"] == 3
    eig, tr, dens = (record["results"][k] for k in ("eigenvalue", "trace", "density"))
    assert len(eig["eigenvalues"]) == 2 and eig["eigenvalues"][0] >= eig["eigenvalues"][1]
    assert eig["num_matvecs"] == eig["history"][-1]["matvecs"] == record["costs"][
        "eigenvalue"]["num_matvecs"]
    assert max(eig["error_bounds"]) <= 1e-3 and eig["converged"]
    assert tr["stderr"] > 0 and tr["num_probes"] == len(tr["samples"])
    assert tr["method"] == "deflated hutchinson" and tr["deflation"]["dimension"] >= 1
    assert len(dens["nodes"]) == 2 and all(len(w) == 12 for w in dens["weights"])
    assert all(abs(sum(w) - 1) < 1e-9 for w in dens["weights"])
    for name in ("example.pdf", "example.png", "convergence.png", "results.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "results.json")) as fh:
        assert "NaN" not in fh.read()  # strict JSON
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no staging left behind
    text = proc.stdout
    assert "***Top Eigenvalues:" in text and "***Trace:" in text and "***Density:" in text
    assert re.search(r"\*\*\*Trace:\s+\S+ ± \S+ \(1 standard error", text)
    assert "HVPs" in text and "world size 1" in text
    # it says what it is doing before the first product
    assert text.index("loading the model") < text.index("building the Hessian operator") \
        < text.index("[eigenvalue]")
    # the timing line ends the output, with the numbers of results.json's "timings"
    timings = record["timings"]
    last = text.strip().splitlines()[-1]
    assert last.startswith("timings: start-up ")
    for key, words in utils.PHASES + (("other", "other"), ("total", "total")):
        assert timings[key] >= 0 or key == "other"
        assert f"{words} {timings[key]:.1f} s" in last
    phases = sum(timings[key] for key, _ in utils.PHASES)
    assert timings["total"] == pytest.approx(phases + timings["other"])
    assert abs(timings["other"]) < 0.1 * timings["total"] + 1.0
    assert timings["products"] == pytest.approx(sum(c["seconds"]
                                                    for c in record["costs"].values()))


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_world_sizes_give_the_same_numbers(checkpoint, single, tmp_path, world_size):
    record, proc = analyse(checkpoint, tmp_path, ["--device_count", str(world_size)])
    assert record["world_size"] == world_size and record["backend"] == "gloo"
    per_rank = record["data"]["samples_per_rank"]
    assert sum(per_rank) == 50 and len(set(per_rank)) > 1  # uneven shards
    assert_same(record, single[0])
    assert proc.stdout.count("***Top Eigenvalues:") == 1  # rank 0 alone prints


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_nodes_on_localhost(checkpoint, single, tmp_path):
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--node_rank", str(node_rank), "--master_addr",
               "127.0.0.1", "--master_port", str(port), SCRIPT, "--resume", checkpoint,
               "--output-dir", str(tmp_path), *COMMON]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (_so, se) in zip(nodes, outs):
        assert p.returncode == 0, se[-3000:]
    with open(tmp_path / "results.json") as fh:
        record = json.load(fh)
    assert record["world_size"] == 2 and record["launch"] == "torchrun"
    assert_same(record, single[0])


@pytest.mark.slow
def test_more_analyses_end_to_end(checkpoint, tmp_path):
    """--bottom-n, --per-layer, --diagonal, --save-eigenvectors write what they promise."""
    record, proc = analyse(checkpoint, tmp_path, [
        "--bottom-n", "2", "--per-layer", "--group-by", "stage", "--diagonal",
        "--save-eigenvectors", "--per-layer-tol", "0.05"])
    r = record["results"]
    assert r["bottom"]["which"] == "SA" and r["bottom"]["eigenvalues"][0] < 0
    rows = r["per_layer"]
    assert [row["name"] for row in rows] == ["stem", "layer1", "layer2", "layer3", "head"]
    for row in rows:
        for key in ("name", "num_parameters", "trace", "trace_stderr", "top_eigenvalue",
                    "trace_per_parameter"):
            assert key in row
    assert sum(row["trace"] for row in rows) == pytest.approx(r["trace"]["trace"], rel=1e-9)
    assert sum(row["num_parameters"] for row in rows) == record["model"]["num_trainable"]
    assert max(row["top_eigenvalue"] for row in rows) <= r["eigenvalue"]["eigenvalues"][0] * (
        1 + 0.05)  # a diagonal block's top eigenvalue never exceeds the whole Hessian's
    assert "spectral_mass" in r["density"] and "abs_lambda_min_over_lambda_max" in r["density"]
    vectors = torch.load(tmp_path / "eigenvectors.pt", weights_only=True)
    assert set(vectors) == {"parameter_names", "top", "bottom"}
    assert vectors["top"]["eigenvectors"]["conv1.weight"].shape == (2, 16, 3, 3, 3)
    diag = torch.load(tmp_path / "hessian_diagonal.pt", weights_only=True)
    assert diag["diagonal"]["fc.weight"].shape == (10, 64)
    total = sum(float(t.sum()) for t in diag["diagonal"].values())
    assert total == pytest.approx(r["trace"]["trace"], rel=1e-6)  # same probes
    for name in ("per_layer.png", "eigenvectors.pt", "hessian_diagonal.pt"):
        assert os.path.getsize(tmp_path / name) > 0
    assert "***Per-layer" in proc.stdout and "***Bottom Eigenvalues:" in proc.stdout


@pytest.mark.slow
def test_your_own_torchvision_model(tmp_path):
    """--model: a torchvision ResNet-18 (randomly initialised, saved as training.py would)
    analysed end to end, on 2 ranks."""
    torchvision = pytest.importorskip("torchvision")
    from support.checkpoints import custom_arch

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "r18.pkl"
    save_checkpoint(path, model,
                    image_record(custom_arch("torchvision.models:resnet18", 10), "synthetic"),
                    epoch=0, test_accuracy=None, args={})
    proc = run(["--resume", str(path), "--no-cuda", "--hessian-batch-size", "16",
                "--mini-hessian-batch-size", "8", "--eigenvalue", "--trace", "--trace-rse",
                "0.2", "--max-iter", "12", "--device_count", "2", "--port", "0",
                "--output-dir", str(tmp_path / "out")], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torchvision.models:resnet18 (10 classes)" in proc.stdout
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["model"]["num_trainable"] == 11_181_642
    assert record["model"]["arch"]["spec"] == "torchvision.models:resnet18"
    assert record["results"]["eigenvalue"]["eigenvalues"][0] > 0


@pytest.mark.slow
def test_one_probe_trace_is_strict_json_and_stale_files_are_removed(checkpoint, tmp_path):
    analyse(checkpoint, tmp_path)  # writes example.pdf / .png among others
    proc = run(["--resume", checkpoint, "--output-dir", str(tmp_path), "--no-cuda",
                "--hessian-batch-size", "20", "--mini-hessian-batch-size", "20", "--trace",
                "--trace-method", "hutchinson", "--trace-rse", "0", "--max-iter", "1"])
    assert proc.returncode == 0, proc.stderr
    assert "replace the earlier run's results.json" in proc.stdout
    assert "removed example.pdf, example.png of an earlier run" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["convergence.png", "results.json"]
    text = (tmp_path / "results.json").read_text()
    record = json.loads(text)
    assert record["results"]["trace"]["stderr"] is None and "NaN" not in text
    assert "n/a (one probe)" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--resume", "/nonexistent/net.pkl", "--eigenvalue"], "checkpoint not found"),
    (["--eigenvalue", "--hessian-batch-size", "0"], "positive integer"),
    (["--eigenvalue", "--hessian-batch-size", "6000"], "exceeds"),
    (["--eigenvalue", "--hessian-batch-size", "10", "--mini-hessian-batch-size", "20"],
     "larger than --hessian-batch-size"),
    ([], "nothing to compute"),
    (["--eigenvalue", "--no-batch-norm"], "batch_norm"),
    (["--eigenvalue", "--backend", "nccl"], "nccl"),
    (["--eigenvalue", "--top-n", "5", "--max-iter", "4"], "--max-iter 5 or more"),
    (["--eigenvalue", "--top-n", "1000000", "--max-iter", "1000000"],
     "exceeds the model's 78,042 trainable parameters"),
    (["--bottom-n", "1000000", "--max-iter", "1000000"], "--bottom-n 1000000 exceeds"),
    (["--save-eigenvectors", "--trace"], "--save-eigenvectors saves the eigenvectors"),
    (["--per-layer", "--trace-method", "hutchpp"], "--per-layer uses the probes"),
    (["--diagonal", "--trace-method", "hutchpp"], "--diagonal uses the probes"),
    (["--landscape", "2d", "--max-iter", "1"],
     "--landscape 2d (2 eigenpairs) needs at least as many Lanczos steps"),
    (["--trace", "--trace-rse", "0"], "--trace-deflate auto chooses"),
    (["--eigenvalue", "--ip", "10.255.255.1", "--device_count", "2"],
     "--ip 10.255.255.1 is not an address of this machine"),
    (["--eigenvalue", "--port", "70000"], "between 0 and 65535"),
    (["--eigenvalue", "--dataset", "cifar100", "--data-dir", "/nonexistent"], "CIFAR-100"),
])
def test_bad_inputs_give_one_clear_line(checkpoint, args, message):
    if "--resume" not in args:
        args = ["--resume", checkpoint, *args]
    proc = run([*args, "--no-cuda"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_output_dir_that_is_a_file_or_under_a_file(checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, message in ((blocker, "is a file, not a folder"),
                         (blocker / "sub", "is not writable")):
        proc = run(["--resume", checkpoint, "--eigenvalue", "--no-cuda", "--output-dir",
                    str(out)], timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_unreadable_checkpoints(tmp_path):
    for content, message in ((b"not a checkpoint at all", "cannot read checkpoint"),
                             (b"101\n", "it starts with text")):
        bad = tmp_path / "net.pkl"
        bad.write_bytes(content)
        proc = run(["--resume", str(bad), "--eigenvalue", "--no-cuda"], timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_non_finite_weights_are_refused_before_any_work(tmp_path):
    from models.resnet import resnet

    model = resnet(depth=8)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    path = tmp_path / "nan.pkl"
    save_checkpoint(path, model, image_record(model, "synthetic"), epoch=1, test_accuracy=None,
                    args={})
    proc = run(["--resume", str(path), "--eigenvalue", "--no-cuda"], timeout=120)
    assert proc.returncode == 2 and "fc.weight" in proc.stderr and "loading" not in proc.stdout


def test_class_count_mismatch(checkpoint, tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b", "c"):
            folder = tmp_path / split / c
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (i * 40, 10, 200)).save(folder / f"{i}.png")
    proc = run(["--resume", checkpoint, "--eigenvalue", "--no-cuda", "--dataset", "imagefolder",
                "--data-dir", str(tmp_path), "--hessian-batch-size", "4",
                "--mini-hessian-batch-size", "4"], timeout=120)
    assert proc.returncode == 2 and "has 10 classes but data set imagefolder has 3" in \
        proc.stderr


def test_busy_port_is_named(checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run(["--resume", checkpoint, "--eigenvalue", "--no-cuda", "--device_count", "2",
                    "--port", str(port), "--hessian-batch-size", "20",
                    "--mini-hessian-batch-size", "10"], timeout=120)
    assert proc.returncode == 2
    assert f"port {port}" in proc.stderr and "--port 0" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# Every flag of the script, written out by hand (not read from the script's source).
EXPECTED_FLAGS = [
    "--mini-hessian-batch-size", "--hessian-batch-size", "--seed", "--batch-norm",
    "--no-batch-norm", "--residual", "--no-residual", "--cuda", "--no-cuda", "--resume", "--ip",
    "--device_count", "--eigenvalue", "--top-n", "--eigen-method", "--bottom-n",
    "--save-eigenvectors", "--trace", "--trace-method", "--trace-rse", "--trace-deflate",
    "--per-layer", "--group-by", "--per-layer-tol", "--diagonal", "--density", "--lanczos-iter",
    "--n-v", "--max-iter", "--tol", "--port", "--backend", "--dataset", "--data-dir",
    "--output-dir", "--reuse-graph", "--hvp-mode", "--tf32", "--no-tf32", "--landscape",
    "--landscape-points", "--landscape-radius", "--landscape-filter-normalize", "--model",
    "--image-size", "--keep-partial-outputs", "--block-size",
]


def test_help_lists_every_flag_with_default():
    proc = run(["--help"])
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for flag in EXPECTED_FLAGS:
        assert re.search(re.escape(flag) + r"\b", text), flag
    for default in ("default: 200", "default: 1)", "default: 127.0.0.1", "default: 29500",
                    "default: lanczos", "default: deflated", "default: 100", "default: .)",
                    "default: 0.02", "default: module", "default: double_backward"):
        assert default in text, default


def test_device_count_above_visible_gpus_is_an_error(checkpoint, monkeypatch, capsys):
    """The GPU count is faked: the check must fire before any CUDA call is made."""
    import example_pyhessian_analysis as analysis

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code = analysis.main(["--resume", checkpoint, "--eigenvalue", "--cuda", "--device_count",
                          "2"])
    assert code == 2
    assert "--device_count 2 but only 1 GPU(s) are visible" in capsys.readouterr().err


def test_too_many_cpu_workers_is_refused_with_an_estimate(checkpoint, monkeypatch, capsys):
    import example_pyhessian_analysis as analysis
    import support.launch as launch

    monkeypatch.setattr(launch, "_available_memory", lambda: 4 * 2**30)
    code = analysis.main(["--resume", checkpoint, "--eigenvalue", "--no-cuda",
                          "--device_count", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "64 CPU worker processes" in err and "4.0 GB are available" in err
    assert launch.check_cpu_workers(1) is None
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert "3 CPU workers on 2 cores" in launch.check_cpu_workers(3)
