"""A fresh process for bench_hvp's threads section: one gradient and one HVP (graphs kept) at
1 and at 2 (or --max-threads) torch threads, timed in turn, under whatever OpenMP environment
the caller set (OMP_WAIT_POLICY must be set before torch starts, hence a fresh process).

    OMP_WAIT_POLICY=PASSIVE python -m bench.threads_probe --checkpoint checkpoints/net.pkl

Prints ``RESULT {json}``: per thread count, the median / all seconds of each kind.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from bench.common import CE, generator, load_problem, time_interleaved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--mini-batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    problem = load_problem(args)
    op = problem.operator(reuse_graph=True)
    model = problem.model_copy()
    params = [q for q in model.parameters() if q.requires_grad]
    n = sum(len(y) for _x, y in problem.batches)
    v = torch.randn(op.dim, generator=generator(0))

    def gradient():
        for x, y in problem.batches:
            torch.autograd.grad(CE(model(x), y) * (len(y) / n), params)

    def at(threads, fn):
        def call():
            torch.set_num_threads(threads)
            fn()
        return call

    counts = sorted({1, max(1, args.max_threads)})
    fns = {}
    for t in counts:
        fns[f"hvp_{t}"] = at(t, lambda: op.matvec(v))
        fns[f"gradient_{t}"] = at(t, gradient)
    times = time_interleaved(fns, args.repeats)
    print("RESULT " + json.dumps({"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                                  "times": times}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
