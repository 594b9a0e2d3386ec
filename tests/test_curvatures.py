"""GGNOperator and EmpiricalFisherOperator against dense references on tiny float64 models
(unequal mini-batches), through the estimators unchanged, and on 1/2/3 gloo ranks."""
import pytest
import torch
from torch import nn

from dist_harness import run_distributed
from pyhessian_dist import (
    CURVATURES,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    hutchinson_trace,
    lanczos_eigenpairs,
    slq_density,
)
from pyhessian_dist.operators.fisher import per_sample_gradients
from tiny import (
    SIZES,
    dense_empirical_fisher,
    dense_ggn,
    least_squares,
    make,
    split_uneven,
)

CE = nn.CrossEntropyLoss()


def probes(dim, k=3, seed=0):
    return torch.randn(k, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("reuse_graph", [True, False])
def test_ggn_equals_jacobian_and_output_hessian(kind, reuse_graph):
    """G V = J^T H_L J V with J from jacrev of the outputs and H_L from hessian of the loss on
    the outputs, over the union of unequal mini-batches; one vector and a block."""
    model, x, y = make(kind)
    G = dense_ggn(model, CE, x, y)
    op = GGNOperator(model, CE, split_uneven(x, y, SIZES), reuse_graph=reuse_graph)
    assert op.dtype == torch.float64 and op.num_samples == 23
    V = probes(op.dim)
    torch.testing.assert_close(op.matvec(V[0]), G @ V[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(V), V @ G, rtol=1e-10, atol=1e-12)
    assert op.stats()["graphs_kept"] == (4 if reuse_graph else 0)
    loss = CE(model(x), y)
    assert op.loss() == pytest.approx(loss.item(), rel=1e-12)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(op.gradient(), torch.cat([g.reshape(-1) for g in grads]))


def test_ggn_keeps_graphs_within_the_budget():
    model, x, y = make("cnn")
    batches = split_uneven(x, y, SIZES)
    per_batch = GGNOperator(model, CE, batches, reuse_graph=True).graph_bytes_estimate // 4
    op = GGNOperator(model, CE, batches, memory_budget_bytes=2 * per_batch + 1)
    assert op.stats()["graphs_kept"] == 2 and not op.reuse_graph
    assert "kept for 2/4 mini-batches" in op.describe_memory()
    V = probes(op.dim)
    torch.testing.assert_close(op.matvec(V), V @ dense_ggn(model, CE, x, y), rtol=1e-10,
                               atol=1e-12)


def test_ggn_equals_hessian_for_a_linear_model_with_squared_loss():
    """A model linear in theta with the squared loss: H = G = (2 / N) X^T X (by hand)."""
    model, x, y, closed = least_squares()
    batches = split_uneven(x, y, [4, 7])
    eye = torch.eye(len(closed), dtype=torch.float64)
    G = GGNOperator(model, nn.MSELoss(), batches).matvec(eye)
    H = HessianOperator(model, nn.MSELoss(), batches).matvec(eye)
    torch.testing.assert_close(G, closed, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(H, closed, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ggn_is_positive_semidefinite_where_the_hessian_is_not(kind):
    """The Hessian has negative eigenvalues; G's smallest are >= -1e-12 (dense and by the
    estimators, which take the operator unchanged)."""
    model, x, y = make(kind)
    batches = split_uneven(x, y, SIZES)
    ggn, hess = GGNOperator(model, CE, batches), HessianOperator(model, CE, batches)
    eye = torch.eye(ggn.dim, dtype=torch.float64)
    eig_H = torch.linalg.eigvalsh(hess.matvec(eye))
    G = ggn.matvec(eye)
    eig_G = torch.linalg.eigvalsh((G + G.T) / 2)
    assert eig_H[0] < -1e-3
    assert eig_G[0] >= -1e-12 * eig_G[-1]
    bottom = lanczos_eigenpairs(ggn, 2, which="SA", max_steps=ggn.dim, tol=1e-10,
                                generator=torch.Generator().manual_seed(0))
    assert min(bottom.eigenvalues) >= -1e-10 * eig_G[-1]
    top = lanczos_eigenpairs(ggn, 3, max_steps=ggn.dim, tol=1e-10,
                             generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.tensor(top.eigenvalues, dtype=torch.float64),
                               eig_G.flip(0)[:3], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_empirical_fisher_equals_per_sample_gradients(kind, keep, chunk_size):
    """F V = (1/N) sum_i g_i (g_i . V) with g_i from a plain backward pass per sample."""
    model, x, y = make(kind)
    F = dense_empirical_fisher(model, CE, x, y)
    op = EmpiricalFisherOperator(model, CE, split_uneven(x, y, SIZES), keep_gradients=keep,
                                 chunk_size=chunk_size)
    assert op.dtype == torch.float64 and op.stats()["gradients_kept"] == (4 if keep else 0)
    V = probes(op.dim)
    torch.testing.assert_close(op.matvec(V[0]), F @ V[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matvec(V), V @ F, rtol=1e-10, atol=1e-12)
    loss = CE(model(x), y)
    assert op.loss() == pytest.approx(loss.item(), rel=1e-12)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(op.gradient(), torch.cat([g.reshape(-1) for g in grads]))
    assert torch.linalg.eigvalsh(F)[0] >= -1e-12  # PSD, rank <= N
    assert torch.linalg.matrix_rank(F) <= 23


def test_empirical_fisher_keeps_what_fits_and_loop_mode_agrees():
    model, x, y = make("mlp")
    batches = split_uneven(x, y, SIZES)
    dim = sum(p.numel() for p in model.parameters())
    # room for the chunk being computed (3 x chunk x dim) and the first two mini-batches
    budget = (3 * 2 + 7 + 1) * dim * 8
    op = EmpiricalFisherOperator(model, CE, batches, chunk_size=2, memory_budget_bytes=budget)
    assert op.stats()["gradients_kept"] == 2 and "kept for 2/4" in op.describe_memory()
    F = dense_empirical_fisher(model, CE, x, y)
    V = probes(op.dim)
    torch.testing.assert_close(op.matvec(V), V @ F, rtol=1e-10, atol=1e-12)
    params = dict(model.named_parameters())
    G1, l1, mode1 = per_sample_gradients(model, (x, y), lambda m, b: m(b[0]),
                                         lambda o, b: CE(o, b[1]), params)
    G2, l2, mode2 = per_sample_gradients(model, (x, y), lambda m, b: m(b[0]),
                                         lambda o, b: CE(o, b[1]), params, chunk_size=5,
                                         mode="loop")
    assert (mode1, mode2) == ("vmap", "loop")
    torch.testing.assert_close(G1, G2)
    torch.testing.assert_close(l1, l2)


def test_a_model_vmap_cannot_run_falls_back_to_a_loop():
    class ItemModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3).double()

        def forward(self, x):
            scale = float(x.abs().max().item()) > -1  # .item() cannot run under vmap
            return self.lin(x) * scale

    torch.manual_seed(0)
    model = ItemModel()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    op = EmpiricalFisherOperator(model, CE, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert op.per_sample_mode == "loop" and "loop" in op.describe_product()
    V = probes(op.dim)
    torch.testing.assert_close(op.matvec(V), V @ dense_empirical_fisher(model, CE, x, y))


def test_dict_batches_and_dict_outputs():
    """Batches of any layout (a dict with a string leaf) and outputs that are a dict: G and F
    equal the dense references of the same model called plainly."""
    model, x, y = make("mlp")
    batches = [{"x": b[0], "y": b[1], "name": "tiny"} for b in split_uneven(x, y, SIZES)]

    def forward(m, b):
        return {"logits": m(b["x"]), "count": torch.tensor(len(b["y"]))}

    def loss(out, b):
        return CE(out["logits"], b["y"])

    V = probes(sum(p.numel() for p in model.parameters()))
    ggn = GGNOperator(model, batches=batches, forward=forward, loss=loss)
    torch.testing.assert_close(ggn.matvec(V), V @ dense_ggn(model, CE, x, y), rtol=1e-10,
                               atol=1e-12)
    ef = EmpiricalFisherOperator(model, batches=batches, forward=forward, loss=loss)
    torch.testing.assert_close(ef.matvec(V), V @ dense_empirical_fisher(model, CE, x, y),
                               rtol=1e-10, atol=1e-12)


def test_estimators_take_the_new_operators_unchanged():
    model, x, y = make("cnn")
    batches = split_uneven(x, y, SIZES)
    for cls, dense in ((GGNOperator, dense_ggn(model, CE, x, y)),
                       (EmpiricalFisherOperator, dense_empirical_fisher(model, CE, x, y))):
        op = cls(model, CE, batches)
        exact = torch.linalg.eigvalsh((dense + dense.T) / 2)
        top = lanczos_eigenpairs(op, 2, tol=1e-10, max_steps=op.dim,
                                 generator=torch.Generator().manual_seed(0))
        assert top.eigenvalues == pytest.approx(exact.flip(0)[:2].tolist(), rel=1e-8)
        tr = hutchinson_trace(op, max_iter=op.dim, tol=0.0, deflate=op.dim,
                              generator=torch.Generator().manual_seed(1))
        assert tr.trace == pytest.approx(dense.trace().item(), rel=1e-8)
        d = slq_density(op, num_steps=op.dim, num_runs=1,
                        generator=torch.Generator().manual_seed(2))
        assert max(d.nodes[0]) == pytest.approx(exact[-1].item(), rel=1e-8)


def test_loss_checks_say_what_is_wrong():
    model, x, y = make("mlp")
    batch = (x[:4], y[:4])
    for cls in CURVATURES.values():
        cls.check_loss(model, batch, criterion=CE)  # a mean loss of the outputs passes all
    with pytest.raises(ValueError, match="MEAN of per-sample losses.*4 times the mean"):
        EmpiricalFisherOperator.check_loss(model, batch,
                                           criterion=nn.CrossEntropyLoss(reduction="sum"))
    with pytest.raises(ValueError, match="MEAN of per-sample losses"):
        EmpiricalFisherOperator(model, nn.CrossEntropyLoss(reduction="sum"), [batch])
    HessianOperator.check_loss(model, batch, criterion=nn.CrossEntropyLoss(reduction="sum"))
    with pytest.raises(ValueError, match="does not depend on them"):
        GGNOperator.check_loss(model, batch, loss=lambda out, b: CE(model(b[0]), b[1]))
    penalty = lambda out, b: CE(out, b[1]) + 1e-3 * model[0].weight.square().sum()  # noqa: E731
    with pytest.raises(ValueError, match="only through the outputs"):
        GGNOperator.check_loss(model, batch, loss=penalty)
    with pytest.raises(ValueError, match="only through the outputs"):
        GGNOperator(model, loss=penalty, batches=[batch])
    with pytest.raises(ValueError, match="keep_gradients"):
        EmpiricalFisherOperator(model, CE, [batch], keep_gradients="maybe")
    with pytest.raises(ValueError, match="reuse_graph"):
        GGNOperator(model, CE, [batch], reuse_graph="maybe")


# ---------------------------------------------------------------------------- distributed
def products(rank, world_size, kind):
    """Every rank: its round-robin shard -> G and F products, top-2 eigenvalues, trace."""
    model, x, y = make(kind)
    mine = [b for i, b in enumerate(split_uneven(x, y, SIZES)) if i % world_size == rank]
    out = {}
    V = probes(sum(p.numel() for p in model.parameters()))
    for name in ("ggn", "ef"):
        op = CURVATURES[name](model, CE, mine)
        before = op.comm.calls
        MV = op.matvec(V).tolist()  # a block of 3 vectors: one all-reduce
        calls = op.comm.calls - before
        eig = lanczos_eigenpairs(op, 2, tol=1e-10, generator=torch.Generator().manual_seed(0))
        tr = hutchinson_trace(op, max_iter=8, tol=0.0, deflate=2,
                              generator=torch.Generator().manual_seed(1))
        out[name] = {"MV": MV, "eig": eig.eigenvalues, "trace": tr.trace, "calls": calls}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_world_sizes_give_the_dense_numbers(world_size):
    model, x, y = make("cnn")
    dense = {"ggn": dense_ggn(model, CE, x, y), "ef": dense_empirical_fisher(model, CE, x, y)}
    V = probes(dense["ggn"].shape[0])
    ref = products(0, 1, "cnn")
    results = run_distributed(products, world_size, "cnn") if world_size > 1 else [ref]
    for name, M in dense.items():
        for r in results:
            torch.testing.assert_close(torch.tensor(r[name]["MV"], dtype=torch.float64), V @ M,
                                       rtol=1e-10, atol=1e-12)
            assert r[name]["eig"] == pytest.approx(ref[name]["eig"], rel=1e-9)
            assert r[name]["trace"] == pytest.approx(ref[name]["trace"], rel=1e-9)
            assert r[name]["calls"] == (1 if world_size > 1 else 0)


def test_eval_batch_norm_is_built_as_its_affine_map():
    """The GGN's graphs compute eval-mode batch_norm as x * s + t: the same values (with and
    without weights, 2d and 4d inputs, keyword arguments); training-mode calls run as they are."""
    import torch.nn.functional as F

    from pyhessian_dist.operators.ggn import _EvalBatchNormAsAffine

    g = torch.Generator().manual_seed(0)
    for shape, affine in (((5, 3), True), ((4, 3, 2, 2), False)):
        bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(3, affine=affine).double()
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1, generator=g)
            bn.running_var.uniform_(0.5, 2, generator=g)
        x = torch.randn(shape, dtype=torch.float64, generator=g)
        expected = bn.eval()(x)
        with _EvalBatchNormAsAffine():
            got = bn(x)
            by_keywords = F.batch_norm(x, bn.running_mean, bn.running_var, training=False,
                                       eps=bn.eps)
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
        assert got.grad_fn is None or "BatchNorm" not in type(got.grad_fn).__name__
        torch.testing.assert_close(by_keywords, F.batch_norm(x, bn.running_mean,
                                                             bn.running_var, eps=bn.eps))
        with _EvalBatchNormAsAffine():
            train_mode = F.batch_norm(x, None, None, training=True)
        torch.testing.assert_close(train_mode, F.batch_norm(x, None, None, training=True))
