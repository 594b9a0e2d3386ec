"""Your own problem in one small Python file (``--problem FILE.py``).

The file defines ``model()`` and ``dataset(split)``, and optionally ``forward(model, batch)``,
``loss(outputs, batch)``, ``accuracy(outputs, batch)``, ``collate(samples)``,
``train_dataset()`` and ``recipe()``
(see ``problems/base.py`` for what each means). It is imported like a script: its folder is
put on ``sys.path`` so it can import its neighbours. Checkpoints record its absolute path and
the SHA-256 of its bytes, so a later ``--resume`` rebuilds it and says when it has changed.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import random
import sys

import numpy as np
import torch

from .base import Problem, ProblemError

__all__ = ["FileProblem", "file_sha256"]

REQUIRED = ("model", "dataset")
OPTIONAL = ("forward", "loss", "accuracy", "collate", "train_dataset", "recipe")


def file_sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


class FileProblem(Problem):
    """A problem defined by the functions of a Python file. Pickles as its path (spawned
    workers import the file themselves); the module is imported on first use."""

    def __init__(self, path: str, display: str | None = None, seed: int = 1):
        self.seed = int(seed)  # model() and dataset() run with every RNG seeded from it
        self.display = display or _short(os.fspath(path))
        self.path = os.path.abspath(os.fspath(path))
        if os.path.isdir(self.path):
            raise ProblemError(f"--problem {self.display} is a folder; pass a Python file that "
                               "defines model() and dataset(split)")
        if not os.path.isfile(self.path):
            raise ProblemError(f"problem file {self.display} not found")
        try:
            self.sha256 = file_sha256(self.path)
        except OSError as exc:
            raise ProblemError(f"cannot read problem file {self.display}: "
                               f"{exc.strerror or exc}") from None
        self.label = f"problem {self.display}"
        self._module = None
        self._data: dict = {}

    def __getstate__(self):
        return {"display": self.display, "path": self.path, "sha256": self.sha256,
                "seed": self.seed}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.label = f"problem {self.display}"
        self._module, self._data = None, {}

    # ------------------------------------------------------------------ the file
    @property
    def module(self):
        if self._module is None:
            self._module = self._import()
        return self._module

    def _import(self):
        name = f"_problem_{_identifier(os.path.splitext(os.path.basename(self.path))[0])}_" \
               f"{self.sha256[:8]}"
        if name in sys.modules:
            return sys.modules[name]
        folder = os.path.dirname(self.path)
        if folder not in sys.path:
            sys.path.insert(0, folder)  # like a script: it may import its neighbours
        loader = importlib.machinery.SourceFileLoader(name, self.path)
        spec = importlib.util.spec_from_loader(name, loader)
        module = importlib.util.module_from_spec(spec)
        module.__file__ = self.path
        sys.modules[name] = module  # pickling classes defined in the file needs this
        try:
            loader.exec_module(module)
        except SyntaxError as exc:
            del sys.modules[name]
            raise ProblemError(f"{self.label}: syntax error on line {exc.lineno}: "
                               f"{exc.msg}") from None
        except Exception as exc:  # noqa: BLE001 - a user's file may raise anything
            del sys.modules[name]
            raise ProblemError(f"{self.label}: importing it failed: {type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                               ) from None
        missing = [f for f in REQUIRED if not callable(getattr(module, f, None))]
        if missing:
            names = " and no ".join(f + "()" for f in missing)
            raise ProblemError(f"{self.label} defines no {names}; a problem file needs model() "
                               "returning an nn.Module and dataset(split) returning the "
                               "'train' or 'test' data set")
        odd = [f for f in OPTIONAL if hasattr(module, f) and not callable(getattr(module, f))]
        if odd:
            raise ProblemError(f"{self.label}: {odd[0]} must be a function "
                               f"({odd[0]}(...)), not a {type(getattr(module, odd[0])).__name__}")
        return module

    def _call(self, name, *args):
        """The file's function ``name`` called with torch's, NumPy's and Python's global RNGs
        seeded from ``seed`` (restored afterwards), so that a model initialised or a data
        set generated at random is the same in every process and every run."""
        try:
            with _seeded(self.seed):
                return getattr(self.module, name)(*args)
        except ProblemError:
            raise
        except Exception as exc:  # noqa: BLE001 - a user's code may raise anything
            text = str(exc).strip()
            raise ProblemError(f"{self.label}: {name}() failed: {type(exc).__name__}: "
                               f"{text.splitlines()[0][:200] if text else '(no message)'}"
                               ) from None

    # ------------------------------------------------------------------ the contract
    def model(self):
        return self._call("model")

    def dataset(self, split):
        if split not in self._data:
            self._data[split] = self._call("dataset", split)
        return self._data[split]

    def train_dataset(self):
        if hasattr(self.module, "train_dataset"):
            return self._call("train_dataset")
        return self.dataset("train")

    def collate(self, samples):
        if hasattr(self.module, "collate"):
            return self.module.collate(samples)
        return super().collate(samples)

    def forward(self, model, batch):
        if hasattr(self.module, "forward"):
            return self.module.forward(model, batch)
        return super().forward(model, batch)

    def loss(self, outputs, batch):
        if not hasattr(self.module, "loss"):
            return super().loss(outputs, batch)
        value = self.module.loss(outputs, batch)
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() == 1:
            return value.reshape(())  # a (1,)-shaped mean is a scalar too
        return value

    def accuracy(self, outputs, batch):
        if hasattr(self.module, "accuracy"):
            value = self.module.accuracy(outputs, batch)
            return None if value is None else float(value)
        if hasattr(self.module, "loss"):
            return None  # a loss of its own: argmax accuracy may mean nothing
        return super().accuracy(outputs, batch)

    def recipe(self):
        if not hasattr(self.module, "recipe"):
            return {}
        recipe = self._call("recipe")
        if not isinstance(recipe, dict):
            raise ProblemError(f"{self.label}: recipe() returned a {type(recipe).__name__}, "
                               "not a dict of training.py defaults such as {'lr': 0.01}")
        return recipe

    @property
    def data_name(self):
        return os.path.basename(self.path)

    @property
    def loss_description(self):
        if hasattr(self.module, "loss"):
            return f"mean loss of loss() in {os.path.basename(self.path)}"
        return "mean cross-entropy"

    def record(self):
        return {"kind": "file", "path": self.path, "sha256": self.sha256}

    def describe(self):
        return self.label


@contextlib.contextmanager
def _seeded(seed):
    states = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def _short(path: str) -> str:
    """``path`` relative to the current folder when it lies below it, else as given."""
    rel = os.path.relpath(os.path.abspath(path))
    return rel if not rel.startswith("..") else path


def _identifier(text: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in text)
    return out or "file"
