"""The batched Gaussian blur: PIL's extended box blur (BoxBlur.c), three passes per axis, each
a fixed-point matrix product (``resample.FixedPointPass``) rounded to uint8 as in C.

The PIL path's blur is ``data.transforms.GaussianBlur``; both take their parameters from the
``gaussian_blur`` entry of ``data.augment_schema``.
"""

from __future__ import annotations

import torch

from .base import Op, rand, uniform, where_samples
from .resample import FixedPointPass

_BLUR_BITS = 24  # BoxBlur.c fixed point


def _box_blur_radius(sigma: torch.Tensor) -> torch.Tensor:
    """BoxBlur.c _gaussian_blur_radius(sigma, passes=3) with its float/double steps."""
    s = sigma.float()
    sigma2 = s * s / 3.0
    big_l = torch.sqrt(12.0 * sigma2.double() + 1.0).float()
    small_l = ((big_l.double() - 1.0) / 2.0).floor().float()
    a = (2 * small_l + 1) * (small_l * (small_l + 1) - 3 * sigma2)
    a = a / (6 * (sigma2 - (small_l + 1) * (small_l + 1)))
    return small_l + a


def _box_blur_matrix(radius: torch.Tensor, n: int) -> torch.Tensor:
    """One ImagingHorizontalBoxBlur pass over a line of ``n`` pixels, per sample, as a float64
    [B, n, n] matrix of its integer weights: ``ww`` for the 2r+1 pixels of the box, ``fw`` for
    the two beyond it, indices clamped to the edge."""
    device = radius.device
    r = radius.trunc()
    ww = (torch.tensor(float(1 << _BLUR_BITS), device=device) / (radius * 2 + 1)).trunc()
    r, ww = r.double(), ww.double()
    fw = (((1 << _BLUR_BITS) - (2 * r + 1) * ww) / 2).floor()
    r, ww, fw = r.view(-1, 1, 1), ww.view(-1, 1, 1), fw.view(-1, 1, 1)
    x = torch.arange(n, device=device, dtype=torch.float64).view(1, -1, 1)
    j = torch.arange(n, device=device, dtype=torch.float64).view(1, 1, -1)
    # Pixel j stands for every k with clamp(k) == j: (-inf, 0] for j=0, [n-1, inf) for j=n-1.
    big = float(1 << 40)
    lo = torch.where(j == 0, -big, j)
    hi = torch.where(j == n - 1, big, j)
    count = (torch.minimum(hi, x + r) - torch.maximum(lo, x - r) + 1).clamp(min=0)
    edges = (((x - r - 1).clamp(0, n - 1) == j).double()
             + ((x + r + 1).clamp(0, n - 1) == j).double())
    return ww * count + fw * edges


def _box_blur(x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """ImagingBoxBlur(x, radius, radius, n=3) with a per-sample radius [B]."""
    _, _, H, W = x.shape
    horizontal = FixedPointPass(_box_blur_matrix(radius, W), _BLUR_BITS, axis=-1)
    vertical = FixedPointPass(_box_blur_matrix(radius, H), _BLUR_BITS, axis=-3)
    y = x.permute(0, 2, 1, 3)  # [B, H, C, W]
    for _ in range(3):
        y = horizontal(y)
    for _ in range(3):
        y = vertical(y)
    return y.permute(0, 2, 1, 3).contiguous()


class GaussianBlur(Op):
    """RandomApply([GaussianBlur(sigma)], p): sigma ~ U(sigma) per sample, then PIL's
    ImageFilter.GaussianBlur(radius=sigma) — not a sampled Gaussian but PIL's three extended
    box blurs per axis, horizontal first, each pass rounded to uint8 (BoxBlur.c).
    Parameters: ``apply`` [B] bool, ``sigma`` [B] float64."""

    name = "gaussian_blur"

    def setup(self, spec, where):
        # The parameters of data.augment_schema's gaussian_blur, as the PIL path's blur.
        self.p, self.sigma = spec["p"], spec["sigma"]

    def sample(self, n, generator, device, size=None):
        return {"apply": ~(self.p < rand(n, generator, device)),
                "sigma": uniform(n, *self.sigma, generator, device, torch.float64)}

    def apply(self, x, params):
        return where_samples(params["apply"],
                              lambda y, i: _box_blur(y, _box_blur_radius(params["sigma"][i])), x)
