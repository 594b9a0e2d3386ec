"""Benchmark of our Hessian-vector products and the algorithms built on them, in one run.

Everything is measured on one model and one set of samples, so ratios mean something even on a
noisy machine. Progress lines go to stdout; the JSON record (``--out``) is rewritten after every
section, so a crash late in a long run keeps the sections before it.

    python -m bench.bench_hvp --checkpoint checkpoints/net.pkl --samples 1000 --mini-batch 200

Sections (``--sections a,b,...``; default all):
  products       gradient vs one HVP: double backward with the first-order graph kept or
                 recomputed, forward-over-reverse; the library's overhead over a bare autograd
                 loop; blocks of vectors (loop vs vmapped)
  threads        1 vs 2 threads, with OpenMP's default (spinning) wait policy and with
                 OMP_WAIT_POLICY=PASSIVE, in fresh processes (--threads-samples samples; run it
                 on a busy machine too: spinning threads are slow when the cores are shared)
  compile        torch.compile of the forward-over-reverse product (a local variant)
  conv           one HVP with the convolutions' double backward as torch runs it, fused
                 (operators/conv.py) and fused + channels-last (the library's CPU default)
  eigen          top-1 / top-5: Lanczos vs power iteration, against a tightly converged Lanczos
  trace          to a relative standard error of --trace-rse: plain Hutchinson vs deflated
                 (deflate="auto") vs Hutch++, against a long plain Hutchinson run
  slq            SLQ density, --density-steps Lanczos steps
  scaling        world size 1 vs --world-size on CPU (one thread per process, gloo)
  memory         peak resident memory of a fresh analysis-script process (default flags, top-1)
                 for each of --memory-sizes, and of a library-only process for each of
                 --memory-library-sizes (larger synthetic sets than the script can load)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import warnings

import torch

from bench.common import (
    CE,
    ROOT,
    Record,
    add_problem_arguments,
    checkpoint_path,
    environment,
    first_line_time,
    first_within,
    generator,
    load_problem,
    max_rel_error,
    python,
    references,
    rel_error,
    run_process,
    say,
    scaling_worker,
    sections,
    tail,
    time_calls,
    time_interleaved,
    timed,
)
from pyhessian_dist import (
    hutchinson_trace,
    hutchpp_trace,
    lanczos_eigenpairs,
    power_iteration_eigenpairs,
    slq_density,
)
from support.launch import launch

SECTIONS = ("products", "threads", "compile", "conv", "eigen", "trace", "slq",
            "scaling", "memory")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_problem_arguments(p, samples=1000, mini_batch=200)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per product kind")
    p.add_argument("--block", type=int, default=4, help="vectors per block product")
    p.add_argument("--power-max-iter", type=int, default=100,
                   help="power iteration cap per eigenvalue (PyHessian's default)")
    p.add_argument("--skip-power-top5", action="store_true",
                   help="skip power iteration for top-5 (5 x up to --power-max-iter products)")
    p.add_argument("--trace-rse", type=float, default=0.02,
                   help="target relative standard error of the trace estimates")
    p.add_argument("--trace-max", type=int, default=1000,
                   help="most probes of one Hutchinson estimate; most products of one Hutch++ "
                        "run")
    p.add_argument("--density-steps", type=int, default=100, help="Lanczos steps of the SLQ run")
    p.add_argument("--world-size", type=int, default=2,
                   help="compare world size 1 with this (CPU, one thread each); 1 skips it")
    p.add_argument("--threads-samples", type=int, default=200,
                   help="samples of the threads section's processes")
    p.add_argument("--memory-sizes", default="1000,5000",
                   help="Hessian set sizes for the analysis-script memory runs (synthetic has "
                        "5,000 train images)")
    p.add_argument("--memory-library-sizes", default="20000",
                   help="larger synthetic sets for library-only memory runs ('' for none)")
    p.add_argument("--memory-library-steps", type=int, default=4,
                   help="Lanczos steps of the library-only memory runs (the peak comes with "
                        "the set-up and first products; more steps add 8 bytes x dim each)")
    p.add_argument("--out", default=os.path.join("bench", "results-cpu.json"),
                   help="JSON record, rewritten after every section")
    p.add_argument("--plot", default=None, help="also write a PNG summary here")
    return p.parse_args(argv)


# ============================================================================ products
def bench_products(args, problem):
    """One gradient vs one HVP (each over all mini-batches), in every mode."""
    model = problem.model_copy()
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(len(y) for _x, y in problem.batches)
    weights = [len(y) / n for _x, y in problem.batches]

    def gradient():
        for (x, y), w in zip(problem.batches, weights):
            torch.autograd.grad(CE(model(x), y) * w, params)

    out = {"gradient": time_calls(gradient, args.repeats)}
    g_s = out["gradient"]["median_s"]
    say(f"gradient: {g_s:.3f} s")
    modes = {"double_backward+reuse": dict(hvp_mode="double_backward", reuse_graph=True),
             "double_backward": dict(hvp_mode="double_backward", reuse_graph=False),
             "forward_over_reverse": dict(hvp_mode="forward_over_reverse")}
    v = torch.randn(problem.dim, generator=generator(0))
    for name, kw in modes.items():
        op, setup_s = timed(lambda kw=kw: problem.operator(**kw))
        single = time_calls(lambda op=op: op.matvec(v), args.repeats)
        row = {"setup_s": setup_s, "single": single,
               "ratio_to_gradient": single["median_s"] / g_s,
               "vectors_per_s": 1 / single["median_s"], "memory": op.describe_memory()}
        V = torch.randn(args.block, problem.dim, generator=generator(1))
        for vec in (False, True):
            op.vectorize = vec
            try:
                t = time_calls(lambda op=op, V=V: op.matvec(V), 1)
                row[f"block{args.block}{'_vmap' if vec else ''}"] = {
                    **t, "vectors_per_s": args.block / t["median_s"]}
            except RuntimeError as exc:  # e.g. out of memory for a vmapped block
                row[f"block{args.block}{'_vmap' if vec else ''}"] = {"error": str(exc)[:200]}
        out[name] = row
        say(f"HVP {name}: {single['median_s']:.3f} s ({row['ratio_to_gradient']:.2f}x gradient;"
            f" first call {single['first_s']:.3f} s); block of {args.block}: "
            + " | ".join(f"{k}: {r.get('vectors_per_s', float('nan')):.3f} vectors/s"
                         for k, r in row.items() if k.startswith("block")))
        del op
    out["library_overhead"] = _overhead(args, problem)
    return out


def _overhead(args, problem):
    """HessianOperator.matvec vs a bare loop of autograd.grad over the same kept graphs: what
    the operator's own bookkeeping (zeros, flatten, casts, the no-op all-reduce) costs."""
    op = problem.operator(reuse_graph=True)
    model = problem.model_copy()
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(len(y) for _x, y in problem.batches)
    graphs = []
    for x, y in problem.batches:
        g = torch.autograd.grad(CE(model(x), y) * (len(y) / n), params, create_graph=True)
        graphs.append(torch.cat([t.reshape(-1) for t in g]))
    v = torch.randn(problem.dim, generator=generator(0))

    def bare():
        out = torch.zeros_like(v)
        for g in graphs:
            hv = torch.autograd.grad(g, params, grad_outputs=v, retain_graph=True)
            out += torch.cat([t.reshape(-1) for t in hv])
        return out

    diff = float((bare() - op.matvec(v)).norm() / op.matvec(v).norm())
    t = time_interleaved({"operator": lambda: op.matvec(v), "bare": bare}, args.repeats)
    t_op, t_bare = t["operator"], t["bare"]
    out = {"operator": t_op, "bare_autograd": t_bare, "relative_difference": diff,
           "overhead_fraction": t_op["median_s"] / t_bare["median_s"] - 1}
    say(f"library overhead: operator {t_op['median_s']:.3f} s vs bare autograd "
        f"{t_bare['median_s']:.3f} s ({100 * out['overhead_fraction']:+.1f}%)")
    return out


# ============================================================================ threads
def bench_threads(args, problem):
    """Gradient and HVP at 1 and at all cores' threads, in fresh processes: OpenMP's default
    wait policy vs OMP_WAIT_POLICY=PASSIVE (which must be set before torch starts)."""
    out = {"load_average_before": list(os.getloadavg()), "samples": args.threads_samples}
    mb = min(args.mini_batch, args.threads_samples)
    for policy in (None, "PASSIVE"):
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        env.pop("OMP_NUM_THREADS", None)
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        cmd = [python(), "-m", "bench.threads_probe", "--checkpoint",
               checkpoint_path(args.checkpoint), "--samples", str(args.threads_samples),
               "--mini-batch", str(mb), "--repeats", str(args.repeats), "--dataset",
               problem.dataset]
        r = run_process(cmd, timeout=args.subprocess_timeout, env=env)
        _t, line = first_line_time(r["lines"], lambda s: s.startswith("RESULT "))
        key = f"omp_wait_policy_{(policy or 'default').lower()}"
        if line is None:
            out[key] = {"error": f"exit {r['returncode']}", "tail": tail(r["lines"], 8)}
            continue
        times = json.loads(line[len("RESULT "):])["times"]
        out[key] = {k: v["median_s"] for k, v in times.items()} | {"all": times}
        say(f"threads ({policy or 'default'} wait policy): "
            + ", ".join(f"{k} {v['median_s']:.3f} s" for k, v in times.items()))
    out["load_average_after"] = list(os.getloadavg())
    return out


# ============================================================================ compile
def _fwd_over_rev(problem, model):
    """A local forward-over-reverse product H_b t (the operator's, as a plain function)."""
    from torch.func import functional_call, grad, jvp

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    numels = [p.numel() for p in params]
    shapes = [p.shape for p in params]

    def loss_of(flat, x, y, w):
        ps = {k: t.view(s) for k, t, s in zip(names, torch.split(flat, numels), shapes)}
        return CE(functional_call(model, ps, (x,), strict=False), y) * w

    def hvp(theta, t, x, y, w):
        return jvp(lambda th: grad(loss_of)(th, x, y, w), (theta,), (t,))[1]

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    return hvp, theta


def bench_compile(args, problem):
    """torch.compile of the forward-over-reverse product (inductor, CPU): compile time, then
    seconds per product against the same function run eagerly."""
    model = problem.model_copy()
    hvp, theta = _fwd_over_rev(problem, model)
    n = sum(len(y) for _x, y in problem.batches)
    v = torch.randn(problem.dim, generator=generator(0))

    def product(fn):
        out = torch.zeros_like(v)
        for x, y in problem.batches:
            out += fn(theta, v, x, y, len(y) / n)
        return out

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script", category=FutureWarning)
        eager_out = product(hvp)
        eager = time_calls(lambda: product(hvp), args.repeats, warmup=0)
        say(f"forward-over-reverse eager: {eager['median_s']:.3f} s per product")
        out = {"eager": eager, "mini_batch_sizes": sorted({len(y) for _x, y in problem.batches})}
        torch._dynamo.reset()
        compiled = torch.compile(hvp)  # inductor, default mode
        try:
            first_out, first_s = timed(lambda: product(compiled))
        except Exception as exc:  # noqa: BLE001 - a compiler failure is a result too
            out["default"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            say(f"torch.compile failed: {out['default']['error']}")
            torch._dynamo.reset()
            return out
        default_op = problem.operator(reuse_graph=True)  # our default path, for scale
        t = time_interleaved({"eager": lambda: product(hvp),
                              "compiled": lambda: product(compiled),
                              "double_backward+reuse": lambda op=default_op: op.matvec(v)},
                             args.repeats, warmup=0)
    del default_op
    torch._dynamo.reset()
    steady = t["compiled"]
    d = {"first_call_s": first_s, "steady": steady, "eager_interleaved": t["eager"],
         "double_backward+reuse_interleaved": t["double_backward+reuse"],
         "speedup_vs_eager": t["eager"]["median_s"] / steady["median_s"],
         "speedup_vs_double_backward_reuse":
             t["double_backward+reuse"]["median_s"] / steady["median_s"],
         "break_even_products": _break_even(first_s, steady["median_s"], t["eager"]["median_s"]),
         "relative_difference": float((first_out - eager_out).norm() / eager_out.norm())}
    out["default"] = d
    say(f"torch.compile: first call {first_s:.1f} s, then {steady['median_s']:.3f} s per product "
        f"({d['speedup_vs_eager']:.2f}x eager, {d['speedup_vs_double_backward_reuse']:.2f}x our "
        "default double backward with graphs kept)")
    return out


def _break_even(first, steady, eager):
    """Products after which compiling has paid for itself (None if it never does)."""
    gain = eager - steady
    return None if gain <= 0 else math.ceil(max(0.0, first - eager) / gain)


# ============================================================================ conv
def bench_conv(args, problem):
    """One HVP through kept first-order graphs built three ways, timed in turn: with torch's
    double backward of the convolutions (the library before ``operators/conv.py``), with the
    fused one in the plain layout, and fused with channels-last (the library's default on the
    CPU; ``HessianOperator`` builds its graphs under ``_second_order_graph``)."""
    from pyhessian_dist.attention import math_attention
    from pyhessian_dist.operators.hessian import _EvalBatchNormAsAffine, _second_order_graph

    @contextlib.contextmanager
    def torch_conv():  # _second_order_graph without the convolution mode
        with math_attention(), _EvalBatchNormAsAffine():
            yield

    variants = {"torch": torch_conv,
                "fused": lambda: _second_order_graph(channels_last=False),
                "fused+channels_last": lambda: _second_order_graph(channels_last=True)}
    model = problem.model_copy()
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(len(y) for _x, y in problem.batches)
    v = torch.randn(problem.dim, generator=generator(0))
    parts = [t.view_as(p) for t, p in zip(torch.split(v, [p.numel() for p in params]), params)]
    fns, out, products = {}, {}, {}
    for name, context in variants.items():
        with context():
            graphs = [torch.autograd.grad(CE(model(x), y) * (len(y) / n), params,
                                          create_graph=True) for x, y in problem.batches]

        def product(graphs=graphs):
            hv = [torch.zeros_like(p) for p in params]
            for g in graphs:
                for acc, t in zip(hv, torch.autograd.grad(g, params, grad_outputs=parts,
                                                          retain_graph=True)):
                    acc += t
            return torch.cat([t.flatten() for t in hv])

        fns[name] = product
        products[name] = product()
    ref = products["torch"]
    t = time_interleaved(fns, args.repeats)
    for name in variants:
        out[name] = {**t[name], "relative_difference": float((products[name] - ref).norm()
                                                             / ref.norm()),
                     "speedup": t["torch"]["median_s"] / t[name]["median_s"]}
        say(f"HVP, convolutions {name}: {t[name]['median_s']:.3f} s "
            f"({out[name]['speedup']:.2f}x torch's; relative difference "
            f"{out[name]['relative_difference']:.1e})")
    return out


# ============================================================================ eigen
def bench_eigen(args, problem, record):
    ref = references(args, problem, record, ("eigen",))["eigen"]["top5"]
    lam1 = ref[0]
    out = {"reference_top5": ref}

    def run(fn):
        op, setup_s = timed(problem.operator)
        res, secs = timed(lambda: fn(op))
        return res, {"matvecs": res.num_matvecs, "seconds": secs, "setup_s": setup_s,
                     "seconds_per_product": secs / max(1, res.num_matvecs),
                     "converged": res.converged}

    lz, lz_row = run(lambda op: lanczos_eigenpairs(op, 1, tol=1e-3, max_steps=100,
                                                   generator=generator(1)))
    pw, pw_row = run(lambda op: power_iteration_eigenpairs(op, 1, max_iter=args.power_max_iter,
                                                           tol=1e-3, generator=generator(1)))
    lz_hist = [(s.matvecs, s.values[0]) for s in lz.history]
    pw_hist = [(s.matvecs, s.values[-1]) for s in pw.history]
    out["top1"] = {
        "lanczos": {**lz_row, "value": lz.eigenvalues[0], "rel_error": rel_error(
            lz.eigenvalues[0], lam1), "matvecs_to_1e-3": first_within(lz_hist, lam1, 1e-3),
            "error_bound": lz.error_bounds[0]},
        "power": {**pw_row, "value": pw.eigenvalues[0], "rel_error": rel_error(
            pw.eigenvalues[0], lam1), "matvecs_to_1e-3": first_within(pw_hist, lam1, 1e-3)},
    }
    out["top1"]["speedup_seconds"] = pw_row["seconds"] / lz_row["seconds"]
    say(f"top-1: Lanczos {lz.num_matvecs} products {lz_row['seconds']:.1f} s rel. err "
        f"{out['top1']['lanczos']['rel_error']:.1e}; power {pw.num_matvecs} products "
        f"{pw_row['seconds']:.1f} s rel. err {out['top1']['power']['rel_error']:.1e}")
    record.data["eigen"] = out
    record.save()
    lz5, lz5_row = run(lambda op: lanczos_eigenpairs(op, 5, tol=1e-3, max_steps=100,
                                                     generator=generator(2)))
    out["top5"] = {"lanczos": {**lz5_row, "values": lz5.eigenvalues,
                               "max_rel_error": max_rel_error(lz5.eigenvalues, ref)}}
    say(f"top-5: Lanczos {lz5.num_matvecs} products {lz5_row['seconds']:.1f} s max rel. err "
        f"{out['top5']['lanczos']['max_rel_error']:.1e}")
    if not args.skip_power_top5:
        record.save()
        pw5, pw5_row = run(lambda op: power_iteration_eigenpairs(
            op, 5, max_iter=args.power_max_iter, tol=1e-3, generator=generator(2)))
        out["top5"]["power"] = {**pw5_row, "values": pw5.eigenvalues,
                                "max_rel_error": max_rel_error(pw5.eigenvalues, ref)}
        out["top5"]["speedup_seconds"] = pw5_row["seconds"] / lz5_row["seconds"]
        say(f"top-5: power {pw5.num_matvecs} products {pw5_row['seconds']:.1f} s max rel. err "
            f"{out['top5']['power']['max_rel_error']:.1e}")
    return out


# ============================================================================ trace
def bench_trace(args, problem, record):
    """Products each estimator needs for a relative standard error of --trace-rse, and how far
    its estimate lands from a long plain-Hutchinson reference."""
    ref = references(args, problem, record, ("trace",))["trace"]
    R, cap = args.trace_rse, args.trace_max
    out = {"reference": ref, "target_rse": R}

    def row(res, secs, setup_s):
        se = res.stderr
        combined = math.sqrt(se ** 2 + ref["stderr"] ** 2) if se == se else float("nan")
        r = {"trace": res.trace, "stderr": se, "rse": se / abs(res.trace),
             "matvecs": res.num_matvecs, "probes": len(res.samples), "seconds": secs,
             "setup_s": setup_s, "converged": res.converged, "stopping_rule": res.stopping_rule,
             "error_vs_reference": res.trace - ref["trace"],
             "z_own_stderr": abs(res.trace - ref["trace"]) / se if se else None,
             "z_combined": abs(res.trace - ref["trace"]) / combined if combined else None,
             "deflation": res.deflation}
        return r

    def run(name, fn):
        op, setup_s = timed(problem.operator)
        res, secs = timed(lambda: fn(op))
        out[name] = row(res, secs, setup_s)
        r = out[name]
        say(f"trace {name}: {r['trace']:.6g} ± {r['stderr']:.3g} ({100 * r['rse']:.1f}%), "
            f"{r['matvecs']} products, {secs:.1f} s, {r['z_own_stderr']:.2f} own SE from the "
            "reference")
        record.data["trace"] = out
        record.save()
        return res

    run("hutchinson", lambda op: hutchinson_trace(op, rse=R, max_iter=cap, block_size=4,
                                                  generator=generator(21)))
    defl = run("deflated", lambda op: hutchinson_trace(op, rse=R, deflate="auto", max_iter=cap,
                                                       block_size=4, generator=generator(22)))
    run("hutchinson_pyhessian_rule", lambda op: hutchinson_trace(op, tol=1e-3, max_iter=100,
                                                                 generator=generator(23)))
    # Hutch++ has a fixed budget: first the deflated estimator's cost, then (if short of the
    # target) the budget its probes predict for the target, the sketch growing with it.
    budget = max(3, defl.num_matvecs)
    res = run("hutchpp_equal_cost", lambda op: hutchpp_trace(op, budget, generator=generator(24)))
    rse = res.stderr / abs(res.trace)
    if rse > R and cap > budget:
        s = budget // 3
        need = min(cap, 2 * s + math.ceil(len(res.samples) * (rse / R) ** 2))
        run("hutchpp_predicted", lambda op: hutchpp_trace(op, need, generator=generator(25)))
        out["hutchpp_predicted"]["capped_by_trace_max"] = need == cap
    out["targets"] = _trace_targets(out, ref, R)
    say(f"trace targets: {out['targets']}")
    return out


def _trace_targets(out, ref, R) -> dict:
    """The issue-10 trace targets: deflated products vs plain Hutchinson's, and distance from
    the reference."""
    plain, deflated = out["hutchinson"], out["deflated"]
    predicted = math.ceil((ref["per_probe_sd"] / (R * abs(ref["trace"]))) ** 2)
    # plain Hutchinson's cost: its own run when it reached the target, else (capped by
    # --trace-max) the probes the reference's per-probe spread predicts
    plain_cost = plain["matvecs"] if plain["converged"] else max(plain["matvecs"], predicted)
    return {
        "plain_cost_used": plain_cost,
        "plain_cost_from": "its run" if plain["converged"] else "prediction (run capped)",
        "deflated_over_plain_products": deflated["matvecs"] / plain_cost,
        "cost_target_met (<= 1/3)": deflated["converged"]
        and deflated["matvecs"] <= plain_cost / 3,
        "deflated_within_2_own_se": bool(deflated["z_own_stderr"] <= 2),
        "deflated_within_2_combined_se": bool(deflated["z_combined"] <= 2),
        "plain_products_predicted_from_reference_sd": predicted,
        "per_probe_sd_plain": ref["per_probe_sd"],
        "per_probe_sd_deflated": deflated["stderr"] * math.sqrt(deflated["probes"]),
    }


# ============================================================================ slq
def bench_slq(args, problem, record):
    op, setup_s = timed(problem.operator)
    d, secs = timed(lambda: slq_density(op, num_steps=args.density_steps,
                                        generator=generator(7)))
    nodes, weights = d.nodes[0], d.weights[0]
    ref = record.data.get("reference", {})
    lam1 = (ref.get("eigen") or {}).get("top5", [None])[0]
    tr = (ref.get("trace") or {}).get("trace")
    slq_trace = problem.dim * sum(w * x for w, x in zip(weights, nodes))
    out = {"steps": d.num_steps, "matvecs": d.num_matvecs, "seconds": secs, "setup_s": setup_s,
           "seconds_per_product": secs / d.num_matvecs, "top_node": max(nodes),
           "top_node_rel_error": rel_error(max(nodes), lam1), "slq_trace_one_probe": slq_trace,
           "slq_trace_rel_error": rel_error(slq_trace, tr)}
    say(f"SLQ: {d.num_matvecs} products, {secs:.1f} s, top node {max(nodes):.6g}")
    return out


# ============================================================================ scaling
def bench_scaling(args, problem):
    out = {}
    threads = torch.get_num_threads()
    try:
        for ws in (1, args.world_size):
            ranks = launch(scaling_worker, (args, max(2, args.repeats)), nprocs=ws, threads=1,
                           port=0)
            out[f"world_{ws}"] = {"ranks": ranks,
                                  "seconds_per_product": max(r["seconds_per_product"]
                                                             for r in ranks),
                                  "max_allreduce_share": max(r["allreduce_share"]
                                                             for r in ranks)}
            say(f"world size {ws}: {out[f'world_{ws}']['seconds_per_product']:.3f} s per product")
    finally:
        torch.set_num_threads(threads)
    out["throughput_ratio"] = (out["world_1"]["seconds_per_product"]
                               / out[f"world_{args.world_size}"]["seconds_per_product"])
    return out


# ============================================================================ memory
def bench_memory(args, problem):
    """Peak RSS of fresh processes: the analysis script with default flags (top-1) on
    --memory-sizes samples, and the library alone on --memory-library-sizes synthetic samples."""
    out = {"baseline_imports": None, "script": [], "library": []}
    base = run_process([python(), "-c", "import torch, pyhessian_dist, analyses, support"],
                       timeout=args.subprocess_timeout)
    out["baseline_imports"] = {"peak_rss_mib": base["peak_rss_mib"], "wall_s": base["wall_s"]}
    say(f"memory: a process importing torch and the project peaks at "
        f"{base['peak_rss_mib']:.0f} MiB")
    ckpt = checkpoint_path(args.checkpoint)
    for n in _sizes(args.memory_sizes):
        with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
            cmd = [python(), os.path.join(ROOT, "example_pyhessian_analysis.py"), "--resume", ckpt,
                   "--no-cuda", "--hessian-batch-size", str(n), "--mini-hessian-batch-size",
                   str(min(args.mini_batch, n)), "--eigenvalue", "--output-dir", tmp]
            if problem.dataset != problem.meta.get("dataset"):
                cmd += ["--dataset", problem.dataset]
            say(f"memory: analysis script, {n} samples ...")
            r = run_process(cmd, timeout=args.subprocess_timeout, echo="    | ")
            out["script"].append(_memory_row(n, r))
    for n in _sizes(args.memory_library_sizes):
        cmd = [python(), "-m", "bench.memory_probe", "--checkpoint", ckpt, "--samples", str(n),
               "--mini-batch", str(args.mini_batch), "--steps", str(args.memory_library_steps),
               "--dataset", problem.dataset]
        say(f"memory: library only, {n} synthetic samples ...")
        r = run_process(cmd, timeout=args.subprocess_timeout, echo="    | ")
        out["library"].append(_memory_row(n, r))
    return out


def _sizes(text):
    return [int(s) for s in str(text).split(",") if s.strip()]


def _memory_row(n, r):
    _t, resident = first_line_time(r["lines"], lambda s: s.startswith("HVP:"))
    _t, setup = first_line_time(r["lines"], lambda s: "set-up" in s)
    row = {"samples": n, "peak_rss_mib": r["peak_rss_mib"], "wall_s": r["wall_s"],
           "returncode": r["returncode"], "timed_out": r["timed_out"],
           "resident_line": resident, "setup_line": setup}
    if r["returncode"] != 0:
        row["tail"] = tail(r["lines"], 8)
    say(f"memory: {n} samples: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['wall_s']:.1f} s, exit "
        f"{r['returncode']}; {resident}")
    return row


# ============================================================================ report
def _rows_products(rec, rows) -> None:
    """Table rows: gradient vs products, blocks, library overhead."""
    p = rec.get("products")
    if p and "gradient" in p:
        g = p["gradient"]["median_s"]
        rows.append(("gradient (all samples)", f"{g:.3f} s", "1.00x"))
        for name in ("double_backward+reuse", "double_backward", "forward_over_reverse"):
            r = p[name]
            rows.append((f"HVP, {name}", f"{r['single']['median_s']:.3f} s",
                         f"{r['ratio_to_gradient']:.2f}x a gradient; first call "
                         f"{r['single'].get('first_s') or float('nan'):.3f} s"))
        b = rec["args"]["block"]
        for name in ("double_backward+reuse", "double_backward", "forward_over_reverse"):
            r = p[name]
            cells = [f"{r['vectors_per_s']:.3f}"] + [
                f"{r[k].get('vectors_per_s', float('nan')):.3f}"
                for k in (f"block{b}", f"block{b}_vmap")]
            rows.append((f"vectors/s {name}: single / block {b} / vmapped", " / ".join(cells),
                         ""))
        o = p.get("library_overhead")
        if o:
            rows.append(("operator vs bare autograd loop",
                         f"{100 * o['overhead_fraction']:+.1f}%",
                         f"{o['operator']['median_s']:.3f} s vs "
                         f"{o['bare_autograd']['median_s']:.3f} s"))

def _rows_threads(rec, rows) -> None:
    """Table rows: 1 vs 2 threads under each OpenMP wait policy."""
    th = rec.get("threads")
    if th and "omp_wait_policy_default" in th:
        for key in ("omp_wait_policy_default", "omp_wait_policy_passive"):
            r = th.get(key, {})
            if "error" in r or not r:
                continue
            cells = sorted(k for k in r if k.startswith("hvp_"))
            rows.append((f"HVP threads {' / '.join(c[4:] for c in cells)}, "
                         f"{key.rsplit('_', 1)[1]} wait", " / ".join(
                             f"{r[c]:.3f} s" for c in cells),
                         f"{th['samples']} samples; load average "
                         f"{th['load_average_before'][0]:.1f}"))

def _rows_variants(rec, rows) -> None:
    """Table rows: torch.compile, channels_last (older records) and the conv section."""
    c = rec.get("compile")
    if c and "eager" in c:
        d = c.get("default", {})
        if "error" in d:
            rows.append(("torch.compile forward-over-reverse", "failed", d["error"][:60]))
        elif d:
            rows.append(("torch.compile forward-over-reverse",
                         f"{d['steady']['median_s']:.3f} s vs "
                         f"{d['eager_interleaved']['median_s']:.3f} s",
                         f"{d['speedup_vs_eager']:.2f}x eager, "
                         f"{d['speedup_vs_double_backward_reuse']:.2f}x double backward+reuse; "
                         f"compile {d['first_call_s']:.0f} s"))
    cl = rec.get("channels_last")  # records before operators/conv.py
    if cl and "speedup" in cl:
        rows.append(("channels_last speed-up: gradient / HVP reuse / recompute",
                     " / ".join(f"{cl['speedup'][k]:.2f}x" for k in (
                         "gradient", "double_backward+reuse", "double_backward")), ""))
    conv = rec.get("conv")
    if conv and "torch" in conv:
        rows.append(("HVP, convolutions torch's / fused / fused + channels-last",
                     " / ".join(f"{conv[k]['median_s']:.3f} s" for k in (
                         "torch", "fused", "fused+channels_last")),
                     f"{conv['fused+channels_last']['speedup']:.2f}x"))


def _rows_eigen(rec, rows) -> None:
    """Table rows: top-1 / top-5, Lanczos vs power iteration."""
    e = rec.get("eigen")
    if e and "top1" in e:
        for k in ("lanczos", "power"):
            r = e["top1"][k]
            rows.append((f"top-1, {k}", f"{r['matvecs']} HVPs, {r['seconds']:.1f} s",
                         f"rel. error {r['rel_error']:.1e}; within 1e-3 after "
                         f"{r['matvecs_to_1e-3']} HVPs"))
        for k in ("lanczos", "power"):
            r = e.get("top5", {}).get(k)
            if r:
                rows.append((f"top-5, {k}", f"{r['matvecs']} HVPs, {r['seconds']:.1f} s",
                             f"max rel. error {r['max_rel_error']:.1e}"))

def _rows_trace(rec, rows) -> None:
    """Table rows: the trace estimators against the reference, and the issue-10 targets."""
    t = rec.get("trace")
    if t and "reference" in t:
        ref = t["reference"]
        rows.append(("trace reference (plain Hutchinson)", f"{ref['trace']:.6g} ± "
                     f"{ref['stderr']:.3g}", f"{ref['probes']} probes"))
        for k in ("hutchinson", "deflated", "hutchinson_pyhessian_rule", "hutchpp_equal_cost",
                  "hutchpp_predicted"):
            r = t.get(k)
            if r:
                rows.append((f"trace, {k}", f"{r['trace']:.6g} ± {r['stderr']:.3g} "
                             f"({100 * r['rse']:.1f}%)", f"{r['matvecs']} HVPs, {r['seconds']:.1f}"
                             f" s, {r['z_own_stderr']:.2f} SE from the reference"))
        g = t.get("targets")
        if g:
            rows.append(("trace targets (issue 10 item 3)",
                         f"{g['deflated_over_plain_products']:.2f} of plain's products",
                         f"<= 1/3: {'yes' if g['cost_target_met (<= 1/3)'] else 'NO'} (plain: "
                         f"{g['plain_cost_used']}, {g['plain_cost_from']}); deflated within 2 "
                         f"SE of the reference: own SE "
                         f"{'yes' if g['deflated_within_2_own_se'] else 'NO'}, combined "
                         f"{'yes' if g['deflated_within_2_combined_se'] else 'NO'}"))

def _rows_rest(rec, rows) -> None:
    """Table rows: SLQ, scaling, peak memory."""
    s = rec.get("slq")
    if s and "seconds" in s:
        rows.append(("SLQ density", f"{s['matvecs']} HVPs, {s['seconds']:.1f} s",
                     f"top node rel. error {s['top_node_rel_error'] or float('nan'):.1e}"))
    sc = rec.get("scaling")
    if sc and "throughput_ratio" in sc:
        ws = rec["args"]["world_size"]
        rows.append((f"world size {ws} vs 1 (one thread each)", f"{sc['throughput_ratio']:.2f}x",
                     f"all-reduce {100 * sc[f'world_{ws}']['max_allreduce_share']:.1f}% of "
                     "product time"))
    m = rec.get("memory")
    if m and "script" in m:
        for r in m["script"] + m["library"]:
            kind = "script" if r in m["script"] else "library"
            rows.append((f"peak RSS, {kind}, {r['samples']} samples",
                         f"{r['peak_rss_mib']:.0f} MiB", (r["resident_line"] or "")[5:]))

def table(rec) -> str:
    """The record as an aligned text table (one row per measurement)."""
    rows = []
    for add in (_rows_products, _rows_threads, _rows_variants, _rows_eigen, _rows_trace,
                _rows_rest):
        add(rec, rows)
    if not rows:
        return "(no sections finished)"
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w}}  {b:<{v}}  {c}" for a, b, c in rows)


def plot(rec, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    p = rec.get("products") or {}
    if "gradient" in p:
        names = ["double_backward+reuse", "double_backward", "forward_over_reverse"]
        axes[0].bar(["gradient"] + names, [1.0] + [p[n]["ratio_to_gradient"] for n in names])
        axes[0].set_ylabel("time / gradient time")
        axes[0].set_title("one product")
        axes[0].tick_params(axis="x", labelrotation=15, labelsize=8)
    e = rec.get("eigen") or {}
    if "top1" in e:
        labels, secs = [], []
        for k in ("top1", "top5"):
            for m in ("lanczos", "power"):
                if m in e.get(k, {}):
                    labels.append(f"{k} {m}\n({e[k][m]['matvecs']} HVPs)")
                    secs.append(e[k][m]["seconds"])
        axes[1].bar(labels, secs, color=["C0", "C1"] * 2)
        axes[1].set_ylabel("seconds")
        axes[1].set_title("top eigenvalues, tol 1e-3")
        axes[1].tick_params(axis="x", labelsize=8)
    t = rec.get("trace") or {}
    names = [k for k in ("hutchinson", "deflated", "hutchpp_equal_cost", "hutchpp_predicted")
             if k in t]
    if names:
        short = {"hutchinson": "plain", "deflated": "deflated", "hutchpp_equal_cost":
                 "Hutch++\nequal cost", "hutchpp_predicted": "Hutch++\npredicted"}
        axes[2].bar([f"{short[k]}\n{100 * t[k]['rse']:.1f}% SE" for k in names],
                    [t[k]["matvecs"] for k in names], color="C2")
        axes[2].set_ylabel("products")
        axes[2].set_title(f"trace to {100 * t['target_rse']:.0f}% relative SE")
        axes[2].tick_params(axis="x", labelsize=8)
    pr = rec.get("problem", {})
    fig.suptitle(f"{pr.get('model')} | {pr.get('samples')} samples | {pr.get('dataset')} | "
                 f"cpu x{rec['environment']['threads']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ main
def main(argv=None):
    args = parse_args(argv)
    sections(args, SECTIONS)  # unknown names fail before anything loads
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = load_problem(args)
    record = Record(args.out, {"benchmark": "bench_hvp", "args": vars(args),
                               "environment": environment(), "problem": problem.describe()},
                    resume_problem=problem if args.resume else None)
    todo = sections(args, SECTIONS, record.done)
    say(f"bench_hvp: {problem.describe()['model']} ({problem.dim:,} parameters), "
        f"{args.samples} {problem.dataset} samples in mini-batches of {args.mini_batch}, "
        f"{torch.get_num_threads()} threads; sections {', '.join(todo)}")
    for note in problem.notes:
        say(f"note: {note}")
    run = {"products": lambda: bench_products(args, problem),
           "threads": lambda: bench_threads(args, problem),
           "compile": lambda: bench_compile(args, problem),
           "conv": lambda: bench_conv(args, problem),
           "eigen": lambda: bench_eigen(args, problem, record),
           "trace": lambda: bench_trace(args, problem, record),
           "slq": lambda: bench_slq(args, problem, record),
           "scaling": lambda: bench_scaling(args, problem),
           "memory": lambda: bench_memory(args, problem)}
    for name in todo:
        if name == "scaling" and args.world_size < 2:
            continue
        record.section(name, run[name])
    print(table(record.data), flush=True)
    if args.plot:
        plot(record.data, args.plot)
        say(f"wrote {args.plot}")
    say(f"wrote {args.out}")
    return 1 if record.data["sections_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
