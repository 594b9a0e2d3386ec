"""The analysis units in-process on a tiny float64 model, against the exact Hessian."""
import argparse
import types

import pytest
import torch
from torch import nn

from analyses import REGISTRY, Context, by_name, selected
from pyhessian_dist import HessianOperator
from support.outputs import RunOutputs
from tiny import SIZES, dense_hessian, make, split_uneven

CE = nn.CrossEntropyLoss()


def parse(*flags):
    """The analyses' own options (as the script adds them) plus the shared ones."""
    p = argparse.ArgumentParser()
    for a in REGISTRY:
        a.add_arguments(p)
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--tol", type=float, default=1e-10)
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(list(flags))


def run_units(args, model, batches):
    op = HessianOperator(model, CE, batches)
    worker = types.SimpleNamespace(rank=0, world_size=1)
    ctx = Context(args=args, op=op, model=model, worker=worker)
    for analysis in selected(args):
        analysis.check(args)
        ctx.results[analysis.name] = ctx.timed(analysis, lambda a=analysis: a.run(ctx))
    return ctx


@pytest.fixture(scope="module")
def cnn():
    model, x, y = make("cnn")
    return model, split_uneven(x, y, SIZES), dense_hessian(model, CE, x, y)


def test_requirements_pull_in_the_trace():
    names = [a.name for a in selected(parse("--per-layer", "--diagonal"))]
    assert names == ["trace", "per_layer", "diagonal"]


def test_eigenvectors_file_round_trip(cnn, tmp_path):
    model, batches, H = cnn
    args = parse("--eigenvalue", "--top-n", "2", "--bottom-n", "2", "--save-eigenvectors")
    ctx = run_units(args, model, batches)
    with RunOutputs(tmp_path) as out:
        by_name("eigenvectors").write(ctx.results["eigenvectors"], ctx, out)
        out.commit()
    saved = torch.load(tmp_path / "eigenvectors.pt", weights_only=True)
    names = saved["parameter_names"]
    assert names == [n for n, _ in model.named_parameters()]
    exact = torch.linalg.eigvalsh(H)
    for which, expected in (("top", exact.flip(0)[:2]), ("bottom", exact[:2])):
        values = saved[which]["eigenvalues"]
        torch.testing.assert_close(values, expected, rtol=1e-8, atol=1e-10)
        per_param = saved[which]["eigenvectors"]
        for i, lam in enumerate(values.tolist()):
            v = torch.cat([per_param[n][i].reshape(-1) for n in names])
            assert per_param[names[0]][i].shape == dict(model.named_parameters())[names[0]].shape
            # eigenvector error ~ sqrt(eigenvalue error): the residual is the reported one
            assert torch.linalg.norm(H @ v - lam * v) <= 1e-4 * max(1.0, abs(lam))


def test_per_layer_rows_against_exact_blocks(cnn):
    model, batches, H = cnn
    args = parse("--per-layer", "--trace-method", "deflated", "--trace-deflate", "30",
                 "--trace-rse", "0.01", "--max-iter", "400", "--per-layer-tol", "1e-10")
    ctx = run_units(args, model, batches)
    rows = ctx.results["per_layer"]
    groups = ctx.groups()
    assert [r["name"] for r in rows] == ["conv", "bn", "fc"]
    for row, g in zip(rows, groups):
        block = H[g.index][:, g.index]
        assert row["num_parameters"] == block.shape[0]
        assert abs(row["trace"] - block.trace().item()) <= 4 * row["trace_stderr"]
        assert row["top_eigenvalue"] == pytest.approx(
            torch.linalg.eigvalsh(block)[-1].item(), rel=1e-7, abs=1e-10)
    assert sum(r["trace"] for r in rows) == pytest.approx(ctx.results["trace"].trace, rel=1e-12)
    lines = by_name("per_layer").summary(rows, ctx)
    assert any("sum of the group traces" in line for line in lines)


def test_diagonal_unit_and_file(cnn, tmp_path):
    model, batches, H = cnn
    args = parse("--diagonal", "--trace-method", "deflated", "--trace-deflate", "30",
                 "--trace-rse", "0.01", "--max-iter", "200")
    ctx = run_units(args, model, batches)
    d = ctx.results["diagonal"]
    assert ((d.diagonal - torch.diagonal(H)).abs() <= 4.5 * d.stderr + 1e-12).all()
    with RunOutputs(tmp_path) as out:
        by_name("diagonal").write(d, ctx, out)
        out.commit()
    saved = torch.load(tmp_path / "hessian_diagonal.pt", weights_only=True)
    for name, p in model.named_parameters():
        assert saved["diagonal"][name].shape == p.shape == saved["stderr"][name].shape
    assert saved["num_probes"] == d.num_probes
