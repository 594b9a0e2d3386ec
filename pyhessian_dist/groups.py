"""Parameter groups: which coordinates of the flat parameter vector belong to which layer.

``parameter_groups(names, numels, by)`` cuts the flat vector of trainable parameters (in
``model.named_parameters()`` order, as ``HessianOperator`` flattens them) into named groups:

* ``"module"``: one group per module that owns parameters (``conv1``, ``layer1.0.bn1``, ``fc``);
* ``"stage"``: the top-level children, with the leaf modules before the first container merged
  into ``"stem"`` and those after the last container into ``"head"`` (for the CIFAR ResNet:
  stem = conv1 + bn1, layer1, layer2, layer3, head = fc); a model whose only container is one
  list of blocks (a transformer's ``h.0``, ``h.1``, ...) has one stage per block (for the GPT:
  stem = wte + wpe, h.0, h.1, ..., head = ln_f + lm_head);
* ``"parameter"``: one group per parameter tensor.

Each group is a :class:`ParameterGroup` with a name, the parameter names it holds and the
``index`` of its coordinates (a slice when they are contiguous, which they are for these three
groupings because ``named_parameters`` lists a module's own parameters together).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["GROUPINGS", "ParameterGroup", "parameter_groups"]

GROUPINGS = ("module", "stage", "parameter")


@dataclass(frozen=True)
class ParameterGroup:
    """A named set of coordinates of the flat parameter vector."""

    name: str
    parameters: tuple
    index: slice | torch.Tensor
    num_parameters: int


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else "(root)"


def _stage_keys(names: Sequence[str]) -> list[str]:
    top = [n.split(".")[0] if n.count(".") >= 1 else "(root)" for n in names]
    container = {t for n, t in zip(names, top) if n.count(".") >= 2}
    if not container:  # no nesting (e.g. an MLP): every top-level child is a stage
        return top
    order = list(dict.fromkeys(top))
    first = min(order.index(t) for t in container)
    last = max(order.index(t) for t in container)
    rename = {t: ("stem" if i < first else "head" if i > last else t)
              for i, t in enumerate(order) if t not in container}
    keys = [rename.get(t, t) for t in top]
    blocks = [n.split(".")[1] for n, t in zip(names, top) if t in container]
    if len(container) == 1 and all(b.isdigit() for b in blocks):  # one list of blocks
        keys = [".".join(n.split(".")[:2]) if t in container else k
                for n, t, k in zip(names, top, keys)]
    return keys


def parameter_groups(names: Sequence[str], numels: Sequence[int],
                     by: str = "module") -> list[ParameterGroup]:
    """Groups of the flat vector whose parameters are ``names`` with ``numels`` entries each.

    ``by``: "module", "stage" or "parameter" (see the module docstring). Groups come in the
    order of their first parameter; together they partition ``range(sum(numels))``.
    """
    if by not in GROUPINGS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPINGS)}, got {by!r}")
    if len(names) != len(numels) or not names:
        raise ValueError("need one size per parameter name, and at least one parameter")
    if by == "parameter":
        keys = list(names)
    elif by == "module":
        keys = [_module_of(n) for n in names]
    else:
        keys = _stage_keys(names)
    starts, offset = [], 0
    for n in numels:
        starts.append(offset)
        offset += int(n)
    members: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    groups = []
    for key, idx in members.items():
        pieces = [torch.arange(starts[i], starts[i] + int(numels[i])) for i in idx]
        index = torch.cat(pieces)
        contiguous = all(idx[j + 1] == idx[j] + 1 for j in range(len(idx) - 1))
        if contiguous:
            index = slice(starts[idx[0]], starts[idx[-1]] + int(numels[idx[-1]]))
        groups.append(ParameterGroup(key, tuple(names[i] for i in idx), index,
                                     sum(int(numels[i]) for i in idx)))
    return groups
