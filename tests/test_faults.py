"""Faults of a running analysis: cancel (SIGTERM, SIGINT, SIGHUP), a worker that dies, raises or
is stopped, a closed stdout, a bad image. Every process a test starts is cleaned up by PID."""
import contextlib
import json
import os
import signal
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
        deadline = time.time() + 10
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        return proc.returncode, err, seconds, [w for w in workers if alive(w)]
    finally:
        kill_all([proc.pid, *workers])


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
