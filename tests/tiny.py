"""Tiny float64 models and data for exact library tests, and the analyses' options for
running analysis units in-process (importable by spawned workers)."""
import argparse

import torch
from torch import nn


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


class TinyCNN(nn.Module):
    """conv -> BatchNorm (eval, non-trivial running stats) -> tanh -> pool -> linear."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 2 * 2, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)
        self.double()

    def forward(self, x):
        x = torch.tanh(self.bn(self.conv(x)))
        x = nn.functional.avg_pool2d(x, 2)
        return self.fc(x.flatten(1))


def tiny_data(kind, n=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def split_uneven(x, y, sizes):
    """Cut (x, y) into consecutive mini-batches of the given sizes."""
    assert sum(sizes) == len(y)
    out, i = [], 0
    for s in sizes:
        out.append((x[i:i + s], y[i:i + s]))
        i += s
    return out


SIZES = [7, 1, 5, 10]  # 23 samples, deliberately unequal


def make(kind):
    model = tiny_mlp() if kind == "mlp" else TinyCNN()
    x, y = tiny_data(kind)
    return model, x, y


def dense_hessian(model, criterion, x, y):
    """Exact Hessian of the mean loss on (x, y) w.r.t. the flattened trainable parameters."""
    from torch.func import functional_call, hessian

    names, shapes, numels, theta = _flat_params(model)
    model.eval()

    def loss(flat):
        ps = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, numels), shapes)}
        return criterion(functional_call(model, ps, (x,), strict=False), y)

    return hessian(loss)(theta)


def least_squares(N=11, d=3, seed=1):
    """A linear model with one output and its data: (model, x, y, the closed-form Hessian of
    the mean squared error (2 / N) X^T X, X with a column of ones for the bias)."""
    torch.manual_seed(seed)
    x = torch.randn(N, d, dtype=torch.float64)
    y = torch.randn(N, 1, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    X1 = torch.cat([x, torch.ones(N, 1, dtype=torch.float64)], dim=1)  # weight then bias
    return model, x, y, 2.0 / N * X1.T @ X1


def _flat_params(model):
    """(names, shapes, numels, theta) of the trainable parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _n, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _n, p in named])
    return [n for n, _p in named], shapes, [s.numel() for s in shapes], theta


def dense_ggn(model, loss_fn, x, y):
    """Exact GGN J^T H_L J of the mean loss on (x, y): J = torch.func.jacrev of the flattened
    outputs with respect to the flattened parameters, H_L = torch.func.hessian of the loss with
    respect to the outputs."""
    from torch.func import functional_call, hessian, jacrev

    names, shapes, numels, theta = _flat_params(model)
    model.eval()

    def outputs(flat):
        ps = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, numels), shapes)}
        return functional_call(model, ps, (x,), strict=False)

    z = outputs(theta).detach()
    J = jacrev(lambda flat: outputs(flat).reshape(-1))(theta)
    H_L = hessian(lambda flat_z: loss_fn(flat_z.view(z.shape), y))(z.reshape(-1))
    return J.T @ H_L @ J


def dense_empirical_fisher(model, loss_fn, x, y):
    """(1/N) sum_i g_i g_i^T from one plain autograd backward pass per sample."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        g = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    G = torch.stack(rows)
    return G.T @ G / len(y)


def analysis_args(*flags, **values):
    """The analyses' options (as the script adds them from the registry) and the shared ones
    they use, parsed from ``flags``, with exact-test defaults (--max-iter 200, --tol 1e-10);
    ``values`` then overrides attributes."""
    from analyses import REGISTRY
    from pyhessian_dist.groups import GROUPINGS

    p = argparse.ArgumentParser()
    for a in REGISTRY:
        a.add_arguments(p)
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--tol", type=float, default=1e-10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--group-by", choices=GROUPINGS, default="module")
    args = p.parse_args(list(flags))
    for name, value in values.items():
        setattr(args, name, value)
    return args
