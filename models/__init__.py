"""Models used by the scripts: the CIFAR ResNet of the original PyHessian."""
from .resnet import BasicBlock, ResNet, blocks_per_stage, original_switches, resnet

__all__ = ["BasicBlock", "ResNet", "blocks_per_stage", "original_switches", "resnet"]
