"""Cancels and unwritable outputs, in process: a cancel is never caught as a failure, a file that
cannot be written replaces nothing (unless --keep-partial-outputs), staging folders of ended
runs are removed, an import cut short leaves no half-initialised module, no empty folder is
left behind, checkpoints are written as a pair, and a zero Hessian block costs no Lanczos
steps. The same faults on real processes are in test_faults.py and test_disk.py."""
import errno
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import example_pyhessian_analysis as analysis
import training
from support.cancel import Interrupted, cancels_held, cancels_raise
from support.files import atomic_write_files, removed_if_left_empty, write_error
from support.outputs import OutputError, RunOutputs, remove_stale_staging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("results.json", "example.pdf", "example.png", "convergence.png")


def snapshot(folder):
    """Every entry of ``folder`` (hidden ones too) and its bytes."""
    return {n: (folder / n).read_bytes() if (folder / n).is_file() else "dir"
            for n in sorted(os.listdir(folder))}


@pytest.fixture
def earlier(tmp_path):
    """An output folder holding an earlier run's complete set."""
    for name in FILES:
        (tmp_path / name).write_bytes(f"earlier {name}".encode())
    return tmp_path


def write_bytes(path, data):
    with open(path, "wb") as fh:
        fh.write(data)


def no_space(*_paths):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------------------- cancels
def test_a_cancel_is_not_an_exception():
    """The root of the issue's defects 1 and 2: ``except Exception`` around a figure caught it."""
    assert issubclass(Interrupted, BaseException) and not issubclass(Interrupted, Exception)
    import support.launch

    assert support.launch.Interrupted is Interrupted


def test_a_cancel_while_a_file_is_drawn_ends_the_run_and_replaces_nothing(earlier):
    before = snapshot(earlier)

    def cancelled(path):
        with open(path, "wb") as fh:
            fh.write(b"half a figure")
        raise Interrupted(signal.SIGTERM)

    with pytest.raises(Interrupted), RunOutputs(earlier, FILES) as out:
        out.write_json("results.json", {"new": 1})
        out.write("example.pdf", cancelled)
    assert snapshot(earlier) == before  # byte for byte, and no staging folder


def test_a_signal_while_committing_is_delivered_after_the_commit(earlier):
    commits = []

    def on_commit():  # inside the held block: the signal waits until the files are in place
        commits.append(sorted(os.listdir(earlier)))
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted), cancels_raise(), \
            RunOutputs(earlier, FILES, on_commit=on_commit) as out:
        out.write_json("results.json", {"new": 1})
        out.write("example.pdf", lambda p: write_bytes(p, b"new pdf"))
        out.commit()
    assert commits == [["example.pdf", "results.json"]]
    assert snapshot(earlier) == {"example.pdf": b"new pdf",
                                 "results.json": b'{\n "new": 1\n}\n'}


def test_cancels_held_delivers_the_signal_afterwards():
    seen = []
    with pytest.raises(Interrupted), cancels_raise():
        with cancels_held():
            os.kill(os.getpid(), signal.SIGINT)
            seen.append("still running")
        seen.append("not reached")
    assert seen == ["still running"]


def test_a_signal_ignored_at_start_stays_ignored():
    """nohup's SIGHUP: the run goes on; SIGTERM still cancels."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with cancels_raise():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            with pytest.raises(Interrupted):
                os.kill(os.getpid(), signal.SIGTERM)
                signal.sigtimedwait([], 0.01)  # let the handler run
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.slow  # a fresh interpreter: matplotlib may already be loaded in this one
def test_an_import_cut_short_leaves_no_half_imported_matplotlib():
    """A Ctrl-C inside matplotlib's import (the issue: later draws failed with "module
    'matplotlib' has no attribute '_docstring'"): the next figure imports it afresh."""
    code = (
        "import importlib.abc, sys\n"
        "class Cut(importlib.abc.MetaPathFinder):\n"
        "    armed = True\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if self.armed and name == 'matplotlib.rcsetup':\n"
        "            self.armed = False\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Cut())\n"
        "from support.figures import Panel, Series, plot_convergence\n"
        "panel = [Panel('t', 'x', 'y', [Series('a', [1, 2], [1, 2])])]\n"
        "try:\n"
        "    plot_convergence(panel, sys.argv[1])\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', 'matplotlib' in sys.modules)\n"
        "plot_convergence(panel, sys.argv[1])\n"
        "print('drawn')\n")
    out = os.path.join(ROOT, ".pytest-cut-import.png")
    try:
        proc = subprocess.run([sys.executable, "-c", code, out], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.stdout.split() == ["interrupted", "False", "drawn"], proc.stderr
        assert os.path.getsize(out) > 1000
    finally:
        if os.path.exists(out):
            os.unlink(out)


# ---------------------------------------------------------------------------- outputs
def test_a_file_that_cannot_be_written_replaces_nothing(earlier):
    before = snapshot(earlier)
    with pytest.raises(OutputError) as info, RunOutputs(earlier, FILES) as out:
        out.write_json("results.json", {"new": 1})
        out.write(("example.pdf", "example.png"), no_space)
        pytest.fail("the run must end at the first file it cannot write")
    message = str(info.value)
    assert message.startswith("could not write example.pdf, example.png (No space left on "
                              "device; free some space")
    assert f"nothing was replaced: {earlier} still holds the earlier run's results.json, " \
           "example.pdf, example.png, convergence.png" in message
    assert "--keep-partial-outputs" in message
    assert snapshot(earlier) == before


def test_keep_partial_outputs_writes_what_it_can(earlier):
    with RunOutputs(earlier, FILES, keep_partial=True) as out:
        out.write_json("results.json", {"new": 1})
        out.write(("example.pdf", "example.png"), no_space)
        out.write("convergence.png", lambda p: write_bytes(p, b"new png"))
        written, removed = out.commit()
    assert out.warnings == ["warning: could not write example.pdf, example.png (No space left "
                            "on device; free some space or choose a folder on another disk); "
                            "--keep-partial-outputs: the other files are written"]
    assert removed == ["example.pdf", "example.png"]  # one run's files, never two runs' mixed
    assert snapshot(earlier) == {"convergence.png": b"new png",
                                 "results.json": b'{\n "new": 1\n}\n'}


def test_results_json_is_never_optional(earlier, monkeypatch):
    before = snapshot(earlier)
    monkeypatch.setattr("builtins.open", lambda *a, **k: no_space())
    with pytest.raises(OutputError, match=r"^could not write results.json \(No space left"), \
            RunOutputs(earlier, FILES, keep_partial=True) as out:
        out.write_json("results.json", {"new": 1})
    monkeypatch.undo()
    assert snapshot(earlier) == before


def test_a_figure_bug_names_the_exception(tmp_path):
    def bug(_path):
        return None < None

    with pytest.raises(OutputError) as info, RunOutputs(tmp_path, FILES) as out:
        out.write_json("results.json", {})
        out.write("example.pdf", bug)
    assert "(TypeError: '<' not supported between instances of 'NoneType' and 'NoneType'; a " \
           "bug, please report it); nothing was written to" in str(info.value)
    assert os.listdir(tmp_path) == []


def test_write_error_names_the_file_size_limit(monkeypatch):
    import support.files

    monkeypatch.setattr(support.files, "_file_size_limit", lambda: 20000)
    text = write_error(OSError(errno.EFBIG, "File too large"))
    assert text == ("File too large: this process may not write files larger than 20,000 bytes "
                    "(the file-size limit, `ulimit -f`); raise or remove the limit")



def test_write_error_finds_the_disk_behind_a_cleanup_error():
    """matplotlib's PDF writer, cleaning up after ENOSPC, raised AttributeError ('Stream' object
    has no attribute 'pos'; seen on a full tmpfs with 2 processes): the full disk is named."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise AttributeError("'Stream' object has no attribute 'pos'")  # noqa: B904
    except AttributeError as exc:
        assert write_error(exc) == ("No space left on device; free some space or choose a "
                                    "folder on another disk")
    assert write_error(ValueError("bad")) == "ValueError: bad; a bug, please report it"

def not_running_pid() -> int:
    """A process id that no process has now (the highest free one)."""
    with open("/proc/sys/kernel/pid_max") as fh:
        top = int(fh.read())
    return next(p for p in range(top - 1, 1, -1) if not os.path.exists(f"/proc/{p}"))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")
def test_stale_staging_folders_of_ended_runs_are_removed(tmp_path):
    ended = not_running_pid()
    host = socket.gethostname()
    names = {
        "ended": f".pyhessian-dist-staging-{ended}-{host}-abc",
        "live": f".pyhessian-dist-staging-{os.getppid()}-{host}-def",
        "mine": f".pyhessian-dist-staging-{os.getpid()}-{host}-ghi",
        "other host": f".pyhessian-dist-staging-{ended}-elsewhere-jkl",
        "other host, old": f".pyhessian-dist-staging-{ended}-elsewhere-mno",
        "older version, old": ".pyhessian-dist-staging-pqr",
        "not ours": ".something-else",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "landscape.png").write_bytes(b"x" * 160_000)
    for key in ("other host, old", "older version, old"):
        os.utime(tmp_path / names[key], (0, 0))
    assert remove_stale_staging(tmp_path) == sorted(
        [names["ended"], names["other host, old"], names["older version, old"]])
    assert remove_stale_staging(tmp_path, own=True) == [names["mine"]]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [names["live"], names["other host"], names["not ours"]])


def test_a_staging_folder_names_its_process(tmp_path):
    with RunOutputs(tmp_path, FILES) as out:
        name = os.path.basename(out.staging)
        assert name.startswith(f".pyhessian-dist-staging-{os.getpid()}-{socket.gethostname()}-")
        assert remove_stale_staging(tmp_path) == []  # a live run's folder is kept
    assert os.listdir(tmp_path) == []


def test_a_failed_run_leaves_no_empty_folder(tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(Interrupted), removed_if_left_empty(tmp_path / "a" / "b", kept,
                                                           tmp_path / "full"):
        (tmp_path / "a" / "b").mkdir(parents=True)
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "net.pkl").write_bytes(b"epoch 1")
        raise Interrupted(signal.SIGTERM)
    assert sorted(os.listdir(tmp_path)) == ["full", "kept"]
    with removed_if_left_empty(tmp_path / "new"):
        (tmp_path / "new").mkdir()
    assert (tmp_path / "new").is_dir()  # a run that succeeded keeps its folder


def test_files_written_as_a_pair_are_replaced_together(tmp_path, monkeypatch):
    import support.files

    for name in ("net.pkl", "net.best.pkl"):
        (tmp_path / name).write_bytes(b"epoch 1")
    real = support.files._write_fd
    calls = []

    def second_fails(fd, data):
        calls.append(data)
        if len(calls) == 2:
            os.close(fd)
            raise OSError(errno.EFBIG, "File too large")
        real(fd, data)

    monkeypatch.setattr(support.files, "_write_fd", second_fails)
    with pytest.raises(OSError):
        atomic_write_files({tmp_path / "net.best.pkl": b"epoch 2",
                            tmp_path / "net.pkl": b"epoch 2 with its training state"})
    assert snapshot(tmp_path) == {"net.best.pkl": b"epoch 1", "net.pkl": b"epoch 1"}


# ---------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("main", [analysis.main, training.main])
@pytest.mark.parametrize("seed", ["99999999999999999999", str(2**64), str(2**32), "-1"])
def test_a_seed_out_of_range_is_one_line(main, seed, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["--seed", seed, "--eigenvalue", "--no-cuda", "--output-dir", str(tmp_path / "o")]
             if main is analysis.main else
             ["--seed", seed, "--no-cuda", "--saving-folder", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert err[0] == (f"error: argument --seed: must be an integer from 0 to 4294967295, got "
                      f"'{seed}' (see --help)")
    assert os.listdir(tmp_path) == []


def test_the_largest_seed_works():
    from support.datasets import hessian_subset

    args = training.parse_args(["--seed", str(2**32 - 1)])
    training.seed_everything(args.seed)
    assert len(hessian_subset(list(range(100)), 10, args.seed)) == 10


def test_a_model_without_parameters_is_refused_before_training(tmp_path, capsys, monkeypatch):
    module = tmp_path / "noparams.py"
    module.write_text("import torch\n\ndef net(num_classes=10):\n    return torch.nn.Flatten()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc = training.main(["--model", "noparams:net", "--dataset", "synthetic", "--no-cuda",
                        "--epochs", "1", "--num-workers", "0",
                        "--saving-folder", str(tmp_path / "ck")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == ("error: noparams:net (10 classes) on synthetic: the model has no "
                      "trainable parameters (none, or all with requires_grad=False); the "
                      "Hessian needs at least one")
    assert not (tmp_path / "ck").exists()


# ---------------------------------------------------------------------------- numbers
def test_a_zero_block_is_known_after_one_shared_product():
    """A parameter the loss never uses: its Hessian block is zero, known from the first
    product (shared with the other blocks' first step) instead of one product per entry."""
    from pyhessian_dist import DenseOperator, lanczos_eigenpairs, lanczos_group_eigenpairs

    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = torch.zeros(62, 62, dtype=torch.float64)
    A[:6, :6] = B @ B.T  # 56 unused coordinates after the first 6
    op = DenseOperator(A)
    used, unused = lanczos_group_eigenpairs(op, [slice(0, 6), slice(6, 62)], k=1, max_steps=60,
                                            tol=1e-8, generator=g)
    assert unused.num_matvecs == 1 and unused.converged
    assert unused.eigenvalues == [0.0] and unused.error_bounds == [0.0]
    assert used.eigenvalues[0] == pytest.approx(torch.linalg.eigvalsh(B @ B.T)[-1].item())
    two = lanczos_eigenpairs(DenseOperator(torch.zeros(56, 56, dtype=torch.float64)), k=2,
                             generator=g)
    assert two.num_matvecs == 2 and two.converged and two.eigenvalues == [0.0, 0.0]
    assert torch.allclose(two.eigenvectors @ two.eigenvectors.T, torch.eye(2, dtype=torch.float64))


def test_huge_weights_give_a_finite_gradient_norm_and_a_checked_lambda_1():
    """fc weights x 1e30: the gradient's components are finite; its float32 norm overflowed
    (the issue's "gradient norm inf"). lambda_1 (~1e31) is real: a product confirms it."""
    from conftest import trained_resnet8

    from pyhessian_dist import HessianOperator, lanczos_eigenpairs
    from support.datasets import get_datasets
    from support.report import gradient_norm

    model = trained_resnet8()
    with torch.no_grad():
        model.fc.weight.mul_(1e30)
    data = get_datasets("synthetic").train_eval
    x = torch.stack([data[i][0] for i in range(40)])
    y = torch.tensor([data[i][1] for i in range(40)])
    op = HessianOperator(model, torch.nn.CrossEntropyLoss(), [(x[:20], y[:20]), (x[20:], y[20:])])
    assert torch.isfinite(op.gradient()).all()
    assert op.gradient().norm().item() == float("inf")  # float32
    assert 1e29 < gradient_norm(op) < 1e33
    eig = lanczos_eigenpairs(op, k=1, tol=1e-3, generator=torch.Generator().manual_seed(0))
    lam, y1 = eig.eigenvalues[0], eig.eigenvectors[0]
    residual = (op.matvec(y1.float()).double() - lam * y1).norm().item() / abs(lam)
    assert eig.converged and lam > 1e29
    assert residual < 1e-2  # the product agrees with the converged pair (float32 products)


# ---------------------------------------------------------------------------- scripts
DICT = os.path.join(ROOT, "examples", "dict_classifier.py")


def test_a_failed_analysis_leaves_no_empty_output_dir(checkpoint, tmp_path, capsys):
    rc = analysis.main(["--resume", checkpoint, "--eigenvalue", "--no-cuda", "--top-n",
                        "1000000", "--max-iter", "1000000", "--output-dir",
                        str(tmp_path / "new" / "out")])
    assert rc == 2 and "exceeds" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_failed_training_leaves_no_empty_saving_folder(tmp_path, capsys):
    rc = training.main(["--problem", DICT, "--lr", "1e30", "--epochs", "1", "--no-cuda",
                        "--num-workers", "0", "--saving-folder", str(tmp_path / "ck")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: training diverged in epoch 1"), err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("main", [analysis.main, training.main])
def test_resume_of_a_folder_names_the_folder(main, tmp_path, capsys):
    (tmp_path / "net.pkl").write_bytes(b"")
    rc = main(["--resume", str(tmp_path), "--no-cuda"]
              + (["--eigenvalue"] if main is analysis.main else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: checkpoint {tmp_path} is a folder, not a file; pass the "
                               f"checkpoint in it (e.g. {tmp_path / 'net.pkl'})"]


def test_weights_that_make_the_loss_nan_are_one_line(tmp_path, capsys):
    """Every weight x 1e30 (finite): the loss is NaN; one line, exit 2, before any worker."""
    from conftest import trained_resnet8

    from problems import image_record
    from support.checkpoints import save_checkpoint

    model = trained_resnet8()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e30)
    path = tmp_path / "huge.pkl"
    save_checkpoint(path, model, image_record(model, "synthetic"), epoch=1, test_accuracy=None,
                    args={})
    rc = analysis.main(["--resume", str(path), "--eigenvalue", "--no-cuda", "--output-dir",
                        str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert rc == 2 and captured.err.strip().splitlines() == [
        "error: ResNet8 (batch_norm=True, residual=True) on synthetic: the loss of a first "
        "batch is nan at these weights; check the weights, the data and the loss"]
    assert "loading" not in captured.out


def test_a_failed_curvature_figure_does_not_stop_training(tmp_path, capsys, monkeypatch):
    """The figure is a view of net.curvature.json (which holds every check): a warning, and
    training goes on with every checkpoint."""
    import support.curvature

    monkeypatch.setattr(support.curvature, "plot_curvature", no_space)
    rc = training.main(["--problem", DICT, "--epochs", "2", "--hessian-every", "1",
                        "--hessian-samples", "100", "--hessian-mini-batch", "50", "--no-cuda",
                        "--num-workers", "0", "--saving-folder", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    png, js = tmp_path / "net.curvature.png", tmp_path / "net.curvature.json"
    warning = (f"warning: could not draw {png} (No space left on device; free some space or "
               f"choose a folder on another disk); training goes on: {js} holds every check, "
               "and the figure is drawn again at the next check")
    assert captured.out.count(warning) == 2 and "epoch 2/2" in captured.out
    assert sorted(os.listdir(tmp_path)) == ["net.best.pkl", "net.curvature.json", "net.pkl"]
