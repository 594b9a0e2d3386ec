"""Batches of any layout (pyhessian_dist.batches) and operators built on forward/loss."""
from collections import namedtuple

import pytest
import torch
from torch import nn

from pyhessian_dist import HessianOperator, batch_size
from pyhessian_dist.batches import (
    batch_nbytes,
    criterion_loss,
    default_forward,
    move_batch,
    pin_batch,
)
from tiny import SIZES, dense_hessian, make, split_uneven

CE = nn.CrossEntropyLoss()
F64 = torch.float64
Pair = namedtuple("Pair", "x y")


# ----------------------------------------------------------------------------- helpers
def test_batch_size_of_every_layout():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    assert batch_size(x) == 4
    assert batch_size((x, y)) == 4 and batch_size([x, y]) == 4
    assert batch_size({"x": x, "y": y, "name": "shard-0", "scale": torch.tensor(2.0)}) == 4
    assert batch_size({"inputs": ((x, x), {"mask": y}), "y": y}) == 4
    assert batch_size(Pair(x, y)) == 4
    assert batch_size((x[:0], y[:0])) == 0


def test_batch_size_errors_say_what_is_wrong():
    x, y = torch.zeros(4, 3), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"disagree.*batch\['x'\]: 4, batch\['y'\]: 5"):
        batch_size({"x": x, "y": y})
    with pytest.raises(ValueError, match=r"batch\[0\]\[1\]: 5"):
        batch_size(((x, y), x))
    with pytest.raises(ValueError, match="at least one tensor"):
        batch_size({"name": "no tensors", "n": 3})
    with pytest.raises(ValueError, match="at least one tensor"):
        batch_size((torch.tensor(1.0), "label"))  # a 0-dim tensor has no sample dimension


def test_move_pin_and_nbytes_keep_the_structure():
    x = torch.arange(6, dtype=F64).reshape(3, 2)
    batch = {"inputs": (x, [x[:, 0]]), "pair": Pair(x, x), "name": "keep me", "k": 7}
    moved = move_batch(batch, "cpu")
    assert moved["name"] == "keep me" and moved["k"] == 7
    assert isinstance(moved["pair"], Pair) and isinstance(moved["inputs"][1], list)
    torch.testing.assert_close(moved["inputs"][0], x)
    moved32 = move_batch(batch, torch.float32)  # Tensor.to(dtype): every leaf is reached
    assert moved32["pair"].y.dtype == moved32["inputs"][1][0].dtype == torch.float32
    assert batch["pair"].y.dtype == F64
    pinned = pin_batch(batch)
    assert isinstance(pinned["pair"], Pair) and pinned["name"] == "keep me"
    assert batch_nbytes(batch) == 8 * (6 + 3 + 6 + 6)


def test_default_forward_and_criterion_loss():
    model = nn.Linear(2, 1).double()
    x = torch.randn(5, 2, dtype=F64)
    torch.testing.assert_close(default_forward(model, (x, None)), model(x))
    torch.testing.assert_close(default_forward(model, x), model(x))  # a bare tensor batch

    class Two(nn.Module):
        def forward(self, a, b):
            return a - b

    torch.testing.assert_close(default_forward(Two(), ([x, 2 * x], None)), -x)
    with pytest.raises(TypeError, match="forward="):
        default_forward(model, {"x": x})
    y = torch.randn(5, 1, dtype=F64)
    mse = criterion_loss(nn.MSELoss())
    assert mse(model(x), (x, y)).item() == pytest.approx(((model(x) - y) ** 2).mean().item())


# ----------------------------------------------------------------------------- operators
def dict_batches(x, y, sizes):
    """(x, y) cut into dict batches of the given sizes, with a non-tensor leaf."""
    return [{"inputs": {"x": bx}, "y": by, "source": f"part {i}"}
            for i, (bx, by) in enumerate(split_uneven(x, y, sizes))]


def forward_dict(model, batch):
    return model(batch["inputs"]["x"])


def loss_dict(outputs, batch):
    return CE(outputs, batch["y"])


@pytest.mark.parametrize("hvp_mode", ["double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("reuse_graph", [True, False])
def test_dict_batches_with_forward_and_loss_match_dense_hessian(hvp_mode, reuse_graph):
    model, x, y = make("cnn")
    H = dense_hessian(model, CE, x, y)
    batches = dict_batches(x, y, [7, 0, 1, 5, 10])  # unequal, one of them empty
    op = HessianOperator(model, batches=batches, forward=forward_dict, loss=loss_dict,
                         hvp_mode=hvp_mode, reuse_graph=reuse_graph)
    assert op.num_samples == 23 and op.batch_sizes == [7, 1, 5, 10]
    assert op.weights == pytest.approx([7 / 23, 1 / 23, 5 / 23, 10 / 23])
    V = torch.randn(3, op.dim, dtype=F64, generator=torch.Generator().manual_seed(0))
    HV = op.matvec(V)
    assert HV.dtype == F64 and op.gradient().dtype == F64  # float64 end to end
    torch.testing.assert_close(HV, V @ H, rtol=1e-6, atol=1e-10)
    assert op.loss() == pytest.approx(CE(model(x), y).item(), rel=1e-12)


def test_regression_loss_through_loss_argument():
    """A mean over samples of 0.5 ||f(x) - t||^2 (float targets) against the dense Hessian."""
    model, x, _ = make("mlp")
    t = torch.randn(len(x), 3, dtype=F64, generator=torch.Generator().manual_seed(4))

    def half_squares(outputs, targets):
        return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()

    H = dense_hessian(model, half_squares, x, t)
    H_batchwise = dense_hessian(model, half_squares, x[:7], t[:7])
    assert not torch.allclose(H, H_batchwise)  # the weighting over mini-batches matters
    for data_on_device in (True, False):
        op = HessianOperator(model, batches=split_uneven(x, t, SIZES),
                             loss=lambda out, batch: half_squares(out, batch[1]),
                             data_on_device=data_on_device)
        torch.testing.assert_close(op.matvec(torch.eye(op.dim, dtype=F64)), H,
                                   rtol=1e-8, atol=1e-10)


def test_local_batches_forward_fn_and_loss_fn_are_public():
    model, x, y = make("mlp")
    batches = split_uneven(x, y, SIZES)
    op = HessianOperator(model, CE, batches + [(x[:0], y[:0])], data_on_device=False)
    seen = list(op.local_batches())
    assert [n for _b, n in seen] == SIZES  # the empty batch is skipped
    total = sum(op.loss_fn(op.forward_fn(op.model, b), b).item() * n for b, n in seen)
    assert total / op.num_samples == pytest.approx(op.loss(), rel=1e-12)


def test_criterion_or_loss_exactly_one():
    model, x, y = make("mlp")
    with pytest.raises(ValueError, match="exactly one of criterion"):
        HessianOperator(model, CE, [(x, y)], loss=loss_dict)
    with pytest.raises(ValueError, match="exactly one of criterion"):
        HessianOperator(model, batches=[(x, y)])


def test_bad_batches_and_losses_raise():
    model, x, y = make("mlp")
    with pytest.raises(ValueError, match="disagree"):
        HessianOperator(model, CE, [(x, y[:-1])])
    with pytest.raises(ValueError, match="0-dim tensor"):
        HessianOperator(model, batches=[(x, y)],
                        loss=lambda out, b: nn.functional.cross_entropy(out, b[1],
                                                                        reduction="none"))
