"""Checkpoints: save ours, load ours or the original PyHessian's, into a fresh model.

``save_checkpoint`` writes a self-describing file (weights, architecture, data set,
normalisation, image size, epoch, accuracy, arguments, and optionally the training state for
``--resume``) atomically, loadable with ``weights_only=True``. The model is our CIFAR ResNet
(arch ``{"name": "resnet", ...}``) or one built by ``--model module:callable`` (arch
``{"name": "custom", "spec": ..., "num_classes": N}``, rebuilt through ``support.models``).

``load_checkpoint`` reads a checkpoint in five steps a reader can follow one at a time::

    read_checkpoint_file(path)                  -> obj   (file checks, safe torch.load)
    parse_ours(obj, path) | parse_original(obj, path)
                                                -> (state_dict, arch, meta)
    check_flags(arch, batch_norm, residual, path)        (flags describe, they cannot change)
    check_finite(state_dict, path)                       (no NaN / inf weights)
    build_model(arch, state_dict, path)         -> model (keys and shapes checked, loaded)

``read_training_state(path)`` gives what ``training.py --resume`` needs (optimizer, schedule,
epoch, RNG states: see ``capture_rng_state`` / ``restore_rng_state``).

Every problem a user can fix raises ``CheckpointError`` with one sentence.
"""
import os
import random
import re

import numpy as np
import torch
from torch import nn

from models.resnet import resnet
from support.errors import CheckpointError, UserError, short_reason
from support.files import atomic_torch_save
from support.models import model_from_spec

__all__ = [
    "describe_model",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "build_model",
    "capture_rng_state",
    "check_model_spec",
    "check_finite",
    "check_flags",
    "count_parameters",
    "custom_arch",
    "load_checkpoint",
    "parse_original",
    "parse_ours",
    "read_checkpoint_file",
    "read_training_state",
    "restore_rng_state",
    "save_checkpoint",
    "unwrap_model",
]

CHECKPOINT_FORMAT = "pyhessian-dist-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

# What to do when a file is not a usable checkpoint (ends most "cannot read" messages).
_HINT = "pass a complete file written by training.py or the original PyHessian"
# meta fields that only our format records (None for the original's plain state_dicts).
_META_FIELDS = ("dataset", "normalization", "image_size", "epoch", "test_accuracy", "args",
                "torch_version")


# ---- saving ------------------------------------------------------------------------------


def unwrap_model(model):
    """The plain module inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def count_parameters(model):
    """Number of trainable-parameter entries (what the original reports: 272,474 for ResNet20)."""
    return sum(p.numel() for p in unwrap_model(model).parameters())


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
    """The ``arch`` record of our ResNet: name, depth, batch_norm, residual, num_classes."""
    if not all(hasattr(model, a) for a in ("depth", "batch_norm", "residual", "num_classes")):
        raise ValueError(f"{type(model).__name__} is not the built-in ResNet; pass "
                         "arch=custom_arch(spec, num_classes) to save_checkpoint")
    return {
        "name": "resnet",
        "depth": int(model.depth),
        "batch_norm": bool(model.batch_norm),
        "residual": bool(model.residual),
        "num_classes": int(model.num_classes),
    }


def custom_arch(spec, num_classes):
    """The ``arch`` record of a model built by ``--model spec`` (see ``support.models``)."""
    return {"name": "custom", "spec": str(spec), "num_classes": int(num_classes)}


def _check_safe(value, where="training_state"):
    """Raise TypeError unless ``value`` holds only what weights_only loading accepts."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
            _check_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_safe(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; store tensors or plain types")


def save_checkpoint(path, model, *, dataset, normalization, epoch, test_accuracy, args,
                    arch=None, image_size=32, training_state=None):
    """Save a self-describing checkpoint atomically (loadable with weights_only=True).

    The file holds {"format", "format_version", "state_dict" (no ``module.`` prefix),
    "arch" (ours: {"name": "resnet", "depth", "batch_norm", "residual", "num_classes"};
    ``--model``: ``custom_arch(spec, num_classes)``), "dataset", "normalization",
    "image_size", "epoch", "test_accuracy", "args", "torch_version"} and, when given,
    "training_state" (tensors and plain types only; see ``read_training_state``).
    Raises CheckpointError when the file cannot be written.
    """
    model = unwrap_model(model)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "state_dict": state_dict,
        "arch": _plain(arch) if arch is not None else _arch_of(model),
        "dataset": _plain(dataset),
        "normalization": _plain(normalization),
        "image_size": int(image_size),
        "epoch": _plain(epoch),
        "test_accuracy": _plain(test_accuracy),
        "args": _plain(dict(args) if args is not None else {}),
        "torch_version": str(torch.__version__),
    }
    if training_state is not None:
        _check_safe(training_state)
        obj["training_state"] = training_state
    try:
        atomic_torch_save(obj, path)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write checkpoint {path}: {exc.strerror or short_reason(exc)}; "
            f"choose a writable --saving-folder"
        ) from None


# ---- training state (--resume) --------------------------------------------------------------


def capture_rng_state(loader_generator=None):
    """Every random-number state training consumes, as tensors and plain types: torch's CPU
    generator (and every CUDA device's), NumPy's global MT19937, Python's ``random``, and the
    data loader's shuffling generator (when given)."""
    version, mt, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state, loader_generator=None):
    """Set the states ``capture_rng_state`` recorded (the CUDA ones when the device count
    matches)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()),
                     py["gauss_next"]))
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def read_training_state(path):
    """``(state_dict, training_state, meta)`` of a checkpoint that ``training.py`` wrote with its
    training state (the last-epoch file, not the best-accuracy one); CheckpointError otherwise.
    The weights are checked for NaN / inf."""
    path = os.fspath(path)
    obj = read_checkpoint_file(path)
    if not (isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT):
        raise CheckpointError(f"--resume {path} is not a checkpoint written by training.py "
                              "(it has no training state); to continue training, pass the "
                              "last-epoch checkpoint of a training.py run")
    state_dict, _arch, meta = parse_ours(obj, path)
    check_finite(state_dict, path)
    state = obj.get("training_state")
    if not isinstance(state, dict) or "optimizer" not in state:
        stem, ext = os.path.splitext(path)
        if stem.endswith(".best"):
            raise CheckpointError(f"--resume {path} is a best-accuracy checkpoint, which holds "
                                  "no training state (optimizer, epoch, random states); pass "
                                  f"{stem.removesuffix('.best')}{ext}, the last-epoch "
                                  "checkpoint, to continue training")
        raise CheckpointError(f"--resume {path} holds weights but no training state (optimizer, "
                              "epoch, random states); pass the last-epoch checkpoint of a "
                              "training.py run (to analyse this one, pass it to "
                              "example_pyhessian_analysis.py)")
    return state_dict, state, meta


# ---- loading -----------------------------------------------------------------------------


def load_checkpoint(path, *, batch_norm=None, residual=None, map_location="cpu",
                    model_spec=None):
    """Load a checkpoint into a fresh model; return ``(model, meta)``.

    Accepts
      * our format (``save_checkpoint``), and
      * plain state_dicts as the original PyHessian saves them (keys prefixed ``module.``
        by nn.DataParallel; un-prefixed keys work too).  Their architecture is inferred
        from the keys (see ``_infer_arch``; residual = "has downsample keys").

    model_spec: ``--model module.path:callable``. None takes the checkpoint's model (our
    ResNet, or the spec a custom checkpoint records); a spec must agree with a custom
    checkpoint's and cannot replace the ResNet of one of ours; for a plain state_dict it
    builds the model (``num_classes`` = rows of the last 2-D ``*weight`` tensor, the classifier).

    Always uses ``torch.load(..., weights_only=True)``: no arbitrary code runs.

    batch_norm / residual: None takes the checkpoint's value; a bool that contradicts it
    raises CheckpointError (the flags describe the model, they cannot change a trained one).
    Weights with NaN or inf values raise CheckpointError naming the first such tensor.

    meta: {"dataset", "normalization", "image_size", "epoch", "test_accuracy", "args",
    "torch_version", "path", "source" ("pyhessian-dist" | "original-state-dict"), "arch"}; the
    original format has None for dataset/normalization/epoch/test_accuracy/args (the caller
    then uses CIFAR-10 and its normalisation) and image_size 32.  The file is read on the
    CPU; the model is moved to ``map_location`` when that is a device (or its name) and is in
    eval mode.
    """
    path = os.fspath(path)
    obj = read_checkpoint_file(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        state_dict, arch, meta = parse_ours(obj, path)
    else:
        state_dict, arch, meta = parse_original(obj, path, model_spec)
    check_model_spec(arch, model_spec, path)
    check_flags(arch, batch_norm, residual, path)
    check_finite(state_dict, path)
    model = build_model(arch, state_dict, path)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    return model, meta


# step 1: read the file ----------------------------------------------------------------------


def read_checkpoint_file(path):
    """The object stored in ``path`` by torch.save, read safely (weights_only=True) on the CPU.

    Raises CheckpointError with one sentence when the file is missing, unreadable, empty,
    text, truncated, not written by torch.save, or pickles code that weights_only refuses.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {exc.strerror or short_reason(exc)}; "
            f"check the file's permissions"
        ) from None
    if not head:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is empty (0 bytes); {_HINT}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, pickle, EOF...: say what the file is
        reason = _why_unreadable(head, exc)
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None


def _why_unreadable(head, exc):
    """One clause (reason; what to do) for a torch.load failure, from the file's first bytes."""
    text = str(exc)
    if "Unsupported global" in text:
        m = re.search(r"GLOBAL (\S+)", text)
        what = f" ({m.group(1)})" if m else ""
        return (f"it pickles Python objects{what} that safe weights_only loading refuses, e.g. "
                f"a whole model instead of its state_dict; save model.state_dict() instead, "
                f"or {_HINT}")
    if head.startswith(b"PK\x03\x04"):
        return f"it is a truncated or damaged torch.save archive ({_torch_detail(exc)}); {_HINT}"
    if head.startswith(b"\x80"):  # a pickle (protocol >= 2), as torch.save's legacy format
        if "magic number" in text:
            return f"it is a plain Python pickle, not a file written by torch.save; {_HINT}"
        return f"it is a truncated or damaged torch.save file ({_torch_detail(exc)}); {_HINT}"
    if head.startswith(b"\x93NUMPY"):
        return f"it is a NumPy .npy file, not a file written by torch.save; {_HINT}"
    if head.startswith(b"\x1f\x8b"):
        return (f"it is gzip-compressed, not a file written by torch.save; "
                f"decompress it first or {_HINT}")
    if _is_text(head):
        first = head.decode("utf-8", "replace").strip().splitlines()[0][:30]
        return f"it is not a file written by torch.save (it starts with text: {first!r}); {_HINT}"
    start = head[:4].hex(" ")
    return f"it is not a file written by torch.save (it starts with bytes {start}); {_HINT}"


def _torch_detail(exc):
    """torch's own reason for a failed load, shortened to a clause without newlines."""
    text = str(exc)
    if isinstance(exc, EOFError) and not text:
        return "the data end too early"
    if "WeightsUnpickler error:" in text:
        return text.split("WeightsUnpickler error:")[1].strip().splitlines()[0].rstrip(".")
    return short_reason(exc, 100)


def _is_text(head):
    """Whether the first bytes of a file look like text (printable ASCII / UTF-8, no NUL)."""
    if b"\0" in head:
        return False
    printable = sum(32 <= b < 127 or b in b"\t\n\r" or b >= 128 for b in head)
    return printable >= 0.95 * len(head)


# step 2: parse ours or the original's ---------------------------------------------------------


def _is_state_dict(obj):
    """Whether ``obj`` is a non-empty dict of name -> tensor."""
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def parse_ours(obj, path):
    """(state_dict, arch, meta) of a checkpoint written by ``save_checkpoint``."""
    version = obj.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {version!r}, newer than this code reads "
            f"({CHECKPOINT_FORMAT_VERSION}); update pyhessian-dist"
        )
    state_dict, arch = obj.get("state_dict"), obj.get("arch")
    if not _is_state_dict(state_dict) or not isinstance(arch, dict):
        raise CheckpointError(f"cannot read checkpoint {path}: state_dict or arch missing; {_HINT}")
    name = arch.get("name", "resnet")
    if name == "custom" and isinstance(arch.get("spec"), str):
        arch = {"name": "custom", "spec": arch["spec"], "num_classes": arch.get("num_classes")}
    elif name == "resnet":
        arch = {
            "name": "resnet",
            "depth": arch.get("depth"),
            "batch_norm": bool(arch.get("batch_norm")),
            "residual": bool(arch.get("residual")),
            "num_classes": arch.get("num_classes"),
        }
    else:
        raise CheckpointError(
            f"checkpoint {path} holds a {name!r} model; only resnet and custom (--model) "
            f"are supported"
        )
    meta = {key: obj.get(key) for key in _META_FIELDS}
    meta["image_size"] = obj.get("image_size", 32)
    meta.update(path=path, source="pyhessian-dist", arch=arch)
    return state_dict, arch, meta


def parse_original(obj, path, model_spec=None):
    """(state_dict, arch, meta) of a plain state_dict as the original PyHessian saves it.

    The ``module.`` prefix of nn.DataParallel is stripped; a dict wrapping the state_dict
    under "state_dict", "model_state_dict" or "model" is accepted too.  The architecture is
    inferred from the keys (``_infer_arch``), or with ``model_spec`` is that model with
    ``num_classes`` from the classifier's rows (``_custom_arch_of_state_dict``); meta has None
    for what the file does not record.
    """
    state_dict = obj
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in ("state_dict", "model_state_dict", "model"):
            if _is_state_dict(obj.get(key)):
                state_dict = obj[key]
                break
    if not _is_state_dict(state_dict):
        raise CheckpointError(
            f"cannot read checkpoint {path}: it holds a {type(obj).__name__}, "
            f"not a state_dict; {_HINT}"
        )
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if model_spec is not None:
        arch = _custom_arch_of_state_dict(state_dict, model_spec, path)
    else:
        arch = _infer_arch(state_dict, path)
    meta = dict.fromkeys(_META_FIELDS)
    meta.update(path=path, source="original-state-dict", arch=arch, image_size=32)
    return state_dict, arch, meta


def _custom_arch_of_state_dict(state_dict, spec, path):
    """``custom_arch(spec, num_classes)`` with num_classes = rows of the last 2-D ``*weight``."""
    rows = [v.shape[0] for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 2]
    if not rows:
        raise CheckpointError(f"checkpoint {path} has no 2-D weight (a classifier) from which "
                              f"to read the number of classes for --model {spec}")
    return custom_arch(spec, rows[-1])


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
            f"checkpoint {path} is a state_dict without conv1.weight/fc.weight, not a CIFAR "
            f"ResNet; pass a checkpoint written by training.py or the original PyHessian"
        )
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("layer1.")}
    return {
        "name": "resnet",
        "depth": 6 * len(blocks) + 2,
        "batch_norm": "bn1.weight" in state_dict,
        "residual": any(".downsample." in k for k in state_dict),
        "num_classes": int(state_dict["fc.weight"].shape[0]),
    }


# steps 3 and 4: check the flags and the values ----------------------------------------------


def check_model_spec(arch, model_spec, path):
    """Raise CheckpointError when ``--model`` (``model_spec``, None = not given) contradicts
    the model the checkpoint holds."""
    if model_spec is None or (arch["name"] == "custom" and arch["spec"] == model_spec):
        return
    if arch["name"] == "custom":
        raise CheckpointError(f"checkpoint {path} was trained with --model {arch['spec']} but "
                              f"--model {model_spec} was given; drop --model or pass "
                              f"--model {arch['spec']}")
    raise CheckpointError(f"checkpoint {path} holds the built-in ResNet{arch['depth']}, not "
                          f"--model {model_spec}; drop --model")


def _flag_pair(name):
    """("--batch-norm", "--no-batch-norm") for "batch_norm"."""
    return f"--{name.replace('_', '-')}", f"--no-{name.replace('_', '-')}"


def check_flags(arch, batch_norm, residual, path):
    """Raise CheckpointError when --(no-)batch-norm / --(no-)residual contradict ``arch``.

    None means "not given" and always passes: the flags describe the model, they cannot
    change a trained one.
    """
    for name, given in (("batch_norm", batch_norm), ("residual", residual)):
        if given is not None and arch["name"] == "custom":
            on, off = _flag_pair(name)
            raise CheckpointError(f"checkpoint {path} holds --model {arch['spec']}; {on} / "
                                  f"{off} describe the built-in ResNet only; drop the flag")
        if given is not None and bool(given) != arch[name]:
            on, off = _flag_pair(name)
            given_flag, right_flag = (on, off) if given else (off, on)
            raise CheckpointError(
                f"checkpoint {path} was trained with {name}={arch[name]} "
                f"but {given_flag} was given; drop the flag or pass {right_flag}"
            )


def check_finite(state_dict, path):
    """Raise CheckpointError naming the first floating-point tensor with NaN or inf values."""
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        counts = [f"{nan} NaN"] if nan else []
        counts += [f"{inf} inf"] if inf else []
        raise CheckpointError(
            f"checkpoint {path} has non-finite values in {key} "
            f"({' and '.join(counts)} of {tensor.numel()}), so it cannot be analysed; "
            f"pass a checkpoint saved before the training diverged"
        )


# step 5: build the model ----------------------------------------------------------------------


def build_model(arch, state_dict, path):
    """A fresh model described by ``arch`` with ``state_dict`` loaded (keys and shapes checked)."""
    if arch["name"] == "custom":
        try:
            model = model_from_spec(arch["spec"], arch["num_classes"])
        except UserError as exc:
            raise CheckpointError(f"checkpoint {path} holds a --model {arch['spec']} model that "
                                  f"cannot be rebuilt here: {exc}") from None
    else:
        try:
            model = resnet(
                depth=arch["depth"],
                num_classes=arch["num_classes"],
                batch_norm=arch["batch_norm"],
                residual=arch["residual"],
            )
        except (ValueError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {path} describes an impossible ResNet: {exc}") from None
    _check_keys_and_shapes(model.state_dict(), state_dict, arch, path)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: {short_reason(exc)}"
        ) from None
    return model


def _check_keys_and_shapes(expected, state_dict, arch, path):
    """Raise CheckpointError when ``state_dict`` misses, adds or reshapes a key of ``expected``."""
    if arch["name"] == "custom":
        model_name = f"--model {arch['spec']}"
        described = model_name
    else:
        model_name = f"ResNet{arch['depth']}"
        described = (f"{model_name} (batch_norm={arch['batch_norm']}, "
                     f"residual={arch['residual']})")
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"checkpoint {path} does not match {described}: {' and '.join(parts)}; {_HINT}"
        )
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint {path} does not match {model_name}: {key} has shape "
                f"{tuple(state_dict[key].shape)}, expected {tuple(tensor.shape)}; {_HINT}"
            )


def describe_model(meta) -> str:
    """One phrase for the model of a loaded checkpoint's ``meta``."""
    arch = meta["arch"]
    if arch.get("name") == "custom":
        return f"{arch['spec']} ({arch['num_classes']} classes)"
    return (f"ResNet{arch['depth']} (batch_norm={arch['batch_norm']}, "
            f"residual={arch['residual']})")
