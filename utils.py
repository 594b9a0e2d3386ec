"""The scripts' short public face: every public helper of ``support/`` and ``problems/`` under
one name.

training.py, example_pyhessian_analysis.py, bench/ and the tests import ``utils.X``; the code
lives in small modules, one job each (each module's ``__all__`` is what it exports here):

* ``support.cancel``      -- cancels (SIGTERM, Ctrl-C, SIGHUP): ``Interrupted``, a
  BaseException no ``except Exception`` can swallow;
* ``support.errors``      -- UserError (printed as ``error: <message>``, exit 2), DataError,
  CheckpointError;
* ``support.files``       -- atomic writes;
* ``support.datasets``    -- data sets (cifar10, cifar100, imagefolder, synthetic),
  ``hessian_subset``, ``shard_batches``;
* ``support.checkpoints`` -- save / read checkpoints (ours and the original's; read file ->
  parse -> check values; strict weight loading), RNG and training state;
* ``support.models``      -- ``--model module.path:callable``;
* ``support.cli``         -- ArgumentParser (one-line errors), flag helpers, number types;
* ``support.launch``      -- one process, spawned workers or torchrun; signals, worker
  failures, ports, devices; ``run_main`` (one line and an exit status for every ending);
* ``support.outputs``     -- the output folder: checked at start-up, one run's files together;
* ``support.report``      -- what rank 0 prints about the set-up and writes;
* ``support.curvature``   -- curvature during training (``training.py --hessian-every``);
* ``support.figures``     -- every figure (ESD, convergence, per layer, landscape, curvature,
  comparison).
* ``problems``            -- what is analysed or trained: the built-in image classifier or a
  problem file (``--problem``), and ``load_checkpoint`` (a checkpoint's model).
"""
import importlib

import problems
from problems import *  # noqa: F403
from support.cancel import *  # noqa: F403
from support.checkpoints import *  # noqa: F403
from support.cli import *  # noqa: F403
from support.curvature import *  # noqa: F403
from support.datasets import *  # noqa: F403
from support.datasets import _synthetic_arrays  # noqa: F401 - tests clear its cache
from support.errors import *  # noqa: F403
from support.figures import *  # noqa: F403
from support.files import *  # noqa: F403
from support.launch import *  # noqa: F403
from support.models import *  # noqa: F403
from support.outputs import *  # noqa: F403
from support.report import *  # noqa: F403

_MODULES = ("cancel", "checkpoints", "cli", "curvature", "datasets", "errors", "figures",
            "files", "launch", "models", "outputs", "report")
__all__ = sorted({name for module in _MODULES
                  for name in importlib.import_module(f"support.{module}").__all__}
                 | set(problems.__all__))
