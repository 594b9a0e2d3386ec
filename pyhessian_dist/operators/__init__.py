"""Linear operators: the base (``base.py``), the model-curvature base (``model.py``) and the
curvature matrices of a model's loss: the Hessian (``hessian.py``), the generalized
Gauss-Newton matrix (``ggn.py``) and the empirical Fisher (``fisher.py``), each a
:class:`ModelOperator` subclass that supplies its per-mini-batch product, so every algorithm
takes any of them. ``CURVATURES`` maps their names to their classes.
"""
from .base import CallableOperator, DenseOperator, LinearOperator
from .fisher import EmpiricalFisherOperator, per_sample_gradients
from .ggn import GGNOperator
from .hessian import HVP_MODES, HessianOperator
from .model import ModelOperator, available_memory_bytes

#: the curvature matrices by name: "hessian", "ggn" (generalized Gauss-Newton), "ef"
#: (empirical Fisher)
CURVATURES = {"hessian": HessianOperator, "ggn": GGNOperator, "ef": EmpiricalFisherOperator}

__all__ = ["CURVATURES", "HVP_MODES", "CallableOperator", "DenseOperator",
           "EmpiricalFisherOperator", "GGNOperator", "HessianOperator", "LinearOperator",
           "ModelOperator", "available_memory_bytes", "per_sample_gradients"]
