"""The GPT: what attention's math kernel costs, and block heterogeneity of ResNet20 vs the GPT.

    python -m bench.bench_gpt --sections attention --text data/generated.txt
    python -m bench.bench_gpt --sections blocks --resnet checkpoints/net.pkl \
        --gpt checkpoints/gpt/net.pkl --samples 100 --lanczos-iter 30

Sections (each recorded in ``--out`` as soon as it finishes):

* ``attention``: on the default GPT and ``--attention-samples`` blocks of the text, side by
  side (interleaved calls): a training step (forward + backward) with torch's default
  attention kernel and with the math kernel, a forward pass with each, a gradient with
  create_graph (what a kept first-order graph costs) and one Hessian-vector product (through
  a kept graph, and recomputed), both on the math kernel.
* ``blocks``: for each checkpoint, its model at initialisation (``training.py``'s: the
  checkpoint's problem, the global RNG seeded from its --seed, then ``model()``) and as trained,
  ``example_pyhessian_analysis.py --per-layer --density`` (``--group-by``, ``--lanczos-iter``,
  ``--samples`` in mini-batches of ``--mini-batch`` on ``--device-count`` processes) as a fresh
  process; the record keeps every run's mean pairwise JS distance, the spread of the block
  spectral radii, lambda_1 and trace, products and seconds. Every run's folder (results.json,
  block_spectra.png, ...) stays in ``--runs``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from bench.common import (
    ROOT,
    environment,
    python,
    run_process,
    say,
    tail,
    time_interleaved,
)
from pyhessian_dist import HessianOperator
from pyhessian_dist.attention import math_attention
from pyhessian_dist.results import json_safe
from support.files import atomic_write_bytes

SECTIONS = ("attention", "blocks")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="attention,blocks")
    p.add_argument("--out", default=os.path.join("bench", "results-gpt-cpu.json"))
    p.add_argument("--text", default=os.path.join("data", "generated.txt"),
                   help="attention: the text (written by problems.write_text when missing)")
    p.add_argument("--attention-samples", type=int, default=32,
                   help="attention: blocks of --block-size tokens per pass")
    p.add_argument("--size", type=int, nargs=4, default=None,
                   metavar=("N_LAYER", "N_HEAD", "N_EMBD", "BLOCK_SIZE"),
                   help="attention: the GPT's size (default: the default GPT, 2 4 64 64)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--resnet", default=os.path.join("checkpoints", "net.pkl"))
    p.add_argument("--gpt", default=os.path.join("checkpoints", "gpt", "net.pkl"))
    p.add_argument("--samples", type=int, default=100, help="blocks: Hessian samples")
    p.add_argument("--mini-batch", type=int, default=50)
    p.add_argument("--lanczos-iter", type=int, default=30)
    p.add_argument("--group-by", default="module")
    p.add_argument("--device-count", type=int, default=2)
    p.add_argument("--runs", default=os.path.join("runs", "block_spectra"))
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per analysis run")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- attention
def attention_section(args) -> dict:
    from problems import TextProblem, gpt_arch, write_generated_text

    if not os.path.isfile(args.text):
        write_generated_text(args.text, 100_000)
    problem = TextProblem(args.text, gpt_arch(*(args.size or ())))
    torch.manual_seed(1)
    model = problem.model().eval()
    data = problem.dataset("train")
    batch = problem.collate([data[i] for i in range(args.attention_samples)])

    def step(kernel):
        def run():
            with kernel():
                model.zero_grad(set_to_none=True)
                problem.loss(problem.forward(model, batch), batch).backward()
        return run

    def forward(kernel):
        def run():
            with torch.no_grad(), kernel():
                problem.forward(model, batch)
        return run

    def create_graph():
        with math_attention():
            loss = problem.loss(problem.forward(model, batch), batch)
            torch.autograd.grad(loss, list(model.parameters()), create_graph=True)

    kept = HessianOperator(model, batches=[batch], forward=problem.forward, loss=problem.loss,
                           reuse_graph=True)
    recomputed = HessianOperator(model, batches=[batch], forward=problem.forward,
                                 loss=problem.loss, reuse_graph=False)
    v = torch.randn(kept.dim, generator=torch.Generator().manual_seed(0))
    default = torch.enable_grad  # torch's own choice of kernel
    times = time_interleaved({
        "train_step_default": step(default), "train_step_math": step(math_attention),
        "forward_default": forward(default), "forward_math": forward(math_attention),
        "gradient_create_graph_math": create_graph,
        "hvp_kept_graph_math": lambda: kept.matvec(v),
        "hvp_recomputed_math": lambda: recomputed.matvec(v)}, args.repeats)
    med = {k: t["median_s"] for k, t in times.items()}
    return {"arch": problem.arch, "samples": args.attention_samples,
            "tokens_per_pass": args.attention_samples * problem.block_size,
            "default_kernel": kept.attention["default_kernel"], "times": times,
            "ratios": {"train_step_math_over_default": med["train_step_math"]
                       / med["train_step_default"],
                       "forward_math_over_default": med["forward_math"] / med["forward_default"],
                       "hvp_kept_over_train_step_default": med["hvp_kept_graph_math"]
                       / med["train_step_default"],
                       "hvp_recomputed_over_train_step_default": med["hvp_recomputed_math"]
                       / med["train_step_default"]}}


# ---------------------------------------------------------------------------- blocks
def init_checkpoint(path: str, out: str) -> str:
    """The model of checkpoint ``path`` as training.py initialised it, saved to ``out``."""
    from types import SimpleNamespace

    from problems import analysis_problem
    from support.checkpoints import save_checkpoint
    from training import seed_everything

    ns = SimpleNamespace(problem=None, resume=path, model=None, batch_norm=None, residual=None,
                         dataset=None, data_dir=None, image_size=None, block_size=None, seed=1)
    problem, _weights, meta, _notes = analysis_problem(ns, [])
    seed = int((meta.get("args") or {}).get("seed", 1))
    problem.dataset("train")  # loaded before the seeding, as training.py's validate() does
    seed_everything(seed)
    model = problem.model()
    save_checkpoint(out, model, problem.record(), epoch=0, test_accuracy=None,
                    args={"seed": seed, "initialisation_of": os.path.abspath(path)})
    return out


def analyse(args, checkpoint: str, folder: str) -> dict:
    cmd = ["example_pyhessian_analysis.py", "--resume", checkpoint, "--no-cuda", "--port", "0",
           "--device_count", str(args.device_count), "--hessian-batch-size", str(args.samples),
           "--mini-hessian-batch-size", str(args.mini_batch), "--per-layer", "--density",
           "--eigenvalue", "--lanczos-iter", str(args.lanczos_iter), "--group-by",
           args.group_by, "--per-layer-tol", "0.05", "--trace-rse", "0.05",
           "--output-dir", folder]
    proc = run_process([python(), *cmd], timeout=args.timeout, echo="    | ")
    if proc["returncode"] != 0:
        return {"error": tail(proc["lines"], 5), "cmd": cmd}
    with open(os.path.join(folder, "results.json")) as fh:
        record = json.load(fh)
    r, costs = record["results"], record["costs"]
    blocks = r["block_spectra"]
    return {"cmd": cmd, "wall_s": proc["wall_s"], "model": record["model"]["description"],
            "num_parameters": record["model"]["num_trainable"], "loss": record["loss"],
            "js_distance": blocks["js_distance"],
            "radius_spread_decades": blocks["radius_spread_decades"],
            "groups": len(blocks["groups"]), "block_products": blocks["num_matvecs"],
            "block_seconds": costs["block_spectra"]["seconds"],
            "lambda_1": r["eigenvalue"]["eigenvalues"][0], "trace": r["trace"]["trace"],
            "total_products": sum(c["num_matvecs"] for c in costs.values()),
            "spectral_radii": {g["name"]: g["spectral_radius"] for g in blocks["groups"]}}


def blocks_section(args, record, save) -> dict:
    os.makedirs(args.runs, exist_ok=True)
    out = record["sections"].setdefault("blocks", {"runs": {}})
    for name, path in (("resnet20", args.resnet), ("gpt", args.gpt)):
        init = init_checkpoint(path, os.path.join(args.runs, f"{name}_init.pkl"))
        for stage, checkpoint in (("init", init), ("trained", path)):
            key = f"{name}_{stage}"
            if key in out["runs"] and "error" not in out["runs"][key]:
                continue
            say(f"blocks: {key} ({checkpoint})")
            out["runs"][key] = analyse(args, checkpoint, os.path.join(args.runs, key))
            save()
    return out


def table(runs: dict) -> str:
    lines = ["| model | stage | groups | block JS distance | radii span (decades) | lambda_1 "
             "| trace | block products | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in runs.items():
        if "error" in r:
            lines.append(f"| {key} | error | | | | | | | |")
            continue
        name, stage = key.rsplit("_", 1)
        lines.append(f"| {name} | {stage} | {r['groups']} | {r['js_distance']:.3f} | "
                     f"{r['radius_spread_decades']:.2f} | {r['lambda_1']:.4g} | "
                     f"{r['trace']:.4g} | {r['block_products']} | {r['block_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    wanted = [s for s in args.sections.split(",") if s]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"error: unknown section(s) {unknown}; choose from {SECTIONS}")
    record = {"environment": environment(), "settings": vars(args), "sections": {}}
    if os.path.isfile(args.out):
        with open(args.out) as fh:
            record["sections"] = json.load(fh).get("sections", {})

    def save():
        record["saved_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write_bytes(args.out, json.dumps(json_safe(record), indent=1).encode())

    os.chdir(ROOT)
    if "attention" in wanted:
        say("attention: default kernel vs math, products")
        result = attention_section(args)
        key = "attention" if args.size is None else "attention_" + "_".join(map(str, args.size))
        record["sections"][key] = result
        save()
        say(json.dumps(result["ratios"], indent=1))
    if "blocks" in wanted:
        runs = blocks_section(args, record, save)["runs"]
        print(table(runs))
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
