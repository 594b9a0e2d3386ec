"""Trace estimators: Hutchinson's (optionally after deflating a Krylov space, split over groups
of coordinates, with the diagonal) and Hutch++.

References: Hutchinson's estimator as in PyHessian (Yao et al., 2020); the diagonal (Bekas,
Kokiopoulou & Saad 2007); deflating a Krylov space before Hutchinson (Chen & Hallman,
"Krylov-aware stochastic trace estimation", 2023); Hutch++ (Meyer, Musco, Musco & Woodruff,
SOSA 2021).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..operators import LinearOperator
from ..results import Callback, DiagonalResult, Step, TraceResult
from ._common import F64, apply, emit, rademacher, resolve_generator, standard_error
from .lanczos import Lanczos, lanczos_step
from .sampling import GroupTally

__all__ = ["KrylovDeflation", "hutchinson_trace", "hutchpp_trace"]


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
    predicted cost and keeps the whole basis (more deflation never raises the variance), or at
    once when N(m) <= ``min_probes`` (from there every step adds one to the cost).
    ``AQ`` comes from the Lanczos relation (``Lanczos.products``), without extra products."""
    run = Lanczos(rademacher((op.dim,), generator, op.device), steps, generator)
    best, floor = None, False
    while not run.done:
        lanczos_step(op, [run])
        m, q = run.m, run.Q
        if auto and pilot is not None:
            defl = KrylovDeflation(Q=q, AQ=run.products(), num_matvecs=m)
            PZ, APZ = defl.project(*pilot)
            PAPZ = APZ - (APZ @ q.T) @ q
            frob_left = float((PAPZ ** 2).sum(dim=1).mean())
            trace_hat = defl.exact_trace + float((PZ * APZ).sum(dim=1).mean())
            probes = 2 * frob_left / (rse * trace_hat) ** 2
            cost = m + max(probes, min_probes)
            if best is None or cost < best[1]:
                best = (m, cost)
            floor = probes <= min_probes  # from here every step only adds a product
        emit(history, callback, Step(m, (float(run.alpha[:m].sum()),), (float("nan"),),
                                     "", "deflation", max_matvecs=steps))
        if floor or (best is not None and m >= best[0] + 3):
            break  # the probes' floor binds, or three steps past the predicted optimum
    # the steps past the optimum are paid for: deflating them only helps
    return KrylovDeflation(Q=run.Q.clone(), AQ=run.products(), num_matvecs=run.m)


def hutchinson_trace(op: LinearOperator, *, max_iter: int = 100, tol: float | None = 1e-3,
                     rse: float | None = None, min_probes: int = 10, block_size: int = 1,
                     deflate: int | str = 0, max_deflation_steps: int = 50,
                     groups: Sequence | None = None, diagonal: bool = False,
                     sampling_groups: int | None = None, generator: torch.Generator | None = None,
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
    ``sampling_groups`` G: also ``result.sampling``, the jackknife over G groups of
    mini-batches from the same probes (``estimators.sampling``; cost: see ``_group_split``).
    """
    _check_trace_arguments(max_iter, rse, tol)
    generator = resolve_generator(generator)
    history: list = []
    deflation, pilot, used = _deflation_for(op, deflate, rse, max_iter, min_probes,
                                            max_deflation_steps, generator, history, callback)
    tally = _Tally(deflation, groups, diagonal)
    split, pilot, used = _group_split(op, sampling_groups, tally, pilot, used)
    prev, rule = 0.0, None
    while tally.n < max_iter and rule is None:
        Z, AZ, parts, pilot, cost = _probe_block(op, tally, split, pilot,
                                                 min(block_size, max_iter - tally.n), generator)
        used += cost
        for i, c in enumerate(tally.contributions(Z, AZ, projected=split is not None)):
            if tally.n == max_iter:
                break
            tally.add(c, None if parts is None else (Z[i], parts[:, i]))
            emit(history, callback, Step(used, (tally.mean,), (tally.stderr,),
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
        diagonal=tally.diagonal_result(used) if diagonal else None,
        sampling=split and split.result(tally.mean, tally.stderr))


def _group_split(op, sampling_groups, tally, pilot, used):
    """The per-group split of the probes for the sampling error (``tally.split``). Each
    probe block is then projected first (``P z``) and multiplied once with its products split
    by group (``_probe_block``: the same products, a G-times larger all-reduce); a deflated
    space's per-group exact part costs its m products once more; 'auto' deflation's pilot
    probes are not reused as probes (their products are not split by group). Returns
    (GroupTally or None, the pilot probes still to reuse, products used)."""
    if sampling_groups is None:
        return None, pilot, used
    tally.split = GroupTally(op, sampling_groups, tally.groups, tally.diagonal)
    if tally.deflation is not None:
        tally.split.set_deflation(op, tally.deflation.Q.to(op.device))
    return tally.split, None, used + tally.split.num_matvecs


def _probe_block(op, tally, split, pilot, k, generator):
    """(Z, A Z, None, None, 0) from the pilot probes while there are some (their products are
    known); else (Z, A Z, None, None, k) for k new Rademacher probes, or with a per-group split
    (P Z, A P Z, the per-group products (G, k, dim), None, k): projected first, then ONE pass
    of ``group_matmat``."""
    if pilot is not None:
        return (*pilot, None, None, 0)
    Z = rademacher((k, op.dim), generator, op.device)
    if split is None:
        return Z, apply(op, Z), None, None, k
    Z = tally.project(Z)
    parts = op.group_matmat(Z.to(op.dtype), split.G).to(F64)
    return Z, parts.sum(dim=0), parts, None, k


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
        pilot, used = (Z, apply(op, Z)), Z.shape[0]
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
        self.split = None   # a GroupTally: the probes' shares per group of mini-batches

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples)

    @property
    def stderr(self) -> float:
        return standard_error(self.samples)

    def project(self, Z):
        """P z for the rows of Z (no products); Z itself without deflation."""
        if self.deflation is None:
            return Z
        return Z - (Z @ self.deflation.Q.T) @ self.deflation.Q

    def contributions(self, Z, AZ, projected=False):
        """The c of the probe rows: (Z, A Z), or (P Z, A P Z) when ``projected``."""
        if self.deflation is not None and not projected:
            Z, AZ = self.deflation.project(Z, AZ)
        return Z * AZ if self.base is None else Z * AZ + self.base

    def add(self, c, row=None) -> None:
        """One probe's c; ``row``: its (P z, per-group products) for the split, if any."""
        if row is not None:
            self.split.add(*row)
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
    generator = resolve_generator(generator)
    s = min(num_matvecs // 3, op.dim)
    g = num_matvecs - 2 * s
    S = rademacher((s, op.dim), generator, op.device)
    Y = apply(op, S)
    Qt = torch.linalg.qr(Y.T, mode="reduced")[0].T.contiguous()   # (s, dim), orthonormal rows
    AQ = apply(op, Qt)
    low_rank = float((AQ * Qt).sum())
    Z = rademacher((g, op.dim), generator, op.device)
    Z = Z - (Z @ Qt.T) @ Qt
    AZ = apply(op, Z)
    samples = (low_rank + (AZ * Z).sum(dim=1)).tolist()   # z = P z: z^T A z = z^T P A P z
    history: list = []
    for j in range(len(samples)):
        emit(history, callback, Step(2 * s + j + 1, (sum(samples[: j + 1]) / (j + 1),),
                                     (standard_error(samples[: j + 1]),), "standard error",
                                     "probes", max_matvecs=num_matvecs))
    return TraceResult(trace=sum(samples) / len(samples), stderr=standard_error(samples),
                       samples=samples, num_matvecs=2 * s + g, converged=False,
                       method="hutchpp", stopping_rule="budget", history=history,
                       deflation={"dimension": s, "exact_part": low_rank,
                                  "num_matvecs": 2 * s, "chosen": "fixed"})
