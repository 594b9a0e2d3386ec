"""Matrix-free spectral algorithms for a symmetric operator given only by its products.

Every function takes ``matvec`` (v -> A v) plus the size ``dim`` and, for the vectors handed
to ``matvec``, their ``dtype`` and ``device``. With ``batched=True`` the matvec also accepts a
``(k, dim)`` block and returns the ``k`` products row-wise (a ``HessianOperator`` does, and so
does ``lambda V: V @ A`` for a dense symmetric ``A``). Randomness comes only from the explicit
``generator``: seed it identically on every rank and every rank computes the same numbers.
Dot products, norms, Lanczos bases and tridiagonal matrices are kept in float64.

References: Lanczos with full reorthogonalisation (Golub & Van Loan, Matrix Computations,
sec. 10.1); power iteration with deflation and Hutchinson's estimator as in PyHessian (Yao et
al., 2020); Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021); stochastic Lanczos
quadrature (Golub & Meurant 1994; Ghorbani, Krishnan & Xiao, ICML 2019).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = [
    "EigenResult", "TraceResult", "DensityResult", "rademacher", "lanczos_tridiagonal",
    "lanczos_top_eigenpairs", "power_iteration_top_eigenpairs", "hutchinson_trace",
    "hutchpp_trace", "slq_density",
]

F64 = torch.float64
Matvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EigenResult:
    """Top-k eigenpairs. ``eigenvectors`` is ``(k, dim)`` float64 with unit rows."""
    eigenvalues: list
    eigenvectors: torch.Tensor
    num_matvecs: int
    converged: bool
    method: str
    residuals: list = field(default_factory=list)  # relative: ||A v - lambda v|| / |lambda|
    history: list = field(default_factory=list)    # one dict per step: matvecs, estimates, ...


@dataclass
class TraceResult:
    """trace(A) estimate; ``stderr`` is the standard error of the mean of ``samples``."""
    trace: float
    stderr: float
    samples: list
    num_matvecs: int
    converged: bool
    method: str
    history: list = field(default_factory=list)    # matvecs, estimate, stderr after each probe


@dataclass
class DensityResult:
    """SLQ quadrature: per run, Ritz values (nodes) and squared first components (weights)."""
    nodes: list
    weights: list
    num_matvecs: int
    num_steps: int


# --------------------------------------------------------------------------- helpers
def _default_generator(generator):
    return generator if generator is not None else torch.Generator().manual_seed(0)


def rademacher(shape, generator: torch.Generator, device=None) -> torch.Tensor:
    """float64 +-1 entries drawn from ``generator`` (on its device), then moved to ``device``."""
    r = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return (r.to(F64) * 2 - 1).to(device)


def _gaussian(shape, generator: torch.Generator, device=None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=F64).to(device)


def _apply(matvec: Matvec, V: torch.Tensor, dtype, batched: bool) -> torch.Tensor:
    """(k, dim) float64 block -> (k, dim) float64 products, one call when batched."""
    dtype = dtype or V.dtype
    if batched:
        return matvec(V.to(dtype)).to(F64)
    return torch.stack([matvec(v.to(dtype)).to(F64) for v in V])


def _orthogonalise(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Remove from rows of ``w`` (r, dim) their components along rows of ``Q`` (r, m, dim),
    classical Gram-Schmidt applied twice ("twice is enough", Parlett)."""
    if Q.shape[1] == 0:
        return w
    for _ in range(2):
        c = torch.einsum("rmd,rd->rm", Q, w)
        w = w - torch.einsum("rmd,rm->rd", Q, c)
    return w


# --------------------------------------------------------------------------- Lanczos
def lanczos_tridiagonal(matvec: Matvec, V0: torch.Tensor, num_steps: int, *, dtype=None,
                        batched: bool = False, generator: torch.Generator | None = None):
    """Run ``r`` independent Lanczos processes with full reorthogonalisation, step by step.

    A generator: after step ``m`` (1-based) it yields ``(m, alpha, beta, Q, broken)`` where, for each
    of the ``r`` runs started from the rows of ``V0`` (r, dim),
    ``T_m = tridiag(beta[:, :m-1], alpha[:, :m], beta[:, :m-1])`` satisfies
    ``A Q_m^T = Q_m^T T_m + beta[:, m-1] q_{m+1} e_m^T``, ``Q`` is ``(r, m, dim)`` float64 with
    orthonormal rows, and ``beta[:, m-1]`` is the norm of the next residual (the Ritz residual
    scale). The caller stops whenever it likes; at most ``min(num_steps, dim)`` steps run.
    If a run breaks down (``broken``: an invariant subspace, next residual ~ 0; beta is then
    recorded as 0), it continues from a
    random vector orthogonal to its basis with a zero coupling, so T stays exact
    (block-diagonal) and the spectrum beyond that subspace is still reachable.
    """
    r, dim = V0.shape
    device = V0.device
    m_max = min(int(num_steps), dim)
    Q = torch.zeros(r, m_max, dim, dtype=F64, device=device)
    alpha = torch.zeros(r, m_max, dtype=F64, device=device)
    beta = torch.zeros(r, m_max, dtype=F64, device=device)
    q = V0.to(F64)
    q = q / q.norm(dim=1, keepdim=True)
    scale = torch.zeros(r, dtype=F64, device=device)
    for j in range(m_max):
        Q[:, j] = q
        w = _apply(matvec, q, dtype, batched)
        alpha[:, j] = (w * q).sum(dim=1)
        w = _orthogonalise(w, Q[:, : j + 1])
        b = w.norm(dim=1)
        scale = torch.maximum(scale, alpha[:, j].abs() + b)
        broken = b <= 1e-10 * torch.clamp(scale, min=1e-300)
        beta[:, j] = torch.where(broken, torch.zeros_like(b), b)
        yield j + 1, alpha, beta, Q[:, : j + 1], broken
        if j + 1 == m_max:
            return
        if broken.any():
            fresh = _orthogonalise(_gaussian((r, dim), _default_generator(generator), device),
                                   Q[:, : j + 1])
            w = torch.where(broken[:, None], fresh, w)
            b = w.norm(dim=1)
        q = w / b[:, None]


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor, m: int) -> torch.Tensor:
    """T_m of one run from its alpha (m,) and off-diagonal beta (m-1,)."""
    T = torch.diag(alpha[:m])
    if m > 1:
        off = beta[: m - 1]
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the k wanted Ritz values: largest algebraic (LA) or magnitude (LM)."""
    key = theta if which == "LA" else theta.abs()
    return torch.argsort(key, descending=True)[:k]


def lanczos_top_eigenpairs(matvec: Matvec, dim: int, k: int = 1, *, max_steps: int = 100,
                           tol: float = 1e-3, which: str = "LA", dtype=None, device=None,
                           generator: torch.Generator | None = None, batched: bool = False,
                           callback: Callable[[dict], None] | None = None) -> EigenResult:
    """Top-k eigenpairs by Lanczos with full reorthogonalisation (one Krylov space for all k).

    Stops after step m once every wanted Ritz pair (theta_i, s_i) has residual
    ``||A y_i - theta_i y_i|| = |beta_m s_{m,i}| <= tol * |theta_i|`` (the eigenvalue error is
    then about residual^2 / gap), or after ``max_steps`` products. ``which``: "LA" largest
    algebraic, "LM" largest magnitude (what power iteration finds). Start: a Gaussian vector.
    """
    _check_k(k, dim)
    if which not in ("LA", "LM"):
        raise ValueError("which must be 'LA' (largest algebraic) or 'LM' (largest magnitude)")
    if max_steps < k:
        raise ValueError(f"max_steps ({max_steps}) must be at least k ({k})")
    generator = _default_generator(generator)
    v0 = _gaussian((1, dim), generator, device)
    history = []
    result = None
    for m, alpha, beta, Q, broken in lanczos_tridiagonal(matvec, v0, max_steps, dtype=dtype,
                                                         batched=batched, generator=generator):
        if m < k and m < dim:
            continue
        theta, S = torch.linalg.eigh(_tridiagonal(alpha[0], beta[0], m))
        idx = _select(theta, k, which)
        vals = theta[idx]
        res = (beta[0, m - 1] * S[m - 1, idx]).abs() / vals.abs().clamp(min=1e-30)
        # after a breakdown the residuals vanish but a restart may still find more copies of
        # a repeated eigenvalue, so only an unbroken small residual (or all dims) counts
        converged = bool((res <= tol).all() and not broken[0]) or m == dim
        step = {"matvecs": m, "estimates": vals.tolist(), "residuals": res.tolist()}
        history.append(step)
        if callback is not None:
            callback(step)
        result = (m, vals, res, S[:, idx], Q[0], converged)
        if converged:
            break
    m, vals, res, S_k, Qm, converged = result
    vectors = S_k.T @ Qm
    return EigenResult(eigenvalues=vals.tolist(), eigenvectors=vectors, num_matvecs=m,
                       converged=converged, method="lanczos", residuals=res.tolist(),
                       history=history)


def _check_k(k: int, dim: int) -> None:
    if not 1 <= k <= dim:
        raise ValueError(f"asked for top {k} eigenpairs of a {dim}-dimensional operator; "
                         f"top_n must be between 1 and {dim}")


# --------------------------------------------------------------------------- power iteration
def power_iteration_top_eigenpairs(matvec: Matvec, dim: int, k: int = 1, *, max_iter: int = 100,
                                   tol: float = 1e-3, dtype=None, device=None,
                                   generator: torch.Generator | None = None,
                                   callback: Callable[[dict], None] | None = None) -> EigenResult:
    """PyHessian's power iteration with Gram-Schmidt deflation, eigenvectors kept.

    For i = 1..k: start from a Gaussian vector; repeat up to ``max_iter`` times
    v <- v orthogonalised against the i-1 eigenvectors found, normalised; lambda <- v.Av;
    v <- Av/||Av||; stop when |lambda - lambda_prev| / (|lambda_prev| + 1e-6) < tol.
    Converges to the eigenvalues of largest MAGNITUDE, at a rate |lambda_{i+1}/lambda_i|.
    """
    _check_k(k, dim)
    generator = _default_generator(generator)
    values, vectors, history = [], [], []
    all_converged = True
    total = 0
    for i in range(k):
        V = torch.stack(vectors)[None] if vectors else torch.zeros(1, 0, dim, dtype=F64,
                                                                      device=device)
        v = _gaussian((1, dim), generator, device)
        eig, converged = None, False
        for _it in range(max_iter):
            v = _orthogonalise(v, V)
            v = v / v.norm()
            Av = _apply(matvec, v, dtype, False)
            total += 1
            new = float((Av * v).sum())
            v = Av / Av.norm().clamp(min=1e-300)
            change = None if eig is None else abs(new - eig) / (abs(eig) + 1e-6)
            step = {"matvecs": total, "index": i, "estimate": new, "change": change}
            history.append(step)
            if callback is not None:
                callback(step)
            done = change is not None and change < tol
            eig = new
            if done:
                converged = True
                break
        all_converged &= converged
        v = _orthogonalise(v, V)
        values.append(eig)
        vectors.append((v / v.norm())[0])
    return EigenResult(eigenvalues=values, eigenvectors=torch.stack(vectors), num_matvecs=total,
                       converged=all_converged, method="power", history=history)


# --------------------------------------------------------------------------- trace
def _stderr(samples) -> float:
    n = len(samples)
    if n < 2:
        return float("nan")
    t = torch.tensor(samples, dtype=F64)
    return float(t.std(unbiased=True) / math.sqrt(n))


def hutchinson_trace(matvec: Matvec, dim: int, *, max_iter: int = 100, tol: float = 1e-3,
                     dtype=None, device=None, generator: torch.Generator | None = None,
                     batched: bool = False, block_size: int = 1,
                     callback: Callable[[dict], None] | None = None) -> TraceResult:
    """Hutchinson's estimator tr(A) ~ (1/n) sum_j z_j^T A z_j, Rademacher z_j.

    PyHessian's stopping rule: after each probe, stop when
    |mean_n - mean_{n-1}| / (|mean_{n-1}| + 1e-6) < tol (mean_0 = 0), or after ``max_iter``
    probes. ``block_size`` probes go through the operator per call (with ``batched``); probes
    are drawn and tested in the same order as one at a time, so the estimate does not depend
    on ``block_size`` (products computed past the stopping point are counted, not used).
    """
    if max_iter < 1:
        raise ValueError("max_iter must be at least 1")
    generator = _default_generator(generator)
    samples, history = [], []
    prev, converged, computed = 0.0, False, 0
    while len(samples) < max_iter and not converged:
        nb = min(block_size, max_iter - len(samples))
        Z = rademacher((nb, dim), generator, device)
        AZ = _apply(matvec, Z, dtype, batched)
        computed += nb
        for val in (AZ * Z).sum(dim=1).tolist():
            samples.append(val)
            mean = sum(samples) / len(samples)
            step = {"matvecs": len(samples), "estimate": mean, "stderr": _stderr(samples)}
            history.append(step)
            if callback is not None:
                callback(step)
            if abs(mean - prev) / (abs(prev) + 1e-6) < tol:
                converged = True
                break
            prev = mean
    mean = sum(samples) / len(samples)
    return TraceResult(trace=mean, stderr=_stderr(samples), samples=samples,
                       num_matvecs=computed, converged=converged, method="hutchinson",
                       history=history)


def hutchpp_trace(matvec: Matvec, dim: int, num_matvecs: int, *, dtype=None, device=None,
                  generator: torch.Generator | None = None, batched: bool = False) -> TraceResult:
    """Hutch++ with a fixed budget of ``num_matvecs`` products (>= 3).

    s = num_matvecs // 3 Rademacher sketch vectors S; Q = orth(A S) (dim x s);
    tr(A) = tr(Q^T A Q) + (1/g) sum_j z_j^T P A P z_j with P = I - Q Q^T and
    g = num_matvecs - 2 s Rademacher probes z_j. Exact when rank(A) <= s. ``samples`` are the
    g per-probe estimates tr(Q^T A Q) + z_j^T P A P z_j; the error bar is their standard error.
    """
    if num_matvecs < 3:
        raise ValueError("Hutch++ needs a budget of at least 3 matrix-vector products")
    generator = _default_generator(generator)
    s = min(num_matvecs // 3, dim)
    g = num_matvecs - 2 * s
    S = rademacher((s, dim), generator, device)
    Y = _apply(matvec, S, dtype, batched)
    Qt = torch.linalg.qr(Y.T, mode="reduced")[0].T.contiguous()   # (s, dim), orthonormal rows
    AQ = _apply(matvec, Qt, dtype, batched)
    low_rank = float((AQ * Qt).sum())
    Z = rademacher((g, dim), generator, device)
    Z = Z - (Z @ Qt.T) @ Qt
    AZ = _apply(matvec, Z, dtype, batched)
    residual = (AZ * Z).sum(dim=1)          # z = P z, so z^T A z = z^T P A P z
    samples = (low_rank + residual).tolist()
    mean = sum(samples) / len(samples)
    history = [{"matvecs": 2 * s + j + 1, "estimate": sum(samples[: j + 1]) / (j + 1),
                "stderr": _stderr(samples[: j + 1])} for j in range(len(samples))]
    return TraceResult(trace=mean, stderr=_stderr(samples), samples=samples,
                       num_matvecs=2 * s + g, converged=True, method="hutchpp",
                       history=history)


# --------------------------------------------------------------------------- density
def slq_density(matvec: Matvec, dim: int, *, num_steps: int = 100, num_runs: int = 1,
                dtype=None, device=None, generator: torch.Generator | None = None,
                batched: bool = False, runs_per_pass: int = 1,
                callback: Callable[[dict], None] | None = None) -> DensityResult:
    """Stochastic Lanczos quadrature for the spectral density of A.

    Each of ``num_runs`` runs: m = min(num_steps, dim) Lanczos steps with full
    reorthogonalisation from a normalised Rademacher vector; T_m = S diag(theta) S^T (float64
    eigh); nodes = theta, weights = S[0, :]^2 (they sum to 1). The density estimate is
    (1/num_runs) sum_runs sum_i weights_i delta(x - nodes_i); its first moment estimates
    tr(A)/dim. All runs are returned. ``runs_per_pass`` runs share each operator call.
    ``callback`` gets ``{"runs": (first, last), "step", "steps", "matvecs"}`` after each step.
    """
    if num_runs < 1 or num_steps < 1:
        raise ValueError("num_runs and num_steps must be at least 1")
    generator = _default_generator(generator)
    nodes, weights = [], []
    m = min(num_steps, dim)
    done = 0
    while done < num_runs:
        r = min(runs_per_pass, num_runs - done)
        V0 = rademacher((r, dim), generator, device)
        for m, alpha, beta, _Q, _broken in lanczos_tridiagonal(matvec, V0, m, dtype=dtype,
                                                               batched=batched,
                                                               generator=generator):
            if callback is not None:
                callback({"runs": (done + 1, done + r), "step": m, "steps": min(num_steps, dim),
                          "matvecs": done * min(num_steps, dim) + r * m})
        for i in range(r):
            theta, S = torch.linalg.eigh(_tridiagonal(alpha[i], beta[i], m))
            nodes.append(theta.tolist())
            weights.append((S[0, :] ** 2).tolist())
        done += r
    return DensityResult(nodes=nodes, weights=weights, num_matvecs=num_runs * m, num_steps=m)
