"""Train a CIFAR ResNet and save a self-describing checkpoint.

The flags and defaults of the original PyHessian training.py, plus --depth, --dataset,
--data-dir, --num-workers and --checkpoint-name.  One process by default; under torchrun
(WORLD_SIZE > 1) every process trains one DistributedDataParallel replica:

    python training.py --dataset synthetic --epochs 2 --no-cuda
    torchrun --nproc_per_node 2 training.py --dataset cifar10
"""
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import utils
from models import resnet

# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser():
    p = utils.ArgumentParser(
        description="Train a CIFAR ResNet (depth 6n+2) with SGD and save a checkpoint "
        "for example_pyhessian_analysis.py.",
        formatter_class=utils.HelpFormatter,
    )
    p.add_argument("--batch-size", type=utils.positive_int, default=128,
                   help="global training batch size; under torchrun each of the WORLD_SIZE "
                        "processes uses batch-size // WORLD_SIZE")
    p.add_argument("--test-batch-size", type=utils.positive_int, default=256,
                   help="batch size for evaluating the test set")
    p.add_argument("--epochs", type=utils.positive_int, default=180, help="number of epochs to train")
    p.add_argument("--lr", type=utils.positive_float, default=0.1, help="initial SGD learning rate")
    p.add_argument("--lr-decay", type=utils.positive_float, default=0.1,
                   help="factor the learning rate is multiplied by at each --lr-decay-epoch")
    p.add_argument("--lr-decay-epoch", type=utils.positive_int, nargs="+", default=[80, 120],
                   help="epochs after which the learning rate decays")
    p.add_argument("--seed", type=int, default=1, help="random seed (initialisation, shuffling, augmentation)")
    p.add_argument("--weight-decay", type=utils.nonnegative_float, default=5e-4, help="SGD weight decay")
    utils.add_bool_flag(p, "batch-norm", True, "use batch normalisation")
    utils.add_bool_flag(p, "residual", True, "use residual (skip) connections")
    utils.add_bool_flag(p, "cuda", True, "train on a GPU (falls back to the CPU with a warning when none is available)")
    p.add_argument("--saving-folder", default="checkpoints/", help="folder the checkpoint is written to")
    p.add_argument("--checkpoint-name", default="net.pkl",
                   help="file name of the checkpoint inside --saving-folder (rewritten after every epoch)")
    p.add_argument("--depth", type=utils.resnet_depth, default=20, help="ResNet depth, 6n+2 (20, 32, 44, 56, 110, ...)")
    p.add_argument("--dataset", choices=utils.DATASETS, default="cifar10",
                   help="data set: cifar10/cifar100 (torchvision, in --data-dir), imagefolder "
                        "(--data-dir/train/<class>/*, --data-dir/test/<class>/*), synthetic (generated, offline)")
    p.add_argument("--data-dir", default="data", help="folder holding the data set")
    p.add_argument("--num-workers", type=utils.nonnegative_int, default=2,
                   help="data-loading worker processes per training process (0 loads in the main process)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if not args.checkpoint_name or os.path.basename(args.checkpoint_name) != args.checkpoint_name:
        build_parser().error(f"argument --checkpoint-name: must be a plain file name, got {args.checkpoint_name!r}")
    return args


# --------------------------------------------------------------------------------------
# Distributed set-up (torchrun) or one process
# --------------------------------------------------------------------------------------


def _env_world():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError:
        return 0, 1, 0


def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


# --------------------------------------------------------------------------------------
# Train / evaluate
# --------------------------------------------------------------------------------------


def _all_reduce_sums(values, device, world_size):
    """Sum a list of numbers over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


def train_one_epoch(model, loader, optimizer, device, world_size, progress):
    model.train()
    loss_sum, correct, count = 0.0, 0, 0
    for step, (x, y) in enumerate(loader, 1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * y.numel()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
        progress.update(step, loss.item())
    progress.close()
    # (Under torchrun DistributedSampler pads the last shard with a few repeated samples so
    # that every rank runs the same number of steps; the training figures include them.)
    loss_sum, correct, count = _all_reduce_sums([loss_sum, correct, count], device, world_size)
    return loss_sum / max(count, 1), 100.0 * correct / max(count, 1)


@torch.no_grad()
def evaluate(model, loader, device, world_size):
    """Loss and accuracy over this rank's test shard, summed exactly over all ranks."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += y.numel()
    loss_sum, correct, count = _all_reduce_sums([loss_sum, correct, count], device, world_size)
    return loss_sum / max(count, 1), 100.0 * correct / max(count, 1)


def _collective_call(fn, active, world_size, device):
    """Call ``fn()`` where ``active``; if it raises DataError/CheckpointError on any rank, raise on all.

    Keeps the ranks of a torchrun job in step: a rank that fails to load data would otherwise
    leave the others waiting in the next collective forever.
    """
    result, error = None, None
    if active:
        try:
            result = fn()
        except (utils.DataError, utils.CheckpointError) as exc:
            error = exc
    if world_size > 1:
        failed = torch.tensor([1 if error is not None else 0], device=device)
        dist.all_reduce(failed)
        if failed.item() and error is None:
            error = utils.DataError("another process failed (see the message of rank 0)")
    if error is not None:
        raise error
    return result


def run(args, rank, world_size, local_rank):
    device = utils.resolve_device(args.cuda, local_rank=local_rank, warn=(rank == 0))
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    log = print if rank == 0 else (lambda *a, **k: None)

    per_rank_batch = args.batch_size // world_size
    if per_rank_batch < 1:
        raise utils.DataError(
            f"--batch-size {args.batch_size} is smaller than the {world_size} processes; "
            f"pass --batch-size {world_size} or more"
        )
    checkpoint_path = os.path.join(args.saving_folder, args.checkpoint_name)

    def prepare_rank0():
        data = utils.get_datasets(args.dataset, args.data_dir, download=True)
        try:  # fail now, not after the first epoch
            os.makedirs(args.saving_folder, exist_ok=True)
        except OSError as exc:
            raise utils.CheckpointError(
                f"cannot create --saving-folder {args.saving_folder}: {exc.strerror}; choose a writable folder"
            ) from None
        return data

    _seed_everything(args.seed)
    # Rank 0 alone may download; the others read what it fetched.  Every rank learns of a
    # failure on any rank (instead of hanging in the next collective).
    data = _collective_call(prepare_rank0, rank == 0, world_size, device)
    if world_size > 1:
        loaded = _collective_call(lambda: utils.get_datasets(args.dataset, args.data_dir, download=False),
                                  rank != 0, world_size, device)
        if rank != 0:
            data = loaded

    # ---- data loaders: DistributedSampler shards the training set; the test set is split
    # rank::world_size without padding so the all-reduced sums are exact.
    loader_kw = dict(num_workers=args.num_workers, pin_memory=(device.type == "cuda"),
                     persistent_workers=args.num_workers > 0)
    if world_size > 1:
        train_sampler = torch.utils.data.distributed.DistributedSampler(
            data.train, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed
        )
        train_loader = torch.utils.data.DataLoader(data.train, batch_size=per_rank_batch, sampler=train_sampler, **loader_kw)
        test_set = torch.utils.data.Subset(data.test, range(rank, len(data.test), world_size))
    else:
        train_sampler = None
        gen = torch.Generator().manual_seed(args.seed)
        train_loader = torch.utils.data.DataLoader(data.train, batch_size=per_rank_batch, shuffle=True,
                                                   generator=gen, **loader_kw)
        test_set = data.test
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=args.test_batch_size, shuffle=False, **loader_kw)

    # ---- model and optimiser (the original: SGD momentum 0.9, MultiStepLR)
    model = resnet(depth=args.depth, num_classes=data.num_classes, batch_norm=args.batch_norm,
                   residual=args.residual).to(device)
    log(f"ResNet{args.depth} (batch_norm={args.batch_norm}, residual={args.residual}), "
        f"{utils.count_parameters(model):,} parameters; dataset {args.dataset} "
        f"({len(data.train)} train / {len(data.test)} test, {data.num_classes} classes); "
        f"device {device}, {world_size} process(es), batch {per_rank_batch} per process")
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_decay_epoch, gamma=args.lr_decay)
    plain = utils.unwrap_model(model)

    for epoch in range(1, args.epochs + 1):
        start = time.time()
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        progress = _Progress(rank == 0, len(train_loader), f"epoch {epoch}/{args.epochs}")
        train_loss, train_acc = train_one_epoch(model, train_loader, optimizer, device, world_size, progress)
        scheduler.step()
        if world_size > 1:
            # DDP leaves each replica with its own BN running stats; use rank 0's everywhere
            # so the sharded test pass evaluates exactly the model that is saved.
            for buf in plain.buffers():
                dist.broadcast(buf, src=0)
        test_loss, test_acc = evaluate(plain, test_loader, device, world_size)
        if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
            raise FloatingPointError(
                f"training diverged at epoch {epoch} (loss {train_loss}); lower --lr (now {args.lr})"
            )
        lr_text = f"{lr:.4f}" if lr >= 1e-3 else f"{lr:.2e}"
        log(f"epoch {epoch}/{args.epochs}  train loss {train_loss:.4f} acc {train_acc:.2f}%  "
            f"test loss {test_loss:.4f} acc {test_acc:.2f}%  lr {lr_text}  {time.time() - start:.1f} s",
            flush=True)
        _collective_call(
            lambda: utils.save_checkpoint(
                checkpoint_path, plain, dataset=args.dataset, normalization=data.normalization,
                epoch=epoch, test_accuracy=test_acc, args=dict(vars(args), world_size=world_size),
            ),
            rank == 0, world_size, device,
        )
    log(f"checkpoint saved to {checkpoint_path}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, local_rank = _env_world()
    try:
        return run(args, rank, world_size, local_rank)
    except (utils.DataError, utils.CheckpointError, FloatingPointError) as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if rank == 0:
            print("interrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
