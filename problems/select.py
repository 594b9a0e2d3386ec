"""Which problem a command line means, and the model it analyses.

* ``--problem FILE.py``: the user's file (``FileProblem``); the flags that describe the
  built-in problem (``--dataset``, ``--model``, ``--depth``, ``--image-size``,
  ``--batch-norm``/``--residual``) do not apply and are refused.
* otherwise the built-in image classifier (``ImageProblem``): in training from the flags, in
  the analysis from the checkpoint (``--dataset``/``--image-size`` may override its data set,
  the architecture flags must agree with it).
* ``--model gpt`` / ``--dataset text``: the built-in language model (``TextProblem``): a GPT
  of ``--n-layer --n-head --n-embd --block-size`` on the bytes of ``--data-dir FILE``; in the
  analysis from the checkpoint, whose record names the text file (its path and SHA-256), so
  ``--resume CKPT`` alone reads it where it was and ``--data-dir FILE`` points elsewhere.
* ``--resume CKPT`` of a checkpoint that recorded a problem file rebuilds that file (warning
  when its contents changed since the checkpoint was written).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

from torch import nn

from support.checkpoints import check_flags, load_weights, read_checkpoint
from support.datasets import DATASETS
from support.errors import UserError

from .base import ProblemError
from .files import FileProblem
from .images import ImageProblem
from .text import TextProblem, gpt_arch

__all__ = ["BUILTIN_FLAGS", "DATASET_CHOICES", "GPT_MODEL", "analysis_problem", "build_model",
           "file_problem_of_record", "load_checkpoint", "training_problem"]

#: --model's reserved name of the built-in language model, and --dataset's choices
GPT_MODEL = "gpt"
DATASET_CHOICES = (*DATASETS, "text")
# dest -> flag of the options that describe the built-in problems (images, text)
RESNET_FLAGS = {"depth": "--depth", "image_size": "--image-size",
                "batch_norm": "--batch-norm / --no-batch-norm",
                "residual": "--residual / --no-residual"}
GPT_FLAGS = {"n_layer": "--n-layer", "n_head": "--n-head", "n_embd": "--n-embd",
             "block_size": "--block-size"}
BUILTIN_FLAGS = {"dataset": "--dataset", "model": "--model", **RESNET_FLAGS, **GPT_FLAGS}


def _refuse_builtin_flags(args, given, why):
    for dest, flag in BUILTIN_FLAGS.items():
        if dest in given:
            what = "the built-in GPT" if dest in GPT_FLAGS else "the built-in image problem"
            raise UserError(f"{flag} describes {what}; {why}, so drop it")


def _refuse(given, flags, why):
    for dest, flag in flags.items():
        if dest in given:
            raise UserError(f"{flag} {why}; drop it")


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


def analysis_problem(args, given, download=False, need_data=True):
    """``(problem, state_dict or None, meta, notes)`` for the analysis (see the module
    docstring); ``given`` are the destinations of the flags given on the command line;
    ``need_data`` False builds the problem of a text checkpoint whose file is gone (for its
    model)."""
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
    elif record["kind"] == "text":
        problem = _text_analysis_problem(args, given, record, notes, need_data)
    else:
        arch = record["arch"]
        what = f"describes the GPT, but checkpoint {args.resume} holds an image classifier"
        _refuse(given, GPT_FLAGS, what)
        if args.dataset == "text" or args.model == GPT_MODEL:
            flag = "--dataset text" if args.dataset == "text" else f"--model {GPT_MODEL}"
            raise UserError(f"{flag} means the GPT language model, but checkpoint "
                            f"{args.resume} holds an image classifier; drop {flag}")
        check_flags(arch, args.resume, batch_norm=args.batch_norm, residual=args.residual,
                    model_spec=args.model)
        problem = ImageProblem(args.dataset or record.get("dataset") or "cifar10", arch,
                               data_dir=args.data_dir or "data",
                               normalization=record.get("normalization"),
                               image_size=args.image_size or record.get("image_size") or 32,
                               download=download)
    return problem, state_dict, meta, notes


def _text_analysis_problem(args, given, record, notes, need_data=True):
    """The TextProblem of a checkpoint: its GPT, its block size (``--block-size`` may be
    smaller, up to the model's context) and its text file (``--data-dir`` may name another;
    a note when the bytes differ from those it was trained on)."""
    path = args.resume
    _refuse(given, RESNET_FLAGS, f"describes the built-in ResNet, but checkpoint {path} holds "
                                 "a GPT")
    if args.dataset not in (None, "text"):
        raise UserError(f"checkpoint {path} holds a GPT language model, which reads text; "
                        f"--dataset {args.dataset} is an image data set: drop --dataset")
    if args.model not in (None, GPT_MODEL):
        raise UserError(f"checkpoint {path} holds the built-in GPT, not --model {args.model}; "
                        "drop --model")
    text = args.data_dir or record["path"]
    if args.data_dir is None and need_data and not os.path.isfile(text):
        raise UserError(f"checkpoint {path} was trained on text file {record['path']}, which "
                        "does not exist here; pass --data-dir FILE (the same text, or another)")
    problem = TextProblem(text, record["arch"], args.block_size or record["block_size"])
    if need_data and record.get("sha256") and problem.sha256 != record["sha256"]:
        notes.append(f"note: {text} is not the text checkpoint {path} was trained on (SHA-256 "
                     f"{record['sha256'][:12]}... then, {problem.sha256[:12]}... now); "
                     "analysing the model on it")
    return problem


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
                           data_dir=None, image_size=None, block_size=None, seed=1)
    given = [k for k in ("model", "batch_norm", "residual") if getattr(args, k) is not None]
    problem, state_dict, meta, _notes = analysis_problem(args, given, need_data=False)
    return build_model(problem, state_dict, args.resume).to(map_location), meta


def training_problem(args, given, download=False):
    """The problem ``training.py`` trains: ``--problem FILE.py`` or the built-in image
    classifier of the flags."""
    if args.problem:
        _refuse_builtin_flags(args, given, f"--problem {args.problem} defines its own model "
                                           "and data")
        return FileProblem(args.problem, seed=args.seed)
    if args.model == GPT_MODEL or args.dataset == "text":
        return _text_training_problem(args, given)
    _refuse(given, GPT_FLAGS, f"describes the GPT (--model {GPT_MODEL} --dataset text)")
    if args.model:
        arch = {"name": "custom", "spec": args.model, "num_classes": None}
    else:
        arch = {"name": "resnet", "depth": args.depth, "batch_norm": args.batch_norm,
                "residual": args.residual, "num_classes": None}
    return ImageProblem(args.dataset, arch, data_dir=args.data_dir, image_size=args.image_size,
                        download=download)


def _text_training_problem(args, given):
    """The GPT of the flags on ``--data-dir FILE`` (its context = ``--block-size``)."""
    if args.dataset != "text":
        raise UserError(f"--model {GPT_MODEL} is a language model: train it on --dataset text "
                        f"--data-dir FILE (a UTF-8 text file), not on the image data set "
                        f"{args.dataset}")
    if args.model not in (None, GPT_MODEL):
        raise UserError(f"--dataset text trains the built-in GPT; drop --model {args.model} "
                        f"(or pass --model {GPT_MODEL})")
    _refuse(given, RESNET_FLAGS, "describes the built-in ResNet, not the GPT")
    arch = gpt_arch(args.n_layer, args.n_head, args.n_embd, args.block_size)
    if arch["n_embd"] % arch["n_head"]:
        raise UserError(f"--n-embd {arch['n_embd']} must be a multiple of --n-head "
                        f"{arch['n_head']} (each head gets n_embd / n_head dimensions)")
    return TextProblem(args.data_dir, arch)
