"""Matrix-free estimators for a symmetric operator known through its products, one family per
module: ``lanczos`` (one Lanczos implementation; extreme eigenpairs of the operator or of its
diagonal blocks), ``power`` (PyHessian's power iteration), ``trace`` (Hutchinson, Krylov
deflation, Hutch++), ``slq`` (spectral density), ``sampling`` (the sampling error of these:
the delete-a-group jackknife over groups of mini-batches).

Every function takes a :class:`~pyhessian_dist.operators.LinearOperator` ``op`` first (its
``dim``, ``dtype``, ``device`` and ``matvec`` on ``(k, dim)`` blocks). Randomness comes only
from ``generator``: seed it identically on every rank and every rank computes the same
numbers (``None`` draws a fresh seed from torch's global RNG). Dot products, norms, Lanczos
bases and tridiagonal matrices are kept in float64. Progress is reported to ``callback`` as
:class:`~pyhessian_dist.results.Step` records, which also form each result's ``history``.
"""
from ._common import rademacher
from .lanczos import Lanczos, lanczos_eigenpairs, lanczos_group_eigenpairs, lanczos_step
from .power import power_iteration_eigenpairs
from .sampling import eigenvalue_sampling_error, jackknife
from .slq import slq_density, slq_group_densities
from .trace import KrylovDeflation, hutchinson_trace, hutchpp_trace

__all__ = ["KrylovDeflation", "Lanczos", "hutchinson_trace", "hutchpp_trace",
           "lanczos_eigenpairs", "lanczos_group_eigenpairs", "lanczos_step",
           "power_iteration_eigenpairs", "rademacher", "eigenvalue_sampling_error", "jackknife",
           "slq_density", "slq_group_densities"]
