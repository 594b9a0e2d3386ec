"""Script-side helpers shared by training.py and example_pyhessian_analysis.py.

Everything here touches the outside world (files, datasets, devices, the command
line), which is why it lives next to the scripts and not in the pyhessian_dist
library.

* data sets: ``get_datasets`` -> ``DataBundle`` (cifar10, cifar100, imagefolder,
  synthetic), ``hessian_subset``, ``shard_batches`` (a rank's Hessian mini-batches);
* checkpoints: ``save_checkpoint`` / ``load_checkpoint`` (our self-describing
  format and the original PyHessian's plain ``module.``-prefixed state_dicts),
  ``atomic_write_bytes`` / ``atomic_torch_save``;
* devices: ``resolve_device``;
* argparse helpers: ``ArgumentParser`` (one-line errors), ``HelpFormatter``, ``add_bool_flag``, ``positive_int``, ``nonnegative_int``,
  ``positive_float``, ``nonnegative_float``, ``resnet_depth``.

Errors a user can fix are raised as ``DataError`` or ``CheckpointError`` with one
sentence saying what is wrong and what to do; the scripts print them as
``error: <message>`` and exit with status 2.
"""
import argparse
import copy
import io
import math
import os
import re
import socket
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn

from models.resnet import blocks_per_stage, resnet

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "DataError",
    "CheckpointError",
    "DataBundle",
    "SyntheticCIFAR",
    "get_datasets",
    "default_normalization",
    "hessian_subset",
    "shard_batches",
    "resolve_device",
    "atomic_write_bytes",
    "atomic_torch_save",
    "save_checkpoint",
    "load_checkpoint",
    "count_parameters",
    "unwrap_model",
    "HelpFormatter",
    "ArgumentParser",
    "add_bool_flag",
    "positive_int",
    "nonnegative_int",
    "positive_float",
    "nonnegative_float",
    "resnet_depth",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")

CHECKPOINT_FORMAT = "pyhessian-dist-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


class DataError(Exception):
    """A data set cannot be found, read or used; the message says what to do."""


class CheckpointError(Exception):
    """A checkpoint cannot be found, read, written or matched to the flags given."""


# --------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------


@dataclass
class DataBundle:
    """The three views of one data set that the scripts need.

    train:       training split with augmentation (RandomCrop(32, 4) + horizontal flip)
    train_eval:  the SAME training split without augmentation (for Hessian computations)
    test:        test split without augmentation
    num_classes: number of classes
    normalization: {"mean": [r, g, b], "std": [r, g, b]} used by all three views
    name:        the data set's name (one of DATASETS)
    """

    train: torch.utils.data.Dataset
    train_eval: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int
    normalization: dict
    name: str


def default_normalization(name):
    """The normalisation a data set uses unless told otherwise (CIFAR-10 stats except for cifar100)."""
    if name == "cifar100":
        return {"mean": list(CIFAR100_MEAN), "std": list(CIFAR100_STD)}
    return {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}


def _check_normalization(normalization):
    try:
        mean = [float(x) for x in normalization["mean"]]
        std = [float(x) for x in normalization["std"]]
    except (TypeError, KeyError, ValueError):
        raise DataError(
            f"normalization must be a dict {{'mean': [r, g, b], 'std': [r, g, b]}}, got {normalization!r}"
        ) from None
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 and math.isfinite(s) for s in std) or not all(
        math.isfinite(m) for m in mean
    ):
        raise DataError(
            f"normalization needs 3 finite means and 3 positive stds, got mean={mean} std={std}"
        )
    return {"mean": mean, "std": std}


def _transforms(normalization, resize=False):
    """(augmented, plain) transform pipelines shared by every data set."""
    from torchvision import transforms as T

    norm = T.Normalize(normalization["mean"], normalization["std"])
    head = [T.Resize((32, 32))] if resize else []
    augmented = T.Compose(
        head + [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm]
    )
    plain = T.Compose(head + [T.ToTensor(), norm])
    return augmented, plain


def _with_transform(dataset, transform):
    """A shallow copy of a torchvision data set (sharing its samples) with another transform."""
    view = copy.copy(dataset)
    view.transform = transform
    if hasattr(view, "transforms") and hasattr(view, "target_transform"):
        from torchvision.datasets.vision import StandardTransform

        view.transforms = StandardTransform(transform, view.target_transform)
    return view


# ---- synthetic ------------------------------------------------------------------------

SYNTHETIC_NUM_CLASSES = 10
SYNTHETIC_TRAIN_SIZE = 5000
SYNTHETIC_TEST_SIZE = 1000
SYNTHETIC_NOISE = 0.2  # std of the per-pixel Gaussian noise (pixel range [0, 1])
SYNTHETIC_DISTRACTOR = 0.3  # largest weight of the blended-in template of another class
SYNTHETIC_LABEL_NOISE = 0.08  # fraction of labels redrawn uniformly (caps accuracy near 93%)
_SYNTHETIC_SEED = 20240229  # fixed: training and a later analysis must see the same images


@lru_cache(maxsize=4)
def _synthetic_arrays(train, size):
    """Generate (images uint8 [N, 32, 32, 3], labels int64 [N]) deterministically.

    Each class c has a smooth random colour template T_c: a 3x4x4 Gaussian field,
    bicubically upsampled to 32x32 and scaled to [0.1, 0.9].  An image of class c is

        clip(a * ((1 - w) * S(T_c) + w * T_d) + b + noise, 0, 1)  stored as uint8

    where S randomly mirrors the template (so flip augmentation stays in distribution)
    and rolls it by up to 4 pixels each way, d is another random class blended in with
    weight w ~ U[0, SYNTHETIC_DISTRACTOR], a ~ U[0.6, 1] a contrast, b ~ U[-0.1, 0.1] a
    brightness shift, and noise ~ N(0, SYNTHETIC_NOISE^2) per pixel.  Finally a fraction
    SYNTHETIC_LABEL_NOISE of the labels is redrawn uniformly at random, so no model
    reaches zero loss (a Hessian at zero loss is degenerate and uninformative).

    The templates come from one fixed seed, train and test images from two others, so
    every call returns identical data whatever the global RNG state.
    """
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(_SYNTHETIC_SEED)
    field = torch.randn(SYNTHETIC_NUM_CLASSES, 3, 4, 4, generator=g)
    templates = F.interpolate(field, size=(32, 32), mode="bicubic", align_corners=False)
    lo = templates.amin(dim=(1, 2, 3), keepdim=True)
    hi = templates.amax(dim=(1, 2, 3), keepdim=True)
    templates = 0.1 + 0.8 * (templates - lo) / (hi - lo)

    g = torch.Generator().manual_seed(_SYNTHETIC_SEED + (1 if train else 2))
    labels = torch.arange(size) % SYNTHETIC_NUM_CLASSES
    labels = labels[torch.randperm(size, generator=g)]
    x = templates[labels].clone()
    flip = torch.rand(size, generator=g) < 0.5
    x[flip] = x[flip].flip(-1)
    shifts = torch.randint(-4, 5, (size, 2), generator=g).tolist()
    for i, (dy, dx) in enumerate(shifts):  # 5,000 rolls take ~50 ms
        x[i] = torch.roll(x[i], shifts=(dy, dx), dims=(1, 2))
    other = (labels + torch.randint(1, SYNTHETIC_NUM_CLASSES, (size,), generator=g)) % SYNTHETIC_NUM_CLASSES
    w = SYNTHETIC_DISTRACTOR * torch.rand(size, 1, 1, 1, generator=g)
    contrast = 0.6 + 0.4 * torch.rand(size, 1, 1, 1, generator=g)
    brightness = 0.2 * (torch.rand(size, 1, 1, 1, generator=g) - 0.5)
    noise = SYNTHETIC_NOISE * torch.randn(size, 3, 32, 32, generator=g)
    x = contrast * ((1 - w) * x + w * templates[other]) + brightness + noise
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    relabel = torch.rand(size, generator=g) < SYNTHETIC_LABEL_NOISE
    labels[relabel] = torch.randint(0, SYNTHETIC_NUM_CLASSES, (int(relabel.sum()),), generator=g)
    return images, labels


class SyntheticCIFAR(torch.utils.data.Dataset):
    """A deterministic, learnable CIFAR-shaped data set (3x32x32 RGB, 10 classes).

    Images are stored as uint8 HWC like torchvision's CIFAR10 and returned through the
    same transform pipeline (PIL image -> transform).  The data do not depend on any
    global seed.  See ``_synthetic_arrays`` for how the images are made.
    """

    classes = [f"class{i}" for i in range(SYNTHETIC_NUM_CLASSES)]

    def __init__(self, train=True, transform=None, size=None):
        self.train = train
        self.transform = transform
        self.target_transform = None
        size = size if size is not None else (SYNTHETIC_TRAIN_SIZE if train else SYNTHETIC_TEST_SIZE)
        images, labels = _synthetic_arrays(bool(train), int(size))
        self.data = images.numpy()
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        from PIL import Image

        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


# ---- CIFAR ------------------------------------------------------------------------------

_CIFAR_INFO = {
    # name: (torchvision class name, archive, extracted folder, label)
    "cifar10": ("CIFAR10", "cifar-10-python.tar.gz", "cifar-10-batches-py", "CIFAR-10"),
    "cifar100": ("CIFAR100", "cifar-100-python.tar.gz", "cifar-100-python", "CIFAR-100"),
}


def _short(exc, limit=160):
    """First line of an exception's text, shortened, for one-line error messages."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split(". ")[0].rstrip(".")  # first sentence
    if isinstance(exc, OSError) and getattr(exc, "reason", None) is not None:  # URLError
        text = str(exc.reason)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_cifar(name, data_dir, download, train_tf, plain_tf):
    import torchvision

    cls_name, archive, folder, label = _CIFAR_INFO[name]
    cls = getattr(torchvision.datasets, cls_name)
    have_archive = os.path.isfile(os.path.join(data_dir, archive))
    have_folder = os.path.isdir(os.path.join(data_dir, folder))
    # With the archive present, download=True only verifies and extracts it (no network).
    want_download = bool(download) or (have_archive and not have_folder)
    old_timeout = socket.getdefaulttimeout()
    try:
        # A blocked network should fail in seconds, not hang; 30 s per socket operation
        # is still generous for a real download.
        if want_download and not have_folder and old_timeout is None:
            socket.setdefaulttimeout(30)
        train = cls(root=data_dir, train=True, download=want_download, transform=train_tf)
        test = cls(root=data_dir, train=False, download=False, transform=plain_tf)
    except Exception as exc:  # torchvision raises RuntimeError, URLError, tarfile errors...
        if have_archive:
            how = f"{archive} there could not be used ({_short(exc)}; is it complete?)"
        elif want_download:
            how = f"could not be downloaded ({_short(exc)})"
        else:
            how = "downloading is off"
        raise DataError(
            f"{label} is not in {data_dir}/ and {how}; place {archive} in {data_dir}/ "
            f"(or pass --data-dir DIR), or use --dataset synthetic or --dataset imagefolder --data-dir DIR"
        ) from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return train, _with_transform(train, plain_tf), test


# ---- ImageFolder --------------------------------------------------------------------------


def _load_imagefolder(data_dir, train_tf, plain_tf):
    from torchvision.datasets import ImageFolder

    layout = "expected DIR/train/<class>/*.png|jpg and DIR/test/<class>/*.png|jpg"
    roots = {}
    for split in ("train", "test"):
        path = os.path.join(data_dir, split)
        if not os.path.isdir(path):
            raise DataError(f"image folder {path} does not exist; {layout} (set DIR with --data-dir)")
        roots[split] = path
    try:
        train = ImageFolder(roots["train"], transform=train_tf)
        test = ImageFolder(roots["test"], transform=plain_tf)
    except (FileNotFoundError, OSError, RuntimeError) as exc:
        raise DataError(f"cannot read image folder {data_dir}: {_short(exc)}; {layout}") from None
    if train.classes != test.classes:
        raise DataError(
            f"image folder {data_dir}: train classes {train.classes} differ from test classes "
            f"{test.classes}; give both splits the same class folders"
        )
    return train, _with_transform(train, plain_tf), test


def get_datasets(name, data_dir="data", normalization=None, download=True):
    """Build the train (augmented), train_eval (un-augmented train) and test views of a data set.

    name: one of DATASETS.
      * cifar10 / cifar100: torchvision data sets in ``data_dir`` (downloaded when missing
        and ``download``; offline, place the archive in ``data_dir``).
      * imagefolder: ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*``, any
        image size (resized to 32x32).
      * synthetic: ``SyntheticCIFAR`` (5,000 train / 1,000 test, 10 classes), no files.
    normalization: None for the data set's default, or {"mean": [...], "std": [...]}
      (the analysis passes the one recorded in the checkpoint).

    All views share one pipeline: [Resize((32, 32)) for imagefolder] + [RandomCrop(32, 4)
    + RandomHorizontalFlip for train] + ToTensor + Normalize.  Raises DataError.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    normalization = _check_normalization(
        default_normalization(name) if normalization is None else normalization
    )
    data_dir = os.fspath(data_dir)
    train_tf, plain_tf = _transforms(normalization, resize=(name == "imagefolder"))

    if name in _CIFAR_INFO:
        train, train_eval, test = _load_cifar(name, data_dir, download, train_tf, plain_tf)
        num_classes = len(train.classes)
    elif name == "imagefolder":
        train, train_eval, test = _load_imagefolder(data_dir, train_tf, plain_tf)
        num_classes = len(train.classes)
    else:
        train = SyntheticCIFAR(train=True, transform=train_tf)
        train_eval = _with_transform(train, plain_tf)
        test = SyntheticCIFAR(train=False, transform=plain_tf)
        num_classes = SYNTHETIC_NUM_CLASSES
    return DataBundle(
        train=train,
        train_eval=train_eval,
        test=test,
        num_classes=num_classes,
        normalization=normalization,
        name=name,
    )


def hessian_subset(dataset, num_samples, seed):
    """``num_samples`` distinct indices of ``dataset``, chosen by ``torch.randperm`` from ``seed``.

    The same (len(dataset), num_samples, seed) always gives the same list, on every rank and
    every machine (a private torch.Generator; the global RNG is untouched).
    """
    n = len(dataset)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise DataError(f"--hessian-batch-size must be a positive integer, got {num_samples!r}")
    if num_samples > n:
        raise DataError(
            f"--hessian-batch-size {num_samples} exceeds the {n} samples of the training set; "
            f"pass --hessian-batch-size {n} or less"
        )
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:num_samples].tolist()


def shard_batches(dataset, indices, mini_batch_size, rank=0, world_size=1, device="cpu"):
    """This rank's Hessian mini-batches: ``indices`` cut in order into mini-batches of
    ``mini_batch_size`` (the last may be smaller), dealt round-robin to ``world_size`` ranks, so
    every world size covers exactly the same samples. Returns ``(batches, num_mini_batches)``
    with ``batches`` a list of ``(x, y)`` tensors already on ``device`` (moved once, here).
    """
    chunks = [indices[i:i + mini_batch_size] for i in range(0, len(indices), mini_batch_size)]
    batches = []
    for chunk in chunks[rank::world_size]:
        items = [dataset[i] for i in chunk]
        x = torch.stack([image for image, _ in items]).to(device)
        y = torch.tensor([int(target) for _, target in items], device=device)
        batches.append((x, y))
    return batches, len(chunks)


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------


def resolve_device(cuda, local_rank=0, warn=True):
    """``cuda:<local_rank>`` when ``cuda`` is asked for and available, else the CPU.

    When a GPU was asked for but none is there, prints one warning line to stderr
    (unless ``warn`` is false, e.g. on ranks other than 0).
    """
    if cuda and torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if cuda and warn:
        print("warning: --cuda requested but no GPU is available; running on CPU", file=sys.stderr)
    return torch.device("cpu")


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, os.replace.

    A reader never sees a half-written file; a crash leaves the old file (or none).
    Parent folders are created.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable where the OS allows it
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_torch_save(obj, path):
    """``torch.save(obj)`` to ``path`` atomically (see ``atomic_write_bytes``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def unwrap_model(model):
    """The plain module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _plain(value):
    """Convert a value to types that torch.load(weights_only=True) accepts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _plain(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)  # paths, devices, enums ...


def _arch_of(model):
    return {
        "name": "resnet",
        "depth": int(model.depth),
        "batch_norm": bool(model.batch_norm),
        "residual": bool(model.residual),
        "num_classes": int(model.num_classes),
    }


def save_checkpoint(path, model, *, dataset, normalization, epoch, test_accuracy, args):
    """Save a self-describing checkpoint atomically (loadable with weights_only=True).

    The file holds {"format", "format_version", "state_dict" (no ``module.`` prefix),
    "arch" {"name", "depth", "batch_norm", "residual", "num_classes"}, "dataset",
    "normalization", "epoch", "test_accuracy", "args", "torch_version"}.
    Raises CheckpointError when the file cannot be written.
    """
    model = unwrap_model(model)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "state_dict": state_dict,
        "arch": _arch_of(model),
        "dataset": _plain(dataset),
        "normalization": _plain(normalization),
        "epoch": _plain(epoch),
        "test_accuracy": _plain(test_accuracy),
        "args": _plain(dict(args) if args is not None else {}),
        "torch_version": str(torch.__version__),
    }
    try:
        atomic_torch_save(obj, path)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write checkpoint {path}: {exc.strerror or _short(exc)}; choose a writable --saving-folder"
        ) from None


def _flag_pair(name):
    return f"--{name.replace('_', '-')}", f"--no-{name.replace('_', '-')}"


def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _infer_arch(state_dict, path):
    """Architecture of a plain ResNet state_dict (keys without ``module.``).

    batch_norm: a ``bn1.weight`` key exists.
    residual:   any ``downsample`` key exists.  This is the only signal a plain state_dict
                carries: a residual CIFAR ResNet always has the projection shortcuts
                ``layer2.0.downsample`` and ``layer3.0.downsample`` (channels change there),
                while a model without residuals has no shortcut modules at all.
    depth:      6 * (number of distinct ``layer1.<i>.`` blocks) + 2.
    num_classes: rows of ``fc.weight``.
    """
    if "conv1.weight" not in state_dict or "fc.weight" not in state_dict:
        raise CheckpointError(
            f"checkpoint {path} is a state_dict without conv1.weight/fc.weight, not a CIFAR ResNet; "
            f"pass a checkpoint written by training.py or the original PyHessian"
        )
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("layer1.")}
    n = len(blocks)
    return {
        "name": "resnet",
        "depth": 6 * n + 2,
        "batch_norm": "bn1.weight" in state_dict,
        "residual": any(".downsample." in k for k in state_dict),
        "num_classes": int(state_dict["fc.weight"].shape[0]),
    }


def load_checkpoint(path, *, batch_norm=None, residual=None, map_location="cpu"):
    """Load a checkpoint into a fresh ResNet; return ``(model, meta)``.

    Accepts
      * our format (``save_checkpoint``), and
      * plain state_dicts as the original PyHessian saves them (keys prefixed ``module.``
        by nn.DataParallel; un-prefixed keys work too).  Their architecture is inferred
        from the keys (see ``_infer_arch``; residual = "has downsample keys").

    Always uses ``torch.load(..., weights_only=True)``: no arbitrary code runs.

    batch_norm / residual: None takes the checkpoint's value; a bool that contradicts it
    raises CheckpointError (the flags describe the model, they cannot change a trained one).

    meta: {"arch", "dataset", "normalization", "epoch", "test_accuracy", "args",
    "torch_version", "source" ("pyhessian-dist" | "original-state-dict"), "path"}; the
    original format has None for dataset/normalization/epoch/test_accuracy/args (the caller
    then uses CIFAR-10 and its normalisation).  The model is on ``map_location``, in eval mode.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    hint = "is it a complete file written by training.py or the original PyHessian?"
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip/pickle/EOF/unpickler errors all mean the same to the user
        text = str(exc)
        if "Unsupported global" in text:
            m = re.search(r"GLOBAL (\S+)", text)
            what = f" ({m.group(1)})" if m else ""
            reason = (f"it pickles Python objects{what} that safe weights_only loading refuses, "
                      f"e.g. a whole model instead of its state_dict")
        elif "WeightsUnpickler error" in text:
            reason = "not a valid torch.save file (" + text.split("WeightsUnpickler error:")[1].strip().splitlines()[0] + ")"
        else:
            reason = _short(exc, 120)
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}; {hint}") from None

    meta = {
        "dataset": None,
        "normalization": None,
        "epoch": None,
        "test_accuracy": None,
        "args": None,
        "torch_version": None,
        "path": path,
    }
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        version = obj.get("format_version")
        if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format_version {version!r}, newer than this code reads "
                f"({CHECKPOINT_FORMAT_VERSION}); update pyhessian-dist"
            )
        state_dict = obj.get("state_dict")
        arch = obj.get("arch")
        if not _is_state_dict(state_dict) or not isinstance(arch, dict):
            raise CheckpointError(f"cannot read checkpoint {path}: state_dict or arch missing; {hint}")
        if arch.get("name", "resnet") != "resnet":
            raise CheckpointError(f"checkpoint {path} holds a {arch.get('name')!r} model; only resnet is supported")
        arch = {
            "name": "resnet",
            "depth": arch.get("depth"),
            "batch_norm": bool(arch.get("batch_norm")),
            "residual": bool(arch.get("residual")),
            "num_classes": arch.get("num_classes"),
        }
        for key in ("dataset", "normalization", "epoch", "test_accuracy", "args", "torch_version"):
            meta[key] = obj.get(key)
        meta["source"] = "pyhessian-dist"
    else:
        state_dict = obj
        if isinstance(obj, dict) and not _is_state_dict(obj):
            for key in ("state_dict", "model_state_dict", "model"):
                if _is_state_dict(obj.get(key)):
                    state_dict = obj[key]
                    break
        if not _is_state_dict(state_dict):
            raise CheckpointError(
                f"cannot read checkpoint {path}: it holds a {type(obj).__name__}, not a state_dict; {hint}"
            )
        state_dict = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
        arch = _infer_arch(state_dict, path)
        meta["source"] = "original-state-dict"
    meta["arch"] = arch

    for name, given in (("batch_norm", batch_norm), ("residual", residual)):
        if given is not None and bool(given) != arch[name]:
            on, off = _flag_pair(name)
            given_flag, right_flag = (on, off) if given else (off, on)
            raise CheckpointError(
                f"checkpoint {path} was trained with {name}={arch[name]} but {given_flag} was given; "
                f"drop the flag or pass {right_flag}"
            )

    try:
        model = resnet(
            depth=arch["depth"],
            num_classes=arch["num_classes"],
            batch_norm=arch["batch_norm"],
            residual=arch["residual"],
        )
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} describes an impossible ResNet: {exc}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"checkpoint {path} does not match ResNet{arch['depth']} (batch_norm={arch['batch_norm']}, "
            f"residual={arch['residual']}): {' and '.join(parts)}; {hint}"
        )
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {path} does not match ResNet{arch['depth']}: {key} has shape "
                f"{tuple(state_dict[key].shape)}, expected {tuple(tensor.shape)}; {hint}"
            )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {_short(exc)}") from None
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    return model, meta


def count_parameters(model):
    """Number of trainable-parameter entries (what the original reports: 272,474 for ResNet20)."""
    return sum(p.numel() for p in unwrap_model(model).parameters())


# --------------------------------------------------------------------------------------
# argparse helpers (shared by both scripts)
# --------------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default (where there is one worth showing: not None, not False for a
    plain switch) and never wraps a line inside a --flag-name."""

    def _get_help_string(self, action):
        if action.default is None or (action.default is False and action.nargs == 0):
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text, width):
        import textwrap

        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what is wrong> (see --help)``, exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def add_bool_flag(parser, name, default, help):
    """Add ``--name`` / ``--no-name`` (argparse.BooleanOptionalAction) with a default."""
    dest = name.replace("-", "_")
    parser.add_argument(f"--{name}", dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help)


def _number(kind, check, what):
    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")


def resnet_depth(text):
    """argparse type: a ResNet depth of the form 6n+2 (20, 32, 44, 56, 110, ...)."""
    try:
        depth = int(text)
        blocks_per_stage(depth)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got {text!r}"
        ) from None
    return depth
