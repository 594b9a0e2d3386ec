"""A problem file: a small MLP regressing a smooth function of 4 inputs, with a squared loss.

    python training.py --problem examples/regression.py --epochs 30 --no-cuda
    python example_pyhessian_analysis.py --resume checkpoints/regression/net.pkl \
        --eigenvalue --trace --density --no-cuda

A problem is these functions; copy the file and change them. Everything is float64 (the
Hessian of a float64 model stays float64 end to end).
"""
import torch
from torch import nn

INPUTS, HIDDEN = 4, 32
TRAIN, TEST = 1024, 256


def model():
    """The network: called once per process, with torch's RNG seeded from --seed."""
    return nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN),
                         nn.Tanh(), nn.Linear(HIDDEN, 1)).double()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, INPUTS, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, -0.5, 0.25, 0.8], dtype=torch.float64)
    y = torch.sin(2 * x @ w) + 0.3 * (x[:, 0] * x[:, 1]) + 0.05 * torch.randn(
        n, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, y)


def dataset(split):
    """A map-style data set of (x, y) samples; the Hessian uses the "train" split."""
    return _data(TRAIN, 0) if split == "train" else _data(TEST, 1)


# forward(model, batch) is not defined: the default is model(batch[0]).


def loss(outputs, batch):
    """The MEAN squared error over the batch (a mean, so that mini-batches add up exactly)."""
    return ((outputs.squeeze(-1) - batch[1]) ** 2).mean()


def recipe():
    """training.py defaults for this problem (flags given on the command line win)."""
    return {"lr": 0.05, "weight_decay": 0.0, "batch_size": 64, "epochs": 30,
            "lr_decay_epoch": [20, 25]}
