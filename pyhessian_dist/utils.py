"""PyHessian's helpers on lists of per-parameter tensors, with the same names and meaning.

Code written against PyHessian keeps working after changing ``pyhessian`` to
``pyhessian_dist`` in ``from pyhessian.utils import ...``. Vectors here are lists of tensors
shaped like the model's trainable parameters (the library itself uses flat vectors).
"""
from __future__ import annotations

import torch

__all__ = ["get_params_grad", "group_add", "group_product", "hessian_vector_product",
           "normalization", "orthnormal"]


def group_product(xs, ys):
    """Inner product sum_i <xs[i], ys[i]> of two lists of tensors (a 0-dim tensor)."""
    return sum(torch.sum(x * y) for x, y in zip(xs, ys))


def group_add(params, update, alpha=1):
    """In place: params[i] += alpha * update[i] for every i; returns ``params``."""
    for p, u in zip(params, update):
        p.data.add_(u * alpha)
    return params


def normalization(v):
    """``v / (||v|| + 1e-6)`` for a list of tensors (PyHessian's guard against zero)."""
    norm = float(group_product(v, v)) ** 0.5
    return [vi / (norm + 1e-6) for vi in v]


def get_params_grad(model):
    """(trainable parameters, their ``.grad`` + 0, or 0. where a parameter has no gradient)."""
    params, grads = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        params.append(p)
        grads.append(0.0 if p.grad is None else p.grad + 0.0)
    return params, grads


def hessian_vector_product(gradsH, params, v):
    """H v from a gradient ``gradsH`` computed with ``create_graph=True`` (graph kept)."""
    return torch.autograd.grad(gradsH, params, grad_outputs=v, only_inputs=True,
                               retain_graph=True)


def orthnormal(w, v_list):
    """``w`` with its components along each (unit) vector of ``v_list`` removed, normalised."""
    for v in v_list:
        w = group_add(w, v, alpha=-group_product(w, v))
    return normalization(w)
