"""Checkpoints: save ours, read ours or the original PyHessian's.

``save_checkpoint`` writes a self-describing file atomically, loadable with
``weights_only=True``: the weights, the problem that was trained (``Problem.record()``: the
built-in image problem's data set, architecture, normalisation and image size, or a problem
file's path and SHA-256), epoch, accuracy, the arguments and, for ``--resume``, the training
state (optimizer, schedule, epoch, every random state).

``read_checkpoint(path)`` -> ``(state_dict, meta)``: the file read safely, ours or the
original's plain state_dict (``module.`` keys; its ResNet inferred from the keys), with the
weights checked for NaN / inf. ``meta["problem"]`` says which problem the weights belong to;
``problems.problem_from_checkpoint`` rebuilds it and ``load_weights`` puts the weights in
(strict: every key and shape must match). Every problem a user can fix raises
``CheckpointError`` with one sentence.
"""
import os
import random
import re

import numpy as np
import torch
from torch import nn

from support.errors import CheckpointError, short_reason
from support.files import atomic_write_files, torch_bytes, write_error

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "arch_of",
    "capture_rng_state",
    "check_finite",
    "check_flags",
    "count_parameters",
    "custom_arch",
    "load_weights",
    "read_checkpoint",
    "read_training_state",
    "restore_rng_state",
    "save_checkpoint",
    "unwrap_model",
]

CHECKPOINT_FORMAT = "pyhessian-dist-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

# What to do when a file is not a usable checkpoint (ends most "cannot read" messages).
_HINT = "pass a complete file written by training.py or the original PyHessian"
# meta fields our format records (None for the original's plain state_dicts).
_META_FIELDS = ("epoch", "test_accuracy", "args", "torch_version")


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


def arch_of(model):
    """The ``arch`` record of our ResNet: name, depth, batch_norm, residual, num_classes."""
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


def save_checkpoint(path, model, problem, *, epoch, test_accuracy, args,
                    training_state=None, best_path=None, on_commit=None):
    """Save a self-describing checkpoint atomically (loadable with weights_only=True).

    The file holds {"format", "format_version", "state_dict" (no ``module.`` prefix),
    "problem" (``Problem.record()``), "epoch", "test_accuracy", "args", "torch_version"} and,
    when given, "training_state" (tensors and plain types only; see ``read_training_state``).
    The built-in image problem's record is also spread into the top-level keys "arch",
    "dataset", "normalization" and "image_size" that older versions wrote.
    With ``best_path``, the same checkpoint without "training_state" goes there too, and both
    files are written in full before either replaces its predecessor (a full disk or a
    file-size limit never leaves the best checkpoint newer than the last one). ``on_commit()``
    runs once they are in place, before a cancel held back meanwhile is delivered.
    Raises CheckpointError when a file cannot be written (the old files are kept).
    """
    model = unwrap_model(model)
    obj = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "problem": _plain(problem),
        "epoch": _plain(epoch),
        "test_accuracy": _plain(test_accuracy),
        "args": _plain(dict(args) if args is not None else {}),
        "torch_version": str(torch.__version__),
    }
    if problem.get("kind") == "images":
        obj.update({k: _plain(problem[k]) for k in ("arch", "dataset", "normalization",
                                                   "image_size")})
    contents = {os.fspath(best_path): torch_bytes(obj)} if best_path else {}
    if training_state is not None:
        _check_safe(training_state)
        obj["training_state"] = training_state
    contents[os.fspath(path)] = torch_bytes(obj)
    try:
        atomic_write_files(contents, on_commit)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {', '.join(contents)} "
                              f"({write_error(exc)}); the earlier files are kept") from None


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
    obj = _read_file(path)
    if not (isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT):
        raise CheckpointError(f"--resume {path} is not a checkpoint written by training.py "
                              "(it has no training state); to continue training, pass the "
                              "last-epoch checkpoint of a training.py run")
    state_dict, meta = _parse_ours(obj, path)
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


# ---- reading ------------------------------------------------------------------------------


def read_checkpoint(path, model_spec=None):
    """``(state_dict, meta)`` of a checkpoint: ours, or a plain state_dict as the original
    PyHessian saves it (``module.`` prefix stripped; a dict wrapping it under "state_dict",
    "model_state_dict" or "model" is accepted too).

    ``meta``: {"problem", "epoch", "test_accuracy", "args", "torch_version", "path", "source"
    ("pyhessian-dist" | "original-state-dict")} and, for the built-in image problem, "arch",
    "dataset", "normalization", "image_size" (copied from the problem record). A plain
    state_dict's problem is the image classifier with the ResNet its keys describe
    (``_infer_arch``), or with ``--model model_spec`` (``num_classes`` = rows of the last 2-D
    ``*weight``), data set unknown (None). Weights with NaN or inf raise CheckpointError naming
    the first such tensor. Always ``torch.load(..., weights_only=True)``: no code runs.
    """
    path = os.fspath(path)
    obj = _read_file(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        state_dict, meta = _parse_ours(obj, path)
    else:
        state_dict, meta = _parse_original(obj, path, model_spec)
    check_finite(state_dict, path)
    if meta["problem"].get("kind") == "images":
        meta.update({k: meta["problem"].get(k) for k in ("arch", "dataset", "normalization")},
                    image_size=meta["problem"].get("image_size") or 32)
    elif meta["problem"].get("kind") == "text":
        meta["arch"] = meta["problem"].get("arch")
    return state_dict, meta


def _read_file(path):
    """The object stored in ``path`` by torch.save, read safely on the CPU; one
    CheckpointError sentence when the file is missing, empty, or not a torch.save file."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder, not a file; pass the checkpoint "
                              f"in it (e.g. {os.path.join(path, 'net.pkl')})")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}; check "
                              "the file's permissions") from None
    if not head:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes); "
                              f"{_HINT}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip, pickle, EOF...: say what the file is
        raise CheckpointError(f"cannot read checkpoint {path}: {_why_unreadable(head, exc)}; "
                              f"{_HINT}") from None


def _why_unreadable(head, exc):
    """What the file is, in one clause: pickled code weights_only refuses, text, or not a
    complete torch.save file (with torch's own reason)."""
    text = str(exc)
    if "Unsupported global" in text:
        m = re.search(r"GLOBAL (\S+)", text)
        return (f"it pickles Python objects{f' ({m.group(1)})' if m else ''} that safe "
                "weights_only loading refuses, e.g. a whole model instead of its state_dict "
                "(save model.state_dict() instead)")
    if b"\0" not in head and sum(32 <= b < 127 or b in b"\t\n\r" for b in head) \
            >= 0.95 * len(head):
        first = head.decode("ascii", "replace").strip().splitlines()[0][:30]
        return f"it is not a file written by torch.save (it starts with text: {first!r})"
    detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
    detail = detail[0].split(". ")[0].rstrip(".") if detail and detail[0] else \
        "the data end too early"
    return f"it is not a complete file written by torch.save ({detail[:100]})"


def _is_state_dict(obj):
    """Whether ``obj`` is a non-empty dict of name -> tensor."""
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _parse_ours(obj, path):
    """(state_dict, meta) of a checkpoint written by ``save_checkpoint`` (older versions
    recorded the image problem in top-level "arch", "dataset", ... keys only)."""
    version = obj.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format_version {version!r}, newer than "
                              f"this code reads ({CHECKPOINT_FORMAT_VERSION}); update "
                              "pyhessian-dist")
    state_dict = obj.get("state_dict")
    problem = obj.get("problem")
    if problem is None and isinstance(obj.get("arch"), dict):
        problem = {"kind": "images", **{k: obj.get(k) for k in ("arch", "dataset",
                                                                "normalization", "image_size")}}
    if not _is_state_dict(state_dict) or not isinstance(problem, dict) or \
            problem.get("kind") not in ("images", "file", "text"):
        raise CheckpointError(f"cannot read checkpoint {path}: its weights or its problem "
                              f"record are missing; {_HINT}")
    meta = {key: obj.get(key) for key in _META_FIELDS}
    meta.update(path=path, source="pyhessian-dist", problem=problem)
    return state_dict, meta


def _parse_original(obj, path, model_spec=None):
    """(state_dict, meta) of a plain state_dict as the original PyHessian saves it."""
    state_dict = obj
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in ("state_dict", "model_state_dict", "model"):
            if _is_state_dict(obj.get(key)):
                state_dict = obj[key]
                break
    if not _is_state_dict(state_dict):
        raise CheckpointError(f"cannot read checkpoint {path}: it holds a "
                              f"{type(obj).__name__}, not a state_dict; {_HINT}")
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if model_spec is not None:
        rows = [v.shape[0] for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 2]
        if not rows:
            raise CheckpointError(f"checkpoint {path} has no 2-D weight (a classifier) from "
                                  f"which to read the number of classes for --model "
                                  f"{model_spec}")
        arch = custom_arch(model_spec, rows[-1])
    else:
        arch = _infer_arch(state_dict, path)
    meta = dict.fromkeys(_META_FIELDS)
    meta.update(path=path, source="original-state-dict", problem={
        "kind": "images", "dataset": None, "arch": arch, "normalization": None,
        "image_size": 32})
    return state_dict, meta


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
            f"ResNet; pass --model MODULE:CALLABLE (or --problem FILE.py) for your own model"
        )
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("layer1.")}
    return {
        "name": "resnet",
        "depth": 6 * len(blocks) + 2,
        "batch_norm": "bn1.weight" in state_dict,
        "residual": any(".downsample." in k for k in state_dict),
        "num_classes": int(state_dict["fc.weight"].shape[0]),
    }


# ---- checking and loading ------------------------------------------------------------------


def _flag_pair(name):
    """("--batch-norm", "--no-batch-norm") for "batch_norm"."""
    return f"--{name.replace('_', '-')}", f"--no-{name.replace('_', '-')}"


def check_flags(arch, path, *, batch_norm=None, residual=None, model_spec=None):
    """Raise CheckpointError when --(no-)batch-norm / --(no-)residual / --model contradict the
    model ``arch`` of checkpoint ``path``: the flags describe the model, they cannot change a
    trained one (None means "not given" and always passes)."""
    custom = arch["name"] == "custom"
    if model_spec is not None and not (custom and arch["spec"] == model_spec):
        if custom:
            raise CheckpointError(f"checkpoint {path} was trained with --model {arch['spec']} "
                                  f"but --model {model_spec} was given; drop --model or pass "
                                  f"--model {arch['spec']}")
        raise CheckpointError(f"checkpoint {path} holds the built-in ResNet{arch['depth']}, "
                              f"not --model {model_spec}; drop --model")
    for name, given in (("batch_norm", batch_norm), ("residual", residual)):
        on, off = _flag_pair(name)
        if given is not None and custom:
            raise CheckpointError(f"checkpoint {path} holds --model {arch['spec']}; {on} / "
                                  f"{off} describe the built-in ResNet only; drop the flag")
        if given is not None and bool(given) != arch[name]:
            given_flag, right_flag = (on, off) if given else (off, on)
            raise CheckpointError(f"checkpoint {path} was trained with {name}={arch[name]} "
                                  f"but {given_flag} was given; drop the flag or pass "
                                  f"{right_flag}")


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


def load_weights(model, state_dict, path, what):
    """``model.load_state_dict(state_dict, strict=True)``; a mismatch (missing or unexpected
    keys, other shapes) is one CheckpointError sentence saying which, naming ``what`` (the
    model's description). The weights keep the model's dtype."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not match {what}: "
                              f"{_mismatch(str(exc))}") from None
    return model


def _mismatch(text):
    """torch's load_state_dict error in one clause: the kinds of mismatch, one example each."""
    parts = []
    for label, pattern in (("missing keys", r'Missing key\(s\) in state_dict: (.*?)\.\s*$'),
                           ("unexpected keys", r'Unexpected key\(s\) in state_dict: (.*?)\.\s*$')):
        m = re.search(pattern, text, re.M)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
    m = re.search(r"size mismatch for (\S+): copying a param with shape torch.Size\(\[(.*?)\]\)"
                  r".*?current model is torch.Size\(\[(.*?)\]\)", text)
    if m:
        parts.append(f"{m.group(1)} has shape ({m.group(2)}), expected ({m.group(3)})")
    return "; ".join(parts) or short_reason(text)

