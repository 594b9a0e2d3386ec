"""The analyses the script can run, in the order they run: adding one is a new module here
with an ``Analysis`` subclass (see ``base``) and one line in ``REGISTRY``."""
from . import sampling
from .base import Analysis, Context, ModelFacts, Request, Selection
from .block_spectra import BlockSpectra
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
    BlockSpectra(),
    Landscape(),
]

__all__ = ["REGISTRY", "Analysis", "Context", "ModelFacts", "Request", "Selection", "by_name",
           "sampling", "selected"]


def by_name(name: str) -> Analysis:
    return next(a for a in REGISTRY if a.name == name)


def selected(args) -> Selection:
    """The analyses the command line asks for, plus what they require, in registry order,
    with the requests they address to the units they require. A request to a unit not in
    ``requires``, or for something that unit does not serve, is a mistake in the unit
    (ValueError), not in the command line."""
    wanted = {a.name for a in REGISTRY if a.requested(args)}
    todo = list(wanted)
    while todo:
        for dep in by_name(todo.pop()).requires:
            if dep not in wanted:
                wanted.add(dep)
                todo.append(dep)
    units = [a for a in REGISTRY if a.name in wanted]
    requests = []
    for a in units:
        for r in a.requests(args):
            if r.to not in a.requires or r.need not in by_name(r.to).serves:
                raise ValueError(f"analysis {a.name!r} asks {r.to!r} for {r.need!r}: a unit "
                                 "may ask only the units in its requires for what they serve")
            requests.append(r)
    return Selection(units, requests)
