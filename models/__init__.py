"""Models used by the scripts: the CIFAR ResNet of the original PyHessian and a small GPT."""
from .gpt import GPT, GPT_DEFAULTS, gpt, gpt_num_parameters
from .resnet import BasicBlock, ResNet, blocks_per_stage, original_switches, resnet

__all__ = ["GPT", "GPT_DEFAULTS", "BasicBlock", "ResNet", "blocks_per_stage", "gpt",
           "gpt_num_parameters", "original_switches", "resnet"]
