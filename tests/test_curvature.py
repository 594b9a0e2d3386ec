"""Curvature during training (support.curvature): lambda_1 and the trace against the exact
Hessian of a tiny float64 model, side effects (none), the files, and 1 vs 2 ranks."""
import json
import os

import pytest
import torch
from torch import nn

from dist_harness import run_distributed
from problems import Problem
from support.curvature import CurvatureTracker, check_line, curvature_paths, load_curvature
from support.errors import UserError
from support.figures import curvature_figure, plot_curvature
from support.launch import WorkerContext

pytestmark = pytest.mark.usefixtures("single_thread")

CTX = WorkerContext(0, 1, 0, 1, torch.device("cpu"), "single process")
POINT = dict(epoch=2, step=20, lr=0.05, train_loss=1.0, test_loss=1.1, test_accuracy=50.0)


def tiny_data(n=60, seed=0):
    """A list of (x float64 (3, 4, 4), y int) samples, 3 classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i], int(y[i])) for i in range(n)]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 6), nn.Tanh(), nn.Linear(6, 3)).double()


class ListProblem(Problem):
    """The samples of a list, the contract's default forward and cross-entropy."""

    def __init__(self, data):
        self.data = data

    def dataset(self, split):
        return self.data


def tracker(data, ctx=CTX, tmp_path=None, **kw):
    folder = str(tmp_path) if tmp_path is not None else "."
    js, png = curvature_paths(folder, "net.pkl")
    opts = dict(every=2, epochs=5, samples=40, mini_batch=15, seed=3, trace=True,
                momentum=0.9, json_path=js, png_path=png)
    return CurvatureTracker(ctx, ListProblem(data), **{**opts, **kw})


def exact_hessian(model, data, indices):
    params = dict(model.named_parameters())
    x = torch.stack([data[i][0] for i in indices])
    y = torch.tensor([data[i][1] for i in indices])
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def loss(flat):
        ps = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return nn.functional.cross_entropy(torch.func.functional_call(model, ps, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    return torch.func.hessian(loss)(theta)


def test_lambda_1_and_trace_match_the_exact_hessian():
    from support.datasets import hessian_subset

    data, model = tiny_data(), tiny_model()
    t = tracker(data)
    (r,) = t.check(model, **POINT)
    H = exact_hessian(model, data, hessian_subset(data, 40, 3))
    evals = torch.linalg.eigvalsh(H)
    top, exact_trace = evals[-1].item(), H.trace().item()
    assert abs(r["lambda_1"] - top) <= r["lambda_1_error_bound"] + 1e-10
    assert abs(r["lambda_1"] - top) <= 1e-3 * top
    assert abs(r["trace"] - exact_trace) <= 4 * r["trace_stderr"]
    assert r["trace_stderr"] <= 0.05 * abs(r["trace"]) and r["trace_converged"]
    assert r["two_over_lr"] == pytest.approx(40.0)
    assert r["momentum_threshold"] == pytest.approx(3.8 / 0.05)
    assert r["products"] == r["lambda_1_products"] + r["trace_products"]
    assert r["epoch"] == 2 and r["seconds"] > 0 and r["world_size"] == 1
    assert t.checks == [r]


def test_a_check_changes_nothing_in_training():
    data, model = tiny_data(), tiny_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    tracker(data, trace=False).check(model, **POINT)
    assert model.training  # back in train mode
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_due_and_the_expected_cost_line():
    t = tracker(tiny_data(), every=2, epochs=5)
    assert [e for e in range(1, 6) if t.due(e)] == [2, 4, 5]
    line = t.expected_cost(start_epoch=2, train_size=400)
    assert "lambda_1 and the trace after every 2 epoch(s) and the last (2 checks)" in line
    assert "on 40 training samples in 3 mini-batches" in line and "epochs of training" in line


def test_files_are_strict_json_and_a_png(tmp_path):
    data, model = tiny_data(), tiny_model()
    t = tracker(data, tmp_path=tmp_path)
    t.log_epoch(epoch=1, step=10, lr=0.05, train_loss=1.2, train_accuracy=40.0, test_loss=1.3,
                test_accuracy=35.0)
    t.log_epoch(epoch=2, step=20, lr=0.05, train_loss=1.0, train_accuracy=50.0, test_loss=1.1,
                test_accuracy=50.0)
    (r,) = t.check(model, **POINT)
    assert t.write() is None
    doc = json.loads((tmp_path / "net.curvature.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert doc["format"] == "pyhessian-dist-curvature" and doc["settings"]["trace_rse"] == 0.05
    assert doc["checks"][0]["lambda_1"] == pytest.approx(r["lambda_1"])
    assert (tmp_path / "net.curvature.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["net.curvature.json", "net.curvature.png"]
    checks, epochs = load_curvature(str(tmp_path / "net.curvature.json"), up_to_epoch=1)
    assert checks == [] and [e["epoch"] for e in epochs] == [1]
    assert load_curvature(str(tmp_path / "absent.json"), 3) == ([], [])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot continue the curvature file"):
        load_curvature(str(tmp_path / "bad.json"), 3)
    line = check_line(r)
    assert line.startswith("curvature after epoch 2 (step 20): lambda_1 ") and "2/lr 40" in line
    assert line.endswith(f"{r['products']} Hessian-vector products, {r['seconds']:.1f} s")
    assert f"(error bound {r['lambda_1_error_bound']:.2g})" in line and "(1 s.e.)" in line


def test_plot_accepts_reloaded_records_with_nulls():
    checks = [dict(epoch=1, lambda_1=3.0, lambda_1_error_bound=None, trace=9.0,
                   trace_stderr=None)]
    epochs = [dict(epoch=1, lr=0.1, train_loss=1.0, test_loss=1.2)]
    assert plot_curvature(checks, epochs)[:4] == b"\x89PNG"


def test_the_figure_shows_lambda_1_against_two_over_lr():
    import matplotlib.pyplot as plt

    checks = [dict(epoch=1, lambda_1=30.0, lambda_1_error_bound=0.5),
              dict(epoch=2, lambda_1=12.0, lambda_1_error_bound=None)]
    epochs = [dict(epoch=1, lr=0.1, train_loss=2.0, test_loss=2.1),
              dict(epoch=2, lr=0.01, train_loss=1.0, test_loss=1.3)]
    before = plt.get_fignums()
    fig = curvature_figure(checks, epochs, momentum=0.9)
    try:
        top, bottom = fig.axes[:2]
        assert top.get_yscale() == "log"
        lines = {ln.get_label(): ln for ln in top.get_lines()}
        assert list(lines["2 / lr"].get_ydata()) == pytest.approx([20.0, 200.0])
        assert list(lines["(2 + 2·0.9) / lr (momentum)"].get_ydata()) == pytest.approx(
            [38.0, 380.0])
        lam = top.containers[0]  # the errorbar of lambda_1
        assert list(lam.lines[0].get_ydata()) == [30.0, 12.0]
        assert list(lam.lines[0].get_xdata()) == [1, 2]
        losses = {ln.get_label(): list(ln.get_ydata()) for ln in bottom.get_lines()}
        assert losses == {"train loss": [2.0, 1.0], "test loss": [2.1, 1.3]}
        assert fig.axes[2].get_yscale() == "log"  # the learning rate's twin axis
    finally:
        plt.close(fig)
    assert plt.get_fignums() == before


def _on_ranks(rank, world_size):
    ctx = WorkerContext(rank, world_size, rank, world_size, torch.device("cpu"), "spawn")
    t = tracker(tiny_data(), ctx=ctx, samples=50, mini_batch=20)  # 3 mini-batches: uneven
    (r,) = t.check(tiny_model(), **POINT)
    return r["lambda_1"], r["trace"], len(t.batches)


@pytest.mark.slow
def test_one_and_two_ranks_agree():
    one = _on_ranks(0, 1)
    two = run_distributed(_on_ranks, 2)
    assert [n for *_, n in two] == [2, 1]
    for lam, tr, _ in two:
        assert lam == pytest.approx(one[0], rel=1e-9)
        assert tr == pytest.approx(one[1], rel=1e-9)


def test_several_curvatures_match_their_dense_matrices():
    """--curvature hessian,ggn,ef: one record per curvature, each lambda_1 (and trace) of its
    own matrix; the line and the figure name the curvature."""
    import matplotlib.pyplot as plt

    from support.datasets import hessian_subset
    from tiny import dense_empirical_fisher, dense_ggn

    data, model = tiny_data(), tiny_model()
    t = tracker(data, curvatures=("hessian", "ggn", "ef"))
    records = t.check(model, **POINT)
    assert [r["curvature"] for r in records] == ["hessian", "ggn", "ef"] and t.checks == records
    idx = hessian_subset(data, 40, 3)
    x = torch.stack([data[i][0] for i in idx])
    y = torch.tensor([data[i][1] for i in idx])
    ce = nn.functional.cross_entropy
    dense = {"hessian": exact_hessian(model, data, idx), "ggn": dense_ggn(model, ce, x, y),
             "ef": dense_empirical_fisher(model, ce, x, y)}
    for r in records:
        M = dense[r["curvature"]]
        top = torch.linalg.eigvalsh((M + M.T) / 2)[-1].item()
        # 5e-4 off for the GGN after 5 steps, above its bound of 2.3e-4: the bound assumes no
        # eigenvalue near lambda_1 is still hidden from the Krylov space (README)
        assert abs(r["lambda_1"] - top) <= 2e-3 * top, r["curvature"]
        assert abs(r["trace"] - M.trace().item()) <= 4 * r["trace_stderr"], r["curvature"]
    assert "(step 20, ggn): lambda_1" in check_line(records[1])
    assert check_line(records[2]).split("; ")[-1].startswith(
        f"{records[2]['products']} empirical-Fisher-vector products")
    assert t.settings["curvatures"] == ["hessian", "ggn", "ef"]
    assert "of the hessian, ggn, ef" in t.expected_cost(start_epoch=0, train_size=400)
    fig = curvature_figure(records, [dict(epoch=2, lr=0.05, train_loss=1.0, test_loss=1.1)])
    try:
        labels = [c.get_label() for c in fig.axes[0].containers]
        assert labels[0].endswith("(top Hessian eigenvalue)")
        assert any("GGN" in s for s in labels) and any("empirical Fisher" in s for s in labels)
    finally:
        plt.close(fig)
