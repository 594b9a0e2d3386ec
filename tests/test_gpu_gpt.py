"""The GPT on CUDA (marked gpu; skipped without a GPU): products through attention with the
fused CUDA kernels in torch's default choice, and the analysis on CUDA against the CPU.
Run them on a GPU machine with `python -m pytest -m gpu tests/test_gpu_gpt.py`."""
import json

import pytest
import torch
import torch.nn.functional as F
from test_analysis_gpt import gpt_checkpoint  # noqa: F401 - the fixture
from test_gpt import batches_of, forward, loss, reference_hessian, tiny_gpt, tiny_tokens

from pyhessian_dist import HessianOperator
from pyhessian_dist.attention import default_kernel, math_attention
from test_analysis import run

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_default_cuda_kernel_and_the_math_one(dtype):
    """Whatever fused kernel torch picks on this GPU has no double backward (or it is the math
    one); under math_attention a second backward goes through."""
    q, k, v = (torch.randn(2, 4, 64, 32, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    watch_first = {"shapes": [tuple(q.shape)] * 3, "dtype": dtype, "device": q.device,
                   "is_causal": True, "masked": False}
    kernel = default_kernel(watch_first)

    def second():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v), create_graph=True)
        return torch.autograd.grad(sum(g.float().sum() for g in grads), (q, k, v))

    if kernel != "math":
        with pytest.raises(RuntimeError):
            second()
    with math_attention():
        assert all(torch.isfinite(h).all() for h in second())


def test_products_on_cuda_match_the_float64_reference():
    model = tiny_gpt()
    x, y = tiny_tokens()
    H = reference_hessian(model, x, y)
    cuda = tiny_gpt().float().cuda()
    op = HessianOperator(cuda, batches=batches_of(x, y), forward=forward, loss=loss)
    assert op.attention["products_kernel"] == "math"
    V = torch.randn(3, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got = op.matvec(V.float().cuda()).double().cpu()
    scale = (V @ H).abs().max()
    assert (got - V @ H).abs().max() <= 1e-4 * scale


def test_the_analysis_on_cuda_matches_the_cpu(gpt_checkpoint, tmp_path):  # noqa: F811
    path, _text = gpt_checkpoint
    values = {}
    for flag in ("--cuda", "--no-cuda"):
        out = tmp_path / flag.strip("-")
        proc = run(["--resume", path, flag, "--eigenvalue", "--per-layer", "--density",
                    "--lanczos-iter", "8", "--hessian-batch-size", "30",
                    "--mini-hessian-batch-size", "15", "--tol", "1e-5", "--output-dir",
                    str(out)], timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Hessian products run them on the math kernel" in proc.stdout
        values[flag] = json.loads((out / "results.json").read_text())["results"]
    g, c = values["--cuda"], values["--no-cuda"]
    assert g["eigenvalue"]["eigenvalues"][0] == pytest.approx(c["eigenvalue"]["eigenvalues"][0],
                                                              rel=1e-3)
    assert g["block_spectra"]["js_distance"] == pytest.approx(
        c["block_spectra"]["js_distance"], abs=0.02)
