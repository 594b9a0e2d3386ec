"""Stochastic Lanczos quadrature for the spectral density (Golub & Meurant 1994; Ghorbani,
Krishnan & Xiao, "An Investigation into Neural Net Optimization via Hessian Eigenvalue
Density", ICML 2019), of an operator or of each of its diagonal blocks (Zhang et al., "Why
Transformers Need Adam: A Hessian Perspective", 2024)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..operators import LinearOperator
from ..results import Callback, DensityResult, Step
from ._common import emit, rademacher, resolve_generator
from .lanczos import Lanczos, group_index, lanczos_step

__all__ = ["slq_density", "slq_group_densities"]


def _quadrature(run: Lanczos) -> tuple[list, list]:
    """SLQ nodes (eigenvalues of T) and weights (squared first components of its
    eigenvectors) of a finished run."""
    theta, S = torch.linalg.eigh(run.T())
    return theta.tolist(), (S[0, :] ** 2).tolist()


def slq_density(op: LinearOperator, *, num_steps: int = 100, num_runs: int = 1,
                runs_per_pass: int = 1, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> DensityResult:
    """Stochastic Lanczos quadrature for the spectral density of A.

    Each of ``num_runs`` runs: m = min(num_steps, dim) Lanczos steps with full
    reorthogonalisation from a normalised Rademacher vector; T_m = S diag(theta) S^T (float64
    eigh); nodes = theta, weights = S[0, :]^2 (they sum to 1). The density estimate is
    (1/num_runs) sum_runs sum_i weights_i delta(x - nodes_i); its first moment estimates
    tr(A)/dim. All runs are returned. ``runs_per_pass`` runs share each operator call.
    Progress steps carry the extreme Ritz values of the first run of the pass.
    """
    if num_runs < 1 or num_steps < 1:
        raise ValueError("num_runs and num_steps must be at least 1")
    generator = resolve_generator(generator)
    nodes, weights, history = [], [], []
    m = min(num_steps, op.dim)
    done = 0
    while done < num_runs:
        r = min(runs_per_pass, num_runs - done)
        runs = [Lanczos(v0, m, generator) for v0 in rademacher((r, op.dim), generator, op.device)]
        label = f"run {done + 1}/{num_runs}" if r == 1 else f"runs {done + 1}-{done + r}/{num_runs}"
        while not runs[0].done:
            lanczos_step(op, runs)
            theta = torch.linalg.eigvalsh(runs[0].T())
            emit(history, callback, Step(done * m + r * runs[0].m,
                                         (theta[0].item(), theta[-1].item()),
                                         label=label, max_matvecs=num_runs * m))
        for run in runs:
            n, w = _quadrature(run)
            nodes.append(n)
            weights.append(w)
        done += r
    return DensityResult(nodes=nodes, weights=weights, num_matvecs=num_runs * m, num_steps=m,
                         num_runs=num_runs, history=history)


def slq_group_densities(op: LinearOperator, groups: Sequence, *, num_steps: int = 100,
                        num_runs: int = 1, generator: torch.Generator | None = None,
                        callback: Callback | None = None) -> list[DensityResult]:
    """Stochastic Lanczos quadrature of every diagonal block ``A_gg`` (g in ``groups``: slices
    or index tensors of coordinates): one SLQ density per block.

    Block g's run is ``slq_density``'s on ``A_gg``: m_g = min(num_steps, n_g) Lanczos steps
    with full reorthogonalisation from a normalised Rademacher vector on g's coordinates,
    nodes = eigenvalues of T, weights = squared first components (summing to 1). The blocks
    still iterating share ONE operator call per step (a ``(G, dim)`` block whose row g is
    zero outside g, read back on g; see ``lanczos_step``), so the products are
    ``num_runs * sum_g m_g`` in ``num_runs * max_g m_g`` operator calls. Each block's basis is
    stored at the block's size. Progress steps carry the block products so far and the
    smallest and largest Ritz value over the blocks (one history, shared by the results).
    Returns one ``DensityResult`` per group.
    """
    if num_runs < 1 or num_steps < 1:
        raise ValueError("num_runs and num_steps must be at least 1")
    generator = resolve_generator(generator)
    indices = [group_index(op, g) for g in groups]
    nodes = [[] for _ in indices]
    weights = [[] for _ in indices]
    history: list = []
    steps = [min(num_steps, n) for _index, n in indices]
    total, budget = 0, num_runs * sum(steps)
    for r in range(num_runs):
        runs = [Lanczos(rademacher((n,), generator, op.device), m, generator, index)
                for (index, n), m in zip(indices, steps)]
        while not all(run.done for run in runs):
            total += lanczos_step(op, runs)
            ritz = [torch.linalg.eigvalsh(run.T()) for run in runs if run.m]
            emit(history, callback, Step(total, (min(t[0].item() for t in ritz),
                                                 max(t[-1].item() for t in ritz)),
                                         label=f"run {r + 1}/{num_runs}, "
                                               f"{sum(run.done for run in runs)}/{len(runs)} "
                                               "blocks done", max_matvecs=budget))
        for g, run in enumerate(runs):
            n, w = _quadrature(run)
            nodes[g].append(n)
            weights[g].append(w)
    return [DensityResult(nodes=nodes[g], weights=weights[g], num_matvecs=num_runs * steps[g],
                          num_steps=steps[g], num_runs=num_runs, history=history)
            for g in range(len(indices))]
