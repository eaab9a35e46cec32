"""Cross entropy, as torch's, with the reduction choosable per call like the other losses."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``criterion(logits, targets, reduction="none")`` gives the per-sample values for that
    call only; without ``reduction`` the constructor's applies, as in torch."""

    def forward(self, logits, targets, reduction: str | None = None):
        return F.cross_entropy(logits, targets, weight=self.weight,
                               ignore_index=self.ignore_index,
                               reduction=reduction or self.reduction,
                               label_smoothing=self.label_smoothing)
