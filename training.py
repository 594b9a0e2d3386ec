"""Train a CIFAR ResNet, a small GPT (or your own problem) and save self-describing checkpoints.

    python training.py --dataset synthetic --epochs 3 --no-cuda
    python training.py --model gpt --dataset text --data-dir data/generated.txt --no-cuda
    python training.py --problem my_problem.py --epochs 20           # your model, data, loss
    python training.py --device_count 4                              # 4 DDP workers
    torchrun --nproc_per_node 4 training.py --dataset cifar10        # the same under torchrun
    python training.py --resume checkpoints/net.pkl --epochs 200     # continue a run
    python training.py --hessian-every 10 --hessian-trace            # curvature while training

Read top to bottom: parse -> validate once (every user error is one `error:` line and exit 2,
before training starts) -> launch (support.launch: this process, --device_count N spawned DDP
workers, or one rank of a torchrun job) -> on every rank: the problem's data and model, the
optimiser and its learning-rate schedule (restored with --resume), then per epoch: train,
evaluate, rank 0 saves, optionally measure the curvature. What is trained is a problem
(problems/): the built-in image classifier of the flags, or your own file (--problem).

The image recipe is the original PyHessian's (SGD momentum 0.9, lr 0.1, x0.1 after epochs 80
and 120, weight decay 5e-4, batch 128). Without BatchNorm it adds a linear learning-rate warm-up
and gradient-norm clipping by default (the original diverges there). The GPT's recipe (its
problem's recipe()) is AdamW with a linear warm-up, then a cosine decay (--optimizer adamw
--lr-schedule cosine). Files in --saving-folder, named after --checkpoint-name (net.pkl):

    net.pkl                    the last epoch, with the training state (--resume continues it)
    net.best.pkl               the epoch with the best test accuracy so far
    net.curvature.json / .png  with --hessian-every: lambda_1 (and trace) against 2/lr
"""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting make products 10-30x slower on a machine whose cores
# are shared with other processes (measured: bench/ "threads"); sleeping costs nothing on a
# quiet one. Set before torch is imported; an OMP_WAIT_POLICY already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if __name__ == "__main__":  # a cancel while importing: one line, not a traceback
    from support.cancel import exit_on_cancel_while_starting

    exit_on_cancel_while_starting()

import argparse
import bisect
import hashlib
import math
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from models.gpt import GPT_DEFAULTS
from problems import (
    DATASET_CHOICES,
    GPT_MODEL,
    ImageProblem,
    check_curvatures,
    check_problem,
    file_problem_of_record,
    training_problem,
)
from pyhessian_dist import batch_size
from pyhessian_dist.batches import move_batch
from pyhessian_dist.distributed import all_reduce_, launched_by_torchrun, print0
from support.cancel import ignore_cancels_from_now
from support.checkpoints import (
    capture_rng_state,
    count_parameters,
    read_training_state,
    restore_rng_state,
    save_checkpoint,
)
from support.cli import (
    ArgumentParser,
    HelpFormatter,
    add_bool_flag,
    curvature_list,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    resnet_depth,
    seed,
)
from support.curvature import CurvatureTracker, check_line, curvature_paths, load_curvature
from support.datasets import hessian_subset
from support.errors import CheckpointError, UserError
from support.files import make_writable_folder, removed_if_left_empty, write_error
from support.launch import agree, check_cpu_workers, launch, run_main
from support.models import has_batch_norm, resolve_model_spec

MOMENTUM = 0.9
# Without BatchNorm (measured on ResNet20, see the README): warm up over 2 epochs, clip at 1.
NO_BN_WARMUP_EPOCHS = 2.0
NO_BN_CLIP_GRAD_NORM = 1.0
# --resume keeps these as the checkpoint's run had them (given ones must agree)...
RECIPE_FLAGS = ("batch_size", "lr", "lr_decay", "lr_decay_epoch", "seed", "weight_decay",
                "batch_norm", "residual", "depth", "dataset", "model", "image_size",
                "warmup_epochs", "clip_grad_norm", "problem", "optimizer", "betas",
                "lr_schedule", "min_lr_factor", "cosine_epochs", "n_layer", "n_head", "n_embd",
                "block_size")
# What an optimizer / schedule flag not given and not set by a recipe means.
DEFAULT_BETAS = [0.9, 0.95]
DEFAULT_MIN_LR_FACTOR = 0.1
# ...and takes every other flag not given from it too, except these (this machine, this call).
LOCAL_FLAGS = ("cuda", "device_count", "ip", "port", "backend", "num_workers", "resume",
               "overwrite", "saving_folder", "checkpoint_name", "given")


# ---------------------------------------------------------------------------- command line
def build_parser():
    p = ArgumentParser(description="Train a CIFAR ResNet (depth 6n+2), a small GPT on a text "
                       "file, your own model or your own problem, and save checkpoints for "
                       "example_pyhessian_analysis.py.",
                       formatter_class=HelpFormatter)
    # the original's flags and defaults
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="global training batch size; with N processes each uses "
                        "batch-size // WORLD_SIZE")
    p.add_argument("--test-batch-size", type=positive_int, default=256,
                   help="batch size for evaluating the test set")
    p.add_argument("--epochs", type=positive_int, default=180,
                   help="train until this epoch (with --resume: a larger number trains on)")
    p.add_argument("--lr", type=positive_float, default=0.1,
                   help="initial learning rate (the GPT's recipe: 0.003)")
    p.add_argument("--lr-decay", type=positive_float, default=0.1,
                   help="factor the learning rate is multiplied by at each --lr-decay-epoch")
    p.add_argument("--lr-decay-epoch", type=positive_int, nargs="+", default=[80, 120],
                   help="epochs after which the learning rate decays")
    p.add_argument("--seed", type=seed, default=1,
                   help="random seed (initialisation, shuffling, augmentation, Hessian subset)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=5e-4,
                   help="weight decay (SGD: L2 on every parameter; AdamW: decoupled, on the "
                        "weight matrices and embeddings only; the GPT's recipe: 0.1)")
    add_bool_flag(p, "batch-norm", True, "use batch normalisation")
    add_bool_flag(p, "residual", True, "use residual (skip) connections")
    add_bool_flag(p, "cuda", True, "train on GPUs (falls back to the CPU with a warning)")
    p.add_argument("--saving-folder", default="checkpoints/",
                   help="folder the checkpoints go to (with --resume: the resumed one's)")
    _add_our_flags(p)
    _add_optimizer_flags(p)
    _add_gpt_flags(p)
    _add_curvature_flags(p)
    return p


def _add_optimizer_flags(p):
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="sgd (momentum 0.9) or adamw (default: the problem's recipe; sgd for "
                        "images, adamw for the GPT)")
    p.add_argument("--betas", type=positive_float, nargs=2, default=None, metavar=("B1", "B2"),
                   help="AdamW's betas (default: 0.9 0.95)")
    p.add_argument("--lr-schedule", choices=("multistep", "cosine"), default=None,
                   help="multistep: x --lr-decay after each --lr-decay-epoch; cosine: from --lr "
                        "down to --lr x --min-lr-factor over --cosine-epochs, after the warm-up "
                        "(default: the problem's recipe; multistep for images, cosine for the "
                        "GPT)")
    p.add_argument("--min-lr-factor", type=nonnegative_float, default=None,
                   help="cosine: the learning rate's last value as a fraction of --lr "
                        f"(default: {DEFAULT_MIN_LR_FACTOR:g})")
    p.add_argument("--cosine-epochs", type=positive_float, default=None,
                   help="cosine: epochs until the learning rate reaches its minimum, where it "
                        "stays (default: --epochs of the first run; a resumed run keeps it)")


def _add_gpt_flags(p):
    defaults = GPT_DEFAULTS
    p.add_argument("--n-layer", type=positive_int, default=None,
                   help=f"GPT: transformer blocks (default: {defaults['n_layer']})")
    p.add_argument("--n-head", type=positive_int, default=None,
                   help=f"GPT: attention heads (default: {defaults['n_head']})")
    p.add_argument("--n-embd", type=positive_int, default=None,
                   help=f"GPT: embedding width, a multiple of --n-head (default: "
                        f"{defaults['n_embd']})")
    p.add_argument("--block-size", type=positive_int, default=None,
                   help=f"GPT: tokens (bytes) per sample, also the model's context (default: "
                        f"{defaults['block_size']})")


def _add_our_flags(p):
    p.add_argument("--checkpoint-name", default="net.pkl",
                   help="file name of the last-epoch checkpoint in --saving-folder (rewritten "
                        "every epoch); the best one is NAME.best.pkl")
    p.add_argument("--depth", type=resnet_depth, default=20,
                   help="ResNet depth, 6n+2 (20, 32, 44, 56, 110, ...)")
    p.add_argument("--model", default=None, metavar="MODULE:CALLABLE",
                   help="your own model instead of the ResNet, e.g. torchvision.models:resnet18"
                        " (called with num_classes=<classes> when it accepts it); "
                        f"'{GPT_MODEL}': the built-in GPT language model (with --dataset text)")
    p.add_argument("--problem", default=None, metavar="FILE.py",
                   help="your own problem instead of the built-in image classifier: a file "
                        "defining model() and dataset(split), optionally forward(model, "
                        "batch), loss(outputs, batch), accuracy(outputs, batch), "
                        "train_dataset() and recipe() (README, 'Your own problem')")
    p.add_argument("--dataset", choices=DATASET_CHOICES, default="cifar10",
                   help="data set: cifar10/cifar100 (torchvision, in --data-dir), imagefolder "
                        "(--data-dir/train/<class>/*, --data-dir/test/<class>/*), synthetic "
                        "(generated, offline), text (the bytes of the UTF-8 file --data-dir, "
                        "for --model gpt)")
    p.add_argument("--data-dir", default="data",
                   help="folder holding the data set; --dataset text: the text file")
    p.add_argument("--image-size", type=positive_int, default=32,
                   help="imagefolder: resize images to N x N (needs --model when not 32)")
    p.add_argument("--num-workers", type=nonnegative_int, default=2,
                   help="data-loading worker processes per training process (0: in process)")
    p.add_argument("--warmup-epochs", type=nonnegative_float, default=None,
                   help="linear learning-rate warm-up over this many epochs, per step "
                        f"(default: 0 with BatchNorm, {NO_BN_WARMUP_EPOCHS:g} without)")
    p.add_argument("--clip-grad-norm", type=nonnegative_float, default=None,
                   help="clip the gradient's global norm to this value, 0 = off (default: "
                        f"off with BatchNorm, {NO_BN_CLIP_GRAD_NORM:g} without)")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue the run whose last-epoch checkpoint this is (model, "
                        "optimizer, epoch, random states); flags not given take its values")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier run in --saving-folder")
    p.add_argument("--device_count", type=positive_int, default=1,
                   help="processes, each one DDP replica: GPUs with --cuda, else CPU workers "
                        "(1: this process)")
    p.add_argument("--ip", default="127.0.0.1", help="address of rank 0 for spawned workers")
    p.add_argument("--port", type=int, default=29500,
                   help="TCP port of rank 0 for spawned workers; 0 picks a free one")
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="process-group backend (auto: nccl on CUDA, gloo on CPU)")


def _add_curvature_flags(p):
    p.add_argument("--hessian-every", type=nonnegative_int, default=0, metavar="N",
                   help="every N epochs (and after the last) measure lambda_1 of the loss "
                        "Hessian on a fixed train subset; 0 = off")
    p.add_argument("--hessian-trace", action="store_true",
                   help="with --hessian-every: also estimate the trace (5%% standard error)")
    p.add_argument("--hessian-samples", type=positive_int, default=500,
                   help="training samples in the fixed Hessian subset (chosen by --seed)")
    p.add_argument("--hessian-mini-batch", type=positive_int, default=100,
                   help="samples per Hessian mini-batch")
    p.add_argument("--curvature", type=curvature_list, default=["hessian"],
                   metavar="NAME[,NAME...]",
                   help="with --hessian-every: what each check measures: hessian, ggn "
                        "(generalized Gauss-Newton), ef (empirical Fisher), or several, "
                        "comma-separated")


def given_flags(parser, argv):
    """The destinations of the flags given on the command line (not defaulted)."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    parser.parse_args(argv, namespace=ns)
    return sorted(k for k, v in vars(ns).items() if v is not unset)


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = given_flags(parser, argv)
    if not args.checkpoint_name or os.path.basename(args.checkpoint_name) != args.checkpoint_name:
        parser.error(f"argument --checkpoint-name: must be a plain file name, got "
                     f"{args.checkpoint_name!r}")
    if not 0 <= args.port <= 65535:
        parser.error(f"argument --port: must be between 0 and 65535, got {args.port}")
    return args


# ---------------------------------------------------------------------------- validate once
@dataclass
class Plan:
    nprocs: int
    cuda: bool
    paths: dict                      # last, best, curvature_json, curvature_png
    problem: object = None           # problems.Problem: what is trained
    replace: list = field(default_factory=list)   # an earlier run's files (--overwrite)
    previous_curvature: str | None = None         # curvature file a resumed run continues


def validate(args) -> Plan:
    """Everything checkable before training; raises UserError (one line, exit 2)."""
    notes = resume_defaults(args) if args.resume else []
    check_combinations(args)
    last = os.path.join(args.saving_folder, args.checkpoint_name)
    stem, ext = os.path.splitext(last)
    paths = dict(zip(("last", "best", "curvature_json", "curvature_png"),
                     (last, f"{stem}.best{ext}",
                      *curvature_paths(args.saving_folder, args.checkpoint_name))))
    rank0 = not launched_by_torchrun() or os.environ.get("RANK") == "0"
    plan = Plan(*processes(args), paths=paths,
                problem=training_problem(args, args.given, download=rank0))
    for line in notes:
        print(line, file=sys.stderr)
    if not args.resume:
        apply_recipe(args, plan.problem.recipe())
    resolve_optimizer(args)
    if args.resume:
        plan.previous_curvature = curvature_paths(os.path.dirname(args.resume) or ".",
                                                  os.path.basename(args.resume))[0]
    if not rank0:
        return plan  # rank 0 checks the data and the folder (and may download)
    model = make_model(plan.problem)
    check_problem(plan.problem, model, splits=("train", "test"))
    if args.hessian_every:
        indices = hessian_subset(plan.problem.dataset("train"), args.hessian_samples,
                                 args.seed, flag="--hessian-samples")
        check_curvatures(plan.problem, model, args.curvature, indices[:4])
    plan.replace = check_saving_folder(args, paths)
    return plan


def resume_defaults(args) -> list[str]:
    """--resume: flags not given take the checkpoint run's values; recipe flags given must
    agree; --epochs must go past the checkpoint's epoch. Returns notes to print (a problem
    file that changed since)."""
    _weights, state, meta = read_training_state(args.resume)
    recorded = meta.get("args") or {}
    notes = []
    if meta["problem"].get("kind") == "file":
        recorded = {**recorded, "problem": meta["problem"]["path"]}
        file_problem_of_record(meta["problem"], args.resume, notes)
    if meta["problem"].get("kind") == "text":
        notes += text_changed(meta["problem"], args.resume)
    for key, value in recorded.items():
        if not hasattr(args, key) or key in LOCAL_FLAGS:
            continue
        flag = "--" + key.replace("_", "-")
        if key in args.given and key in RECIPE_FLAGS and not _same(key, getattr(args, key),
                                                                   value):
            raise UserError(f"--resume {args.resume}: that run was trained with {flag} "
                            f"{_show(value)}, and a resumed run keeps its recipe; drop {flag} "
                            f"{_show(getattr(args, key))} (or start a new run)")
        if key not in args.given:
            setattr(args, key, value)
    # continue in place unless told otherwise
    if "saving_folder" not in args.given:
        args.saving_folder = os.path.dirname(args.resume) or "."
    if "checkpoint_name" not in args.given:
        args.checkpoint_name = os.path.basename(args.resume)
    if args.epochs <= state["epoch"]:
        raise UserError(f"--resume {args.resume} already holds epoch {state['epoch']}; pass "
                        f"--epochs N with N > {state['epoch']} to train further")
    return notes


def text_changed(record, path) -> list[str]:
    """A warning when the text file a checkpoint was trained on has changed since."""
    text = record["path"]
    if not os.path.isfile(text):
        return []
    with open(text, "rb") as fh:
        now = hashlib.sha256(fh.read()).hexdigest()
    if now == record.get("sha256"):
        return []
    return [f"warning: text file {text} has changed since checkpoint {path} was written "
            f"(SHA-256 {str(record.get('sha256'))[:12]}... then, {now[:12]}... now); training "
            "goes on with it as it is now"]


def _same(key, given, recorded) -> bool:
    if key == "problem":  # recorded as an absolute path
        return os.path.abspath(given) == os.path.abspath(recorded)
    return given == recorded


def apply_recipe(args, recipe):
    """A problem's ``recipe()`` defaults for the training flags not given."""
    for key, value in recipe.items():
        dest = key.lstrip("-").replace("-", "_")
        if dest not in vars(args) or dest in LOCAL_FLAGS:
            raise UserError(f"{args.problem}: recipe() sets {key!r}, which is not a training "
                            "flag it may set (e.g. lr, weight_decay, epochs, batch_size, "
                            "lr_decay_epoch, warmup_epochs, clip_grad_norm)")
        if dest not in args.given:
            setattr(args, dest, value)


def resolve_optimizer(args):
    """The optimizer and schedule flags that neither the command line, a recipe nor a resumed
    run set take their defaults (SGD, multistep; betas 0.9 0.95, cosine down to 0.1 x lr at
    --epochs); flags of the other optimizer or schedule are refused."""
    args.optimizer = args.optimizer or "sgd"
    args.lr_schedule = args.lr_schedule or "multistep"
    if args.betas is None:
        args.betas = list(DEFAULT_BETAS)
    if args.min_lr_factor is None:
        args.min_lr_factor = DEFAULT_MIN_LR_FACTOR
    if args.cosine_epochs is None:
        args.cosine_epochs = float(args.epochs)
    given = set(args.given)
    if args.optimizer == "sgd" and "betas" in given:
        raise UserError("--betas applies to --optimizer adamw; drop it (SGD uses momentum "
                        f"{MOMENTUM})")
    unused = {"multistep": ("min_lr_factor", "cosine_epochs"),
              "cosine": ("lr_decay", "lr_decay_epoch")}[args.lr_schedule]
    for dest in unused:
        if dest in given:
            raise UserError(f"--{dest.replace('_', '-')} does not apply to --lr-schedule "
                            f"{args.lr_schedule}; drop it")


def _show(value):
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return "(not given)" if value is None else str(value)


def check_combinations(args):
    if args.model and args.model != GPT_MODEL:
        resolve_model_spec(args.model)  # importable, callable
        ours = [f for f in ("depth", "batch_norm", "residual") if f in args.given]
        if ours:
            raise UserError(f"--{ours[0].replace('_', '-')} describes the built-in ResNet; "
                            f"drop it when training --model {args.model}")
    if args.image_size != 32 and args.dataset != "imagefolder":
        raise UserError(f"--image-size applies to --dataset imagefolder only ({args.dataset} "
                        "images are 32x32); drop --image-size")
    if args.image_size != 32 and not args.model:
        raise UserError(f"the built-in CIFAR ResNet takes 32x32 images; pass --model "
                        f"MODULE:CALLABLE to train another model at --image-size {args.image_size}")
    for flag in ("hessian_trace", "curvature"):
        if flag in args.given and not args.hessian_every:
            raise UserError(f"--{flag.replace('_', '-')} needs --hessian-every N (epochs "
                            "between checks)")
    if args.hessian_every and args.hessian_mini_batch > args.hessian_samples:
        raise UserError(f"--hessian-mini-batch {args.hessian_mini_batch} is larger than "
                        f"--hessian-samples {args.hessian_samples}; make it at most that")


def processes(args):
    """(number of processes, on GPUs?) with the checks that need no data."""
    if launched_by_torchrun():
        n, cuda = int(os.environ["WORLD_SIZE"]), args.cuda and torch.cuda.is_available()
    else:
        gpus = torch.cuda.device_count() if args.cuda else 0
        if args.cuda and not gpus:
            print("warning: --cuda requested but no GPU is available; running on CPU",
                  file=sys.stderr)
        n, cuda = args.device_count, bool(gpus)
        if gpus and n > gpus:
            raise UserError(f"--device_count {n} but only {gpus} GPU(s) are visible; pass "
                            f"--device_count {gpus} or less, or --no-cuda for CPU workers")
        warning = None if gpus or n == 1 else check_cpu_workers(n)
        if warning:
            print(warning, file=sys.stderr)
    if args.batch_size < n:
        raise UserError(f"--batch-size {args.batch_size} is smaller than the {n} processes; "
                        f"pass --batch-size {n} or more")
    return n, cuda


def check_saving_folder(args, paths) -> list:
    """Create --saving-folder and prove it writable; refuse an earlier run's files there unless
    this run continues them (--resume in place) or --overwrite; return those to replace."""
    folder = args.saving_folder
    try:
        make_writable_folder(folder)
    except OSError as exc:
        raise CheckpointError(f"cannot create --saving-folder {folder}: {exc.strerror or exc}; "
                              "choose a writable folder") from None
    earlier = [p for p in paths.values() if os.path.exists(p)]
    continuing = args.resume and os.path.exists(paths["last"]) and \
        os.path.samefile(paths["last"], args.resume)
    if not earlier or continuing:
        return []
    if not args.overwrite:
        raise CheckpointError(
            f"{folder} already holds {', '.join(os.path.basename(p) for p in earlier)} of an "
            f"earlier run; pass --resume {paths['last']} to continue it, --checkpoint-name "
            "NAME or --saving-folder DIR to keep it, or --overwrite to replace it")
    return earlier


# ---------------------------------------------------------------------------- data and model
def make_model(problem):
    """The problem's model (initialised from --seed: the global RNG is seeded first)."""
    model = problem.model()
    if not isinstance(model, nn.Module):
        from problems import ProblemError

        raise ProblemError(f"{problem.label}: model() returned a {type(model).__name__}, not "
                           "a torch.nn.Module")
    return model


def resolve_recipe(args, model, problem):
    """The built-in image problem's recipe follows the model: the original's with BatchNorm; a
    linear warm-up and gradient clipping without (measured on ResNet20, see the README). A
    problem file gets neither unless its recipe() or the flags ask (flags given, or a resumed
    run's values, win)."""
    bn = has_batch_norm(model) or not isinstance(problem, ImageProblem)
    if args.warmup_epochs is None:
        args.warmup_epochs = 0.0 if bn else NO_BN_WARMUP_EPOCHS
    if args.clip_grad_norm is None:
        args.clip_grad_norm = 0.0 if bn else NO_BN_CLIP_GRAD_NORM


def lr_factor(args, steps_per_epoch):
    """The learning-rate factor at global step k (0-based), for torch's LambdaLR: a linear
    warm-up over warmup_epochs epochs, per step, times the schedule: ``multistep`` is the
    original's MultiStepLR (x lr_decay after each epoch in lr_decay_epoch); ``cosine`` falls
    from 1 after the warm-up to min_lr_factor at cosine_epochs, and stays there,
    ``f + (1 - f) (1 + cos(pi t)) / 2`` with t the fraction of the way."""
    warm = args.warmup_epochs * steps_per_epoch
    milestones = sorted(m * steps_per_epoch for m in args.lr_decay_epoch)
    end = args.cosine_epochs * steps_per_epoch

    def schedule(k):
        if args.lr_schedule == "multistep":
            return args.lr_decay ** bisect.bisect_right(milestones, k)
        t = min(1.0, max(0.0, (k - warm) / (end - warm))) if end > warm else 1.0
        f = args.min_lr_factor
        return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * t))

    def factor(k):
        return schedule(k) * min(1.0, (k + 1) / warm) if warm > 0 else schedule(k)

    return factor


def make_optimizer(args, model):
    """SGD with momentum on every parameter (the original's), or AdamW with decoupled weight
    decay on the parameters of two or more dimensions (weight matrices, embeddings) and none
    on biases and LayerNorm/BatchNorm parameters (GPT-2's and nanoGPT's convention)."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=MOMENTUM,
                               weight_decay=args.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Run:
    """What one rank trains with."""

    problem: object                  # problems.Problem: forward, loss, accuracy, data
    model: nn.Module                 # the DDP wrapper under several processes
    plain: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: object                 # torch.optim.lr_scheduler.LambdaLR, stepped per step
    train_loader: object
    test_loader: object
    sampler: object                  # DistributedSampler, or None
    generator: object                # the loader's shuffling generator (one process)
    epoch: int = 0
    global_step: int = 0
    best: tuple = (-math.inf, 0)     # (score, epoch): test accuracy, or -test loss without one
    best_by: str = "accuracy"
    tracker: object = None


def make_loaders(args, problem, ctx):
    """Training loader (DistributedSampler under DDP) and the test loader (split
    rank::world_size without padding, so the all-reduced sums are exact)."""
    kw = dict(num_workers=args.num_workers, pin_memory=ctx.device.type == "cuda",
              collate_fn=problem.collate)
    per_rank = args.batch_size // ctx.world_size
    train_set, test_set = problem.train_dataset(), problem.dataset("test")
    sampler = generator = None
    if ctx.world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(
            train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
            seed=args.seed)
        test_set = torch.utils.data.Subset(test_set, range(ctx.rank, len(test_set),
                                                           ctx.world_size))
    else:
        generator = torch.Generator().manual_seed(args.seed)
    # Fresh training workers each epoch: their seeds come from the (restorable) generator.
    train = torch.utils.data.DataLoader(train_set, batch_size=per_rank, sampler=sampler,
                                        shuffle=sampler is None, generator=generator, **kw)
    test = torch.utils.data.DataLoader(test_set, batch_size=args.test_batch_size,
                                       persistent_workers=args.num_workers > 0, **kw)
    return train, test, sampler, generator


# ---------------------------------------------------------------------------- every rank
def train_worker(ctx, args, plan):
    """One rank: set up (or restore), then train epoch by epoch; rank 0 saves."""
    seed_everything(args.seed)
    problem = plan.problem
    plain = agree(ctx, lambda: make_model(problem)).to(ctx.device)
    resolve_recipe(args, plain, problem)
    train, test, sampler, generator = agree(ctx, lambda: make_loaders(args, problem, ctx))
    model = plain
    if ctx.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            plain, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer = make_optimizer(args, plain)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args, len(train)))
    run = Run(problem, model, plain, optimizer, schedule, train, test, sampler, generator)
    if args.resume:
        agree(ctx, lambda: restore(ctx, args, run))
    if args.hessian_every:
        run.tracker = agree(ctx, lambda: make_tracker(ctx, args, plan, run))
    describe(ctx, args, run)
    agree(ctx, lambda: remove_earlier(plan.replace) if ctx.rank == 0 and plan.replace else None)
    for epoch in range(run.epoch + 1, args.epochs + 1):
        run_epoch(ctx, args, plan, run, epoch)
    score, best_epoch = run.best
    best = f"best test accuracy {score:.2f}%" if run.best_by == "accuracy" else \
        f"lowest test loss {-score:.6g}"
    print0(f"checkpoint saved to {plan.paths['last']}; {best} (epoch {best_epoch}) in "
           f"{plan.paths['best']}")


def restore(ctx, args, run):
    """--resume: weights, optimizer, epoch, schedule position, best score, random states."""
    weights, state, _meta = read_training_state(args.resume)
    try:
        run.plain.load_state_dict(weights)
        run.optimizer.load_state_dict(state["optimizer"])
        run.schedule.load_state_dict(state["schedule"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"--resume {args.resume} does not fit this model: "
                              f"{str(exc).splitlines()[0][:150]}") from None
    run.epoch, run.global_step = int(state["epoch"]), int(state["global_step"])
    run.best = (float(state["best_score"]), int(state["best_epoch"]))
    run.best_by = state["best_by"]
    rng = state["rng"]
    if len(rng) == ctx.world_size:
        restore_rng_state(rng[ctx.rank], run.generator)
    else:  # another world size cannot replay the same data order anyway
        seed_everything(args.seed + run.epoch)
        print0(f"note: {args.resume} was trained on {len(rng)} process(es), this run uses "
               f"{ctx.world_size}: training goes on, but not bit for bit as it would have")


def make_tracker(ctx, args, plan, run):
    previous = ([], [])
    if args.resume and plan.previous_curvature:
        previous = load_curvature(plan.previous_curvature, run.epoch)
    return CurvatureTracker(
        ctx, run.problem, every=args.hessian_every, epochs=args.epochs,
        samples=args.hessian_samples, mini_batch=args.hessian_mini_batch, seed=args.seed,
        trace=args.hessian_trace, momentum=MOMENTUM if args.optimizer == "sgd" else 0.0,
        json_path=plan.paths["curvature_json"],
        png_path=plan.paths["curvature_png"], previous=previous,
        settings={"checkpoint": args.checkpoint_name}, curvatures=args.curvature)


def remove_earlier(paths):
    for p in paths:
        try:
            os.remove(p)
        except OSError as exc:
            raise CheckpointError(f"cannot remove {p} of the earlier run: "
                                  f"{exc.strerror or exc}") from None
    print0(f"--overwrite: removed {', '.join(os.path.basename(p) for p in paths)} of an "
           "earlier run")


def describe(ctx, args, run):
    problem, per = run.problem, args.batch_size // ctx.world_size
    train, test = len(run.train_loader.dataset), len(problem.dataset("test"))
    classes = getattr(problem, "num_classes", None)
    print0(f"{problem.describe()}, {count_parameters(run.plain):,} parameters; data "
           f"{problem.data_name} ({train} train / {test} test"
           f"{f', {classes} classes' if classes else ''}); device {ctx.device}, "
           f"{ctx.world_size} process(es), batch {per} per process")
    print0(recipe_line(args, problem))
    if args.resume:
        print0(f"resuming {args.resume} after epoch {run.epoch} (step {run.global_step})")
    if run.tracker is not None:
        print0(run.tracker.expected_cost(run.epoch, train))


def recipe_line(args, problem) -> str:
    """The optimizer, its schedule, warm-up and clipping in one line."""
    if args.optimizer == "sgd":
        head = f"SGD lr {args.lr:g}, momentum {MOMENTUM}, weight decay {args.weight_decay:g}"
    else:
        head = (f"AdamW lr {args.lr:g}, betas ({args.betas[0]:g}, {args.betas[1]:g}), weight "
                f"decay {args.weight_decay:g} (not on biases and norm layers)")
    if args.lr_schedule == "multistep":
        schedule = f"x{args.lr_decay:g} after epochs {_show(args.lr_decay_epoch)}"
    else:
        schedule = (f"cosine to {args.min_lr_factor:g} x lr at epoch {args.cosine_epochs:g}")
    original = isinstance(problem, ImageProblem) and args.optimizer == "sgd" and \
        args.lr_schedule == "multistep" and not args.warmup_epochs and not args.clip_grad_norm
    return (f"recipe: {head}, {schedule}; warm-up {args.warmup_epochs:g} epoch(s), gradient "
            f"clipping {args.clip_grad_norm or 'off'}" + (" (the original's)" if original else ""))


@dataclass
class EpochStats:
    loss: float
    accuracy: float | None           # percent; None when the problem has no accuracy
    lr: float
    steps: int
    clipped: float                   # fraction of steps whose gradient was clipped


class _Sums:
    """Per-sample sums of a pass, exact over ranks: loss x n, correct x n (while every batch
    has an accuracy), n."""

    def __init__(self):
        self.loss, self.correct, self.count, self.scored = 0.0, 0.0, 0, 0

    def add(self, problem, outputs, batch, loss):
        n = batch_size(batch)
        self.loss += float(loss.detach()) * n
        self.count += n
        accuracy = problem.accuracy(outputs.detach() if isinstance(outputs, torch.Tensor)
                                    else outputs, batch)
        if accuracy is not None:
            self.correct += float(accuracy) * n
            self.scored += n

    def means(self, device):
        loss, correct, count, scored = sum_over_ranks(
            [self.loss, self.correct, self.count, self.scored], device)
        accuracy = 100.0 * correct / count if count and scored == count else None
        return loss / max(count, 1), accuracy


def train_one_epoch(ctx, args, run, epoch, progress) -> EpochStats:
    run.model.train()
    sums, clipped, lr = _Sums(), 0, run.schedule.get_last_lr()[0]
    for step, batch in enumerate(run.train_loader):
        lr = run.schedule.get_last_lr()[0]
        batch = move_batch(batch, ctx.device, non_blocking=True)
        run.optimizer.zero_grad(set_to_none=True)
        out = run.problem.forward(run.model, batch)
        loss = run.problem.loss(out, batch)
        loss.backward()
        if args.clip_grad_norm:  # DDP has averaged the gradients: every rank clips alike
            norm = nn.utils.clip_grad_norm_(run.plain.parameters(), args.clip_grad_norm)
            clipped += bool(norm > args.clip_grad_norm)
        run.optimizer.step()
        run.schedule.step()
        sums.add(run.problem, out, batch, loss)
        progress.update(step + 1, loss.item())
    progress.close()
    # (Under DDP, DistributedSampler pads the last shard with a few repeated samples so that
    # every rank runs the same number of steps; the training figures include them.)
    loss, accuracy = sums.means(ctx.device)
    spe = len(run.train_loader)
    return EpochStats(loss, accuracy, lr, spe, clipped / max(spe, 1))


@torch.no_grad()
def evaluate(problem, model, loader, device):
    """Mean loss and accuracy (percent, or None) over this rank's test shard, summed exactly
    over all ranks (each batch's mean loss weighted by its sample count)."""
    model.eval()
    sums = _Sums()
    for batch in loader:
        batch = move_batch(batch, device, non_blocking=True)
        out = problem.forward(model, batch)
        sums.add(problem, out, batch, problem.loss(out, batch))
    return sums.means(device)


def sum_over_ranks(values, device):
    return all_reduce_(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


class TrainingDiverged(UserError):
    """The loss became NaN or inf."""


def run_epoch(ctx, args, plan, run, epoch):
    """Train one epoch, evaluate, save, then maybe measure the curvature (a cancel during the
    check keeps the epoch's checkpoint)."""
    start = time.time()
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    progress = _Progress(ctx.rank == 0, len(run.train_loader), f"epoch {epoch}/{args.epochs}")
    stats = train_one_epoch(ctx, args, run, epoch, progress)
    run.global_step += stats.steps
    if ctx.world_size > 1:
        # DDP leaves each replica with its own BN running stats; use rank 0's everywhere so
        # the sharded test pass (and the Hessian) see exactly the model that is saved.
        for buf in run.plain.buffers():
            torch.distributed.broadcast(buf, src=0)
    test_loss, test_acc = evaluate(run.problem, run.plain, run.test_loader, ctx.device)
    if not (math.isfinite(stats.loss) and math.isfinite(test_loss)):
        raise TrainingDiverged(diverged_message(args, epoch, stats.loss))
    lr_text = f"{stats.lr:.4f}" if stats.lr >= 1e-3 else f"{stats.lr:.2e}"
    clip_text = f"  clipped {100 * stats.clipped:.0f}% of steps" if args.clip_grad_norm else ""
    loss_text = run.problem.loss_text
    print0(f"epoch {epoch}/{args.epochs}  train loss {loss_text(stats.loss)}"
           f"{_acc(stats.accuracy)}  test loss {loss_text(test_loss)}{_acc(test_acc)}  "
           f"lr {lr_text}  {time.time() - start:.1f} s{clip_text}")
    save_epoch(ctx, args, plan, run, epoch, test_loss, test_acc)
    if run.tracker is not None:
        track_curvature(ctx, run, epoch, stats, test_loss, test_acc)


def _acc(accuracy):
    return "" if accuracy is None else f" acc {accuracy:.2f}%"


def diverged_message(args, epoch, loss):
    fix = f"lower --lr (now {args.lr:g})"
    if args.clip_grad_norm:
        fix += f" or --clip-grad-norm (now {args.clip_grad_norm:g})"
    else:
        fix += f", or pass --clip-grad-norm {NO_BN_CLIP_GRAD_NORM:g}"
    fix += (f", or raise --warmup-epochs (now {args.warmup_epochs:g})" if args.warmup_epochs
            else f", or pass --warmup-epochs {NO_BN_WARMUP_EPOCHS:g}")
    return f"training diverged in epoch {epoch} (train loss {loss}); {fix}"


def track_curvature(ctx, run, epoch, stats, test_loss, test_acc):
    tracker = run.tracker
    tracker.log_epoch(epoch=epoch, step=run.global_step, lr=stats.lr, train_loss=stats.loss,
                      train_accuracy=stats.accuracy, test_loss=test_loss,
                      test_accuracy=test_acc)
    if not tracker.due(epoch):
        return
    records = tracker.check(run.plain, epoch=epoch, step=run.global_step, lr=stats.lr,
                            train_loss=stats.loss, test_loss=test_loss, test_accuracy=test_acc)
    for record in records:
        print0(check_line(record))

    def write():
        if ctx.rank != 0:
            return
        try:
            warning = tracker.write()
        except OSError as exc:
            raise CheckpointError(f"cannot write {tracker.json_path} ({write_error(exc)})"
                                  ) from None
        if warning:
            print0(warning)

    agree(ctx, write)


def save_epoch(ctx, args, plan, run, epoch, test_loss, test_acc):
    """Rank 0 writes the best checkpoint (when this epoch is the best so far: by test accuracy,
    or by test loss when the problem has no accuracy), then the last one with the training
    state; every rank learns of a failure."""
    score = test_acc if test_acc is not None else -test_loss
    if score > run.best[0]:
        run.best = (score, epoch)
    run.best_by = "accuracy" if test_acc is not None else "loss"
    rng = [capture_rng_state(run.generator)]
    if ctx.world_size > 1:
        rng = [None] * ctx.world_size
        torch.distributed.all_gather_object(rng, capture_rng_state(run.generator))
    recorded = {k: v for k, v in vars(args).items() if k != "given"}
    common = dict(epoch=epoch, test_accuracy=test_acc,
                  args=dict(recorded, world_size=ctx.world_size))
    state = {"epoch": epoch, "global_step": run.global_step,
             "steps_per_epoch": len(run.train_loader), "optimizer": run.optimizer.state_dict(),
             "schedule": run.schedule.state_dict(), "best_score": run.best[0],
             "best_by": run.best_by, "best_epoch": run.best[1], "world_size": ctx.world_size,
             "rng": rng}

    def write():
        if ctx.rank != 0:
            return
        best = plan.paths["best"] if run.best[1] == epoch else None
        note = f"{plan.paths['last']} holds epoch {epoch}"
        save_checkpoint(plan.paths["last"], run.plain, run.problem.record(),
                        training_state=state, best_path=best,
                        on_commit=lambda: ctx.committed(note), **common)

    agree(ctx, write)


class _Progress:
    """A one-line progress indicator on stderr, only when stderr is a terminal."""

    def __init__(self, enabled, total, label):
        self.enabled = enabled and sys.stderr.isatty()
        self.total, self.label = total, label

    def update(self, step, loss):
        if self.enabled:
            sys.stderr.write(f"\r{self.label} {step}/{self.total}  loss {loss:.4f}")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


# ---------------------------------------------------------------------------- main
def train(args):
    # a run that fails or is cancelled before its first checkpoint leaves no empty folder
    with removed_if_left_empty(args.saving_folder, args.data_dir):
        plan = validate(args)
        launch(train_worker, (args, plan), nprocs=plan.nprocs, cuda=plan.cuda,
               backend=args.backend, ip=args.ip, port=args.port)


def main(argv=None):
    args = parse_args(argv)
    return run_main(lambda: train(args), what="the training")


if __name__ == "__main__":
    status = main()
    ignore_cancels_from_now()  # the run is over: Python's shutdown is not cancelled
    sys.exit(status)
