"""SimCLR's NT-Xent loss (docs/original.md §4.1)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SimCLRLoss(nn.Module):
    """NT-Xent over a batch of view pairs.

    features: [b, 2, dim], L2-normalised (SelfModel's output reshaped so that ``features[i, 0]``
    and ``features[i, 1]`` are the two views of image i). Returns a scalar, or [b] (or [2b] when
    symmetric) with ``reduction='none'``, given to the constructor or to the call.

    By default only view-1 embeddings are anchors, as the original (docs/differences.md #10): anchor i
    is compared with all 2b embeddings except itself, and its positive is its view 2. With
    ``symmetric=True`` both views are anchors (standard SimCLR), averaged over 2b terms.
    """

    def __init__(self, temperature: float = 0.5, symmetric: bool = False,
                 reduction: str = "mean"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.symmetric = bool(symmetric)
        self.reduction = reduction

    def forward(self, features: torch.Tensor, reduction: str | None = None) -> torch.Tensor:
        if features.dim() != 3 or features.shape[1] != 2:
            raise ValueError(f"expected features of shape [b, 2, dim], got {tuple(features.shape)}")
        b = features.shape[0]
        z = features.float()
        candidates = torch.cat([z[:, 0], z[:, 1]], dim=0)  # [2b, dim]: view 1s, then view 2s
        anchors = candidates if self.symmetric else candidates[:b]
        n = anchors.shape[0]
        logits = anchors @ candidates.T / self.temperature  # [n, 2b]
        rows = torch.arange(n, device=z.device)
        logits = logits.masked_fill(
            F.one_hot(rows, 2 * b).bool(), float("-inf"))  # drop self-similarity
        positives = (rows + b) % (2 * b)
        losses = F.cross_entropy(logits, positives, reduction="none")
        if (reduction or self.reduction) == "none":
            return losses
        return losses.mean()
