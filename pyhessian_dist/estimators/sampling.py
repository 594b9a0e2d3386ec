"""Sampling error: how far a number computed on N samples would move with another sample of the
same size from the same data, by the delete-a-group jackknife over groups of mini-batches.

The ``B`` mini-batches of all ranks are cut, in their global order, into G contiguous groups of
whole mini-batches (``ModelOperator.batch_groups``: the same on any world size). With ``N_g``
samples in group g and ``P_g = sum_{b in g} w_b M_b`` its share of ``M = sum_g P_g``, the
curvature of the sample without group g is

    M_{-g} = (M - P_g) N / (N - N_g).

For an estimate theta = f(M) and its G delete-a-group replicates theta_{-g} = f(M_{-g}), with
mean theta_bar = (1/G) sum_g theta_{-g}, the jackknife gives (Efron & Stein 1981; the
delete-a-group form: Kott 2001, "The delete-a-group jackknife", J. Official Statistics 17;
Shao & Tu 1995, *The Jackknife and Bootstrap*, sec. 2.1 and 5.2)

    standard error  se   = sqrt((G - 1) / G * sum_g (theta_{-g} - theta_bar)^2),
    bias            bias = (G - 1) (theta_bar - theta)     (estimate minus truth, to order 1/N).

``se`` is the standard deviation of theta over samples of N from the same data; ``bias`` is
what theta overshoots the infinite-sample value by when the bias falls like 1/N (extreme
eigenvalues of a sample matrix are biased upward: E lambda_1(M) >= lambda_1(E M)). Groups of
unequal size (a last, smaller mini-batch) use the same formulas: the groups differ by at most
one mini-batch.

Eigenvalues (``eigenvalue_sampling_error``): lambda_i(M_{-g}) for every g by a Lanczos run on
each ``M_{-g}`` warm-started from the full-sample Ritz vectors. The first step is shared: the
per-group products ``P_g y`` of ONE pass give ``M_{-g} y`` for every g (k products); each
further step costs about ``G - 1`` products in all (``ModelOperator.reduced_matmat``). Traces,
per-layer traces and the diagonal (``GroupTally``, used by ``hutchinson_trace``): every probe's
product is split over the groups in the same pass (no extra products), so the replicates use
the SAME probes; what the jackknife measures is then the data's share of the error with the
probes fixed, and the probes' own standard error is independent of it: they add in quadrature.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..operators import LinearOperator
from ..results import Callback, EigenResult, SamplingError, Step
from ._common import F64, emit, resolve_generator
from .lanczos import Lanczos, _Eigen

__all__ = ["GroupTally", "check_groups", "eigenvalue_sampling_error", "jackknife"]


def jackknife(theta: torch.Tensor, replicates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(se, bias)`` of the delete-a-group jackknife (module docstring) for the estimate
    ``theta`` (any shape) and its replicates ``(G, *theta.shape)``."""
    G = replicates.shape[0]
    if G < 2:
        raise ValueError("the jackknife needs at least 2 groups")
    replicates = replicates.to(F64)
    mean = replicates.mean(dim=0)
    var = (G - 1) / G * ((replicates - mean) ** 2).sum(dim=0)
    return var.sqrt(), (G - 1) * (mean - torch.as_tensor(theta, dtype=F64,
                                                         device=replicates.device))


def check_groups(op: LinearOperator, num_groups: int) -> int:
    """``num_groups`` when the operator has per-group products and 2 <= G <= its mini-batches;
    else a ValueError saying what to change."""
    if not hasattr(op, "group_matmat"):
        raise ValueError("the sampling error needs an operator over mini-batches (a "
                         "ModelOperator: HessianOperator, GGNOperator, EmpiricalFisherOperator)")
    G, B = int(num_groups), op.num_global_batches
    if G < 2:
        raise ValueError(f"the jackknife needs at least 2 groups of mini-batches, got {G}")
    if G > B:
        raise ValueError(f"{G} groups of whole mini-batches need at least {G} mini-batches; "
                         f"the data has {B}: use fewer groups or smaller mini-batches")
    return G


def eigenvalue_sampling_error(op, result: EigenResult, num_groups: int, *,
                              max_steps: int = 20, tol: float = 1e-4,
                              generator: torch.Generator | None = None,
                              callback: Callback | None = None) -> SamplingError:
    """Jackknife standard error and bias of the eigenvalues of ``result`` (Lanczos or power
    iteration on ``op``, a ModelOperator; ``result.which`` says which end of the spectrum).

    For each group g a Lanczos run on ``M_{-g}`` (full reorthogonalisation, as
    ``lanczos_eigenpairs``) starts from the normalised sum of the k Ritz vectors of
    ``result``; it stops when the wanted k Ritz values' relative error bounds are at most
    ``tol`` (after at least k + 2 steps) or after ``max_steps`` steps. The first step of all
    runs costs k products (one pass of per-group products ``P_g v``, see the module
    docstring), each later step about G - 1 (``reduced_matmat``; a finished run's group is
    left out). The bias multiplies the replicates' error by G - 1, hence the tight default
    ``tol``. Returns the replicates (G, k), ``stderr``, ``bias`` and the products used.
    """
    G = check_groups(op, num_groups)
    generator = resolve_generator(generator)
    k = len(result.eigenvalues)
    start = result.eigenvectors.to(F64).sum(dim=0)
    Ng = op.group_num_samples(G).to(F64)
    before = op.num_matvecs
    runs = [Lanczos(start.to(op.device), max(max_steps, k), generator) for _ in range(G)]
    eigens = [_Eigen(run, k, result.which, tol, None, op.dtype) for run in runs]
    history: list = []
    P = op.group_matmat(runs[0].next_vector()[None], G).to(F64)[:, 0]   # (G, dim)
    full = P.sum(dim=0)
    scale = op.num_samples / (op.num_samples - Ng)
    for g, run in enumerate(runs):
        run.step((full - P[g]) * scale[g])
    _update(eigens, op.num_matvecs - before, history, callback)
    while not all(run.done for run in runs):
        V = torch.zeros(G, 1, op.dim, dtype=F64, device=op.device)
        for g, run in enumerate(runs):
            if not run.done:
                V[g, 0] = run.next_vector()
        W = op.reduced_matmat(V, Ng).to(F64)
        for g, run in enumerate(runs):
            if not run.done:
                run.step(W[g, 0])
        _update(eigens, op.num_matvecs - before, history, callback)
    reps = torch.tensor([e.values for e in eigens], dtype=F64)       # (G, k)
    bounds = max(float(b) for e in eigens for b in e._ritz[2])
    se, bias = jackknife(torch.tensor(result.eigenvalues, dtype=F64), reps)
    return SamplingError(
        estimates=list(result.eigenvalues), stderr=se.tolist(), bias=bias.tolist(),
        replicates=reps.tolist(), num_groups=G, group_samples=Ng.tolist(),
        num_matvecs=op.num_matvecs - before, method="jackknife: warm-started Lanczos per group",
        converged=all(e.converged for e in eigens), replicate_error_bound=bounds,
        history=history)


def _update(eigens, matvecs, history, callback) -> None:
    """Ritz values of every group's run after a step; one Step with the worst bound of each
    eigenvalue's replicates."""
    for e in eigens:
        if not e.run.stopped:
            e.update(matvecs)
    ready = [e for e in eigens if e._ritz is not None]
    if len(ready) == len(eigens):
        values = torch.tensor([e.values for e in eigens], dtype=F64).mean(dim=0)
        worst = torch.stack([e._ritz[2] for e in eigens]).max(dim=0).values
        emit(history, callback, Step(matvecs, tuple(values.tolist()), tuple(worst.tolist()),
                                     "eigenvalue error bound", "jackknife"))


class GroupTally:
    """The per-group shares of a Hutchinson estimate's probes, for its jackknife (module
    docstring): for a probe row ``u`` (``P z``, the projected probe, or ``z``) and its
    per-group products ``P_g u`` (from ``group_matmat``), the contributions
    ``c_g = u * P_g u + base_g`` (dim,) sum over g to the estimator's ``c``; ``base_g`` =
    ``diag(P_g Q^T Q)`` is group g's share of a deflated space's exact part. Kept: the sums
    over probes of ``c_g`` summed over all coordinates (G,), over each coordinate group
    (G, L), and elementwise (G, dim) when the diagonal is asked for."""

    def __init__(self, op, num_groups: int, coordinate_groups: Sequence | None = None,
                 diagonal: bool = False):
        self.G = check_groups(op, num_groups)
        self.Ng = op.group_num_samples(self.G).to(F64).cpu()
        self.N = float(op.num_samples)
        self.coords = list(coordinate_groups) if coordinate_groups is not None else None
        self.base = None
        self.n = 0
        self.totals = torch.zeros(self.G, dtype=F64)
        self.layers = None if self.coords is None else torch.zeros(self.G, len(self.coords),
                                                                   dtype=F64)
        self.diag = torch.zeros(self.G, op.dim, dtype=F64, device=op.device) if diagonal \
            else None
        self.num_matvecs = 0   # what the per-group exact part cost (deflation)

    def set_deflation(self, op, Q: torch.Tensor, chunk: int = 8) -> None:
        """``base_g = diag(P_g Q^T Q) = sum_i q_i * P_g q_i`` for the deflation's basis Q (m,
        dim): m products, in blocks of ``chunk`` rows (a (G, chunk, dim) buffer each)."""
        base = torch.zeros(self.G, op.dim, dtype=F64, device=op.device)
        for i in range(0, Q.shape[0], chunk):
            rows = Q[i:i + chunk]
            base += (rows[None] * op.group_matmat(rows, self.G).to(F64)).sum(dim=1)
        self.num_matvecs += Q.shape[0]
        self.base = base

    def add(self, u: torch.Tensor, Pu: torch.Tensor) -> None:
        """One probe: its row ``u`` (dim,) and per-group products ``Pu`` (G, dim)."""
        c = u[None] * Pu
        if self.base is not None:
            c = c + self.base
        self.n += 1
        self.totals += c.sum(dim=1).cpu()
        if self.layers is not None:
            self.layers += torch.stack([c[:, g].sum(dim=1) for g in self.coords], dim=1).cpu()
        if self.diag is not None:
            self.diag += c

    def _replicates(self, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(estimate from the groups, replicates (G, ...)) of the mean over probes of sums."""
        means = sums / self.n
        est = means.sum(dim=0)
        scale = (self.N / (self.N - self.Ng)).to(sums.device)
        shape = (self.G,) + (1,) * (sums.dim() - 1)
        return est, (est[None] - means) * scale.reshape(shape)

    def result(self, trace: float, probe_stderr: float) -> SamplingError:
        """The trace's jackknife (``stderr``; ``total_stderr`` adds the probes' standard error
        in quadrature), the per-coordinate-group standard errors and, when kept, the
        diagonal's elementwise standard errors (``diagonal_stderr``, a tensor)."""
        est, reps = self._replicates(self.totals)
        se, bias = jackknife(est, reps)
        out = SamplingError(
            estimates=[trace], stderr=[float(se)], bias=[float(bias)], replicates=reps[:, None]
            .tolist(), num_groups=self.G, group_samples=self.Ng.tolist(),
            num_matvecs=self.num_matvecs, method="jackknife: the same probes split by group",
            converged=True)
        out.total_stderr = [math.hypot(float(se), probe_stderr)] \
            if probe_stderr == probe_stderr else [float(se)]
        if self.layers is not None:
            out.group_stderr = jackknife(*self._replicates(self.layers))[0].tolist()
        if self.diag is not None:
            out.diagonal_stderr = jackknife(*self._replicates(self.diag))[0]
        return out
