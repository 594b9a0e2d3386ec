"""A small GPT language model (decoder-only transformer) over byte tokens.

Architecture (Radford et al. 2019, GPT-2's pre-LayerNorm layout):

    tokens (n, T) -> wte (token embedding, vocab x C) + wpe (position embedding, context x C)
    h.0 ... h.{L-1}: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))
        attn: query / key / value (C -> C each), causal self-attention over H heads through
              torch.nn.functional.scaled_dot_product_attention, proj (C -> C)
        mlp:  fc (C -> 4C), GELU, proj (4C -> C)
    ln_f -> lm_head (C -> vocab, no bias) -> logits (n, T, vocab)

Query, key and value are separate linear maps (not GPT-2's fused ``c_attn``), so each is a
parameter block of its own for ``--group-by module``, as Zhang et al. (2024) count blocks. The
token embedding and the head are not tied (two blocks). No dropout. Initialisation as GPT-2:
weights N(0, 0.02), biases zero, LayerNorm (1, 0), the two residual projections of each block
N(0, 0.02 / sqrt(2 L)).

Parameters: L (12 C^2 + 13 C) + (vocab + context) C + 2 C + vocab C; the default
``gpt()`` (L=2, H=4, C=64, context 64, vocab 256) has 136,960.

The attention kernel is torch's choice (fused where one applies). Fused kernels have no double
backward; the Hessian operators of ``pyhessian_dist`` run their second-order passes on the
math kernel (see ``pyhessian_dist.attention``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPT_DEFAULTS", "gpt", "gpt_num_parameters"]

#: the default size (fits a CPU demo): layers, heads, embedding width, context
GPT_DEFAULTS = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64, "vocab_size": 256}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate query, key and value maps."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_embd, n_embd)
        self.key = nn.Linear(n_embd, n_embd)
        self.value = nn.Linear(n_embd, n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        n, t, c = x.shape

        def heads(y):  # (n, t, c) -> (n, heads, t, c / heads)
            return y.view(n, t, self.n_head, c // self.n_head).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)),
                                           heads(self.value(x)), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The model of the module docstring; ``forward(tokens (n, T) int64) -> logits (n, T,
    vocab)`` for T <= ``block_size`` (the context)."""

    def __init__(self, n_layer: int = 2, n_head: int = 4, n_embd: int = 64,
                 block_size: int = 64, vocab_size: int = 256):
        super().__init__()
        for name, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd),
                            ("block_size", block_size), ("vocab_size", vocab_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.block_size, self.vocab_size = block_size, vocab_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self._initialise()

    def _initialise(self):
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.h:  # residual projections: GPT-2's 1/sqrt(2 L) scaling
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.n_layer))

    def arch(self) -> dict:
        """The sizes that rebuild this model (``gpt(**arch)`` minus the name)."""
        return {"name": "gpt", "n_layer": self.n_layer, "n_head": self.n_head,
                "n_embd": self.n_embd, "block_size": self.block_size,
                "vocab_size": self.vocab_size}

    def forward(self, tokens):
        t = tokens.shape[1]
        if t > self.block_size:
            raise ValueError(f"a sequence of {t} tokens is longer than the model's context of "
                             f"{self.block_size}")
        pos = torch.arange(t, device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt(n_layer: int = 2, n_head: int = 4, n_embd: int = 64, block_size: int = 64,
        vocab_size: int = 256) -> GPT:
    """A GPT of the given size (defaults: ``GPT_DEFAULTS``)."""
    return GPT(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
               vocab_size=vocab_size)


def gpt_num_parameters(n_layer: int, n_embd: int, block_size: int, vocab_size: int = 256,
                       **_sizes) -> int:
    """The closed form of the module docstring (checked against the model in the tests)."""
    c = n_embd
    return n_layer * (12 * c * c + 13 * c) + (vocab_size + block_size) * c + 2 * c \
        + vocab_size * c
