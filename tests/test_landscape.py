"""The loss landscape (analyses/landscape.py): exact on a loss that is quadratic in the
parameters, consistent with the operator's loss and lambda_1 on tiny float64 networks, the
parameters restored bit for bit (also after a failure midway), world sizes 1 and 2 giving the
same curves, the 2d grid, the options' checks, the figure, and the script end to end."""
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import analyses.landscape as landscape
from analyses import selected
from analyses.base import Context
from analyses.eigenvalues import TopEigenvalues
from analyses.landscape import Landscape, filter_normalized
from dist_harness import run_distributed
from problems import Problem
from pyhessian_dist import HessianOperator
from support.errors import UserError
from support.figures import landscape_figure, plot_landscape
from support.outputs import RunOutputs
from tiny import SIZES, analysis_args, dense_hessian, make, split_uneven

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CE = nn.CrossEntropyLoss()


def make_args(**kw):
    return analysis_args(**{"top_n": 2, "landscape": "1d", "landscape_points": 11, **kw})


def setup(model, criterion, batches, rank=0, world_size=1, **kw):
    """An operator and a Context on it with the top eigenpairs computed (as the script does)."""
    op = HessianOperator(model, criterion, batches)
    ctx = Context(args=make_args(**kw), op=op, model=model,
                  worker=types.SimpleNamespace(rank=rank, world_size=world_size),
                  problem=Problem())  # the contract's default accuracy: argmax vs labels
    ctx.results["eigenvalue"] = TopEigenvalues().run(ctx)
    return op, ctx


def run_landscape(model, criterion, batches, **kw):
    op, ctx = setup(model, criterion, batches, **kw)
    unit = Landscape()
    ctx.results["landscape"] = unit.run(ctx)
    return op, ctx, unit, ctx.results["landscape"]


def _f64(values):
    return torch.tensor(values, dtype=torch.float64)


def quadratic_problem():
    """A linear model under mean squared error: the loss is exactly quadratic in (W, b)."""
    torch.manual_seed(3)
    model = nn.Linear(5, 3).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(23, 5, generator=g, dtype=torch.float64)
    y = torch.randn(23, 3, generator=g, dtype=torch.float64)
    return model, x, y


# ---------------------------------------------------------------------------- exactness
def test_quadratic_loss_curves_are_exact(single_thread):
    """Every curve is L(0) + (g.d) a + (d'Hd) a^2 / 2 exactly, with H the dense Hessian; the
    second difference along v1 is lambda_1 up to round-off; no accuracy for regression."""
    model, x, y = quadratic_problem()
    mse = nn.MSELoss()
    H = dense_hessian(model, mse, x, y)
    op, ctx, unit, r = run_landscape(model, mse, split_uneven(x, y, SIZES),
                                     landscape_filter_normalize=True)
    lam = torch.linalg.eigvalsh(H)[-1].item()
    g, L0 = op.gradient(), op.loss()
    c = r.curvature_check
    assert c["lambda_1"] == pytest.approx(lam, rel=1e-10)
    assert c["second_difference"] == pytest.approx(lam, rel=1e-8)
    assert c["relative_difference"] < 1e-8 and c["piecewise_ops"] == [] and c["note"] is None

    # the three directions, rebuilt independently: v1, the seeded random one, the gradient's
    v1 = ctx.results["eigenvalue"].eigenvectors[0]
    rnd = torch.randn(op.dim, generator=ctx.generator(unit), dtype=torch.float64)
    rnd, _scale = filter_normalized(op, rnd)
    dirs = {"top eigenvector": v1, "random (filter-normalized)": rnd,
            "gradient": g / g.norm()}
    assert [d["name"] for d in r.directions] == list(dirs)
    a = torch.tensor(r.offsets, dtype=torch.float64)
    for curve in r.directions:
        d = dirs[curve["name"]]
        assert curve["slope"] == pytest.approx(torch.dot(g, d).item(), rel=1e-10, abs=1e-14)
        expected = L0 + torch.dot(g, d) * a + 0.5 * (d @ H @ d) * a ** 2
        torch.testing.assert_close(_f64(curve["loss"]), expected, rtol=1e-11, atol=1e-13)
        assert curve["accuracy"] is None  # targets are not class indices
    assert r.accuracy_at_zero is None
    # along v1 the curvature is lambda_1 itself
    expected = L0 + torch.dot(g, v1) * a + 0.5 * lam * a ** 2
    torch.testing.assert_close(_f64(r.directions[0]["loss"]), expected, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_cross_entropy_networks_agree_with_the_operator(kind, single_thread):
    """Tanh MLP / CNN with BatchNorm (eval): loss at 0 is op.loss(), accuracy is the direct
    count, and the second difference along v1 matches lambda_1."""
    model, x, y = make(kind)
    op, ctx, unit, r = run_landscape(model, CE, split_uneven(x, y, SIZES), landscape_points=7)
    assert r.loss_at_zero == pytest.approx(op.loss(), rel=1e-12, abs=1e-12)
    mid = len(r.offsets) // 2
    assert r.offsets[mid] == 0.0
    assert all(c["loss"][mid] == r.loss_at_zero for c in r.directions)  # the same point
    with torch.no_grad():
        direct = (model(x).argmax(dim=1) == y).double().mean().item()
    assert r.accuracy_at_zero == pytest.approx(direct, abs=1e-15)
    c = r.curvature_check
    assert c["relative_difference"] < 1e-4, c
    assert c["second_difference"] == pytest.approx(ctx.results["eigenvalue"].eigenvalues[0],
                                                   rel=1e-4)
    assert c["piecewise_ops"] == [] and c["note"] is None  # tanh, average pooling: smooth
    # the default radius: where the quadratic model along v1 has risen by 1
    lam = c["lambda_1"]
    assert r.radius == pytest.approx((2 / lam) ** 0.5) and r.radius_rule.startswith("auto")
    assert r.offsets[0] == -r.radius and r.offsets[-1] == r.radius


def test_relu_kinks_are_named(single_thread):
    """A ReLU network's check names the kink; a disagreement > 1% then says why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x, y = make("mlp")[1:]
    _op, _ctx, _unit, r = run_landscape(model, CE, split_uneven(x, y, SIZES), landscape_points=5)
    assert r.curvature_check["piecewise_ops"] == ["relu"]
    check = {"relative_difference": 0.1, "piecewise_ops": ["relu", "max_pool2d"]}
    assert "relu, max_pool2d" in landscape._check_note(check)
    assert "smooth model agrees" in landscape._check_note({**check, "piecewise_ops": []})


# ---------------------------------------------------------------------------- restoring
def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(model, saved):
    return all(torch.equal(p, s) for p, s in zip(model.parameters(), saved))


def test_parameters_restored_bit_for_bit_and_graphs_still_valid(single_thread):
    model, x, y = make("cnn")
    op, ctx = setup(model, CE, split_uneven(x, y, SIZES), landscape="2d", landscape_points=5)
    saved = _snapshot(model)
    buffers = [b.clone() for b in model.buffers()]
    v = torch.linspace(-1, 1, op.dim, dtype=torch.float64)
    Hv = op.matvec(v)
    Landscape().run(ctx)
    assert _same(model, saved)
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), buffers))  # BN stats
    assert not model.training  # still in eval mode
    assert torch.equal(op.matvec(v), Hv)  # the operator's retained graphs are still valid


def test_parameters_restored_after_a_failure_midway(single_thread, monkeypatch):
    model, x, y = make("mlp")
    op, ctx = setup(model, CE, split_uneven(x, y, SIZES))
    saved = _snapshot(model)
    calls = {"n": 0, "moved": False}

    def failing(out, batch):
        calls["n"] += 1
        if calls["n"] == 10:
            calls["moved"] = not _same(model, saved)  # the failure really is mid-move
            raise RuntimeError("injected failure")
        return CE(out, batch[1])

    monkeypatch.setattr(op, "loss_fn", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        Landscape().run(ctx)
    assert calls["moved"]
    assert _same(model, saved)


# ---------------------------------------------------------------------------- distributed
def landscape_on_ranks(rank, world_size, deal):
    """Every rank: its shard of the CNN's mini-batches -> eigenpairs -> 2d landscape."""
    model, x, y = make("cnn")
    batches = split_uneven(x, y, SIZES)
    mine = [b for i, b in enumerate(batches) if deal(i, world_size) == rank]
    op, ctx = setup(model, CE, mine, rank, world_size, landscape="2d", landscape_points=5,
                    landscape_radius=1.0, landscape_filter_normalize=True)
    before = op.comm.calls
    r = Landscape().run(ctx)
    return {"result": r.to_dict(), "local": op.local_num_samples,
            "allreduces": op.comm.calls - before}


def round_robin(i, world_size):
    return i % world_size


def all_on_last(i, world_size):
    return world_size - 1  # rank 0 holds no data at all


def _assert_same_landscape(a, b):
    assert a["offsets"] == b["offsets"] and a["radius"] == b["radius"]
    for ca, cb in zip(a["directions"], b["directions"]):
        assert ca["name"] == cb["name"]
        assert ca["loss"] == pytest.approx(cb["loss"], rel=1e-10)
        assert ca["accuracy"] == cb["accuracy"]
    for ra, rb in zip(a["grid"]["loss"], b["grid"]["loss"]):
        assert ra == pytest.approx(rb, rel=1e-10)
    assert a["grid"]["accuracy"] == b["grid"]["accuracy"]
    assert a["loss_at_zero"] == pytest.approx(b["loss_at_zero"], rel=1e-12)
    ka, kb = a["curvature_check"], b["curvature_check"]
    assert ka["second_difference"] == pytest.approx(kb["second_difference"], rel=1e-6)
    assert ka["lambda_1"] == pytest.approx(kb["lambda_1"], rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("deal", [round_robin, all_on_last])
def test_world_sizes_one_and_two_give_the_same_landscape(deal):
    ref = landscape_on_ranks(0, 1, deal)
    per_rank = run_distributed(landscape_on_ranks, 2, deal)
    assert sum(r["local"] for r in per_rank) == 23
    assert len({r["local"] for r in per_rank}) == 2  # uneven shards (or an empty one)
    for r in per_rank:
        _assert_same_landscape(r["result"], ref["result"])
        # one all-reduce per direction, the check, the grid and the kink flags: not per point
        assert r["allreduces"] == 3 + 1 + 1 + 1


# ---------------------------------------------------------------------------- 2d, options
def test_2d_grid_shape_and_axes(single_thread):
    model, x, y = make("mlp")
    # --top-n 1: the 2d landscape asks the eigenvalue unit for the 2 eigenpairs it needs
    op, ctx, unit, r = run_landscape(model, CE, split_uneven(x, y, SIZES), landscape="2d",
                                     landscape_points=5, top_n=1)
    assert len(ctx.results["eigenvalue"].eigenvalues) == 2
    P = 5
    grid = r.grid
    assert len(grid["loss"]) == P and all(len(row) == P for row in grid["loss"])
    assert len(grid["accuracy"]) == P and all(len(row) == P for row in grid["accuracy"])
    mid = P // 2
    # rows run along v1: the column b = 0 is the v1 curve, the centre the loss at theta
    assert [row[mid] for row in grid["loss"]] == r.directions[0]["loss"]
    assert grid["loss"][mid][mid] == r.loss_at_zero
    d = r.to_dict()
    assert d["lambda_2"] == ctx.results["eigenvalue"].eigenvalues[1]
    assert r.num_evaluations == 3 * P + P * P + r.curvature_check["num_evaluations"]
    lines = unit.summary(r, ctx)
    assert lines[0].startswith("***Landscape (2d): loss at 0 = ")
    assert any("grid over v1 x v2 (5 x 5)" in line for line in lines)


def test_check_rejects_bad_points_and_2d_asks_for_two_eigenpairs():
    for points in (4, 1):
        args = make_args(landscape_points=points)
        with pytest.raises(UserError, match="must be odd and at least 3"):
            Landscape().check(args, selected(args))
    for mode, top_n, k, who in (("2d", 1, 2, "--landscape 2d (2 eigenpairs)"),
                                ("2d", 3, 3, "--top-n 3"), ("1d", 1, 1, "--top-n 1")):
        args = make_args(landscape=mode, top_n=top_n)
        selection = selected(args)
        Landscape().check(args, selection)
        eig = TopEigenvalues()
        assert eig.wanted(args, selection.asked(eig)) == (k, who)
    args = make_args(landscape="2d", top_n=1, max_iter=1)
    with pytest.raises(UserError, match=r"^--landscape 2d \(2 eigenpairs\) needs at least as "
                                        r"many Lanczos steps: pass --max-iter 2 or more$"):
        TopEigenvalues().check(args, selected(args))


def test_flags_defaults_and_selection():
    import example_pyhessian_analysis as script

    args = script.parse_args(["--resume", "x.pkl", "--eigenvalue"])
    assert args.landscape is None and not Landscape.requested(args)
    assert (args.landscape_points, args.landscape_radius) == (21, "auto")
    assert args.landscape_filter_normalize is False
    args = script.parse_args(["--resume", "x.pkl", "--landscape", "1d",
                              "--landscape-radius", "0.5", "--landscape-filter-normalize"])
    assert [a.name for a in selected(args)] == ["eigenvalue", "landscape"]
    assert args.landscape_radius == 0.5 and args.landscape_filter_normalize
    for bad in (["--landscape", "3d"], ["--landscape-radius", "-1"],
                ["--landscape-radius", "nan"]):
        with pytest.raises(SystemExit):
            script.parse_args(["--resume", "x.pkl", "--landscape", "1d", *bad])


def test_filter_normalization_follows_li_et_al(single_thread):
    model, x, y = make("cnn")
    op = HessianOperator(model, CE, [(x, y)])
    r = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d, scale = filter_normalized(op, r)
    assert d.norm().item() == pytest.approx(1.0, rel=1e-12)
    for p, part in zip(op.params, torch.split(d * scale, op.numels)):
        part = part.view(p.shape)
        if p.dim() <= 1:  # biases and BatchNorm weights: not perturbed
            assert torch.count_nonzero(part) == 0
        else:  # each filter (output channel / row) has the norm of the weights' filter
            torch.testing.assert_close(part.flatten(1).norm(dim=1),
                                       p.detach().flatten(1).norm(dim=1), rtol=1e-8, atol=0)


class OnlyVectors(nn.Module):
    """Logits x[:, :3] * w + b: every parameter is 1-D, so there is no filter to normalise."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, x):
        return x[:, :3] * self.w + self.b


def test_filter_normalization_without_filters_is_a_user_error():
    x, y = make("mlp")[1:]
    op = HessianOperator(OnlyVectors(), CE, [(x, y)])
    r = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(UserError, match="no weight filters"):
        filter_normalized(op, r)


# ---------------------------------------------------------------------------- outputs
def test_json_summary_and_figures(tmp_path, single_thread):
    model, x, y = make("cnn")
    for mode in ("1d", "2d"):
        op, ctx, unit, r = run_landscape(model, CE, split_uneven(x, y, SIZES), landscape=mode,
                                         landscape_points=5)
        d = unit.to_json(r, ctx)
        json.dumps(d, allow_nan=False)
        for key in ("mode", "radius", "points", "offsets", "directions", "loss_at_zero",
                    "curvature_check", "num_evaluations", "seconds"):
            assert key in d, key
        assert ("grid" in d) == (mode == "2d") and d["points"] == 5
        assert {"name", "loss", "accuracy"} <= set(d["directions"][0])
        assert {"h", "second_difference", "lambda_1", "relative_difference"} \
            <= set(d["curvature_check"])
        lines = unit.summary(r, ctx)
        assert lines[0].startswith(f"***Landscape ({mode}): loss at 0 = ")
        assert any(line.strip().startswith("curvature check: second difference along v1 = ")
                   and "vs lambda_1 = " in line and "h = " in line for line in lines)
        assert any("loss evaluations" in line and "no HVPs" in line for line in lines)

        folder = tmp_path / mode
        with RunOutputs(folder, unit.files) as out:
            unit.write(r, ctx, out)
            assert out.warnings == [] and out.files == ["landscape.png", "landscape.pdf"]
            written, _removed = out.commit()
        with open(folder / "landscape.png", "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        with open(folder / "landscape.pdf", "rb") as fh:
            assert fh.read(5) == b"%PDF-"
        # the figure can be redrawn from results.json alone
        paths = plot_landscape(json.loads(json.dumps(d)), str(folder / "again.png"))
        assert os.path.getsize(paths[0]) > 0
        _assert_drawn(landscape_figure(json.loads(json.dumps(d))), d)


def _assert_drawn(fig, d):
    """The landscape figure shows the curves of results.landscape: loss and accuracy per
    direction against the offsets, the quadratic model along v1, the 2d grid's contours."""
    import matplotlib.pyplot as plt

    try:
        axes = {ax.get_ylabel(): ax for ax in fig.axes
                if ax.get_xlabel() == "offset a along a unit direction"}
        loss_ax, acc_ax = axes["loss"], axes["accuracy (%)"]
        lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
        for c in d["directions"]:
            name = {"top eigenvector": "top eigenvector v1",
                    "gradient": "gradient (ascent for a > 0)"}.get(c["name"], c["name"])
            assert list(lines[name].get_xdata()) == d["offsets"]
            assert list(lines[name].get_ydata()) == c["loss"]
            acc = [ln for ln in acc_ax.get_lines() if ln.get_label() == name][0]
            assert list(acc.get_ydata()) == pytest.approx([100 * x for x in c["accuracy"]])
        model = lines[f"quadratic model, lambda_1 = {d['lambda_1']:.4g}"]
        a, q = model.get_xdata()[0], model.get_ydata()[0]
        v1 = d["directions"][0]
        assert q == pytest.approx(d["loss_at_zero"] + v1["slope"] * a
                                  + 0.5 * d["lambda_1"] * a * a)
        check = d["curvature_check"]
        assert f"2nd difference along v1 = {check['second_difference']:.4g}" in \
            loss_ax.get_title()
        grid = [ax for ax in fig.axes if ax.get_xlabel() == "offset along v1 (top eigenvector)"]
        assert len(grid) == ("grid" in d)
        if grid:
            assert f"lambda_2 = {d['lambda_2']:.4g}" in grid[0].get_title()
            assert grid[0].get_xlim() == (d["offsets"][0], d["offsets"][-1])
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A ResNet8 trained for one epoch on the synthetic data set (or, should training.py be
    broken, an untrained one saved directly)."""
    folder = tmp_path_factory.mktemp("ckpt")
    proc = subprocess.run([sys.executable, "training.py", "--dataset", "synthetic", "--depth",
                           "8", "--epochs", "1", "--no-cuda", "--num-workers", "0",
                           "--saving-folder", str(folder)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    path = folder / "net.pkl"
    if proc.returncode != 0 or not path.exists():
        from models.resnet import resnet
        from problems import image_record
        from support.checkpoints import save_checkpoint
        from support.datasets import get_datasets

        bundle = get_datasets("synthetic", str(folder / "data"), download=False)
        save_checkpoint(str(path), resnet(depth=8),
                        image_record(resnet(depth=8), "synthetic", bundle.normalization), epoch=0,
                        test_accuracy=None, args={})
    return str(path)


@pytest.mark.slow
def test_script_writes_the_landscape(checkpoint, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "example_pyhessian_analysis.py", "--resume", checkpoint, "--no-cuda",
         "--hessian-batch-size", "40", "--mini-hessian-batch-size", "20", "--landscape", "1d",
         "--landscape-points", "7", "--max-iter", "30", "--output-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.json") as fh:
        record = json.load(fh)
    land = record["results"]["landscape"]
    assert land["mode"] == "1d" and land["points"] == 7 and len(land["offsets"]) == 7
    assert [d["name"] for d in land["directions"]] == ["top eigenvector", "random", "gradient"]
    assert land["loss_at_zero"] == pytest.approx(record["loss"], rel=1e-6)
    assert land["curvature_check"]["lambda_1"] == record["results"]["eigenvalue"]["eigenvalues"][0]
    assert "relu" in land["curvature_check"]["piecewise_ops"]
    for name in ("landscape.png", "landscape.pdf", "results.json"):
        assert os.path.getsize(out / name) > 0
    assert proc.stdout.count("***Landscape (1d): loss at 0 = ") == 1
    assert "curvature check: second difference along v1 = " in proc.stdout


def test_a_radius_too_large_is_reported_and_drawn(tmp_path, single_thread):
    """Issue 19: --landscape-radius 1e30 printed "loss in [nan, nan]" and the figure failed
    (TypeError); now the non-finite losses are counted, a warning line says to lower the
    radius, and the figure leaves them blank (in float64 a squared error overflows at 1e300)."""
    model, x, y = quadratic_problem()
    op, ctx, unit, r = run_landscape(model, nn.MSELoss(), split_uneven(x, y, SIZES),
                                     landscape="2d", landscape_points=5, landscape_radius=1e300)
    lines = unit.summary(r, ctx)
    bad = sum(not math.isfinite(v) for c in r.directions for v in c["loss"])
    bad += sum(not math.isfinite(v) for row in r.grid["loss"] for v in row)
    assert bad == 4 * len(r.directions) + 24  # every point but offset 0
    assert (f"    warning: the loss is not finite at {bad} of {5 * len(r.directions) + 25} "
            "points (left out above and blank in the figure): at offsets this large the "
            "weights overflow; lower --landscape-radius (now 1e+300, given)") in lines
    assert "nan" not in " ".join(lines[1:3]) and "not finite)" in lines[1]
    d = unit.to_json(r, ctx)
    with RunOutputs(tmp_path, unit.files) as out:
        unit.write(r, ctx, out)
        out.commit()
    assert sorted(os.listdir(tmp_path)) == ["landscape.pdf", "landscape.png"]
    import matplotlib.pyplot as plt

    fig = landscape_figure(json.loads(json.dumps(d)))
    try:
        loss_ax = [ax for ax in fig.axes if ax.get_ylabel() == "loss"][0]
        v1 = loss_ax.get_lines()[0].get_ydata()
        assert [math.isnan(v) for v in v1] == [v is None for v in d["directions"][0]["loss"]]
        assert v1[2] == pytest.approx(d["loss_at_zero"])
    finally:
        plt.close(fig)
