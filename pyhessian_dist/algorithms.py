"""Matrix-free spectral algorithms for a symmetric operator known through its products.

Every function takes a :class:`~pyhessian_dist.operators.LinearOperator` ``op`` first (its
``dim``, ``dtype``, ``device`` and ``matvec`` on ``(k, dim)`` blocks). Randomness comes only
from ``generator``: seed it identically on every rank and every rank computes the same
numbers (``None`` draws a fresh seed from torch's global RNG). Dot products, norms, Lanczos
bases and tridiagonal matrices are kept in float64. Progress is reported to ``callback`` as
:class:`~pyhessian_dist.results.Step` records, which also form each result's ``history``.

References: Lanczos with full reorthogonalisation (Golub & Van Loan, *Matrix Computations*,
sec. 10.1; error bounds: Parlett, *The Symmetric Eigenvalue Problem*, sec. 11.7); power
iteration with deflation and Hutchinson's estimator as in PyHessian (Yao et al., 2020);
Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021); deflating a Krylov space before
Hutchinson (Chen & Hallman, "Krylov-aware stochastic trace estimation", 2023); stochastic
Lanczos quadrature (Golub & Meurant 1994; Ghorbani, Krishnan & Xiao, ICML 2019).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .operators import LinearOperator
from .results import Callback, DensityResult, DiagonalResult, EigenResult, Step, TraceResult

__all__ = [
    "rademacher", "lanczos_tridiagonal", "lanczos_eigenpairs", "power_iteration_eigenpairs",
    "hutchinson_trace", "hutchpp_trace", "slq_density", "KrylovDeflation",
    "lanczos_group_eigenpairs",
]

F64 = torch.float64


# --------------------------------------------------------------------------- helpers
def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    seed = int(torch.randint(0, 2**62, (1,)).item())  # global RNG: repeated calls differ
    return torch.Generator().manual_seed(seed)


def rademacher(shape, generator: torch.Generator, device=None) -> torch.Tensor:
    """float64 +-1 entries drawn from ``generator`` (on its device), then moved to ``device``."""
    r = torch.randint(0, 2, shape, generator=generator, device=generator.device)
    return (r.to(F64) * 2 - 1).to(device)


def _gaussian(shape, generator: torch.Generator, device=None) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=F64).to(device)


def _apply(op: LinearOperator, V: torch.Tensor) -> torch.Tensor:
    """(k, dim) float64 block -> (k, dim) float64 products, one operator call."""
    return op.matvec(V.to(op.dtype)).to(F64)


def _orthogonalise(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Remove from rows of ``w`` (r, dim) their components along rows of ``Q`` (r, m, dim),
    classical Gram-Schmidt applied twice ("twice is enough", Parlett)."""
    if Q.shape[1] == 0:
        return w
    for _ in range(2):
        c = torch.einsum("rmd,rd->rm", Q, w)
        w = w - torch.einsum("rmd,rm->rd", Q, c)
    return w


def _stderr(samples) -> float:
    n = len(samples)
    if n < 2:
        return float("nan")
    return float(torch.tensor(samples, dtype=F64).std(unbiased=True) / math.sqrt(n))


def _emit(history: list, callback: Callback | None, step: Step) -> None:
    history.append(step)
    if callback is not None:
        callback(step)


# --------------------------------------------------------------------------- Lanczos
def lanczos_tridiagonal(op: LinearOperator, V0: torch.Tensor, num_steps: int, *,
                        generator: torch.Generator | None = None):
    """Run ``r`` independent Lanczos processes with full reorthogonalisation, step by step.

    A generator: after step ``m`` (1-based) it yields ``(m, alpha, beta, Q, w, broken)`` where,
    for each of the ``r`` runs started from the rows of ``V0`` (r, dim),
    ``T_m = tridiag(beta[:, :m-1], alpha[:, :m], beta[:, :m-1])`` satisfies the Lanczos relation
    ``A Q_m^T = Q_m^T T_m + w e_m^T``: ``Q`` is ``(r, m, dim)`` float64 with orthonormal rows and
    ``w`` (r, dim) is the next residual, orthogonal to ``Q``, of norm ``beta[:, m-1]``. All ``r``
    runs share one operator call per step. At most ``min(num_steps, dim)`` steps run.
    If a run breaks down (``broken``: an invariant subspace, ``beta ~ 0``; recorded as 0), it
    continues from a random vector orthogonal to its basis with zero coupling, so ``T`` stays
    exact (block-diagonal) and the spectrum beyond that subspace is still reachable.
    """
    r, dim = V0.shape
    device = V0.device
    m_max = min(int(num_steps), dim)
    # the basis (r, m, dim) float64 is the memory Lanczos needs: grown as steps are taken
    Q = torch.zeros(r, min(m_max, 8), dim, dtype=F64, device=device)
    alpha = torch.zeros(r, m_max, dtype=F64, device=device)
    beta = torch.zeros(r, m_max, dtype=F64, device=device)
    q = V0.to(F64)
    q = q / q.norm(dim=1, keepdim=True)
    scale = torch.zeros(r, dtype=F64, device=device)
    for j in range(m_max):
        if j == Q.shape[1]:
            grown = torch.zeros(r, min(m_max, 2 * j), dim, dtype=F64, device=device)
            grown[:, :j] = Q
            Q = grown
        Q[:, j] = q
        w = _apply(op, q)
        alpha[:, j] = (w * q).sum(dim=1)
        w = _orthogonalise(w, Q[:, : j + 1])
        b = w.norm(dim=1)
        scale = torch.maximum(scale, alpha[:, j].abs() + b)
        broken = b <= 1e-10 * torch.clamp(scale, min=1e-300)
        beta[:, j] = torch.where(broken, torch.zeros_like(b), b)
        w = torch.where(broken[:, None], torch.zeros_like(w), w)
        yield j + 1, alpha, beta, Q[:, : j + 1], w, broken
        if j + 1 == m_max:
            return
        if broken.any():
            fresh = _orthogonalise(_gaussian((r, dim), _generator(generator), device),
                                   Q[:, : j + 1])
            w = torch.where(broken[:, None], fresh, w)
        q = w / w.norm(dim=1, keepdim=True)


def _tridiagonal(alpha: torch.Tensor, beta: torch.Tensor, m: int) -> torch.Tensor:
    """T_m of one run from its alpha (m,) and off-diagonal beta (m-1,)."""
    T = torch.diag(alpha[:m])
    if m > 1:
        off = beta[: m - 1]
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices of the k wanted Ritz values: largest algebraic (LA), smallest algebraic (SA)
    or largest magnitude (LM), best first."""
    key = {"LA": theta, "SA": -theta, "LM": theta.abs()}[which]
    return torch.argsort(key, descending=True)[:k]


def _error_bounds(theta: torch.Tensor, rho: torch.Tensor, idx: torch.Tensor,
                  dtype: torch.dtype = F64) -> torch.Tensor:
    """Relative eigenvalue error bounds of the Ritz values ``theta[idx]``.

    ``|lambda - theta_i| <= rho_i`` always holds, and ``<= rho_i^2 / gap_i`` when ``gap_i`` is
    the distance from ``theta_i`` to the rest of the spectrum (Parlett 11.7). The gap is
    estimated safely from the other Ritz values, each moved towards ``theta_i`` by its own
    residual: ``gap_i = min_j (|theta_i - theta_j| - rho_j)``. The products are only as exact
    as the operator's ``dtype``: the bound never goes below 10 machine epsilons of that dtype
    times the largest |Ritz value| (about 1e-6 relative for float32 models). Like every Krylov
    bound it assumes the Krylov space has seen the eigenvalues near theta_i (a start vector
    nearly orthogonal to an eigenvector can hide it for a while).
    """
    floor = 10 * torch.finfo(dtype).eps * theta.abs().max()
    out = []
    for i in idx.tolist():
        others = torch.ones_like(theta, dtype=torch.bool)
        others[i] = False
        bound = rho[i]
        if others.any():
            gap = ((theta[i] - theta[others]).abs() - rho[others]).min()
            if gap > 0:
                bound = torch.minimum(bound, rho[i] ** 2 / gap)
        out.append(torch.maximum(bound, floor) / theta[i].abs().clamp(min=1e-300))
    return torch.stack(out)


def lanczos_eigenpairs(op: LinearOperator, k: int = 1, *, which: str = "LA",
                       max_steps: int = 100, tol: float = 1e-3, min_steps: int | None = None,
                       generator: torch.Generator | None = None,
                       callback: Callback | None = None) -> EigenResult:
    """K extreme eigenpairs by Lanczos with full reorthogonalisation (one Krylov space for all k).

    ``which``: "LA" largest algebraic (top), "SA" smallest algebraic (most negative), "LM"
    largest magnitude (what power iteration finds). Start: a Gaussian vector. After step m the
    Ritz pairs (theta_i, y_i) of T_m have residuals ``rho_i = ||A y_i - theta_i y_i|| =
    |beta_m s_{m,i}|``; it stops once every wanted pair's relative eigenvalue error bound
    ``min(rho_i, rho_i^2 / gap_i) / |theta_i|`` is at most ``tol`` (see ``_error_bounds``) and at
    least ``min_steps`` (default k + 2) steps ran, or after ``max_steps`` products, or when the
    whole space is spanned. ``products`` = ``A y_i``, exact from the Lanczos relation.
    """
    _check_k(k, op.dim)
    if which not in ("LA", "SA", "LM"):
        raise ValueError("which must be 'LA' (largest algebraic), 'SA' (smallest algebraic) or "
                         "'LM' (largest magnitude)")
    if max_steps < k:
        raise ValueError(f"max_steps ({max_steps}) must be at least k ({k})")
    min_steps = min(k + 2 if min_steps is None else min_steps, op.dim)
    generator = _generator(generator)
    v0 = _gaussian((1, op.dim), generator, op.device)
    history, last = [], None
    for m, alpha, beta, Q, w, broken in lanczos_tridiagonal(op, v0, max_steps,
                                                            generator=generator):
        if m < k and m < op.dim:
            continue
        theta, S = torch.linalg.eigh(_tridiagonal(alpha[0], beta[0], m))
        rho = (beta[0, m - 1] * S[m - 1, :]).abs()
        idx = _select(theta, k, which)
        bounds = _error_bounds(theta, rho, idx, op.dtype)
        # after a breakdown the residuals vanish but a restart may still find more copies of
        # a repeated eigenvalue, so only an unbroken run (or the whole space) counts
        converged = m == op.dim or bool(m >= min_steps and (bounds <= tol).all()
                                        and not broken[0])
        _emit(history, callback, Step(m, tuple(theta[idx].tolist()), tuple(bounds.tolist()),
                                      "eigenvalue error bound", max_matvecs=max_steps))
        last = (theta[idx], rho[idx], bounds, S[:, idx], Q[0], w[0], converged)
        if converged:
            break
    vals, rho, bounds, S_k, Qm, w, converged = last
    Y = S_k.T @ Qm
    products = Y * vals[:, None] + S_k[-1][:, None] * w[None, :]
    return EigenResult(eigenvalues=vals.tolist(), eigenvectors=Y, num_matvecs=history[-1].matvecs,
                       converged=converged, method="lanczos", which=which,
                       residuals=(rho / vals.abs().clamp(min=1e-300)).tolist(),
                       error_bounds=bounds.tolist(), history=history, products=products)


def _check_k(k: int, dim: int) -> None:
    if not 1 <= k <= dim:
        raise ValueError(f"asked for {k} eigenpairs of a {dim}-dimensional operator; "
                         f"top_n must be between 1 and {dim}")


def lanczos_group_eigenpairs(op: LinearOperator, groups: Sequence, k: int = 1, *,
                             which: str = "LA", max_steps: int = 30, tol: float = 1e-2,
                             generator: torch.Generator | None = None,
                             callback: Callback | None = None) -> list[EigenResult]:
    """K extreme eigenpairs of every diagonal block ``A_gg`` (g in ``groups``: slices or index
    tensors of coordinates), by one Lanczos process per block.

    A block product ``A_gg u`` is ``A`` applied to ``u`` embedded on g's coordinates (zeros
    elsewhere) and read back on them; the blocks still iterating share ONE operator call per
    step (a ``(G, dim)`` block), so a step costs one product per block. Each block stops as
    ``lanczos_eigenpairs`` does (relative eigenvalue error bound <= ``tol``, or its whole
    space, or ``max_steps``). Returns one ``EigenResult`` per group, eigenvectors on the
    group's coordinates.
    """
    if which not in ("LA", "SA", "LM"):
        raise ValueError("which must be 'LA', 'SA' or 'LM'")
    generator = _generator(generator)
    index = [g if isinstance(g, slice) else torch.as_tensor(g, device=op.device) for g in groups]
    sizes = [len(range(op.dim)[g]) if isinstance(g, slice) else len(g) for g in index]
    runs = [_BlockLanczos(n, k, which, tol, _gaussian((n,), generator, op.device), op.dtype)
            for n in sizes]
    total = 0
    for m in range(1, max_steps + 1):
        active = [i for i, r in enumerate(runs) if not r.done]
        if not active:
            break
        V = torch.zeros(len(active), op.dim, dtype=F64, device=op.device)
        for row, i in enumerate(active):
            V[row, index[i]] = runs[i].q
        W = _apply(op, V)
        total += len(active)
        for row, i in enumerate(active):
            runs[i].step(W[row, index[i]], generator, m == max_steps, total)
        _emit([], callback, Step(total, tuple(max(r.values) if r.values else float("nan")
                                              for r in runs),
                                 label=f"{sum(r.done for r in runs)}/{len(runs)} blocks done",
                                 max_matvecs=max_steps * len(runs)))
    return [r.result() for r in runs]


class _BlockLanczos:
    """One block's Lanczos state for ``lanczos_group_eigenpairs`` (full reorthogonalisation)."""

    def __init__(self, n, k, which, tol, start, dtype):
        self.n, self.k, self.which, self.tol, self.dtype = n, min(k, n), which, tol, dtype
        self.Q = torch.zeros(0, n, dtype=F64, device=start.device)
        self.q = start / start.norm()
        self.alpha, self.beta = [], []
        self.done, self.values, self.history, self.out = False, [], [], None

    def step(self, w, generator, last, total):
        self.Q = torch.cat([self.Q, self.q[None]])
        self.alpha.append(float(w @ self.q))
        w = _orthogonalise(w[None], self.Q[None])[0]
        b = float(w.norm())
        m = len(self.alpha)
        scale = max(abs(a) for a in self.alpha) + b
        broken = b <= 1e-10 * max(scale, 1e-300)
        self.beta.append(0.0 if broken else b)
        a = torch.tensor(self.alpha, dtype=F64)
        theta, S = torch.linalg.eigh(_tridiagonal(a, torch.tensor(self.beta, dtype=F64), m))
        rho = (self.beta[-1] * S[m - 1, :]).abs()
        idx = _select(theta, min(self.k, m), self.which)
        bounds = _error_bounds(theta, rho, idx, self.dtype)
        self.values = theta[idx].tolist()
        self.history.append(Step(total, tuple(self.values), tuple(bounds.tolist()),
                                 "eigenvalue error bound"))
        full = m == self.n
        if full or last or (m >= min(self.k + 2, self.n) and not broken
                            and bool((bounds <= self.tol).all())):
            self.done = True
            Y = S[:, idx].T.to(self.Q.device) @ self.Q
            rel = rho[idx] / theta[idx].abs().clamp(min=1e-300)
            self.out = EigenResult(eigenvalues=self.values, eigenvectors=Y, num_matvecs=m,
                                   converged=full or bool((bounds <= self.tol).all()),
                                   method="lanczos", which=self.which, residuals=rel.tolist(),
                                   error_bounds=bounds.tolist(), history=self.history)
            return
        if broken:
            w = _orthogonalise(_gaussian((1, self.n), generator, self.Q.device), self.Q[None])[0]
        self.q = w / w.norm()

    def result(self) -> EigenResult:
        return self.out


# --------------------------------------------------------------------------- power iteration
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
    _check_k(k, op.dim)
    generator = _generator(generator)
    values, vectors, residuals, history = [], [], [], []
    all_converged, total = True, 0
    for i in range(k):
        V = (torch.stack(vectors)[None] if vectors
             else torch.zeros(1, 0, op.dim, dtype=F64, device=op.device))
        v = _gaussian((1, op.dim), generator, op.device)
        eig, converged, residual = None, False, float("nan")
        for _it in range(max_iter):
            v = _orthogonalise(v, V)
            v = v / v.norm()
            Av = _apply(op, v)
            total += 1
            new = float((Av * v).sum())
            residual = float((Av - new * v).norm()) / max(abs(new), 1e-300)
            v = Av / Av.norm().clamp(min=1e-300)
            change = float("nan") if eig is None else abs(new - eig) / (abs(eig) + 1e-6)
            _emit(history, callback, Step(total, tuple(values) + (new,),
                                          tuple(float("nan") for _ in values) + (change,),
                                          "relative change", f"eigenvalue {i + 1}",
                                          max_matvecs=k * max_iter))
            done = eig is not None and change < tol
            eig = new
            if done:
                converged = True
                break
        all_converged &= converged
        v = _orthogonalise(v, V)
        values.append(eig)
        residuals.append(residual)
        vectors.append((v / v.norm())[0])
    return EigenResult(eigenvalues=values, eigenvectors=torch.stack(vectors), num_matvecs=total,
                       converged=all_converged, method="power", which="LM",
                       residuals=residuals, error_bounds=list(residuals), history=history)


# --------------------------------------------------------------------------- trace
@dataclass
class KrylovDeflation:
    """An orthonormal basis ``Q`` (m, dim) with ``AQ`` (m, dim) = rows ``A q_j``.

    Used to split a trace exactly: ``tr(A) = tr(Q^T A Q) + tr(P A P)`` with ``P = I - Q^T Q``
    (rows of ``Q`` as basis vectors); only the second term is estimated by probes. From a
    Lanczos run, ``AQ`` comes without extra products: ``A Q^T = Q^T T + w e_m^T``.
    """

    Q: torch.Tensor
    AQ: torch.Tensor
    num_matvecs: int

    @property
    def exact_trace(self) -> float:
        """tr(Q^T A Q), this subspace's exact share of the trace."""
        return float((self.Q * self.AQ).sum())

    def diagonal(self) -> torch.Tensor:
        """diag(A Q^T Q): this subspace's exact share of diag(A)."""
        return (self.Q * self.AQ).sum(dim=0)

    def summary(self, chosen: str) -> dict:
        """What a TraceResult reports of the deflation (``chosen``: "auto" or "fixed")."""
        return {"dimension": int(self.Q.shape[0]), "exact_part": self.exact_trace,
                "num_matvecs": self.num_matvecs, "chosen": chosen}

    def project(self, Z: torch.Tensor, AZ: torch.Tensor):
        """(P z, A P z) for rows z of Z, given A z (no operator products needed)."""
        C = Z @ self.Q.T
        return Z - C @ self.Q, AZ - C @ self.AQ


def _lanczos_deflation(op, generator, steps, auto, rse, min_probes, pilot, history, callback):
    """Lanczos from a Rademacher start; in ``auto`` mode stop when deflating further no longer
    pays. After m steps the predicted cost is m + N(m) products, N(m) = 2 F_m / (rse T)^2 the
    probes that reach ``rse`` when each probe's variance is 2 F_m, F_m = ||P A P||_F^2 (an upper
    bound of the Rademacher variance / 2). F_m and T come from the ``pilot`` probes (Z, AZ),
    projected on the complement of the Krylov space: E ||P A P z||^2 = ||P A P||_F^2, and
    tr(Q^T A Q) + (Pz)^T A (Pz) is the deflated sample. It stops three steps past the smallest
    predicted cost and keeps the whole basis (more deflation never raises the variance)."""
    z0 = rademacher((1, op.dim), generator, op.device)
    best, result = None, None
    AQ = torch.zeros(steps, op.dim, dtype=F64, device=op.device)
    for m, alpha, beta, Q, w, _broken in lanczos_tridiagonal(op, z0, steps, generator=generator):
        # A q_j = beta_{j-1} q_{j-1} + alpha_j q_j + beta_j q_{j+1}; the last row ends in w
        q, a, b = Q[0], alpha[0], beta[0]
        if m >= 2:
            AQ[m - 2] = a[m - 2] * q[m - 2] + b[m - 2] * q[m - 1]
            if m >= 3:
                AQ[m - 2] += b[m - 3] * q[m - 3]
        AQ[m - 1] = a[m - 1] * q[m - 1] + w[0] + (b[m - 2] * q[m - 2] if m >= 2 else 0.0)
        result = (m, q, AQ[:m])
        if auto and pilot is not None:
            defl = KrylovDeflation(Q=q, AQ=AQ[:m], num_matvecs=m)
            PZ, APZ = defl.project(*pilot)
            PAPZ = APZ - (APZ @ q.T) @ q
            frob_left = float((PAPZ ** 2).sum(dim=1).mean())
            trace_hat = defl.exact_trace + float((PZ * APZ).sum(dim=1).mean())
            cost = m + max(2 * frob_left / (rse * trace_hat) ** 2, min_probes)
            if best is None or cost < best[1]:
                best = (m, cost)
        _emit(history, callback, Step(m, (float(alpha[0, :m].sum()),), (float("nan"),),
                                      "", "deflation", max_matvecs=steps))
        if best is not None and m >= best[0] + 3:
            break  # three steps past the predicted optimum
    m, Q, AQ = result  # the steps past the optimum are paid for: deflating them only helps
    return KrylovDeflation(Q=Q.clone(), AQ=AQ.clone(), num_matvecs=m)


def hutchinson_trace(op: LinearOperator, *, max_iter: int = 100, tol: float | None = 1e-3,
                     rse: float | None = None, min_probes: int = 10, block_size: int = 1,
                     deflate: int | str = 0, max_deflation_steps: int = 50,
                     groups: Sequence | None = None, diagonal: bool = False,
                     generator: torch.Generator | None = None,
                     callback: Callback | None = None) -> TraceResult:
    """Hutchinson's estimator tr(A) ~ (1/n) sum_j z_j^T A z_j (Rademacher z_j), optionally
    after deflating a Krylov space.

    Stopping: with ``rse`` set, after at least ``min_probes`` probes once the standard error is
    at most ``rse * |estimate|``; otherwise PyHessian's rule: stop when
    ``|mean_n - mean_{n-1}| / (|mean_{n-1}| + 1e-6) < tol`` (mean_0 = 0). Always at most
    ``max_iter`` probes. ``block_size`` probes share one operator call (same estimate whatever
    the block size; products past the stopping point are counted, not used).

    ``deflate``: 0 (plain), an int m (deflate an m-step Lanczos space), or "auto" (choose m
    from up to 8 pilot probes, reused as the first probes, and ``rse``; at most
    ``max_deflation_steps``; see ``_lanczos_deflation``). With a basis Q (exact part
    ``tr(Q^T A Q)``) each sample is ``tr(Q^T A Q) + (Pz)^T A (Pz)``: unbiased for any Q, with
    per-probe variance ``2(||PAP||_F^2 - sum_i (PAP)_ii^2)`` instead of ``2(||A||_F^2 - ...)``.

    ``groups``: index sets (slices or index tensors) partitioning the coordinates; every sample
    is split over them (``group_samples``, rows summing to ``samples``): the sample's share of
    group g is ``sum_{i in g} c_i`` with ``c = (Pz) * (A P z) + diag(A Q^T Q)``, whose mean
    estimates ``tr`` of A's diagonal block of g. ``diagonal=True`` also returns the mean of
    ``c`` (Hutchinson's diagonal estimator, Bekas et al. 2007) with elementwise standard errors.
    """
    _check_trace_arguments(max_iter, rse, tol)
    generator = _generator(generator)
    history: list = []
    deflation, pilot, used = _deflation_for(op, deflate, rse, max_iter, min_probes,
                                            max_deflation_steps, generator, history, callback)
    tally = _Tally(deflation, groups, diagonal)
    prev, rule = 0.0, None
    while tally.n < max_iter and rule is None:
        if pilot is not None:  # the pilot probes are reused: their products are known
            (Z, AZ), pilot = pilot, None
        else:
            Z = rademacher((min(block_size, max_iter - tally.n), op.dim), generator, op.device)
            AZ = _apply(op, Z)
            used += Z.shape[0]
        for c in tally.contributions(Z, AZ):
            if tally.n == max_iter:
                break
            tally.add(c)
            _emit(history, callback, Step(used, (tally.mean,), (tally.stderr,),
                                          "standard error", "probes"))
            rule = _stopping_rule(tally, rse, tol, min_probes, prev)
            if rule is not None:
                break
            prev = tally.mean
    info = None if deflation is None else deflation.summary("auto" if deflate == "auto"
                                                             else "fixed")
    return TraceResult(
        trace=tally.mean, stderr=tally.stderr, samples=tally.samples, num_matvecs=used,
        converged=rule is not None, method="hutchinson" if deflation is None
        else "deflated hutchinson", stopping_rule=rule or "budget", history=history,
        deflation=info, group_samples=tally.group_samples(),
        diagonal=tally.diagonal_result(used) if diagonal else None)


def _check_trace_arguments(max_iter, rse, tol) -> None:
    if max_iter < 1:
        raise ValueError("max_iter must be at least 1")
    if rse is None and tol is None:
        raise ValueError("give a stopping rule: rse (relative standard error) or tol")


def _deflation_for(op, deflate, rse, max_iter, min_probes, max_steps, generator, history,
                   callback):
    """(KrylovDeflation or None, pilot probes (Z, AZ) or None, products used)."""
    if deflate == 0:
        return None, None, 0
    if not (deflate == "auto" or (isinstance(deflate, int) and deflate > 0)):
        raise ValueError(f"deflate must be 0, a positive int or 'auto', got {deflate!r}")
    pilot, used = None, 0
    if deflate == "auto":
        if rse is None:
            raise ValueError("deflate='auto' chooses the subspace for a target rse; pass rse")
        Z = rademacher((min(8, max_iter, max(min_probes, 1)), op.dim), generator, op.device)
        pilot, used = (Z, _apply(op, Z)), Z.shape[0]
    steps = max_steps if deflate == "auto" else int(deflate)
    deflation = _lanczos_deflation(op, generator, min(steps, op.dim), deflate == "auto", rse,
                                   min_probes, pilot, history, callback)
    return deflation, pilot, used + deflation.num_matvecs


def _stopping_rule(tally, rse, tol, min_probes, prev) -> str | None:
    """The rule that fired after the latest probe, in words, or None."""
    if rse is not None:
        if tally.n >= min_probes and tally.stderr <= rse * abs(tally.mean):
            return f"relative standard error <= {rse:g}"
        return None
    if abs(tally.mean - prev) / (abs(prev) + 1e-6) < tol:
        return f"relative change < {tol:g}"
    return None


class _Tally:
    """The probes' contributions ``c = (Pz) * (A P z) + diag(A Q^T Q)`` (dim,): their sums (the
    samples), their shares per group, and Welford's running mean and squared deviations of c."""

    def __init__(self, deflation, groups, diagonal):
        self.deflation = deflation
        self.base = deflation.diagonal() if deflation is not None else None
        self.groups = list(groups) if groups is not None else None
        self.diagonal = diagonal
        self.samples, self.rows = [], []
        self.mean_c = self.m2_c = None

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples)

    @property
    def stderr(self) -> float:
        return _stderr(self.samples)

    def contributions(self, Z, AZ):
        if self.deflation is not None:
            Z, AZ = self.deflation.project(Z, AZ)
        return Z * AZ if self.base is None else Z * AZ + self.base

    def add(self, c) -> None:
        self.samples.append(float(c.sum()))
        if self.groups is not None:
            self.rows.append(torch.stack([c[g].sum() for g in self.groups]))
        if self.diagonal:
            if self.mean_c is None:
                self.mean_c, self.m2_c = c.clone(), torch.zeros_like(c)
            else:
                delta = c - self.mean_c
                self.mean_c += delta / self.n
                self.m2_c += delta * (c - self.mean_c)

    def group_samples(self):
        return torch.stack(self.rows) if self.groups is not None else None

    def diagonal_result(self, used) -> DiagonalResult:
        n = self.n
        if n > 1:
            se = (self.m2_c.clamp(min=0) / (n - 1) / n).sqrt()
        else:
            se = torch.full_like(self.mean_c, math.nan)
        return DiagonalResult(diagonal=self.mean_c, stderr=se, num_probes=n, num_matvecs=used)


def hutchpp_trace(op: LinearOperator, num_matvecs: int, *,
                  generator: torch.Generator | None = None,
                  callback: Callback | None = None) -> TraceResult:
    """Hutch++ with a fixed budget of ``num_matvecs`` products (>= 3).

    s = num_matvecs // 3 Rademacher sketch vectors S; Q = orth(A S) (dim x s);
    tr(A) = tr(Q^T A Q) + (1/g) sum_j z_j^T P A P z_j with P = I - Q Q^T and
    g = num_matvecs - 2 s Rademacher probes z_j. Exact when rank(A) <= s. ``samples`` are the
    g per-probe estimates tr(Q^T A Q) + z_j^T P A P z_j; the error bar is their standard error.
    A fixed budget is not a convergence test: ``converged`` is False.
    """
    if num_matvecs < 3:
        raise ValueError("Hutch++ needs a budget of at least 3 matrix-vector products")
    generator = _generator(generator)
    s = min(num_matvecs // 3, op.dim)
    g = num_matvecs - 2 * s
    S = rademacher((s, op.dim), generator, op.device)
    Y = _apply(op, S)
    Qt = torch.linalg.qr(Y.T, mode="reduced")[0].T.contiguous()   # (s, dim), orthonormal rows
    AQ = _apply(op, Qt)
    low_rank = float((AQ * Qt).sum())
    Z = rademacher((g, op.dim), generator, op.device)
    Z = Z - (Z @ Qt.T) @ Qt
    AZ = _apply(op, Z)
    samples = (low_rank + (AZ * Z).sum(dim=1)).tolist()   # z = P z: z^T A z = z^T P A P z
    history: list = []
    for j in range(len(samples)):
        _emit(history, callback, Step(2 * s + j + 1, (sum(samples[: j + 1]) / (j + 1),),
                                      (_stderr(samples[: j + 1]),), "standard error",
                                      "probes", max_matvecs=num_matvecs))
    return TraceResult(trace=sum(samples) / len(samples), stderr=_stderr(samples),
                       samples=samples, num_matvecs=2 * s + g, converged=False,
                       method="hutchpp", stopping_rule="budget", history=history,
                       deflation={"dimension": s, "exact_part": low_rank,
                                  "num_matvecs": 2 * s, "chosen": "fixed"})


# --------------------------------------------------------------------------- density
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
    generator = _generator(generator)
    nodes, weights, history = [], [], []
    m = min(num_steps, op.dim)
    done = 0
    while done < num_runs:
        r = min(runs_per_pass, num_runs - done)
        V0 = rademacher((r, op.dim), generator, op.device)
        label = f"run {done + 1}/{num_runs}" if r == 1 else f"runs {done + 1}-{done + r}/{num_runs}"
        for step, alpha, beta, _Q, _w, _broken in lanczos_tridiagonal(op, V0, m,
                                                                      generator=generator):
            theta = torch.linalg.eigvalsh(_tridiagonal(alpha[0], beta[0], step))
            _emit(history, callback, Step(done * m + r * step, (theta[0].item(), theta[-1].item()),
                                          label=label, max_matvecs=num_runs * m))
        for i in range(r):
            theta, S = torch.linalg.eigh(_tridiagonal(alpha[i], beta[i], m))
            nodes.append(theta.tolist())
            weights.append((S[0, :] ** 2).tolist())
        done += r
    return DensityResult(nodes=nodes, weights=weights, num_matvecs=num_runs * m, num_steps=m,
                         num_runs=num_runs, history=history)
