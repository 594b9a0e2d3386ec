"""Train a CIFAR ResNet (or your own model) with SGD and save self-describing checkpoints.

    python training.py --dataset synthetic --epochs 3 --no-cuda
    python training.py --device_count 4                              # 4 DDP workers
    torchrun --nproc_per_node 4 training.py --dataset cifar10        # the same under torchrun
    python training.py --resume checkpoints/net.pkl --epochs 200     # continue a run
    python training.py --hessian-every 10 --hessian-trace            # curvature while training

Read top to bottom: parse -> validate once (every user error is one `error:` line and exit 2,
before training starts) -> launch (support.launch: this process, --device_count N spawned DDP
workers, or one rank of a torchrun job) -> on every rank: data, model, optimiser (restored with
--resume), then per epoch: train, evaluate, optionally measure the curvature, rank 0 saves.

The recipe is the original PyHessian's (SGD momentum 0.9, lr 0.1, x0.1 after epochs 80 and 120,
weight decay 5e-4, batch 128). Without BatchNorm it adds a linear learning-rate warm-up and
gradient-norm clipping by default (the original diverges there). Files in --saving-folder, named
after --checkpoint-name (net.pkl):

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

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import resnet
from pyhessian_dist.distributed import all_reduce_, launched_by_torchrun, print0
from support.checkpoints import (
    capture_rng_state,
    count_parameters,
    custom_arch,
    read_training_state,
    restore_rng_state,
    save_checkpoint,
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
from support.curvature import CurvatureTracker, check_line, curvature_paths, load_curvature
from support.datasets import DATASETS, get_datasets, hessian_subset
from support.errors import CheckpointError, UserError
from support.files import make_writable_folder
from support.launch import agree, check_cpu_workers, launch, run_main
from support.models import has_batch_norm, model_from_spec, resolve_model_spec

MOMENTUM = 0.9
# Without BatchNorm (measured on ResNet20, see the README): warm up over 2 epochs, clip at 1.
NO_BN_WARMUP_EPOCHS = 2.0
NO_BN_CLIP_GRAD_NORM = 1.0
# --resume keeps these as the checkpoint's run had them (given ones must agree)...
RECIPE_FLAGS = ("batch_size", "lr", "lr_decay", "lr_decay_epoch", "seed", "weight_decay",
                "batch_norm", "residual", "depth", "dataset", "model", "image_size",
                "warmup_epochs", "clip_grad_norm")
# ...and takes every other flag not given from it too, except these (this machine, this call).
LOCAL_FLAGS = ("cuda", "device_count", "ip", "port", "backend", "num_workers", "resume",
               "overwrite", "saving_folder", "checkpoint_name", "given")


# ---------------------------------------------------------------------------- command line
def build_parser():
    p = ArgumentParser(description="Train a CIFAR ResNet (depth 6n+2) or your own model with "
                       "SGD and save checkpoints for example_pyhessian_analysis.py.",
                       formatter_class=HelpFormatter)
    # the original's flags and defaults
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="global training batch size; with N processes each uses "
                        "batch-size // WORLD_SIZE")
    p.add_argument("--test-batch-size", type=positive_int, default=256,
                   help="batch size for evaluating the test set")
    p.add_argument("--epochs", type=positive_int, default=180,
                   help="train until this epoch (with --resume: a larger number trains on)")
    p.add_argument("--lr", type=positive_float, default=0.1, help="initial SGD learning rate")
    p.add_argument("--lr-decay", type=positive_float, default=0.1,
                   help="factor the learning rate is multiplied by at each --lr-decay-epoch")
    p.add_argument("--lr-decay-epoch", type=positive_int, nargs="+", default=[80, 120],
                   help="epochs after which the learning rate decays")
    p.add_argument("--seed", type=int, default=1,
                   help="random seed (initialisation, shuffling, augmentation, Hessian subset)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=5e-4, help="SGD weight decay")
    add_bool_flag(p, "batch-norm", True, "use batch normalisation")
    add_bool_flag(p, "residual", True, "use residual (skip) connections")
    add_bool_flag(p, "cuda", True, "train on GPUs (falls back to the CPU with a warning)")
    p.add_argument("--saving-folder", default="checkpoints/",
                   help="folder the checkpoints go to (with --resume: the resumed one's)")
    _add_our_flags(p)
    _add_curvature_flags(p)
    return p


def _add_our_flags(p):
    p.add_argument("--checkpoint-name", default="net.pkl",
                   help="file name of the last-epoch checkpoint in --saving-folder (rewritten "
                        "every epoch); the best one is NAME.best.pkl")
    p.add_argument("--depth", type=resnet_depth, default=20,
                   help="ResNet depth, 6n+2 (20, 32, 44, 56, 110, ...)")
    p.add_argument("--model", default=None, metavar="MODULE:CALLABLE",
                   help="your own model instead of the ResNet, e.g. torchvision.models:resnet18"
                        " (called with num_classes=<classes> when it accepts it)")
    p.add_argument("--dataset", choices=DATASETS, default="cifar10",
                   help="data set: cifar10/cifar100 (torchvision, in --data-dir), imagefolder "
                        "(--data-dir/train/<class>/*, --data-dir/test/<class>/*), synthetic "
                        "(generated, offline)")
    p.add_argument("--data-dir", default="data", help="folder holding the data set")
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
    replace: list = field(default_factory=list)   # an earlier run's files (--overwrite)
    previous_curvature: str | None = None         # curvature file a resumed run continues
    bundle: object = None            # the data set when validated in this process


def validate(args) -> Plan:
    """Everything checkable before training; raises UserError (one line, exit 2)."""
    if args.resume:
        resume_defaults(args)
    check_combinations(args)
    last = os.path.join(args.saving_folder, args.checkpoint_name)
    stem, ext = os.path.splitext(last)
    paths = dict(zip(("last", "best", "curvature_json", "curvature_png"),
                     (last, f"{stem}.best{ext}",
                      *curvature_paths(args.saving_folder, args.checkpoint_name))))
    plan = Plan(*processes(args), paths=paths)
    if args.resume:
        plan.previous_curvature = curvature_paths(os.path.dirname(args.resume) or ".",
                                                  os.path.basename(args.resume))[0]
    if launched_by_torchrun() and os.environ.get("RANK") != "0":
        return plan  # rank 0 checks the data and the folder (and may download)
    plan.bundle = load_bundle(args, download=True)
    if args.hessian_every:
        hessian_subset(plan.bundle.train_eval, args.hessian_samples, args.seed,
                       flag="--hessian-samples")
    make_model(args, plan.bundle.num_classes)   # the model can be built (--model)
    plan.replace = check_saving_folder(args, paths)
    return plan


def resume_defaults(args):
    """--resume: flags not given take the checkpoint run's values; recipe flags given must
    agree; --epochs must go past the checkpoint's epoch."""
    _weights, state, meta = read_training_state(args.resume)
    recorded = meta.get("args") or {}
    for key, value in recorded.items():
        if not hasattr(args, key) or key in LOCAL_FLAGS:
            continue
        flag = "--" + key.replace("_", "-")
        if key in args.given and key in RECIPE_FLAGS and getattr(args, key) != value:
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


def _show(value):
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return "(not given)" if value is None else str(value)


def check_combinations(args):
    if args.model:
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
    if args.hessian_trace and not args.hessian_every:
        raise UserError("--hessian-trace needs --hessian-every N (epochs between checks)")
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
def load_bundle(args, download):
    return get_datasets(args.dataset, args.data_dir, download=download,
                        image_size=args.image_size)


def make_model(args, num_classes):
    # To train your own model without --model, build it here.
    if args.model:
        return model_from_spec(args.model, num_classes)
    return resnet(depth=args.depth, num_classes=num_classes, batch_norm=args.batch_norm,
                  residual=args.residual)


def resolve_recipe(args, model):
    """The recipe's defaults follow the model: the original's with BatchNorm; a linear warm-up
    and gradient clipping without (flags given, or a resumed run's values, win)."""
    bn = has_batch_norm(model)
    if args.warmup_epochs is None:
        args.warmup_epochs = 0.0 if bn else NO_BN_WARMUP_EPOCHS
    if args.clip_grad_norm is None:
        args.clip_grad_norm = 0.0 if bn else NO_BN_CLIP_GRAD_NORM


def learning_rate(args, epoch, step, steps_per_epoch):
    """lr at ``step`` (0-based) of ``epoch`` (1-based): the original's MultiStepLR (x lr_decay
    after each epoch in lr_decay_epoch) times a linear warm-up over warmup_epochs epochs."""
    lr = args.lr * args.lr_decay ** sum(m < epoch for m in args.lr_decay_epoch)
    warm = args.warmup_epochs * steps_per_epoch
    done = (epoch - 1) * steps_per_epoch + step + 1
    return lr * min(1.0, done / warm) if warm > 0 else lr


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Run:
    """What one rank trains with."""

    model: nn.Module                 # the DDP wrapper under several processes
    plain: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: object
    test_loader: object
    sampler: object                  # DistributedSampler, or None
    generator: object                # the loader's shuffling generator (one process)
    bundle: object
    arch: dict | None
    epoch: int = 0
    global_step: int = 0
    best: tuple = (-1.0, 0)          # (test accuracy, epoch)
    tracker: object = None


def make_loaders(args, bundle, ctx):
    """Training loader (DistributedSampler under DDP) and the test loader (split
    rank::world_size without padding, so the all-reduced sums are exact)."""
    kw = dict(num_workers=args.num_workers, pin_memory=ctx.device.type == "cuda")
    per_rank = args.batch_size // ctx.world_size
    sampler = generator = None
    if ctx.world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(
            bundle.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
            seed=args.seed)
        test_set = torch.utils.data.Subset(bundle.test, range(ctx.rank, len(bundle.test),
                                                              ctx.world_size))
    else:
        generator = torch.Generator().manual_seed(args.seed)
        test_set = bundle.test
    # Fresh training workers each epoch: their seeds come from the (restorable) generator.
    train = torch.utils.data.DataLoader(bundle.train, batch_size=per_rank, sampler=sampler,
                                        shuffle=sampler is None, generator=generator, **kw)
    test = torch.utils.data.DataLoader(test_set, batch_size=args.test_batch_size,
                                       persistent_workers=args.num_workers > 0, **kw)
    return train, test, sampler, generator


# ---------------------------------------------------------------------------- every rank
def train_worker(ctx, args, plan):
    """One rank: set up (or restore), then train epoch by epoch; rank 0 saves."""
    seed_everything(args.seed)
    bundle = agree(ctx, lambda: plan.bundle or load_bundle(args, download=False))
    plain = make_model(args, bundle.num_classes).to(ctx.device)
    resolve_recipe(args, plain)
    train, test, sampler, generator = make_loaders(args, bundle, ctx)
    model = plain
    if ctx.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            plain, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer = torch.optim.SGD(plain.parameters(), lr=args.lr, momentum=MOMENTUM,
                                weight_decay=args.weight_decay)
    arch = custom_arch(args.model, bundle.num_classes) if args.model else None
    run = Run(model, plain, optimizer, train, test, sampler, generator, bundle, arch)
    if args.resume:
        agree(ctx, lambda: restore(ctx, args, run))
    if args.hessian_every:
        run.tracker = agree(ctx, lambda: make_tracker(ctx, args, plan, run))
    describe(ctx, args, run)
    agree(ctx, lambda: remove_earlier(plan.replace) if ctx.rank == 0 and plan.replace else None)
    for epoch in range(run.epoch + 1, args.epochs + 1):
        run_epoch(ctx, args, plan, run, epoch)
    best_acc, best_epoch = run.best
    print0(f"checkpoint saved to {plan.paths['last']}; best test accuracy {best_acc:.2f}% "
           f"(epoch {best_epoch}) in {plan.paths['best']}")


def restore(ctx, args, run):
    """--resume: weights, optimizer, epoch, schedule position, best accuracy, random states."""
    weights, state, _meta = read_training_state(args.resume)
    try:
        run.plain.load_state_dict(weights)
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"--resume {args.resume} does not fit this model: "
                              f"{str(exc).splitlines()[0][:150]}") from None
    run.epoch, run.global_step = int(state["epoch"]), int(state["global_step"])
    run.best = (float(state["best_test_accuracy"]), int(state["best_epoch"]))
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
        ctx, run.bundle.train_eval, every=args.hessian_every, epochs=args.epochs,
        samples=args.hessian_samples, mini_batch=args.hessian_mini_batch, seed=args.seed,
        trace=args.hessian_trace, momentum=MOMENTUM, json_path=plan.paths["curvature_json"],
        png_path=plan.paths["curvature_png"], previous=previous,
        settings={"checkpoint": args.checkpoint_name})


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
    b, per = run.bundle, args.batch_size // ctx.world_size
    name = (f"--model {args.model} ({type(run.plain).__name__})" if args.model else
            f"ResNet{args.depth} (batch_norm={args.batch_norm}, residual={args.residual})")
    print0(f"{name}, {count_parameters(run.plain):,} parameters; dataset {b.name} "
           f"({len(b.train)} train / {len(b.test)} test, {b.num_classes} classes); device "
           f"{ctx.device}, {ctx.world_size} process(es), batch {per} per process")
    original = not args.warmup_epochs and not args.clip_grad_norm
    print0(f"recipe: SGD lr {args.lr:g}, momentum {MOMENTUM}, weight decay "
           f"{args.weight_decay:g}, x{args.lr_decay:g} after epochs "
           f"{_show(args.lr_decay_epoch)}; warm-up {args.warmup_epochs:g} epoch(s), gradient "
           f"clipping {args.clip_grad_norm or 'off'}" + (" (the original's)" if original else ""))
    if args.resume:
        print0(f"resuming {args.resume} after epoch {run.epoch} (step {run.global_step})")
    if run.tracker is not None:
        print0(run.tracker.expected_cost(run.epoch, len(b.train)))


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    lr: float
    steps: int
    clipped: float                   # fraction of steps whose gradient was clipped


def train_one_epoch(ctx, args, run, epoch, progress) -> EpochStats:
    run.model.train()
    spe = len(run.train_loader)
    loss_sum, correct, count, clipped, lr = 0.0, 0, 0, 0, args.lr
    for step, (x, y) in enumerate(run.train_loader):
        lr = learning_rate(args, epoch, step, spe)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        run.optimizer.zero_grad(set_to_none=True)
        out = run.model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        if args.clip_grad_norm:  # DDP has averaged the gradients: every rank clips alike
            norm = nn.utils.clip_grad_norm_(run.plain.parameters(), args.clip_grad_norm)
            clipped += bool(norm > args.clip_grad_norm)
        run.optimizer.step()
        loss_sum += loss.item() * y.numel()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
        progress.update(step + 1, loss.item())
    progress.close()
    # (Under DDP, DistributedSampler pads the last shard with a few repeated samples so that
    # every rank runs the same number of steps; the training figures include them.)
    loss_sum, correct, count = sum_over_ranks([loss_sum, correct, count], ctx.device)
    return EpochStats(loss_sum / max(count, 1), 100.0 * correct / max(count, 1), lr, spe,
                      clipped / max(spe, 1))


@torch.no_grad()
def evaluate(model, loader, device):
    """Loss and accuracy over this rank's test shard, summed exactly over all ranks."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
    loss_sum, correct, count = sum_over_ranks([loss_sum, correct, count], device)
    return loss_sum / max(count, 1), 100.0 * correct / max(count, 1)


def sum_over_ranks(values, device):
    return all_reduce_(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


class TrainingDiverged(UserError):
    """The loss became NaN or inf."""


def run_epoch(ctx, args, plan, run, epoch):
    """Train one epoch, evaluate, maybe measure the curvature, save."""
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
    test_loss, test_acc = evaluate(run.plain, run.test_loader, ctx.device)
    if not (math.isfinite(stats.loss) and math.isfinite(test_loss)):
        raise TrainingDiverged(diverged_message(args, epoch, stats.loss))
    lr_text = f"{stats.lr:.4f}" if stats.lr >= 1e-3 else f"{stats.lr:.2e}"
    clip_text = f"  clipped {100 * stats.clipped:.0f}% of steps" if args.clip_grad_norm else ""
    print0(f"epoch {epoch}/{args.epochs}  train loss {stats.loss:.4f} acc {stats.accuracy:.2f}%"
           f"  test loss {test_loss:.4f} acc {test_acc:.2f}%  lr {lr_text}  "
           f"{time.time() - start:.1f} s{clip_text}")
    if run.tracker is not None:
        track_curvature(ctx, run, epoch, stats, test_loss, test_acc)
    save_epoch(ctx, args, plan, run, epoch, test_acc)


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
    record = tracker.check(run.plain, epoch=epoch, step=run.global_step, lr=stats.lr,
                           train_loss=stats.loss, test_loss=test_loss, test_accuracy=test_acc)
    print0(check_line(record))

    def write():
        if ctx.rank != 0:
            return
        try:
            warning = tracker.write()
        except OSError as exc:
            raise CheckpointError(f"cannot write {tracker.json_path}: {exc.strerror or exc}; "
                                  "choose a writable --saving-folder") from None
        if warning:
            print0(warning)

    agree(ctx, write)


def save_epoch(ctx, args, plan, run, epoch, test_acc):
    """Rank 0 writes the best checkpoint (when this epoch is the best so far), then the last
    one with the training state; every rank learns of a failure."""
    if test_acc > run.best[0]:
        run.best = (test_acc, epoch)
    rng = [capture_rng_state(run.generator)]
    if ctx.world_size > 1:
        rng = [None] * ctx.world_size
        torch.distributed.all_gather_object(rng, capture_rng_state(run.generator))
    recorded = {k: v for k, v in vars(args).items() if k != "given"}
    common = dict(dataset=run.bundle.name, normalization=run.bundle.normalization,
                  epoch=epoch, test_accuracy=test_acc, arch=run.arch,
                  args=dict(recorded, world_size=ctx.world_size),
                  image_size=run.bundle.image_size)
    state = {"epoch": epoch, "global_step": run.global_step,
             "steps_per_epoch": len(run.train_loader), "optimizer": run.optimizer.state_dict(),
             "schedule": {"kind": "multistep with linear warm-up (closed form in the epoch)",
                          "lr": run.optimizer.param_groups[0]["lr"]},
             "best_test_accuracy": run.best[0], "best_epoch": run.best[1],
             "world_size": ctx.world_size, "rng": rng}

    def write():
        if ctx.rank != 0:
            return
        if run.best[1] == epoch:
            save_checkpoint(plan.paths["best"], run.plain, **common)
        save_checkpoint(plan.paths["last"], run.plain, training_state=state, **common)

    agree(ctx, write)
    ctx.committed()


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
    plan = validate(args)
    if plan.nprocs > 1 and not launched_by_torchrun():
        plan = replace(plan, bundle=None)  # spawned workers load it themselves
    launch(train_worker, (args, plan), nprocs=plan.nprocs, cuda=plan.cuda,
           backend=args.backend, ip=args.ip, port=args.port)


def main(argv=None):
    args = parse_args(argv)
    return run_main(lambda: train(args), what="the training")


if __name__ == "__main__":
    sys.exit(main())
