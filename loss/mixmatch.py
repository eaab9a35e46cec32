"""MixMatch's loss and its λ_u ramp (docs/original.md §4.3)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear_rampup(t: float, length: float) -> float:
    """clip(t / length, 0, 1); 1 when length is 0."""
    if length == 0:
        return 1.0
    return float(min(max(t / length, 0.0), 1.0))


class MixMatchLoss(nn.Module):
    """Lx + λ_u(t)·Lu.

    Lx: soft-target cross entropy, −mean_i Σ_k log_softmax(x_logits)_ik · x_targets_ik over the
    labelled (mixed) samples; Lu: mean squared error between softmax(u_logits) and u_targets over
    **all elements** (so divided by the number of classes too, as the original).
    Shapes: x_logits/x_targets [B, C], u_logits/u_targets [2B, C]; ``t`` is the epoch position
    (docs/differences.md #5: global epoch index counted from the first warm-up epoch + batch fraction).
    Returns (loss, Lx, Lu, λ_u).
    """

    def __init__(self, lambda_u: float = 15.0, rampup_length: float = 190.0):
        super().__init__()
        self.lambda_u = float(lambda_u)
        self.rampup_length = float(rampup_length)

    def weight(self, t: float) -> float:
        return self.lambda_u * linear_rampup(t, self.rampup_length)

    def forward(self, x_logits, x_targets, u_logits, u_targets, t: float):
        lx = -(F.log_softmax(x_logits.float(), dim=1) * x_targets).sum(dim=1).mean()
        lu = ((torch.softmax(u_logits.float(), dim=1) - u_targets) ** 2).mean()
        lam = self.weight(t)
        return lx + lam * lu, lx, lu, lam
