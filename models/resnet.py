"""ResNet for CIFAR (depth 6n+2), as in the original PyHessian / PyHessianDist.

Architecture (He et al. 2016, CIFAR variant):

    conv1 3->16 (3x3) -> bn1 -> relu
    layer1: n BasicBlocks, 16 channels, stride 1
    layer2: n BasicBlocks, 32 channels, first block stride 2
    layer3: n BasicBlocks, 64 channels, first block stride 2
    avgpool 8 -> fc 64->num_classes

with n = (depth - 2) / 6.  Two switches reproduce the original's ablations:

* ``batch_norm=False`` removes every BatchNorm layer (no ``bn*`` modules at all,
  and the projection shortcut is a lone 1x1 conv).
* ``residual=False`` removes the skip connections: no addition and no
  projection shortcut (``downsample``) modules.

Convolutions never have a bias.  Module names match the original checkpoints
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0`` ...,
``fc``), so ``model.load_state_dict`` accepts the original's state_dicts once
the ``module.`` prefix of ``nn.DataParallel`` is stripped.

Parameter counts for depth 20: 272,474 (BN + residual), 270,906 (no BN),
269,722 (no residual), 268,346 (neither).

The original's keywords are accepted as well: ``resnet(num_classes=10, depth=20,
residual_not=True, batch_norm_not=True)`` (True means the feature is present; see
``original_switches``).
"""
import torch.nn as nn

__all__ = ["ResNet", "BasicBlock", "blocks_per_stage", "original_switches", "resnet"]


def conv3x3(in_planes, out_planes, stride=1):
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    """1x1 convolution (projection shortcut) with no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def blocks_per_stage(depth):
    """Return n = (depth - 2) / 6 or raise ValueError when depth is not 6n+2 with n >= 1."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"ResNet depth must be 6n+2 with n >= 1 (e.g. 20, 32, 44, 56, 110), got {depth!r}"
        )
    return (depth - 2) // 6


class BasicBlock(nn.Module):
    """conv1-bn1-relu-conv2-bn2 (+ shortcut) - relu.

    ``downsample`` exists only when ``residual`` is on and the shape changes; it is
    ``Sequential(conv1x1, BatchNorm2d)`` with batch norm, ``Sequential(conv1x1)`` without.
    """

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, batch_norm=True, residual=True):
        super().__init__()
        self.batch_norm = batch_norm
        self.residual = residual
        self.conv1 = conv3x3(inplanes, planes, stride)
        if batch_norm:
            self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        if batch_norm:
            self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if residual and (stride != 1 or inplanes != planes):
            layers = [conv1x1(inplanes, planes, stride)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(planes))
            self.downsample = nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        if self.batch_norm:
            out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        if self.batch_norm:
            out = self.bn2(out)
        if self.residual:
            identity = x if self.downsample is None else self.downsample(x)
            out = out + identity
        return self.relu(out)


class ResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2; see the module docstring."""

    def __init__(self, depth=20, num_classes=10, batch_norm=None, residual=None, *,
                 batch_norm_not=None, residual_not=None, base_channel=16):
        super().__init__()
        batch_norm, residual = original_switches(batch_norm, residual, batch_norm_not,
                                                 residual_not, base_channel)
        n = blocks_per_stage(depth)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.depth = depth
        self.num_classes = num_classes
        self.batch_norm = bool(batch_norm)
        self.residual = bool(residual)

        self.inplanes = 16
        self.conv1 = conv3x3(3, 16)
        if self.batch_norm:
            self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64 * BasicBlock.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # The original: normal(0, sqrt(2 / (k*k*out_channels))) == Kaiming fan_out.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes, blocks, stride):
        layers = []
        for i in range(blocks):
            layers.append(
                BasicBlock(
                    self.inplanes,
                    planes,
                    stride if i == 0 else 1,
                    batch_norm=self.batch_norm,
                    residual=self.residual,
                )
            )
            self.inplanes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        if self.batch_norm:
            x = self.bn1(x)
        x = self.relu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = x.flatten(1)
        return self.fc(x)

    def extra_repr(self):
        return (
            f"depth={self.depth}, num_classes={self.num_classes}, "
            f"batch_norm={self.batch_norm}, residual={self.residual}"
        )


def original_switches(batch_norm=None, residual=None, batch_norm_not=None, residual_not=None,
                      base_channel=16):
    """``(batch_norm, residual)`` from our keywords and/or the original PyHessian's.

    The original ``models/resnet.py`` (amirgholami/PyHessian) names its switches
    ``batch_norm_not`` and ``residual_not``, but ``True`` means the feature is PRESENT:
    ``if self.batch_norm_not: self.bn1 = nn.BatchNorm2d(...)`` and ``if self.residual_not:
    out += residual`` (both default to True, and its training.py passes ``--batch-norm`` /
    ``--residual`` straight into them). So ``batch_norm_not`` is our ``batch_norm`` and
    ``residual_not`` is our ``residual``, despite the names. Either spelling may be given;
    both for the same switch must agree (TypeError otherwise). Not given: True.
    ``base_channel`` (the original's stem width) is accepted at its only value, 16.
    """
    pairs = (("batch_norm", batch_norm, "batch_norm_not", batch_norm_not),
             ("residual", residual, "residual_not", residual_not))
    out = []
    for ours, value, theirs, their_value in pairs:
        if value is not None and their_value is not None and bool(value) != bool(their_value):
            raise TypeError(f"{ours}={value!r} and {theirs}={their_value!r} contradict each "
                            f"other ({theirs}=True means the feature is present, as "
                            f"{ours}=True does); pass one of them")
        chosen = value if value is not None else their_value
        out.append(True if chosen is None else bool(chosen))
    if base_channel != 16:
        raise ValueError(f"base_channel={base_channel!r} is not supported: this ResNet has the "
                         "original's 16/32/64 channels (base_channel=16)")
    return tuple(out)


def resnet(depth=20, num_classes=10, batch_norm=None, residual=None, **original):
    """Build a CIFAR ResNet of depth 6n+2 (20, 32, 44, 56, 110, ...).

    ``batch_norm`` / ``residual`` (default True) switch BatchNorm and the skip connections.
    PyHessian's own call ``resnet(num_classes=10, depth=20, residual_not=True,
    batch_norm_not=True)`` works too: ``batch_norm_not`` / ``residual_not`` are the original's
    names for the same switches, and True means the feature is PRESENT (see
    ``original_switches``). Raises ValueError when ``depth`` is not of the form 6n+2, and
    TypeError for an unknown keyword or contradicting switches.
    """
    unknown = sorted(set(original) - {"batch_norm_not", "residual_not", "base_channel"})
    if unknown:
        raise TypeError(f"resnet() got an unexpected keyword argument {unknown[0]!r}")
    return ResNet(depth=depth, num_classes=num_classes, batch_norm=batch_norm,
                  residual=residual, **original)
