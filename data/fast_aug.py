"""Batched augmentation on the device, with per-sample random parameters (reference §2.5).

``BatchTransform`` is built from the same YAML-shaped section as ``data.transforms.ImageTransform``
(``primary`` then ``remaining``; null entries skipped) and augments a whole uint8 batch
``[B, 3, H, W]`` at once, on whatever device the batch lives on. Each op draws its parameters
for every sample separately — a torchvision transform given a batched tensor would draw one set
for the whole batch (STYLE: airbench).

The reference path is PIL + torchvision per image, and the aim is the same distribution of
images, so every op reproduces the PIL arithmetic it stands for (Pillow 13 sources): the
fixed-point two-pass resampling of ``Image.resize`` (Resample.c), the truncating
``Image.blend`` behind ``ImageEnhance``, PIL's integer ``L`` conversion and uint8 HSV round
trip, and the extended box blur with which PIL approximates ``GaussianBlur`` (BoxBlur.c). Given
the same parameters the result equals the reference pixel for pixel (tests/test_fast_aug.py).
Images are float32 holding the integers 0..255 between ops, as PIL holds uint8. Resampling and
blurring multiply integer fixed-point weights in float64 (on the CPU: split into two float32
halves whose sums stay below 2**24, see "fixed-point passes"), where every sum is exact, so
the matrix products do not depend on summation order or device, and TF32 cannot touch them.
The HSV round trip of the hue shift is table lookups built with PIL's float steps. Only
``to_tensor`` / ``normalize`` leave 0..255, with torchvision's float32 operations.

Ops expose ``sample(n, generator, device, size=None)`` (per-sample parameters, first dimension
n; ``size`` is the (H, W) of the images, needed by random_crop and random_resize_crop) and
``apply(x, params)``, so parameters can be fixed in tests. Not reproduced (see
``unsupported_reason``): ops other than those of data.transforms._build_one, nearest
interpolation, negative padding, non-integer fill, ops after to_tensor.
"""

from __future__ import annotations

import math
import numbers
import struct

import PIL
import torch

from utils.errors import ConfigError

# PIL filter codes, as ``data.transforms._INTERPOLATION``; names as torchvision's
# InterpolationMode values.
_PIL_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_MODE_NAMES = {"nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos"}

_RESAMPLE_BITS = 22  # Resample.c PRECISION_BITS: 32 - 8 - 2
_BLUR_BITS = 24      # BoxBlur.c fixed point
# Resample.c writes the Hamming window constants as C floats (0.54f, 0.46f).
_F32_054 = struct.unpack("f", struct.pack("f", 0.54))[0]
_F32_046 = struct.unpack("f", struct.pack("f", 0.46))[0]
# Since Pillow 13 (python-pillow/Pillow#9549) the vertical resampling pass may come first.
_PIL_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


class _Unsupported(Exception):
    """A valid reference config that this module does not reproduce."""


# --------------------------------------------------------------------------- random helpers

def _rand(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def _uniform(n, lo, hi, generator, device, dtype=torch.float32) -> torch.Tensor:
    return lo + (hi - lo) * _rand(n, generator, device, dtype)


def _randint(high: torch.Tensor | int, n, generator, device) -> torch.Tensor:
    """Uniform integers in [0, high) with a per-sample ``high`` (torch.randint takes a scalar)."""
    u = _rand(n, generator, device, torch.float64)  # float64: u * high never rounds up to high
    high = torch.as_tensor(high, device=device)
    return torch.minimum((u * high).floor().long(), high.long() - 1)


# --------------------------------------------------------------------------- argument parsing

def _kwargs(args, allowed: set[str], where: str) -> dict:
    # A non-mapping value (e.g. ``random_horizontal_flip: True``) means defaults, as _build_one.
    kw = dict(args) if isinstance(args, dict) else {}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: bad arguments (unexpected argument '{unknown[0]}')")
    return kw


def _size(v, where: str) -> tuple[int, int]:
    """torchvision's _setup_size: int -> (v, v); [v] -> (v, v); [h, w]."""
    if isinstance(v, numbers.Number) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple)) or len(v) not in (1, 2):
        raise ConfigError(f"{where}.size must be an int or [h, w], got {v!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v):
        raise ConfigError(f"{where}.size must hold positive integers, got {v!r}")
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _prob(v, where: str) -> float:
    if not isinstance(v, numbers.Number) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
        raise ConfigError(f"{where}.p must be a probability in [0, 1], got {v!r}")
    return float(v)


def _interpolation(v, where: str) -> str:
    if isinstance(v, bool):
        raise ConfigError(f"{where}.interpolation: unknown mode {v!r}")
    if isinstance(v, int):
        if v not in _PIL_CODES:
            raise ConfigError(f"{where}.interpolation: unknown PIL filter code {v}")
        name = _PIL_CODES[v]
    else:
        name = str(getattr(v, "value", v)).lower()  # an InterpolationMode passed from code
        if name not in _MODE_NAMES:
            raise ConfigError(f"{where}.interpolation: unknown mode '{v}'")
    if name not in _FILTERS:
        raise _Unsupported(f"{where}.interpolation: '{name}' is not supported (only "
                           f"{', '.join(sorted(_FILTERS))})")
    return name


def _range(v, name: str, where: str, center: float, bound: tuple[float, float], clip: bool):
    """ColorJitter._check_input: v -> [center - v, center + v] (clipped at 0), or [lo, hi]."""
    if isinstance(v, numbers.Number) and not isinstance(v, bool):
        if v < 0:
            raise ConfigError(f"{where}.{name}: a single number must be non-negative, got {v}")
        lo, hi = center - float(v), center + float(v)
        if clip:
            lo = max(lo, 0.0)
    elif isinstance(v, (list, tuple)) and len(v) == 2:
        lo, hi = float(v[0]), float(v[1])
    else:
        raise ConfigError(f"{where}.{name}: must be a number or a [min, max] pair, got {v!r}")
    if not bound[0] <= lo <= hi <= bound[1]:
        raise ConfigError(f"{where}.{name}: values must lie in {list(bound)}, got {[lo, hi]}")
    return None if lo == hi == center else (lo, hi)


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
_FILTERS = {
    "box": (_box, 0.5), "bilinear": (_bilinear, 1.0), "hamming": (_hamming, 1.0),
    "bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0),
}


def _resample_weights(length, offset, full, out, filt, device) -> torch.Tensor:
    """Fixed-point weights of PIL's crop(box).resize() along one axis: float64 [B, out, full].

    Sample b reads ``length[b]`` pixels starting at ``offset[b]`` of a line of ``full`` pixels;
    the weights are Resample.c precompute_coeffs (window clipped to the crop, normalised to sum
    1) followed by normalize_coeffs_8bpc (round to 22 fractional bits), zero outside the crop.
    As in C they are computed over each output's window only (``taps`` pixels from xmin) and
    summed left to right, then scattered into the dense matrix.
    """
    kernel, support = _FILTERS[filt]
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


class _FixedPointPass:
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

    def select(self, idx: torch.Tensor) -> _FixedPointPass:
        sub = object.__new__(_FixedPointPass)
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


def _resized_crop(x, top, left, height, width, out_hw, filt) -> torch.Tensor:
    """Per-sample crop (top, left, height, width) then PIL resize to ``out_hw``: two passes,
    each rounded to uint8 (ImagingResampleInner)."""
    B, _, H, W = x.shape
    oh, ow = out_hw
    horizontal = _FixedPointPass(_resample_weights(width, left, W, ow, filt, x.device),
                                 _RESAMPLE_BITS, axis=-1)
    vertical = _FixedPointPass(_resample_weights(height, top, H, oh, filt, x.device),
                               _RESAMPLE_BITS, axis=-3)
    y = x.permute(0, 2, 1, 3)  # [B, H, C, W]
    out = vertical(horizontal(y))
    if _PIL_VERTICAL_FIRST and H > oh:
        # Pillow 13 runs the vertical pass first when the height shrinks by more than twice
        # as many pixels as the width does; the rounding between passes then differs.
        shrink_h, shrink_w = height - oh, width - ow
        v_first = (shrink_h > 0) & (shrink_h > 2 * shrink_w)
        out = _where_samples(v_first, lambda z, i: horizontal.select(i)(vertical.select(i)(z)),
                             y, out)
    return out.permute(0, 2, 1, 3).contiguous()


def _pad_index(n: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    """Source index of every position of a line padded like np.pad / ImageOps.expand
    (-1 where the constant fill goes)."""
    i = torch.arange(-before, n + after, device=device)
    if mode == "constant":
        return torch.where((i >= 0) & (i < n), i, torch.full_like(i, -1))
    if mode == "edge":
        return i.clamp(0, n - 1)
    if mode == "reflect":
        if n == 1:
            return torch.zeros_like(i)
        period = 2 * (n - 1)
        m = i.remainder(period)
        return torch.where(m < n, m, period - m)
    period = 2 * n  # symmetric: the edge pixel is repeated
    m = i.remainder(period)
    return torch.where(m < n, m, period - 1 - m)


def _gather_crop(x, rows, cols, fill) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, rows[b, i], cols[b, j]]; -1 indices take ``fill`` [C]."""
    B, C, _, W = x.shape
    h, w = rows.shape[1], cols.shape[1]
    y = x.gather(2, rows.clamp(min=0).view(B, 1, h, 1).expand(B, C, h, W))
    y = y.gather(3, cols.clamp(min=0).view(B, 1, 1, w).expand(B, C, h, w))
    keep = (rows >= 0).view(B, 1, h, 1) & (cols >= 0).view(B, 1, 1, w)
    return torch.where(keep, y, fill.view(1, C, 1, 1).to(y))


def _where_samples(mask: torch.Tensor, fn, x: torch.Tensor, out=None) -> torch.Tensor:
    """``out`` (default: x) with fn applied to the samples in ``mask``: fn(x[idx], idx). On
    the CPU only those samples are computed, and written into ``out`` in place (into a copy
    of x by default); on an accelerator the whole batch is, then selected, because picking a
    data-dependent subset would synchronise with the host."""
    if x.device.type == "cpu":
        idx = mask.nonzero().squeeze(1)
        out = x.clone() if out is None else out
        if len(idx):
            out[idx] = fn(x[idx], idx)
        return out
    everything = torch.arange(x.shape[0], device=x.device)
    return torch.where(mask.view(-1, 1, 1, 1), fn(x, everything), x if out is None else out)


# --------------------------------------------------------------------------- ops

class _Op:
    name = ""
    image_op = True  # holds 0..255 integers afterwards (False for to_tensor / normalize)

    def sample(self, n: int, generator: torch.Generator, device, size=None) -> dict:
        return {}

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _need_size(op: _Op, size):
    if size is None:
        raise ValueError(f"{op.name}.sample needs size=(H, W) of the images")
    return int(size[0]), int(size[1])


class RandomCrop(_Op):
    """T.RandomCrop: pad (constant/edge/reflect/symmetric), then a uniform offset per sample.
    Parameters: ``top``, ``left`` [B] in the padded image."""

    name = "random_crop"

    def __init__(self, where, size=None, padding=None, pad_if_needed=False, fill=0,
                 padding_mode="constant"):
        if size is None:
            raise ConfigError(f"{where}: bad arguments (missing 'size')")
        self.size = _size(size, where)
        if padding is None:
            padding = 0
        if isinstance(padding, numbers.Number) and not isinstance(padding, bool):
            padding = [padding]
        if not isinstance(padding, (list, tuple)) or len(padding) not in (1, 2, 4) or not all(
                isinstance(p, int) and not isinstance(p, bool) for p in padding):
            raise ConfigError(f"{where}.padding must be an int or a 2/4-list of ints, "
                              f"got {padding!r}")
        if any(p < 0 for p in padding):
            raise _Unsupported(f"{where}.padding: negative padding is not supported")
        if len(padding) == 1:
            padding = padding * 4
        elif len(padding) == 2:
            padding = [padding[0], padding[1], padding[0], padding[1]]
        self.padding = tuple(padding)  # left, top, right, bottom
        if padding_mode not in ("constant", "edge", "reflect", "symmetric"):
            raise ConfigError(f"{where}.padding_mode must be constant, edge, reflect or "
                              f"symmetric, got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.pad_if_needed = bool(pad_if_needed)
        if isinstance(fill, numbers.Number) and not isinstance(fill, bool):
            fill = [fill] * 3
        if not isinstance(fill, (list, tuple)) or len(fill) not in (1, 3):
            raise ConfigError(f"{where}.fill must be a number or 3 numbers, got {fill!r}")
        if len(fill) == 1:
            fill = list(fill) * 3
        if not all(isinstance(f, int) and 0 <= f <= 255 for f in fill):
            raise _Unsupported(f"{where}.fill: only integers 0..255 are supported")
        self.fill = tuple(fill)

    def _index_maps(self, H, W, device):
        """Source row / column of every pixel of the padded image (-1: fill)."""
        left, top, right, bottom = self.padding
        rows = _pad_index(H, top, bottom, self.padding_mode, device)
        cols = _pad_index(W, left, right, self.padding_mode, device)
        if self.pad_if_needed:
            # torchvision pads BOTH sides by the shortfall, in the same mode.
            rows, cols = self._extend(rows, self.size[0]), self._extend(cols, self.size[1])
        if len(rows) < self.size[0] or len(cols) < self.size[1]:
            raise ValueError(f"random_crop: crop {self.size} is larger than the padded image "
                             f"{(len(rows), len(cols))}")
        return rows, cols

    def _extend(self, index, need):
        extra = need - len(index)
        if extra <= 0:
            return index
        idx = _pad_index(len(index), extra, extra, self.padding_mode, index.device)
        return torch.where(idx >= 0, index[idx.clamp(min=0)], torch.full_like(idx, -1))

    def sample(self, n, generator, device, size=None):
        rows, cols = self._index_maps(*_need_size(self, size), device)
        hp, wp = len(rows), len(cols)
        th, tw = self.size
        return {"top": _randint(hp - th + 1, n, generator, device),
                "left": _randint(wp - tw + 1, n, generator, device)}

    def apply(self, x, params):
        rows, cols = self._index_maps(x.shape[2], x.shape[3], x.device)
        th, tw = self.size
        r = rows[params["top"].view(-1, 1) + torch.arange(th, device=x.device)]
        c = cols[params["left"].view(-1, 1) + torch.arange(tw, device=x.device)]
        fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device)
        return _gather_crop(x, r, c, fill)


class CenterCrop(_Op):
    """F.center_crop: zero padding when the crop is larger, offsets round((H - h) / 2)."""

    name = "center_crop"

    def __init__(self, where, size=None):
        if size is None:
            raise ConfigError(f"{where}: bad arguments (missing 'size')")
        self.size = _size(size, where)

    def apply(self, x, params):
        B, C, H, W = x.shape
        th, tw = self.size
        maps = []
        for n, t in ((H, th), (W, tw)):
            before, after = ((t - n) // 2, (t - n + 1) // 2) if t > n else (0, 0)
            idx = _pad_index(n, before, after, "constant", x.device)
            start = int(round((len(idx) - t) / 2.0))  # Python round, as torchvision
            maps.append(idx[start:start + t].expand(B, t))
        return _gather_crop(x, maps[0], maps[1], torch.zeros(C, dtype=x.dtype, device=x.device))


class RandomHorizontalFlip(_Op):
    """Parameter: ``flip`` [B] bool, True with probability p."""

    name = "random_horizontal_flip"

    def __init__(self, where, p=0.5):
        self.p = _prob(p, where)

    def sample(self, n, generator, device, size=None):
        return {"flip": _rand(n, generator, device) < self.p}

    def apply(self, x, params):
        return torch.where(params["flip"].view(-1, 1, 1, 1), x.flip(-1), x)


class RandomResizedCrop(_Op):
    """T.RandomResizedCrop.get_params per sample (10 attempts, centre-crop fallback), then
    PIL's crop + resize. Parameters: ``top``, ``left``, ``height``, ``width`` [B]."""

    name = "random_resize_crop"

    def __init__(self, where, size=None, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0),
                 interpolation="bilinear", antialias=True):
        if size is None:
            raise ConfigError(f"{where}: bad arguments (missing 'size')")
        self.size = _size(size, where)
        for k, v in (("scale", scale), ("ratio", ratio)):
            if not isinstance(v, (list, tuple)) or len(v) != 2 or not (0 < v[0] <= v[1]):
                raise ConfigError(f"{where}.{k} must be [min, max] with 0 < min <= max, "
                                  f"got {v!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.interpolation = _interpolation(interpolation, where)
        # antialias is ignored on PIL images (always antialiased): accepted, as torchvision.

    def sample(self, n, generator, device, size=None):
        H, W = _need_size(self, size)
        attempts = 10
        area = float(H * W)
        target = area * _uniform((n, attempts), *self.scale, generator, device).double()
        log_r = torch.log(torch.tensor(self.ratio, dtype=torch.float32))
        aspect = torch.exp(_uniform((n, attempts), float(log_r[0]), float(log_r[1]),
                                    generator, device)).double()
        w = torch.sqrt(target * aspect).round().long()   # round half to even, as Python round
        h = torch.sqrt(target / aspect).round().long()
        ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        first = ok.int().argmax(dim=1, keepdim=True)      # the first accepted attempt
        found = ok.any(dim=1)
        # Fallback: the central crop with the ratio clamped into range.
        in_ratio = W / H
        if in_ratio < min(self.ratio):
            fw, fh = W, int(round(W / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            fw, fh = int(round(H * max(self.ratio))), H
        else:
            fw, fh = W, H
        w = torch.where(found, w.gather(1, first).squeeze(1), fw)
        h = torch.where(found, h.gather(1, first).squeeze(1), fh)
        top = torch.where(found, _randint(H - h + 1, n, generator, device), (H - h) // 2)
        left = torch.where(found, _randint(W - w + 1, n, generator, device), (W - w) // 2)
        return {"top": top, "left": left, "height": h, "width": w}

    def apply(self, x, params):
        return _resized_crop(x, params["top"], params["left"], params["height"],
                             params["width"], self.size, self.interpolation)


def _resize_output(H, W, size, max_size):
    """torchvision's _compute_resized_output_size."""
    if len(size) == 2:
        return size[0], size[1]
    short, long = (W, H) if W <= H else (H, W)
    new_short, new_long = size[0], int(size[0] * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if W <= H else (new_short, new_long)


class Resize(_Op):
    """T.Resize on PIL (an int size is the smaller edge)."""

    name = "resize"

    def __init__(self, where, size=None, interpolation="bilinear", max_size=None,
                 antialias=True):
        if size is None:
            raise ConfigError(f"{where}: bad arguments (missing 'size')")
        if isinstance(size, (list, tuple)) and len(size) == 2:
            self.size = tuple(_size(size, where))
        else:
            self.size = (_size(size, where)[0],)
        if max_size is not None and (len(self.size) == 2 or max_size <= self.size[0]):
            raise ConfigError(f"{where}.max_size must exceed an int size, got {max_size!r}")
        self.max_size = max_size
        self.interpolation = _interpolation(interpolation, where)

    def apply(self, x, params):
        B, _, H, W = x.shape
        oh, ow = _resize_output(H, W, self.size, self.max_size)
        if (oh, ow) == (H, W):
            return x
        zero = torch.zeros(B, dtype=torch.long, device=x.device)
        return _resized_crop(x, zero, zero, torch.full_like(zero, H), torch.full_like(zero, W),
                             (oh, ow), self.interpolation)


class RandomColorJitter(_Op):
    """RandomApply([ColorJitter], p) on PIL, per sample: applied with probability p, the four
    adjustments in a random order (a fresh permutation per image, as ColorJitter.get_params).

    Parameters: ``apply`` [B] bool, ``order`` [B, 4] (0 brightness, 1 contrast, 2 saturation,
    3 hue), and one float32 factor [B] per enabled adjustment.
    """

    name = "random_color_jitter"
    _NAMES = ("brightness", "contrast", "saturation", "hue")

    def __init__(self, where, p=1.0, brightness=0, contrast=0, saturation=0, hue=0):
        self.p = _prob(p, where)
        self.ranges = {
            "brightness": _range(brightness, "brightness", where, 1.0, (0, math.inf), True),
            "contrast": _range(contrast, "contrast", where, 1.0, (0, math.inf), True),
            "saturation": _range(saturation, "saturation", where, 1.0, (0, math.inf), True),
            "hue": _range(hue, "hue", where, 0.0, (-0.5, 0.5), False),
        }

    def sample(self, n, generator, device, size=None):
        params = {
            "apply": ~(self.p < _rand(n, generator, device)),  # RandomApply: skip if p < u
            "order": _rand((n, 4), generator, device).argsort(dim=1),
        }
        for k in self._NAMES:
            if self.ranges[k] is not None:
                params[k] = _uniform(n, *self.ranges[k], generator, device)
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
                x = _where_samples(op == 3, lambda y, i: _adjust_hue(y, params["hue"][i]), x,
                                   out=x)
        return x


class RandomGrayscale(_Op):
    """Parameter: ``gray`` [B] bool. Output: PIL "L" in all three channels."""

    name = "random_grayscale"

    def __init__(self, where, p=0.1):
        self.p = _prob(p, where)

    def sample(self, n, generator, device, size=None):
        return {"gray": _rand(n, generator, device) < self.p}

    def apply(self, x, params):
        return torch.where(params["gray"].view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


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
    horizontal = _FixedPointPass(_box_blur_matrix(radius, W), _BLUR_BITS, axis=-1)
    vertical = _FixedPointPass(_box_blur_matrix(radius, H), _BLUR_BITS, axis=-3)
    y = x.permute(0, 2, 1, 3)  # [B, H, C, W]
    for _ in range(3):
        y = horizontal(y)
    for _ in range(3):
        y = vertical(y)
    return y.permute(0, 2, 1, 3).contiguous()


class GaussianBlur(_Op):
    """RandomApply([GaussianBlur(sigma)], p): sigma ~ U(sigma) per sample, then PIL's
    ImageFilter.GaussianBlur(radius=sigma) — not a sampled Gaussian but PIL's three extended
    box blurs per axis, horizontal first, each pass rounded to uint8 (BoxBlur.c).
    Parameters: ``apply`` [B] bool, ``sigma`` [B] float64."""

    name = "gaussian_blur"

    def __init__(self, where, p=1.0, sigma=(0.1, 2.0)):
        self.p = _prob(p, where)
        if (not isinstance(sigma, (list, tuple)) or len(sigma) != 2
                or not 0 <= sigma[0] <= sigma[1]):
            raise ConfigError(f"{where}.sigma must be [min, max] with 0 <= min <= max, "
                              f"got {sigma!r}")
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def sample(self, n, generator, device, size=None):
        return {"apply": ~(self.p < _rand(n, generator, device)),
                "sigma": _uniform(n, *self.sigma, generator, device, torch.float64)}

    def apply(self, x, params):
        return _where_samples(params["apply"],
                              lambda y, i: _box_blur(y, _box_blur_radius(params["sigma"][i])), x)


class ToTensor(_Op):
    """T.ToTensor: x / 255 in float32."""

    name = "to_tensor"
    image_op = False

    def __init__(self, where):
        pass

    def apply(self, x, params):
        return x / 255


class Normalize(_Op):
    """T.Normalize: (x - mean) / std in float32, the same operations as torchvision."""

    name = "normalize"
    image_op = False

    def __init__(self, where, mean=None, std=None, inplace=False):
        for k, v in (("mean", mean), ("std", std)):
            if not isinstance(v, (list, tuple)) or len(v) not in (1, 3) or not all(
                    isinstance(e, numbers.Number) for e in v):
                raise ConfigError(f"{where}.{k} must be a list of 1 or 3 numbers, got {v!r}")
        if any(s == 0 for s in std):
            raise ConfigError(f"{where}.std must not contain 0, got {std!r}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def apply(self, x, params):
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std


_OPS = {cls.name: cls for cls in (RandomCrop, CenterCrop, RandomHorizontalFlip,
                                  RandomResizedCrop, Resize, RandomColorJitter, RandomGrayscale,
                                  GaussianBlur, ToTensor, Normalize)}
_ALLOWED = {
    "random_crop": {"size", "padding", "pad_if_needed", "fill", "padding_mode"},
    "center_crop": {"size"},
    "random_horizontal_flip": {"p"},
    "random_resize_crop": {"size", "scale", "ratio", "interpolation", "antialias"},
    "resize": {"size", "interpolation", "max_size", "antialias"},
    "random_color_jitter": {"p", "brightness", "contrast", "saturation", "hue"},
    "random_grayscale": {"p"},
    "gaussian_blur": {"p", "sigma"},
    "to_tensor": set(),
    "normalize": {"mean", "std", "inplace"},
}


def _build_op(name: str, args, where: str) -> _Op:
    if name not in _OPS:
        raise _Unsupported(f"{where}: transformation '{name}' is not supported")
    if name == "to_tensor" and not args:
        raise ConfigError(f"{where}: to_tensor must be true when present")
    return _OPS[name](where, **_kwargs(args, _ALLOWED[name], where))


def _build_ops(section, where: str) -> list[_Op]:
    """Ops of ``primary`` then ``remaining`` in YAML order; raises _Unsupported / ConfigError."""
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping with primary/remaining, got {section!r}")
    ops = []
    for part in ("primary", "remaining"):
        entries = section.get(part)
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise ConfigError(f"{where}.{part} must be a mapping of transform names, "
                              f"got {entries!r}")
        for name, args in entries.items():
            if args is None:
                continue
            ops.append(_build_op(name, args, f"{where}.{part}.{name}"))
    names = [op.name for op in ops]
    if names.count("to_tensor") != 1 or names.count("normalize") > 1:
        raise ConfigError(f"{where}: expected to_tensor once (in remaining) and normalize at "
                          f"most once, got {names}")
    after = names[names.index("to_tensor") + 1:]
    if "normalize" in names and "normalize" not in after:
        raise ConfigError(f"{where}: normalize must come after to_tensor")
    for name in after:
        if name != "normalize":
            # The reference would run it on a tensor (torchvision's tensor kernels).
            raise _Unsupported(f"{where}: '{name}' after to_tensor is not supported")
    return ops


def unsupported_reason(section, where: str = "transform") -> str | None:
    """None if every op of ``section`` (primary and remaining) can run batched; otherwise a
    short string naming the first op or argument that cannot. A config that is merely invalid
    is not "unsupported": building a BatchTransform from it raises the ConfigError."""
    try:
        _build_ops(section, where)
    except _Unsupported as e:
        return str(e)
    except (ConfigError, TypeError):
        return None
    return None


class BatchTransform:
    """uint8 [B, 3, H, W] (any device) -> float32 [B, 3, h, w], one transform section.

    Each op draws per-sample parameters from ``generator`` (on the batch's device), so one seed
    gives one output on a given device.
    """

    def __init__(self, section, where: str = "transform"):
        try:
            self.ops = _build_ops(section, where)
        except _Unsupported as e:
            raise ConfigError(f"{e} by the batched augmentation") from None
        except TypeError as e:
            raise ConfigError(f"{where}: bad arguments ({e})") from None

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a uint8 batch [B, 3, H, W], got {x.dtype} "
                             f"{tuple(x.shape)}")
        if torch.device(generator.device).type != x.device.type:
            raise ValueError(f"generator on {generator.device}, batch on {x.device}")
        n = x.shape[0]
        y = x.float()
        for op in self.ops:
            y = op.apply(y, op.sample(n, generator, x.device, size=tuple(y.shape[-2:])))
            if op.image_op:
                y = y.round().clamp(0, 255)  # PIL holds a uint8 image between ops
        return y.contiguous()

    def __repr__(self):
        return "BatchTransform(\n" + "".join(f"    {op!r}\n" for op in self.ops) + ")"
