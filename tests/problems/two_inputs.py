"""A problem file the examples do not show: nested dict samples, a model with two inputs and a
frozen embedding, an unused parameter, and a vector-valued squared loss written by hand."""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.embed.weight.requires_grad_(False)   # frozen: not part of the Hessian
        self.mix = nn.Linear(3 + 4, 8)
        self.head = nn.Linear(8, 2)
        self.unused = nn.Parameter(torch.zeros(3))  # never called: zero rows and columns

    def forward(self, tokens, features):
        h = torch.cat([self.embed(tokens), features], dim=-1)
        return self.head(torch.sin(self.mix(h)))


def model():
    return Net().double()


def dataset(split):
    n = 60 if split == "train" else 20
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    tokens = torch.randint(0, 5, (n,), generator=g)
    features = torch.randn(n, 4, generator=g, dtype=torch.float64)
    target = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return [{"inputs": {"tokens": tokens[i], "features": features[i]}, "target": target[i]}
            for i in range(n)]


def forward(model, batch):
    return model(batch["inputs"]["tokens"], batch["inputs"]["features"])


def loss(outputs, batch):
    return ((outputs - batch["target"]) ** 2).sum(dim=1).mean()
