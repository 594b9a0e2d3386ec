"""pyhessian-dist: exact, distributed Hessian spectra of neural networks from HVPs.

The pieces: ``operators/``: a small linear-operator base (``LinearOperator``,
``DenseOperator``, ``CallableOperator``), ``ModelOperator`` (a curvature matrix of a model's
mean loss over every rank's mini-batches, one all-reduce per product) and its curvatures
``HessianOperator``, ``GGNOperator`` (generalized Gauss-Newton) and ``EmpiricalFisherOperator``
(by name in ``CURVATURES``);
``batches``: mini-batches of any layout (``batch_size``) with a ``forward(model, batch)`` and a
``loss(outputs, batch)``; ``estimators/``: matrix-free algorithms that take any operator
(Lanczos, power iteration, Hutchinson with optional Krylov deflation, Hutch++, SLQ of an
operator or of each of its diagonal blocks) and return
typed results (``EigenResult``, ``TraceResult``, ``DensityResult``) whose progress is one shape
(``Step``); ``parameter_groups`` for per-layer index sets; ``gaussian_density`` for the ESD;
``spectral_js_distances`` for the heterogeneity of block spectra; ``attention`` for
scaled_dot_product_attention in second-order passes;
and ``hessian``, a drop-in for PyHessian's class.
"""
from .batches import batch_size
from .density import gaussian_density, jensen_shannon_distance, spectral_js_distances
from .distributed import get_rank, get_world_size, print0
from .estimators import (
    KrylovDeflation,
    eigenvalue_sampling_error,
    hutchinson_trace,
    hutchpp_trace,
    jackknife,
    lanczos_eigenpairs,
    lanczos_group_eigenpairs,
    power_iteration_eigenpairs,
    rademacher,
    slq_density,
    slq_group_densities,
)
from .groups import parameter_groups
from .hessian import hessian
from .operators import (
    CURVATURES,
    HVP_MODES,
    CallableOperator,
    DenseOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    LinearOperator,
    ModelOperator,
    available_memory_bytes,
)
from .results import (
    DensityResult,
    DiagonalResult,
    EigenResult,
    SamplingError,
    Step,
    TraceResult,
)

__version__ = "0.2.0"

__all__ = [
    "CURVATURES",
    "HVP_MODES",
    "CallableOperator",
    "DenseOperator",
    "DensityResult",
    "DiagonalResult",
    "EigenResult",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "KrylovDeflation",
    "LinearOperator",
    "ModelOperator",
    "SamplingError",
    "Step",
    "TraceResult",
    "__version__",
    "available_memory_bytes",
    "batch_size",
    "eigenvalue_sampling_error",
    "gaussian_density",
    "get_rank",
    "get_world_size",
    "hessian",
    "hutchinson_trace",
    "hutchpp_trace",
    "jackknife",
    "jensen_shannon_distance",
    "lanczos_eigenpairs",
    "lanczos_group_eigenpairs",
    "parameter_groups",
    "power_iteration_eigenpairs",
    "print0",
    "rademacher",
    "slq_density",
    "slq_group_densities",
    "spectral_js_distances",
]
