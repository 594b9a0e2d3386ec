"""Which problem a command line means, and the model it analyses.

* ``--problem FILE.py``: the user's file (``FileProblem``); the flags that describe the
  built-in problem (``--dataset``, ``--model``, ``--depth``, ``--image-size``,
  ``--batch-norm``/``--residual``) do not apply and are refused.
* otherwise the built-in image classifier (``ImageProblem``): in training from the flags, in
  the analysis from the checkpoint (``--dataset``/``--image-size`` may override its data set,
  the architecture flags must agree with it).
* ``--resume CKPT`` of a checkpoint that recorded a problem file rebuilds that file (warning
  when its contents changed since the checkpoint was written).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

from torch import nn

from support.checkpoints import check_flags, load_weights, read_checkpoint
from support.errors import UserError

from .base import ProblemError
from .files import FileProblem
from .images import ImageProblem

__all__ = ["BUILTIN_FLAGS", "analysis_problem", "build_model", "file_problem_of_record",
           "load_checkpoint", "training_problem"]

# dest -> flag of the options that describe the built-in image problem
BUILTIN_FLAGS = {"dataset": "--dataset", "model": "--model", "depth": "--depth",
                 "image_size": "--image-size", "batch_norm": "--batch-norm / --no-batch-norm",
                 "residual": "--residual / --no-residual"}


def _refuse_builtin_flags(args, given, why):
    for dest, flag in BUILTIN_FLAGS.items():
        if dest in given:
            raise UserError(f"{flag} describes the built-in image problem; {why}, so drop it")


def file_problem_of_record(record, path, notes, seed=1):
    """The FileProblem a checkpoint recorded (its absolute path), with a note when the file
    has changed since; UserError when it is gone."""
    if not os.path.isfile(record["path"]):
        raise UserError(f"checkpoint {path} was made with problem file {record['path']}, which "
                        "does not exist here; pass --problem FILE.py to name it")
    problem = FileProblem(record["path"], seed=seed)
    if record.get("sha256") and record["sha256"] != problem.sha256:
        notes.append(f"warning: problem file {record['path']} has changed since checkpoint "
                     f"{path} was written (SHA-256 {record['sha256'][:12]}... then, "
                     f"{problem.sha256[:12]}... now); using it as it is now")
    return problem


def analysis_problem(args, given, download=False):
    """``(problem, state_dict or None, meta, notes)`` for the analysis (see the module
    docstring); ``given`` are the destinations of the flags given on the command line."""
    notes: list[str] = []
    if not args.problem and not args.resume:
        raise UserError("nothing to analyse: pass --resume CKPT (a checkpoint) or --problem "
                        "FILE.py (your own model, data and loss)")
    state_dict, meta = (read_checkpoint(args.resume, args.model) if args.resume
                        else (None, {"problem": None, "path": None}))
    record = meta["problem"]
    if args.problem:
        _refuse_builtin_flags(args, given, f"--problem {args.problem} defines its own model "
                                           "and data")
        problem = FileProblem(args.problem, seed=args.seed)
        if record and record.get("kind") == "file" and record.get("path") != problem.path:
            notes.append(f"note: checkpoint {args.resume} was made with problem file "
                         f"{record['path']}; analysing it with --problem {args.problem}")
    elif record["kind"] == "file":
        _refuse_builtin_flags(args, given, f"checkpoint {args.resume} holds problem file "
                                           f"{record['path']}")
        problem = file_problem_of_record(record, args.resume, notes, args.seed)
    else:
        arch = record["arch"]
        check_flags(arch, args.resume, batch_norm=args.batch_norm, residual=args.residual,
                    model_spec=args.model)
        problem = ImageProblem(args.dataset or record.get("dataset") or "cifar10", arch,
                               data_dir=args.data_dir, normalization=record.get("normalization"),
                               image_size=args.image_size or record.get("image_size") or 32,
                               download=download)
    return problem, state_dict, meta, notes


def build_model(problem, state_dict=None, path=None):
    """``problem.model()`` with the checkpoint's weights when there are any (strict: every
    key and shape must match), in eval mode."""
    model = problem.model()
    if not isinstance(model, nn.Module):
        raise ProblemError(f"{problem.label}: model() returned a {type(model).__name__}, not "
                           "a torch.nn.Module")
    if state_dict is not None:
        load_weights(model, state_dict, path, problem.describe())
    return model.eval()


def load_checkpoint(path, *, batch_norm=None, residual=None, model_spec=None,
                    map_location="cpu"):
    """``(model, meta)``: the model of checkpoint ``path`` (ours, of any problem, or the
    original's ``module.`` state_dict) with its weights, in eval mode, on ``map_location``.
    ``batch_norm``/``residual``/``model_spec`` describe the built-in model as the flags do (they
    must agree with the checkpoint)."""
    args = SimpleNamespace(problem=None, resume=os.fspath(path), model=model_spec,
                           batch_norm=batch_norm, residual=residual, dataset=None,
                           data_dir="data", image_size=None, seed=1)
    given = [k for k in ("model", "batch_norm", "residual") if getattr(args, k) is not None]
    problem, state_dict, meta, _notes = analysis_problem(args, given)
    return build_model(problem, state_dict, args.resume).to(map_location), meta


def training_problem(args, given, download=False):
    """The problem ``training.py`` trains: ``--problem FILE.py`` or the built-in image
    classifier of the flags."""
    if args.problem:
        _refuse_builtin_flags(args, given, f"--problem {args.problem} defines its own model "
                                           "and data")
        return FileProblem(args.problem, seed=args.seed)
    if args.model:
        arch = {"name": "custom", "spec": args.model, "num_classes": None}
    else:
        arch = {"name": "resnet", "depth": args.depth, "batch_norm": args.batch_norm,
                "residual": args.residual, "num_classes": None}
    return ImageProblem(args.dataset, arch, data_dir=args.data_dir, image_size=args.image_size,
                        download=download)
