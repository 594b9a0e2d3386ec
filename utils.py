"""The scripts' short public face: re-exports the helpers of ``support/`` under one name.

training.py, example_pyhessian_analysis.py, bench/ and the tests import ``utils.X``; the code
lives in small modules, one job each:

* ``support.errors``      -- UserError, DataError, CheckpointError (one sentence each; the scripts
  print ``error: <message>`` and exit 2);
* ``support.datasets``    -- get_datasets -> DataBundle (cifar10, cifar100, imagefolder, synthetic),
  SyntheticCIFAR, default_normalization, hessian_subset, shard_batches, the CIFAR_* / SYNTHETIC_*
  constants, DATASETS;
* ``support.checkpoints`` -- save_checkpoint / load_checkpoint (ours and the original PyHessian's
  plain state_dicts; ``model_spec=`` for --model), count_parameters, unwrap_model, custom_arch,
  read_training_state, capture_rng_state / restore_rng_state, CHECKPOINT_FORMAT(_VERSION);
* ``support.models``      -- model_from_spec (``--model module.path:callable``), ModelSpecError;
* ``support.curvature``   -- CurvatureTracker (training.py --hessian-every), curvature_paths;
* ``support.files``       -- atomic_write_bytes, atomic_torch_save;
* ``support.cli``         -- ArgumentParser (one-line errors), HelpFormatter, add_bool_flag,
  positive_int, nonnegative_int, positive_float, nonnegative_float, resnet_depth;
* ``support.launch``      -- launch (single process / spawn / torchrun), run_main (one line and
  an exit status for every ending), agree, resolve_device, check_cpu_workers, free_port;
* ``support.outputs``     -- check_output_dir, RunOutputs (one run's files, committed together);
* ``support.report``      -- describe_setup, run_record, write_outputs (what rank 0 prints/writes).
"""
from support.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_VERSION,
    capture_rng_state,
    count_parameters,
    custom_arch,
    load_checkpoint,
    read_training_state,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from support.cli import (
    ArgumentParser,
    HelpFormatter,
    add_bool_flag,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    resnet_depth,
)
from support.curvature import CurvatureTracker, curvature_paths
from support.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    DATASETS,
    SYNTHETIC_NUM_CLASSES,
    SYNTHETIC_TEST_SIZE,
    SYNTHETIC_TRAIN_SIZE,
    DataBundle,
    SyntheticCIFAR,
    _synthetic_arrays,  # noqa: F401  (tests clear its cache)
    default_normalization,
    get_datasets,
    hessian_subset,
    shard_batches,
)
from support.errors import CheckpointError, DataError, UserError
from support.files import atomic_torch_save, atomic_write_bytes
from support.launch import (
    Interrupted,
    WorkerContext,
    WorkerFailed,
    agree,
    check_cpu_workers,
    free_port,
    launch,
    resolve_device,
    run_main,
)
from support.models import ModelSpecError, model_from_spec
from support.outputs import RunOutputs, check_output_dir
from support.report import describe_setup, run_record, write_outputs

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "SYNTHETIC_NUM_CLASSES",
    "SYNTHETIC_TEST_SIZE",
    "SYNTHETIC_TRAIN_SIZE",
    "ArgumentParser",
    "CheckpointError",
    "CurvatureTracker",
    "DataBundle",
    "DataError",
    "HelpFormatter",
    "Interrupted",
    "ModelSpecError",
    "RunOutputs",
    "WorkerContext",
    "WorkerFailed",
    "SyntheticCIFAR",
    "UserError",
    "add_bool_flag",
    "agree",
    "check_cpu_workers",
    "check_output_dir",
    "describe_setup",
    "free_port",
    "launch",
    "run_main",
    "run_record",
    "write_outputs",
    "atomic_torch_save",
    "atomic_write_bytes",
    "capture_rng_state",
    "count_parameters",
    "curvature_paths",
    "custom_arch",
    "default_normalization",
    "get_datasets",
    "hessian_subset",
    "load_checkpoint",
    "model_from_spec",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "read_training_state",
    "resnet_depth",
    "resolve_device",
    "restore_rng_state",
    "save_checkpoint",
    "shard_batches",
    "unwrap_model",
]
