"""Ours vs PyHessian, hessian-eigenthings and curvlinops, side by side in one run.

Same model, same samples, same mini-batches, same process, one tool after the other:

    python -m bench.bench_peers --checkpoint checkpoints/net.pkl --samples 1000 --mini-batch 200

Sections (``--sections a,b,...``; default all):
  top1, top5  top eigenvalue(s): ours = Lanczos (tol 1e-3, the script's defaults); each peer at
              its own defaults (bench/peers.py): PyHessian's power iteration (maxIter 100, tol
              1e-3), hessian-eigenthings' deflated power iteration (max_iter 100, tol 1e-4),
              curvlinops + scipy eigsh (tol 0, scipy's default)
  trace       to a relative standard error of --trace-rse: ours = deflated Hutchinson
              (deflate="auto", stops at the target); the peers get the number of probes a pilot
              (the reference run's per-probe spread) says plain Hutchinson needs for the target
  density     SLQ with --density-steps Lanczos steps (curvlinops: lanczos_approximate_spectrum,
              which first runs eigsh for the spectrum's ends)
  whole       whole processes, alternately: example_pyhessian_analysis.py --eigenvalue with
              default flags (and --top-n 5) vs bench/pyhessian_script.py (the same with
              PyHessian), wall time from start to exit, and our set-up share

Every in-process task builds its tool's objects inside the timed call (a user pays for them),
so our operator's first pass (loss, gradient, kept graphs) counts against us. Accuracy is
against a tightly converged Lanczos (eigenvalues) and a long plain-Hutchinson run (trace); both
are computed first (or read with --reference-from). The JSON (--out) is rewritten after every
task; --plot draws seconds per task per tool with the accuracy on each bar; the markdown table
at the end is ready for the README.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import warnings

import torch

from bench import common, peers
from bench.common import (
    environment,
    first_line_time,
    generator,
    max_rel_error,
    python,
    references,
    rel_error,
    say,
    sections,
    tail,
    timed,
)
from pyhessian_dist import hutchinson_trace, lanczos_eigenpairs, slq_density

SECTIONS = ("top1", "top5", "trace", "density", "whole")
PEERS = ("pyhessian", "eigenthings", "curvlinops")
TOOLS = ("ours",) + PEERS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    common.add_problem_arguments(p, samples=1000, mini_batch=200)
    p.add_argument("--skip-peer", action="append", default=[], choices=PEERS,
                   help="leave this peer out (repeatable)")
    p.add_argument("--density-steps", type=int, default=100,
                   help="Lanczos steps of every tool's density")
    p.add_argument("--trace-rse", type=float, default=0.02,
                   help="target relative standard error of the trace")
    p.add_argument("--trace-max-probes", type=int, default=1000,
                   help="cap on the probes given to each peer (and on ours)")
    p.add_argument("--eigenthings-trace", choices=("hutchinson", "hutch++"),
                   default="hutchinson",
                   help="hessian-eigenthings' estimator (hutch++ is its trace() default; its "
                        "standard error covers only the residual part)")
    p.add_argument("--curvlinops-trace-block", type=int, default=1,
                   help="probes per curvlinops hutchinson_trace call (1: per-probe samples give "
                        "the standard error; more: its vmapped multi-vector product)")
    p.add_argument("--whole-repeats", type=int, default=2,
                   help="alternating whole-process runs per tool and task")
    p.add_argument("--whole-top-n", default="1,5", help="top-n values of the whole-process runs")
    p.add_argument("--out", default=os.path.join("bench", "results-peers-cpu.json"),
                   help="JSON record, rewritten after every task")
    p.add_argument("--plot", default=os.path.join("misc", "bench_peers_cpu.png"),
                   help="figure: seconds per task per tool ('' for none)")
    return p.parse_args(argv)


def tools(args) -> list[str]:
    """Ours and the installed peers not skipped (missing ones are reported, not fatal)."""
    have = peers.available()
    out = ["ours"]
    for peer in PEERS:
        if peer in args.skip_peer:
            continue
        if have.get(peer) is None:
            say(f"note: peer {peer} is not installed (pip install -r bench/requirements.txt); "
                "left out")
            continue
        out.append(peer)
    return out


# ============================================================================ in-process tasks
def ours(task, problem, args, probes=None):
    """Our library on the task, the operator built inside the timed call; peers.py's shape."""
    def call():
        op = problem.operator()
        if task in ("top1", "top5"):
            k = 1 if task == "top1" else 5
            r = lanczos_eigenpairs(op, k, tol=1e-3, max_steps=100, generator=generator(1))
            return (r.eigenvalues[0] if k == 1 else r.eigenvalues), None, op, {
                "routine": "lanczos_eigenpairs", "settings": {"k": k, "tol": 1e-3,
                                                              "max_steps": 100},
                "error_bounds": r.error_bounds, "converged": r.converged}
        if task == "trace":
            r = hutchinson_trace(op, rse=args.trace_rse, deflate="auto",
                                 max_iter=args.trace_max_probes, block_size=4,
                                 generator=generator(2))
            return r.trace, r.stderr, op, {
                "routine": "hutchinson_trace", "settings": {"rse": args.trace_rse,
                                                            "deflate": "auto", "block_size": 4},
                "probes": len(r.samples), "deflation": r.deflation, "converged": r.converged}
        d = slq_density(op, num_steps=args.density_steps, generator=generator(3))
        return {"nodes": d.nodes, "weights": d.weights}, None, op, {
            "routine": "slq_density", "settings": {"num_steps": args.density_steps}}

    (value, stderr, op, info), secs = timed(call)
    info["operator"] = op.stats()
    return {"value": value, "stderr": stderr, "matvecs": op.num_matvecs, "seconds": secs,
            "info": info}


def peer_options(tool, task, args, probes):
    if task == "trace":
        opts = {"probes": probes}
        if tool == "eigenthings":
            opts["method"] = args.eigenthings_trace
        if tool == "curvlinops":
            opts["block"] = args.curvlinops_trace_block
        return opts
    if task == "density":
        return {"steps": args.density_steps}
    return {}


def accuracy(task, out, ref):
    """What each task's accuracy is measured by, against the references."""
    eig, tr = ref.get("eigen") or {}, ref.get("trace") or {}
    v = out["value"]
    if task == "top1":
        return {"rel_error": rel_error(v, eig["top5"][0])}
    if task == "top5":
        return {"max_rel_error": max_rel_error(v, eig["top5"])}
    if task == "trace":
        se = out.get("stderr")
        z = None
        if se is not None and se == se:
            z = abs(v - tr["trace"]) / math.sqrt(se ** 2 + tr["stderr"] ** 2)
        return {"rel_error": rel_error(v, tr["trace"]),
                "rse": None if se is None else se / abs(v), "z_combined": z}
    nodes = v.get("nodes")
    if not nodes:  # curvlinops returns a smoothed curve only
        return {"top_node_rel_error": None, "note": "no quadrature nodes returned"}
    return {"top_node_rel_error": rel_error(max(max(n) for n in nodes), eig["top5"][0])}


def accuracy_text(task, acc) -> str:
    if task == "top1":
        return f"rel. err {acc['rel_error']:.1e}"
    if task == "top5":
        return f"max rel. err {acc['max_rel_error']:.1e}"
    if task == "trace":
        rse = "n/a" if acc["rse"] is None else f"{100 * acc['rse']:.1f}%"
        z = "n/a" if acc["z_combined"] is None else f"{acc['z_combined']:.1f}"
        return f"SE {rse}, {z} SE from ref."
    e = acc.get("top_node_rel_error")
    return "top node n/a" if e is None else f"top node rel. err {e:.1e}"


def run_task(task, problem, args, record, ref, todo_tools):
    out = record.data[task] = {}
    probes = None
    if task == "trace":
        tr = ref["trace"]
        probes = min(args.trace_max_probes, max(10, math.ceil(
            (tr["per_probe_sd"] / (args.trace_rse * abs(tr["trace"]))) ** 2)))
        out["probes_for_peers"] = probes
        say(f"trace: the pilot (reference per-probe sd {tr['per_probe_sd']:.4g}) gives the "
            f"peers {probes} probes for {100 * args.trace_rse:.0f}%")
    for i, tool in enumerate(todo_tools):
        say(f"{task}: {tool} ...")
        try:
            if tool == "ours":
                r = ours(task, problem, args)
            else:
                opts = peer_options(tool, task, args, probes)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # a seed per tool: independent probes (PyHessian and eigenthings draw the
                    # same Rademacher vectors from the same seed)
                    r = peers.run(tool, task, problem.model_copy(), common.CE,
                                  problem.batches, "cpu", i, **opts)
            r["accuracy"] = accuracy(task, r, ref)
        except Exception as exc:  # noqa: BLE001 - one tool's failure is a result, not a crash
            r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            say(f"{task}: {tool} FAILED: {r['error']}")
        if task == "density" and "value" in r:
            r["value"] = _density_summary(r["value"])
        out[tool] = r
        if "ours" in out and "seconds" in out["ours"]:
            for row in out.values():
                if isinstance(row, dict) and "seconds" in row:
                    row["ratio_to_ours"] = row["seconds"] / out["ours"]["seconds"]
        if "error" not in r:
            say(f"{task}: {tool}: {_value_text(task, r)}, {r['matvecs']} products, "
                f"{r['seconds']:.1f} s; {accuracy_text(task, r['accuracy'])}")
        record.save()
    return out


def _density_summary(value):
    """Keep the nodes and weights (small); the curves of curvlinops only by their extent."""
    if "grid" in value:
        return {"grid_min": min(value["grid"]), "grid_max": max(value["grid"]),
                "points": len(value["grid"])}
    return value


def _value_text(task, r):
    v = r["value"]
    if task == "top1":
        return f"{v:.7g}"
    if task == "top5":
        return "[" + ", ".join(f"{x:.6g}" for x in v) + "]"
    if task == "trace":
        se = r.get("stderr")
        return f"{v:.6g}" + (f" ± {se:.3g}" if se is not None else "")
    return "density"


# ============================================================================ whole processes
def run_whole(args, problem, record, ref):
    """Whole processes, alternately: our analysis script (default flags) vs a PyHessian script
    doing the same, wall time from start to exit; accuracy against the reference."""
    out = record.data["whole"] = {"runs": []}
    ckpt = common.checkpoint_path(args.checkpoint)
    tops = [int(s) for s in args.whole_top_n.split(",") if s.strip()]
    use_pyhessian = "pyhessian" not in args.skip_peer and peers.available().get("pyhessian")
    for rep in range(args.whole_repeats):
        for k in tops:
            order = ["ours", "pyhessian"] if rep % 2 == 0 else ["pyhessian", "ours"]
            for tool in order:
                if tool == "pyhessian" and not use_pyhessian:
                    continue
                with tempfile.TemporaryDirectory(prefix="bench-whole-") as tmp:
                    if tool == "ours":
                        cmd = [python(), os.path.join(common.ROOT, "example_pyhessian_analysis.py"),
                               "--resume", ckpt, "--no-cuda", "--hessian-batch-size",
                               str(args.samples), "--mini-hessian-batch-size",
                               str(args.mini_batch), "--eigenvalue", "--output-dir", tmp]
                        if k != 1:
                            cmd += ["--top-n", str(k)]
                        if problem.dataset != problem.meta.get("dataset"):
                            cmd += ["--dataset", problem.dataset]
                    else:
                        cmd = [python(), "-m", "bench.pyhessian_script", "--checkpoint", ckpt,
                               "--samples", str(args.samples), "--mini-batch",
                               str(args.mini_batch), "--top-n", str(k), "--dataset",
                               problem.dataset, "--seed", str(args.seed)]
                    say(f"whole: top-{k}, {tool}, run {rep + 1}/{args.whole_repeats} ...")
                    r = common.run_process(cmd, timeout=args.subprocess_timeout)
                    row = _whole_row(tool, k, rep, r, tmp, ref)
                out["runs"].append(row)
                say(f"whole: top-{k}, {tool}: {row['wall_s']:.1f} s, exit {row['returncode']}, "
                    f"{row.get('matvecs')} products, accuracy {row.get('accuracy')}, set-up "
                    f"share {row.get('setup_share')}")
                out["summary"] = _whole_summary(out["runs"])
                record.save()
    return out


def _whole_row(tool, k, rep, r, out_dir, ref):
    import json

    row = {"tool": tool, "top_n": k, "repeat": rep, "wall_s": r["wall_s"],
           "returncode": r["returncode"], "peak_rss_mib": r["peak_rss_mib"],
           "timed_out": r["timed_out"], "exit_after_last_line_s": r["exit_after_last_line_s"]}
    values = None
    if tool == "ours":
        # set-up = everything before the first product: the "HVP: ..." line closes it
        row["timeline_s"] = {name: first_line_time(r["lines"], test)[0] for name, test in (
            ("first_line (imports, checks)", lambda s: s.startswith("pyhessian-dist")),
            ("loading", lambda s: s.startswith("loading the model")),
            ("data loaded, building operator", lambda s: s.startswith("building the Hessian")),
            ("operator built", lambda s: s.startswith("HVP:")),
            ("first product done", lambda s: "[eigenvalue] HVP" in s),
            ("result printed", lambda s: s.startswith("***Top Eigenvalues")),
            ("files written", lambda s: s.startswith("wrote ")))}
        row["setup_s"] = row["timeline_s"]["operator built"]
        path = os.path.join(out_dir, "results.json")
        if r["returncode"] == 0 and os.path.exists(path):
            with open(path) as fh:
                res = json.load(fh)
            values = res["results"]["eigenvalue"]["eigenvalues"]
            row["matvecs"] = res["results"]["eigenvalue"]["num_matvecs"]
            row["seconds_total_in_worker"] = res["seconds_total"]
            row["analysis_seconds"] = res["costs"]["eigenvalue"]["seconds"]
            row["timings"] = res.get("timings")  # the run's own phases (start-up, data, ...)
    else:
        t_setup, _ = first_line_time(r["lines"], lambda s: s.startswith("computing"))
        row["setup_s"] = t_setup
        _, line = first_line_time(r["lines"], lambda s: s.startswith("RESULT "))
        if line:
            res = json.loads(line[len("RESULT "):])
            values = res["eigenvalues"]
            row["matvecs"] = res["num_matvecs"]
    if row.get("setup_s") is not None:
        row["setup_share"] = round(row["setup_s"] / r["wall_s"], 3)
    if values is not None:
        row["values"] = values
        top = (ref.get("eigen") or {}).get("top5")
        if top:
            row["accuracy"] = max_rel_error(values, top[: len(values)])
    if r["returncode"] != 0:
        row["tail"] = tail(r["lines"], 8)
    return row


def _whole_summary(runs):
    """Median wall time, products, worst accuracy and set-up share per (tool, top-n); the
    speed-up of ours over PyHessian."""
    import statistics

    out = {}
    for k in sorted({r["top_n"] for r in runs}):
        entry = {}
        for tool in ("ours", "pyhessian"):
            rows = [r for r in runs if r["top_n"] == k and r["tool"] == tool
                    and r["returncode"] == 0]
            if not rows:
                continue
            acc = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
            share = [r["setup_share"] for r in rows if r.get("setup_share") is not None]
            entry[tool] = {"runs": len(rows),
                           "wall_s_median": statistics.median(r["wall_s"] for r in rows),
                           "wall_s_all": [r["wall_s"] for r in rows],
                           "matvecs": [r.get("matvecs") for r in rows],
                           "max_rel_error": max(acc) if acc else None,
                           "setup_share_median": statistics.median(share) if share else None,
                           "peak_rss_mib_max": max(r["peak_rss_mib"] or 0 for r in rows)}
        if "ours" in entry and "pyhessian" in entry:
            entry["speedup_ours_vs_pyhessian"] = (entry["pyhessian"]["wall_s_median"]
                                                  / entry["ours"]["wall_s_median"])
        out[f"top{k}"] = entry
    return out


# ============================================================================ report
def markdown(rec) -> str:
    lines = ["| task | tool | value | accuracy | products | seconds | vs ours |",
             "|---|---|---|---|---|---|---|"]
    for task in ("top1", "top5", "trace", "density"):
        block = rec.get(task) or {}
        for tool in TOOLS:
            r = block.get(tool)
            if not r:
                continue
            if "error" in r:
                lines.append(f"| {task} | {tool} | failed: {r['error'][:60]} | | | | |")
                continue
            ratio = r.get("ratio_to_ours")
            lines.append(f"| {task} | {tool} | {_value_text(task, r)} | "
                         f"{accuracy_text(task, r['accuracy'])} | {r['matvecs']} | "
                         f"{r['seconds']:.1f} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    summary = (rec.get("whole") or {}).get("summary") or {}
    for key, entry in summary.items():
        for tool in ("ours", "pyhessian"):
            e = entry.get(tool)
            if not e:
                continue
            acc = "n/a" if e["max_rel_error"] is None else f"max rel. err {e['max_rel_error']:.1e}"
            extra = (f"; set-up {100 * e['setup_share_median']:.0f}%"
                     if tool == "ours" and e["setup_share_median"] is not None else "")
            ratio = e["wall_s_median"] / entry["ours"]["wall_s_median"] if "ours" in entry \
                else None
            lines.append(f"| whole process {key} | {tool} | median of {e['runs']} | {acc}{extra} "
                         f"| {e['matvecs']} | {e['wall_s_median']:.1f} | "
                         f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def plot(rec, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, cells = [], {}
    for task in ("top1", "top5", "trace", "density"):
        block = rec.get(task) or {}
        rows = {t: r for t, r in block.items() if t in TOOLS and isinstance(r, dict)
                and "seconds" in r}
        if rows:
            tasks.append(task)
            for t, r in rows.items():
                cells[(task, t)] = (r["seconds"], _short_acc(task, r["accuracy"]), r["matvecs"])
    for key, entry in ((rec.get("whole") or {}).get("summary") or {}).items():
        label = f"whole {key}"
        for t in ("ours", "pyhessian"):
            if t in entry:
                e = entry[t]
                acc = "" if e["max_rel_error"] is None else f"{e['max_rel_error']:.0e}"
                cells[(label, t)] = (e["wall_s_median"], acc, None)
        if any((label, t) in cells for t in TOOLS):
            tasks.append(label)
    if not tasks:
        return False
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(tasks)), 4.8))
    width = 0.8 / len(TOOLS)
    for i, tool in enumerate(TOOLS):
        xs, ys, notes = [], [], []
        for j, task in enumerate(tasks):
            if (task, tool) in cells:
                secs, acc, n = cells[(task, tool)]
                xs.append(j + (i - (len(TOOLS) - 1) / 2) * width)
                ys.append(secs)
                notes.append(acc + (f"\n{n} HVP" if n is not None else ""))
        if not xs:
            continue
        bars = ax.bar(xs, ys, width, label=tool, color=f"C{i}")
        for bar, note in zip(bars, notes):
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=6, rotation=90,
                        xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log scale)")
    ax.legend(fontsize=8)
    pr = rec.get("problem", {})
    ax.set_title(f"{pr.get('model')} | {pr.get('samples')} {pr.get('dataset')} samples in "
                 f"mini-batches of {pr.get('mini_batch')} | cpu x{rec['environment']['threads']}"
                 " | bar labels: error vs reference, products", fontsize=9)
    ymin, ymax = ax.get_ylim()
    ax.set_ylim(ymin, ymax * 6)  # room for the labels
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def _short_acc(task, acc):
    if task == "top1":
        e = acc.get("rel_error")
    elif task == "top5":
        e = acc.get("max_rel_error")
    elif task == "trace":
        rse = acc.get("rse")
        return "" if rse is None else f"{100 * rse:.1f}% SE"
    else:
        e = acc.get("top_node_rel_error")
    return "" if e is None else f"{e:.0e}"


# ============================================================================ main
def main(argv=None):
    args = parse_args(argv)
    sections(args, SECTIONS)  # unknown names fail before anything loads
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = common.load_problem(args)
    todo_tools = tools(args)
    record = common.Record(args.out, {"benchmark": "bench_peers", "args": vars(args),
                               "environment": environment(), "problem": problem.describe(),
                               "peers": peers.available(), "tools": todo_tools},
                    resume_problem=problem if args.resume else None)
    todo = sections(args, SECTIONS, record.done)
    say(f"bench_peers: {problem.describe()['model']} ({problem.dim:,} parameters), "
        f"{args.samples} {problem.dataset} samples in mini-batches of {args.mini_batch}, "
        f"{torch.get_num_threads()} threads; tools {', '.join(todo_tools)}; sections "
        f"{', '.join(todo)}")
    for note in problem.notes:
        say(f"note: {note}")
    need = tuple(k for k, tasks in (("eigen", {"top1", "top5", "density", "whole"}),
                                    ("trace", {"trace"})) if tasks & set(todo))
    ref = None

    def refs():
        nonlocal ref
        ref = references(args, problem, record, need)
        return {k: v for k, v in ref.items() if not k.startswith("_")}

    if record.section("reference", refs) is None:
        say("no reference: accuracies cannot be computed; stopping")
        return 1
    for task in todo:
        if task == "whole":
            record.section("whole", lambda: run_whole(args, problem, record, ref))
        else:
            record.section(task, lambda task=task: run_task(task, problem, args, record, ref,
                                                            todo_tools))
    table = markdown(record.data)
    record.data["markdown"] = table
    record.save()
    print(table, flush=True)
    if args.plot and plot(record.data, args.plot):
        say(f"wrote {args.plot}")
    say(f"wrote {args.out}")
    return 1 if record.data["sections_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
