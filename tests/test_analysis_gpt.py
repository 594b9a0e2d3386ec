"""example_pyhessian_analysis.py on a GPT checkpoint: every analysis, world sizes 1 and 2 give
the same numbers, the attention kernel is named, --resume alone finds the text, bad input."""
import json
import os

import pytest
import torch

from problems import TextProblem, generated_text, gpt_arch
from support.checkpoints import save_checkpoint
from test_analysis import run

ARCH = gpt_arch(n_layer=1, n_head=2, n_embd=16, block_size=16)
EVERY = ["--hessian-batch-size", "30", "--mini-hessian-batch-size", "12", "--no-cuda",
         "--port", "0", "--eigenvalue", "--top-n", "2", "--bottom-n", "1",
         "--save-eigenvectors", "--trace", "--trace-rse", "0.2", "--per-layer", "--diagonal",
         "--density", "--lanczos-iter", "8", "--landscape", "1d", "--landscape-points", "5",
         "--max-iter", "40", "--per-layer-tol", "0.05"]


@pytest.fixture(scope="module")
def gpt_checkpoint(tmp_path_factory):
    """A GPT (11,760 parameters, context 16) after 40 AdamW steps on the generated text."""
    folder = tmp_path_factory.mktemp("gpt")
    text = folder / "generated.txt"
    text.write_text(generated_text(8000))
    problem = TextProblem(str(text), ARCH)
    torch.manual_seed(0)
    model = problem.model()
    data = problem.dataset("train")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        batch = problem.collate([data[i] for i in torch.randint(0, len(data), (16,),
                                                                generator=g).tolist()])
        opt.zero_grad()
        problem.loss(problem.forward(model, batch), batch).backward()
        opt.step()
    path = folder / "net.pkl"
    save_checkpoint(path, model, problem.record(), epoch=1, test_accuracy=None, args={})
    return str(path), str(text)


def analyse(checkpoint, out, extra=()):
    proc = run(["--resume", checkpoint, "--output-dir", str(out), *EVERY, *extra], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc


@pytest.mark.slow
def test_every_analysis_on_the_gpt_on_one_and_two_processes(gpt_checkpoint, tmp_path):
    path, text = gpt_checkpoint
    one, proc = analyse(path, tmp_path / "one", ["--device_count", "1"])
    two, _ = analyse(path, tmp_path / "two", ["--device_count", "2"])
    out = proc.stdout
    assert "GPT (1 layer, 2 heads, width 16, context 16, vocabulary 256)" in out
    assert ("attention: 1 scaled_dot_product_attention call(s) per forward; Hessian products "
            "run them on the math kernel (torch's default here: flash attention (CPU)") in out
    assert "blocks of 16 byte tokens: 30 samples" in out
    for key in ("***Top Eigenvalues:", "***Bottom Eigenvalues:", "***Trace:", "***Per-layer",
                "***Density:", "***Block spectra (module: 12 groups"):
        assert key in out, key
    r1, r2 = one["results"], two["results"]
    assert one["operator"]["attention"]["products_kernel"] == "math"
    assert one["model"]["problem"]["kind"] == "text" and one["model"]["arch"] == ARCH
    assert one["model"]["problem"]["path"] == text  # --resume alone found the text
    assert r1["eigenvalue"]["eigenvalues"] == pytest.approx(r2["eigenvalue"]["eigenvalues"],
                                                           rel=1e-5)
    assert r1["trace"]["trace"] == pytest.approx(r2["trace"]["trace"], rel=1e-5)
    assert r1["bottom"]["eigenvalues"][0] < 0 < r1["eigenvalue"]["eigenvalues"][1]
    blocks = r1["block_spectra"]
    assert [g["name"] for g in blocks["groups"]] == [row["name"] for row in r1["per_layer"]] == [
        "wte", "wpe", "h.0.ln_1", "h.0.attn.query", "h.0.attn.key", "h.0.attn.value",
        "h.0.attn.proj", "h.0.ln_2", "h.0.mlp.fc", "h.0.mlp.proj", "ln_f", "lm_head"]
    assert all(sum(w) == pytest.approx(1.0) for g in blocks["groups"] for w in g["weights"])
    assert 0 < blocks["js_distance"] < 1
    assert blocks["js_distance"] == pytest.approx(r2["block_spectra"]["js_distance"], rel=1e-4)
    assert blocks["num_matvecs"] == sum(min(8, g["num_parameters"]) for g in blocks["groups"])
    assert one["costs"]["block_spectra"]["num_matvecs"] == blocks["num_matvecs"]
    assert blocks["operator_calls"] == 8
    land = r1["landscape"]
    check = land["curvature_check"]
    assert check["piecewise_ops"] == []  # GELU, softmax, LayerNorm: smooth
    assert check["relative_difference"] < 0.02  # second difference along v1 ~ lambda_1
    assert 0 < land["accuracy_at_zero"] < 1  # next-token accuracy
    for name in ("block_spectra.png", "per_layer.png", "landscape.png", "eigenvectors.pt",
                 "hessian_diagonal.pt", "example.pdf"):
        assert os.path.getsize(tmp_path / "one" / name) > 0, name


def test_block_size_beyond_the_context_and_bad_texts(gpt_checkpoint, tmp_path):
    path, _text = gpt_checkpoint
    latin = tmp_path / "latin.txt"
    latin.write_bytes("d\u00e9j\u00e0 vu ".encode("latin-1") * 300)
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)
    for extra, message in (
            (["--block-size", "17"], "--block-size 17 is larger than the model's context of 16 "
                                     "tokens"),
            (["--data-dir", str(latin)], "is not UTF-8: byte 0xe9 at offset 1"),
            (["--data-dir", str(short)], "has 100 bytes, too short for one block of "
                                         "--block-size 16"),
            (["--dataset", "cifar10"], "--dataset cifar10 is an image data set"),
            (["--model", "torchvision.models:resnet18"], "holds the built-in GPT")):
        proc = run(["--resume", path, "--eigenvalue", "--no-cuda", *extra], timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, \
            proc.stderr
        assert "loading the model" not in proc.stdout


def test_a_moved_text_is_named(gpt_checkpoint, tmp_path):
    path, text = gpt_checkpoint
    moved = tmp_path / "net.pkl"
    problem = TextProblem(text, ARCH)
    record = {**problem.record(), "path": str(tmp_path / "gone.txt")}
    save_checkpoint(moved, problem.model(), record, epoch=1, test_accuracy=None, args={})
    proc = run(["--resume", str(moved), "--eigenvalue", "--no-cuda"], timeout=120)
    assert proc.returncode == 2 and "which does not exist here; pass --data-dir FILE" in \
        proc.stderr
