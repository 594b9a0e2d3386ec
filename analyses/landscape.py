"""The loss landscape (``--landscape 1d|2d``): the loss and accuracy at theta + a d.

1d: for ``--landscape-points`` offsets a in [-R, R] (0 among them) the mean loss and the accuracy
on the Hessian samples at theta + a d for three unit directions d: the top eigenvector v1, a
random direction (Gaussian, the same on every rank; optionally filter-normalised as in Li et
al. 2018, "Visualizing the Loss Landscape of Neural Nets") and the normalised gradient. 2d:
also the grid theta + a v1 + b v2 over [-R, R]^2, drawn as contours.

The loss is the operator's (the problem's ``forward`` and ``loss``: the one whose Hessian was
analysed), so the curves and the eigenvalues describe one function.
Accuracy is the problem's ``accuracy(outputs, batch)`` (argmax against integer labels for the
built-in classifier), recorded when the problem defines one, else None.

Distributed like the operator: each rank evaluates its own shard, sums n_b * loss_b and the
correct counts, and ONE all-reduce of a (points, 3) float64 buffer per direction (per grid)
gives the means over the union. No Hessian-vector products: each point costs one forward pass
over the samples (no graph, BN in eval mode as the operator left it). The parameters are
copied before and copied back afterwards (bit for bit, also when an exception interrupts).

Built-in check: the second difference (L(h) - 2 L(0) + L(-h)) / h^2 along v1 is the curvature
along a unit eigenvector, i.e. lambda_1, up to O(h^2) truncation and O(eps L / h^2) round-off;
h is chosen from a few candidates where neighbouring estimates agree best. On smooth models
(tanh, GELU, softplus) they agree to round-off. With ReLU or max-pooling they need not: the
autograd Hessian takes relu'' = 0, while a finite difference across units that change sign
within +-h also sees their kinks (measured on a float64 ResNet8: +11% for h in 1e-3..1e-2,
agreement only at h ~ 1e-7, below the nearest kink). The check names the piecewise operations
the forward pass calls and says so when the two differ by more than 1%.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time
from dataclasses import dataclass

import torch

from pyhessian_dist.distributed import all_reduce_
from pyhessian_dist.results import json_safe
from support.cli import positive_int
from support.errors import UserError
from support.figures import plot_landscape

from .base import Analysis

__all__ = ["Landscape", "LandscapeResult", "curvature_check", "evaluate", "filter_normalized",
           "radius_value"]


def radius_value(text):
    """argparse type: 'auto' or a positive number."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive number, got {text!r}") \
            from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be 'auto' or a positive number, got {text!r}")
    return value


@dataclass
class LandscapeResult:
    """The curves (and grid) of one landscape; ``to_dict()`` is its part of results.json."""

    mode: str
    radius: float
    radius_rule: str
    offsets: list
    directions: list          # [{"name", "loss", "accuracy", "slope", ...}]
    loss_at_zero: float
    accuracy_at_zero: float | None
    eigenvalues: list         # lambda_1 (and lambda_2 for 2d)
    curvature_check: dict
    grid: dict | None
    num_evaluations: int
    num_samples: int
    seconds: float

    def to_dict(self) -> dict:
        out = {"mode": self.mode, "radius": self.radius, "radius_rule": self.radius_rule,
               "points": len(self.offsets), "offsets": self.offsets,
               "directions": self.directions, "loss_at_zero": self.loss_at_zero,
               "accuracy_at_zero": self.accuracy_at_zero, "lambda_1": self.eigenvalues[0],
               "curvature_check": self.curvature_check,
               "num_evaluations": self.num_evaluations, "num_samples": self.num_samples,
               "seconds": self.seconds,
               "loss": "the mean loss whose Hessian was analysed (results.json data.loss)"}
        if self.grid is not None:
            out["lambda_2"] = self.eigenvalues[1]
            out["grid"] = self.grid
        return json_safe(out)


class Landscape(Analysis):
    name = "landscape"
    flag = "--landscape"
    help = ("the loss and accuracy along the top eigenvector, a random and the gradient "
            "direction (1d), and over the plane of the top two eigenvectors (2d: computes at "
            "least 2 top eigenpairs, whatever --top-n); runs --eigenvalue; writes "
            "landscape.png/pdf")
    requires = ("eigenvalue",)
    files = ("landscape.png", "landscape.pdf")

    @staticmethod
    def add_arguments(p):
        p.add_argument("--landscape", choices=("1d", "2d"), default=None, help=Landscape.help)
        p.add_argument("--landscape-points", type=positive_int, default=21,
                       help="offsets per direction (odd, so that 0 is one of them); 2d: a "
                            "points x points grid")
        p.add_argument("--landscape-radius", type=radius_value, default="auto",
                       help="offsets a in [-R, R] along unit directions (parameter-space "
                            "units). auto: R = sqrt(2 / lambda_1), where the quadratic model "
                            "along v1 has risen by 1 (a nat of cross-entropy): wide enough to "
                            "leave the quadratic region, narrow enough to stay in the basin; "
                            "capped at the parameters' norm")
        p.add_argument("--landscape-filter-normalize", action="store_true",
                       help="random direction: rescale each filter (row of a weight tensor) to "
                            "the norm of the weights' filter, zero on biases and BatchNorm "
                            "(Li et al. 2018, their 'biasbn' setting), then to unit norm so "
                            "that all directions share one axis")

    @staticmethod
    def requested(args):
        return args.landscape is not None

    def requests(self, args):
        return [self.ask("eigenvalue", "eigenpairs", 2 if args.landscape == "2d" else 1,
                         by=f"--landscape {args.landscape}")]

    def check(self, args, selection):
        if args.landscape_points < 3 or args.landscape_points % 2 == 0:
            raise UserError(f"--landscape-points {args.landscape_points} must be odd and at "
                            "least 3 so that offset 0 is one of the points; pass e.g. 21")

    # ------------------------------------------------------------------------ compute
    def run(self, ctx):
        t0 = time.perf_counter()
        a, op = ctx.args, ctx.op
        accuracy = ctx.problem.accuracy if ctx.problem is not None else None
        eig = ctx.results["eigenvalue"]
        V = eig.eigenvectors.to(op.device, torch.float64)
        lams = [float(x) for x in eig.eigenvalues]  # as many as it asked for, or more
        theta_norm = op.parameters_vector().to(torch.float64).norm().item()
        radius, rule = choose_radius(a.landscape_radius, lams[0], theta_norm)
        P = a.landscape_points
        # symmetric, 0 and the ends +-R exact: the fraction first, then the scale
        offsets = [radius * ((i - P // 2) / (P // 2)) for i in range(P)]
        g = op.gradient().to(torch.float64)

        directions = [("top eigenvector", V[0], {})]
        r = torch.randn(op.dim, generator=ctx.generator(self), dtype=torch.float64)
        r = r.to(op.device)
        if a.landscape_filter_normalize:
            d, scale = filter_normalized(op, r)
            directions.append(("random (filter-normalized)", d,
                               {"filter_normalized_norm": scale}))
        else:
            directions.append(("random", r / r.norm(), {}))
        g_norm = g.norm().item()
        if g_norm > 0:
            directions.append(("gradient", g / g_norm, {"gradient_norm": g_norm}))

        count = 0
        curves = []
        for name, d, extra in directions:
            loss, acc = evaluate(op, (x * d for x in offsets), accuracy)
            count += P
            curves.append({"name": name, "loss": loss, "accuracy": acc,
                           "slope": torch.dot(g, d).item(), **extra})
        mid = P // 2
        loss0, acc0 = curves[0]["loss"][mid], curves[0]["accuracy"]
        acc0 = acc0[mid] if acc0 is not None else None

        check = curvature_check(op, V[0], lams[0], radius)
        count += check["num_evaluations"]
        check["piecewise_ops"] = kinked_ops(op)
        check["curvature"] = ctx.curvature
        check["note"] = _check_note(check)

        grid = None
        if a.landscape == "2d":
            loss, acc = evaluate(op, (x * V[0] + y * V[1] for x in offsets for y in offsets),
                                 accuracy)
            count += P * P
            grid = {"loss": [loss[i * P:(i + 1) * P] for i in range(P)],
                    "accuracy": None if acc is None else
                    [acc[i * P:(i + 1) * P] for i in range(P)],
                    "layout": "loss[i][j] at theta + offsets[i] v1 + offsets[j] v2",
                    "slope_v2": torch.dot(g, V[1]).item()}
        return LandscapeResult(
            mode=a.landscape, radius=radius, radius_rule=rule, offsets=offsets,
            directions=curves, loss_at_zero=loss0, accuracy_at_zero=acc0,
            eigenvalues=lams[:2] if grid is not None else lams[:1], curvature_check=check,
            grid=grid, num_evaluations=count, num_samples=op.num_samples,
            seconds=time.perf_counter() - t0)

    # ------------------------------------------------------------------------ report
    def summary(self, r, ctx):
        acc = f", accuracy {100 * r.accuracy_at_zero:.2f}%" if r.accuracy_at_zero is not None \
            else ""
        lines = [f"***Landscape ({r.mode}): loss at 0 = {r.loss_at_zero:.6g}{acc}; offsets in "
                 f"[-{r.radius:.4g}, {r.radius:.4g}] ({len(r.offsets)} points, "
                 f"R {r.radius_rule}) along unit directions:"]
        parts = [f"{_short(c['name'])}: loss in {_loss_range(c['loss'])}" for c in r.directions]
        lines.append("    " + "; ".join(parts))
        if len(r.directions) < 3:
            lines.append("    (no gradient direction: the gradient is exactly zero)")
        flat = [x for c in r.directions for x in c["loss"]]
        if r.grid is not None:
            grid = [x for row in r.grid["loss"] for x in row]
            flat += grid
            lines.append(f"    grid over v1 x v2 ({len(r.offsets)} x {len(r.offsets)}): loss in "
                         f"{_loss_range(grid)}")
        bad = sum(not math.isfinite(x) for x in flat)
        if bad:
            lines.append(f"    warning: the loss is not finite at {bad} of {len(flat)} points "
                         f"(left out above and blank in the figure): at offsets this large the "
                         f"weights overflow; lower --landscape-radius (now {r.radius:.4g}, "
                         f"{r.radius_rule})")
        c = r.curvature_check
        what = {"ggn": "Hessian vs GGN", "ef": "Hessian vs empirical Fisher"}.get(
            c.get("curvature"), "curvature check")
        lines.append(f"    {what}: second difference along v1 = "
                     f"{c['second_difference']:.6g} vs lambda_1 = {c['lambda_1']:.6g} (rel. diff "
                     f"{c['relative_difference']:.1e}, h = {c['h']:.1e})")
        if c.get("note"):
            lines.append(f"    ({c['note']})")
        seconds = ctx.costs.get(self.name, {}).get("seconds", r.seconds)
        per = f"{len(r.directions)} directions x {len(r.offsets)} points"
        if r.grid is not None:
            per += f" + {len(r.offsets)}^2 grid"
        lines.append(f"    cost: {r.num_evaluations} loss evaluations ({per} + "
                     f"{c['num_evaluations']} for the check; each a forward pass over the "
                     f"{r.num_samples} samples, no {ctx.product_label}s), {seconds:.1f} s")
        return lines

    def to_json(self, r, ctx):
        return r.to_dict()

    def write(self, r, ctx, outputs):
        data = r.to_dict()
        outputs.write(("landscape.png", "landscape.pdf"),
                      lambda png, pdf: plot_landscape(data, png, pdf))


_OTHER_CURVATURES = {
    "ggn": ("lambda_1 is the GGN's (v1'G v1), the second difference the Hessian's along the "
            "same v1 (v1'H v1): they differ by v1'(H - G) v1, the second-order term of the "
            "network that the Gauss-Newton leaves out (Papyan's H = G + R), so the difference "
            "measures R along v1, not an error{kinks}"),
    "ef": ("lambda_1 is the empirical Fisher's (v1'F v1), the second difference the Hessian's "
           "along the same v1 (v1'H v1): no identity relates the two (the empirical Fisher is "
           "not a curvature of the loss), so the difference is shown for reference, not as an "
           "error{kinks}"),
}


def _check_note(check) -> str | None:
    """Why the curvature check may disagree, when it does by more than 1%; for a curvature
    other than the Hessian, what the comparison means (it is no check there)."""
    other = _OTHER_CURVATURES.get(check.get("curvature", "hessian"))
    if other is not None:
        ops = check["piecewise_ops"]
        return other.format(kinks=f"; the second difference also sees the kinks of "
                                  f"{', '.join(ops)}" if ops else "")
    rel = check["relative_difference"]
    if not rel > 1e-2:
        return None
    if check["piecewise_ops"]:
        return (f"expected with {', '.join(check['piecewise_ops'])}: a finite difference also "
                "sees the curvature of units crossing their kinks, which the autograd Hessian "
                "leaves out (relu'' = 0); the two agree on smooth models, or for h below the "
                "nearest kink")
    return ("a smooth model agrees to ~1e-3 in float32, ~1e-7 in float64: check that "
            "lambda_1 converged (--tol) and that the loss is finite near theta")


def _loss_range(losses) -> str:
    """"[lo, hi]" of the finite losses (and how many are not finite)."""
    finite = [x for x in losses if math.isfinite(x)]
    text = f"[{min(finite):.4g}, {max(finite):.4g}]" if finite else "[n/a]"
    return text + (f" ({len(losses) - len(finite)} not finite)" if len(finite) < len(losses)
                   else "")


def _short(name):
    return {"top eigenvector": "top eigenvector v1"}.get(name, name)


def choose_radius(requested, lambda_1, theta_norm):
    """(R, how it was chosen): a given number, or auto = sqrt(2 / lambda_1) capped at the
    parameters' norm (1 when lambda_1 <= 0 and the norm is 0)."""
    if requested != "auto":
        return float(requested), "given"
    if lambda_1 > 0:
        radius = math.sqrt(2.0 / lambda_1)
        if 0 < theta_norm < radius:
            return theta_norm, "auto = ||theta|| (sqrt(2/lambda_1) is larger)"
        return radius, "auto = sqrt(2/lambda_1)"
    if theta_norm > 0:
        return theta_norm, "auto = ||theta|| (lambda_1 <= 0)"
    return 1.0, "auto = 1 (lambda_1 <= 0, theta = 0)"


# ---------------------------------------------------------------------------- evaluation
@contextlib.contextmanager
def _moved_parameters(op):
    """Yields (theta in float64, put(x) setting the parameters to x); copies the parameters
    back exactly on the way out, whatever happens. ``.data`` keeps autograd's version counters,
    so the operator's retained graphs stay valid once the values are back."""
    saved = [p.detach().clone() for p in op.params]
    theta = torch.cat([s.reshape(-1).to(op.device, torch.float64) for s in saved])

    def put(x):
        for p, t in zip(op.params, torch.split(x, op.numels)):
            p.data.copy_(t.view(p.shape))

    try:
        yield theta, put
    finally:
        for p, s in zip(op.params, saved):
            p.data.copy_(s)


def _local_sums(op, accuracy=None) -> torch.Tensor:
    """[sum n_b loss_b, sum n_b accuracy_b, samples counted for accuracy] over this rank's
    shard; ``accuracy(outputs, batch)`` is the problem's (a fraction, or None)."""
    s = torch.zeros(3, dtype=torch.float64, device=op.device)
    for batch, n in op.local_batches():
        out = op.forward_fn(op.model, batch)
        s[0] += op.loss_fn(out, batch).to(torch.float64) * n
        fraction = accuracy(out, batch) if accuracy is not None else None
        if fraction is not None:
            s[1] += float(fraction) * n
            s[2] += n
    return s


# torch functions whose first derivative jumps: autograd takes their second derivative as 0
# (relu'' = 0), while a finite difference across the jump sees a delta function's worth of it
_KINKED = frozenset({
    "relu", "relu6", "hardtanh", "leaky_relu", "prelu", "rrelu", "threshold", "clamp", "clip",
    "clamp_min", "clamp_max", "abs", "absolute", "hardswish", "hardsigmoid", "hardshrink",
    "softshrink", "maximum", "minimum", "fmax", "fmin", "max_pool1d", "max_pool2d",
    "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "fractional_max_pool2d", "fractional_max_pool3d", "max", "min",
    "amax", "amin", "sort", "topk", "kthvalue", "median", "sign", "round", "floor", "ceil",
    "trunc"})


def kinked_ops(op) -> list[str]:
    """Names of the piecewise torch functions (relu, max-pooling, clamp, ...) that one forward
    pass over this rank's first mini-batch calls, any rank's (one SUM all-reduce of a flag per
    name). Seen at the torch-function level: a kink written as ``torch.where`` is missed."""
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "").strip("_")  # relu_, _max_pool2d -> relu, ...
            if name in _KINKED:
                self.names.add(name)
            return func(*args, **(kwargs or {}))

    seen = Seen()
    first = next(op.local_batches(), None)
    if first is not None:
        with torch.no_grad(), seen:
            op.forward_fn(op.model, first[0])
    names = sorted(_KINKED)
    flags = torch.tensor([float(n in seen.names) for n in names], dtype=torch.float64,
                         device=op.device)
    all_reduce_(flags, op.comm)
    return [n for n, f in zip(names, flags.tolist()) if f > 0]


def evaluate(op, displacements, accuracy=None) -> tuple[list, list | None]:
    """Mean loss and accuracy over every rank's samples at theta + delta, for each delta of
    ``displacements`` (flat float64 vectors, the same on every rank): ONE all-reduce of a
    (len, 3) buffer for all of them. Accuracy is the mean of ``accuracy(outputs, batch)``
    (the problem's) weighted by the batches' sample counts, or None unless every batch has one.
    The parameters are restored exactly afterwards."""
    rows = []
    with torch.no_grad(), _moved_parameters(op) as (theta, put):
        for delta in displacements:
            put(theta + delta)
            rows.append(_local_sums(op, accuracy))
    buf = torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)
    all_reduce_(buf, op.comm)
    buf = buf.cpu()
    loss = (buf[:, 0] / op.num_samples).tolist()
    if len(buf) and bool((buf[:, 2] == op.num_samples).all()):
        return loss, (buf[:, 1] / op.num_samples).tolist()
    return loss, None


def filter_normalized(op, r):
    """Li et al. (2018) filter normalisation of a random direction ``r`` (flat, float64): each
    filter (slice along dim 0 of a weight tensor: a conv output channel, a linear row) rescaled
    to the norm of the same filter of the weights; 1-D parameters (biases, BatchNorm) set to 0
    (their ``ignore='biasbn'``). Returns (the result scaled to unit norm, its norm before);
    Li et al.'s offset alpha is a / that norm."""
    parts = []
    for p, d in zip(op.params, torch.split(r, op.numels)):
        if p.dim() <= 1:
            parts.append(torch.zeros_like(d))
            continue
        w = p.detach().to(d.device, torch.float64).reshape(p.shape[0], -1)
        d = d.reshape(p.shape[0], -1)
        parts.append((d * (w.norm(dim=1) / (d.norm(dim=1) + 1e-10)).unsqueeze(1)).reshape(-1))
    d = torch.cat(parts)
    scale = d.norm().item()
    if scale == 0:
        raise UserError("--landscape-filter-normalize: the model has no weight filters to "
                        "normalise (every trainable parameter is 1-D or zero); drop the flag")
    return d / scale, scale


def curvature_check(op, v, lambda_1, radius) -> dict:
    """The second difference D(h) = (L(h) - 2 L(0) + L(-h)) / h^2 along the unit vector v,
    which tends to v'Hv (= lambda_1 for the top eigenvector) as h -> 0.

    D(h) = v'Hv + O(h^2 L'''') + O(eps |L| / h^2): truncation falls and round-off grows as h
    shrinks. Candidates h = s * 10^(-k/2), k = 2..8, with s = min(sqrt(2/|lambda_1|), R) (the
    scale on which the quadratic model rises by 1); those whose rise |lambda_1| h^2 is below
    sqrt(eps) |L(0)| are dropped (round-off would dominate); of the rest, the h whose estimate
    agrees best with the next smaller h's is taken, that disagreement being its error estimate.
    One evaluation call (one all-reduce) for L(0) and every L(+-h)."""
    s = min(math.sqrt(2.0 / abs(lambda_1)), radius) if lambda_1 != 0 else radius
    hs = [s * 10 ** (-k / 2) for k in range(2, 9)]
    steps = [0.0] + [sign * h for h in hs for sign in (1, -1)]
    loss, _ = evaluate(op, (t * v for t in steps))
    L0 = loss[0]
    D = [(loss[1 + 2 * i] - 2 * L0 + loss[2 + 2 * i]) / h ** 2 for i, h in enumerate(hs)]
    eps = torch.finfo(op.dtype).eps
    usable = [i for i, h in enumerate(hs) if abs(lambda_1) * h ** 2 >= math.sqrt(eps) * abs(L0)]
    if len(usable) < 2:
        usable = list(range(len(hs)))
    best = min(usable[:-1], key=lambda i: abs(D[i] - D[i + 1]))
    rel = abs(D[best] - lambda_1) / abs(lambda_1) if lambda_1 != 0 else float("nan")
    return {"h": hs[best], "second_difference": D[best], "lambda_1": lambda_1,
            "relative_difference": rel, "error_estimate": abs(D[best] - D[best + 1]),
            "candidates": [{"h": h, "second_difference": d} for h, d in zip(hs, D)],
            "loss_at_zero": L0, "num_evaluations": len(loss)}
