"""Your own model: ``--model module.path:callable`` turned into an ``nn.Module``.

``model_from_spec(spec, num_classes)`` imports ``module.path`` (from PYTHONPATH or the current
folder), looks up ``callable`` in it (dots allowed: ``pkg.mod:Class.build``), and calls it with
``num_classes=<num_classes>`` when its signature accepts that keyword (a parameter of that name
or ``**kwargs``), else with no arguments. The result must be an ``nn.Module``. Every way this
can go wrong (a malformed spec, a missing module or attribute, a call that fails or returns
something else) is one ``ModelSpecError`` sentence.

Checkpoints record such a model as ``{"name": "custom", "spec": spec, "num_classes": N}`` and
``support.checkpoints.load_checkpoint`` rebuilds it from there.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys

from torch import nn

from support.errors import UserError

__all__ = ["ModelSpecError", "accepts_num_classes", "has_batch_norm", "model_from_spec",
           "parse_model_spec", "resolve_model_spec"]

_EXAMPLE = "e.g. torchvision.models:resnet18"


class ModelSpecError(UserError):
    """--model names something that cannot be imported, called or used as a model."""


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``"pkg.mod:attr.path"`` -> ``("pkg.mod", "attr.path")``; ModelSpecError when malformed."""
    module, sep, attr = str(spec).partition(":")
    parts = module.split(".") + attr.split(".")
    if not sep or not all(p.isidentifier() for p in parts):
        raise ModelSpecError(f"--model {spec!r} must be module.path:callable ({_EXAMPLE})")
    return module, attr


def _import(module: str, spec: str):
    if os.getcwd() not in sys.path:  # `python /path/training.py --model mymodels:net` from here
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise ModelSpecError(f"--model {spec}: no module named {exc.name!r}; check the "
                                 "name, and that its folder is the current one or on "
                                 "PYTHONPATH") from None
        raise ModelSpecError(f"--model {spec}: importing {module} failed because it needs "
                             f"the missing module {exc.name!r}; install it") from None
    except Exception as exc:  # noqa: BLE001 - a user's module may raise anything on import
        raise ModelSpecError(f"--model {spec}: importing {module} failed: "
                             f"{type(exc).__name__}: {_first_line(exc)}") from None


def resolve_model_spec(spec: str):
    """The callable that ``spec`` names (imported, looked up; not called)."""
    module_name, attr = parse_model_spec(spec)
    obj = _import(module_name, spec)
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = module_name if i == 0 else f"{module_name}:{'.'.join(attr.split('.')[:i])}"
            raise ModelSpecError(f"--model {spec}: {where} has no attribute {part!r}; check "
                                 f"the name after the colon ({_EXAMPLE})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"--model {spec} is a {type(obj).__name__}, not a callable that "
                             "returns a model")
    return obj


def accepts_num_classes(fn) -> bool:
    """Whether ``fn(num_classes=...)`` is a valid call by its signature (a parameter of that
    name, or ``**kwargs``); False when the signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == "num_classes" and p.kind in (
        p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) for p in params)


def model_from_spec(spec: str, num_classes: int | None = None) -> nn.Module:
    """A fresh model from ``--model`` ``spec`` (see the module docstring); ``num_classes`` is
    passed when not None and the callable accepts it."""
    fn = resolve_model_spec(spec)
    kwargs = {"num_classes": int(num_classes)} if (
        num_classes is not None and accepts_num_classes(fn)) else {}
    call = f"{spec}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    try:
        model = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        raise ModelSpecError(f"--model: calling {call} failed: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"--model: {call} returned a {type(model).__name__}, not a "
                             "torch.nn.Module; point --model at a function or class that "
                             "builds the model")
    return model


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` contains a BatchNorm layer (decides the training recipe's defaults)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "(no message)"
