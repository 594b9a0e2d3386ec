"""Test-only entry point: a script with a fault injected from the environment.

``PYHESSIAN_DIST_FAULT=KIND:RANK PYTHONPATH=. python tests/fault_entry.py [training] ARGS...``
runs example_pyhessian_analysis.main(ARGS) (training.main(ARGS) when the first argument is
``training``) with a fault on rank RANK. The patches are applied at import, so spawned workers
(which import this file as ``__mp_main__``) carry them too; the product code has no fault hook.

Faults of the analysis's trace unit: ``raise`` raises a RuntimeError, ``data`` raises a
DataError, ``kill`` sends the rank SIGKILL to itself, ``sleep`` makes it compute slowly (for
cancel tests).

Places to be cancelled in, deterministically: the rank prints ``[fault] blocked in WHERE`` on
stdout and sleeps until a signal ends it (the test waits for the line, then signals):

* ``figure``: drawing a figure (the analysis's first ``save_figure``, training's curvature
  figure), after matplotlib is imported;
* ``import``: importing matplotlib.pyplot (matplotlib itself is already loaded);
* ``staged``: the analysis's write phase, after results.json is staged, before the figures;
* ``check``: training's curvature check, after the epoch's checkpoint is saved.

``commit-signal``: the launcher receives SIGTERM while rank 0 moves its files into place (the
analysis's output set, training's first checkpoints; cancels are held back there: the run must
say the files were written).
"""
import contextlib
import importlib.abc
import multiprocessing
import os
import signal
import sys
import time

import example_pyhessian_analysis as analysis  # PYTHONPATH=<repo root>, or pip install -e .
import support.curvature
import support.figures
import support.files
import support.outputs
import training
from analyses.trace import Trace
from pyhessian_dist.distributed import get_rank
from support.errors import DataError

KIND, _, RANK = os.environ.get("PYHESSIAN_DIST_FAULT", "none:0").partition(":")
RANK = int(RANK or 0)
_original_run = Trace.run


def _faulty_run(self, ctx):
    if ctx.rank == RANK:
        if KIND == "raise":
            raise RuntimeError(f"injected failure on rank {ctx.rank}")
        if KIND == "data":
            raise DataError(f"injected data problem on rank {ctx.rank}")
        if KIND == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
    if KIND == "sleep":
        print(f"  [fault] rank {ctx.rank} computing slowly", flush=True)
        time.sleep(600)
    return _original_run(self, ctx)


def _block(where):
    """On rank RANK: say where, then wait for the signal that ends the run."""
    if get_rank() == RANK:
        print(f"[fault] blocked in {where} (pid {os.getpid()})", flush=True)
        time.sleep(600)


def _blocking(where, fn):
    def wrapper(*args, **kwargs):
        _block(where)
        return fn(*args, **kwargs)
    return wrapper


class _BlockImport(importlib.abc.MetaPathFinder):
    """Blocks the first import of matplotlib.pyplot."""

    armed = True

    def find_spec(self, name, path, target=None):
        if self.armed and name == "matplotlib.pyplot":
            self.armed = False
            _block("import matplotlib.pyplot")
        return None


def _launcher_pid():
    return os.getppid() if multiprocessing.parent_process() is not None else os.getpid()


def _signal_in_commit():
    """The first block that holds cancels back (the analysis's commit, training's first
    checkpoint) gets SIGTERM sent to the launcher inside it."""
    held, armed = support.outputs.cancels_held, [True]

    @contextlib.contextmanager
    def held_then_cancelled():
        with held():
            first = bool(armed) and armed.pop()
            if first and get_rank() == RANK:
                os.kill(_launcher_pid(), signal.SIGTERM)
                time.sleep(1.0)  # the launcher stops the workers: SIGTERM, held back here
            yield

    support.outputs.cancels_held = held_then_cancelled
    support.files.cancels_held = held_then_cancelled


Trace.run = _faulty_run
if KIND == "figure":
    support.figures.save_figure = _blocking("drawing a figure", support.figures.save_figure)
    support.curvature.plot_curvature = _blocking("drawing the curvature figure",
                                                 support.curvature.plot_curvature)
elif KIND == "import":
    sys.meta_path.insert(0, _BlockImport())
elif KIND == "staged":
    support.outputs.RunOutputs.write_json = (
        lambda self, *a, _write=support.outputs.RunOutputs.write_json:
        (_write(self, *a), _block("the write phase (results.json staged)")))
elif KIND == "check":
    support.curvature.CurvatureTracker.check = _blocking(
        "a curvature check", support.curvature.CurvatureTracker.check)
elif KIND == "commit-signal":
    _signal_in_commit()

if __name__ == "__main__":
    if sys.argv[1:2] == ["training"]:
        sys.exit(training.main(sys.argv[2:]))
    sys.exit(analysis.main(sys.argv[1:]))
