"""training.py end to end on offline data: synthetic, ImageFolder, spawn and torchrun on gloo, the
recipes with and without BatchNorm, --resume, best/last checkpoints, --model, CLI errors."""
import argparse
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import support.datasets
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
    r"^epoch (\d+)/(\d+)  train loss \d+\.\d{4} acc \d+\.\d\d%  "
    r"test loss \d+\.\d{4} acc (\d+\.\d\d)%  "
    r"lr (\d+\.\d{4})  \d+\.\d s(  clipped \d+% of steps)?$"
)


@pytest.fixture
def small_synthetic(monkeypatch):
    """The synthetic data set generated at 2,000 train / 500 test images to keep tests quick
    (same recipe and seeds, so the same distribution; not a prefix of the full set)."""
    monkeypatch.setattr(support.datasets, "SYNTHETIC_TRAIN_SIZE", 2000)
    monkeypatch.setattr(support.datasets, "SYNTHETIC_TEST_SIZE", 500)


@pytest.mark.slow
def test_synthetic_training_learns_and_saves(tmp_path, capsys, small_synthetic):
    # Measured with seed 1, ResNet8, batch 32, lr 0.05 on 2,000 images: ~42% test accuracy
    # after epoch 1 and ~70% after epoch 2 (the full set with ResNet20, batch 128: ~23% and
    # ~71%).  50% is far above chance (10%) and clearly below what training reaches.
    rc = training.main(FAST + ["--epochs", "2", "--batch-size", "32", "--lr", "0.05",
                               "--lr-decay-epoch", "1", "--lr-decay", "0.5",
                               "--saving-folder", str(tmp_path / "ck"),
                               "--checkpoint-name", "syn.pkl"])
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
    assert meta["arch"] == {"name": "resnet", "depth": 8, "batch_norm": True, "residual": True,
                            "num_classes": 10}
    assert meta["source"] == "pyhessian-dist" and meta["dataset"] == "synthetic"
    assert meta["epoch"] == 2 and meta["image_size"] == 32
    assert meta["normalization"] == {"mean": list(utils.CIFAR10_MEAN),
                                     "std": list(utils.CIFAR10_STD)}
    assert meta["args"]["lr_decay_epoch"] == [1] and meta["args"]["seed"] == 1
    assert meta["args"]["world_size"] == 1
    assert meta["test_accuracy"] == pytest.approx(final_acc, abs=0.01)
    # the saved model is the one that was evaluated
    data = utils.get_datasets("synthetic", normalization=meta["normalization"])
    assert test_accuracy(model, data.test) == pytest.approx(meta["test_accuracy"], abs=0.2)
    # the last epoch (with the training state) and the best one; no temp files left behind
    assert sorted(os.listdir(tmp_path / "ck")) == ["syn.best.pkl", "syn.pkl"]
    best_model, best_meta = utils.load_checkpoint(tmp_path / "ck" / "syn.best.pkl")
    accs = [float(EPOCH_LINE.match(l).group(3)) for l in lines]
    assert best_meta["epoch"] == 1 + accs.index(max(accs))
    assert best_meta["test_accuracy"] == pytest.approx(max(accs), abs=0.01)
    assert "training_state" not in torch.load(tmp_path / "ck" / "syn.best.pkl", weights_only=True)


@pytest.mark.slow
def test_no_bn_no_residual_variant_trains(tmp_path, capsys, small_synthetic):
    rc = training.main(FAST + ["--epochs", "1", "--no-batch-norm", "--no-residual", "--lr", "0.02",
                               "--saving-folder", str(tmp_path)])
    assert rc == 0, capsys.readouterr()
    model, meta = utils.load_checkpoint(tmp_path / "net.pkl", batch_norm=False, residual=False)
    assert (meta["arch"]["batch_norm"], meta["arch"]["residual"]) == (False, False)
    # the recipe without BatchNorm: warm-up and clipping by default
    assert meta["args"]["warmup_epochs"] == training.NO_BN_WARMUP_EPOCHS > 0
    assert meta["args"]["clip_grad_norm"] == training.NO_BN_CLIP_GRAD_NORM > 0
    with pytest.raises(utils.CheckpointError, match="--batch-norm was given"):
        utils.load_checkpoint(tmp_path / "net.pkl", batch_norm=True)


def test_imagefolder_training(tmp_path, capsys):
    from test_data import make_image_tree

    make_image_tree(tmp_path / "imgs", classes=("a", "b", "c"), per_class=4, size=(20, 45))
    rc = training.main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"),
                        "--depth", "8",
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


def test_help_lists_every_flag_with_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as info:
        training.main(["--help"])
    assert info.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    expected = {
        "--batch-size": "128", "--test-batch-size": "256", "--epochs": "180", "--lr": "0.1",
        "--lr-decay": "0.1", "--lr-decay-epoch": "[80, 120]", "--seed": "1",
        "--weight-decay": "0.0005", "--batch-norm": "True", "--no-batch-norm": "True",
        "--residual": "True", "--no-residual": "True",
        "--cuda": "True", "--no-cuda": "True", "--saving-folder": "checkpoints/",
        "--depth": "20", "--dataset": "cifar10", "--data-dir": "data", "--num-workers": "2",
        "--checkpoint-name": "net.pkl", "--image-size": "32", "--device_count": "1",
        "--ip": "127.0.0.1", "--port": "29500", "--backend": "auto", "--hessian-every": "0",
        "--hessian-samples": "500", "--hessian-mini-batch": "100",
    }
    for flag, default in expected.items():
        assert flag in entries, flag
        assert entries[flag].endswith(f"(default: {default})"), (flag, entries[flag])
    assert "batch-size // WORLD_SIZE" in entries["--batch-size"]
    assert "{cifar10,cifar100,imagefolder,synthetic,text}" in entries["--dataset"]
    # defaults that depend on the model: stated in words, no "(default: None)"
    assert "(default: 0 with BatchNorm, 2 without)" in entries["--warmup-epochs"]
    assert "(default: off with BatchNorm, 1 without)" in entries["--clip-grad-norm"]
    for flag in ("--resume", "--overwrite", "--model", "--hessian-trace"):
        assert flag in entries and "(default: None)" not in entries[flag], flag


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
    (["--port", "70000"], "--port: must be between 0 and 65535"),
    (["--device_count", "0"], "--device_count: must be a positive integer"),
    (["--warmup-epochs", "-1"], "--warmup-epochs: must be a non-negative number"),
    (["--clip-grad-norm", "inf"], "--clip-grad-norm: must be a non-negative number"),
    (["--hessian-every", "-2"], "--hessian-every: must be a non-negative integer"),
    (["--image-size", "0"], "--image-size: must be a positive integer"),
    (["--curvature", "gnn"], "--curvature: unknown curvature 'gnn'"),
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
    rc = training.main(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "nonexistent"),
                        "--no-cuda",
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
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent"],
     "error: image folder /nonexistent/train does not exist"),
    (["--dataset", "cifar10", "--data-dir", "{tmp}"], "error: CIFAR-10 is not in"),
])
@pytest.mark.slow
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
    # issue 19: a failed run (here a failed download) leaves no empty --data-dir or
    # --saving-folder behind
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
@pytest.mark.skipif(not (torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()),
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
    # the sharded, all-reduced test accuracy is that of the saved (rank-0) model on the whole
    # test set
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


# ------------------------------------------------------------------ one launch module
@pytest.mark.parametrize("extra,nprocs", [([], 1), (["--device_count", "2"], 2)])
def test_main_goes_through_support_launch(extra, nprocs, monkeypatch, tmp_path, small_synthetic):
    calls = []
    monkeypatch.setattr(training, "launch", lambda fn, args, **kw: calls.append((fn, kw)))
    rc = training.main(FAST + extra + ["--epochs", "1", "--port", "0", "--backend", "gloo",
                                       "--saving-folder", str(tmp_path)])
    assert rc == 0 and len(calls) == 1
    fn, kw = calls[0]
    assert fn is training.train_worker
    assert kw == dict(nprocs=nprocs, cuda=False, backend="gloo", ip="127.0.0.1", port=0)
    assert not hasattr(training, "_env_world") and not hasattr(training, "_collective_call")


@pytest.mark.slow
def test_spawned_ddp_workers(tmp_path, capfd):
    rc = training.main(FAST + ["--epochs", "1", "--batch-size", "64", "--device_count", "2",
                               "--port", "0", "--saving-folder", str(tmp_path)])
    assert rc == 0
    model, meta = utils.load_checkpoint(tmp_path / "net.pkl")
    assert meta["args"]["world_size"] == 2 and meta["epoch"] == 1
    assert capfd.readouterr().out.count("2 process(es), batch 32 per process") == 1
    data = utils.get_datasets("synthetic")
    # the all-reduced test accuracy over both shards is that of the saved model
    assert test_accuracy(model, data.test) == pytest.approx(meta["test_accuracy"], abs=0.2)


# ------------------------------------------------------------------ recipes
def recipe(**kw):
    base = dict(lr=0.1, lr_decay=0.1, lr_decay_epoch=[80, 120], warmup_epochs=0.0,
                lr_schedule="multistep", min_lr_factor=0.1, cosine_epochs=180.0)
    return argparse.Namespace(**{**base, **kw})


def per_step_lrs(args, steps_per_epoch, epochs):
    """The learning rate of every step, from training.py's LambdaLR stepped once per step."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, training.lr_factor(args, steps_per_epoch))
    lrs = []
    for _ in range(steps_per_epoch * epochs):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return lrs


def test_bn_recipe_is_the_originals_multisteplr():
    args = recipe(lr_decay_epoch=[2, 4, 4], lr_decay=0.5)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=args.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, args.lr_decay_epoch, args.lr_decay)
    ours = per_step_lrs(args, 10, 7)
    for epoch in range(1, 8):  # the original: scheduler.step() after every epoch
        for step in (0, 5, 9):
            assert ours[(epoch - 1) * 10 + step] == pytest.approx(
                opt.param_groups[0]["lr"], rel=1e-12), (epoch, step)
        opt.step()
        sched.step()


def test_warmup_is_linear_per_step_then_the_schedule():
    args = recipe(warmup_epochs=1.5, lr_decay_epoch=[3])
    expected = [0.1 * k / 6 for k in range(1, 7)] + [0.1] * 6 + [0.01] * 4
    assert per_step_lrs(args, 4, 4) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("batch_norm,warmup,clip", [
    (True, 0.0, 0.0), (False, training.NO_BN_WARMUP_EPOCHS, training.NO_BN_CLIP_GRAD_NORM)])
def test_recipe_defaults_follow_batch_norm(batch_norm, warmup, clip):
    builtin = utils.ImageProblem("synthetic", {"name": "resnet"})
    args = argparse.Namespace(warmup_epochs=None, clip_grad_norm=None)
    training.resolve_recipe(args, utils_resnet(batch_norm), builtin)
    assert (args.warmup_epochs, args.clip_grad_norm) == (warmup, clip)
    given = argparse.Namespace(warmup_epochs=0.0, clip_grad_norm=3.0)  # given flags win
    training.resolve_recipe(given, utils_resnet(batch_norm), builtin)
    assert (given.warmup_epochs, given.clip_grad_norm) == (0.0, 3.0)
    # a problem file: no warm-up and no clipping unless its recipe() or the flags ask
    args = argparse.Namespace(warmup_epochs=None, clip_grad_norm=None)
    training.resolve_recipe(args, utils_resnet(batch_norm), object())
    assert (args.warmup_epochs, args.clip_grad_norm) == (0.0, 0.0)


def utils_resnet(batch_norm):
    from models import resnet

    return resnet(8, batch_norm=batch_norm)


@pytest.mark.slow
def test_no_bn_default_recipe_trains_where_the_original_diverges(tmp_path, capsys,
                                                                 small_synthetic):
    # ResNet20 without BatchNorm at the original's lr 0.1 (batch 32, 63 steps an epoch): the
    # original recipe diverges in the first epoch; the default recipe (warm-up + clipping)
    # trains through the warm-up and on at lr 0.1. Measured on 2000 images: test accuracy 17%
    # after epoch 1 on one machine, 10.2% / 14.0% / 38.0% after epochs 1 / 2 / 3 on another of
    # the same kind (float rounding differs between CPUs), so the test trains 3 epochs.
    no_bn = FAST + ["--depth", "20", "--no-batch-norm", "--batch-size", "32"]
    rc = training.main(no_bn + ["--epochs", "1", "--warmup-epochs", "0", "--clip-grad-norm", "0",
                                "--saving-folder", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: training diverged in epoch 1") and "--lr" in err[0]
    assert "--clip-grad-norm 1" in err[0] and "--warmup-epochs 2" in err[0]
    assert not (tmp_path / "a" / "net.pkl").exists()  # nothing from the diverged epoch
    rc = training.main(no_bn + ["--epochs", "3", "--saving-folder", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [EPOCH_LINE.match(l) for l in out.splitlines() if l.startswith("epoch ")]
    assert len(lines) == 3 and all(lines), out
    assert float(lines[-1].group(3)) > 20.0, out  # chance is 10%
    assert "warm-up 2 epoch(s), gradient clipping 1.0" in out


# ------------------------------------------------------------------ resume, best and last
def load_raw(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # must stay weights-only


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]) or torch.allclose(a[k], b[k], rtol=0, atol=1e-6), (what, k)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, capsys, small_synthetic):
    common = FAST + ["--batch-size", "256", "--hessian-every", "2", "--hessian-samples", "64",
                     "--hessian-mini-batch", "32"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert training.main(common + ["--epochs", "3", "--saving-folder", str(straight)]) == 0
    assert training.main(common + ["--epochs", "2", "--saving-folder", str(split)]) == 0
    # another process would start from other random states: resume must restore them
    torch.manual_seed(12345)
    random.seed(7)
    np.random.seed(3)
    capsys.readouterr()
    rc = training.main(["--resume", str(split / "net.pkl"), "--epochs", "3", "--no-cuda",
                        "--num-workers", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"resuming {split / 'net.pkl'} after epoch 2" in out
    assert [l.split()[1] for l in out.splitlines() if l.startswith("epoch ")] == ["3/3"]

    a, b = load_raw(straight / "net.pkl"), load_raw(split / "net.pkl")
    assert_same_tensors(a["state_dict"], b["state_dict"], "weights")
    sa, sb = a["training_state"], b["training_state"]
    assert (sa["epoch"], sa["global_step"]) == (sb["epoch"], sb["global_step"]) == (3, 24)
    for i in sa["optimizer"]["state"]:
        assert_same_tensors(sa["optimizer"]["state"][i], sb["optimizer"]["state"][i], "momentum")
    assert torch.equal(sa["rng"][0]["torch"], sb["rng"][0]["torch"])
    assert torch.equal(sa["rng"][0]["loader"], sb["rng"][0]["loader"])
    assert (sa["best_epoch"], sa["best_score"], sa["best_by"]) == (
        sb["best_epoch"], sb["best_score"], sb["best_by"])
    assert sa["schedule"] == sb["schedule"]  # the LambdaLR's position
    assert load_raw(straight / "net.best.pkl")["epoch"] == sa["best_epoch"]
    # the curvature file continued: checks after epochs 2 and 3, the same numbers
    import json

    ca = json.loads((straight / "net.curvature.json").read_text())
    cb = json.loads((split / "net.curvature.json").read_text())
    assert [c["epoch"] for c in ca["checks"]] == [c["epoch"] for c in cb["checks"]] == [2, 3]
    assert [e["epoch"] for e in cb["epochs"]] == [1, 2, 3]
    for x, y in zip(ca["checks"], cb["checks"]):
        assert x["lambda_1"] == pytest.approx(y["lambda_1"], rel=1e-5)


def test_refuses_to_overwrite_an_earlier_run(tmp_path, capsys, small_synthetic):
    (tmp_path / "net.pkl").write_bytes(b"an earlier run")
    rc = training.main(FAST + ["--epochs", "1", "--saving-folder", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    for hint in (f"--resume {tmp_path / 'net.pkl'}", "--checkpoint-name", "--saving-folder",
                 "--overwrite"):
        assert hint in err[0], hint
    assert (tmp_path / "net.pkl").read_bytes() == b"an earlier run"
    # a stale best or curvature file counts as an earlier run as well
    (tmp_path / "net.pkl").unlink()
    (tmp_path / "net.best.pkl").write_bytes(b"x")
    assert training.main(FAST + ["--epochs", "1", "--saving-folder", str(tmp_path)]) == 2
    assert "net.best.pkl" in capsys.readouterr().err


def test_overwrite_removes_the_earlier_runs_files_before_training(tmp_path, monkeypatch,
                                                                   small_synthetic, capsys):
    for name in ("net.pkl", "net.best.pkl", "net.curvature.json", "net.curvature.png",
                 "other.pkl"):
        (tmp_path / name).write_bytes(b"old")
    monkeypatch.setattr(training, "run_epoch", lambda *a: None)  # no training needed here
    rc = training.main(FAST + ["--epochs", "1", "--overwrite", "--saving-folder", str(tmp_path)])
    assert rc == 0
    assert sorted(os.listdir(tmp_path)) == ["other.pkl"]
    assert "--overwrite: removed net.pkl, net.best.pkl, net.curvature.json, net.curvature.png" \
        in capsys.readouterr().out


def write_resumable(path, epoch=2, **args):
    from models import resnet

    recorded = dict(vars(training.parse_args(FAST)), **args)
    recorded.pop("given")
    model = resnet(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = {"epoch": epoch, "global_step": 10 * epoch, "optimizer": opt.state_dict(),
             "best_test_accuracy": 50.0, "best_epoch": 1, "world_size": 1,
             "rng": [utils.capture_rng_state(torch.Generator())]}
    utils.save_checkpoint(path, model, utils.image_record(model, "synthetic"), epoch=epoch,
                          test_accuracy=50.0, args=recorded, training_state=state)
    return path


@pytest.mark.parametrize("extra,message", [
    (["--lr", "0.05"], "that run was trained with --lr 0.1, and a resumed run keeps its "
                       "recipe; drop --lr 0.05"),
    (["--no-batch-norm"], "that run was trained with --batch-norm True"),
    (["--epochs", "2"], "already holds epoch 2; pass --epochs N with N > 2"),
])
def test_resume_refuses_a_changed_recipe(tmp_path, capsys, extra, message):
    ckpt = write_resumable(tmp_path / "net.pkl")
    rc = training.main(["--resume", str(ckpt), "--no-cuda"] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_resume_takes_the_runs_flags(tmp_path, monkeypatch, small_synthetic):
    ckpt = write_resumable(tmp_path / "run.pkl", lr=0.05, depth=8, epochs=7)
    seen = {}
    monkeypatch.setattr(training, "launch", lambda fn, a, **kw: seen.update(args=a[0]))
    assert training.main(["--resume", str(ckpt), "--no-cuda"]) == 0
    args = seen["args"]
    assert (args.lr, args.depth, args.epochs, args.dataset) == (0.05, 8, 7, "synthetic")
    assert (args.saving_folder, args.checkpoint_name) == (str(tmp_path), "run.pkl")


def test_resume_from_a_best_checkpoint_points_at_the_last(tmp_path, capsys):
    from models import resnet

    best = tmp_path / "net.best.pkl"
    utils.save_checkpoint(best, resnet(8), utils.image_record(resnet(8), "synthetic"), epoch=1,
                          test_accuracy=1.0, args={})
    assert training.main(["--resume", str(best), "--no-cuda"]) == 2
    err = capsys.readouterr().err
    assert "no training state" in err and f"pass {tmp_path / 'net.pkl'}, the last" in err


# ------------------------------------------------------------------ --model and --image-size
@pytest.mark.parametrize("extra,message", [
    (["--model", "test_models:tiny_cnn", "--depth", "8"],
     "--depth describes the built-in ResNet; drop it"),
    (["--model", "nonexistent_pkg_xyz:net"], "no module named 'nonexistent_pkg_xyz'"),
    (["--model", "torch.nn:NoSuchThing"], "torch.nn has no attribute 'NoSuchThing'"),
    (["--model", "resnet18"], "must be module.path:callable"),
    (["--image-size", "64"], "--image-size applies to --dataset imagefolder only"),
    (["--hessian-trace"], "--hessian-trace needs --hessian-every N"),
    (["--curvature", "ggn"], "--curvature needs --hessian-every N"),
    (["--hessian-every", "1", "--hessian-samples", "50"], "--hessian-mini-batch 100 is larger"),
    (["--hessian-every", "1", "--hessian-samples", "999999"],
     "--hessian-samples 999999 exceeds the 2000 samples"),
])
def test_bad_combinations_one_line_before_training(extra, message, tmp_path, capsys,
                                                   small_synthetic):
    rc = training.main(FAST + ["--epochs", "1", "--saving-folder", str(tmp_path / "ck")] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "ck" / "net.pkl").exists()


def test_image_size_needs_a_model_and_is_recorded(tmp_path, capsys):
    from test_data import make_image_tree

    make_image_tree(tmp_path / "imgs", classes=("a", "b"), per_class=3, size=(50, 40))
    base = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--epochs", "1",
            "--batch-size", "4", "--no-cuda", "--num-workers", "0", "--image-size", "48"]
    assert training.main(base + ["--saving-folder", str(tmp_path / "a")]) == 2
    assert "the built-in CIFAR ResNet takes 32x32 images" in capsys.readouterr().err
    rc = training.main(base + ["--model", "test_models:tiny_cnn",
                               "--saving-folder", str(tmp_path / "b")])
    assert rc == 0, capsys.readouterr()
    model, meta = utils.load_checkpoint(tmp_path / "b" / "net.pkl")
    assert meta["image_size"] == 48
    assert meta["arch"] == {"name": "custom", "spec": "test_models:tiny_cnn", "num_classes": 2}
    data = utils.get_datasets("imagefolder", tmp_path / "imgs", image_size=meta["image_size"])
    assert data.train_eval[0][0].shape == (3, 48, 48) and data.train[0][0].shape == (3, 48, 48)
    assert model(data.test[0][0][None]).shape == (1, 2)


@pytest.mark.slow
def test_torchvision_model_end_to_end(tmp_path, capsys):
    pytest.importorskip("torchvision")
    rc = training.main(["--model", "torchvision.models:resnet18", "--dataset", "synthetic",
                        "--epochs", "1", "--batch-size", "64", "--no-cuda", "--num-workers", "0",
                        "--saving-folder", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "torchvision.models:resnet18 (10 classes), 11,181,642 parameters" in out
    model, meta = utils.load_checkpoint(tmp_path / "net.pkl")
    import torchvision

    assert type(model) is torchvision.models.ResNet and model.fc.out_features == 10
    assert meta["arch"] == {"name": "custom", "spec": "torchvision.models:resnet18",
                            "num_classes": 10}
    assert_same_tensors(model.state_dict(), load_raw(tmp_path / "net.pkl")["state_dict"],
                        "resnet18")
    same, _ = utils.load_checkpoint(tmp_path / "net.pkl", model_spec="torchvision.models:resnet18")
    assert_same_tensors(model.state_dict(), same.state_dict(), "model_spec given")


@pytest.mark.slow
def test_curvature_during_training_of_several_curvatures(tmp_path, capsys, small_synthetic):
    """--hessian-every with --curvature hessian,ggn: one record per curvature and check, each
    line naming its curvature; training itself is unchanged by the checks."""
    import json

    common = FAST + ["--batch-size", "256", "--epochs", "1"]
    assert training.main(common + ["--saving-folder", str(tmp_path / "plain")]) == 0
    assert training.main(common + ["--saving-folder", str(tmp_path / "curv"), "--hessian-every",
                                   "1", "--hessian-samples", "64", "--hessian-mini-batch", "32",
                                   "--curvature", "hessian,ggn", "--hessian-trace"]) == 0
    out = capsys.readouterr().out
    assert "curvature: lambda_1 and the trace of the hessian, ggn after every 1 epoch" in out
    assert "curvature after epoch 1 (step 8): lambda_1" in out
    assert "curvature after epoch 1 (step 8, ggn): lambda_1" in out and "GGN-vector products" in out
    doc = json.loads((tmp_path / "curv" / "net.curvature.json").read_text())
    assert [c["curvature"] for c in doc["checks"]] == ["hessian", "ggn"]
    assert doc["settings"]["curvatures"] == ["hessian", "ggn"]
    assert all(c["lambda_1"] > 0 and c["trace"] > 0 for c in doc["checks"])
    assert (tmp_path / "curv" / "net.curvature.png").read_bytes()[:4] == b"\x89PNG"
    assert_same_tensors(load_raw(tmp_path / "plain" / "net.pkl")["state_dict"],
                        load_raw(tmp_path / "curv" / "net.pkl")["state_dict"], "weights")
