"""The scripts' side of the project: everything that touches files, data and the command line.

One job per module:

* ``errors``      -- UserError (printed as ``error: <message>``, exit 2), DataError,
  CheckpointError;
* ``files``       -- atomic writes (``atomic_write_bytes``, ``atomic_torch_save``);
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
