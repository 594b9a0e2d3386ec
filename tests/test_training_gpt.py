"""training.py on the GPT: the AdamW recipe with warm-up and cosine decay, bits per byte,
the checkpoint's record, --resume bit for bit, and bad input."""
import argparse
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from test_training import assert_same_tensors, load_raw, per_step_lrs

import training
from problems import generated_text

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "gpt", "--dataset", "text", "--n-layer", "1", "--n-head", "2", "--n-embd",
        "16", "--block-size", "32", "--no-cuda", "--num-workers", "0", "--batch-size", "16"]
GPT_EPOCH = re.compile(
    r"^epoch (\d+)/(\d+)  train loss (\d+\.\d{4}) \((\d+\.\d{3}) bits/byte\) acc \d+\.\d\d%  "
    r"test loss (\d+\.\d{4}) \((\d+\.\d{3}) bits/byte\) acc (\d+\.\d\d)%  lr \S+  \d+\.\d s"
    r"  clipped \d+% of steps$")


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "generated.txt"
    path.write_text(generated_text(20_000))
    return str(path)


def cosine(**kw):
    base = dict(lr=1.0, lr_schedule="cosine", min_lr_factor=0.1, cosine_epochs=4.0,
                warmup_epochs=1.0, lr_decay=0.1, lr_decay_epoch=[80])
    return argparse.Namespace(**{**base, **kw})


def test_cosine_schedule_warms_up_decays_and_stays():
    lrs = per_step_lrs(cosine(), 10, 6)
    assert lrs[:10] == pytest.approx([k / 10 for k in range(1, 11)], rel=1e-12)  # warm-up
    # then 0.1 + 0.9 (1 + cos(pi t)) / 2, t = (k - 10) / 30 up to step 40 (epoch 4)
    for k in (10, 17, 25, 33, 40):
        t = (k - 10) / 30
        assert lrs[k] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * t)), rel=1e-12)
    assert lrs[40:] == pytest.approx([0.1] * 20, rel=1e-12)  # stays at the minimum
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_adamw_decays_matrices_and_embeddings_only():
    from models.gpt import gpt

    model = gpt(n_layer=1, n_head=2, n_embd=8, block_size=8)
    opt = training.make_optimizer(argparse.Namespace(optimizer="adamw", lr=1e-3,
                                                     betas=[0.9, 0.95], weight_decay=0.1), model)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decayed["params"]} == {
        n for n, p in model.named_parameters() if p.dim() == 2}  # wte, wpe, linear weights
    assert "h.0.ln_1.weight" in {names[id(p)] for p in plain["params"]}
    sgd = training.make_optimizer(argparse.Namespace(optimizer="sgd", lr=0.1,
                                                     weight_decay=5e-4), model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


def test_the_gpt_recipe_and_its_line(text):
    args = training.parse_args(TINY + ["--data-dir", text, "--epochs", "3", "--saving-folder",
                                       os.path.join(os.path.dirname(text), "ck")])
    plan = training.validate(args)
    assert (args.optimizer, args.lr_schedule, args.lr, args.weight_decay) == (
        "adamw", "cosine", 3e-3, 0.1)
    assert args.betas == [0.9, 0.95] and args.cosine_epochs == 3.0 and args.batch_size == 16
    model = training.make_model(plan.problem)
    training.resolve_recipe(args, model, plan.problem)
    assert training.recipe_line(args, plan.problem) == (
        "recipe: AdamW lr 0.003, betas (0.9, 0.95), weight decay 0.1 (not on biases and norm "
        "layers), cosine to 0.1 x lr at epoch 3; warm-up 1 epoch(s), gradient clipping 1.0")
    # the images keep the original's recipe and line
    images = training.parse_args(["--dataset", "synthetic", "--no-cuda"])
    training.resolve_optimizer(images)
    assert (images.optimizer, images.lr_schedule) == ("sgd", "multistep")


@pytest.mark.parametrize("extra, message", [
    (["--optimizer", "sgd", "--betas", "0.9", "0.99"], "--betas applies to --optimizer adamw"),
    (["--lr-decay-epoch", "5"], "--lr-decay-epoch does not apply to --lr-schedule cosine"),
    (["--lr-schedule", "multistep", "--cosine-epochs", "5"], "--cosine-epochs does not apply"),
])
def test_optimizer_flags_of_the_other_kind_are_refused(text, extra, message, capsys):
    assert training.main(TINY + ["--data-dir", text, "--epochs", "1"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.slow
def test_gpt_trains_reports_bits_per_byte_and_records_its_problem(text, tmp_path, capsys):
    rc = training.main(TINY + ["--data-dir", text, "--epochs", "3", "--saving-folder",
                               str(tmp_path / "ck")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "GPT (1 layer, 2 heads, width 16, context 32, vocabulary 256)" in out
    epochs = [GPT_EPOCH.match(l) for l in out.splitlines() if l.startswith("epoch ")]
    assert len(epochs) == 3 and all(epochs), out
    for m in epochs:  # bits per byte = loss / ln 2
        assert float(m.group(4)) == pytest.approx(float(m.group(3)) / math.log(2), abs=2e-3)
    first, last = float(epochs[0].group(5)), float(epochs[-1].group(5))
    assert last < first < math.log(256)  # it learns (uniform bytes: ln 256 = 5.55 nats)
    record = load_raw(tmp_path / "ck" / "net.pkl")
    problem = record["problem"]
    assert problem["kind"] == "text" and problem["path"] == os.path.abspath(text)
    assert problem["arch"] == {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16,
                               "block_size": 32, "vocab_size": 256}
    assert record["args"]["optimizer"] == "adamw" and record["args"]["cosine_epochs"] == 3.0


@pytest.mark.slow
def test_resume_continues_exactly_with_adamw_and_cosine(text, tmp_path, capsys):
    common = TINY + ["--data-dir", text]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert training.main(common + ["--epochs", "3", "--saving-folder", str(straight)]) == 0
    # the first part of the split run sets the cosine's horizon to that of the straight run
    assert training.main(common + ["--epochs", "2", "--cosine-epochs", "3",
                                   "--saving-folder", str(split)]) == 0
    torch.manual_seed(12345)  # resume must restore every random state itself
    capsys.readouterr()
    rc = training.main(["--resume", str(split / "net.pkl"), "--epochs", "3", "--no-cuda",
                        "--num-workers", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "AdamW" in out and "cosine to 0.1 x lr at epoch 3" in out
    a, b = load_raw(straight / "net.pkl"), load_raw(split / "net.pkl")
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key  # bit for bit
    sa, sb = a["training_state"], b["training_state"]
    for i in sa["optimizer"]["state"]:
        assert_same_tensors(sa["optimizer"]["state"][i], sb["optimizer"]["state"][i], "adam")
    assert sa["schedule"] == sb["schedule"] and sa["global_step"] == sb["global_step"]


def run_cli(args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "training.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bad_text_input_one_line_before_training(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("na\u00efve ".encode("latin-1") * 400)
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    for args, message in (
            (["--model", "gpt", "--dataset", "synthetic"], "--model gpt is a language model"),
            (["--model", "gpt"], "not on the image data set cifar10"),
            (["--dataset", "text", "--data-dir", str(latin)], "is not UTF-8: byte 0xef at "
                                                               "offset 2"),
            (["--dataset", "text", "--data-dir", str(short)], "has 9 bytes, too short for one "
                                                               "block of --block-size 64"),
            (["--dataset", "text", "--data-dir", str(tmp_path)], "is a folder")):
        proc = run_cli(args + ["--no-cuda", "--saving-folder", str(tmp_path / "ck")])
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "epoch" not in proc.stdout
