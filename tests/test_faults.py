"""Faults of a running analysis: cancel (SIGTERM, SIGINT, SIGHUP), a worker that dies, raises or
is stopped, a closed stdout, a bad image. Every process a test starts is cleaned up by PID."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_analysis import COMMON, ROOT, SCRIPT

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")]

ENTRY = os.path.join(ROOT, "tests", "fault_entry.py")
SLOW = ["--max-iter", "100", "--tol", "1e-12"]  # runs long enough to be cancelled


def children(pid):
    """PIDs whose parent is ``pid`` (Linux /proc)."""
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


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def survivors(pids, within=10.0):
    """Those of ``pids`` still alive ``within`` seconds from now (or once all are gone)."""
    deadline = time.time() + within
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def kill_all(pids):
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def start(args, script=SCRIPT, env=None):
    return subprocess.Popen(
        [sys.executable, script, *args], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                "PYTHONPATH": ROOT, **(env or {})},
        # a shell's background job inherits SIGINT ignored: restore it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(proc, marker, timeout=180):
    """Read stdout until a line containing ``marker``; return the workers (children)."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        if marker in line:
            break
        assert time.time() < deadline, f"no {marker!r} within {timeout} s"
    return [p for p in children(proc.pid) if alive(p)]


@pytest.fixture
def earlier(tmp_path):
    """An output folder holding an earlier run's files (their content must survive)."""
    (tmp_path / "results.json").write_text('{"earlier": true}\n')
    (tmp_path / "example.png").write_bytes(b"earlier png")
    return tmp_path


def assert_untouched(folder):
    assert json.loads((folder / "results.json").read_text()) == {"earlier": True}
    assert (folder / "example.png").read_bytes() == b"earlier png"
    assert sorted(os.listdir(folder)) == ["example.png", "results.json"]  # no staging left


def cancel_run(checkpoint, earlier, sig, device_count=2, before=None):
    """Start an analysis writing into ``earlier``, wait until it computes, call ``before(workers)``
    if given, send ``sig`` to the launcher; return its exit code, stderr, the seconds it took to
    exit, and the workers still alive 10 s later (then killed, so nothing outlives the test)."""
    proc = start(["--resume", checkpoint, "--output-dir", str(earlier), "--device_count",
                  str(device_count), *COMMON, *SLOW])
    workers = []
    try:
        workers = wait_for(proc, "[eigenvalue]")
        assert len(workers) >= device_count or device_count == 1, "worker processes not found"
        if before is not None:
            before(workers)
        t0 = time.time()
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
        seconds = time.time() - t0
        return proc.returncode, err, seconds, survivors(workers)
    finally:
        kill_all([proc.pid, *workers])



def sigterm_ended(proc, n):
    """Wait for ``proc`` (killing what is left if it hangs); (stdout, stderr, the launcher's
    "stopped N workers; " phrase for n processes), asserting that SIGTERM ended it (143)."""
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        kill_all([proc.pid, *children(proc.pid)])
    assert proc.returncode == 143, err
    return out, err, f"stopped {n} workers; " if n > 1 else ""

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130),
                                       (signal.SIGHUP, 129)])
def test_cancel_stops_every_worker_and_keeps_earlier_outputs(checkpoint, earlier, sig, code):
    returncode, err, seconds, survivors = cancel_run(checkpoint, earlier, sig)
    assert returncode == code, err
    assert seconds < 15
    assert f"interrupted by {signal.Signals(sig).name}" in err
    assert "earlier files are untouched" in err and "Traceback" not in err
    assert not survivors
    assert_untouched(earlier)


def test_sigterm_also_stops_a_stopped_worker(checkpoint, earlier):
    def stop_last(workers):  # a worker that can no longer act on SIGTERM
        os.kill(workers[-1], signal.SIGSTOP)

    returncode, err, _seconds, survivors = cancel_run(checkpoint, earlier, signal.SIGTERM,
                                                      before=stop_last)
    assert returncode == 143, err
    assert not survivors
    assert_untouched(earlier)


def test_single_process_ctrl_c(checkpoint, earlier):
    returncode, err, _seconds, _ = cancel_run(checkpoint, earlier, signal.SIGINT, device_count=1)
    assert returncode == 130 and "interrupted by SIGINT" in err, err
    assert "Traceback" not in err
    assert_untouched(earlier)


@pytest.mark.parametrize("fault, code, message", [
    ("raise:1", 1, "error: worker 1 of 2 failed: RuntimeError: injected failure on rank 1"),
    ("kill:1", 1, "error: worker 1 of 2 was killed by SIGKILL (out of memory?)"),
    ("data:0", 2, "error: injected data problem on rank 0"),
])
def test_a_failing_worker_ends_the_run_with_one_error_line(checkpoint, earlier, fault, code,
                                                           message):
    t0 = time.time()
    proc = start(["--resume", checkpoint, "--output-dir", str(earlier), "--device_count", "2",
                  *COMMON], script=ENTRY, env={"PYHESSIAN_DIST_FAULT": fault})
    try:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err
        assert time.time() - t0 < 90
        assert message in err, err
        assert err.strip().splitlines()[-1].startswith("error: ")
        if code == 2:  # a user error is one line, no traceback
            assert len(err.strip().splitlines()) == 1, err
        assert "AttributeError" not in err
        assert_untouched(earlier)
    finally:
        kill_all([proc.pid, *children(proc.pid)])


def test_closed_stdout_is_not_an_error(checkpoint, tmp_path):
    """`... | head -3`: the analysis still finishes and writes its results, no traceback."""
    cmd = (f"{sys.executable} {SCRIPT} --resume {checkpoint} --output-dir {tmp_path} "
           + " ".join(COMMON) + " --device_count 2 | head -3")
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert len(proc.stdout.splitlines()) == 3
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert (tmp_path / "results.json").exists()


def test_truncated_image_is_named(checkpoint, tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    for split in ("train", "test"):
        for c in range(10):
            folder = data / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), (c * 20, i * 90, 40)).save(folder / f"{i}.jpg")
    broken = data / "train" / "class3" / "0.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--resume", checkpoint, "--eigenvalue", "--no-cuda",
         "--dataset", "imagefolder", "--data-dir", str(data), "--hessian-batch-size", "20",
         "--mini-hessian-batch-size", "10", "--device_count", "2", "--port", "0",
         "--output-dir", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert str(broken) in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------------------- issue 19
# A cancel at a chosen moment: tests/fault_entry.py blocks the rank in the place named, prints
# "[fault] blocked in ...", and the test sends the signal to the launcher then.
IMPORT_ENTRY = os.path.join(ROOT, "tests", "import_entry.py")
FIGURES_RUN = ["--eigenvalue", "--trace", "--density"]  # example.pdf/.png, convergence.png
TRAIN = ["training", "--problem", os.path.join(ROOT, "examples", "dict_classifier.py"),
         "--epochs", "2", "--hessian-every", "1", "--hessian-samples", "100",
         "--hessian-mini-batch", "50", "--num-workers", "0", "--no-cuda", "--port", "0"]


def snapshot(folder):
    """Every entry of ``folder`` (hidden ones too: a staging folder) with its bytes."""
    return {n: (folder / n).read_bytes() if (folder / n).is_file() else "folder"
            for n in sorted(os.listdir(folder))}


@pytest.fixture
def complete(complete_outputs):
    """The files of a complete earlier run (results.json and every figure)."""
    return snapshot(complete_outputs)


def restore(folder, files):
    for name, data in files.items():
        (folder / name).write_bytes(data)


def cancel_when_blocked(args, fault, sig, script=ENTRY):
    """Run ``args`` with ``fault``, send ``sig`` to the launcher once a rank is blocked; return
    (exit code, stdout after the marker, stderr, processes still alive 10 s later)."""
    proc = start(args, script=script, env={"PYHESSIAN_DIST_FAULT": fault})
    workers = []
    try:
        workers = wait_for(proc, "[fault] blocked in")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out, err, survivors(workers)
    finally:
        kill_all([proc.pid, *workers])


@pytest.mark.parametrize("where, n, sig", [
    ("figure", 1, signal.SIGTERM), ("figure", 1, signal.SIGINT), ("figure", 2, signal.SIGTERM),
    ("figure", 2, signal.SIGINT), ("import", 1, signal.SIGINT), ("import", 2, signal.SIGTERM),
    ("staged", 1, signal.SIGTERM), ("staged", 2, signal.SIGTERM), ("staged", 2, signal.SIGHUP),
])
def test_a_cancel_while_writing_replaces_nothing(checkpoint, complete, tmp_path, where, n, sig):
    """Issue 19, defects 1 and 3: a cancel while a figure is drawn, while matplotlib is
    imported, or while the files are staged stops the run with 128 + the signal; the earlier
    set survives byte for byte, no staging folder is left, no process runs on."""
    restore(tmp_path, complete)
    code, out, err, survivors = cancel_when_blocked(
        ["--resume", checkpoint, "--output-dir", str(tmp_path), "--device_count", str(n),
         *COMMON], f"{where}:0", sig)
    stopped = f"stopped {n} workers; " if n > 1 else ""
    assert code == 128 + sig, err
    assert err.strip().splitlines() == [
        f"interrupted by {signal.Signals(sig).name}: {stopped}no output was written and earlier "
        "files are untouched"], err
    assert "wrote" not in out and not survivors
    assert snapshot(tmp_path) == complete


@pytest.mark.parametrize("n", [1, 2])
def test_a_cancel_while_the_files_are_moved_into_place_says_they_were(checkpoint, complete,
                                                                      tmp_path, n):
    """The move is held back from cancels: the run ends with the new set, and says so."""
    restore(tmp_path, complete)
    proc = start(["--resume", checkpoint, "--output-dir", str(tmp_path), "--device_count",
                  str(n), *COMMON], script=ENTRY, env={"PYHESSIAN_DIST_FAULT": "commit-signal:0"})
    _out, err, stopped = sigterm_ended(proc, n)
    assert err.strip().splitlines() == [
        f"interrupted by SIGTERM: {stopped}this run's files had already been written to "
        f"{tmp_path}"]
    after = snapshot(tmp_path)
    assert sorted(after) == sorted(complete)  # the whole new set, no staging folder
    assert json.loads(after["results.json"])["world_size"] == n
    assert after["results.json"] != complete["results.json"]


def test_a_worker_killed_while_writing_leaves_no_staging_folder(checkpoint, complete, tmp_path):
    """kill -9 of rank 0 in the write phase: the launcher removes the dead worker's staging
    folder; the earlier set is kept."""
    restore(tmp_path, complete)
    proc = start(["--resume", checkpoint, "--output-dir", str(tmp_path), "--device_count", "2",
                  *COMMON], script=ENTRY, env={"PYHESSIAN_DIST_FAULT": "staged:0"})
    workers = []
    try:
        line = next(line for line in proc.stdout if "[fault] blocked in" in line)
        workers = [p for p in children(proc.pid) if alive(p)]
        assert any(n.startswith(".pyhessian-dist-staging-") for n in os.listdir(tmp_path))
        os.kill(int(re.search(r"\(pid (\d+)\)", line).group(1)), signal.SIGKILL)  # rank 0
        _out, err = proc.communicate(timeout=60)
    finally:
        kill_all([proc.pid, *workers])
    assert proc.returncode == 1, err
    assert "error: worker 0 of 2 was killed by SIGKILL (out of memory?); the analysis was " \
           "stopped (all workers ended)" in err
    assert snapshot(tmp_path) == complete
    assert not survivors(workers)  # the launcher's children include mp's resource tracker,
    # which ends a moment after the launcher


def test_a_later_run_removes_the_staging_folders_of_ended_runs(checkpoint, tmp_path):
    """Issue 19, defect 3: folders left by an older version or a killed run (160 kB PNG)."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    stale = [f".pyhessian-dist-staging-{ended.pid}-{socket.gethostname()}-x1",
             ".pyhessian-dist-staging-oldformat"]
    for name in stale:
        (tmp_path / name).mkdir()
        (tmp_path / name / "landscape.png").write_bytes(b"x" * 160_000)
    os.utime(tmp_path / stale[1], (0, 0))
    proc = subprocess.run([sys.executable, SCRIPT, "--resume", checkpoint, "--output-dir",
                           str(tmp_path), "--eigenvalue", "--no-cuda", "--hessian-batch-size",
                           "20", "--mini-hessian-batch-size", "20", "--max-iter", "5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"note: removed 2 staging folder(s) that ended runs left in {tmp_path}" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["convergence.png", "results.json"]


def test_kill_9_of_the_launcher_leaks_nothing(checkpoint, tmp_path):
    """No "leaked semaphore objects" warning (the workers report through pipes), and the
    workers die with the launcher."""
    proc = start(["--resume", checkpoint, "--output-dir", str(tmp_path), "--device_count", "2",
                  *COMMON], script=ENTRY, env={"PYHESSIAN_DIST_FAULT": "sleep:0"})
    workers = []
    try:
        workers = wait_for(proc, "computing slowly")
        proc.kill()
        _out, err = proc.communicate(timeout=60)  # EOF: the resource tracker has ended too
        left = survivors(workers)
    finally:
        kill_all([proc.pid, *workers])
    assert "leaked" not in err and "resource_tracker" not in err, err
    assert not left


@pytest.mark.parametrize("script", [SCRIPT, os.path.join(ROOT, "training.py"),
                                    os.path.join(ROOT, "density_plot.py")])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_cancel_while_importing_is_one_line(script, sig):
    """Issue 19: a Ctrl-C in the first half second printed a KeyboardInterrupt traceback."""
    code, _out, err, _ = cancel_when_blocked([script, "--no-cuda"], "none:0", sig,
                                             script=IMPORT_ENTRY)
    assert code == 128 + sig
    assert err.strip().splitlines() == [f"interrupted by {signal.Signals(sig).name}: no output "
                                        "was written and earlier files are untouched"]


@pytest.mark.parametrize("where, n, sig", [
    ("figure", 1, signal.SIGTERM), ("figure", 1, signal.SIGINT), ("figure", 2, signal.SIGTERM),
    ("import", 1, signal.SIGINT), ("check", 1, signal.SIGTERM), ("check", 2, signal.SIGINT),
])
def test_a_cancel_during_the_curvature_check_or_its_figure_stops_training(tmp_path, where, n,
                                                                          sig):
    """Issue 19, defect 2 and the minor item: a scheduler's SIGTERM (or Ctrl-C) while
    net.curvature.png is drawn or lambda_1 is measured after epoch 1 stops training there, with
    epoch 1's checkpoints saved (before the check), no epoch 2, no temporary file left."""
    folder = tmp_path / "ck"
    code, out, err, survivors = cancel_when_blocked(
        [*TRAIN, "--saving-folder", str(folder), "--device_count", str(n)], f"{where}:0", sig)
    stopped = f"stopped {n} workers; " if n > 1 else ""
    assert code == 128 + sig, err
    assert err.strip().splitlines()[-1] == (
        f"interrupted by {signal.Signals(sig).name}: {stopped}{folder / 'net.pkl'} holds "
        "epoch 1"), err
    assert "epoch 2/2" not in out and "Traceback" not in err and not survivors
    files = sorted(os.listdir(folder))
    expected = ["net.best.pkl", "net.pkl"] + (["net.curvature.json"] if where != "check" else [])
    assert files == sorted(expected)  # no net.curvature.png: its first drawing never finished
    from support.checkpoints import read_training_state

    assert read_training_state(str(folder / "net.pkl"))[1]["epoch"] == 1
    if where != "check":
        with open(folder / "net.curvature.json") as fh:
            assert [c["epoch"] for c in json.load(fh)["checks"]] == [1]


NAN_LATER = '''
import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def dataset(split):
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    x[39] = float("nan")  # finite on the first batch, NaN on the whole Hessian data
    return torch.utils.data.TensorDataset(x, torch.arange(40) % 3)
'''


@pytest.mark.parametrize("n", [1, 2])
def test_a_loss_nan_on_the_hessian_data_is_one_line(tmp_path, n):
    """Issue 19, defect 6: the first batch passes the start-up check; the loss over the whole
    Hessian data is NaN: one error line and exit 2, on one process and on two."""
    problem = tmp_path / "nan_later.py"
    problem.write_text(NAN_LATER)
    proc = subprocess.run([sys.executable, SCRIPT, "--problem", str(problem), "--eigenvalue",
                           "--no-cuda", "--hessian-batch-size", "40", "--mini-hessian-batch-size",
                           "10", "--device_count", str(n), "--port", "0", "--output-dir",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: the loss on the data is nan: the model or data give non-finite values; check "
        f"the checkpoint and the input normalisation (problem {problem})"]
    assert not (tmp_path / "out").exists()  # a failed run leaves no empty folder


@pytest.mark.parametrize("n", [1, 2])
def test_a_cancel_while_a_checkpoint_is_moved_into_place_names_its_epoch(tmp_path, n):
    """The manual fault check found "holds epoch 1" printed while net.pkl held epoch 2 (the
    report came after the rename): it is now sent before a held-back cancel is delivered."""
    folder = tmp_path / "ck"
    proc = start([*TRAIN, "--saving-folder", str(folder), "--device_count", str(n)],
                 script=ENTRY, env={"PYHESSIAN_DIST_FAULT": "commit-signal:0"})
    out, err, stopped = sigterm_ended(proc, n)
    assert err.strip().splitlines()[-1] == (
        f"interrupted by SIGTERM: {stopped}{folder / 'net.pkl'} holds epoch 1"), err
    from support.checkpoints import read_training_state

    assert read_training_state(str(folder / "net.pkl"))[1]["epoch"] == 1
    assert sorted(os.listdir(folder)) == ["net.best.pkl", "net.pkl"] and "epoch 2/2" not in out
