"""What rank 0 tells the user and writes: the set-up lines and the results record.

``describe_setup`` gives the lines printed before the first product (model, data, launch,
memory); ``run_record`` builds results.json (configuration, environment, model, data, every
analysis's results and costs); ``write_outputs`` stages results.json first, then every
analysis's files and the convergence figure, and commits them as one set (see ``outputs``);
``output_files`` lists the files an output folder manages.
"""
from __future__ import annotations

import os
import platform
import time

import torch

import pyhessian_dist
from support.figures import plot_convergence
from support.outputs import RunOutputs

__all__ = ["attention_line", "describe_device", "describe_setup", "output_files", "run_record",
           "write_outputs"]


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
        f"{op.gradient().norm().item():.4g}; set-up {seconds:.1f} s",
        f"HVP: {op.hvp_mode}; {op.describe_memory()}",
    ]
    attention = getattr(op, "attention", None)
    if attention:
        lines.append(attention_line(attention))
    return lines


def attention_line(attention: dict) -> str:
    """Which attention kernel the products use, and torch's default (``op.attention``)."""
    default = attention["default_kernel"]
    why = ("which has no double backward or forward-mode AD" if default != "math"
           else "the same kernel torch picks here")
    return (f"attention: {attention['calls_per_forward']} scaled_dot_product_attention call(s) "
            f"per forward; Hessian products run them on the {attention['products_kernel']} "
            f"kernel (torch's default here: {default}, {why}; forward-only passes and "
            "training keep the default)")


def run_record(args, worker, op, model_info, data, analyses, ctx, t_start) -> dict:
    """results.json: everything needed to know what was computed, how, and how well."""
    results = {a.name: a.to_json(ctx.results[a.name], ctx) for a in analyses}
    return {
        "config": vars(args), "launch": worker.mode, "world_size": worker.world_size,
        "backend": torch.distributed.get_backend() if worker.world_size > 1 else None,
        "device": describe_device(op.device),
        "versions": {"pyhessian_dist": pyhessian_dist.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "model": model_info, "data": data,
        "loss": op.loss(), "gradient_norm": op.gradient().norm().item(),
        "operator": op.stats(), "results": results, "costs": ctx.costs,
        "seconds_total": time.perf_counter() - t_start,
    }


def output_files(analyses) -> tuple:
    """The files an output folder manages, in the order a run writes them: results.json, the
    ``files`` of ``analyses`` (every registered one: a later run removes those an earlier run
    left), convergence.png."""
    files = ("results.json", *(f for a in analyses for f in a.files), "convergence.png")
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:
        raise ValueError(f"more than one analysis (or the run itself) writes {', '.join(twice)}")
    return files


def write_outputs(args, record, analyses, ctx, files) -> tuple[list[str], list[str], list[str]]:
    """Stage results.json, then each analysis's files and the convergence figure of the panels
    the analyses contribute, and commit them together in --output-dir, which manages ``files``
    (stale ones of an earlier run are removed); returns (written paths, stale files removed,
    warnings)."""
    with RunOutputs(args.output_dir, files) as out:
        out.write_json("results.json", record)
        panels = []
        for a in analyses:
            _guarded(out, f"the {a.name} files", lambda a=a: a.write(ctx.results[a.name], ctx, out))
            panels.append(_guarded(out, f"the {a.name} convergence panel",
                                   lambda a=a: a.convergence(record["results"][a.name])))
        panels = [p for p in panels if p is not None]
        if panels:
            out.write("convergence.png", lambda p: plot_convergence(panels, p))
        written, removed = out.commit()
    return [os.path.relpath(p) if not os.path.isabs(args.output_dir) else p
            for p in written], removed, out.warnings


def _guarded(out, what, fn):
    """``fn()``; None and a warning line when it fails (a figure must never cost the
    results)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - whatever a unit's figure code raises
        out.warnings.append(f"warning: {what} could not be written ({type(exc).__name__}: "
                            f"{exc}); results.json is complete")
        return None
