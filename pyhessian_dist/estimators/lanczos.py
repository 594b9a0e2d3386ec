"""Lanczos with full reorthogonalisation: one process, a driver that advances several with one
operator call per step, and the extreme eigenpairs of an operator or of its diagonal blocks.

References: Golub & Van Loan, *Matrix Computations*, sec. 10.1 (Lanczos with full
reorthogonalisation); Parlett, *The Symmetric Eigenvalue Problem*, sec. 11.7 (error bounds).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..operators import LinearOperator
from ..results import Callback, EigenResult, Step
from ._common import F64, apply, check_k, emit, gaussian, orthogonalise, resolve_generator

__all__ = ["Lanczos", "group_index", "lanczos_step", "lanczos_eigenpairs",
           "lanczos_group_eigenpairs"]

WHICH = ("LA", "SA", "LM")


class Lanczos:
    """One Lanczos process with full reorthogonalisation on a space of its own size ``n``.

    Started from ``v0`` (n,), each :meth:`step` takes ``w = A q`` for the current vector
    ``q = next_vector()``. After m steps ``T_m = tridiag(beta[:m-1], alpha[:m], beta[:m-1])``
    satisfies the Lanczos relation ``A Q^T = Q^T T_m + w e_m^T``: ``Q`` (m, n) float64 has
    orthonormal rows and ``w`` (n,) is the residual, orthogonal to ``Q``, of norm
    ``beta[m-1]``. The basis is stored at size n (a block of a larger operator keeps a basis of
    the block's size). At most ``min(max_steps, n)`` steps. On a breakdown (an invariant
    subspace, ``beta ~ 0``: ``broken``, recorded as 0 and ``w = 0``) the next vector is a
    random one from ``generator``, orthogonal to ``Q``, with zero coupling, so ``T`` stays exact
    (block-diagonal) and the rest of the spectrum stays reachable. ``index`` says where the run's
    coordinates sit in the operator's vectors (all of them by default; see ``lanczos_step``).
    """

    def __init__(self, v0: torch.Tensor, max_steps: int, generator: torch.Generator,
                 index: slice | torch.Tensor = slice(None)):
        self.n = v0.shape[0]
        self.index = index
        self.max_steps = min(int(max_steps), self.n)
        self.generator = generator
        device = v0.device
        self._basis = torch.zeros(min(self.max_steps, 8), self.n, dtype=F64, device=device)
        self.alpha = torch.zeros(self.max_steps, dtype=F64, device=device)
        self.beta = torch.zeros(self.max_steps, dtype=F64, device=device)
        v0 = v0.to(F64)
        self._q = v0 / v0.norm()
        self.w = None
        self.m = 0
        self.broken = False
        self.annihilated = False   # the first product A q_1 was exactly zero
        self.stopped = False
        self._scale = torch.zeros((), dtype=F64, device=device)

    @property
    def Q(self) -> torch.Tensor:  # noqa: N802 - the math's name
        """The basis so far, (m, n) float64 with orthonormal rows."""
        return self._basis[: self.m]

    @property
    def done(self) -> bool:
        """True after ``min(max_steps, n)`` steps or once :meth:`stop` was called."""
        return self.stopped or self.m == self.max_steps

    def stop(self) -> None:
        """End the run here (no more steps, no restart vector drawn)."""
        self.stopped = True

    def T(self) -> torch.Tensor:  # noqa: N802 - the math's name
        """The tridiagonal T_m (m, m) float64."""
        m = self.m
        T = torch.diag(self.alpha[:m])
        if m > 1:
            off = self.beta[: m - 1]
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        return T

    def products(self) -> torch.Tensor:
        """Rows ``A q_j`` (m, n) from the Lanczos relation, without operator products:
        ``A q_j = beta_{j-1} q_{j-1} + alpha_j q_j + beta_j q_{j+1}``, the last row ending in
        the residual ``w`` instead of ``beta_m q_{m+1}`` (``A Q^T = Q^T T_m + w e_m^T``)."""
        m, Q = self.m, self.Q
        AQ = self.alpha[:m, None] * Q
        if m > 1:
            off = self.beta[: m - 1, None]
            AQ[:-1] += off * Q[1:]
            AQ[1:] += off * Q[:-1]
        AQ[-1] += self.w
        return AQ

    def next_vector(self) -> torch.Tensor:
        """q_{m+1} (n,): the normalised residual, or after a breakdown a random unit vector
        orthogonal to ``Q``."""
        if self._q is None:
            w = self.w
            if self.broken:
                w = orthogonalise(gaussian((self.n,), self.generator, w.device), self.Q)
            self._q = w / w.norm()
        return self._q

    def step(self, w: torch.Tensor) -> None:
        """Take ``w = A q`` (n,) for ``q = next_vector()``: alpha, beta, the new residual."""
        j = self.m
        if j == self._basis.shape[0]:  # the basis grows by doubling as steps are taken
            grown = torch.zeros(min(self.max_steps, 2 * j), self.n, dtype=F64, device=w.device)
            grown[:j] = self._basis
            self._basis = grown
        q = self.next_vector()
        self._basis[j] = q
        if j == 0:
            self.annihilated = not bool(w.any())
        a = w @ q
        # the three-term recurrence first (its components are the large ones), then ONE
        # classical Gram-Schmidt pass against the whole basis, a second only when that pass
        # removed most of what was left (Daniel, Gragg, Kaufman & Stewart 1976: ||w'|| <
        # ||w|| / sqrt(2)); half the passes over the basis of orthogonalising twice, which
        # dominated SLQ's cost besides the products (100 steps at 272k parameters on a
        # diagonal operator: 17.5 s -> 6.5 s, loaded machine)
        w = w - a * q - (self.beta[j - 1] * self._basis[j - 1] if j > 0 else 0.0)
        w = _reorthogonalise(w, self._basis[: j + 1])
        b = w.norm()
        self._scale = torch.maximum(self._scale, a.abs() + b)
        self.broken = bool(b <= 1e-10 * torch.clamp(self._scale, min=1e-300))
        self.alpha[j] = a
        self.beta[j] = 0.0 if self.broken else b
        self.w = torch.zeros_like(w) if self.broken else w
        self.m = j + 1
        self._q = None


def _reorthogonalise(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``w`` without its components along the orthonormal rows of ``Q``: one classical
    Gram-Schmidt pass, repeated while a pass shrinks ``w`` below 1/sqrt(2) of its norm (at most
    twice more: "twice is enough", Parlett)."""
    norm = w.norm()
    for _ in range(3):
        w = w - (Q @ w) @ Q
        new = w.norm()
        if new >= norm / 2 ** 0.5:
            break
        norm = new
    return w


def group_index(op: LinearOperator, g) -> tuple:
    """``(index, n)``: a group's coordinates (a slice, or an index tensor on ``op.device``) and
    their number."""
    index = g if isinstance(g, slice) else torch.as_tensor(g, device=op.device)
    return index, len(range(op.dim)[index]) if isinstance(index, slice) else len(index)


def lanczos_step(op: LinearOperator, runs: Sequence[Lanczos]) -> int:
    """Advance every unfinished run by one step, all with ONE operator call.

    Run i's vector ``q_i`` is placed on its coordinates ``index_i`` of a zero vector of size
    ``op.dim``, the ``(k, dim)`` block of the k unfinished runs is multiplied once, and run i
    reads row i back on the same coordinates: ``A q_i`` for a run on all coordinates,
    ``A_gg q_i`` (the diagonal block of its group g) for a run on a group. Returns k.
    """
    active = [run for run in runs if not run.done]
    if not active:
        return 0
    V = torch.zeros(len(active), op.dim, dtype=F64, device=op.device)
    for row, run in zip(V, active):
        row[run.index] = run.next_vector()
    W = apply(op, V)
    for row, run in zip(W, active):
        run.step(row[run.index])
    return len(active)


# --------------------------------------------------------------------------- Ritz pairs
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


class _Eigen:
    """The k wanted Ritz pairs of one Lanczos run, their error bounds and the stopping rule.

    After step m: Ritz pairs (theta_i, y_i = S[:, i]^T Q) of T_m with residuals
    ``rho_i = ||A y_i - theta_i y_i|| = |beta_m S[m-1, i]|``; the run has converged when it spans
    its whole space, or when at least ``min_steps`` steps ran, the last did not break down,
    and every wanted pair's relative error bound (``_error_bounds``) is at most ``tol``; or
    at once (after k steps) when the first product was exactly zero: for a Gaussian start
    ``A q_1 = 0`` means ``A = 0`` with probability 1 (e.g. the block of parameters the loss
    does not use), so every eigenvalue is exactly 0.
    """

    def __init__(self, run: Lanczos, k: int, which: str, tol: float, min_steps: int | None,
                 dtype: torch.dtype):
        self.run, self.which, self.tol, self.dtype = run, which, tol, dtype
        self.k = min(k, run.n)
        self.min_steps = min(self.k + 2 if min_steps is None else min_steps, run.n)
        self.history: list = []
        self.converged = False
        self._ritz = None

    @property
    def values(self) -> list:
        """The wanted Ritz values of the latest update, best first."""
        return [] if self._ritz is None else self._ritz[0].tolist()

    def update(self, matvecs: int, max_matvecs: int | None = None) -> Step | None:
        """Ritz pairs after the run's latest step (None while it has fewer than k steps and can
        take more); stops the run once converged."""
        run, m = self.run, self.run.m
        if m < self.k and not run.done:
            return None
        theta, S = torch.linalg.eigh(run.T())
        rho = (run.beta[m - 1] * S[m - 1, :]).abs()
        idx = _select(theta, min(self.k, m), self.which)
        bounds = _error_bounds(theta, rho, idx, self.dtype)
        # after a breakdown the residuals vanish but a restart may still find more copies of
        # a repeated eigenvalue, so only an unbroken run (or the whole space, or A = 0) counts
        self.converged = m == run.n or run.annihilated or bool(
            m >= self.min_steps and (bounds <= self.tol).all() and not run.broken)
        self._ritz = (theta[idx], rho[idx], bounds, S[:, idx])
        step = Step(matvecs, tuple(self.values), tuple(bounds.tolist()),
                    "eigenvalue error bound", max_matvecs=max_matvecs)
        self.history.append(step)
        if self.converged:
            run.stop()
        return step

    def result(self) -> EigenResult:
        """Eigenpairs ``y_i = Q^T S[:, i]`` on the run's coordinates; ``products`` = ``A y_i``
        from the Lanczos relation (``Lanczos.products``), without extra products."""
        vals, rho, bounds, S_k = self._ritz
        Y = S_k.T @ self.run.Q
        products = S_k.T @ self.run.products()
        return EigenResult(eigenvalues=vals.tolist(), eigenvectors=Y, num_matvecs=self.run.m,
                           converged=self.converged, method="lanczos", which=self.which,
                           residuals=(rho / vals.abs().clamp(min=1e-300)).tolist(),
                           error_bounds=bounds.tolist(), history=self.history,
                           products=products)


def _check_which(which: str) -> None:
    if which not in WHICH:
        raise ValueError("which must be 'LA' (largest algebraic), 'SA' (smallest algebraic) or "
                         "'LM' (largest magnitude)")


# --------------------------------------------------------------------------- eigenpairs
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
    Eigenvectors ``(k, dim)`` float64.
    """
    check_k(k, op.dim)
    _check_which(which)
    if max_steps < k:
        raise ValueError(f"max_steps ({max_steps}) must be at least k ({k})")
    generator = resolve_generator(generator)
    run = Lanczos(gaussian((op.dim,), generator, op.device), max_steps, generator)
    eigen = _Eigen(run, k, which, tol, min_steps, op.dtype)
    while not run.done:
        lanczos_step(op, [run])
        step = eigen.update(run.m, max_steps)
        if step is not None and callback is not None:
            callback(step)
    return eigen.result()


def lanczos_group_eigenpairs(op: LinearOperator, groups: Sequence, k: int = 1, *,
                             which: str = "LA", max_steps: int = 30, tol: float = 1e-2,
                             generator: torch.Generator | None = None,
                             callback: Callback | None = None) -> list[EigenResult]:
    """K extreme eigenpairs of every diagonal block ``A_gg`` (g in ``groups``: slices or index
    tensors of coordinates), by one Lanczos process per block.

    A block product ``A_gg u`` is ``A`` applied to ``u`` embedded on g's coordinates (zeros
    elsewhere) and read back on them; the blocks still iterating share ONE operator call per
    step (a ``(G, dim)`` block, see ``lanczos_step``), so a step costs one product per block.
    Each block's basis is stored at the block's size. Each block stops as
    ``lanczos_eigenpairs`` does (relative eigenvalue error bound <= ``tol``, or its whole
    space, or ``max_steps``). Returns one ``EigenResult`` per group, eigenvectors ``(k, n_g)``
    on the group's coordinates.
    """
    _check_which(which)
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    generator = resolve_generator(generator)
    eigens = []
    for g in groups:
        index, n = group_index(op, g)
        run = Lanczos(gaussian((n,), generator, op.device), max_steps, generator, index)
        eigens.append(_Eigen(run, k, which, tol, None, op.dtype))
    runs = [e.run for e in eigens]
    total = 0
    while not all(run.done for run in runs):
        active = [e for e in eigens if not e.run.done]
        total += lanczos_step(op, runs)
        for e in active:
            e.update(total)
        emit([], callback, Step(total, tuple(max(e.values) if e.values else float("nan")
                                             for e in eigens),
                                label=f"{sum(run.done for run in runs)}/{len(runs)} blocks done",
                                max_matvecs=max_steps * len(runs)))
    return [e.result() for e in eigens]
