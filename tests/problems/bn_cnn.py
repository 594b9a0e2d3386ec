"""A problem file the examples do not show: a float64 CNN with BatchNorm (analysed in eval mode,
with non-trivial running statistics), 3-tuples (x, y, sample id) whose extra field the default
loss ignores, and no forward/loss of its own (the contract's defaults)."""
import torch
from torch import nn


def model():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4)).double()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


class Samples(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def dataset(split):
    return Samples(80, 0) if split == "train" else Samples(20, 1)
