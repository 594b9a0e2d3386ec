"""The text problem (problems/text.py): byte tokens, blocks, splits, the loss and its exact
weighting, the generated text, bad files, checkpoints and which problem a command line means."""
import collections
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from problems import TextProblem, analysis_problem, generated_text, gpt_arch, training_problem
from problems.text import TextBlocks, read_text_bytes
from support.checkpoints import read_checkpoint, save_checkpoint
from support.errors import DataError, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = gpt_arch(n_layer=1, n_head=2, n_embd=8, block_size=16)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "generated.txt"
    path.write_text(generated_text(5000))
    return path


# ------------------------------------------------------------------ the generated text
def test_generated_text_is_deterministic_sized_ascii_and_learnable():
    text = generated_text(20_000)
    assert text == generated_text(20_000) and len(text.encode()) == 20_000 and text.isascii()
    assert generated_text(20_000, seed=1) != text
    assert text.startswith("Note 1: ") and "\n\nNote 2: " in text
    data = text.encode()
    unigram = collections.Counter(data)
    h1 = -sum(c / len(data) * math.log2(c / len(data)) for c in unigram.values())
    pairs = collections.Counter(zip(data, data[1:]))
    h2 = -sum(c / (len(data) - 1) * math.log2(c / unigram[a]) for (a, _b), c in pairs.items())
    # structure a model can learn: the next byte is far more predictable given the last one
    assert h1 > 4.0 and h2 < 0.65 * h1


def test_write_text_command(tmp_path):
    path = tmp_path / "sub" / "demo.txt"
    proc = subprocess.run([sys.executable, "-m", "problems.write_text", "--write", str(path),
                           "--bytes", "1234"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert path.read_bytes() == generated_text(1234).encode() and proc.stderr == ""


# ------------------------------------------------------------------ data and loss
def test_blocks_splits_and_targets(text_file):
    problem = TextProblem(str(text_file), SMALL)
    data = text_file.read_bytes()
    train, test = problem.dataset("train"), problem.dataset("test")
    cut = len(data) - len(data) // 10  # the last tenth is the test split
    assert len(train) == (cut - 1) // 16 and len(test) == (len(data) - cut - 1) // 16
    x, y = train[3]
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (16,)
    assert bytes(x.tolist()) == data[48:64] and bytes(y.tolist()) == data[49:65]
    tx, _ = test[0]
    assert bytes(tx.tolist()) == data[cut:cut + 16]
    assert len(TextBlocks(torch.zeros(16, dtype=torch.uint8), 16)) == 0  # needs B + 1 bytes
    with pytest.raises(IndexError):
        train[len(train)]


def test_loss_is_the_mean_over_tokens_and_weighting_by_samples_is_exact(text_file):
    problem = TextProblem(str(text_file), SMALL)
    torch.manual_seed(0)
    model = problem.model().double().eval()
    train = problem.dataset("train")
    batch = problem.collate([train[i] for i in range(5)])
    out = problem.forward(model, batch)
    per_token = F.cross_entropy(out.reshape(-1, 256), batch[1].reshape(-1), reduction="none")
    assert problem.loss(out, batch).item() == pytest.approx(per_token.mean().item(), rel=1e-14)
    # two mini-batches weighted by their sample counts give the loss of the union
    a = problem.collate([train[i] for i in range(2)])
    b = problem.collate([train[i] for i in range(2, 5)])
    weighted = (2 * problem.loss(problem.forward(model, a), a)
                + 3 * problem.loss(problem.forward(model, b), b)) / 5
    assert weighted.item() == pytest.approx(problem.loss(out, batch).item(), rel=1e-14)
    accuracy = problem.accuracy(out, batch)
    assert accuracy == pytest.approx((out.argmax(-1) == batch[1]).double().mean().item())
    assert problem.loss_text(math.log(2)) == "0.6931 (1.000 bits/byte)"


def test_record_and_descriptions(text_file):
    problem = TextProblem(str(text_file), SMALL, block_size=8)
    record = problem.record()
    assert record["kind"] == "text" and record["arch"] == SMALL and record["block_size"] == 8
    assert record["path"] == str(text_file) and record["num_bytes"] == 5000
    assert len(record["sha256"]) == 64
    assert problem.describe() == ("GPT (1 layer, 2 heads, width 8, context 16, vocabulary "
                                  "256)")
    assert "blocks of 8 byte tokens" in problem.hessian_split
    assert problem.recipe()["optimizer"] == "adamw"


# ------------------------------------------------------------------ bad input
def test_bad_text_files(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 ".encode("latin-1") * 500)
    with pytest.raises(DataError, match=r"is not UTF-8: byte 0xe9 at offset 3"):
        read_text_bytes(str(latin))
    with pytest.raises(DataError, match="is a folder"):
        read_text_bytes(str(tmp_path))
    with pytest.raises(DataError, match="no such file"):
        read_text_bytes(str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("x" * 169)
    with pytest.raises(DataError, match="has 169 bytes, too short for one block of "
                                        "--block-size 16 .* at least 170 bytes"):
        TextProblem(str(short), SMALL).dataset("train")
    short.write_text("x" * 170)
    assert len(TextProblem(str(short), SMALL).dataset("test")) == 1
    with pytest.raises(UserError, match="--block-size 32 is larger than the model's context "
                                        "of 16 tokens"):
        TextProblem(str(short), SMALL, block_size=32)


# ------------------------------------------------------------------ which problem
def training_args(**kw):
    values = dict(problem=None, model=None, dataset="cifar10", data_dir="data", depth=20,
                  batch_norm=True, residual=True, image_size=32, n_layer=None, n_head=None,
                  n_embd=None, block_size=None, seed=1)
    values.update(kw)
    return SimpleNamespace(**values)


@pytest.mark.parametrize("kw, given, message", [
    (dict(model="gpt"), ["model"], "--model gpt is a language model: train it on --dataset "
                                   "text --data-dir FILE"),
    (dict(model="gpt", dataset="synthetic"), ["model", "dataset"], "not on the image data "
                                                                   "set synthetic"),
    (dict(dataset="text", model="torchvision.models:resnet18"), ["model", "dataset"],
     "--dataset text trains the built-in GPT"),
    (dict(dataset="text", depth=32), ["dataset", "depth"], "--depth describes the built-in "
                                                           "ResNet, not the GPT"),
    (dict(n_layer=3), ["n_layer"], "--n-layer describes the GPT"),
    (dict(dataset="text", n_embd=10, n_head=4), ["dataset"], "--n-embd 10 must be a multiple "
                                                              "of --n-head 4"),
])
def test_training_problem_refuses(kw, given, message):
    with pytest.raises(UserError, match=message):
        training_problem(training_args(**kw), given)


def test_training_problem_of_the_flags(text_file):
    problem = training_problem(training_args(dataset="text", data_dir=str(text_file),
                                             n_layer=3, block_size=32), ["dataset"])
    assert isinstance(problem, TextProblem)
    assert problem.arch == {"name": "gpt", "n_layer": 3, "n_head": 4, "n_embd": 64,
                            "block_size": 32, "vocab_size": 256}


def analysis_args(resume, **kw):
    values = dict(problem=None, resume=str(resume), model=None, batch_norm=None, residual=None,
                  dataset=None, data_dir=None, image_size=None, block_size=None, seed=1)
    values.update(kw)
    return SimpleNamespace(**values)


def test_checkpoint_rebuilds_the_problem_and_finds_its_text(tmp_path, text_file):
    problem = TextProblem(str(text_file), SMALL)
    torch.manual_seed(0)
    path = tmp_path / "net.pkl"
    save_checkpoint(path, problem.model(), problem.record(), epoch=1, test_accuracy=None,
                    args={})
    _weights, meta = read_checkpoint(path)
    assert meta["problem"]["kind"] == "text" and meta["arch"] == SMALL
    # --resume alone: the recorded file, block size and sizes
    again, _sd, _meta, notes = analysis_problem(analysis_args(path), [])
    assert again.path == str(text_file) and again.block_size == 16 and notes == []
    # --data-dir another text: a note that it differs; --block-size within the context
    other = tmp_path / "other.txt"
    other.write_text(generated_text(5000, seed=3))
    again, _sd, _meta, notes = analysis_problem(
        analysis_args(path, data_dir=str(other), block_size=8), ["block_size"])
    assert again.block_size == 8 and "is not the text checkpoint" in notes[0]
    with pytest.raises(UserError, match="larger than the model's context of 16"):
        analysis_problem(analysis_args(path, block_size=17), ["block_size"])
    with pytest.raises(UserError, match="--dataset synthetic is an image data set"):
        analysis_problem(analysis_args(path, dataset="synthetic"), ["dataset"])
    with pytest.raises(UserError, match="--depth describes the built-in ResNet"):
        analysis_problem(analysis_args(path), ["depth"])
    os.rename(text_file, tmp_path / "moved.txt")
    with pytest.raises(UserError, match="which does not exist here; pass --data-dir FILE"):
        analysis_problem(analysis_args(path), [])
    # the model alone needs no text
    from problems import load_checkpoint

    model, _meta = load_checkpoint(path)
    assert sum(p.numel() for p in model.parameters()) == 1 * (12 * 64 + 13 * 8) + (
        256 + 16) * 8 + 16 + 256 * 8


def test_an_image_checkpoint_refuses_the_gpt_flags(checkpoint):
    with pytest.raises(UserError, match="--block-size describes the GPT"):
        analysis_problem(analysis_args(checkpoint, block_size=8), ["block_size"])
    with pytest.raises(UserError, match="--dataset text means the GPT language model"):
        analysis_problem(analysis_args(checkpoint, dataset="text"), ["dataset"])
