"""What the estimators share: random vectors from an explicit generator, products in float64,
Gram-Schmidt, standard errors and progress reports."""
from __future__ import annotations

import math

import torch

from ..operators import LinearOperator
from ..results import Callback, Step

F64 = torch.float64


def resolve_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or (for None) a fresh one seeded from torch's global RNG, so that
    repeated calls differ."""
    if generator is not None:
        return generator
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(seed)


def rademacher(shape, generator: torch.Generator, device=None) -> torch.Tensor:
    """float64 +-1 entries drawn from ``generator`` (on its device), then moved to ``device``."""
    r = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return (r.to(F64) * 2 - 1).to(device)


def gaussian(shape, generator: torch.Generator, device=None) -> torch.Tensor:
    """float64 standard normal entries drawn from ``generator``, then moved to ``device``."""
    return torch.randn(shape, generator=generator, device=generator.device, dtype=F64).to(device)


def apply(op: LinearOperator, V: torch.Tensor) -> torch.Tensor:
    """(k, dim) float64 block -> (k, dim) float64 products, one operator call."""
    return op.matvec(V.to(op.dtype)).to(F64)


def orthogonalise(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``w`` (n,) or rows of ``w`` (k, n) without their components along the orthonormal rows
    of ``Q`` (m, n): classical Gram-Schmidt applied twice ("twice is enough", Parlett)."""
    if Q.shape[0] == 0:
        return w
    for _ in range(2):
        w = w - (w @ Q.T) @ Q
    return w


def standard_error(samples) -> float:
    """Standard error of the mean of ``samples`` (NaN for fewer than two)."""
    n = len(samples)
    if n < 2:
        return float("nan")
    return float(torch.tensor(samples, dtype=F64).std(unbiased=True) / math.sqrt(n))


def emit(history: list, callback: Callback | None, step: Step) -> None:
    """Record ``step`` in ``history`` and pass it to ``callback``."""
    history.append(step)
    if callback is not None:
        callback(step)


def check_k(k: int, dim: int) -> None:
    """A ValueError unless 1 <= k <= dim."""
    if not 1 <= k <= dim:
        raise ValueError(f"asked for {k} eigenpairs of a {dim}-dimensional operator; "
                         f"top_n must be between 1 and {dim}")
