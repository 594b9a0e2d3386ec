"""pyhessian-dist: exact, distributed Hessian spectra of neural networks from HVPs.

The pieces: ``HessianOperator`` (H v over every rank's data, one all-reduce per product),
matrix-free algorithms that take any matvec (Lanczos, power iteration, Hutchinson, Hutch++,
SLQ), ``gaussian_density`` for the ESD, and ``hessian``, a drop-in for PyHessian's class.
"""
from .algorithms import (DensityResult, EigenResult, TraceResult, hutchinson_trace,
                         hutchpp_trace, lanczos_top_eigenpairs, lanczos_tridiagonal,
                         power_iteration_top_eigenpairs, rademacher, slq_density)
from .density import gaussian_density
from .distributed import get_rank, get_world_size, print0
from .hessian import hessian
from .operator import HVP_MODES, HessianOperator

__version__ = "0.1.0"

__all__ = [
    "hessian", "HessianOperator", "HVP_MODES", "lanczos_top_eigenpairs",
    "power_iteration_top_eigenpairs", "hutchinson_trace", "hutchpp_trace", "slq_density",
    "lanczos_tridiagonal", "rademacher", "gaussian_density", "EigenResult", "TraceResult",
    "DensityResult", "get_rank", "get_world_size", "print0", "__version__",
]
