"""World sizes 1, 2, 3 (gloo, uneven shards) give the numbers of one process on the union."""
import pytest
import torch
from torch import nn

from dist_harness import run_distributed
from pyhessian_dist import (
    HessianOperator,
    hutchinson_trace,
    lanczos_eigenpairs,
    lanczos_group_eigenpairs,
    slq_density,
)
from pyhessian_dist.groups import parameter_groups
from tiny import SIZES, dense_hessian, make, split_uneven

CE = nn.CrossEntropyLoss()


def analyse(rank, world_size, kind, deal):
    """Every rank: its shard of the mini-batches -> matvec, top-2 eigenvalues, trace, SLQ."""
    model, x, y = make(kind)
    batches = split_uneven(x, y, SIZES)
    mine = [b for i, b in enumerate(batches) if deal(i, world_size) == rank]
    op = HessianOperator(model, CE, mine)
    v = torch.linspace(-1, 1, op.dim, dtype=torch.float64)
    eig = lanczos_eigenpairs(op, 2, tol=1e-8, generator=torch.Generator().manual_seed(0))
    bottom = lanczos_eigenpairs(op, 2, which="SA", tol=1e-8,
                                generator=torch.Generator().manual_seed(4))
    groups = [g.index for g in parameter_groups(op.param_names, op.numels, "module")]
    tr = hutchinson_trace(op, max_iter=20, tol=0.0, deflate=3, groups=groups, diagonal=True,
                          generator=torch.Generator().manual_seed(1), block_size=4)
    blocks = lanczos_group_eigenpairs(op, groups, k=1, tol=1e-8,
                                      generator=torch.Generator().manual_seed(3))
    d = slq_density(op, num_steps=10, num_runs=2, generator=torch.Generator().manual_seed(2))
    return {"Hv": op.matvec(v).tolist(), "eig": eig.eigenvalues, "trace": tr.trace,
            "bottom": bottom.eigenvalues, "group_traces": tr.group_traces()[0],
            "diagonal": tr.diagonal.diagonal.tolist(),
            "blocks": [b.eigenvalues[0] for b in blocks],
            "nodes": d.nodes, "n": op.num_samples, "local": op.local_num_samples,
            "allreduces": op.comm.calls, "matvecs": op.num_matvecs}


def round_robin(i, world_size):
    return i % world_size


def all_on_last(i, world_size):
    return world_size - 1  # every rank but the last holds no data at all


def analyse_both(rank, world_size, deal):
    return {kind: analyse(rank, world_size, kind, deal) for kind in ("mlp", "cnn")}


@pytest.mark.parametrize("world_size", [2, 3])
def test_uneven_shards_match_one_process(world_size):
    refs = analyse_both(0, 1, round_robin)
    results = run_distributed(analyse_both, world_size, round_robin)
    for kind, ref in refs.items():
        per_rank = [r[kind] for r in results]
        _check_same(per_rank, ref)


def _check_same(per_rank, ref):
    locals_ = [r["local"] for r in per_rank]
    assert sum(locals_) == 23 and len(set(locals_)) > 1  # shards really are uneven
    for r in per_rank:
        assert r["n"] == 23
        torch.testing.assert_close(torch.tensor(r["Hv"]), torch.tensor(ref["Hv"]),
                                   rtol=1e-6, atol=1e-12)
        assert r["eig"] == pytest.approx(ref["eig"], rel=1e-6)
        assert r["trace"] == pytest.approx(ref["trace"], rel=1e-6)
        assert r["bottom"] == pytest.approx(ref["bottom"], rel=1e-6, abs=1e-12)
        assert r["group_traces"] == pytest.approx(ref["group_traces"], rel=1e-6, abs=1e-12)
        assert r["diagonal"] == pytest.approx(ref["diagonal"], rel=1e-6, abs=1e-12)
        assert r["blocks"] == pytest.approx(ref["blocks"], rel=1e-6, abs=1e-12)
        for a, b in zip(r["nodes"], ref["nodes"]):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-10)
        # one all-reduce per operator call (+1 for the set-up pass), never one per parameter
        assert r["allreduces"] <= r["matvecs"] + 1


def test_ranks_without_data_still_exact():
    ref = analyse(0, 1, "mlp", round_robin)
    results = run_distributed(analyse, 3, "mlp", all_on_last)
    assert [r["local"] for r in results] == [0, 0, 23]
    for r in results:
        assert r["eig"] == pytest.approx(ref["eig"], rel=1e-6)
        assert r["trace"] == pytest.approx(ref["trace"], rel=1e-6)


def fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise RuntimeError("injected failure")
    return rank


def test_harness_reports_worker_exceptions():
    with pytest.raises(RuntimeError, match="injected failure"):
        run_distributed(fail_on_rank_one, 2, timeout=60)


# ------------------------------------------------------------- generic batches, any world size
def dict_products(rank, world_size):
    """Dict batches dealt to all ranks but the last (which holds only an empty batch when
    world_size > 1); H applied to a fixed block through forward=/loss=."""
    model, x, y = make("cnn")
    parts = split_uneven(x, y, SIZES)
    batches = [{"image": bx, "label": by} for bx, by in parts]
    holders = max(world_size - 1, 1)
    if rank < holders:
        mine = [b for i, b in enumerate(batches) if i % holders == rank]
    else:  # no samples at all: one empty batch
        mine = [{"image": x[:0], "label": y[:0]}]
    op = HessianOperator(model, batches=mine, forward=lambda m, b: m(b["image"]),
                         loss=lambda out, b: CE(out, b["label"]))
    V = torch.linspace(-1, 1, 2 * op.dim, dtype=torch.float64).reshape(2, op.dim)
    return {"HV": op.matvec(V).tolist(), "local": op.local_num_samples, "n": op.num_samples,
            "loss": op.loss()}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_dict_batches_exact_on_any_world_size(world_size):
    model, x, y = make("cnn")
    H = dense_hessian(model, CE, x, y)
    V = torch.linspace(-1, 1, 2 * H.shape[0], dtype=torch.float64).reshape(2, -1)
    results = run_distributed(dict_products, world_size)
    locals_ = [r["local"] for r in results]
    assert sum(locals_) == 23 and (world_size == 1 or locals_[-1] == 0)
    for r in results:
        assert r["n"] == 23
        assert r["loss"] == pytest.approx(CE(model.eval()(x), y).item(), rel=1e-12)
        torch.testing.assert_close(torch.tensor(r["HV"], dtype=torch.float64), V @ H,
                                   rtol=1e-6, atol=1e-10)
