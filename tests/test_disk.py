"""A full disk and a file-size limit, for real (issue 19, defects 7 and 8 and the `ulimit -f`
item): the output folder is a small tmpfs mounted in a private mount namespace (``unshare -m``,
as root; skipped elsewhere), filled to the byte count a test chooses; the file-size limit is
RLIMIT_FSIZE set in the child (Python ignores SIGXFSZ, so a write past it fails with EFBIG).
A run whose outputs cannot all be written exits 2 with one line and leaves the earlier set
byte for byte; with --keep-partial-outputs it writes what it can."""
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile

import pytest
from test_faults import snapshot

from test_analysis import COMMON, ROOT, SCRIPT

pytestmark = pytest.mark.slow

PAGE = 4096
# Fill the tmpfs, then free FREE bytes; run the command into MNT/out; copy MNT/out out of the
# namespace (to AFTER) before the mount disappears with it.
FILL_AND_RUN = """
set -e
mount -t tmpfs -o size=2m tmpfs "$MNT"
mkdir "$MNT/out"
cp -a "$EARLIER/." "$MNT/out/"
dd if=/dev/zero of="$MNT/filler" bs=4096 2>/dev/null || true
truncate -s "-$FREE" "$MNT/filler"
set +e
"$@" --output-dir "$MNT/out"
echo $? > "$AFTER.rc"
cp -a "$MNT/out" "$AFTER"
"""


def _can_mount_tmpfs():
    if not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory() as mnt:
        proc = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs "
                               f"{mnt} && touch {mnt}/x"], capture_output=True, timeout=30)
        return proc.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _can_mount_tmpfs(),
                                 reason="needs unshare -m and tmpfs mounts (root on Linux)")


@pytest.fixture
def earlier(complete_outputs):
    """A complete earlier output set, written by a real run on an ordinary disk."""
    return complete_outputs


def run_on_full_disk(tmp_path, earlier, free, args):
    """Run the analysis into a tmpfs holding ``earlier`` with ``free`` bytes left; return
    (exit code, stdout, stderr, the output folder's files afterwards)."""
    (tmp_path / "mnt").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MNT": str(tmp_path / "mnt"),
           "EARLIER": str(earlier), "FREE": str(free), "AFTER": str(tmp_path / "after")}
    proc = subprocess.run(["unshare", "-m", "bash", "-c", FILL_AND_RUN, "fill",
                           sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert os.path.exists(tmp_path / "after.rc"), proc.stderr
    code = int((tmp_path / "after.rc").read_text())
    return code, proc.stdout, proc.stderr, snapshot(tmp_path / "after")


def kept_line(folder, what, why):
    return (f"error: could not write {what} ({why}); nothing was replaced: {folder} still holds "
            "the earlier run's results.json, example.pdf, example.png, convergence.png. Pass "
            "--keep-partial-outputs to write the files that can be written instead")


NO_SPACE = "No space left on device; free some space or choose a folder on another disk"


@needs_tmpfs
@pytest.mark.parametrize("n", [1, 2])
def test_a_full_disk_when_results_json_is_staged(checkpoint, earlier, tmp_path, n):
    """Defect 7: after the whole computation, one line (no traceback), exit 2, nothing lost."""
    code, _out, err, after = run_on_full_disk(
        tmp_path, earlier, 0, ["--resume", checkpoint, "--device_count", str(n), *COMMON])
    assert code == 2, err
    assert err.strip().splitlines() == [kept_line(tmp_path / "mnt" / "out", "results.json",
                                                  NO_SPACE)]
    assert after == snapshot(earlier)


@needs_tmpfs
@pytest.mark.parametrize("n", [1, 2])
def test_a_nearly_full_disk_fails_the_run_and_keeps_the_earlier_set(checkpoint, earlier,
                                                                     tmp_path, n):
    """Defect 8: results.json fits, the figures do not: exit 2, the earlier set kept whole."""
    pages = -(-os.path.getsize(earlier / "results.json") // PAGE)
    code, out, err, after = run_on_full_disk(
        tmp_path, earlier, (pages + 2) * PAGE,
        ["--resume", checkpoint, "--device_count", str(n), *COMMON])
    assert code == 2, err
    assert err.strip().splitlines() == [kept_line(tmp_path / "mnt" / "out",
                                                  "example.pdf, example.png", NO_SPACE)]
    assert "wrote" not in out and "removed" not in out
    assert after == snapshot(earlier)


@needs_tmpfs
def test_keep_partial_outputs_writes_what_fits(checkpoint, earlier, tmp_path):
    pages = -(-os.path.getsize(earlier / "results.json") // PAGE)
    code, out, err, after = run_on_full_disk(
        tmp_path, earlier, (pages + 2) * PAGE,
        ["--resume", checkpoint, "--keep-partial-outputs", *COMMON])
    assert code == 0, err
    assert f"warning: could not write example.pdf, example.png ({NO_SPACE}); " \
           "--keep-partial-outputs: the other files are written" in out
    assert "removed example.pdf, example.png, convergence.png of an earlier run" in out
    assert sorted(after) == ["results.json"]  # one run's files, never two runs' mixed
    assert json.loads(after["results.json"])["config"]["keep_partial_outputs"] is True


def limited(nbytes):
    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return preexec


@pytest.mark.parametrize("n", [1, 2])
def test_a_file_size_limit_is_named(checkpoint, earlier, tmp_path, n):
    """`ulimit -f`: the OS says only "File too large"; the line names the limit."""
    shutil.copytree(earlier, tmp_path / "out")
    limit = os.path.getsize(earlier / "results.json") + 4000  # example.png is larger
    proc = subprocess.run([sys.executable, SCRIPT, "--resume", checkpoint, "--output-dir",
                           str(tmp_path / "out"), "--device_count", str(n), *COMMON], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=limited(limit),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    why = (f"File too large: this process may not write files larger than {limit:,} bytes (the "
           "file-size limit, `ulimit -f`); raise or remove the limit")
    assert proc.stderr.strip().splitlines() == [
        kept_line(tmp_path / "out", "example.pdf, example.png", why)]
    assert snapshot(tmp_path / "out") == snapshot(earlier)


def test_training_under_a_file_size_limit_keeps_both_checkpoints(tmp_path):
    """The issue: net.best.pkl was replaced by epoch 2 while net.pkl stayed at epoch 1, and the
    message blamed the folder. Both are written in full before either is replaced."""
    train = [sys.executable, os.path.join(ROOT, "training.py"), "--problem",
             os.path.join(ROOT, "examples", "dict_classifier.py"), "--num-workers", "0",
             "--no-cuda", "--saving-folder", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*train, "--epochs", "1"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    before = snapshot(tmp_path)
    sizes = sorted(len(data) for data in before.values())
    limit = (sizes[0] + sizes[1]) // 2  # net.best.pkl fits, net.pkl (training state) does not
    resumed = subprocess.run([*train, "--resume", str(tmp_path / "net.pkl"), "--epochs", "2"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
                             preexec_fn=limited(limit))
    assert resumed.returncode == 2, resumed.stderr
    lines = resumed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write checkpoint "), lines
    assert lines[0].endswith(f"(File too large: this process may not write files larger than "
                             f"{limit:,} bytes (the file-size limit, `ulimit -f`); raise or "
                             "remove the limit); the earlier files are kept")
    assert snapshot(tmp_path) == before  # both still epoch 1, no temporary file
