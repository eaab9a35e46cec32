"""ResNet-18 for ImageNet-sized inputs (the paper's ImageNet-subset experiments): the standard
stem, a 7×7 stride-2 convolution and a 3×3 stride-2 max-pool, then the same four stages of
``BasicBlock`` as the CIFAR network and a 512-d pooled feature (He et al. 2016).

Key names follow the CIFAR network (``conv1``, ``bn1``, ``layer1..4``, ``shortcut``), so the
heads and checkpoints work the same way.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .resnet_cifar import ResNetCIFAR


class ResNetImageNet(ResNetCIFAR):
    def __init__(self, num_blocks=(2, 2, 2, 2), width: int = 64):
        super().__init__(num_blocks, width)
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x):
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def resnet18_imagenet(num_classes: int | None = None, width: int = 64) -> ResNetImageNet:
    """``num_classes`` is accepted and ignored, as for the CIFAR network: the head lives in
    ``LinearModel``."""
    return ResNetImageNet((2, 2, 2, 2), width=width)
