"""Linear operators: the base (``base.py``), the model-curvature base (``model.py``) and the
Hessian (``hessian.py``). Every algorithm takes a :class:`LinearOperator`; a new curvature
matrix of a model's loss (a Gauss-Newton or Fisher matrix) is a :class:`ModelOperator` subclass
that supplies its per-mini-batch product.
"""
from .base import CallableOperator, DenseOperator, LinearOperator
from .hessian import HVP_MODES, HessianOperator
from .model import ModelOperator, available_memory_bytes

__all__ = ["HVP_MODES", "CallableOperator", "DenseOperator", "HessianOperator",
           "LinearOperator", "ModelOperator", "available_memory_bytes"]
