"""training.py end to end on offline data: synthetic, ImageFolder, torchrun/gloo, CLI errors."""
import os
import re
import subprocess
import sys

import pytest
import torch

import training
import utils

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small and fast: ResNet8 on the 5,000 synthetic images, no worker processes.
FAST = ["--dataset", "synthetic", "--depth", "8", "--no-cuda", "--num-workers", "0"]


def run_cli(args, timeout=120, env=None):
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "training.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_accuracy(model, dataset):
    loader = torch.utils.data.DataLoader(dataset, batch_size=500)
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
    return 100.0 * correct / len(dataset)


test_accuracy.__test__ = False  # a helper, not a test


EPOCH_LINE = re.compile(
    r"^epoch (\d+)/(\d+)  train loss \d+\.\d{4} acc \d+\.\d\d%  test loss \d+\.\d{4} acc (\d+\.\d\d)%  "
    r"lr (\d+\.\d{4})  \d+\.\d s$"
)


@pytest.fixture
def small_synthetic(monkeypatch):
    """The synthetic data set generated at 2,000 train / 500 test images to keep tests quick
    (same recipe and seeds, so the same distribution; not a prefix of the full set)."""
    monkeypatch.setattr(utils, "SYNTHETIC_TRAIN_SIZE", 2000)
    monkeypatch.setattr(utils, "SYNTHETIC_TEST_SIZE", 500)


def test_synthetic_training_learns_and_saves(tmp_path, capsys, small_synthetic):
    # Measured with seed 1, ResNet8, batch 32, lr 0.05 on 2,000 images: ~42% test accuracy
    # after epoch 1 and ~70% after epoch 2 (the full set with ResNet20, batch 128: ~23% and
    # ~71%).  50% is far above chance (10%) and clearly below what training reaches.
    rc = training.main(FAST + ["--epochs", "2", "--batch-size", "32", "--lr", "0.05",
                               "--lr-decay-epoch", "1", "--lr-decay", "0.5",
                               "--saving-folder", str(tmp_path / "ck"), "--checkpoint-name", "syn.pkl"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [l for l in out.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 2 and all(EPOCH_LINE.match(l) for l in lines), out
    # MultiStepLR: lr 0.1 in epoch 1, x0.5 after epoch 1
    assert [EPOCH_LINE.match(l).group(4) for l in lines] == ["0.0500", "0.0250"]
    final_acc = float(EPOCH_LINE.match(lines[-1]).group(3))
    assert final_acc > 50.0, out
    path = tmp_path / "ck" / "syn.pkl"
    assert f"checkpoint saved to {path}" in out

    model, meta = utils.load_checkpoint(path)
    assert meta["arch"] == {"name": "resnet", "depth": 8, "batch_norm": True, "residual": True, "num_classes": 10}
    assert meta["source"] == "pyhessian-dist" and meta["dataset"] == "synthetic" and meta["epoch"] == 2
    assert meta["normalization"] == {"mean": list(utils.CIFAR10_MEAN), "std": list(utils.CIFAR10_STD)}
    assert meta["args"]["lr_decay_epoch"] == [1] and meta["args"]["seed"] == 1
    assert meta["args"]["world_size"] == 1
    assert meta["test_accuracy"] == pytest.approx(final_acc, abs=0.01)
    # the saved model is the one that was evaluated
    data = utils.get_datasets("synthetic", normalization=meta["normalization"])
    assert test_accuracy(model, data.test) == pytest.approx(meta["test_accuracy"], abs=0.2)
    assert os.listdir(tmp_path / "ck") == ["syn.pkl"]  # no temp files left behind


def test_no_bn_no_residual_variant_trains(tmp_path, capsys, small_synthetic):
    rc = training.main(FAST + ["--epochs", "1", "--no-batch-norm", "--no-residual", "--lr", "0.02",
                               "--saving-folder", str(tmp_path)])
    assert rc == 0, capsys.readouterr()
    model, meta = utils.load_checkpoint(tmp_path / "net.pkl", batch_norm=False, residual=False)
    assert (meta["arch"]["batch_norm"], meta["arch"]["residual"]) == (False, False)
    with pytest.raises(utils.CheckpointError, match="--batch-norm was given"):
        utils.load_checkpoint(tmp_path / "net.pkl", batch_norm=True)


def test_imagefolder_training(tmp_path, capsys):
    from test_data import make_image_tree

    make_image_tree(tmp_path / "imgs", classes=("a", "b", "c"), per_class=4, size=(20, 45))
    rc = training.main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--depth", "8",
                        "--epochs", "1", "--batch-size", "5", "--no-cuda", "--num-workers", "0",
                        "--saving-folder", str(tmp_path / "ck")])
    out = capsys.readouterr().out
    assert rc == 0 and "12 train / 12 test, 3 classes" in out
    model, meta = utils.load_checkpoint(tmp_path / "ck" / "net.pkl")
    assert meta["arch"]["num_classes"] == 3 and meta["dataset"] == "imagefolder"
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def help_entries(text):
    """{option string: its help entry (one line)} from argparse's options section."""
    entries, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current = [line.strip()]
            head = line.strip().split("  ")[0]
            for opt in re.findall(r"--?[\w-]+", head):
                entries[opt] = current
        elif current is not None and line.strip():
            current.append(line.strip())
    return {k: " ".join(v) for k, v in entries.items()}


def test_help_lists_every_flag_with_default():
    res = run_cli(["--help"])
    assert res.returncode == 0
    entries = help_entries(res.stdout)
    expected = {
        "--batch-size": "128", "--test-batch-size": "256", "--epochs": "180", "--lr": "0.1",
        "--lr-decay": "0.1", "--lr-decay-epoch": "[80, 120]", "--seed": "1", "--weight-decay": "0.0005",
        "--batch-norm": "True", "--no-batch-norm": "True", "--residual": "True", "--no-residual": "True",
        "--cuda": "True", "--no-cuda": "True", "--saving-folder": "checkpoints/",
        "--depth": "20", "--dataset": "cifar10", "--data-dir": "data", "--num-workers": "2",
        "--checkpoint-name": "net.pkl",
    }
    for flag, default in expected.items():
        assert flag in entries, flag
        assert entries[flag].endswith(f"(default: {default})"), (flag, entries[flag])
    assert "batch-size // WORLD_SIZE" in entries["--batch-size"]
    assert "{cifar10,cifar100,imagefolder,synthetic}" in entries["--dataset"]


BAD_VALUES = [
    (["--epochs", "-1"], "--epochs: must be a positive integer"),
    (["--epochs", "0"], "--epochs: must be a positive integer"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--lr", "0"], "--lr: must be a positive number"),
    (["--lr", "nan"], "--lr: must be a positive number"),
    (["--dataset", "nope"], "--dataset: invalid choice: 'nope'"),
    (["--depth", "21"], "--depth: must be 6n+2"),
    (["--num-workers", "-1"], "--num-workers: must be a non-negative integer"),
    (["--lr-decay-epoch", "x"], "--lr-decay-epoch: must be a positive integer"),
    (["--checkpoint-name", "a/b.pkl"], "--checkpoint-name: must be a plain file name"),
]


@pytest.mark.parametrize("args,message", BAD_VALUES)
def test_bad_values_in_process(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        training.main(args + ["--no-cuda"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    errors = [l for l in err.splitlines() if "error:" in l]
    assert len(errors) == 1 and message in errors[0], err


def test_missing_imagefolder_in_process(tmp_path, capsys):
    rc = training.main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "nonexistent"), "--no-cuda",
                        "--saving-folder", str(tmp_path / "ck")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: image folder ") and "nonexistent" in err[0]
    assert not (tmp_path / "ck").exists()  # nothing written on failure


def test_unwritable_saving_folder(tmp_path, capsys, small_synthetic):
    (tmp_path / "file").write_text("x")
    rc = training.main(FAST + ["--epochs", "1", "--saving-folder", str(tmp_path / "file" / "sub")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot create --saving-folder")


@pytest.mark.parametrize("args,message", [
    (["--depth", "21"], "argument --depth: must be 6n+2"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent"], "error: image folder /nonexistent/train does not exist"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}"], "error: CIFAR-10 is not in"),
])
def test_bad_values_cli_one_line_no_traceback(args, message, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path / "data")) for a in args]
    env = dict(os.environ)
    # no network: point any download at a proxy that cannot exist so it fails at once
    env.update(https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9")
    res = run_cli(args + ["--saving-folder", str(tmp_path / "ck")], env=env)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1 and message in lines[0], res.stderr
    if "image folder" in message or "CIFAR" in message:
        # one warning line (default --cuda on a GPU-less machine) at most, then the error
        other = [l for l in res.stderr.splitlines() if l.strip() and "error:" not in l]
        assert all(l.startswith("warning: --cuda requested") for l in other), res.stderr
        assert res.returncode == 2


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_ddp_gloo_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           os.path.join(ROOT, "training.py"), *FAST, "--epochs", "1", "--batch-size", "64",
           "--saving-folder", str(tmp_path)]
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun training did not finish within 300 s")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    # rank 0 alone prints: one header, one epoch line, one final line
    assert out.count("2 process(es), batch 32 per process") == 1, out
    epoch_lines = [l for l in out.splitlines() if l.startswith("epoch ")]
    assert len(epoch_lines) == 1 and EPOCH_LINE.match(epoch_lines[0]), out
    model, meta = utils.load_checkpoint(tmp_path / "net.pkl")
    assert meta["args"]["world_size"] == 2 and meta["epoch"] == 1 and meta["arch"]["depth"] == 8
    # the sharded, all-reduced test accuracy is that of the saved (rank-0) model on the whole test set
    printed = float(EPOCH_LINE.match(epoch_lines[0]).group(3))
    data = utils.get_datasets("synthetic")
    assert test_accuracy(model, data.test) == pytest.approx(printed, abs=0.2)
    assert meta["test_accuracy"] == pytest.approx(printed, abs=0.01)


def test_progress_only_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    p = training._Progress(True, 10, "epoch 1/2")
    p.update(3, 1.0)
    p.close()
    assert capsys.readouterr().err == ""

    class FakeTTY:
        def __init__(self):
            self.text = ""

        def isatty(self):
            return True

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    p = training._Progress(True, 10, "epoch 1/2")
    p.update(3, 1.25)
    assert fake.text == "\repoch 1/2 3/10  loss 1.2500"
    p.close()
    assert fake.text.endswith("\r") and "\n" not in fake.text
    quiet = training._Progress(False, 10, "x")  # ranks other than 0
    quiet.update(1, 1.0)
    assert fake.text.endswith("\r")
