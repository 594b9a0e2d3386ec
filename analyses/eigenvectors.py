"""Eigenvectors on disk (``--save-eigenvectors``): eigenvectors.pt with the eigenpairs of
whichever of the top (``--eigenvalue``, also when another unit runs it) and bottom
(``--bottom-n``) eigenvalue units ran, one tensor (k, *parameter shape) per parameter name;
loads with torch.load(weights_only=True)."""
from __future__ import annotations

import torch

from support.errors import UserError

from .base import Analysis


class SaveEigenvectors(Analysis):
    name = "eigenvectors"
    flag = "--save-eigenvectors"
    help = ("save the eigenvectors of --eigenvalue and/or --bottom-n (whichever runs) to "
            "eigenvectors.pt, per parameter (k, *shape)")
    files = ("eigenvectors.pt",)
    works_on = ("eigenvalue", "bottom")  # whichever of them runs (they run before it)

    def check(self, args, selection):
        if not selection.names & set(self.works_on):
            raise UserError("--save-eigenvectors saves the eigenvectors of --eigenvalue or "
                            "--bottom-n K; pass one of them")

    def run(self, ctx):
        return {k: ctx.results[k] for k in self.works_on if k in ctx.results}

    def summary(self, found, ctx):
        parts = [f"{len(r.eigenvalues)} {'top' if k == 'eigenvalue' else 'bottom'}"
                 for k, r in found.items()]
        return [f"***Eigenvectors: {' and '.join(parts)} saved to eigenvectors.pt"]

    def to_json(self, found, ctx):
        return {"file": "eigenvectors.pt",
                "sets": {("top" if k == "eigenvalue" else "bottom"): len(r.eigenvalues)
                         for k, r in found.items()}}

    def write(self, found, ctx, outputs):
        op = ctx.op

        def per_parameter(vectors):
            out = {}
            start = 0
            for name, shape, n in zip(op.param_names, op.shapes, op.numels):
                out[name] = vectors[:, start:start + n].reshape(len(vectors), *shape).to(
                    "cpu", torch.float32 if op.dtype == torch.float32 else op.dtype).clone()
                start += n
            return out

        def save(path):
            obj = {"parameter_names": list(op.param_names)}
            for key, r in found.items():
                which = "top" if key == "eigenvalue" else "bottom"
                obj[which] = {"eigenvalues": torch.tensor(r.eigenvalues, dtype=torch.float64),
                              "eigenvectors": per_parameter(r.eigenvectors.detach())}
            torch.save(obj, path)

        outputs.write("eigenvectors.pt", save)
