"""Stochastic Lanczos quadrature for the spectral density (Golub & Meurant 1994; Ghorbani,
Krishnan & Xiao, "An Investigation into Neural Net Optimization via Hessian Eigenvalue
Density", ICML 2019)."""
from __future__ import annotations

import torch

from ..operators import LinearOperator
from ..results import Callback, DensityResult, Step
from ._common import emit, rademacher, resolve_generator
from .lanczos import Lanczos, lanczos_step

__all__ = ["slq_density"]


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
            theta, S = torch.linalg.eigh(run.T())
            nodes.append(theta.tolist())
            weights.append((S[0, :] ** 2).tolist())
        done += r
    return DensityResult(nodes=nodes, weights=weights, num_matvecs=num_runs * m, num_steps=m,
                         num_runs=num_runs, history=history)
