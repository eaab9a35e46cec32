"""The ops that leave 0..255: ``to_tensor`` and ``normalize``, with torchvision's float32
operations."""

from __future__ import annotations

import torch

from .base import Op


class ToTensor(Op):
    """T.ToTensor: x / 255 in float32."""

    name = "to_tensor"
    image_op = False

    def apply(self, x, params):
        return x / 255


class Normalize(Op):
    """T.Normalize: (x - mean) / std in float32, the same operations as torchvision."""

    name = "normalize"
    image_op = False

    def setup(self, spec, where):
        self.mean, self.std = spec["mean"], spec["std"]

    def apply(self, x, params):
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std
