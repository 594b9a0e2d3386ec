"""example_pyhessian_analysis.py end to end on CPU/gloo: world sizes, torchrun, faults, outputs."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "example_pyhessian_analysis.py")
# 50 samples in mini-batches of 20 -> [20, 20, 10]: uneven shards on 2 and 3 ranks
COMMON = ["--hessian-batch-size", "50", "--mini-hessian-batch-size", "20", "--no-cuda",
          "--eigenvalue", "--trace", "--density", "--top-n", "2", "--max-iter", "30",
          "--lanczos-iter", "12", "--n-v", "2"]


def run(args, timeout=300, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A ResNet8 trained for one epoch on the synthetic data set."""
    import training

    folder = tmp_path_factory.mktemp("ckpt")
    training.main(["--dataset", "synthetic", "--depth", "8", "--epochs", "1", "--no-cuda",
                   "--num-workers", "0", "--saving-folder", str(folder)])
    return str(folder / "net.pkl")


def analyse(checkpoint, out, extra=()):
    proc = run(["--resume", checkpoint, "--output-dir", str(out), *COMMON, *extra])
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


def test_results_json_and_files(single):
    record, proc, out = single
    for key in ("config", "world_size", "backend", "versions", "device", "model", "data",
                "operator", "results", "seconds_total", "loss"):
        assert key in record
    assert record["world_size"] == 1 and record["data"]["num_samples"] == 50
    assert record["data"]["num_mini_batches"] == 3
    eig, tr, dens = (record["results"][k] for k in ("eigenvalue", "trace", "density"))
    assert len(eig["eigenvalues"]) == 2 and eig["eigenvalues"][0] >= eig["eigenvalues"][1]
    assert eig["num_matvecs"] == eig["history"][-1]["matvecs"] and eig["seconds"] > 0
    assert tr["stderr"] > 0 and len(tr["samples"]) == len(tr["history"])
    assert len(dens["nodes"]) == 2 and all(len(w) == 12 for w in dens["weights"])
    assert all(abs(sum(w) - 1) < 1e-9 for w in dens["weights"])
    for name in ("example.pdf", "example.png", "convergence.png", "results.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert "***Top Eigenvalues:" in proc.stdout and "***Trace:" in proc.stdout
    assert re.search(r"\*\*\*Trace:\s+\S+ ± \S+ \(standard error", proc.stdout)
    assert "HVPs" in proc.stdout and "world size 1" in proc.stdout


@pytest.mark.parametrize("world_size", [2, 3])
def test_world_sizes_give_the_same_numbers(checkpoint, single, tmp_path, world_size):
    record, proc = analyse(checkpoint, tmp_path, ["--device_count", str(world_size),
                                                  "--port", "0"])
    assert record["world_size"] == world_size and record["backend"] == "gloo"
    per_rank = record["data"]["samples_per_rank"]
    assert sum(per_rank) == 50 and len(set(per_rank)) > 1  # uneven shards
    assert_same(record, single[0])
    assert proc.stdout.count("***Top Eigenvalues:") == 1  # rank 0 alone prints


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_on_localhost(checkpoint, single, tmp_path):
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--node_rank", str(node_rank), "--master_addr",
               "127.0.0.1", "--master_port", str(port), SCRIPT, "--resume", checkpoint,
               "--output-dir", str(tmp_path), *COMMON]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (so, se) in zip(nodes, outs):
        assert p.returncode == 0, se[-3000:]
    with open(tmp_path / "results.json") as fh:
        record = json.load(fh)
    assert record["world_size"] == 2 and record["launch"].startswith("torchrun")
    assert_same(record, single[0])


def test_failure_in_one_rank_ends_the_run_quickly(checkpoint, tmp_path):
    t0 = time.time()
    proc = run(["--resume", checkpoint, "--output-dir", str(tmp_path), "--device_count", "2",
                "--port", "0", *COMMON], env={"PYHESSIAN_DIST_TEST_FAIL_RANK": "1"}, timeout=120)
    assert proc.returncode != 0
    assert time.time() - t0 < 60
    assert "Traceback" in proc.stderr and "injected failure on rank 1" in proc.stderr
    assert not os.path.exists(tmp_path / "results.json")


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
])
def test_bad_inputs_give_one_clear_line(checkpoint, args, message):
    if "--resume" not in args:
        args = ["--resume", checkpoint, *args]
    proc = run([*args, "--no-cuda"], timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3  # argparse adds a usage line


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "net.pkl"
    bad.write_bytes(b"not a checkpoint at all")
    proc = run(["--resume", str(bad), "--eigenvalue", "--no-cuda"], timeout=120)
    assert proc.returncode == 2 and "cannot read checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


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


def test_help_lists_every_flag_with_default():
    proc = run(["--help"])
    assert proc.returncode == 0
    text = proc.stdout
    src = open(SCRIPT).read()
    flags = set(re.findall(r"add_argument\(\s*\"(--[a-z_-]+)\"", src))
    flags |= {f"--{n}" for n in re.findall(r"add_bool_flag\(p, \"([a-z-]+)\"", src)}
    assert len(flags) >= 25
    for flag in flags:
        assert flag in text, flag
    for default in ("default: 200", "default: 1)", "default: 127.0.0.1", "default: 29500",
                    "default: lanczos", "default: hutchinson", "default: 100", "default: ."):
        assert default in " ".join(text.split()), default


def _children(pid):
    """PIDs whose parent is pid (Linux /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_ctrl_c_stops_every_worker(checkpoint, tmp_path):
    import signal

    proc = subprocess.Popen([sys.executable, SCRIPT, "--resume", checkpoint, "--output-dir",
                             str(tmp_path), "--device_count", "2", "--port", "0", *COMMON,
                             "--max-iter", "100", "--tol", "1e-12"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background job inherits SIGINT ignored: restore it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:  # wait until the workers are computing
            if "[eigenvalue]" in line:
                break
        workers = _children(proc.pid)
        assert workers, "no worker processes found"
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "interrupted" in err
        assert time.time() - t0 < 30
        deadline = time.time() + 10
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_device_count_above_visible_gpus_is_an_error(checkpoint, monkeypatch, capsys):
    """The GPU count is faked: the check must fire before any CUDA call is made."""
    import torch

    import example_pyhessian_analysis as analysis

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as exc:
        analysis.main(["--resume", checkpoint, "--eigenvalue", "--cuda", "--device_count", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--device_count 2 but only 1 GPU(s) are visible" in err
