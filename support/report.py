"""What rank 0 tells the user and writes: the set-up lines and the results record.

``describe_setup`` gives the lines printed before the first product (model, data, launch,
memory); ``run_record`` builds results.json (configuration, environment, model, data, every
analysis's results and costs); ``write_outputs`` stages results.json first, then every
analysis's files and the convergence figure, and commits them as one set (see ``outputs``);
``output_files`` lists the files an output folder manages; ``side_by_side`` prints several
curvatures' results next to each other.

Several curvatures (``--curvature hessian,ggn``) analysed in one run each have their own
``Context`` (``ctxs``, in the order given): results.json then maps each name to its results,
costs and operator statistics, each unit's files and the convergence figure are written once
per curvature with the name before the extension (``per_layer.ggn.png``), and the ESDs of all
of them are overlaid in example.pdf/png. With one curvature everything is as for the Hessian
alone, plus ``"curvatures": [name]``.
"""
from __future__ import annotations

import math
import os
import platform
import time

import torch

import pyhessian_dist
from support.figures import density_generate, plot_convergence, plot_esd_overlay
from support.outputs import OutputError, RunOutputs, tagged_name

__all__ = ["PHASES", "attention_line", "describe_device", "describe_setup", "finish_timings",
           "gradient_norm", "output_files", "process_start_time", "run_record", "side_by_side",
           "timings_line", "write_outputs"]

# The phases of an analysis run (results.json "timings", key -> words of the timing line):
# startup: from the launching process's start (as the OS records it, or the script's first
#   statement when the process was exec'd from an earlier one: the interpreter, imports,
#   parsing, checking the problem, starting the workers) to rank 0's worker start;
# data: loading the model and this rank's Hessian mini-batches (rank 0);
# setup_pass: building the operators (the first-order pass over the samples), every curvature;
# products: the analyses' runs (their products and the linear algebra between them);
# writing: building the record and staging every output file (figures included) before the
#   commit moves them into place.
PHASES = (("startup", "start-up"), ("data", "data"), ("setup_pass", "set-up pass"),
          ("products", "products"), ("writing", "writing"))


def process_start_time(first_statement: float | None = None, slack: float = 2.0) -> float:
    """``time.time()`` at this process's start (Linux: /proc/self/stat, 10 ms ticks), or now
    where that is unknown. /proc records when the process was forked: one that was exec'd from an
    earlier process (the last command of a bash subshell or ``&&`` chain, ``exec python ...``)
    inherits that earlier start. With ``first_statement`` (``time.time()`` at the script's first
    statement), a /proc start more than ``slack`` seconds before it is such an inherited one and
    ``first_statement`` is returned instead (the interpreter's own start, ~0.05 s, is then
    missed)."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return first_statement if first_statement is not None else time.time()
    start = time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    if first_statement is not None and start < first_statement - slack:
        return first_statement
    return start


def finish_timings(timings: dict) -> dict:
    """Fill in ``total`` (seconds from ``process_start``, a ``time.time()``, to now) and
    ``other`` (what no phase holds: printing, the loss line, waits between phases)."""
    timings["total"] = time.time() - timings["process_start"]
    timings["other"] = timings["total"] - sum(timings.get(key) or 0.0 for key, _ in PHASES)
    return timings


def timings_line(timings: dict) -> str:
    """``timings: start-up 2.1 s, data 0.4 s, ...; other 0.1 s; total 30.2 s`` (PHASES)."""
    parts = [f"{words} {timings[key]:.1f} s" for key, words in PHASES
             if timings.get(key) is not None]
    return (f"timings: {', '.join(parts)}; other {timings['other']:.1f} s; total "
            f"{timings['total']:.1f} s")


def gradient_norm(op) -> float:
    """||g|| in float64: a float32 norm overflows to inf once the components pass ~1e19,
    although every component (and every product) is finite."""
    return op.gradient().to(torch.float64).norm().item()


def describe_device(device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    return {"type": "cpu", "name": platform.processor() or platform.machine(),
            "threads_per_process": torch.get_num_threads()}


def describe_setup(op, data, worker, seconds) -> list[str]:
    """Lines about the loss, the operator and what is resident, after the set-up pass."""
    backend = torch.distributed.get_backend() if worker.world_size > 1 else "none"
    threads = f" ({torch.get_num_threads()} thread(s)/process)" if op.device.type == "cpu" else ""
    lines = [
        f"data: {data['dataset']} {data['split']}: {data['num_samples']} samples "
        f"(seed {data['seed']}) in {data['num_mini_batches']} mini-batches of <= "
        f"{data['mini_batch_size']}; samples per rank {data['samples_per_rank']}",
        f"world size {worker.world_size} ({worker.mode}), backend {backend}, device "
        f"{op.device.type}{threads}; {op.dim:,} trainable parameters",
        f"loss {op.loss():.6g} ({data['loss']} on these samples), gradient norm "
        f"{gradient_norm(op):.4g}; set-up {seconds:.1f} s",
        f"{op.describe_product()}; {op.describe_memory()}",
    ]
    attention = getattr(op, "attention", None)
    if attention:
        lines.append(attention_line(attention, op.product_label))
    return lines


def attention_line(attention: dict, product_label: str = "HVP") -> str:
    """Which attention kernel the products use, and torch's default (``op.attention``)."""
    default = attention["default_kernel"]
    products = "Hessian products" if product_label == "HVP" else product_label + "s"
    why = ("which has no double backward or forward-mode AD" if default != "math"
           else "the same kernel torch picks here")
    return (f"attention: {attention['calls_per_forward']} scaled_dot_product_attention call(s) "
            f"per forward; {products} run them on the {attention['products_kernel']} "
            f"kernel (torch's default here: {default}, {why}; forward-only passes and "
            "training keep the default)")


def run_record(args, worker, op, model_info, data, analyses, ctxs, t_start) -> dict:
    """results.json: everything needed to know what was computed, how, and how well; ``op``
    is one of the operators (loss and gradient are the same for every curvature), ``ctxs``
    the curvature name -> Context of each curvature analysed (see the module docstring)."""
    per = {name: ({a.name: a.to_json(c.results[a.name], c) for a in analyses}, c.costs,
                  c.operator_stats or c.op.stats()) for name, c in ctxs.items()}
    if len(per) == 1:
        results, costs, stats = next(iter(per.values()))
    else:
        results, costs, stats = ({name: p[i] for name, p in per.items()} for i in range(3))
    return {
        "config": vars(args), "launch": worker.mode, "world_size": worker.world_size,
        "backend": torch.distributed.get_backend() if worker.world_size > 1 else None,
        "device": describe_device(op.device),
        "versions": {"pyhessian_dist": pyhessian_dist.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "model": model_info, "data": data,
        "loss": op.loss(), "gradient_norm": gradient_norm(op),
        "curvatures": list(ctxs), "operator": stats, "results": results, "costs": costs,
        "seconds_total": time.perf_counter() - t_start,
    }


def output_files(analyses, tags=()) -> tuple:
    """The files an output folder manages, in the order a run writes them: results.json, the
    ``files`` of ``analyses`` (every registered one: a later run removes those an earlier run
    left), convergence.png; then the same files tagged with each of ``tags`` (the curvature
    names: ``per_layer.ggn.png``), which a run of several curvatures writes."""
    files = ("results.json", *(f for a in analyses for f in a.files), "convergence.png")
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:
        raise ValueError(f"more than one analysis (or the run itself) writes {', '.join(twice)}")
    return files + tuple(tagged_name(f, t) for t in tags for f in files[1:])


def write_outputs(args, record, analyses, ctxs, files, on_commit=None, writing_since=None
                  ) -> tuple[list[str], list[str], list[str]]:
    """Stage results.json, then each analysis's files and the convergence figure of the panels
    the analyses contribute (per curvature, tagged with its name when there are several, then
    the overlaid ESDs), and commit them together in --output-dir, which manages ``files``
    (stale ones of an earlier run are removed; ``on_commit()`` once they are in place); returns
    (written paths, stale files removed, warnings). A file that cannot be written is an
    OutputError and nothing is replaced, unless --keep-partial-outputs (then a warning).
    With ``record["timings"]``, results.json is staged again before the commit with its
    ``writing`` (seconds since ``writing_since``, a perf_counter) and ``total`` filled in."""
    with RunOutputs(args.output_dir, files, getattr(args, "keep_partial_outputs", False),
                    on_commit) as out:
        out.write_json("results.json", record)
        several = len(ctxs) > 1
        for name, ctx in ctxs.items():
            entries = record["results"][name] if several else record["results"]
            _write_units(out.tagged(name) if several else out, analyses, ctx, entries)
        if several and any("density" in c.results for c in ctxs.values()):
            out.write(("example.pdf", "example.png"),
                      lambda pdf, png: _esd_overlay(record["results"], pdf, png))
        timings = record.get("timings")
        if timings is not None and writing_since is not None:
            timings["writing"] = time.perf_counter() - writing_since
            finish_timings(timings)
            out.write_json("results.json", record)
        written, removed = out.commit()
    return [os.path.relpath(p) if not os.path.isabs(args.output_dir) else p
            for p in written], removed, out.warnings


def _write_units(out, analyses, ctx, entries) -> None:
    """Each unit's files and the convergence figure of one curvature's results."""
    panels = []
    for a in analyses:
        _guarded(out, f"the {a.name} files", lambda a=a: a.write(ctx.results[a.name], ctx, out))
        panels.append(_guarded(out, f"the {a.name} convergence panel",
                               lambda a=a: a.convergence(entries[a.name])))
    panels = [p for p in panels if p is not None]
    if panels:
        out.write("convergence.png", lambda p: plot_convergence(panels, p))


def _esd_overlay(results, pdf, png) -> None:
    """The ESDs of every curvature with a density, overlaid (lambda_1 dashed where known)."""
    items, labels = [], []
    for name, entries in results.items():
        if "density" in entries:
            density, grids = density_generate(entries["density"]["nodes"],
                                              entries["density"]["weights"])
            top = (entries.get("eigenvalue") or {}).get("eigenvalues") or [None]
            items.append((density, grids, top[0]))
            labels.append(name)
    plot_esd_overlay(items, labels, pdf, png)


def side_by_side(record) -> list[str]:
    """Lines comparing the curvatures of a results.json of several: per curvature the top and
    bottom eigenvalues, the trace ± its standard error, the density's negative mass, products
    and seconds (of what ran; "-" where an analysis did not)."""
    rows = [("curvature", "top eigenvalues", "bottom", "trace ± s.e.", "negative mass",
             "products", "seconds")]
    for name in record["curvatures"]:
        r, costs = record["results"][name], record["costs"][name].values()
        top = _values(r["eigenvalue"]["eigenvalues"]) if "eigenvalue" in r else "-"
        bottom = _values(r["bottom"]["eigenvalues"]) if "bottom" in r else "-"
        trace = "-"
        if "trace" in r:
            t, se = r["trace"]["trace"], r["trace"]["stderr"]
            trace = f"{t:.6g} ± {se:.3g}" if se is not None and math.isfinite(se) else \
                f"{t:.6g}"
        mass = "-"
        if "spectral_mass" in r.get("density", {}):
            mass = f"{100 * r['density']['spectral_mass']['negative']:.2f}%"
        rows.append((name, top, bottom, trace, mass,
                     str(sum(c["num_matvecs"] for c in costs)),
                     f"{sum(c['seconds'] for c in costs):.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["***Side by side (the same samples; each analysis draws the same random vectors "
             "for every curvature; negative mass: the density's weight below -delta):"]
    for row in rows:
        lines.append("    " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return lines


def _values(values, digits: int = 5) -> str:
    return "[" + ", ".join(f"{v:.{digits}g}" for v in values) + "]"


def _guarded(out, what, fn):
    """``fn()``; when a unit's own code fails, ``out.failed`` (the run ends, or a warning and
    None with --keep-partial-outputs)."""
    try:
        return fn()
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a unit's figure code raises
        out.failed(what, exc)
        return None
