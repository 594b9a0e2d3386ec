"""HessianOperator against exact Hessians (torch.func.hessian, float64, unequal batches)."""
import pytest
import torch
from torch import nn

from pyhessian_dist import HessianOperator, ModelOperator
from tiny import SIZES, dense_hessian, least_squares, make, split_uneven

CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("reuse_graph", [True, False])
@pytest.mark.parametrize("hvp_mode", ["double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("vectorize", [False, True])
def test_matvec_equals_dense_hessian(kind, reuse_graph, hvp_mode, vectorize):
    model, x, y = make(kind)
    H = dense_hessian(model, CE, x, y)
    op = HessianOperator(model, CE, split_uneven(x, y, SIZES), reuse_graph=reuse_graph,
                         hvp_mode=hvp_mode, vectorize=vectorize)
    assert op.dim == H.shape[0] and op.num_samples == 23
    g = torch.Generator().manual_seed(3)
    V = torch.randn(4, op.dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V[0]), H @ V[0], rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(op.matvec(V), V @ H, rtol=1e-6, atol=1e-10)  # batched block
    assert op.num_matvecs == 5


def test_reuse_graph_auto_respects_budget():
    model, x, y = make("mlp")
    batches = split_uneven(x, y, SIZES)
    assert HessianOperator(model, CE, batches, reuse_graph="auto").reuse_graph is True
    op = HessianOperator(model, CE, batches, reuse_graph="auto", memory_budget_bytes=1)
    assert op.reuse_graph is False and op.graph_bytes_estimate > 1


def test_gradient_and_loss_over_union():
    model, x, y = make("cnn")
    op = HessianOperator(model, CE, split_uneven(x, y, SIZES))
    loss = CE(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert op.loss() == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(op.gradient(), torch.cat([g.reshape(-1) for g in grads]))
    v = op.gradient()
    torch.testing.assert_close(op.from_list(op.to_list(v)), v)


def test_closed_form_softmax_regression():
    """Softmax regression: H = (1/N) sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T, by hand."""
    torch.manual_seed(0)
    N, d, c = 17, 4, 3
    x = torch.randn(N, d, dtype=torch.float64)
    y = torch.randint(0, c, (N,))
    model = nn.Linear(d, c, bias=False).double()
    W = model.weight.detach()
    p = torch.softmax(x @ W.T, dim=1)
    H = torch.zeros(c * d, c * d, dtype=torch.float64)
    for i in range(N):
        A = torch.diag(p[i]) - torch.outer(p[i], p[i])
        H += torch.kron(A, torch.outer(x[i], x[i]))  # row-major flattening of W (c, d)
    H /= N
    op = HessianOperator(model, CE, split_uneven(x, y, [5, 12]))
    eye = torch.eye(c * d, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(eye), H, rtol=1e-10, atol=1e-12)


def test_linear_least_squares_closed_form():
    """MSE of a linear model: H = (2 / (N * out)) X^T X per output row (kron identity)."""
    model, x, y, H = least_squares()
    op = HessianOperator(model, nn.MSELoss(), split_uneven(x, y, [4, 7]))
    torch.testing.assert_close(op.matvec(torch.eye(len(H), dtype=torch.float64)), H)


class WithExtras(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 3).double()
        self.unused = nn.Linear(2, 2).double()        # never called in forward
        self.frozen = nn.Linear(5, 3).double()
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return torch.tanh(self.body(x)) + self.frozen(x)


def test_unused_parameter_gives_zero_block_and_frozen_is_left_out():
    torch.manual_seed(0)
    model = WithExtras()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    op = HessianOperator(model, CE, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert op.param_names == ["body.weight", "body.bias", "unused.weight", "unused.bias"]
    H = op.matvec(torch.eye(op.dim, dtype=torch.float64))
    n_body = 15 + 3
    assert torch.count_nonzero(H[n_body:]) == 0 and torch.count_nonzero(H[:, n_body:]) == 0
    ref_model = WithExtras()
    ref_model.load_state_dict(model.state_dict())
    del ref_model.unused  # same function of body.*, without the unused block
    ref = dense_hessian(ref_model, CE, x, y)
    torch.testing.assert_close(H[:n_body, :n_body], ref)


def test_bad_inputs_raise_clear_errors():
    model, x, y = make("mlp")
    with pytest.raises(ValueError, match="no data"):
        HessianOperator(model, CE, [])
    with pytest.raises(ValueError, match="no data"):
        HessianOperator(model, CE, [(x[:0], y[:0])])
    frozen = make("mlp")[0].requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        HessianOperator(frozen, CE, [(x, y)])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        HessianOperator(model, CE, [(bad, y)])
    op = HessianOperator(model, CE, [(x, y)])
    with pytest.raises(ValueError, match="expected shape"):
        op.matvec(torch.zeros(op.dim + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="hvp_mode"):
        HessianOperator(model, CE, [(x, y)], hvp_mode="magic")
    with pytest.raises(ValueError, match="data_on_device"):
        HessianOperator(model, CE, [(x, y)], data_on_device="sometimes")


def test_partial_graph_reuse_and_host_data_stay_exact():
    """A budget for two graphs keeps two (the rest are recomputed); data kept on the host and
    moved per product give the same products."""
    model, x, y = make("cnn")
    H = dense_hessian(model, CE, x, y)
    batches = split_uneven(x, y, SIZES)
    probe = HessianOperator(model, CE, batches, reuse_graph=True)
    per_batch = probe.graph_bytes_estimate // len(SIZES)
    op = HessianOperator(model, CE, batches, memory_budget_bytes=2 * per_batch + 1,
                         data_on_device=False)
    assert op.stats()["graphs_kept"] == 2 and not op.reuse_graph
    assert "kept for 2/4 mini-batches" in op.describe_memory()
    V = torch.randn(3, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(op.matvec(V), V @ H, rtol=1e-6, atol=1e-10)
    none = HessianOperator(model, CE, batches, reuse_graph=False)
    assert none.stats()["graphs_kept"] == 0 and "recomputed" in none.describe_memory()
    torch.testing.assert_close(none.matvec(V), V @ H, rtol=1e-6, atol=1e-10)


def test_parameter_slices_and_groups_cover_the_vector():
    from pyhessian_dist.groups import parameter_groups

    model, x, y = make("cnn")
    op = HessianOperator(model, CE, [(x, y)])
    slices = op.parameter_slices()
    assert [n for n, _ in slices] == op.param_names and slices[-1][1].stop == op.dim
    for by, expected in (("module", ["conv", "bn", "fc"]),
                         ("parameter", op.param_names),
                         ("stage", ["conv", "bn", "fc"])):
        groups = parameter_groups(op.param_names, op.numels, by)
        assert [g.name for g in groups] == expected
        covered = torch.zeros(op.dim, dtype=torch.long)
        for g in groups:
            covered[g.index] += 1
        assert (covered == 1).all()


def test_model_operator_subclass_supplies_only_its_per_batch_product():
    """The base weights, sums and all-reduces; a subclass gives w_b M_b V. With M_b = (b + 1) I
    the operator is (sum_b n_b (b + 1) / N) I."""

    class Scaled(ModelOperator):
        def _batch_matmat(self, b, V):
            return self.weights[b] * (b + 1) * V

    model, x, y = make("mlp")
    op = Scaled(model, CE, split_uneven(x, y, SIZES))
    V = torch.randn(2, op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scale = sum(n * (b + 1) for b, n in enumerate(SIZES)) / sum(SIZES)
    torch.testing.assert_close(op.matvec(V), scale * V)
    assert op.stats()["allreduce_calls"] == 0 and op.num_matvecs == 2  # one process
    grads = torch.autograd.grad(CE(model(x), y), list(model.parameters()))
    torch.testing.assert_close(op.gradient(), torch.cat([g.reshape(-1) for g in grads]))
    with pytest.raises(NotImplementedError):
        ModelOperator(model, CE, [(x, y)]).matvec(V[0])
