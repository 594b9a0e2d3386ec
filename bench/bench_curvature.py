"""Curvature products: seconds per product of the GGN and of the empirical Fisher next to an HVP
and a gradient, ours and curvlinops' (``GGNLinearOperator``, ``EFLinearOperator``,
``HessianLinearOperator``) on the same model and the same mini-batches.

    python -m bench.bench_curvature --checkpoint checkpoints/net.pkl --samples 200 \\
        --mini-batch 100 --repeats 5 --larger resnet56

Sections (``--sections``): ``model`` (the checkpoint's network, e.g. the README's ResNet20) and
``larger`` (a deeper CIFAR ResNet, ``--larger resnet56``, randomly initialised from
``--larger-seed`` and in eval mode: seconds per product do not depend on the weights' values;
the record says so). In each, every product is one call over all the samples (their
mini-batches summed), for one vector, timed interleaved (a, b, c, a, b, c, ...) so that the
machine's changing load hits all alike; medians of ``--repeats`` calls after one warm-up call.

* gradient: forward + backward of the mean loss (plain autograd), what "x gradients" counts in;
* ours: ``HessianOperator`` (first-order graphs kept, the default), ``GGNOperator`` (graphs
  kept, the default; and recomputed per product), ``EmpiricalFisherOperator`` (per-sample
  gradients kept, the default; and recomputed per product), each with its set-up seconds (the
  constructor: the first-order pass, and for the EF the per-sample gradients);
* curvlinops 3.0.1 (``pip install -r bench/requirements.txt``; left out when absent): the same
  three products (each recomputes per product; ``check_deterministic=False``, its set-up timed
  the same way), and the largest relative difference between its products and ours (the same
  matrices: a difference at round-off level).

The record is ``--out`` (default ``bench/results-curvature-cpu.json``), rewritten after each
section; a markdown table goes to stdout. On a machine whose cores are shared with other jobs
pass ``--threads 1`` (with ``OMP_WAIT_POLICY=PASSIVE``): two OpenMP threads competing with
other processes made every product several times slower and the ratios noise (measured: a
gradient of 100 ResNet20 samples took 2.4-2.7 s on 2 threads under a load of 5-8, against
0.31 s for 50 samples on one thread).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

from bench.common import (
    CE,
    Problem,
    Record,
    add_problem_arguments,
    environment,
    generator,
    load_problem,
    say,
    sections,
    time_interleaved,
    timed,
)
from pyhessian_dist import EmpiricalFisherOperator, GGNOperator, HessianOperator

SECTIONS = ("model", "larger")
OURS = {"HVP": (HessianOperator, {}),
        "GGN": (GGNOperator, {}),
        "GGN, recomputed": (GGNOperator, {"reuse_graph": False}),
        "EF": (EmpiricalFisherOperator, {}),
        "EF, recomputed": (EmpiricalFisherOperator, {"keep_gradients": False})}
PEERS = {"HVP": "HessianLinearOperator", "GGN": "GGNLinearOperator", "EF": "EFLinearOperator"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_problem_arguments(p, samples=200, mini_batch=100)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per product (median)")
    p.add_argument("--larger", default="resnet56",
                   help="the larger model: resnetN (a CIFAR ResNet of depth N, 6n+2)")
    p.add_argument("--larger-seed", type=int, default=0, help="its initialisation")
    p.add_argument("--skip-peer", action="store_true", help="leave curvlinops out")
    p.add_argument("--out", default=os.path.join("bench", "results-curvature-cpu.json"))
    return p.parse_args(argv)


def larger_problem(args, problem: Problem) -> Problem:
    """The same samples on a deeper ResNet (random weights, BN running statistics at their
    initial values, eval mode)."""
    from models.resnet import resnet

    depth = int(args.larger.removeprefix("resnet"))
    torch.manual_seed(args.larger_seed)
    model = resnet(depth=depth).eval()
    meta = {"arch": {"name": "resnet", "depth": depth}, "source": "random initialisation",
            "seed": args.larger_seed}
    return Problem(model, problem.batches, meta, problem.dataset, f"ResNet{depth} (random)",
                   problem.samples, problem.mini_batch, problem.seed,
                   ["random weights: seconds per product do not depend on their values"])


def _gradient(problem: Problem):
    """One gradient of the mean loss over every mini-batch (plain autograd)."""
    model = problem.model_copy()
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(len(y) for _x, y in problem.batches)

    def gradient():
        for x, y in problem.batches:
            torch.autograd.grad(CE(model(x), y) * (len(y) / n), params)

    return gradient


def _peers(problem: Problem, skip: bool) -> dict:
    """curvlinops' operators on copies of the model: name -> (operator, set-up seconds)."""
    if skip:
        return {}
    try:
        import curvlinops
    except ImportError:
        say("curvlinops is not installed (pip install -r bench/requirements.txt): left out")
        return {}
    out = {}
    for name, cls in PEERS.items():
        model = problem.model_copy()
        params = [p for p in model.parameters() if p.requires_grad]
        out[name] = timed(lambda cls=cls, model=model, params=params: getattr(curvlinops, cls)(
            model, CE, params, problem.batches, check_deterministic=False))
    return out


def bench_model(args, problem: Problem) -> dict:
    """Every product of one model, interleaved; ratios to our HVP and to the gradient."""
    ours = {name: timed(lambda cls=cls, kw=kw: cls(problem.model_copy(), CE, problem.batches,
                                                   **kw))
            for name, (cls, kw) in OURS.items()}
    peers = _peers(problem, args.skip_peer)
    v = torch.randn(problem.dim, generator=generator(0))
    fns = {"gradient": _gradient(problem)}
    fns.update({f"ours {k}": (lambda op=op: op.matvec(v)) for k, (op, _s) in ours.items()})
    fns.update({f"curvlinops {k}": (lambda op=op: op @ v) for k, (op, _s) in peers.items()})
    say(f"{problem.checkpoint}: {problem.dim:,} parameters; timing {', '.join(fns)}")
    times = time_interleaved(fns, args.repeats)
    grad_s, hvp_s = times["gradient"]["median_s"], times["ours HVP"]["median_s"]
    rows = {}
    for key, t in times.items():
        rows[key] = {**t, "per_gradient": t["median_s"] / grad_s,
                     "per_our_hvp": t["median_s"] / hvp_s}
        say(f"  {key:<26} {t['median_s']:8.3f} s  {rows[key]['per_gradient']:5.2f} gradients  "
            f"{rows[key]['per_our_hvp']:5.2f} of our HVP")
    for k, (op, setup_s) in ours.items():
        rows[f"ours {k}"].update(setup_s=setup_s, memory=op.describe_memory())
    for k, (op, setup_s) in peers.items():
        ref = ours[k][0].matvec(v).double()
        diff = float((op @ v).double().sub(ref).norm() / ref.norm())
        rows[f"curvlinops {k}"].update(setup_s=setup_s, relative_difference_to_ours=diff)
        say(f"  curvlinops {k}: relative difference to ours {diff:.1e}")
    return {"model": problem.checkpoint, "num_parameters": problem.dim,
            "notes": problem.notes, "load_average_after": list(os.getloadavg()),
            "products": rows}


def table(rec) -> str:
    """A markdown table of every section's products."""
    lines = ["| model | product | seconds (median) | gradients | of our HVP | set-up s |",
             "|---|---|---|---|---|---|"]
    for name in SECTIONS:
        sec = rec.get(name)
        if not sec or "products" not in sec:
            continue
        label = f"{sec['model']} ({sec['num_parameters']:,})"
        for key, r in sec["products"].items():
            setup = f"{r['setup_s']:.1f}" if "setup_s" in r else ""
            lines.append(f"| {label} | {key} | {r['median_s']:.3f} | {r['per_gradient']:.2f} | "
                         f"{r['per_our_hvp']:.2f} | {setup} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    todo = sections(args, SECTIONS)
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = load_problem(args)
    record = Record(args.out, {"benchmark": "bench_curvature", "args": vars(args),
                               "environment": environment(), "problem": problem.describe()})
    say(f"bench_curvature: {args.samples} {problem.dataset} samples in mini-batches of "
        f"{args.mini_batch}, {torch.get_num_threads()} threads; sections {', '.join(todo)}")
    run = {"model": lambda: bench_model(args, problem),
           "larger": lambda: bench_model(args, larger_problem(args, copy.copy(problem)))}
    for name in todo:
        record.section(name, run[name])
    print(table(record.data), flush=True)
    say(f"wrote {args.out}")
    return 1 if record.data["sections_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
