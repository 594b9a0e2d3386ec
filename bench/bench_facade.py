"""The drop-in path: PyHessian's tutorial calls on ``pyhessian.hessian`` (0.1, bench
requirements) and on ``pyhessian_dist.hessian``, side by side in one process.

    python -m bench.bench_facade                      # ResNet20, data= one batch of 128 and
                                                      # dataloader= 2 x 128 samples, 1 repeat
    python -m bench.bench_facade --batch 32 --samples 64 --mini-batch 32   # a smaller size
    python -m bench.bench_facade --modes data --pyhessian-rule-pool 200    # one mode, then
    python -m bench.bench_facade --modes data,dataloader --resume          # the other

The calls, with their defaults, as the tutorial makes them on one ``hessian`` object per mode
(``data=(inputs, targets)`` and ``dataloader=``): ``eigenvalues()``, ``eigenvalues(top_n=2)``,
``trace()``, ``density()``. Before each call both sides get the same global seed
(``torch.manual_seed``: both draw their vectors from torch's global RNG), and the calls
alternate (PyHessian first on even repeats, ours first on odd ones) so a change in the
machine's load hits both alike. Per call: seconds, products (counted around each side's
product function), the result, and its accuracy against references computed once per mode:
eigenvalues against Lanczos asked for a relative error bound of 1e-8 (float32 products floor
the bound at ~1.2e-6, so it runs all ``--reference-steps`` steps; the record keeps the bounds), the
trace against a deflated Hutchinson reference to ``--trace-reference-rse`` (default 1%), the
density's largest node against the reference lambda_1. The ratio is PyHessian's mean seconds
over ours (> 1: ours faster). ``trace()`` stops after a random number of probes on both sides,
so it is repeated ``--trace-repeats`` times (other calls ``--repeats``), and with
``--pyhessian-rule-pool N`` PyHessian's stopping rule is replayed 20,000 times on N plain probes
of the same Hessian (resampled with replacement; the pool's mean is the truth of the replay):
the distribution of its probe count and of its relative error. Also one product of each side
(median of ``--product-repeats``), which separates per-product cost from the number of products.
Writes ``bench/results-facade-cpu.json`` (``--out``) and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

from bench import common
from bench.common import CE, Record, load_problem, say
from bench.peers import _torch_eig_shim
from pyhessian_dist import HessianOperator, hutchinson_trace, lanczos_eigenpairs

CALLS = {"eigenvalues()": {}, "eigenvalues(top_n=2)": {"top_n": 2}, "trace()": {},
         "density()": {}}
MODES = ("data", "dataloader")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_problem_arguments(p, samples=256, mini_batch=128)
    p.set_defaults(reference_steps=120)
    p.add_argument("--trace-reference-rse", type=float, default=0.01,
                   help="relative standard error of the deflated Hutchinson trace reference "
                        "(0: none; each side's own standard error is shown instead)")
    p.add_argument("--trace-repeats", type=int, default=5,
                   help="times trace() is made per side (its cost is random)")
    p.add_argument("--pyhessian-rule-pool", type=int, default=0,
                   help="plain probes on which PyHessian's trace stopping rule is replayed "
                        "(0: not done)")
    p.add_argument("--batch", type=int, default=128,
                   help="samples of the data= batch (the first ones of the dataloader's)")
    p.add_argument("--modes", default="data,dataloader", help="data, dataloader or both")
    p.add_argument("--calls", default=",".join(CALLS),
                   help="comma-separated subset of " + ", ".join(CALLS))
    p.add_argument("--repeats", type=int, default=1, help="times each call is made per side")
    p.add_argument("--product-repeats", type=int, default=3,
                   help="single products timed per side and mode")
    p.add_argument("--out", default="bench/results-facade-cpu.json")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- the two sides
@contextlib.contextmanager
def _counted_pyhessian(h):
    """PyHessian's products counted: its data= path calls the module's
    ``hessian_vector_product``, its dataloader= path ``h.dataloader_hv_product``."""
    import pyhessian  # noqa: F401 - its package attribute `hessian` is the class, not the module

    module = sys.modules["pyhessian.hessian"]
    count = [0]
    product, loader_product = module.hessian_vector_product, h.dataloader_hv_product

    def counted(*a, **k):
        count[0] += 1
        return product(*a, **k)

    def loader_counted(v):
        count[0] += 1
        return loader_product(v)

    module.hessian_vector_product, h.dataloader_hv_product = counted, loader_counted
    try:
        yield count
    finally:
        module.hessian_vector_product = product
        del h.dataloader_hv_product  # the class's method again


def make_side(side, model, kw):
    """``(hessian object, construction seconds)`` of one side."""
    if side == "pyhessian":
        from pyhessian import hessian
    else:
        from pyhessian_dist import hessian
    t0 = time.perf_counter()
    h = hessian(model, CE, cuda=False, **kw)
    return h, time.perf_counter() - t0


def call(side, h, name, seed):
    """``(value, seconds, products)`` of one tutorial call on one side."""
    torch.manual_seed(seed)
    kwargs = CALLS[name]
    with contextlib.ExitStack() as stack:
        count = stack.enter_context(_counted_pyhessian(h)) if side == "pyhessian" else None
        if name == "density()":
            stack.enter_context(_torch_eig_shim())
        before = h.operator.num_matvecs if side == "ours" else 0
        t0 = time.perf_counter()
        if name.startswith("eigenvalues"):
            out = [float(v) for v in h.eigenvalues(**kwargs)[0]]
        elif name == "trace()":
            out = [float(s) for s in h.trace()]
        else:
            nodes, weights = h.density()
            out = {"nodes": [float(x) for x in nodes[0]],
                   "weights": [float(x) for x in weights[0]]}
        seconds = time.perf_counter() - t0
        n = count[0] if count is not None else h.operator.num_matvecs - before
    if side == "pyhessian":
        h.model.zero_grad(set_to_none=True)
    return out, seconds, n


def one_product(side, h, repeats):
    """Median seconds of one product ``H v`` through each side's own product."""
    v = [torch.randn_like(p) for p in h.params]
    if side == "pyhessian" and not h.full_dataset:
        from pyhessian.utils import hessian_vector_product

        def fn():
            return hessian_vector_product(h.gradsH, h.params, v)
    else:
        def fn():
            return h.dataloader_hv_product(v)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


# ---------------------------------------------------------------------------- references
def references(args, batches, reference_seed=11) -> dict:
    """lambda_1, lambda_2 (Lanczos, relative error bound 1e-8) and, with
    --trace-reference-rse R, a deflated Hutchinson trace to that relative standard error, on
    ``batches``."""
    op = HessianOperator(args.problem.model_copy(), CE, batches)
    res = lanczos_eigenpairs(op, 2, tol=1e-8, max_steps=args.reference_steps,
                             generator=common.generator(reference_seed))
    ref = {"top2": res.eigenvalues, "error_bounds": res.error_bounds,
           "converged": res.converged, "products": res.num_matvecs}
    if args.trace_reference_rse:
        tr = hutchinson_trace(op, max_iter=10_000, rse=args.trace_reference_rse, deflate="auto",
                              generator=common.generator(reference_seed + 1))
        ref["trace"] = {"trace": tr.trace, "stderr": tr.stderr, "probes": len(tr.samples),
                        "products": tr.num_matvecs, "method": "deflated hutchinson",
                        "deflation": tr.deflation}
    say(f"reference: top-2 {res.eigenvalues} (bounds {res.error_bounds}, "
        f"{res.num_matvecs} products)" + (f", trace {ref['trace']['trace']:.6g} ± "
                                          f"{ref['trace']['stderr']:.2g}" if "trace" in ref
                                          else ""))
    if args.pyhessian_rule_pool:
        ref["pyhessian_rule"] = replay_pyhessian_rule(op, args.pyhessian_rule_pool,
                                                      common.generator(reference_seed + 2))
        say(f"PyHessian's trace rule replayed: {ref['pyhessian_rule']}")
    return ref


def pyhessian_rule(draws: torch.Tensor, tol: float = 1e-3):
    """PyHessian's trace stopping rule on each row of ``draws`` (replays, max_iter): after probe
    n it stops when |mean_n - mean_{n-1}| / (mean_{n-1} + 1e-6) < tol (mean_0 = 0; PyHessian 0.1
    divides by the signed mean, so a negative running mean stops it), else at the last column.
    Returns (probes used, the mean it returns) per row."""
    n = draws.shape[1]
    means = draws.cumsum(1) / torch.arange(1, n + 1, dtype=draws.dtype)
    prev = torch.cat([torch.zeros_like(means[:, :1]), means[:, :-1]], 1)
    stop = (means - prev).abs() / (prev + 1e-6) < tol
    stop[:, -1] = True
    k = stop.to(torch.int8).argmax(1)  # the first probe after which it stops
    return k + 1, means[torch.arange(len(draws)), k]


def replay_pyhessian_rule(op, pool_size, generator, replays=20_000, max_iter=100, tol=1e-3):
    """PyHessian's ``trace()`` stopping rule (stop when the running mean changes by < tol
    relatively, at most max_iter probes) replayed on probes resampled from ``pool_size`` plain
    Rademacher probes of ``op``: how many probes it takes and how far its mean lands from the
    pool's mean (the truth of the replay)."""
    pool = torch.tensor(hutchinson_trace(op, max_iter=pool_size, tol=None, rse=1e-12,
                                         min_probes=pool_size, generator=generator).samples,
                        dtype=torch.float64)
    truth = float(pool.mean())
    draws = pool[torch.randint(0, pool_size, (replays, max_iter), generator=generator)]
    probes, means = pyhessian_rule(draws, tol)
    err = ((means - truth) / abs(truth)).abs()
    probes = probes.to(torch.float64)
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    return {"pool_probes": pool_size, "pool_mean": truth,
            "per_probe_relative_sd": float(pool.std() / abs(truth)), "replays": replays,
            "probes_mean": float(probes.mean()), "probes_q10_q50_q90": probes.quantile(q).tolist(),
            "relative_error_rms": float(err.pow(2).mean().sqrt()),
            "relative_error_q10_q50_q90": err.quantile(q).tolist()}


def accuracy(name, out, ref) -> dict:
    """How far a call's result is from the references (relative errors; the trace's own
    standard error from its samples)."""
    if name.startswith("eigenvalues"):
        errs = [abs(v - r) / abs(r) for v, r in zip(out, ref["top2"])]
        return {"relative_errors": errs, "max_relative_error": max(errs)}
    if name == "trace()":
        s = torch.tensor(out, dtype=torch.float64)
        mean = float(s.mean())
        se = float(s.std() / len(out) ** 0.5) if len(out) > 1 else float("nan")
        acc = {"trace": mean, "stderr": se, "probes": len(out),
               "relative_stderr": se / abs(mean)}
        if "trace" in ref:
            acc["relative_error"] = abs(mean - ref["trace"]["trace"]) / abs(ref["trace"]["trace"])
        return acc
    top = max(out["nodes"])
    return {"top_node": top, "top_node_relative_error": abs(top - ref["top2"][0]) / ref["top2"][0],
            "weights_sum": sum(out["weights"])}


# ---------------------------------------------------------------------------- one mode
def run_mode(args, mode) -> dict:
    batches = args.problem.batches
    kw = {"data": (batches[0][0][:args.batch], batches[0][1][:args.batch])} \
        if mode == "data" else {"dataloader": batches}
    ref_batches = [kw["data"]] if mode == "data" else batches
    ref = references(args, ref_batches)
    sides = {}
    for side in ("pyhessian", "ours"):
        h, secs = make_side(side, args.problem.model_copy(), kw)
        sides[side] = {"h": h, "construction_s": secs,
                       "one_product_s": one_product(side, h, args.product_repeats)}
    out = {"reference": ref, "calls": {},
           **{f"{side}_{k}": s[k] for side, s in sides.items()
              for k in ("construction_s", "one_product_s")}}
    out["one_product_ratio"] = out["pyhessian_one_product_s"] / out["ours_one_product_s"]
    for name in args.call_names:
        runs = {"pyhessian": [], "ours": []}
        for r in range(args.trace_repeats if name == "trace()" else args.repeats):
            order = ("pyhessian", "ours") if r % 2 == 0 else ("ours", "pyhessian")
            for side in order:
                value, secs, n = call(side, sides[side]["h"], name, args.seed + 1000 * r)
                runs[side].append({"seconds": secs, "products": n,
                                   "accuracy": accuracy(name, value, ref), "value": value})
                say(f"{mode} {name} {side}: {secs:.1f} s, {n} products, "
                    f"{_accuracy_text(runs[side][-1]['accuracy'])}")
        mean = {s: statistics.fmean(x["seconds"] for x in runs[s]) for s in runs}
        out["calls"][name] = {"runs": runs, "mean_s": mean,
                              "mean_products": {s: statistics.fmean(x["products"]
                                                                    for x in runs[s])
                                                for s in runs},
                              "ratio": mean["pyhessian"] / mean["ours"]}
        if name == "trace()" and "trace" in ref:
            for side in runs:
                errs = [x["accuracy"]["relative_error"] for x in runs[side]]
                out["calls"][name].setdefault("relative_error_rms", {})[side] = \
                    statistics.fmean(e * e for e in errs) ** 0.5
    return out


def _accuracy_text(acc) -> str:
    if "max_relative_error" in acc:
        return f"max relative error {acc['max_relative_error']:.1e}"
    if "probes" in acc:
        return (f"trace {acc['trace']:.5g} ± {acc['stderr']:.2g} ({acc['probes']} probes)"
                + (f", relative error {acc['relative_error']:.1e}" if "relative_error" in acc
                   else ""))
    return f"top node relative error {acc['top_node_relative_error']:.1e}"


# ---------------------------------------------------------------------------- main
def table(record) -> list[str]:
    lines = ["| mode | call | PyHessian s (products) | ours s (products) | ratio | PyHessian "
             "accuracy | ours accuracy |", "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        sec = record.get(mode)
        if not sec or "calls" not in sec:
            continue
        lines.append(f"| {mode} | one product | {sec['pyhessian_one_product_s']:.2f} | "
                     f"{sec['ours_one_product_s']:.2f} | {sec['one_product_ratio']:.2f}x | | |")
        for name, c in sec["calls"].items():
            p, o = c["runs"]["pyhessian"], c["runs"]["ours"]
            rms = c.get("relative_error_rms")
            acc = ({s: f"RMS relative error {rms[s]:.3f} over {len(c['runs'][s])} calls"
                    for s in rms} if rms else
                   {s: "; ".join(_accuracy_text(x["accuracy"]) for x in c["runs"][s])
                    for s in ("pyhessian", "ours")})
            lines.append(
                f"| {mode} | `{name}` | {c['mean_s']['pyhessian']:.1f} "
                f"({'/'.join(str(x['products']) for x in p)}) | {c['mean_s']['ours']:.1f} "
                f"({'/'.join(str(x['products']) for x in o)}) | {c['ratio']:.2f}x | "
                f"{acc['pyhessian']} | {acc['ours']} |")
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.call_names = [c.strip() for c in args.calls.split(",") if c.strip()]
    unknown = [c for c in args.call_names if c not in CALLS]
    if unknown:
        raise SystemExit(f"error: unknown call(s) {unknown}; choose from {list(CALLS)}")
    args.problem = load_problem(args)
    record = Record(args.out, {"benchmark": "bench_facade", "args": {
        k: v for k, v in vars(args).items() if k != "problem"},
        "environment": common.environment(), "problem": args.problem.describe()},
        resume_problem=args.problem if args.resume else None)
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        if mode not in record.done:
            record.section(mode, lambda mode=mode: run_mode(args, mode))
    record.data["load_average_at_end"] = list(os.getloadavg())
    record.save()
    print("\n".join(table(record.data)))
    return 1 if record.data["sections_failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
