"""The scripts' side of the project: everything that touches files, data and the command line.

One job per module:

* ``cancel``      -- cancels (SIGTERM, Ctrl-C, SIGHUP): ``Interrupted`` (a BaseException),
  cancels raised, held back, or ending a script that is still importing;
* ``errors``      -- UserError (printed as ``error: <message>``, exit 2), DataError,
  CheckpointError;
* ``files``       -- atomic writes (``atomic_write_bytes``, ``atomic_write_files``,
  ``atomic_torch_save``), ``write_error`` (why a write failed, in words),
  ``removed_if_left_empty`` (no empty folder left by a failed run);
* ``datasets``    -- data sets (cifar10, cifar100, imagefolder, synthetic), ``hessian_subset``,
  ``shard_batches``;
* ``checkpoints`` -- ``save_checkpoint`` / ``load_checkpoint`` (read file -> parse ours or the
  original's -> check flags -> check values -> build model);
* ``cli``         -- ``ArgumentParser`` (one-line errors), ``HelpFormatter``, ``add_bool_flag`` and
  argparse number types;
* ``launch``      -- one process, spawned workers or torchrun; signals, worker failures, ports,
  device choice; ``run_main`` (one line and an exit status for every ending);
* ``outputs``     -- the output folder: checked at start-up, one run's files committed together;
* ``report``      -- what rank 0 prints about the set-up and writes (results.json, figures);
* ``curvature``   -- curvature during training (``training.py --hessian-every``);
* ``figures``     -- every figure the scripts draw, in one place.

The scripts import these through ``utils``, the short public face at the top level.
"""
