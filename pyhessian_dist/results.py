"""Typed results of the algorithms, and the one shape of their progress reports.

Every algorithm reports progress as a sequence of :class:`Step` (also kept as its
``history``) and returns one result dataclass. ``to_dict()`` gives plain, strictly
JSON-safe data: tensors are left out (or listed), and NaN/inf become ``None``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "Step", "Callback", "EigenResult", "TraceResult", "DensityResult", "DiagonalResult",
    "SamplingError",
    "json_safe",
]


def json_safe(value):
    """``value`` with NaN/inf floats replaced by None, tuples by lists, tensors by lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class Step:
    """One point of a convergence history; what every progress callback receives.

    Attributes:
        matvecs: operator products used so far by this computation (the x axis).
        values: the current estimates, e.g. the wanted eigenvalues (best first), ``(trace,)``,
            or the extreme Ritz values ``(min, max)`` of an SLQ run.
        errors: one error measure per value; its meaning is ``error_kind``; NaN when unknown.
        error_kind: ``"eigenvalue error bound"`` (relative, Lanczos), ``"relative change"``
            (power iteration), ``"standard error"`` (trace), or ``""``.
        label: which part of the computation: ``"eigenvalue 2"`` (power iteration),
            ``"run 1/3"`` (SLQ), ``"deflation"`` / ``"probes"`` (deflated trace), or ``""``.
        max_matvecs: the most products this computation may use (for "k of n" progress).
    """

    matvecs: int
    values: tuple = ()
    errors: tuple = ()
    error_kind: str = ""
    label: str = ""
    max_matvecs: int | None = None

    def to_dict(self) -> dict:
        """Plain, strictly JSON-safe data (no tensors; NaN/inf as None)."""
        return json_safe(dataclasses.asdict(self))


Callback = Callable[[Step], None]


def _history(steps) -> list:
    return [s.to_dict() for s in steps]


@dataclass
class DiagonalResult:
    """Hutchinson's diagonal estimate: ``diagonal`` and its elementwise standard error, both
    ``(dim,)`` float64, from ``num_probes`` Rademacher probes; ``sampling_stderr`` (dim,): the
    elementwise jackknife standard error for another sample (``sampling_groups``), if asked."""

    diagonal: torch.Tensor
    stderr: torch.Tensor
    num_probes: int
    num_matvecs: int
    method: str = "hutchinson"
    sampling_stderr: torch.Tensor | None = None

    def to_dict(self) -> dict:
        """Plain, strictly JSON-safe data (no tensors; NaN/inf as None)."""
        return json_safe({"method": self.method, "num_probes": self.num_probes,
                          "num_matvecs": self.num_matvecs,
                          "sum": float(self.diagonal.sum())})


@dataclass
class EigenResult:
    """Eigenpairs of a symmetric operator.

    ``eigenvalues`` are ordered as ``which`` asks (largest first for "LA"/"LM", smallest
    first for "SA"); ``eigenvectors`` is ``(k, dim)`` float64 with orthonormal rows.
    ``residuals[i] = ||A v_i - lambda_i v_i|| / |lambda_i|``; ``error_bounds[i]`` bounds the
    relative eigenvalue error: min(residual, residual^2 / relative gap) (Lanczos; for power
    iteration the residual alone). ``products`` holds ``A v_i`` when the algorithm knows it
    without extra products (Lanczos: exactly, from the Lanczos relation), else None.
    """

    eigenvalues: list
    eigenvectors: torch.Tensor
    num_matvecs: int
    converged: bool
    method: str
    which: str = "LA"
    residuals: list = field(default_factory=list)
    error_bounds: list = field(default_factory=list)
    history: list = field(default_factory=list)
    products: torch.Tensor | None = None
    sampling: SamplingError | None = None

    def to_dict(self) -> dict:
        """Plain, strictly JSON-safe data (no tensors; NaN/inf as None)."""
        return json_safe({
            "method": self.method, "which": self.which, "eigenvalues": self.eigenvalues,
            "residuals": self.residuals, "error_bounds": self.error_bounds,
            "num_matvecs": self.num_matvecs, "converged": self.converged,
            "history": _history(self.history)})


@dataclass
class SamplingError:
    """The delete-a-group jackknife of some estimates (``estimators.sampling``): for each
    estimate its ``stderr`` (how far it would move with another sample of the same size from
    the same data) and ``bias`` (estimate minus its infinite-sample value, to order 1/N), from
    the ``replicates`` (G, n) computed without each of the ``num_groups`` groups of whole
    mini-batches (``group_samples``: N_g). ``num_matvecs``: the extra products it cost.
    ``replicate_error_bound``: the worst relative Lanczos error bound of the replicates
    (eigenvalues). A trace's also carries ``total_stderr`` (with the probes' standard error in
    quadrature), ``group_stderr`` (per coordinate group) and ``diagonal_stderr`` (a tensor)."""

    estimates: list
    stderr: list
    bias: list
    replicates: list
    num_groups: int
    group_samples: list
    num_matvecs: int
    method: str
    converged: bool = True
    replicate_error_bound: float | None = None
    history: list = field(default_factory=list)
    total_stderr: list | None = None
    group_stderr: list | None = None
    diagonal_stderr: torch.Tensor | None = None

    def to_dict(self) -> dict:
        """Plain, strictly JSON-safe data (no tensors; NaN/inf as None)."""
        return json_safe({
            "method": self.method, "num_groups": self.num_groups,
            "group_samples": self.group_samples, "stderr": self.stderr, "bias": self.bias,
            "total_stderr": self.total_stderr, "replicates": self.replicates,
            "num_matvecs": self.num_matvecs, "converged": self.converged,
            "replicate_error_bound": self.replicate_error_bound,
            "history": _history(self.history)})


@dataclass
class TraceResult:
    """A trace estimate: the mean of ``samples`` (one per probe), ``stderr`` the standard error
    of that mean (NaN with fewer than two probes).

    ``stopping_rule`` says why it stopped ("relative change < tol", "relative standard error
    <= rse", "budget"); ``converged`` is True only when a rule other than the budget fired.
    Deflated estimates carry ``deflation`` (number of eigenpairs, their exact share of the trace,
    the products they cost). ``group_samples`` ``(num_probes, num_groups)`` splits every sample
    over the groups of coordinates asked for: its rows sum to ``samples``.
    """

    trace: float
    stderr: float
    samples: list
    num_matvecs: int
    converged: bool
    method: str
    stopping_rule: str = ""
    history: list = field(default_factory=list)
    deflation: dict | None = None
    group_samples: torch.Tensor | None = None
    diagonal: DiagonalResult | None = None
    sampling: SamplingError | None = None

    @property
    def relative_stderr(self) -> float:
        """The standard error over |trace| (NaN for a zero trace)."""
        return self.stderr / abs(self.trace) if self.trace else float("nan")

    def group_traces(self) -> tuple[list, list]:
        """Per-group (trace estimates, standard errors) from ``group_samples``."""
        if self.group_samples is None:
            raise ValueError("this estimate was not split into groups")
        g = self.group_samples.to(torch.float64)
        n = g.shape[0]
        if n > 1:
            se = g.std(dim=0, unbiased=True) / math.sqrt(n)
        else:
            se = torch.full_like(g[0], math.nan)
        return g.mean(dim=0).tolist(), se.tolist()

    def to_dict(self) -> dict:
        """Plain, strictly JSON-safe data (no tensors; NaN/inf as None)."""
        return json_safe({
            "method": self.method, "trace": self.trace, "stderr": self.stderr,
            "relative_stderr": self.relative_stderr, "num_probes": len(self.samples),
            "samples": self.samples, "num_matvecs": self.num_matvecs,
            "converged": self.converged, "stopping_rule": self.stopping_rule,
            "deflation": self.deflation, "history": _history(self.history)})


@dataclass
class DensityResult:
    """SLQ quadrature: per run, Ritz values (``nodes``) and squared first components
    (``weights``, summing to 1 per run)."""

    nodes: list
    weights: list
    num_matvecs: int
    num_steps: int
    num_runs: int = 1
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain, strictly JSON-safe data (no tensors; NaN/inf as None)."""
        return json_safe({
            "method": "slq", "nodes": self.nodes, "weights": self.weights,
            "num_steps": self.num_steps, "num_runs": self.num_runs,
            "num_matvecs": self.num_matvecs, "history": _history(self.history)})
