"""Curvature during training (``training.py --hessian-every N``): lambda_1 and the trace of the
loss Hessian (or, with ``--curvature``, of the GGN or the empirical Fisher, or several of them)
on a fixed subset of the training set, recorded next to the checkpoint.

Every check builds, for each curvature, its operator (``HessianOperator``, ``GGNOperator``,
``EmpiricalFisherOperator``) on the plain model (not the DDP wrapper) in eval mode
(BatchNorm uses its running statistics, identical on every rank), with the problem's mean loss
(its ``forward`` and ``loss``; cross-entropy for the built-in classifier) over a FIXED set of
``--hessian-samples`` samples of its un-augmented train split (``hessian_subset`` by ``--seed``;
each rank holds its round-robin share of the mini-batches, ``shard_batches``, and the operator
all-reduces). Weight decay is not part of this Hessian: it would add ``weight_decay`` (5e-4) to
every eigenvalue. Then

* lambda_1: ``lanczos_eigenpairs`` (k=1, which="LA"), stopped when its eigenvalue error bound is
  below ``LANCZOS_TOL`` relative (at most ``LANCZOS_MAX_STEPS`` products);
* the trace (optional): ``hutchinson_trace`` with Krylov deflation chosen automatically
  (``deflate="auto"``) to a relative standard error of ``TRACE_RSE``. Early in training the
  Hessian has a few large outlier eigenvalues (about one per class) that dominate the variance
  of plain Hutchinson; removing their Krylov space exactly cuts the probes needed, and "auto"
  predicts the cost from pilot probes that are reused, so when deflating does not pay it stops
  after a few Lanczos steps. Measured on ResNet20 with 500 samples: 25 products against
  plain Hutchinson's 96 for the same 5% standard error.

The random vectors come from a private generator seeded from (seed, epoch), the same on every
rank; the global RNG is never touched, so training with and without checks draws the same
random numbers and ``--resume`` stays exact; every curvature of a check starts from the same
random vectors. Rank 0 writes ``<name>.curvature.json`` (every check -- one record per
curvature, naming it in ``"curvature"`` -- and every epoch's loss and learning rate, atomically)
and ``<name>.curvature.png``.
"""
from __future__ import annotations

import json
import math
import os
import time

import torch
from torch import nn

from pyhessian_dist import CURVATURES, hutchinson_trace, lanczos_eigenpairs
from pyhessian_dist.results import json_safe
from support.datasets import hessian_subset, shard_batches
from support.errors import UserError
from support.figures import plot_curvature
from support.files import atomic_write_bytes, write_error

__all__ = ["CURVATURE_FORMAT", "LANCZOS_MAX_STEPS", "LANCZOS_TOL", "TRACE_MAX_PROBES",
           "TRACE_RSE", "CurvatureTracker", "check_line", "curvature_paths", "load_curvature"]

CURVATURE_FORMAT = "pyhessian-dist-curvature"
LANCZOS_TOL = 1e-3          # relative eigenvalue error bound of lambda_1
LANCZOS_MAX_STEPS = 100
TRACE_RSE = 0.05            # relative standard error of the trace
TRACE_MAX_PROBES = 200
# Products a check typically takes (printed as the expected cost). Measured: ResNet20 (BN, 3
# epochs on the synthetic set, 500 samples): lambda_1 7, trace 25 (plain Hutchinson: 96);
# ResNet8: lambda_1 5, trace 25-40.
TYPICAL_LANCZOS_PRODUCTS = (5, 20)
TYPICAL_TRACE_PRODUCTS = (20, 60)
# One Hessian-vector product over n samples costs about this many training passes (forward +
# backward) over the same n samples (double backward through a kept graph; measured on CPU:
# 2.7 s against 1.4 s for ResNet20 and 500 samples). A GGN product costs less, an empirical
# Fisher product with kept per-sample gradients almost nothing (bench/bench_curvature.py).
PRODUCT_COST_IN_TRAINING_PASSES = 2.0
#: how a check line names one product of each curvature
PRODUCT_WORDS = {"hessian": "Hessian-vector products", "ggn": "GGN-vector products",
                 "ef": "empirical-Fisher-vector products"}


def curvature_paths(saving_folder: str, checkpoint_name: str) -> tuple[str, str]:
    """``(<folder>/<stem>.curvature.json, <folder>/<stem>.curvature.png)``."""
    stem = os.path.splitext(checkpoint_name)[0]
    return (os.path.join(saving_folder, f"{stem}.curvature.json"),
            os.path.join(saving_folder, f"{stem}.curvature.png"))


def load_curvature(path: str, up_to_epoch: int) -> tuple[list, list]:
    """``(checks, epochs)`` of an earlier curvature file, keeping epochs <= ``up_to_epoch``
    (a resumed run continues the file); empty lists when there is none."""
    if not os.path.isfile(path):
        return [], []
    try:
        with open(path) as fh:
            doc = json.load(fh)
        checks, epochs = list(doc["checks"]), list(doc.get("epochs", []))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot continue the curvature file {path} ({exc}); move it away "
                        "to start a new one") from None
    return ([c for c in checks if c.get("epoch", 0) <= up_to_epoch],
            [e for e in epochs if e.get("epoch", 0) <= up_to_epoch])


class CurvatureTracker:
    """The fixed Hessian subset of this rank, the checks so far, and the files rank 0 writes."""

    def __init__(self, ctx, problem, *, every, epochs, samples, mini_batch, seed, trace,
                 momentum, json_path, png_path, settings=None, previous=((), ()),
                 curvatures=("hessian",)):
        self.ctx, self.problem, self.every, self.epochs = ctx, problem, int(every), int(epochs)
        self.curvatures = list(curvatures)
        self.seed, self.trace, self.momentum = int(seed), bool(trace), float(momentum)
        self.samples, self.mini_batch = int(samples), int(mini_batch)
        self.json_path, self.png_path = json_path, png_path
        dataset = problem.dataset("train")
        indices = hessian_subset(dataset, self.samples, self.seed, flag="--hessian-samples")
        self.batches, self.num_batches = shard_batches(dataset, indices, self.mini_batch,
                                                       ctx.rank, ctx.world_size,
                                                       problem.collate)
        self.checks, self.epoch_log = list(previous[0]), list(previous[1])
        self.settings = {
            "hessian_every": self.every, "hessian_samples": self.samples,
            "hessian_mini_batch": self.mini_batch, "seed": self.seed, "trace": self.trace,
            "split": problem.hessian_split, "model_mode": "eval",
            "loss": f"{problem.loss_description} (weight decay not included)",
            "lanczos_tol": LANCZOS_TOL, "lanczos_max_steps": LANCZOS_MAX_STEPS,
            "trace_rse": TRACE_RSE, "trace_deflate": "auto", "momentum": self.momentum,
            "curvatures": self.curvatures, **(settings or {})}

    def due(self, epoch: int) -> bool:
        """Whether a check follows ``epoch`` (every N epochs, and after the last)."""
        return epoch % self.every == 0 or epoch == self.epochs

    def expected_cost(self, start_epoch: int, train_size: int) -> str:
        """One line: how many checks, their products, and their cost against training."""
        n = sum(self.due(e) for e in range(start_epoch + 1, self.epochs + 1))
        lo, hi = TYPICAL_LANCZOS_PRODUCTS
        if self.trace:
            lo, hi = lo + TYPICAL_TRACE_PRODUCTS[0], hi + TYPICAL_TRACE_PRODUCTS[1]
        # the trace: up to 50 deflation steps besides its probes (8 pilots among them)
        worst = LANCZOS_MAX_STEPS + (TRACE_MAX_PROBES + 50 if self.trace else 0)
        per_product = PRODUCT_COST_IN_TRAINING_PASSES * self.samples / max(train_size, 1)
        k = len(self.curvatures)
        lo, hi, worst = lo * k, hi * k, worst * k
        what = "lambda_1" + (" and the trace" if self.trace else "")
        if self.curvatures != ["hessian"]:
            what += f" of the {', '.join(self.curvatures)}"
        products = "Hessian-vector products" if k == 1 and self.curvatures == ["hessian"] \
            else "products (at most a Hessian-vector product's cost each)"
        return (f"curvature: {what} after every {self.every} epoch(s) and the last ({n} "
                f"checks) on {self.samples} training samples in {self.num_batches} "
                f"mini-batches; each check ~{lo}-{hi} {products} (at most {worst}),"
                f" about {lo * per_product:.2g}-{hi * per_product:.2g} epochs of training "
                "compute")

    def check(self, model: nn.Module, **point) -> list[dict]:
        """Measure at the current weights (every rank calls this); ``point`` holds epoch, step,
        lr, train_loss, test_loss, test_accuracy. Returns one record per curvature (also
        kept)."""
        was_training = model.training
        records = [self._check(model, name, point) for name in self.curvatures]
        model.train(was_training)
        self.checks.extend(records)
        return records

    def _check(self, model: nn.Module, name: str, point: dict) -> dict:
        """One curvature's record at the current weights."""
        t0 = time.perf_counter()
        op = CURVATURES[name](model, batches=self.batches, forward=self.problem.forward,
                              loss=self.problem.loss, device=self.ctx.device,
                              local_processes=self.ctx.local_world_size)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(point["epoch"]))
        eig = lanczos_eigenpairs(op, k=1, which="LA", max_steps=min(LANCZOS_MAX_STEPS, op.dim),
                                 tol=LANCZOS_TOL, generator=generator)
        lam, rel = eig.eigenvalues[0], eig.error_bounds[0]
        record = {**point, "curvature": name, "two_over_lr": 2.0 / point["lr"],
                  "momentum_threshold": (2.0 + 2.0 * self.momentum) / point["lr"],
                  "hessian_loss": op.loss(), "lambda_1": lam,
                  "lambda_1_error_bound": abs(lam) * rel, "lambda_1_converged": eig.converged,
                  "lambda_1_products": eig.num_matvecs}
        if self.trace:
            tr = hutchinson_trace(op, max_iter=TRACE_MAX_PROBES, rse=TRACE_RSE, deflate="auto",
                                  block_size=4, generator=generator)
            record.update(trace=tr.trace, trace_stderr=tr.stderr, trace_probes=len(tr.samples),
                          trace_method=tr.method, trace_products=tr.num_matvecs,
                          trace_converged=tr.converged)
        record.update(products=op.num_matvecs, seconds=time.perf_counter() - t0,
                      world_size=self.ctx.world_size)
        del op  # frees the kept graphs before training goes on
        return record

    def log_epoch(self, **values) -> None:
        """Keep one epoch's epoch, lr, train/test loss and accuracy (for the figure)."""
        self.epoch_log.append(values)

    def write(self) -> str | None:
        """Rank 0: write the JSON, then the figure (atomically); a warning line when the figure
        fails, else None. OSError for an unwritable JSON.

        A failed figure does not stop training: the figure is a view of the JSON, which holds
        every check, and it is drawn again from all of them at the next check; a cancel is not
        a failure (``Interrupted`` is no ``Exception``) and stops the run."""
        doc = {"format": CURVATURE_FORMAT, "version": 1, "settings": self.settings,
               "checks": self.checks, "epochs": self.epoch_log}
        text = json.dumps(json_safe(doc), indent=1, allow_nan=False)
        atomic_write_bytes(self.json_path, (text + "\n").encode())
        try:
            atomic_write_bytes(self.png_path, plot_curvature(
                self.checks, self.epoch_log, self.momentum, self.problem.loss_description))
        except Exception as exc:  # noqa: BLE001 - a figure must never stop a training run
            return (f"warning: could not draw {self.png_path} ({write_error(exc)}); training "
                    f"goes on: {self.json_path} holds every check, and the figure is drawn "
                    "again at the next check")
        return None


def check_line(r: dict) -> str:
    """One line per check and curvature: lambda_1 against 2/lr, the trace, the cost."""
    name = r.get("curvature", "hessian")
    which = "" if name == "hessian" else f", {name}"
    line = (f"curvature after epoch {r['epoch']} (step {r['step']}{which}): lambda_1 "
            f"{r['lambda_1']:.4g} (error bound {r['lambda_1_error_bound']:.2g}), 2/lr "
            f"{r['two_over_lr']:.4g}")
    if "trace" in r:
        se = r["trace_stderr"]
        line += f", trace {r['trace']:.4g} ± {se:.2g} (1 s.e.)" if math.isfinite(se) else \
            f", trace {r['trace']:.4g}"
    return line + f"; {r['products']} {PRODUCT_WORDS[name]}, {r['seconds']:.1f} s"
