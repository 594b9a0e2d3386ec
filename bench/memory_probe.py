"""A fresh process for bench_hvp's memory section: the library alone (no analysis script) on a
synthetic Hessian set of any size, with the library's default memory choices.

    python -m bench.memory_probe --checkpoint checkpoints/net.pkl --samples 20000

Generates ``--samples`` synthetic train images (``SyntheticCIFAR(train=True, size=N)``: the
analysis script can only load the 5,000 of the standard synthetic set), builds the Hessian
operator with its defaults (graphs kept only within the budget), prints the same "HVP: ..."
line the script prints about what is resident, and runs ``--steps`` Lanczos steps for the top
eigenvalue. The caller measures the peak resident memory of this process.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from problems import load_checkpoint
from pyhessian_dist import HessianOperator, lanczos_eigenpairs
from support.datasets import SyntheticCIFAR, get_datasets, hessian_subset, shard_batches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--mini-batch", type=int, default=200)
    p.add_argument("--steps", type=int, default=4, help="Lanczos steps (top-1)")
    p.add_argument("--dataset", default="synthetic", choices=("synthetic",))
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    model, meta = load_checkpoint(args.checkpoint)
    plain = get_datasets("synthetic", normalization=meta.get("normalization")).train_eval
    data = SyntheticCIFAR(train=True, transform=plain.transform, size=args.samples)
    idx = hessian_subset(data, args.samples, args.seed)
    batches, _ = shard_batches(data, idx, args.mini_batch)
    print(f"data: {args.samples} synthetic samples in {len(batches)} mini-batches, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    op = HessianOperator(model, nn.CrossEntropyLoss(), batches)
    print(f"loss {op.loss():.6g}; set-up {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"HVP: {op.hvp_mode}; {op.describe_memory()}", flush=True)
    res = lanczos_eigenpairs(op, 1, max_steps=max(2, args.steps), tol=1e-3,
                             generator=torch.Generator().manual_seed(1))
    print(f"top eigenvalue after {res.num_matvecs} products: {res.eigenvalues[0]:.6g}; "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
