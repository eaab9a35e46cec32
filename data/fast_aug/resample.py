"""PIL's resampling (Resample.c) as batched fixed-point matrix products.

``resized_crop`` is PIL's ``crop(box).resize(size)`` with a per-sample box: the weights of each
axis are Resample.c's (``_resample_weights``), and each pass is rounded to uint8 as in C.
``FixedPointPass`` is one such pass, shared with the box blur (``blur.py``): integer weights
multiplied in float64, or split in exact float32 halves on the CPU, so every sum is exact and
the result does not depend on summation order or device.
"""

from __future__ import annotations

import math
import struct

import PIL
import torch

from .base import where_samples

_RESAMPLE_BITS = 22  # Resample.c PRECISION_BITS: 32 - 8 - 2
# Resample.c writes the Hamming window constants as C floats (0.54f, 0.46f).
_F32_054 = struct.unpack("f", struct.pack("f", 0.54))[0]
_F32_046 = struct.unpack("f", struct.pack("f", 0.46))[0]
# Since Pillow 13 (python-pillow/Pillow#9549) the vertical resampling pass may come first.
_PIL_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


# --------------------------------------------------------------------------- filters

def _bicubic(x):
    x = x.abs()
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _bilinear(x):
    x = x.abs()
    return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))


def _box(x):
    return ((x > -0.5) & (x <= 0.5)).double()


def _hamming(x):
    x = x.abs()
    px = x * math.pi
    safe = torch.where(x == 0, torch.ones_like(px), px)
    w = torch.sin(safe) / safe * (_F32_054 + _F32_046 * torch.cos(safe))
    return torch.where(x == 0, torch.ones_like(x), torch.where(x >= 1.0, torch.zeros_like(x), w))


def _sinc(x):
    px = x * math.pi
    safe = torch.where(x == 0, torch.ones_like(px), px)
    return torch.where(x == 0, torch.ones_like(x), torch.sin(safe) / safe)


def _lanczos(x):
    w = _sinc(x) * _sinc(x / 3)
    return torch.where((x >= -3.0) & (x < 3.0), w, torch.zeros_like(x))


# name -> (kernel, support), Resample.c
FILTERS = {
    "box": (_box, 0.5), "bilinear": (_bilinear, 1.0), "hamming": (_hamming, 1.0),
    "bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0),
}


# --------------------------------------------------------------------------- weights

def _resample_weights(length, offset, full, out, filt, device) -> torch.Tensor:
    """Fixed-point weights of PIL's crop(box).resize() along one axis: float64 [B, out, full].

    Sample b reads ``length[b]`` pixels starting at ``offset[b]`` of a line of ``full`` pixels;
    the weights are Resample.c precompute_coeffs (window clipped to the crop, normalised to sum
    1) followed by normalize_coeffs_8bpc (round to 22 fractional bits), zero outside the crop.
    As in C they are computed over each output's window only (``taps`` pixels from xmin) and
    summed left to right, then scattered into the dense matrix.
    """
    kernel, support = FILTERS[filt]
    n = length.double().view(-1, 1, 1)
    scale = n / out
    filterscale = scale.clamp(min=1.0)
    # The widest window: xmax - xmin <= trunc(c + s + 0.5) - trunc(c - s + 0.5) <= 2s + 1.
    taps = min(full, int(math.floor(2 * support * max(1.0, full / out))) + 2)
    support = support * filterscale
    ss = 1.0 / filterscale  # Resample.c multiplies by the reciprocal
    center = (torch.arange(out, device=device, dtype=torch.float64).view(1, -1, 1) + 0.5) * scale
    xmin = (center - support + 0.5).trunc().clamp(min=0)
    xmax = torch.minimum((center + support + 0.5).trunc(), n)
    j = xmin + torch.arange(taps, device=device, dtype=torch.float64)  # index inside the crop
    k = torch.where(j < xmax, kernel((j - center + 0.5) * ss), torch.zeros_like(j))
    total = k[..., 0]
    for t in range(1, taps):  # C's order: ww += k[x], left to right
        total = total + k[..., t]
    total = total.unsqueeze(-1)
    k = torch.where(total != 0, k / torch.where(total != 0, total, 1.0), k)
    k = k * (1 << _RESAMPLE_BITS)
    k = torch.where(k < 0, (k - 0.5).trunc(), (k + 0.5).trunc())
    # Taps past xmax hold 0; their clamped column may repeat a real one, and adding 0 is exact.
    col = (j + offset.double().view(-1, 1, 1)).clamp(max=full - 1).long()
    dense = torch.zeros(k.shape[0], out, full, dtype=torch.float64, device=device)
    return dense.scatter_add_(2, col, k)


def _fixed_point_round(acc: torch.Tensor, bits: int) -> torch.Tensor:
    # (acc + 2**(bits-1)) >> bits, then clip to uint8; exact on float64 integers below 2**53
    # (scaling by a power of two is exact).
    return ((acc + float(1 << (bits - 1))) * 2.0 ** -bits).floor().clamp(0, 255)


# --------------------------------------------------------------------------- fixed-point passes
#
# A resampling or box-blur pass is out = clip8((sum_j x_j * w_j + 2**(bits-1)) >> bits) over
# uint8 pixels x and integer weights w (|w| <= 2**bits), for every line of the image: one
# batched matrix product per pass. The products need up to 8 + 24 bits, too many for float32,
# so float64 is the safe choice (every sum exact below 2**53, in any order). On the CPU the
# float32 product is ~3x faster, and exact in this form: split w = hi * 2**k + lo with
# 0 <= lo < 2**k, and multiply by [hi | lo] in one float32 matmul. A = sum x * hi and
# L = sum x * lo are exact whenever 255 * sum|hi| and 255 * sum lo stay <= 2**24 (then every
# partial sum, in whatever order or with FMA, is an integer of magnitude <= 2**24). With
# Lq = floor(L / 2**k) and 0 <= L - Lq * 2**k < 2**k,
#     sum x * w + 2**(bits-1) = (A + Lq + 2**(bits-1-k)) * 2**k + (L - Lq * 2**k),
# and as floor(floor(n / a) / b) == floor(n / (a b)),
#     (sum x * w + 2**(bits-1)) >> bits == floor((A + Lq + 2**(bits-1-k)) / 2**(bits-k)),
# all float32 operations on integers below 2**24. k = bits - 14 keeps sum|hi| near 2**14 (the
# weights of a line sum to ~2**bits) and allows ~2**24 / (255 * 2**k) taps: ~250 for
# resampling (k = 8; bicubic downscaling by up to ~60x), ~60 for blurring (k = 10; radius
# up to ~30). The bounds are checked on the actual weights; past them, and on accelerators
# (where a float32 matmul may run in TF32), the pass uses float64.

def _float32_matmul_is_exact(device) -> bool:
    """Whether float32 matmuls on ``device`` are IEEE float32 (no TF32 / bf16 shortcuts)."""
    if torch.device(device).type != "cpu" or torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return getattr(mkldnn, "fp32_precision", "none") in ("none", "ieee")


class FixedPointPass:
    """One fixed-point pass with integer weights ``w`` (float64 [B, out, n]: output i reads
    sum_j w[b, i, j] * x[j]) along the W axis (``axis=-1``) or the H axis (``axis=-3``) of an
    image in [B, H, C, W] layout, where either pass is a single batched matrix product."""

    def __init__(self, w: torch.Tensor, bits: int, axis: int):
        self.bits, self.axis, self.out = bits, axis, w.shape[1]
        self.k = None
        if _float32_matmul_is_exact(w.device) and w.numel():
            # |w| <= 2**bits = 2**24 at most: w, hi, lo are exact in float32. The bounds are
            # float32 sums of non-negative integers: exact while below 2**24, and far above
            # the limits (~2**16) otherwise, so the test cannot pass by rounding.
            k = bits - 14
            w32 = w.float()
            hi = (w32 * 2.0 ** -k).floor_()
            lo = w32.sub_(hi * 2.0 ** k)
            bound_hi = 255 * float(hi.abs().sum(-1).max())
            bound_lo = 255 * float(lo.sum(-1).max())
            if bound_hi + bound_lo / 2 ** k + 2 ** (bits - 1 - k) <= 2 ** 24 \
                    and bound_lo <= 2 ** 24:
                self.k, w = k, torch.cat([hi, lo], dim=1)  # [B, 2 * out, n]
        # The right-hand factor of the matmul: [B, n, out] along W, [B, out, n] along H.
        self.w = w.transpose(1, 2).contiguous() if axis == -1 else w.contiguous()

    def select(self, idx: torch.Tensor) -> FixedPointPass:
        sub = object.__new__(FixedPointPass)
        sub.__dict__.update(self.__dict__, w=self.w[idx])
        return sub

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        B, H, C, W = y.shape
        if self.k is None:
            y = y.double()
        if self.axis == -1:   # [B, H * C, W] @ [B, W, out]
            acc = torch.bmm(y.reshape(B, H * C, W), self.w).view(B, H, C, -1)
            parts = acc[..., :self.out], acc[..., self.out:]
        else:                 # [B, out, H] @ [B, H, C * W]
            acc = torch.bmm(self.w, y.reshape(B, H, C * W)).view(B, -1, C, W)
            parts = acc[:, :self.out], acc[:, self.out:]
        if self.k is None:
            return _fixed_point_round(acc, self.bits).float()
        k, bits = self.k, self.bits
        a, lo = parts
        m = (lo * 2.0 ** -k).floor_().add_(a).add_(float(2 ** (bits - 1 - k)))
        return m.mul_(2.0 ** -(bits - k)).floor_().clamp_(0, 255)


def resized_crop(x, top, left, height, width, out_hw, filt) -> torch.Tensor:
    """Per-sample crop (top, left, height, width) then PIL resize to ``out_hw``: two passes,
    each rounded to uint8 (ImagingResampleInner)."""
    B, _, H, W = x.shape
    oh, ow = out_hw
    horizontal = FixedPointPass(_resample_weights(width, left, W, ow, filt, x.device),
                                _RESAMPLE_BITS, axis=-1)
    vertical = FixedPointPass(_resample_weights(height, top, H, oh, filt, x.device),
                              _RESAMPLE_BITS, axis=-3)
    y = x.permute(0, 2, 1, 3)  # [B, H, C, W]
    out = vertical(horizontal(y))
    if _PIL_VERTICAL_FIRST and H > oh:
        # Pillow 13 runs the vertical pass first when the height shrinks by more than twice
        # as many pixels as the width does; the rounding between passes then differs.
        shrink_h, shrink_w = height - oh, width - ow
        v_first = (shrink_h > 0) & (shrink_h > 2 * shrink_w)
        out = where_samples(v_first, lambda z, i: horizontal.select(i)(vertical.select(i)(z)),
                            y, out)
    return out.permute(0, 2, 1, 3).contiguous()

