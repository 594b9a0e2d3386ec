"""Device choice for the scripts (temporary home: the launch module will take this over)."""
import sys

import torch

__all__ = ["resolve_device"]


def resolve_device(cuda, local_rank=0, warn=True):
    """``cuda:<local_rank>`` when ``cuda`` is asked for and available, else the CPU.

    When a GPU was asked for but none is there, prints one warning line to stderr
    (unless ``warn`` is false, e.g. on ranks other than 0).
    """
    if cuda and torch.cuda.is_available():
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if cuda and warn:
        print("warning: --cuda requested but no GPU is available; running on CPU", file=sys.stderr)
    return torch.device("cpu")
