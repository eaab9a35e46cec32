"""Colour batched ops: colour jitter and grayscale, in PIL's integer arithmetic.

Brightness, contrast and saturation are PIL's truncating ``Image.blend`` (as ``ImageEnhance``);
grayscale is PIL's integer ``L`` conversion; the hue shift is PIL's uint8 HSV round trip
(Convert.c), done by table lookups built with PIL's float steps.
"""

from __future__ import annotations

import torch

from .base import CoinOp, Op, rand, uniform, where_samples

# --------------------------------------------------------------------------- PIL primitives

def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert("L"): (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; [B, 1, H, W].

    Exact in float32: the largest sum, 255 * 65536 + 32768, is below 2**24.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).floor()


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, x, factor) as Blend.c: float32 arithmetic, TRUNCATED to uint8
    (not rounded), clipped when extrapolating. ``factor`` is [B] and already float32 (PIL
    receives it as a C float)."""
    f = factor.view(-1, 1, 1, 1)
    # degenerate + f * (x - degenerate), one float32 rounding per step as in C (no fused
    # multiply-add); in place on the one fresh tensor.
    out = x - degenerate
    out.mul_(f).add_(degenerate)
    # trunc then clip == clip then floor (both give 0 below 0, 255 above 255, and agree on
    # [0, 255]), and floor is the faster kernel.
    return out.clamp_(0, 255).floor_()


def _rgb_to_hsv(x: torch.Tensor):
    """PIL's rgb2hsv (Convert.c) on a [B, 3, H, W] float32 image of integers.

    The mix of float32 and float64 steps mirrors the C types so that the truncations to uint8
    land on the same side. The reference arithmetic: ``_adjust_hue`` looks its results up in
    tables built with it (``_hsv_tables``).
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    grey = maxc == minc
    cr = torch.where(grey, torch.ones_like(maxc), maxc - minc)
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / cr, (maxc - g) / cr, (maxc - b) / cr
    h_r = bc - gc
    h_g = ((2.0 + rc.double()) - bc.double()).float()
    h_b = ((4.0 + gc.double()) - rc.double()).float()
    h = torch.where(r == maxc, h_r, torch.where(g == maxc, h_g, h_b))
    h = torch.fmod(h.double() / 6.0 + 1.0, 1.0).float()
    uh = (h.double() * 255.0).trunc().clamp(0, 255)
    us = (s.double() * 255.0).trunc().clamp(0, 255)
    zero = torch.zeros_like(uh)
    return torch.where(grey, zero, uh), torch.where(grey, zero, us), maxc.double()


# hsv2rgb's switch (Convert.c), as indices into the stack (v, p, q, t) for (R, G, B).
_HSV_SECTORS = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))


def _hsv_coefficients(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """PIL's hsv2rgb (Convert.c) up to its last step: for uint8 H and S (float64 integers, any
    shape) the float64 factors c of (R, G, B), [..., 3], such that each channel is
    round(v * c) — C's round, half away from zero — clipped to uint8.

    In C, p = round((float)v * (1.0 - fs)), q = round((float)v * (1.0 - fs * f)) and
    t = round((float)v * (1.0 - fs * (1.0 - f))): a double product of v with a factor that
    depends on (H, S) only (fs and f are C floats, fs * f a float product). The channels
    equal to v get c = 1.0 (v * 1.0 == v), as does S == 0 (grey).
    """
    hf = h * 6.0 / 255.0
    i = hf.floor()
    f = (hf - i).float()
    fs = (s / 255.0).float()
    one = torch.ones_like(hf)
    cand = torch.stack([one, 1.0 - fs.double(), 1.0 - (fs * f).double(),
                        1.0 - fs.double() * (1.0 - f.double())], dim=-1)
    table = torch.tensor(_HSV_SECTORS, device=h.device)
    c = cand.gather(-1, table[i.long().remainder(6)])
    return torch.where((s == 0).unsqueeze(-1), one.unsqueeze(-1), c)


_HSV_TABLE_CACHE: dict = {}


def _hsv_tables(device):
    """Lookup tables for PIL's uint8 HSV round trip, built once per device.

    * hue [3 * 256 * 256] uint8, key branch * 65536 + X * 256 + Y: rgb2hsv's H depends only
      on which channel is the maximum (branch 0 R, 1 G, 2 B, C's tie order) and on the
      differences maxc - c of the two other channels (X, Y in R, G, B order; cr = max(X, Y)),
      never on maxc itself. Entry = ``_rgb_to_hsv`` of the pixel with maxc = 255 and those
      differences, so the same float operations on the same operands: the same byte.
    * sat [256 * 256] uint8, key cr * 256 + maxc: S = (int)((float)cr / maxc * 255.0).
    * coef [3, 256 * 256] float64 (R, G, B), key H * 256 + S: ``_hsv_coefficients``.
    """
    key = str(device)
    if key not in _HSV_TABLE_CACHE:
        d = torch.arange(256, dtype=torch.float32, device=device)
        X, Y = (255 - d).view(-1, 1).expand(256, 256), (255 - d).view(1, -1).expand(256, 256)
        top = torch.full_like(X, 255.0)
        branches = torch.stack([torch.stack([top, X, Y]),   # R max: G = 255 - X, B = 255 - Y
                                torch.stack([X, top, Y]),   # G max: R = 255 - X, B = 255 - Y
                                torch.stack([X, Y, top])])  # B max: R = 255 - X, G = 255 - Y
        hue = _rgb_to_hsv(branches)[0]
        cr, maxc = d.view(-1, 1).expand(256, 256), d.view(1, -1).expand(256, 256)
        low = (maxc - cr).clamp(min=0)  # cr > maxc cannot occur; any value will do there
        sat = _rgb_to_hsv(torch.stack([maxc, low, low]).unsqueeze(0))[1]
        hh, ss = d.double().view(-1, 1).expand(256, 256), d.double().view(1, -1).expand(256, 256)
        _HSV_TABLE_CACHE[key] = (hue.to(torch.uint8).flatten(), sat.to(torch.uint8).flatten(),
                                 _hsv_coefficients(hh, ss).reshape(-1, 3).T.contiguous())
    return _HSV_TABLE_CACHE[key]


def _rgb_to_hsv_lookup(x: torch.Tensor):
    """PIL's rgb2hsv by table lookup (``_hsv_tables``): [n, 3, H, W] float32 integers ->
    uint8 (H, S, V) as int32 [n, H, W]; equal to ``_rgb_to_hsv``."""
    hue_table, sat_table, _ = _hsv_tables(x.device)
    n, _, H, W = x.shape
    r, g, b = x.to(torch.int32).unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    dr, dg, db = v - r, v - g, v - b
    # branch 0: R is the maximum, 1: G (R is not), 2: B (neither); the hue key's (X, Y) are
    # (dg, db), (dr, db), (dr, dg). Integer arithmetic instead of nested torch.where.
    nr, ng = (dr != 0).to(torch.int32), (dg != 0).to(torch.int32)
    branch = nr * (1 + ng)
    hx = dr + dg * (1 - nr)   # dr == 0 in branch 0
    hy = db + dg * (nr * ng)  # db == 0 in branch 2
    key = (branch * 65536).add_(hx * 256).add_(hy)
    h = hue_table.index_select(0, key.flatten()).view(n, H, W).to(torch.int32)
    cr = torch.maximum(hx, hy)
    s = sat_table.index_select(0, (cr * 256).add_(v).flatten()).view(n, H, W).to(torch.int32)
    return h, s, v


def _hsv_to_rgb_lookup(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PIL's hsv2rgb on uint8 (H, S, V) int32 [n, H, W] -> float32 [n, 3, H, W]: per channel
    round(v * c) with c looked up by (H, S) (``_hsv_tables``)."""
    coef = _hsv_tables(h.device)[2]
    n, H, W = h.shape
    key = (h * 256).add_(s).flatten()
    vd = v.to(torch.float64)
    out = torch.empty(n, 3, H, W, dtype=torch.float32, device=h.device)
    for ch in range(3):
        # C's round(v * c) for v * c >= 0 (half away from zero): floor, plus 1 where the
        # exact fraction y - floor(y) is >= 0.5.
        y = coef[ch].index_select(0, key).view(n, H, W).mul_(vd)
        rgb = y.floor()
        out[:, ch] = rgb.add_(y.sub_(rgb).ge_(0.5))
    return out.clamp_(0, 255)


def _adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue on PIL: uint8 HSV, H += uint8(int32(hue * 255)), back to RGB.

    rgb2hsv is two table lookups per pixel and hsv2rgb one lookup of three factors and a
    float64 product; the float steps are those of ``_rgb_to_hsv`` / ``_hsv_coefficients``,
    done once per table entry instead of once per pixel."""
    h, s, v = _rgb_to_hsv_lookup(x)
    shift = (hue.double() * 255.0).trunc().remainder(256).to(torch.int32).view(-1, 1, 1)
    return _hsv_to_rgb_lookup((h + shift).bitwise_and_(255), s, v)  # uint8 wrap-around


# --------------------------------------------------------------------------- ops

class RandomColorJitter(Op):
    """RandomApply([ColorJitter], p) on PIL, per sample: applied with probability p, the four
    adjustments in a random order (a fresh permutation per image, as ColorJitter.get_params).

    Parameters: ``apply`` [B] bool, ``order`` [B, 4] (0 brightness, 1 contrast, 2 saturation,
    3 hue), and one float32 factor [B] per enabled adjustment.
    """

    name = "random_color_jitter"
    _NAMES = ("brightness", "contrast", "saturation", "hue")

    def setup(self, spec, where):
        self.p = spec["p"]
        self.ranges = spec["ranges"]  # name -> (min, max) of the factor, None when off

    def sample(self, n, generator, device, size=None):
        params = {
            "apply": ~(self.p < rand(n, generator, device)),  # RandomApply: skip if p < u
            "order": rand((n, 4), generator, device).argsort(dim=1),
        }
        for k in self._NAMES:
            if self.ranges[k] is not None:
                params[k] = uniform(n, *self.ranges[k], generator, device)
        return params

    def apply(self, x, params):
        order, applied = params["order"], params["apply"]
        B, _, H, W = x.shape
        ones = torch.ones(B, dtype=torch.float32, device=x.device)
        factors = torch.stack([params.get(k, ones) for k in self._NAMES[:3]], dim=1)
        for step in range(4):
            op = torch.where(applied, order[:, step], -1)  # -1: nothing at this step
            # Brightness, contrast and saturation are all Image.blend(degenerate, x, f), with
            # degenerate black, the grey of int(mean(L) + 0.5), or L: one blend per step. A
            # factor of exactly 1 leaves an image unchanged in Blend.c arithmetic.
            blend = (op >= 0) & (op < 3)
            f = torch.where(blend, factors.gather(1, op.clamp(0, 2).view(-1, 1)).squeeze(1), ones)
            gray = _gray(x)
            mean = gray.double().sum(dim=(1, 2, 3)) / (H * W)
            grey_level = (mean + 0.5).floor().float().view(-1, 1, 1, 1)
            op4 = op.view(-1, 1, 1, 1)
            degenerate = torch.where(op4 == 0, torch.zeros_like(gray),
                                     torch.where(op4 == 1, grey_level.expand_as(gray), gray))
            x = _blend(degenerate, x, f)
            if "hue" in params:  # in place: x is the fresh tensor from _blend
                x = where_samples(op == 3, lambda y, i: _adjust_hue(y, params["hue"][i]), x,
                                  out=x)
        return x


class RandomGrayscale(CoinOp):
    """Parameter: ``gray`` [B] bool. Output: PIL "L" in all three channels."""

    name = "random_grayscale"
    key = "gray"

    def change(self, x):
        return _gray(x).expand_as(x)
