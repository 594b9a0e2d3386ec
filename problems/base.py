"""What a problem is: a model, its data, its forward pass and its loss (the contract).

A problem answers four questions, the last two optional:

* ``model()`` -> the ``nn.Module`` to analyse or train;
* ``dataset(split)`` -> a map-style data set (``len`` and ``[i]``) for ``"train"`` (un-augmented:
  the Hessian samples come from it) and ``"test"``;
* ``forward(model, batch)`` -> the outputs (default ``model(batch[0])``);
* ``loss(outputs, batch)`` -> the MEAN loss over the batch's samples (default cross-entropy
  against ``batch[1]``).

Batches are what ``torch.utils.data.default_collate`` makes of the samples (tensors, tuples,
dicts); a batch's sample count is the leading size of its tensors. Because the loss is a mean,
weighting every mini-batch by its sample count makes the Hessian over many mini-batches (and
many processes) exactly the Hessian of the mean over all samples.

Optional hooks a real problem may need: ``accuracy(outputs, batch)`` (the fraction of the batch
predicted correctly: training reports it, the landscape draws it), ``collate(samples)`` (how a
list of samples becomes a batch, e.g. padding sequences of different lengths; default torch's
``default_collate``), ``train_dataset()`` (the data training steps use, e.g. augmented;
default ``dataset("train")``) and ``recipe()`` (a dict of training.py defaults such as
``{"lr": 0.01, "weight_decay": 0.0}``).

:class:`Problem` is the base class the built-in problems derive from; a user's file becomes a
:class:`~problems.files.FileProblem`. :func:`check_problem` runs every check that can fail on a
user's problem before any worker starts, each failure one :class:`ProblemError` sentence;
:func:`check_curvatures` whether each curvature asked for (``--curvature``) can be taken of
the problem's loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pyhessian_dist import CURVATURES
from pyhessian_dist.batches import batch_size, default_forward, move_batch
from support.errors import UserError

__all__ = ["Problem", "ProblemError", "check_curvatures", "check_problem"]


class ProblemError(UserError):
    """A problem (built-in or a user's file) cannot be used as it is."""


class Problem:
    """The built-in behaviour of every optional hook; subclasses supply ``model`` and
    ``dataset`` (and a ``label`` saying what they are, for headers and errors)."""

    label = "problem"
    #: what ``loss`` computes, in words, for the printed lines and results.json
    loss_description = "mean cross-entropy"
    #: the data set's name (results.json), and what the Hessian samples are drawn from
    data_name = "dataset"
    hessian_split = "dataset('train')"

    def model(self) -> nn.Module:
        raise NotImplementedError

    def dataset(self, split: str):
        raise NotImplementedError

    def train_dataset(self):
        """The data set training steps draw from (default: the un-augmented train split)."""
        return self.dataset("train")

    def collate(self, samples):
        """A list of samples -> one batch (default: torch's default collate)."""
        return torch.utils.data.default_collate(samples)

    def forward(self, model, batch):
        """The outputs of ``model`` on ``batch`` (default ``model(batch[0])``)."""
        return default_forward(model, batch)

    def loss(self, outputs, batch):
        """The mean loss over the batch (default: cross-entropy of ``outputs`` against
        ``batch[1]``)."""
        return F.cross_entropy(outputs, batch[1])

    def accuracy(self, outputs, batch) -> float | None:
        """Fraction of the batch predicted correctly, or None when the problem has no notion
        of accuracy (default: argmax of (n, C) outputs against integer targets)."""
        targets = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)
                and outputs.dim() == 2 and targets.dim() == 1
                and not targets.is_floating_point() and len(targets) == len(outputs)):
            return None
        return (outputs.argmax(dim=1) == targets).double().mean().item()

    def recipe(self) -> dict:
        """training.py defaults this problem prefers (flags given on the command line win)."""
        return {}

    def loss_text(self, loss: float) -> str:
        """A mean loss as training prints it (the text problem adds bits per byte)."""
        return f"{loss:.4f}"

    def record(self) -> dict:
        """What a checkpoint stores to rebuild this problem."""
        raise NotImplementedError

    def describe(self) -> str:
        """One phrase for the header line."""
        return self.label


def _where(problem) -> str:
    return f"{problem.label}: "


def check_problem(problem: Problem, model: nn.Module, *, splits=("train",),
                  first_batch=None) -> dict:
    """Run the checks a problem can fail before any worker starts; return what they found
    (``num_samples`` per split, ``has_accuracy``, the first batch's ``loss``).

    The model must have trainable parameters; each split a non-empty map-style
    data set; a first mini-batch of train samples (indices ``first_batch``, default the first
    two) must collate into tensors that agree on their leading size, go through ``forward``,
    and give a finite scalar loss that depends on the parameters (at the model's current
    weights). ``ProblemError`` otherwise.
    """
    where = _where(problem)
    if not any(p.requires_grad for p in model.parameters()):
        raise ProblemError(f"{where}the model has no trainable parameters (none, or all with "
                           "requires_grad=False); the Hessian needs at least one")
    data = {split: _check_dataset(problem, split) for split in ("train", *splits)}
    train = data["train"]
    first_batch = list(range(min(2, len(train)))) if first_batch is None else list(first_batch)
    try:
        batch = problem.collate([train[i] for i in first_batch])
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's samples may be anything
        raise ProblemError(f"{where}the samples of dataset('train') cannot be made into a "
                           f"batch ({type(exc).__name__}: {_first(exc)}); return tensors, "
                           "numbers, or tuples/dicts of them (or define collate(samples))"
                           ) from None
    try:
        count = batch_size(batch)
    except ValueError as exc:
        raise ProblemError(f"{where}the tensors of a batch of dataset('train') must agree on "
                           f"their leading size, the batch's sample count ({exc})") from None
    loss, accuracy = _first_loss(problem, model, batch, count)
    return {"num_samples": {s: len(d) for s, d in data.items()},
            "has_accuracy": accuracy is not None, "loss": loss}


def check_curvatures(problem: Problem, model: nn.Module, curvatures, indices) -> None:
    """``ProblemError`` unless every curvature of ``curvatures`` (names of
    ``pyhessian_dist.CURVATURES``) can be taken of the problem's loss, checked by the curvature's
    ``check_loss`` on the batch of train samples ``indices`` (a few of the Hessian samples) at
    the model's current weights: the GGN needs a loss of the outputs alone, the empirical
    Fisher a mean of per-sample losses; the Hessian any mean loss."""
    where = _where(problem)
    train = problem.dataset("train")
    batch = problem.collate([train[i] for i in indices])
    for name in curvatures:
        try:
            CURVATURES[name].check_loss(model, batch, forward=problem.forward,
                                        loss=problem.loss)
        except UserError:
            raise
        except ValueError as exc:
            raise ProblemError(f"{where}--curvature {name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a user's code may raise anything
            raise ProblemError(f"{where}--curvature {name}: checking the loss on a first batch "
                               f"of {len(indices)} samples failed: {type(exc).__name__}: "
                               f"{_first(exc)}") from None


def _check_dataset(problem, split):
    where = _where(problem)
    try:
        data = problem.dataset(split)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's code may raise anything
        raise ProblemError(f"{where}dataset({split!r}) failed: {type(exc).__name__}: "
                           f"{_first(exc)}") from None
    if data is None or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise ProblemError(f"{where}dataset({split!r}) returned a {type(data).__name__}, not a "
                           "map-style data set (one with len() and [i], e.g. a "
                           "torch.utils.data.TensorDataset)")
    if len(data) == 0:
        raise ProblemError(f"{where}dataset({split!r}) is empty; it needs at least one sample")
    return data


def _first_loss(problem, model, batch, count):
    """(loss, accuracy or None) of the first batch, with the checks on both."""
    where = _where(problem)
    device = next(model.parameters()).device
    batch = move_batch(batch, device)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            try:
                outputs = problem.forward(model, batch)
                loss = problem.loss(outputs, batch)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - a user's code may raise anything
                raise ProblemError(f"{where}the loss of a first batch of {count} samples "
                                   f"failed: {type(exc).__name__}: {_first(exc)}") from None
            value = _check_loss(where, loss, model)
            accuracy = _check_accuracy(where, problem, outputs, batch)
    finally:
        model.train(was_training)
    return value, accuracy


def _check_loss(where, loss, model) -> float:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                else f"a {type(loss).__name__}")
        raise ProblemError(f"{where}loss() returned {what}, not a scalar tensor: return the "
                           "MEAN loss over the batch (e.g. .mean())")
    value = float(loss.detach().reshape(()))
    if not math.isfinite(value):
        raise ProblemError(f"{where}the loss of a first batch is {value} at these weights; "
                           "check the weights, the data and the loss")
    if not loss.requires_grad:
        raise ProblemError(f"{where}the loss does not depend on the model's trainable "
                           "parameters (no gradient flows back); compute it from the outputs "
                           "of forward(model, batch)")
    return value


def _check_accuracy(where, problem, outputs, batch):
    try:
        with torch.no_grad():
            accuracy = problem.accuracy(outputs, batch)
    except Exception as exc:  # noqa: BLE001 - a user's code may raise anything
        raise ProblemError(f"{where}accuracy() failed: {type(exc).__name__}: "
                           f"{_first(exc)}") from None
    if accuracy is None:
        return None
    try:
        accuracy = float(accuracy)
    except (TypeError, ValueError):
        raise ProblemError(f"{where}accuracy() returned a {type(accuracy).__name__}, not a "
                           "number in [0, 1]") from None
    if not 0.0 <= accuracy <= 1.0:
        raise ProblemError(f"{where}accuracy() returned {accuracy}, not a fraction in [0, 1]")
    return accuracy


def _first(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "(no message)"
