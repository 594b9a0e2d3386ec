"""Hessian analysis of a trained network: top eigenvalues, trace, spectral density, and more.

    python example_pyhessian_analysis.py --resume CKPT --device_count N \
        --eigenvalue --trace --density
    python example_pyhessian_analysis.py --problem my_problem.py [--resume CKPT] --eigenvalue
    python example_pyhessian_analysis.py --resume CKPT --curvature hessian,ggn --eigenvalue

Read top to bottom: parse -> validate once (one `error:` line and exit 2 for anything the user
can fix, before any worker starts) -> launch (N == 1: this process; N > 1: spawned workers;
under torchrun: this process is one rank of a multi-node job) -> on every rank: build the
problem's model and this rank's shard of its data once, then for each --curvature (the
Hessian, the generalized Gauss-Newton matrix, the empirical Fisher) build its operator and run
the requested analyses (analyses/) -> rank 0 prints and writes results.json and the figures
into --output-dir as one set. What is analysed is a problem (problems/): the built-in image
classifier of a checkpoint, or your own model, data and loss in one file (--problem).
"""
from __future__ import annotations

import os
import time

# OpenMP threads that spin while waiting make products 10-30x slower on a machine whose cores
# are shared with other processes (measured: bench/ "threads"); sleeping costs nothing on a
# quiet one. Set before torch is imported; an OMP_WAIT_POLICY already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if __name__ == "__main__":  # a cancel while importing: one line, not a traceback
    FIRST_STATEMENT = time.time()  # the timings' zero if this process was exec'd from another
    from support.cancel import exit_on_cancel_while_starting

    exit_on_cancel_while_starting()
else:
    FIRST_STATEMENT = None

import sys
from dataclasses import dataclass

import torch

import pyhessian_dist
import utils
from analyses import REGISTRY, Context, ModelFacts, sampling, selected
from problems import (
    BUILTIN_FLAGS,
    analysis_problem,
    build_model,
    check_curvatures,
    check_problem,
)
from pyhessian_dist import CURVATURES
from pyhessian_dist.distributed import launched_by_torchrun, print0
from pyhessian_dist.groups import GROUPINGS


# ---------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = utils.ArgumentParser(description="Hessian analysis of a trained ResNet, or of your own "
                             "model, data and loss (--problem).",
                             formatter_class=utils.HelpFormatter)
    # the original's flags (the boolean ones mean what they say; see the README)
    p.add_argument("--mini-hessian-batch-size", type=utils.positive_int, default=200,
                   help="samples per mini-batch (one forward/backward pass)")
    p.add_argument("--hessian-batch-size", type=utils.positive_int, default=200,
                   help="samples in the Hessian data set (chosen from the train split by --seed)")
    p.add_argument("--seed", type=utils.seed, default=1,
                   help="seed for the sample choice and probes (0 to 2**32 - 1)")
    utils.add_bool_flag(p, "batch-norm", None, "model has BatchNorm (default: the checkpoint's)")
    utils.add_bool_flag(p, "residual", None, "model has residual connections (default: the "
                        "checkpoint's)")
    utils.add_bool_flag(p, "cuda", True, "use GPUs (falls back to CPU with a warning)")
    p.add_argument("--resume", default=None,
                   help="checkpoint to analyse: ours, the original's, or (with --problem) a "
                        "plain state_dict of your model")
    p.add_argument("--ip", default="127.0.0.1", help="address of rank 0 for the spawned workers")
    p.add_argument("--device_count", type=utils.positive_int, default=None,
                   help="processes: GPUs with --cuda (default: all visible), else CPU workers "
                        "(default 1), threads split evenly")
    # the analyses: each adds its flag and options (analyses/)
    for analysis in REGISTRY:
        analysis.add_arguments(p)
    add_shared_options(p)
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be between 0 and 65535, got {args.port}")
    if args.mini_hessian_batch_size > args.hessian_batch_size:
        p.error(f"--mini-hessian-batch-size {args.mini_hessian_batch_size} is larger than "
                f"--hessian-batch-size {args.hessian_batch_size}; make it at most that")
    if not any(a.requested(args) for a in REGISTRY):
        p.error("nothing to compute: pass at least one of "
                + ", ".join(a.flag for a in REGISTRY))
    return args


def add_shared_options(p):
    """Ours, shared by the analyses: budgets, what is analysed, launch, data and outputs."""
    p.add_argument("--max-iter", type=utils.positive_int, default=100,
                   help="most products: per eigenvalue (power), in all (lanczos), probes (trace)")
    p.add_argument("--tol", type=utils.positive_float, default=1e-3,
                   help="relative tolerance: eigenvalue error bound (lanczos), relative change "
                        "(power; trace with --trace-rse 0)")
    p.add_argument("--group-by", choices=GROUPINGS, default="module",
                   help="parameter groups of --per-layer and of --diagonal's summary: each "
                        "module with parameters, each stage (stem, residual stages, head), or "
                        "each parameter tensor")
    p.add_argument("--port", type=int, default=29500,
                   help="TCP port of rank 0 for spawned workers; 0 picks a free one")
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="process-group backend (auto: nccl on CUDA, gloo on CPU)")
    _add_problem_flags(p)
    p.add_argument("--output-dir", default=".", help="where results.json and the figures go")
    p.add_argument("--keep-partial-outputs", action="store_true",
                   help="when a figure or file cannot be written (a full disk, a figure that "
                        "fails), write the others and replace the earlier run's files with "
                        "them (default: the run fails and the earlier files stay as they were)")
    p.add_argument("--curvature", type=utils.curvature_list, default=["hessian"],
                   metavar="NAME[,NAME...]",
                   help="what every analysis analyses: hessian (the loss Hessian), ggn (the "
                        "generalized Gauss-Newton matrix), ef (the empirical Fisher); several, "
                        "comma-separated, run the analyses for each on one data load, side by "
                        "side")
    p.add_argument("--reuse-graph", choices=("auto", "on", "off"), default="auto",
                   help="keep what products reuse (the Hessian's first-order graphs, the GGN's "
                        "output graphs, the empirical Fisher's per-sample gradients) across "
                        "products (auto: as many mini-batches as fit)")
    p.add_argument("--hvp-mode", choices=pyhessian_dist.HVP_MODES, default="double_backward",
                   help="how a Hessian-vector product is computed")
    utils.add_bool_flag(p, "tf32", False, "allow TF32 on GPUs (faster, ~1e-3 relative error)")
    sampling.add_option(p)  # --sampling-error G (analyses/sampling.py)


def _add_problem_flags(p):
    """The flags that say what is analysed: the data set, the model, a problem file."""
    p.add_argument("--dataset", choices=utils.DATASET_CHOICES, default=None,
                   help="data set (default: the checkpoint's; cifar10 for original checkpoints)")
    p.add_argument("--data-dir", default=None,
                   help="where the data set lives / downloads to (default: data); a GPT's text "
                        "file (default: the one the checkpoint was trained on)")
    p.add_argument("--block-size", type=utils.positive_int, default=None,
                   help="GPT: tokens per sample, at most the model's context (default: the "
                        "checkpoint's)")
    p.add_argument("--image-size", type=utils.positive_int, default=None,
                   help="imagefolder: resize images to N x N (default: the checkpoint's, 32)")
    p.add_argument("--model", default=None, metavar="MODULE:CALLABLE",
                   help="your model: a callable returning an nn.Module, e.g. "
                        "torchvision.models:resnet18, or gpt (the built-in language model) "
                        "(default: the checkpoint's model)")
    p.add_argument("--problem", default=None, metavar="FILE.py",
                   help="your own problem: a file defining model() and dataset(split), and "
                        "optionally forward(model, batch) and loss(outputs, batch); without "
                        "--resume the model is analysed as model() builds it (default: the "
                        "checkpoint's problem)")


# ---------------------------------------------------------------------------- validate once
@dataclass
class Plan:
    problem: object      # problems.Problem: the model, its data, forward and loss
    meta: dict           # the checkpoint's record (epoch, accuracy, path, ...), if any
    nprocs: int
    cuda: bool
    started: float       # time.time() at the launching process's start (the timings' zero)


def given_flags(args) -> list[str]:
    """The built-in problem's flags given on the command line (their defaults are None)."""
    return [dest for dest in BUILTIN_FLAGS if getattr(args, dest, None) is not None]


def load_problem(args, download=False):
    """(problem, model with the checkpoint's weights on the CPU, meta, notes)."""
    problem, state_dict, meta, notes = analysis_problem(args, given_flags(args), download)
    return problem, build_model(problem, state_dict, args.resume), meta, notes


def validate(args) -> Plan:
    """Everything checkable before a worker starts; raises UserError (one line, exit 2)."""
    analyses = selected(args)
    for analysis in analyses:
        analysis.check(args, analyses)
    sampling.check(args, analyses)
    earlier = utils.check_output_dir(args.output_dir, utils.output_files(REGISTRY, CURVATURES))
    stale = utils.remove_stale_staging(args.output_dir)
    if stale:
        print(f"note: removed {len(stale)} staging folder(s) that ended runs left in "
              f"{args.output_dir}", file=sys.stderr)
    rank0 = not launched_by_torchrun() or os.environ.get("RANK") == "0"
    problem, model, meta, notes = load_problem(args, download=rank0)
    for line in notes:
        print(line, file=sys.stderr)
    facts = ModelFacts(num_trainable=sum(p.numel() for p in model.parameters()
                                         if p.requires_grad))
    for analysis in analyses:
        analysis.check_model(args, analyses, facts)
    if rank0:  # the data, and the loss of a first batch at these weights
        check_problem(problem, model)
        indices = utils.hessian_subset(problem.dataset("train"), args.hessian_batch_size,
                                       args.seed)
        check_curvatures(problem, model, args.curvature, indices[:4])
    gpus = torch.cuda.device_count() if args.cuda else 0
    if args.cuda and gpus == 0:
        print("warning: --cuda requested but no GPU is available; running on CPU",
              file=sys.stderr)
    n = args.device_count or (gpus if gpus else 1)
    if gpus and n > gpus:
        raise utils.UserError(f"--device_count {n} but only {gpus} GPU(s) are visible; pass "
                              f"--device_count {gpus} or less, or --no-cuda for CPU workers")
    if not gpus and not launched_by_torchrun():
        warning = utils.check_cpu_workers(n)
        if warning:
            print(warning, file=sys.stderr)
    if earlier:
        print0(f"output: {args.output_dir} (at the end this run's files replace the earlier "
               f"run's {', '.join(earlier)})")
    return Plan(problem=problem, meta=meta, nprocs=n, cuda=bool(gpus),
                started=utils.process_start_time(FIRST_STATEMENT))


# ---------------------------------------------------------------------------- every rank
def load_model(args, plan, worker):
    """The problem's model with the checkpoint's weights, on this rank's device; rank 0's
    weights on every rank (a model() that initialises at random without a seed of its own
    still gives one model)."""
    state_dict = utils.read_checkpoint(args.resume, args.model)[0] if args.resume else None
    model = build_model(plan.problem, state_dict, args.resume).to(worker.device)
    utils.broadcast_module(worker, model)
    return model


def load_shard(args, problem, worker):
    """This rank's mini-batches of the Hessian samples, kept on the host (the operator moves
    them as memory allows), and the number of mini-batches in all."""
    train = problem.dataset("train")
    indices = utils.hessian_subset(train, args.hessian_batch_size, args.seed)
    utils.check_same_data(worker, train, indices, problem.label)
    return utils.shard_batches(train, indices, args.mini_hessian_batch_size, worker.rank,
                               worker.world_size, problem.collate)


# what each curvature is, for the heading and the set-up line of its operator
TITLES = {"hessian": "the loss Hessian H",
          "ggn": "the generalized Gauss-Newton matrix G = (1/N) sum_b n_b J_b^T H_L,b J_b",
          "ef": "the empirical Fisher F = (1/N) sum_i g_i g_i^T (per-sample gradients)"}
BUILDING = {"hessian": "the Hessian operator (one forward/backward pass over the samples)",
            "ggn": "the GGN operator (one forward and two backward passes over the samples)",
            "ef": "the empirical Fisher operator (per-sample gradients of the samples)"}


def build_operator(args, name, problem, model, batches, worker):
    reuse = {"auto": "auto", "on": True, "off": False}[args.reuse_graph]
    options = {"hessian": {"reuse_graph": reuse, "hvp_mode": args.hvp_mode},
               "ggn": {"reuse_graph": reuse}, "ef": {"keep_gradients": reuse}}[name]
    try:
        op = CURVATURES[name](model, batches=batches, forward=problem.forward,
                              loss=problem.loss, device=worker.device,
                              local_processes=worker.local_world_size, **options)
    except (FloatingPointError, ValueError) as exc:  # the same on every rank
        raise utils.DataError(f"{exc} ({problem.label})") from None
    g = op.gradient()  # all-reduced: the same on every rank
    if not torch.isfinite(g).all():
        bad = int((~torch.isfinite(g)).sum())
        raise utils.DataError(f"{bad} of the {g.numel():,} gradient components of the loss at "
                              f"these weights are not finite in {op.dtype} (the loss is "
                              f"{op.loss():.4g}), so the products would be too; "
                              f"check the weights ({problem.label})")
    return op


def run_curvature(args, name, problem, model, batches, ctx, setup):
    """Build one curvature's operator and run every selected analysis on it; ``setup`` holds
    the data record and the start time, and says whether the set-up lines were printed."""
    tagged = args.curvature != ["hessian"]  # the Hessian alone prints as it always has
    if tagged:
        print0(f"=== {name}: {TITLES[name]} ===")
    print0(f"building {BUILDING[name]}...")
    t0 = time.perf_counter()
    op = utils.agree(ctx, lambda: build_operator(args, name, problem, model, batches, ctx))
    setup["timings"]["setup_pass"] += time.perf_counter() - t0
    if "data" not in setup:
        setup["data"] = {
            "dataset": problem.data_name, "split": problem.hessian_split,
            "num_samples": op.num_samples, "num_mini_batches": setup["num_batches"],
            "mini_batch_size": args.mini_hessian_batch_size,
            "samples_per_rank": utils.gather_objects(ctx, op.local_num_samples),
            "normalization": problem.record().get("normalization"), "seed": args.seed,
            "loss": problem.loss_description}
        lines = utils.describe_setup(op, setup["data"], ctx, time.perf_counter() - setup["t"])
    else:  # the data, launch and loss lines were printed for the first curvature
        lines = [f"{op.describe_product()}; {op.describe_memory()}; set-up "
                 f"{time.perf_counter() - t0:.1f} s"]
    for line in lines:
        print0(line)
    actx = Context(args=args, op=op, model=model, worker=ctx, problem=problem, curvature=name,
                   tag=name if tagged else "")
    for analysis in selected(args):
        actx.results[analysis.name] = actx.timed(analysis, lambda a=analysis: a.run(actx))
        setup["timings"]["products"] += actx.costs[analysis.name]["seconds"]
        for i, line in enumerate(analysis.summary(actx.results[analysis.name], actx)):
            print0(f"[{name}] {line}" if tagged and i == 0 else line)
    actx.operator_stats = op.stats()
    if len(args.curvature) > 1:
        op.release()  # its graphs or gradients: the next curvature gets the memory
    return actx


def worker(ctx, args, plan):
    """One rank: load once, then per curvature build its operator and run the analyses; rank 0
    writes."""
    t_start = time.perf_counter()
    timings = {"process_start": plan.started, "startup": time.time() - plan.started,
               "data": None, "setup_pass": 0.0, "products": 0.0, "writing": None}
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # products stay float32 unless asked
    torch.backends.cudnn.allow_tf32 = args.tf32
    problem = plan.problem
    print0(f"loading the model and {args.hessian_batch_size} samples "
           f"({args.mini_hessian_batch_size} per mini-batch) on {ctx.world_size} rank(s)...")
    model = utils.agree(ctx, lambda: load_model(args, plan, ctx))
    batches, num_batches = utils.agree(ctx, lambda: load_shard(args, problem, ctx))
    if num_batches < ctx.world_size:
        print0(f"warning: {num_batches} mini-batches for {ctx.world_size} ranks: "
               f"{ctx.world_size - num_batches} ranks hold no data; lower "
               "--mini-hessian-batch-size to use them")
    timings["data"] = time.perf_counter() - t_start
    setup = {"t": t_start, "num_batches": num_batches, "timings": timings}
    ctxs = {name: run_curvature(args, name, problem, model, batches, ctx, setup)
            for name in args.curvature}
    if ctx.rank == 0:
        write_results(args, plan, model, setup["data"], ctxs, ctx, t_start, timings)


def write_results(args, plan, model, data, ctxs, ctx, t_start, timings):
    """Rank 0: the side-by-side lines (several curvatures), results.json and every file, then
    the timing line (the phases of ``timings``, also in results.json)."""
    t_writing = time.perf_counter()
    meta, problem = plan.meta, plan.problem
    op = next(iter(ctxs.values())).op
    analyses = selected(args)
    model_info = {"description": problem.describe(), "problem": problem.record(),
                  "arch": meta.get("arch"),
                  "num_parameters": utils.count_parameters(model), "num_trainable": op.dim,
                  "checkpoint": {k: meta.get(k) for k in (
                      "path", "source", "epoch", "test_accuracy")}}
    record = utils.run_record(args, ctx, op, model_info, data, analyses, ctxs, t_start)
    record["timings"] = timings
    if len(ctxs) > 1:
        for line in utils.side_by_side(record):
            print0(line)
    note = f"this run's files had already been written to {args.output_dir}"
    written, removed, warnings = utils.write_outputs(
        args, record, analyses, ctxs, utils.output_files(REGISTRY, CURVATURES),
        on_commit=lambda: ctx.committed(note), writing_since=t_writing)
    for line in warnings:
        print0(line)
    print0("wrote " + ", ".join(written)
           + (f"; removed {', '.join(removed)} of an earlier run" if removed else ""))
    print0(utils.timings_line(timings))


# ---------------------------------------------------------------------------- main
def analyse(args):
    # a run that fails or is cancelled leaves no empty folder it made, and no staging folder
    with utils.removed_if_left_empty(args.output_dir, args.data_dir):
        plan = validate(args)
        print0(f"pyhessian-dist {pyhessian_dist.__version__} | {plan.problem.describe()} | "
               f"{args.resume or 'as model() builds it'}")
        try:
            utils.launch(worker, (args, plan), nprocs=plan.nprocs, cuda=plan.cuda,
                         backend=args.backend, ip=args.ip, port=args.port)
        finally:
            utils.remove_stale_staging(args.output_dir, own=True)


def main(argv=None):
    args = parse_args(argv)
    return utils.run_main(lambda: analyse(args), what="the analysis")


if __name__ == "__main__":
    status = main()
    utils.ignore_cancels_from_now()  # the run is over: Python's shutdown is not cancelled
    sys.exit(status)
