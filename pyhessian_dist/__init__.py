"""pyhessian-dist: exact, distributed Hessian spectra of neural networks from HVPs.

The pieces: ``HessianOperator`` (H v over every rank's data, one all-reduce per product) on a
small linear-operator base (``LinearOperator``, ``DenseOperator``, ``CallableOperator``,
``BlockOperator``); matrix-free algorithms that take any such operator (Lanczos, power
iteration, Hutchinson with optional Krylov deflation, Hutch++, SLQ) and return typed results
(``EigenResult``, ``TraceResult``, ``DensityResult``) whose progress is one shape (``Step``);
``gaussian_density`` for the ESD; and ``hessian``, a drop-in for PyHessian's class.
"""
from .algorithms import (
    KrylovDeflation,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_eigenpairs,
    lanczos_tridiagonal,
    power_iteration_eigenpairs,
    rademacher,
    slq_density,
)
from .density import gaussian_density
from .distributed import get_rank, get_world_size, print0
from .hessian import hessian
from .operator import HVP_MODES, HessianOperator
from .operators import BlockOperator, CallableOperator, DenseOperator, LinearOperator
from .results import DensityResult, DiagonalResult, EigenResult, Step, TraceResult

__version__ = "0.2.0"

__all__ = [
    "HVP_MODES",
    "BlockOperator",
    "CallableOperator",
    "DenseOperator",
    "DensityResult",
    "DiagonalResult",
    "EigenResult",
    "HessianOperator",
    "KrylovDeflation",
    "LinearOperator",
    "Step",
    "TraceResult",
    "__version__",
    "gaussian_density",
    "get_rank",
    "get_world_size",
    "hessian",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos_eigenpairs",
    "lanczos_tridiagonal",
    "power_iteration_eigenpairs",
    "print0",
    "rademacher",
    "slq_density",
]
