"""A problem file: a classifier whose samples are dicts and whose loss is written by hand.

    python training.py --problem examples/dict_classifier.py --epochs 10 --no-cuda
    python example_pyhessian_analysis.py --resume checkpoints/dict/net.pkl --eigenvalue --trace

Batches are what torch's default collate makes of the samples: here dicts of tensors
{"features": (n, 8), "label": (n,)}, so forward() says how the model reads them. The loss is a
label-smoothed cross-entropy, written out; accuracy() lets training and the loss landscape
report accuracy.
"""
import torch
import torch.nn.functional as F
from torch import nn

FEATURES, CLASSES, SMOOTHING = 8, 3, 0.1


class Blobs(torch.utils.data.Dataset):
    """Three overlapping Gaussian blobs in 8 dimensions, drawn from a fixed seed."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        centres = 1.5 * torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(7))
        self.label = torch.randint(0, CLASSES, (n,), generator=g)
        self.features = centres[self.label] + torch.randn(n, FEATURES, generator=g)

    def __len__(self):
        return len(self.label)

    def __getitem__(self, i):
        return {"features": self.features[i], "label": self.label[i]}


def model():
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.GELU(), nn.Linear(16, CLASSES))


def dataset(split):
    return Blobs(900, 0) if split == "train" else Blobs(300, 1)


def forward(model, batch):
    return model(batch["features"])


def loss(outputs, batch):
    """Label-smoothed cross-entropy, averaged over the batch."""
    logp = F.log_softmax(outputs, dim=-1)
    target = F.one_hot(batch["label"], CLASSES).to(logp.dtype)
    target = (1 - SMOOTHING) * target + SMOOTHING / CLASSES
    return -(target * logp).sum(dim=-1).mean()


def accuracy(outputs, batch):
    """Fraction of the batch whose largest output is the label."""
    return (outputs.argmax(dim=-1) == batch["label"]).double().mean().item()


def recipe():
    return {"lr": 0.1, "weight_decay": 0.0, "batch_size": 64, "epochs": 10,
            "lr_decay_epoch": [8]}
