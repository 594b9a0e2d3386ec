"""Side-by-side benchmark of the HVP pipeline and the algorithms built on it.

Everything is measured in one run, on one model and one data set, so ratios are meaningful even
on a noisy machine. Prints one table and writes a JSON record (and a plot with --plot).

    python bench/bench_hvp.py --checkpoint checkpoints/net.pkl --samples 1000 --mini-batch 200

Sections: gradient vs HVP modes; block products; top-1 / top-5 eigenvalues to 1e-3 relative
accuracy (Lanczos vs PyHessian's power iteration, against a tightly converged Lanczos value);
trace (Hutchinson vs Hutch++ at equal products, against a long Hutchinson run); SLQ density;
world size 1 vs 2 (one thread per process, gloo).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.multiprocessing as mp
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pyhessian_dist import (HessianOperator, hutchinson_trace, hutchpp_trace,  # noqa: E402
                            lanczos_top_eigenpairs, power_iteration_top_eigenpairs,
                            slq_density)
from pyhessian_dist.distributed import cleanup, setup  # noqa: E402
from utils import get_datasets, hessian_subset, load_checkpoint, shard_batches  # noqa: E402

CE = nn.CrossEntropyLoss()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/net.pkl",
                   help="model to benchmark (train one with training.py --dataset synthetic)")
    p.add_argument("--dataset", default=None, help="data set (default: the checkpoint's)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--samples", type=int, default=1000, help="Hessian samples")
    p.add_argument("--mini-batch", type=int, default=200, help="samples per mini-batch")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--world-size", type=int, default=2,
                   help="compare world size 1 with this (CPU, one thread each); 1 skips it")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per product kind")
    p.add_argument("--block", type=int, default=4, help="vectors per block product")
    p.add_argument("--trace-budget", type=int, default=30, help="products for each trace method")
    p.add_argument("--trace-reference", type=int, default=100,
                   help="Hutchinson probes of the reference trace")
    p.add_argument("--power-max-iter", type=int, default=100,
                   help="power iteration cap per eigenvalue (PyHessian's default)")
    p.add_argument("--skip-power-top5", action="store_true",
                   help="skip power iteration for top-5 (5 x up to --power-max-iter products)")
    p.add_argument("--density-steps", type=int, default=30, help="Lanczos steps in the SLQ run")
    p.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA")
    p.add_argument("--out", default=None, help="JSON path (default bench/results-<device>.json)")
    p.add_argument("--plot", default=None, help="also write a PNG summary here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ helpers
def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats):
    fn()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def load_batches(args, device, rank=0, world_size=1):
    model, meta = load_checkpoint(args.checkpoint, map_location=device)
    bundle = get_datasets(args.dataset or meta.get("dataset") or "cifar10", args.data_dir,
                          normalization=meta.get("normalization"))
    idx = hessian_subset(bundle.train_eval, args.samples, 1)
    batches, _ = shard_batches(bundle.train_eval, idx, args.mini_batch, rank, world_size, device)
    return model, batches


def first_within(history_values, reference, rel):
    """1-based index of the first estimate within rel of reference (and staying there)."""
    hit = None
    for i, v in enumerate(history_values, 1):
        if abs(v - reference) <= rel * abs(reference):
            hit = hit or i
        else:
            hit = None
    return hit


# ------------------------------------------------------------------------------ sections
def bench_products(args, model, batches, device):
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}

    def grad():
        for x, y in batches:
            torch.autograd.grad(CE(model(x), y), params)

    out["gradient_s"] = timeit(grad, device, args.repeats)
    modes = [("double_backward", True), ("double_backward", False),
             ("forward_over_reverse", False)]
    for mode, reuse in modes:
        op = HessianOperator(model, CE, batches, device=device, reuse_graph=reuse, hvp_mode=mode)
        v = torch.randn(op.dim, device=device)
        t = timeit(lambda: op.matvec(v), device, args.repeats)
        name = f"{mode}{'+reuse' if reuse else ''}"
        out[f"hvp_{name}_s"] = t
        out[f"hvp_{name}_ratio"] = t / out["gradient_s"]
        for vec in (False, True):
            op.vectorize = vec
            V = torch.randn(args.block, op.dim, device=device)
            tb = timeit(lambda: op.matvec(V), device, 1)
            out[f"block{args.block}_{name}{'_vmap' if vec else ''}_vectors_per_s"] = args.block / tb
        out[f"single_{name}_vectors_per_s"] = 1 / t
    return out


def bench_eigen(args, op, device):
    common = dict(dtype=op.dtype, device=device)
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    out = {}
    per_product = {}

    def run(name, fn):
        n0, t0 = op.num_matvecs, time.perf_counter()
        res = fn()
        sync(device)
        secs = time.perf_counter() - t0
        per_product[name] = secs / max(1, op.num_matvecs - n0)
        return res, secs

    ref, _ = run("reference", lambda: lanczos_top_eigenpairs(
        op, op.dim, 5, max_steps=200, tol=1e-7, generator=gen(11), batched=True, **common))
    out["reference_top5"] = ref.eigenvalues
    out["reference_matvecs"] = ref.num_matvecs
    lam1 = ref.eigenvalues[0]

    lz, lz_s = run("lanczos1", lambda: lanczos_top_eigenpairs(
        op, op.dim, 1, tol=1e-3, generator=gen(1), batched=True, **common))
    pw, pw_s = run("power1", lambda: power_iteration_top_eigenpairs(
        op, op.dim, 1, max_iter=args.power_max_iter, tol=1e-3, generator=gen(1), **common))
    lz_hist = [h["estimates"][0] for h in lz.history]
    pw_hist = [h["estimate"] for h in pw.history]
    out["top1"] = {
        "lanczos": {"value": lz.eigenvalues[0], "matvecs": lz.num_matvecs, "seconds": lz_s,
                    "rel_error": abs(lz.eigenvalues[0] - lam1) / abs(lam1),
                    "matvecs_to_1e-3": first_within(lz_hist, lam1, 1e-3)},
        "power": {"value": pw.eigenvalues[0], "matvecs": pw.num_matvecs, "seconds": pw_s,
                  "converged": pw.converged,
                  "rel_error": abs(pw.eigenvalues[0] - lam1) / abs(lam1),
                  "matvecs_to_1e-3": first_within(pw_hist, lam1, 1e-3)},
    }
    out["top1"]["speedup_seconds"] = pw_s / lz_s
    lz5, lz5_s = run("lanczos5", lambda: lanczos_top_eigenpairs(
        op, op.dim, 5, tol=1e-3, generator=gen(2), batched=True, **common))
    out["top5"] = {"lanczos": {
        "values": lz5.eigenvalues, "matvecs": lz5.num_matvecs, "seconds": lz5_s,
        "max_rel_error": max(abs(a - b) / abs(b) for a, b in zip(lz5.eigenvalues,
                                                                  ref.eigenvalues))}}
    if not args.skip_power_top5:
        pw5, pw5_s = run("power5", lambda: power_iteration_top_eigenpairs(
            op, op.dim, 5, max_iter=args.power_max_iter, tol=1e-3, generator=gen(2), **common))
        out["top5"]["power"] = {
            "values": pw5.eigenvalues, "matvecs": pw5.num_matvecs, "seconds": pw5_s,
            "converged": pw5.converged,
            "max_rel_error": max(abs(a - b) / abs(b) for a, b in zip(
                sorted(pw5.eigenvalues, reverse=True), ref.eigenvalues))}
        out["top5"]["speedup_seconds"] = pw5_s / lz5_s
    out["seconds_per_product"] = per_product
    return out


def bench_trace(args, op, device):
    common = dict(dtype=op.dtype, device=device, batched=True)
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    ref = hutchinson_trace(op, op.dim, max_iter=args.trace_reference, tol=0.0,
                           generator=gen(100), **common)
    out = {"reference": ref.trace, "reference_stderr": ref.stderr,
           "reference_probes": len(ref.samples)}
    t0 = time.perf_counter()
    hu = hutchinson_trace(op, op.dim, max_iter=args.trace_budget, tol=0.0, generator=gen(5),
                          **common)
    hu_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pp = hutchpp_trace(op, op.dim, args.trace_budget, generator=gen(5), **common)
    pp_s = time.perf_counter() - t0
    for name, r, s in (("hutchinson", hu, hu_s), ("hutchpp", pp, pp_s)):
        out[name] = {"trace": r.trace, "stderr": r.stderr, "matvecs": r.num_matvecs,
                     "seconds": s, "abs_error_vs_reference": abs(r.trace - ref.trace)}
    t0 = time.perf_counter()
    d = slq_density(op, op.dim, num_steps=args.density_steps, num_runs=1, generator=gen(7),
                    **common)
    out["density"] = {"steps": d.num_steps, "matvecs": d.num_matvecs,
                      "seconds": time.perf_counter() - t0}
    return out


def _scaling_worker(rank, args, world_size, port, queue):
    torch.set_num_threads(1)
    try:
        if world_size > 1:
            setup("gloo", rank=rank, world_size=world_size,
                  init_method=f"tcp://127.0.0.1:{port}")
        model, batches = load_batches(args, "cpu", rank, world_size)
        op = HessianOperator(model, CE, batches, reuse_graph=True)
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
        op.matvec(v)  # warm-up
        op.num_matvecs, op.compute_seconds, op.comm.seconds = 0, 0.0, 0.0
        t0 = time.perf_counter()
        n = max(2, args.repeats)
        for _ in range(n):
            op.matvec(v)
        wall = time.perf_counter() - t0
        queue.put((rank, {"seconds_per_product": wall / n,
                          "allreduce_share": op.comm.seconds / max(op.compute_seconds, 1e-12),
                          "allreduce_seconds_per_product": op.comm.seconds / n}))
    except Exception as exc:  # noqa: BLE001
        queue.put((rank, {"error": repr(exc)}))
    finally:
        cleanup()


def bench_scaling(args):
    """World size 1 vs N on CPU, one thread per process, same samples."""
    import socket

    out = {}
    for ws in (1, args.world_size):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_scaling_worker, args=(r, args, ws, port, q))
                 for r in range(ws)]
        for p in procs:
            p.start()
        res = dict(q.get(timeout=1800) for _ in range(ws))
        for p in procs:
            p.join(timeout=60)
        if any("error" in r for r in res.values()):
            raise RuntimeError(f"scaling run failed: {res}")
        out[f"world_{ws}"] = res[0] | {"max_allreduce_share": max(
            r["allreduce_share"] for r in res.values())}
    t1 = out["world_1"]["seconds_per_product"]
    tn = out[f"world_{args.world_size}"]["seconds_per_product"]
    out["throughput_ratio"] = t1 / tn
    return out


# ------------------------------------------------------------------------------ report
def table(rec):
    p, e, t = rec["products"], rec.get("eigen", {}), rec.get("trace", {})
    rows = [("gradient (all samples)", f"{p['gradient_s']:.3f} s", "1.00x")]
    for name in ("double_backward+reuse", "double_backward", "forward_over_reverse"):
        rows.append((f"HVP {name}", f"{p[f'hvp_{name}_s']:.3f} s",
                     f"{p[f'hvp_{name}_ratio']:.2f}x gradient"))
    b = rec["args"]["block"]
    for name in ("double_backward+reuse", "double_backward", "forward_over_reverse"):
        rows.append((f"vectors/s {name}: single | block {b} | block {b} vmap",
                     f"{p[f'single_{name}_vectors_per_s']:.3f} | "
                     f"{p[f'block{b}_{name}_vectors_per_s']:.3f} | "
                     f"{p[f'block{b}_{name}_vmap_vectors_per_s']:.3f}", ""))
    if e:
        for k in ("lanczos", "power"):
            r = e["top1"][k]
            rows.append((f"top-1 {k}", f"{r['matvecs']} HVPs, {r['seconds']:.1f} s",
                         f"rel. err {r['rel_error']:.1e}; within 1e-3 after "
                         f"{r['matvecs_to_1e-3']} HVPs"))
        rows.append(("top-1 speed-up Lanczos vs power", f"{e['top1']['speedup_seconds']:.1f}x",
                     "same run, same operator"))
        for k in ("lanczos", "power"):
            if k in e["top5"]:
                r = e["top5"][k]
                rows.append((f"top-5 {k}", f"{r['matvecs']} HVPs, {r['seconds']:.1f} s",
                             f"max rel. err {r['max_rel_error']:.1e}"))
    if t:
        rows.append(("trace reference (Hutchinson)", f"{t['reference']:.5g} ± "
                     f"{t['reference_stderr']:.3g}", f"{t['reference_probes']} probes"))
        for k in ("hutchinson", "hutchpp"):
            r = t[k]
            rows.append((f"trace {k}", f"{r['trace']:.5g} ± {r['stderr']:.3g}",
                         f"{r['matvecs']} HVPs, |err| {r['abs_error_vs_reference']:.3g}, "
                         f"{r['seconds']:.1f} s"))
        rows.append(("SLQ density", f"{t['density']['seconds']:.1f} s",
                     f"{t['density']['matvecs']} HVPs"))
    if "scaling" in rec:
        s = rec["scaling"]
        ws = rec["args"]["world_size"]
        rows.append((f"world {ws} vs 1 (1 thread each)", f"{s['throughput_ratio']:.2f}x",
                     f"all-reduce {100 * s[f'world_{ws}']['max_allreduce_share']:.1f}% of "
                     "product time"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b:<28} {c}" for a, b, c in rows)


def plot(rec, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = rec["products"]
    names = ["double_backward+reuse", "double_backward", "forward_over_reverse"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(["gradient"] + names, [1.0] + [p[f"hvp_{n}_ratio"] for n in names])
    axes[0].set_ylabel("time / gradient time")
    axes[0].set_title("cost of one product")
    axes[0].tick_params(axis="x", labelrotation=15, labelsize=8)
    e = rec.get("eigen")
    if e:
        labels, secs = [], []
        for k in ("top1", "top5"):
            for m in ("lanczos", "power"):
                if m in e[k]:
                    labels.append(f"{k} {m}\n({e[k][m]['matvecs']} HVPs)")
                    secs.append(e[k][m]["seconds"])
        axes[1].bar(labels, secs, color=["C0", "C1"] * 2)
        axes[1].set_ylabel("seconds")
        axes[1].set_title("top eigenvalues to tol 1e-3")
        axes[1].tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{rec['model']} | {rec['args']['samples']} samples | {rec['device_name']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    model, batches = load_batches(args, device)
    rec = {"args": vars(args), "torch": torch.__version__, "python": platform.python_version(),
           "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                           else f"cpu x{torch.get_num_threads()} threads"),
           "model": f"ResNet{model.depth}", "num_parameters": sum(p.numel() for p in
                                                                  model.parameters())}
    print(f"benchmark: {rec['model']}, {args.samples} samples in mini-batches of "
          f"{args.mini_batch}, {rec['device_name']}", flush=True)
    rec["products"] = bench_products(args, model, batches, device)
    print("products done", flush=True)
    op = HessianOperator(model, CE, batches, device=device, reuse_graph="auto")
    rec["operator"] = op.stats()
    rec["eigen"] = bench_eigen(args, op, device)
    print("eigenvalues done", flush=True)
    rec["trace"] = bench_trace(args, op, device)
    print("trace and density done", flush=True)
    if args.world_size > 1 and device.type == "cpu":
        rec["scaling"] = bench_scaling(args)
    print(table(rec))
    out = args.out or os.path.join(ROOT, "bench", f"results-{device.type}.json")
    with open(out, "w") as fh:
        json.dump(rec, fh, indent=1)
    print(f"wrote {out}")
    if args.plot:
        plot(rec, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
