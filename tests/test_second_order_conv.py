"""The fused convolution double backward (pyhessian_dist/operators/conv.py) against torch's own,
and HessianOperator with it, channels-last and the plain layout, against exact Hessians."""
import contextlib
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyhessian_dist import HessianOperator
from pyhessian_dist.operators.conv import SecondOrderConv
from tiny import SIZES, dense_hessian, split_uneven

CONFIGS = list(itertools.product([1, 2, 3], [1, 2], [0, 1], [1, 2], [1, 2], [False, True]))


def _two_convs(conv, x, w1, b1, w2, stride, pad, dil, groups):
    h = torch.tanh(conv(x, w1, b1, stride, pad, dil, groups))
    h = conv(h, w2, None, 1, 1, 1, groups)
    return (h ** 2).sum() + torch.sin(h).sum()


def _hvp(loss_fn, params, v, fused):
    with SecondOrderConv() if fused else contextlib.nullcontext():
        g = torch.autograd.grad(loss_fn(), params, create_graph=True)
    out = torch.autograd.grad(g, params, grad_outputs=v, allow_unused=True,
                              materialize_grads=True)
    return torch.cat([t.flatten() for t in out])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_double_backward_equals_torchs(dtype):
    """Two stacked convolutions (the second's input requires grad), every combination of
    dimension, stride, padding, dilation, groups and bias: H v through the fused double
    backward equals torch's, to rounding."""
    g = torch.Generator().manual_seed(0)
    for n, stride, pad, dil, groups, bias in CONFIGS:
        conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]

        def rand(*shape):
            return torch.randn(*shape, generator=g, dtype=dtype)

        x = rand(3, 4, *[7] * n)
        w1 = rand(6, 4 // groups, *[3] * n).requires_grad_()
        w2 = rand(4, 6 // groups, *[2] * n).requires_grad_()
        b1 = rand(6).requires_grad_() if bias else None
        params = [w1, w2] + ([b1] if bias else [])

        loss_fn = functools.partial(_two_convs, conv, x, w1, b1, w2, stride, pad, dil, groups)
        v = [rand(*p.shape) for p in params]
        want = _hvp(loss_fn, params, v, fused=False)
        got = _hvp(loss_fn, params, v, fused=True)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert ((got - want).norm() / want.norm()).item() < tol, (n, stride, pad, dil, groups,
                                                                   bias)


def test_graph_goes_through_the_fused_function():
    """Inside the mode a CPU conv2d is the custom function; padding="same" stays torch's."""
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    mode = SecondOrderConv()
    with mode:
        z = F.conv2d(x, w, padding=1)
        same = F.conv2d(x, w, padding="same")
    assert type(z.grad_fn).__name__ == "_ConvBackward" and mode.calls == 1
    assert z.is_contiguous(memory_format=torch.channels_last)
    assert type(same.grad_fn).__name__ == "ConvolutionBackward0"
    torch.testing.assert_close(z, F.conv2d(x, w, padding=1))


class _CNN(nn.Module):
    """conv -> BatchNorm (eval) -> ReLU -> conv -> tanh -> linear; ``view`` (fails on a
    channels-last activation) or ``flatten`` (copies where it must) before the linear."""

    def __init__(self, use_view):
        super().__init__()
        torch.manual_seed(0)
        self.use_view = use_view
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 3, 3, padding=1, stride=2, bias=False)
        self.fc = nn.Linear(3 * 2 * 2, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = torch.tanh(self.c2(torch.relu(self.bn(self.c1(x)))))
        return self.fc(x.view(x.size(0), -1) if self.use_view else x.flatten(1))


@pytest.mark.parametrize("use_view", [False, True])
def test_float32_cnn_channels_last_or_plain_matches_exact_hessian(use_view):
    """float32 (where channels-last applies): a model that flattens runs channels-last, one
    that calls ``.view`` on a convolution's output falls back to the plain layout; both give
    the exact (float64) Hessian's products."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 2, 4, 4, generator=g)
    y = torch.randint(0, 3, (23,), generator=g)
    model = _CNN(use_view)
    H = dense_hessian(_CNN(use_view).double(), nn.CrossEntropyLoss(), x.double(), y)
    op = HessianOperator(model, nn.CrossEntropyLoss(), split_uneven(x, y, SIZES))
    assert op.channels_last is (not use_view)
    V = torch.randn(3, op.dim, generator=g)
    torch.testing.assert_close(op.matvec(V).double(), V.double() @ H, rtol=1e-4, atol=1e-5)
    # recomputed graphs take the same decision
    op2 = HessianOperator(model, nn.CrossEntropyLoss(), split_uneven(x, y, SIZES),
                          reuse_graph=False)
    torch.testing.assert_close(op2.matvec(V).double(), V.double() @ H, rtol=1e-4, atol=1e-5)
    assert op2.channels_last is (not use_view)


def test_a_real_error_is_not_hidden_by_the_fallback():
    """A forward that fails in any layout raises its own error."""
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 3, 3)

        def forward(self, x):
            return self.c(x).view(-1, 7)  # 3*2*2 = 12 per sample: never a multiple of 7

    x, y = torch.randn(4, 2, 4, 4), torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        HessianOperator(Broken(), nn.CrossEntropyLoss(), [(x, y)])
