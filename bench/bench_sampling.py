"""Validation of the sampling error (``--sampling-error``) where the truth is known: many
disjoint samples of the same size from one larger data set.

    python -m bench.bench_sampling --checkpoint checkpoints/net.pkl --draws 12 --samples 200 \\
        --mini-batch 20 --groups 10 --large 1000 --threads 1

The training split (the synthetic set's 5,000 images, or any data set the checkpoint names) is
shuffled once (``--seed``) and cut into ``--draws`` disjoint samples of ``--samples`` images and,
after them, one disjoint ``--large`` sample. On each small sample: lambda_1 (Lanczos, ``--tol``)
with its jackknife over ``--groups`` groups of mini-batches (standard error and bias), and the
trace (plain Hutchinson, ``--probes`` probes, the SAME probes on every sample, so the spread
across samples is the data's share, which is what the jackknife with fixed probes estimates)
with its jackknife. On the large sample: lambda_1. Reported ratios:

* spread: the standard deviation of lambda_1 (of the trace) across the draws over the mean
  reported sampling s.e. (1 when the s.e. is right; its own noise is about 1/sqrt(2(R-1)));
* bias: the mean of lambda_1(small) - lambda_1(large) over the mean reported bias times
  (1 - n/N_large) (a bias a/n on both samples leaves a/n - a/N_large), with a standard error.

The record goes to ``--out`` (default ``bench/results-sampling-cpu.json``), rewritten after
every draw, with the per-draw numbers, products and seconds, and the machine's load.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from bench.common import CE, environment, generator, say
from problems import load_checkpoint
from pyhessian_dist import (
    HessianOperator,
    eigenvalue_sampling_error,
    hutchinson_trace,
    lanczos_eigenpairs,
)
from pyhessian_dist.results import json_safe
from support.datasets import get_datasets, shard_batches
from support.files import atomic_write_bytes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=os.path.join("checkpoints", "net.pkl"))
    p.add_argument("--dataset", default=None, help="default: the checkpoint's, else synthetic")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--draws", type=int, default=12, help="disjoint small samples")
    p.add_argument("--samples", type=int, default=200, help="images per small sample")
    p.add_argument("--mini-batch", type=int, default=20)
    p.add_argument("--groups", type=int, default=10, help="jackknife groups of mini-batches")
    p.add_argument("--large", type=int, default=1000, help="images of the large sample (0: none)")
    p.add_argument("--probes", type=int, default=10, help="Hutchinson probes of the trace")
    p.add_argument("--tol", type=float, default=1e-3, help="Lanczos tolerance of lambda_1")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join("bench", "results-sampling-cpu.json"))
    return p.parse_args(argv)


def samples(args):
    """(model, dataset name, the draws' batches, the large sample's batches or None)."""
    model, meta = load_checkpoint(args.checkpoint)
    name = args.dataset or meta.get("dataset") or "synthetic"
    data = get_datasets(name, args.data_dir, normalization=meta.get("normalization"),
                        download=False).train_eval
    need = args.draws * args.samples + args.large
    if need > len(data):
        raise SystemExit(f"error: {args.draws} x {args.samples} + {args.large} images exceed "
                         f"the {len(data)} of the training split; lower --draws or --large")
    order = torch.randperm(len(data), generator=generator(args.seed)).tolist()
    cut = [order[i * args.samples:(i + 1) * args.samples] for i in range(args.draws)]
    draws = [shard_batches(data, idx, args.mini_batch)[0] for idx in cut]
    rest = order[args.draws * args.samples:need]
    large = shard_batches(data, rest, args.mini_batch)[0] if args.large else None
    return model.eval(), name, draws, large


def one_draw(model, batches, args, r):
    """lambda_1 and the trace of one small sample, each with its jackknife."""
    t0 = time.perf_counter()
    op = HessianOperator(model, CE, batches)
    e = lanczos_eigenpairs(op, 1, tol=args.tol, generator=generator(100 + r))
    n_eig = op.num_matvecs
    s = eigenvalue_sampling_error(op, e, args.groups, generator=generator(200 + r))
    t = hutchinson_trace(op, max_iter=args.probes, tol=0.0, block_size=args.probes,
                         sampling_groups=args.groups, generator=generator(7))  # same probes
    return {"lambda_1": e.eigenvalues[0], "lanczos_bound": e.error_bounds[0],
            "lambda_products": n_eig, "sampling_stderr": s.stderr[0],
            "sampling_bias": s.bias[0], "jackknife_products": s.num_matvecs,
            "jackknife_converged": s.converged, "replicate_bound": s.replicate_error_bound,
            "trace": t.trace, "trace_probe_stderr": t.stderr,
            "trace_sampling_stderr": t.sampling.stderr[0], "trace_products": t.num_matvecs,
            "seconds": time.perf_counter() - t0}


def ratios(rows, large_lambda, args) -> dict:
    """Spread across the draws over the mean reported s.e.; bias against the large sample."""
    R = len(rows)
    lam = torch.tensor([r["lambda_1"] for r in rows], dtype=torch.float64)
    tr = torch.tensor([r["trace"] for r in rows], dtype=torch.float64)
    se = sum(r["sampling_stderr"] for r in rows) / R
    tse = sum(r["trace_sampling_stderr"] for r in rows) / R
    out = {"draws": R, "lambda_1_mean": float(lam.mean()), "lambda_1_sd": float(lam.std()),
           "lambda_1_mean_stderr": se, "lambda_1_spread_ratio": float(lam.std()) / se,
           "trace_mean": float(tr.mean()), "trace_sd": float(tr.std()),
           "trace_mean_stderr": tse, "trace_spread_ratio": float(tr.std()) / tse,
           "ratio_noise": 1 / math.sqrt(2 * (R - 1))}
    if large_lambda is not None:
        bias = torch.tensor([r["sampling_bias"] for r in rows], dtype=torch.float64)
        predicted = float(bias.mean()) * (1 - args.samples / args.large)
        diff = float(lam.mean()) - large_lambda
        out.update({"lambda_1_large": large_lambda, "observed_difference": diff,
                    "observed_difference_stderr": float(lam.std()) / math.sqrt(R),
                    "mean_reported_bias": float(bias.mean()),
                    "predicted_difference": predicted,
                    "bias_ratio": diff / predicted if predicted else None})
    return out


def write(args, record) -> None:
    atomic_write_bytes(args.out, (json.dumps(json_safe(record), indent=1) + "\n").encode())


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, name, draws, large = samples(args)
    record = {"benchmark": "sampling", "command": vars(args), "dataset": name,
              "environment": environment(), "load_before": os.getloadavg(), "draws": []}
    for r, batches in enumerate(draws):
        row = one_draw(model, batches, args, r)
        record["draws"].append(row)
        say(f"draw {r + 1}/{len(draws)}: lambda_1 {row['lambda_1']:.5g} ± "
            f"{row['sampling_stderr']:.3g} (bias {row['sampling_bias']:+.3g}), trace "
            f"{row['trace']:.5g} ± {row['trace_sampling_stderr']:.3g}; {row['seconds']:.0f} s")
        write(args, record)
    large_lambda = None
    if large is not None:
        op = HessianOperator(model, CE, large)
        large_lambda = lanczos_eigenpairs(op, 1, tol=args.tol, generator=generator(1)) \
            .eigenvalues[0]
        say(f"large sample ({args.large}): lambda_1 {large_lambda:.5g}")
    record["summary"] = ratios(record["draws"], large_lambda, args)
    record["load_after"] = os.getloadavg()
    write(args, record)
    for k, v in record["summary"].items():
        print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")


if __name__ == "__main__":
    main()
