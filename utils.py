"""The scripts' short public face: re-exports the helpers of ``support/`` under one name.

training.py, example_pyhessian_analysis.py, bench/ and the tests import ``utils.X``; the code
lives in small modules, one job each:

* ``support.errors``      -- UserError, DataError, CheckpointError (one sentence each; the scripts
  print ``error: <message>`` and exit 2);
* ``support.datasets``    -- get_datasets -> DataBundle (cifar10, cifar100, imagefolder, synthetic),
  SyntheticCIFAR, default_normalization, hessian_subset, shard_batches, the CIFAR_* / SYNTHETIC_*
  constants, DATASETS;
* ``support.checkpoints`` -- save_checkpoint / load_checkpoint (ours and the original PyHessian's
  plain state_dicts), count_parameters, unwrap_model, CHECKPOINT_FORMAT(_VERSION);
* ``support.files``       -- atomic_write_bytes, atomic_torch_save;
* ``support.cli``         -- ArgumentParser (one-line errors), HelpFormatter, add_bool_flag,
  positive_int, nonnegative_int, positive_float, nonnegative_float, resnet_depth;
* ``support.devices``     -- resolve_device.
"""
from support.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_VERSION,
    count_parameters,
    load_checkpoint,
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
from support.devices import resolve_device
from support.errors import CheckpointError, DataError, UserError
from support.files import atomic_torch_save, atomic_write_bytes

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
    "DataBundle",
    "DataError",
    "HelpFormatter",
    "SyntheticCIFAR",
    "UserError",
    "add_bool_flag",
    "atomic_torch_save",
    "atomic_write_bytes",
    "count_parameters",
    "default_normalization",
    "get_datasets",
    "hessian_subset",
    "load_checkpoint",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "resnet_depth",
    "resolve_device",
    "save_checkpoint",
    "shard_batches",
    "unwrap_model",
]
