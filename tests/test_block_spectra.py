"""Per-block spectra: SLQ of every diagonal block with shared passes, the Jensen-Shannon
distance between smoothed block densities, the analysis unit and its figure."""
import math
import types

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

import analyses
from analyses import Context, by_name, selected
from pyhessian_dist import (
    DenseOperator,
    HessianOperator,
    jensen_shannon_distance,
    slq_density,
    slq_group_densities,
    spectral_js_distances,
)
from pyhessian_dist.groups import parameter_groups
from support.figures import block_spectra_figure
from support.outputs import RunOutputs
from tiny import SIZES, analysis_args, dense_hessian, make, split_uneven


def _wishart(n, g):
    X = torch.randn(n, 2 * n, generator=g, dtype=torch.float64) / math.sqrt(2 * n)
    return X @ X.T


def _spiked(n, g):
    U = torch.linalg.qr(torch.randn(n, 5, generator=g, dtype=torch.float64))[0]
    spikes = torch.diag(torch.tensor([1.0, 0.7, 0.5, 0.3, 0.2], dtype=torch.float64))
    return 0.05 * _wishart(n, g) + U @ spikes @ U.T


def _semicircle(n, g):
    X = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (X + X.T) / math.sqrt(8 * n)


# ------------------------------------------------------------------------ group SLQ
def test_group_slq_runs_to_full_size_give_each_blocks_spectrum_with_shared_calls():
    g = torch.Generator().manual_seed(0)
    sizes = [3, 7, 12]
    blocks = [_semicircle(n, g) for n in sizes]
    A = torch.block_diag(*blocks)
    A = A + 0.3 * torch.ones_like(A)  # off-diagonal coupling: a block's spectrum is A_gg's
    calls = []
    op = DenseOperator(A)
    original = op._matmat
    op._matmat = lambda V: calls.append(len(V)) or original(V)
    index = [slice(0, 3), torch.arange(3, 10), slice(10, 22)]
    out = slq_group_densities(op, index, num_steps=50, num_runs=2,
                              generator=torch.Generator().manual_seed(1))
    assert calls == [3] * 3 + [2] * 4 + [1] * 5 + [3] * 3 + [2] * 4 + [1] * 5  # 2 runs
    assert op.num_matvecs == 2 * sum(sizes)
    for d, n, idx in zip(out, sizes, index):
        exact = torch.linalg.eigvalsh(A[idx][:, idx]).tolist()
        assert d.num_runs == 2 and d.num_steps == n and d.num_matvecs == 2 * n
        for nodes, weights in zip(d.nodes, d.weights):
            assert nodes == pytest.approx(exact, abs=1e-10)
            assert sum(weights) == pytest.approx(1.0, abs=1e-12)
    assert out[0].history is out[1].history and out[0].history[-1].matvecs == 2 * sum(sizes)


def test_one_group_of_everything_is_slq_density():
    A = _semicircle(30, torch.Generator().manual_seed(3))
    (group,) = slq_group_densities(DenseOperator(A), [slice(0, 30)], num_steps=12,
                                   generator=torch.Generator().manual_seed(4))
    whole = slq_density(DenseOperator(A), num_steps=12, generator=torch.Generator().manual_seed(4))
    assert group.nodes[0] == pytest.approx(whole.nodes[0], abs=1e-12)
    assert group.weights[0] == pytest.approx(whole.weights[0], abs=1e-12)


# ------------------------------------------------------------------------ JS distance
def test_jensen_shannon_distance_bounds_and_symmetry():
    p = np.array([0.5, 0.5, 0.0, 0.0])
    q = np.array([0.0, 0.0, 0.25, 0.75])
    r = np.array([0.25, 0.25, 0.25, 0.25])
    assert jensen_shannon_distance(p, p) == 0.0
    assert jensen_shannon_distance(p, q) == pytest.approx(1.0)  # disjoint supports
    assert jensen_shannon_distance(p, r) == pytest.approx(jensen_shannon_distance(r, p))
    # the closed form: JS(p, r) = H(m) - (H(p) + H(r)) / 2 in bits
    m = (p + r) / 2
    H = lambda x: -sum(v * math.log2(v) for v in x if v > 0)  # noqa: E731
    assert jensen_shannon_distance(p, r) == pytest.approx(math.sqrt(H(m) - (H(p) + H(r)) / 2))
    # a metric: the triangle inequality
    assert jensen_shannon_distance(p, q) <= jensen_shannon_distance(p, r) + \
        jensen_shannon_distance(r, q)


def test_spectral_js_compares_shapes_whatever_the_scale():
    nodes, weights = [[-1.0, 0.0, 2.0]], [[0.2, 0.5, 0.3]]
    scaled = [[x * 1000 for x in nodes[0]]], weights
    out = spectral_js_distances([(nodes, weights), scaled])
    assert out["js_distance"] == pytest.approx(0.0, abs=1e-12)  # same shape, other size
    assert out["scales"] == [2.0, 2000.0]
    assert sum(out["densities"][0]) == pytest.approx(1.0)
    size = spectral_js_distances([(nodes, weights), scaled], normalise=False)
    # on one scale the small block is a spike at 0: JS of delta_0 and 0.2/0.5/0.3 at -0.5/0/1
    m = [0.1, 0.75, 0.15]
    H_m = -sum(v * math.log2(v) for v in m)
    H_q = -sum(v * math.log2(v) for v in (0.2, 0.5, 0.3))
    assert size["js_distance"] == pytest.approx(math.sqrt(H_m - H_q / 2), rel=1e-4)  # tails
    mirrored = [[-x for x in nodes[0]]], weights
    assert spectral_js_distances([(nodes, weights), mirrored])["js_distance"] > 0.5
    assert spectral_js_distances([(nodes, weights)])["js_distance"] is None
    zero = spectral_js_distances([([[0.0, 0.0]], [[0.5, 0.5]]), (nodes, weights)])
    assert zero["scales"][0] == 1.0 and math.isfinite(zero["js_distance"])


def test_blocks_of_one_ensemble_are_close_and_of_different_ensembles_far():
    """The bandwidth's measurement (analyses/block_spectra.BANDWIDTH): one SLQ run of 100
    steps per 400 x 400 block; two draws of each of three random-matrix ensembles."""
    g = torch.Generator().manual_seed(1)
    blocks = [f(400, g) for f in (_wishart, _wishart, _spiked, _spiked, _semicircle,
                                  _semicircle)]
    index = [slice(400 * i, 400 * (i + 1)) for i in range(6)]
    out = slq_group_densities(DenseOperator(torch.block_diag(*blocks)), index, num_steps=100,
                              generator=torch.Generator().manual_seed(2))
    d = np.array(spectral_js_distances([(r.nodes, r.weights) for r in out])["pairwise"])
    same = [d[0, 1], d[2, 3], d[4, 5]]
    different = [d[i, j] for i in range(6) for j in range(i + 1, 6) if i // 2 != j // 2]
    assert max(same) < 0.15 and min(different) > 0.5, (same, different)


# ------------------------------------------------------------------------ the unit
def test_the_unit_runs_with_per_layer_and_density(tmp_path):
    model, x, y = make("cnn")
    CE = nn.CrossEntropyLoss()
    H = dense_hessian(model, CE, x, y)
    args = analysis_args("--per-layer", "--density", "--lanczos-iter", "200",
                         "--group-by", "parameter")
    names = [a.name for a in selected(args)]
    assert names == ["trace", "per_layer", "density", "block_spectra"]
    assert "block_spectra" not in [a.name for a in selected(analysis_args("--density"))]
    op = HessianOperator(model, CE, split_uneven(x, y, SIZES))
    ctx = Context(args=args, op=op, model=model,
                  worker=types.SimpleNamespace(rank=0, world_size=1))
    unit = by_name("block_spectra")
    r = ctx.timed(unit, lambda: unit.run(ctx))
    ctx.results["block_spectra"] = r
    groups = parameter_groups(op.param_names, op.numels, "parameter")
    assert [g["name"] for g in r["groups"]] == [g.name for g in groups]
    for row, g in zip(r["groups"], groups):  # runs to the block's size: its exact spectrum
        exact = torch.linalg.eigvalsh(H[g.index, g.index])
        assert row["nodes"][0] == pytest.approx(exact.tolist(), abs=1e-9)
        assert row["spectral_radius"] == pytest.approx(exact.abs().max().item(), rel=1e-9)
    assert r["num_matvecs"] == op.dim == ctx.costs["block_spectra"]["num_matvecs"]
    assert r["operator_calls"] == max(g.num_parameters for g in groups)
    assert 0 < r["js_distance"] < 1 and r["smoothing"]["bandwidth"] == 0.05
    lines = unit.summary(r, ctx)
    assert lines[0].startswith("***Block spectra (parameter: 6 groups, SLQ 200 steps x 1 run(s)")
    assert f"cost {op.dim} block products" in lines[1]
    assert unit.compare_cells(unit.to_json(r, ctx)) == (f"{r['js_distance']:.3f}",)
    with RunOutputs(tmp_path, unit.files) as out:
        unit.write(r, ctx, out)
        out.commit()
    assert (tmp_path / "block_spectra.png").read_bytes()[:4] == b"\x89PNG"
    assert "block_spectra.png" in analyses.by_name("block_spectra").files


def test_block_spectra_figure_has_one_panel_per_group():
    entry = {"groups": [{"name": f"g{i}", "num_parameters": 10 * (i + 1),
                         "nodes": [[-0.1, 0.0, 1.0 + i]], "weights": [[0.2, 0.7, 0.1]]}
                        for i in range(8)],
             "js_distance": 0.25, "smoothing": {"bandwidth": 0.05}}
    before = plt.get_fignums()
    fig = block_spectra_figure(entry)
    try:
        visible = [ax for ax in fig.axes if ax.axison]
        assert len(visible) == 8 and len(fig.axes) == 12  # 6 columns, 2 rows
        assert all(ax.get_yscale() == "log" for ax in visible)
        assert visible[0].get_title() == "g0 (10)\nrho 1"
        assert "mean pairwise JS distance 0.250" in fig._suptitle.get_text()
        # the lowest panel of each column carries the x label
        assert [ax.get_xlabel() for ax in visible] == [""] * 2 + ["eigenvalue / rho"] * 6
    finally:
        plt.close(fig)
    assert plt.get_fignums() == before
    with pytest.raises(ValueError, match="no groups"):
        block_spectra_figure({"groups": []})
