"""Attention in second-order passes: ``scaled_dot_product_attention`` on the math kernel.

torch's fused attention kernels (flash attention on CPU and CUDA, the memory-efficient and
cuDNN kernels on CUDA) have a backward but no double backward and no forward-mode AD: with
torch 2.14 on CPU, ``torch.autograd.grad`` through the gradient of the default kernel raises
"derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented",
and ``torch.func.jvp`` raises "Trying to use forward AD with
_scaled_dot_product_flash_attention_for_cpu that does not support it". The math kernel is the
same attention written with differentiable torch operations (softmax(Q K^T / sqrt(d) + mask) V),
so Hessian-vector products go through it in both modes.

:func:`math_attention` is the context the Hessian operators run their second-order passes in
(first-order passes whose graph is kept for products, recomputed graphs, forward-over-reverse
products); forward-only passes and training keep torch's choice. :class:`AttentionWatch` sees
whether a model calls ``scaled_dot_product_attention`` at all, and :func:`default_kernel` names
the kernel torch picks for such a call, for the set-up line.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionWatch", "default_kernel", "math_attention"]

# aten operators of the fused kernels -> names for people
_KERNELS = {
    "_scaled_dot_product_flash_attention_for_cpu": "flash attention (CPU)",
    "_scaled_dot_product_flash_attention": "flash attention",
    "_scaled_dot_product_efficient_attention": "memory-efficient attention",
    "_scaled_dot_product_cudnn_attention": "cuDNN attention",
    "_scaled_dot_product_fused_attention_overrideable": "a fused kernel",
}


def math_attention():
    """A context in which ``scaled_dot_product_attention`` runs on the math kernel, which
    supports double backward and forward-mode AD (harmless for models without attention)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 has no sdpa_kernel: its CPU path is the math one
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


class AttentionWatch(TorchFunctionMode):
    """Counts ``scaled_dot_product_attention`` calls while active and keeps the shapes, dtype
    and device of the first call's query, key and value (and whether it had a mask)."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.first: dict | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            if self.first is None:
                q, k, v = (args + (None, None, None))[:3]
                if all(isinstance(t, torch.Tensor) for t in (q, k, v)):
                    self.first = {"shapes": [tuple(t.shape) for t in (q, k, v)],
                                  "dtype": q.dtype, "device": q.device,
                                  "is_causal": bool(kwargs.get("is_causal", False)),
                                  "masked": kwargs.get("attn_mask") is not None}
        return func(*args, **kwargs)


def default_kernel(first: dict) -> str:
    """The kernel torch picks by default for a call like ``first`` (from
    :class:`AttentionWatch`), probed on one sample of zeros: a fused kernel's name, or
    "math"."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            if name in _KERNELS:
                self.names.append(name)
            return func(*args, **(kwargs or {}))

    q, k, v = (torch.zeros((1, *s[1:]), dtype=first["dtype"], device=first["device"],
                           requires_grad=True) for s in first["shapes"])
    seen = Seen()
    with seen:
        F.scaled_dot_product_attention(q, k, v, is_causal=first["is_causal"])
    return _KERNELS[seen.names[0]] if seen.names else "math"
