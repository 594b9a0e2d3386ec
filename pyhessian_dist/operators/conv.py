"""Convolutions in Hessian graphs on the CPU: a double backward with fewer, larger calls.

A Hessian-vector product by double backward differentiates each convolution's backward
(``da = conv_backward_input(dz, W)``, ``dW = conv_backward_weight(dz, a)``) once more. Given the
adjoints ``ga`` of ``da`` and ``gW`` of ``dW`` (and ``gb`` of the bias gradient), that is

    d(dz) = conv(ga, W) + conv(a, gW) (+ gb per channel)
    d(a)  = conv_backward_input(dz, gW)
    d(W)  = conv_backward_weight(dz, ga)

torch computes these with four separate calls, one of them a convolution over transposed
operands that copies them. Here the first line is ONE convolution over channel-concatenated
operands, ``conv([ga, a], [W, gW])`` (groups = 1), and the other two are ONE
``convolution_backward`` call with input ``ga`` and weight ``gW``: the same function, equal to
rounding. On the CPU the activations are also laid out channels-last (NHWC), which oneDNN
convolves without reordering. Measured on ResNet20 (one batch of 128, float32, 1 thread, the
same kept graph built both ways, interleaved): 1.27x per HVP, the two changes together (each
alone 1.06-1.11x); the ``conv`` section of ``bench/bench_hvp.py`` measures it.

:class:`SecondOrderConv` is the context that builds convolutions this way: a
``TorchFunctionMode`` that routes ``F.conv1d/2d/3d`` calls on CPU tensors with numeric
padding through :class:`_Conv`; every other call (CUDA tensors, ``padding="same"``,
transposed convolutions) runs as torch runs it. Channels-last changes memory strides only;
a model notices them only where it calls ``.view`` on an activation whose strides forbid it,
which raises, and ``HessianOperator`` then builds its graphs in the plain layout (its
``channels_last`` becomes False). CUDA keeps torch's own path: nothing here was measured on a
GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["SecondOrderConv"]

_convolution_backward = torch.ops.aten.convolution_backward.default
_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _conv(x, w, conf, bias=None):
    stride, padding, dilation, groups = conf
    return torch.convolution(x, w, bias, stride, padding, dilation, False,
                             [0] * len(stride), groups)


def _backward(dz, x, w, conf, mask, bias_sizes=None):
    """``(conv_backward_input(dz, w), conv_backward_weight(dz, x), bias grad)`` as ``mask``
    asks (undefined parts are None)."""
    stride, padding, dilation, groups = conf
    return _convolution_backward(dz, x, w, bias_sizes, stride, padding, dilation, False,
                                 [0] * len(stride), groups, list(mask))


class _ConvBackward(torch.autograd.Function):
    """``(da, dW, db)`` of a convolution from ``(dz, a, W)``; its backward is the double
    backward of the module docstring."""

    @staticmethod
    def forward(dz, a, w, conf, mask):
        bias_sizes = [w.shape[0]] if mask[2] else None
        return _backward(dz, a, w, conf, mask, bias_sizes)

    @staticmethod
    def setup_context(ctx, inputs, output):
        dz, a, w, conf, mask = inputs
        ctx.save_for_backward(dz, a, w)
        ctx.conf, ctx.mask = conf, mask

    @staticmethod
    def backward(ctx, ga, gw, gb):
        dz, a, w = ctx.saved_tensors
        conf, mask = ctx.conf, ctx.mask
        ga = ga if mask[0] else None
        gw = gw if mask[1] else None
        gb = gb if mask[2] else None
        need_dz, need_a, need_w = ctx.needs_input_grad[:3]
        bar_dz = bar_a = bar_w = None
        if need_dz:
            if ga is not None and gw is not None and conf[3] == 1:
                bar_dz = _conv(torch.cat([ga, a], 1), torch.cat([w, gw], 1), conf)
            else:
                parts = [_conv(x, k, conf) for x, k in ((ga, w), (a, gw)) if x is not None
                         and k is not None]
                bar_dz = sum(parts[1:], parts[0]) if parts else None
            if gb is not None:
                gb = gb.view([1, -1] + [1] * (dz.dim() - 2))
                bar_dz = gb.expand(dz.shape) if bar_dz is None else bar_dz + gb
        want_a, want_w = need_a and gw is not None, need_w and ga is not None
        if want_a or want_w:  # both in one call: input ga, weight gW
            ra, rw, _ = _backward(dz, ga if want_w else a, gw if want_a else w, conf,
                                  (want_a, want_w, False))
            bar_a, bar_w = ra, rw
        return bar_dz, bar_a, bar_w, None, None


class _Conv(torch.autograd.Function):
    """A convolution whose backward is :class:`_ConvBackward` (so that a graph built with
    ``create_graph=True`` differentiates it with the fused double backward)."""

    @staticmethod
    def forward(a, w, b, conf):
        return _conv(a, w, conf, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, w, b, conf = inputs
        ctx.save_for_backward(a, w)
        ctx.conf = conf

    @staticmethod
    def backward(ctx, dz):
        a, w = ctx.saved_tensors
        mask = tuple(bool(m) for m in ctx.needs_input_grad[:3])
        da, dw, db = _ConvBackward.apply(dz, a, w, ctx.conf, mask)
        return da, dw, db, None


def _n_tuple(x, n: int) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n


class SecondOrderConv(TorchFunctionMode):
    """While active, ``F.conv1d/2d/3d`` on CPU tensors with numeric padding run as
    :class:`_Conv` (see the module docstring); with ``channels_last`` the input of a 2-d
    float32 convolution is laid out channels-last first (a no-op when it already is)."""

    def __init__(self, channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = _DIMS.get(func)
        if n is not None:
            p = dict(zip(_ARGS, args), **kwargs)
            x, w, padding = p["input"], p["weight"], p.get("padding", 0)
            if not isinstance(padding, str) and x.device.type == "cpu" and x.dim() == n + 2 \
                    and w.device.type == "cpu":
                conf = (_n_tuple(p.get("stride", 1), n), _n_tuple(padding, n),
                        _n_tuple(p.get("dilation", 1), n), int(p.get("groups", 1)))
                if self.channels_last and n == 2 and x.dtype == torch.float32:
                    x = x.contiguous(memory_format=torch.channels_last)
                self.calls += 1
                return _Conv.apply(x, w, p.get("bias"), conf)
        return func(*args, **kwargs)
