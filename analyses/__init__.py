"""The analyses the script can run, in the order they run: adding one is a new module here
with an ``Analysis`` subclass and one line in ``REGISTRY``."""
from .base import Analysis, Context
from .bottom import BottomEigenvalues
from .density import Density
from .diagonal import Diagonal
from .eigenvalues import TopEigenvalues
from .eigenvectors import SaveEigenvectors
from .landscape import Landscape
from .per_layer import PerLayer
from .trace import Trace

REGISTRY: list[Analysis] = [
    TopEigenvalues(),
    BottomEigenvalues(),
    SaveEigenvectors(),
    Trace(),
    PerLayer(),
    Diagonal(),
    Density(),
    Landscape(),
]

__all__ = ["REGISTRY", "Analysis", "Context", "by_name", "selected"]


def by_name(name: str) -> Analysis:
    return next(a for a in REGISTRY if a.name == name)


def selected(args) -> list[Analysis]:
    """The analyses the command line asks for, plus what they require, in registry order."""
    wanted = {a.name for a in REGISTRY if a.requested(args)}
    todo = list(wanted)
    while todo:
        for dep in by_name(todo.pop()).requires:
            if dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    return [a for a in REGISTRY if a.name in wanted]
