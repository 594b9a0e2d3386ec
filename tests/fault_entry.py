"""Test-only entry point: the analysis script with a fault injected from the environment.

``PYHESSIAN_DIST_FAULT=KIND:RANK PYTHONPATH=. python tests/fault_entry.py ARGS...`` runs
example_pyhessian_analysis.main(ARGS) with the trace analysis patched on rank RANK:
``raise`` raises a RuntimeError, ``data`` raises a DataError, ``kill`` sends the rank SIGKILL
to itself, ``sleep`` makes it compute slowly (for cancel tests). The patch is applied at import,
so spawned workers (which import this file as ``__mp_main__``) carry it too; the product code
has no fault hook.
"""
import os
import signal
import sys
import time

import example_pyhessian_analysis as analysis  # PYTHONPATH=<repo root>, or pip install -e .
from analyses.trace import Trace
from support.errors import DataError

KIND, _, RANK = os.environ.get("PYHESSIAN_DIST_FAULT", "none:0").partition(":")
_original_run = Trace.run


def _faulty_run(self, ctx):
    if ctx.rank == int(RANK or 0):
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


Trace.run = _faulty_run

if __name__ == "__main__":
    sys.exit(analysis.main(sys.argv[1:]))
