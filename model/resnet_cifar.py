"""ResNet-18 for 32×32 inputs (docs/original.md §3.1): 3×3 stem, no max-pool, 512-d pooled feature.

``width`` scales every stage (64 is the original); CPU-sized configs use a narrower network
with the same code and the same state-dict key names.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    def __init__(self, num_blocks=(2, 2, 2, 2), width: int = 64):
        super().__init__()
        if not isinstance(width, int) or width <= 0:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._stage(width, num_blocks[0], 1)
        self.layer2 = self._stage(2 * width, num_blocks[1], 2)
        self.layer3 = self._stage(4 * width, num_blocks[2], 2)
        self.layer4 = self._stage(8 * width, num_blocks[3], 2)
        self.feature_dim = 8 * width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def resnet18_cifar(num_classes: int | None = None, width: int = 64) -> ResNetCIFAR:
    """``num_classes`` is accepted and ignored, as in the original: the head lives elsewhere."""
    return ResNetCIFAR((2, 2, 2, 2), width=width)
