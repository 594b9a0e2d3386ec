"""The PyHessian side of bench_peers' whole-process comparison: what a PyHessian user runs to
get the top eigenvalue(s) of the same model on the same samples.

    python -m bench.pyhessian_script --checkpoint checkpoints/net.pkl --samples 1000 \\
        --mini-batch 200 --top-n 1

Loads the checkpoint, takes the same samples as ``example_pyhessian_analysis.py
--hessian-batch-size N --seed 1`` (the un-augmented train split, ``hessian_subset``), cuts them
into mini-batches of ``--mini-batch`` and calls ``pyhessian.hessian(model, criterion,
dataloader=batches, cuda=False).eigenvalues(top_n=K)`` with PyHessian's defaults (maxIter=100,
tol=1e-3). Prints a line "computing" just before the first product and a last line
``RESULT {json}`` with the eigenvalues and the number of products.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

from problems import load_checkpoint
from support.datasets import get_datasets, hessian_subset, shard_batches


def main(argv=None):
    t0 = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--mini-batch", type=int, default=200)
    p.add_argument("--top-n", type=int, default=1)
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    from pyhessian import hessian

    model, meta = load_checkpoint(args.checkpoint)
    bundle = get_datasets(args.dataset or meta.get("dataset") or "cifar10", args.data_dir,
                          normalization=meta.get("normalization"), download=False)
    idx = hessian_subset(bundle.train_eval, args.samples, args.seed)
    batches, _ = shard_batches(bundle.train_eval, idx, args.mini_batch)
    h = hessian(model, nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
    count = [0]
    product = h.dataloader_hv_product

    def counted(v):  # counts full-data products; computes the same thing
        count[0] += 1
        return product(v)

    h.dataloader_hv_product = counted
    print(f"computing ({time.perf_counter() - t0:.1f} s after start)", flush=True)
    torch.manual_seed(args.seed)
    values, _ = h.eigenvalues(top_n=args.top_n)
    print("RESULT " + json.dumps({"eigenvalues": [float(v) for v in values],
                                  "num_matvecs": count[0],
                                  "seconds_in_script": time.perf_counter() - t0}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
