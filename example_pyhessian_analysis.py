"""Top eigenvalues, trace and spectral density of a trained ResNet's loss Hessian.

One process per device (GPU, or CPU worker), each holding a shard of the Hessian data; the
HVPs are all-reduced so every algorithm runs as on one big machine. Launch modes:

    python example_pyhessian_analysis.py --resume CKPT --device_count N --eigenvalue ...
        N == 1: runs in this process; N > 1: spawns N workers (tcp://--ip:--port).
    torchrun --nnodes M --nproc_per_node N example_pyhessian_analysis.py --resume CKPT ...
        no spawning; the rendezvous comes from the environment (multi-node).

Only rank 0 prints and writes files (results.json, example.pdf/.png, convergence.png).
"""
from __future__ import annotations

import json
import os
import platform
import signal
import socket
import sys
import time

import torch
import torch.multiprocessing as mp
from torch import nn

import pyhessian_dist
from pyhessian_dist import (HVP_MODES, HessianOperator, hutchinson_trace, hutchpp_trace,
                            lanczos_top_eigenpairs, power_iteration_top_eigenpairs,
                            slq_density)
from pyhessian_dist.distributed import (backend_for, cleanup, get_rank, get_world_size,
                                        launched_by_torchrun, print0, setup)
from utils import (DATASETS, ArgumentParser, CheckpointError, DataError, HelpFormatter,
                   add_bool_flag, atomic_write_bytes,
                   count_parameters, get_datasets, hessian_subset, load_checkpoint,
                   positive_float, positive_int, resolve_device, shard_batches)

FAIL_RANK_ENV = "PYHESSIAN_DIST_TEST_FAIL_RANK"  # test-only: this rank raises mid-analysis


# ---------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = ArgumentParser(
        description="Hessian analysis (top eigenvalues, trace, ESD) of a trained ResNet.",
        formatter_class=HelpFormatter)
    # the original's flags
    p.add_argument("--mini-hessian-batch-size", type=positive_int, default=200,
                   help="samples per mini-batch (per forward/backward pass)")
    p.add_argument("--hessian-batch-size", type=positive_int, default=200,
                   help="samples in the Hessian data set (chosen from the train split by --seed)")
    p.add_argument("--seed", type=int, default=1, help="seed for the sample choice and probes")
    add_bool_flag(p, "batch-norm", None, "model has BatchNorm (default: from the checkpoint; "
                  "a contradicting value is an error)")
    add_bool_flag(p, "residual", None, "model has residual connections (default: from the "
                  "checkpoint; a contradicting value is an error)")
    add_bool_flag(p, "cuda", True, "use GPUs (falls back to CPU with a warning)")
    p.add_argument("--resume", required=True, help="checkpoint to analyse (ours or the original's)")
    p.add_argument("--ip", default="127.0.0.1", help="address of rank 0 for the spawned workers")
    p.add_argument("--device_count", type=positive_int, default=None,
                   help="processes to run: GPUs with --cuda (default: all visible), else CPU "
                        "workers (default 1), threads split evenly among them")
    p.add_argument("--eigenvalue", action="store_true", help="compute the top eigenvalues")
    p.add_argument("--trace", action="store_true", help="estimate the trace")
    p.add_argument("--density", action="store_true", help="estimate the spectral density (ESD)")
    # ours
    p.add_argument("--port", type=int, default=29500,
                   help="TCP port of rank 0 for spawned workers; 0 picks a free one")
    p.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="process-group backend (auto: nccl on CUDA, gloo on CPU)")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="data set (default: the checkpoint's; cifar10 for original checkpoints)")
    p.add_argument("--data-dir", default="data", help="where the data set lives / downloads to")
    p.add_argument("--top-n", type=positive_int, default=1, help="number of top eigenpairs")
    p.add_argument("--eigen-method", choices=("lanczos", "power"), default="lanczos",
                   help="lanczos (Ritz residual stop) or power (PyHessian's rule)")
    p.add_argument("--trace-method", choices=("hutchinson", "hutchpp"), default="hutchinson",
                   help="hutchinson (PyHessian's stopping rule) or hutchpp (fixed budget of "
                        "--max-iter products)")
    p.add_argument("--max-iter", type=positive_int, default=100,
                   help="max products: per eigenvalue (power), in all (lanczos), probes "
                        "(hutchinson), budget (hutchpp)")
    p.add_argument("--tol", type=positive_float, default=1e-3,
                   help="relative tolerance: Ritz residual (lanczos) or relative change "
                        "(power, hutchinson)")
    p.add_argument("--lanczos-iter", type=positive_int, default=100,
                   help="Lanczos steps per SLQ run (density)")
    p.add_argument("--n-v", type=positive_int, default=1, help="SLQ runs (density)")
    p.add_argument("--output-dir", default=".",
                   help="where results.json, example.pdf/.png and convergence.png go")
    p.add_argument("--reuse-graph", choices=("auto", "on", "off"), default="auto",
                   help="keep first-order graphs across products (auto: when they fit in half "
                        "the free memory)")
    p.add_argument("--hvp-mode", choices=("auto",) + HVP_MODES, default="auto",
                   help="how a Hessian-vector product is computed (auto: time both at start-up "
                        "and keep the faster)")
    add_bool_flag(p, "tf32", False, "allow TF32 matmuls/convolutions on GPUs (faster on "
                  "Ampere and later, ~1e-3 relative error per product; off keeps float32)")
    args = p.parse_args(argv)
    if not (args.eigenvalue or args.trace or args.density):
        p.error("nothing to compute: pass at least one of --eigenvalue, --trace, --density")
    if args.mini_hessian_batch_size > args.hessian_batch_size:
        p.error(f"--mini-hessian-batch-size {args.mini_hessian_batch_size} is larger than "
                f"--hessian-batch-size {args.hessian_batch_size}; make it at most that")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be between 0 and 65535, got {args.port}")
    if args.eigenvalue and args.eigen_method == "lanczos" and args.top_n > args.max_iter:
        p.error(f"--top-n {args.top_n} needs at least as many Lanczos steps: pass --max-iter "
                f"{args.top_n} or more")
    if args.trace and args.trace_method == "hutchpp" and args.max_iter < 3:
        p.error("--trace-method hutchpp needs --max-iter 3 or more (its product budget)")
    return args


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------------------- data
def dataset_name(args, meta) -> str:
    return args.dataset or meta.get("dataset") or "cifar10"


def load_shard(args, meta, rank, world_size, device):
    """This rank's mini-batches of the Hessian samples (see utils.shard_batches)."""
    bundle = get_datasets(dataset_name(args, meta), args.data_dir,
                          normalization=meta.get("normalization"), download=(rank == 0))
    indices = hessian_subset(bundle.train_eval, args.hessian_batch_size, args.seed)
    batches, num_batches = shard_batches(bundle.train_eval, indices,
                                         args.mini_hessian_batch_size, rank, world_size, device)
    return bundle, batches, num_batches


# ---------------------------------------------------------------------------- analysis
def run_analysis(args, launch: str):
    """Body of every rank: model, shard, operator, requested algorithms, rank-0 outputs."""
    rank, world_size = get_rank(), get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(args.cuda, local_rank, warn=(rank == 0))
    # PyTorch allows TF32 in cuDNN convolutions by default; HVPs keep full float32 unless asked
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    t_start = time.perf_counter()
    model, meta = load_checkpoint(args.resume, batch_norm=args.batch_norm,
                                  residual=args.residual, map_location=device)
    bundle, batches, num_batches = load_shard(args, meta, rank, world_size, device)
    if bundle.num_classes != meta["arch"]["num_classes"]:
        raise DataError(f"the checkpoint has {meta['arch']['num_classes']} classes but data set "
                        f"{bundle.name} has {bundle.num_classes}; pass the matching --dataset")
    op = HessianOperator(model, nn.CrossEntropyLoss(), batches, device=device,
                         reuse_graph={"auto": "auto", "on": True, "off": False}[args.reuse_graph],
                         hvp_mode=args.hvp_mode)
    samples_per_rank = [0] * world_size
    if world_size > 1:
        torch.distributed.all_gather_object(samples_per_rank, op.local_num_samples)
    else:
        samples_per_rank = [op.local_num_samples]
    arch = meta["arch"]
    print0(f"pyhessian-dist {pyhessian_dist.__version__} | ResNet{arch['depth']} "
           f"(batch_norm={arch['batch_norm']}, residual={arch['residual']}), "
           f"{count_parameters(model):,} parameters ({op.dim:,} trainable) | {args.resume}")
    print0(f"data: {bundle.name} train split, un-augmented: {op.num_samples} samples (seed "
           f"{args.seed}) in {num_batches} mini-batches of <= {args.mini_hessian_batch_size}; "
           f"samples per rank {samples_per_rank}")
    threads = torch.get_num_threads() if device.type == "cpu" else None
    print0(f"world size {world_size} ({launch}), backend "
           f"{torch.distributed.get_backend() if world_size > 1 else 'none'}, device "
           f"{device.type}{f' ({threads} thread(s)/process)' if threads else ''}")
    print0(f"loss {op.loss():.6g} (mean cross-entropy on these samples), gradient norm "
           f"{op.gradient().norm().item():.4g}")
    timings = op.mode_timings and ", ".join(f"{k} {v:.3g} s" for k, v in op.mode_timings.items())
    print0(f"HVP: {op.hvp_mode}" + (f" (measured per product: {timings})" if timings else "")
           + (f", first-order graph {'reused' if op.reuse_graph else 'recomputed per product'}"
              if op.hvp_mode == "double_backward" else "")
           + (f" (~{op.graph_bytes_estimate / 2**20:.0f} MiB/rank)"
              if op.reuse_graph and op.graph_bytes_estimate else ""))
    if num_batches < world_size:
        print0(f"warning: {num_batches} mini-batches for {world_size} ranks: "
               f"{world_size - num_batches} ranks hold no data; lower "
               "--mini-hessian-batch-size to use them")

    def generator(offset):
        # CPU generator: the same probes on every rank, device and world size
        return torch.Generator().manual_seed(args.seed * 1000 + offset)

    common = dict(dtype=op.dtype, device=op.device)
    results = {}
    fail_rank = os.environ.get(FAIL_RANK_ENV)
    if fail_rank is not None and int(fail_rank) == rank:
        raise RuntimeError(f"injected failure on rank {rank} ({FAIL_RANK_ENV} is set)")

    if args.eigenvalue:
        results["eigenvalue"] = timed(op, lambda: eigen(args, op, generator(1), common))
        r = results["eigenvalue"]
        print0(f"***Top Eigenvalues:  {r['eigenvalues']}")
        print0(f"    {r['method']}, {r['num_matvecs']} HVPs, {r['seconds']:.1f} s, "
               f"{'converged' if r['converged'] else 'NOT converged'} "
               f"({r['convergence_note']})")
    if args.trace:
        results["trace"] = timed(op, lambda: trace(args, op, generator(2), common))
        r = results["trace"]
        print0(f"***Trace:  {r['trace']:.6g} ± {r['stderr']:.3g} (standard error of the mean "
               f"of {len(r['samples'])} probes)")
        print0(f"    {r['method']}, {r['num_matvecs']} HVPs, {r['seconds']:.1f} s, "
               f"{'converged' if r['converged'] else 'NOT converged'}")
    if args.density:
        results["density"] = timed(op, lambda: density(args, op, generator(3), common))
        r = results["density"]
        print0(f"***Density: {args.n_v} SLQ run(s) x {r['num_steps']} Lanczos steps = "
               f"{r['num_matvecs']} HVPs, {r['seconds']:.1f} s; Ritz values in "
               f"[{min(map(min, r['nodes'])):.4g}, {max(map(max, r['nodes'])):.4g}]")

    if rank == 0:
        record = {
            "config": vars(args), "launch": launch, "world_size": world_size,
            "backend": torch.distributed.get_backend() if world_size > 1 else None,
            "device": describe_device(device),
            "versions": {"pyhessian_dist": pyhessian_dist.__version__,
                         "torch": torch.__version__, "python": platform.python_version()},
            "model": {"arch": arch, "num_parameters": count_parameters(model),
                      "num_trainable": op.dim, "checkpoint": {k: meta.get(k) for k in (
                          "path", "source", "dataset", "epoch", "test_accuracy")}},
            "data": {"dataset": bundle.name, "split": "train (un-augmented)",
                     "num_samples": op.num_samples, "num_mini_batches": num_batches,
                     "mini_batch_size": args.mini_hessian_batch_size,
                     "samples_per_rank": samples_per_rank, "normalization":
                         bundle.normalization},
            "loss": op.loss(), "gradient_norm": op.gradient().norm().item(),
            "operator": op.stats(), "results": results,
            "seconds_total": time.perf_counter() - t_start,
        }
        write_outputs(args, record)
    return results


def timed(op, fn):
    before = op.stats()
    t0 = time.perf_counter()
    out = fn()
    after = op.stats()
    out["seconds"] = time.perf_counter() - t0
    out["allreduce_seconds"] = after["allreduce_seconds"] - before["allreduce_seconds"]
    return out


def eigen(args, op, gen, common):
    def progress(step):
        if "residuals" in step:
            print0(f"  [eigenvalue] HVP {step['matvecs']:3d}: top-{len(step['estimates'])} "
                   f"{fmt(step['estimates'])}  max rel. residual {max(step['residuals']):.2e}")
        elif step["change"] is not None:
            print0(f"  [eigenvalue {step['index'] + 1}] HVP {step['matvecs']:3d}: "
                   f"{step['estimate']:.6g}  rel. change {step['change']:.2e}")

    if args.eigen_method == "lanczos":
        res = lanczos_top_eigenpairs(op, op.dim, args.top_n, max_steps=args.max_iter,
                                     tol=args.tol, generator=gen, batched=True,
                                     callback=progress, **common)
        note = (f"max relative Ritz residual {max(res.residuals):.2e}, tol {args.tol:g}; "
                f"eigenvalue error ~ residual^2 x |lambda| / gap")
    else:
        res = power_iteration_top_eigenpairs(op, op.dim, args.top_n, max_iter=args.max_iter,
                                             tol=args.tol, generator=gen, callback=progress,
                                             **common)
        note = f"relative change < tol {args.tol:g} within {args.max_iter} iterations each"
    return {"method": res.method, "eigenvalues": res.eigenvalues, "residuals": res.residuals,
            "num_matvecs": res.num_matvecs, "converged": res.converged,
            "convergence_note": note, "history": res.history}


def trace(args, op, gen, common):
    def progress(step):
        se = step["stderr"]
        print0(f"  [trace] probe {step['matvecs']:3d}: {step['estimate']:.6g} ± "
               + (f"{se:.3g}" if se == se else "n/a (one probe)"))

    if args.trace_method == "hutchinson":
        res = hutchinson_trace(op, op.dim, max_iter=args.max_iter, tol=args.tol, generator=gen,
                               batched=True, callback=progress, **common)
    else:
        res = hutchpp_trace(op, op.dim, args.max_iter, generator=gen, batched=True, **common)
    return {"method": res.method, "trace": res.trace, "stderr": res.stderr,
            "samples": res.samples, "num_matvecs": res.num_matvecs,
            "converged": res.converged, "history": res.history}


def density(args, op, gen, common):
    def progress(step):
        if step["step"] % 10 == 0 or step["step"] == step["steps"]:
            print0(f"  [density] run {step['runs'][0]}/{args.n_v}: Lanczos step "
                   f"{step['step']}/{step['steps']}")

    res = slq_density(op, op.dim, num_steps=args.lanczos_iter, num_runs=args.n_v,
                      generator=gen, batched=True, callback=progress, **common)
    return {"method": "slq", "nodes": res.nodes, "weights": res.weights,
            "num_steps": res.num_steps, "num_runs": args.n_v, "num_matvecs": res.num_matvecs}


def fmt(values):
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def describe_device(device):
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    return {"type": "cpu", "name": platform.processor() or platform.machine(),
            "threads_per_process": torch.get_num_threads()}


def write_outputs(args, record):
    """Rank 0: results.json, the ESD figure (PDF + PNG) and the convergence figure."""
    from density_plot import get_esd_plot, plot_convergence

    out = args.output_dir
    written = []
    res = record["results"]
    if "density" in res:
        written += get_esd_plot(res["density"]["nodes"], res["density"]["weights"],
                                os.path.join(out, "example.pdf"))
    if "eigenvalue" in res or "trace" in res:
        written.append(plot_convergence(res.get("eigenvalue"), res.get("trace"),
                                        os.path.join(out, "convergence.png")))
    path = os.path.join(out, "results.json")
    atomic_write_bytes(path, (json.dumps(record, indent=1, default=str) + "\n").encode())
    written.append(path)
    print0("wrote " + ", ".join(written))


# ---------------------------------------------------------------------------- launch
def worker(local_rank, args, world_size, init_method, backend, threads):
    """One spawned process: set-up -> analysis -> clean-up (clean-up on every exit path)."""
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(args.cuda, local_rank, warn=False)
    try:
        if world_size > 1:
            setup(backend, rank=local_rank, world_size=world_size, init_method=init_method,
                  device=device)
        run_analysis(args, launch="spawn" if world_size > 1 else "single process")
    finally:
        cleanup()


def check_port(ip: str, port: int) -> int:
    """The port rank 0 will listen on; a busy or foreign address is one clear error."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, port))
        except OSError as exc:
            if port == 0:
                fail(f"cannot open a port on --ip {ip}: {exc.strerror}")
            fail(f"port {port} on {ip} is not available ({exc.strerror}); pass another with "
                 "--port N, or --port 0 to pick a free one")
        return s.getsockname()[1]


def main(argv=None):
    args = parse_args(argv)
    # Validate what can be checked cheaply before any process starts: one line per problem.
    try:
        _model, meta = load_checkpoint(args.resume, batch_norm=args.batch_norm,
                                       residual=args.residual)
        if not launched_by_torchrun() or os.environ.get("RANK") == "0":
            bundle = get_datasets(dataset_name(args, meta), args.data_dir,
                                  normalization=meta.get("normalization"))
            hessian_subset(bundle.train_eval, args.hessian_batch_size, args.seed)
    except (CheckpointError, DataError) as exc:
        fail(str(exc))
    del _model
    os.makedirs(args.output_dir, exist_ok=True)

    if launched_by_torchrun():
        local_rank = int(os.environ["LOCAL_RANK"])
        device = resolve_device(args.cuda, local_rank, warn=False)  # setup() binds a GPU
        try:
            backend = backend_for(device, args.backend)
        except ValueError as exc:
            fail(str(exc))
        setup(backend, device=device)
        try:
            run_analysis(args, launch=f"torchrun, {os.environ.get('LOCAL_WORLD_SIZE', '?')} "
                                      "processes/node")
        finally:
            cleanup()
        return 0

    gpus = torch.cuda.device_count() if args.cuda else 0
    if args.cuda and gpus == 0:
        print("warning: --cuda requested but no GPU is available; running on CPU",
              file=sys.stderr)
        args.cuda = False
    n = args.device_count or (gpus if gpus else 1)
    if gpus and n > gpus:
        fail(f"--device_count {n} but only {gpus} GPU(s) are visible; pass --device_count "
             f"{gpus} or less, or --no-cuda for CPU workers")
    device = torch.device("cuda" if gpus else "cpu")
    try:
        backend = backend_for(device, args.backend)
    except ValueError as exc:
        fail(str(exc))
    threads = None if gpus else max(1, (os.cpu_count() or 1) // n)
    if n == 1:
        worker(0, args, 1, None, backend, threads)
        return 0
    port = check_port(args.ip, args.port)
    init_method = f"tcp://{args.ip}:{port}"
    ctx = mp.start_processes(worker, args=(args, n, init_method, backend, threads), nprocs=n,
                             join=False, start_method="spawn")
    try:
        # join() raises as soon as any worker fails and terminates the others: no hang
        while not ctx.join(timeout=1):
            pass
    except KeyboardInterrupt:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(timeout=10)
        print("interrupted: all workers stopped", file=sys.stderr)
        return 130
    except mp.ProcessException as exc:
        print(f"error: a worker failed; the run was stopped.\n{exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
