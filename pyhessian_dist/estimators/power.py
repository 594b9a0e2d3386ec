"""Power iteration with Gram-Schmidt deflation, as in PyHessian (Yao, Gholami, Keutzer &
Mahoney, "PyHessian: Neural Networks Through the Lens of the Hessian", 2020)."""
from __future__ import annotations

import torch

from ..operators import LinearOperator
from ..results import Callback, EigenResult, Step
from ._common import F64, apply, check_k, emit, gaussian, orthogonalise, resolve_generator

__all__ = ["power_iteration_eigenpairs"]


def power_iteration_eigenpairs(op: LinearOperator, k: int = 1, *, max_iter: int = 100,
                               tol: float = 1e-3, generator: torch.Generator | None = None,
                               callback: Callback | None = None) -> EigenResult:
    """PyHessian's power iteration with Gram-Schmidt deflation, eigenvectors kept.

    For i = 1..k: start from a Gaussian vector; repeat up to ``max_iter`` times
    v <- v orthogonalised against the i-1 eigenvectors found, normalised; lambda <- v.Av;
    v <- Av/||Av||; stop when |lambda - lambda_prev| / (|lambda_prev| + 1e-6) < tol.
    Converges to the eigenvalues of largest MAGNITUDE, at a rate |lambda_{i+1}/lambda_i|.
    ``residuals`` are those of the last (lambda, v) pair of each eigenvalue.
    """
    check_k(k, op.dim)
    generator = resolve_generator(generator)
    values, vectors, residuals, history = [], [], [], []
    all_converged, total = True, 0
    for i in range(k):
        V = (torch.stack(vectors) if vectors
             else torch.zeros(0, op.dim, dtype=F64, device=op.device))
        v = gaussian((1, op.dim), generator, op.device)
        eig, converged, residual = None, False, float("nan")
        for _it in range(max_iter):
            v = orthogonalise(v, V)
            v = v / v.norm()
            Av = apply(op, v)
            total += 1
            new = float((Av * v).sum())
            residual = float((Av - new * v).norm()) / max(abs(new), 1e-300)
            v = Av / Av.norm().clamp(min=1e-300)
            change = float("nan") if eig is None else abs(new - eig) / (abs(eig) + 1e-6)
            emit(history, callback, Step(total, tuple(values) + (new,),
                                         tuple(float("nan") for _ in values) + (change,),
                                         "relative change", f"eigenvalue {i + 1}",
                                         max_matvecs=k * max_iter))
            done = eig is not None and change < tol
            eig = new
            if done:
                converged = True
                break
        all_converged &= converged
        v = orthogonalise(v, V)
        values.append(eig)
        residuals.append(residual)
        vectors.append((v / v.norm())[0])
    return EigenResult(eigenvalues=values, eigenvectors=torch.stack(vectors), num_matvecs=total,
                       converged=all_converged, method="power", which="LM",
                       residuals=residuals, error_bounds=list(residuals), history=history)
