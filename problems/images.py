"""The built-in problem: an image classifier with cross-entropy.

Data: CIFAR-10/100, an ImageFolder tree or the generated synthetic set (``support.datasets``);
the ``"train"`` split is un-augmented (the Hessian samples), ``train_dataset()`` the augmented
view training steps use. Model: the original's CIFAR ResNet (``arch = {"name": "resnet",
"depth", "batch_norm", "residual", "num_classes"}``) or ``--model module:callable``
(``{"name": "custom", "spec", "num_classes"}``). ``num_classes`` None means "as many as the
data set has". Forward, loss and accuracy are the contract's defaults (``model(x)``,
cross-entropy, argmax accuracy).
"""
from __future__ import annotations

from models.resnet import resnet
from support.checkpoints import arch_of
from support.datasets import cached_datasets, default_normalization
from support.errors import DataError
from support.models import model_from_spec

from .base import Problem, ProblemError

__all__ = ["ImageProblem", "describe_arch", "image_record"]


def describe_arch(arch: dict) -> str:
    """One phrase for a model's ``arch`` record."""
    if arch.get("name") == "custom":
        return f"{arch['spec']} ({arch['num_classes']} classes)"
    return (f"ResNet{arch['depth']} (batch_norm={arch['batch_norm']}, "
            f"residual={arch['residual']})")


def image_record(model_or_arch, dataset, normalization=None, image_size=32) -> dict:
    """The problem record of an image classifier (what ``save_checkpoint`` stores), without
    loading the data: our ResNet (its ``arch`` read off the model) or an ``arch`` dict (e.g.
    ``custom_arch(spec, num_classes)``); ``normalization`` None means the data set's own."""
    arch = model_or_arch if isinstance(model_or_arch, dict) else arch_of(model_or_arch)
    return {"kind": "images", "dataset": dataset, "arch": dict(arch),
            "normalization": normalization or default_normalization(dataset),
            "image_size": image_size}


class ImageProblem(Problem):
    """An image classifier on one of the built-in data sets (see the module docstring)."""

    def __init__(self, dataset: str, arch: dict, *, data_dir: str = "data",
                 normalization: dict | None = None, image_size: int = 32,
                 download: bool = False):
        self.name, self.data_dir = dataset, data_dir
        self.arch = dict(arch)
        self.normalization, self.image_size = normalization, image_size
        self.download = download  # only the launching process downloads (once)

    def __getstate__(self):
        return {**self.__dict__, "download": False}

    hessian_split = "train split, un-augmented"

    @property
    def data_name(self):
        return self.name

    @property
    def label(self):
        return f"{self.describe()} on {self.name}"

    def bundle(self):
        """The data set's views (loaded once per process; see support.datasets)."""
        return cached_datasets(self.name, self.data_dir, self.normalization, self.download,
                               self.image_size)

    @property
    def num_classes(self) -> int:
        return self.arch.get("num_classes") or self.bundle().num_classes

    def model(self):
        if self.arch["name"] == "custom":
            return model_from_spec(self.arch["spec"], self.num_classes)
        try:
            return resnet(depth=self.arch["depth"], num_classes=self.num_classes,
                          batch_norm=self.arch["batch_norm"], residual=self.arch["residual"])
        except (ValueError, TypeError) as exc:
            raise ProblemError(f"cannot build the ResNet {self.arch}: {exc}") from None

    def dataset(self, split):
        bundle = self.bundle()
        if self.arch.get("num_classes") not in (None, bundle.num_classes):
            raise DataError(f"the model has {self.arch['num_classes']} classes but data set "
                            f"{bundle.name} has {bundle.num_classes}; pass the matching "
                            "--dataset")
        return {"train": bundle.train_eval, "test": bundle.test}[split]

    def train_dataset(self):
        return self.bundle().train

    def record(self):
        bundle = self.bundle()
        return image_record(self.resolved_arch(), bundle.name, bundle.normalization,
                            bundle.image_size)

    def resolved_arch(self) -> dict:
        """``arch`` with ``num_classes`` filled in from the data set."""
        return {**self.arch, "num_classes": self.num_classes}

    def describe(self):
        return describe_arch(self.resolved_arch())
