"""Symmetric cross entropy (docs/original.md §4.2): α·CE + β·RCE."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return x
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    raise ValueError(f"unknown reduction '{reduction}'")


class RCELoss(nn.Module):
    """Reverse cross entropy: −Σ_k clamp(p_k, 1e-7, 1)·log clamp(onehot_k, 1e-4, 1).

    logits: [B, C], targets: [B] class indices → [B] with ``reduction='none'``, else a scalar.
    ``reduction`` given to the call overrides the one given to the constructor for that call.
    """

    def __init__(self, num_classes: int = 10, reduction: str = "mean"):
        super().__init__()
        self.num_classes = num_classes
        self.reduction = reduction

    def forward(self, logits, targets, reduction: str | None = None):
        p = F.softmax(logits.float(), dim=1).clamp(min=1e-7, max=1.0)
        onehot = F.one_hot(targets, self.num_classes).float().clamp(min=1e-4, max=1.0)
        return _reduce(-(p * torch.log(onehot)).sum(dim=1), reduction or self.reduction)


class SCELoss(nn.Module):
    """α·CE + β·RCE with α = 0.1, β = 1 in the original; same shapes and ``reduction`` as
    :class:`RCELoss`."""

    def __init__(self, alpha: float = 0.1, beta: float = 1.0, num_classes: int = 10,
                 reduction: str = "mean"):
        super().__init__()
        self.alpha, self.beta = float(alpha), float(beta)
        self.rce = RCELoss(num_classes, reduction="none")
        self.reduction = reduction

    def forward(self, logits, targets, reduction: str | None = None):
        ce = F.cross_entropy(logits.float(), targets, reduction="none")
        return _reduce(self.alpha * ce + self.beta * self.rce(logits, targets),
                       reduction or self.reduction)

