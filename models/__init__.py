"""Models used by the scripts: the CIFAR ResNet of the original PyHessian."""
from .resnet import ResNet, BasicBlock, blocks_per_stage, resnet

__all__ = ["ResNet", "BasicBlock", "blocks_per_stage", "resnet"]
