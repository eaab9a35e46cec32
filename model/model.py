"""Heads on the backbone (docs/original.md §3.2), with the original's state-dict key names."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class LinearModel(nn.Module):
    """backbone → Linear(feature_dim, num_classes); keys ``backbone.*``, ``linear.*``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.linear = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        return self.linear(self.backbone(x))


class SelfModel(nn.Module):
    """backbone → Linear → BN → ReLU → Linear(proj_dim), L2-normalised; keys ``proj_head.0/1/3``."""

    def __init__(self, backbone: nn.Module, feature_dim: int = 512, proj_dim: int = 128):
        super().__init__()
        self.backbone = backbone
        self.proj_head = nn.Sequential(
            nn.Linear(feature_dim, feature_dim),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
            nn.Linear(feature_dim, proj_dim),
        )

    def forward(self, x):
        return F.normalize(self.proj_head(self.backbone(x)), dim=1)
