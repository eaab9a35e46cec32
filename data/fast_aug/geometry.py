"""Geometric batched ops: crops with padding, flip, resized crops and resizing.

Crops are index gathers (the padded image is never built); resizing is PIL's fixed-point
resampling (``resample.py``).
"""

from __future__ import annotations

import torch

from .base import CoinOp, Op, Unsupported, need_size, randint, uniform
from .resample import FILTERS, resized_crop


def _supported_filter(name: str, where: str) -> str:
    """The schema's interpolation name, if ``resample.py`` reproduces it."""
    if name not in FILTERS:
        raise Unsupported(f"{where}.interpolation: '{name}' is not supported (only "
                          f"{', '.join(sorted(FILTERS))})")
    return name


# --------------------------------------------------------------------------- index maps

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


# --------------------------------------------------------------------------- ops

class RandomCrop(Op):
    """T.RandomCrop: pad (constant/edge/reflect/symmetric), then a uniform offset per sample.
    Parameters: ``top``, ``left`` [B] in the padded image."""

    name = "random_crop"

    def setup(self, spec, where):
        self.size = spec["size"]
        if any(p < 0 for p in spec["padding"]):
            raise Unsupported(f"{where}.padding: negative padding is not supported")
        self.padding = spec["padding"]  # left, top, right, bottom
        self.padding_mode = spec["padding_mode"]
        self.pad_if_needed = spec["pad_if_needed"]
        if not all(isinstance(f, int) and 0 <= f <= 255 for f in spec["fill"]):
            raise Unsupported(f"{where}.fill: only integers 0..255 are supported")
        self.fill = spec["fill"]

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
        rows, cols = self._index_maps(*need_size(self, size), device)
        hp, wp = len(rows), len(cols)
        th, tw = self.size
        return {"top": randint(hp - th + 1, n, generator, device),
                "left": randint(wp - tw + 1, n, generator, device)}

    def apply(self, x, params):
        rows, cols = self._index_maps(x.shape[2], x.shape[3], x.device)
        th, tw = self.size
        r = rows[params["top"].view(-1, 1) + torch.arange(th, device=x.device)]
        c = cols[params["left"].view(-1, 1) + torch.arange(tw, device=x.device)]
        fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device)
        return _gather_crop(x, r, c, fill)


class CenterCrop(Op):
    """F.center_crop: zero padding when the crop is larger, offsets round((H - h) / 2)."""

    name = "center_crop"

    def setup(self, spec, where):
        self.size = spec["size"]

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


class RandomHorizontalFlip(CoinOp):
    """Parameter: ``flip`` [B] bool, True with probability p."""

    name = "random_horizontal_flip"
    key = "flip"

    def change(self, x):
        return x.flip(-1)


class RandomResizedCrop(Op):
    """T.RandomResizedCrop.get_params per sample (10 attempts, centre-crop fallback), then
    PIL's crop + resize. Parameters: ``top``, ``left``, ``height``, ``width`` [B]."""

    name = "random_resize_crop"

    def setup(self, spec, where):
        self.size, self.scale, self.ratio = spec["size"], spec["scale"], spec["ratio"]
        self.interpolation = _supported_filter(spec["interpolation"], where)

    def sample(self, n, generator, device, size=None):
        H, W = need_size(self, size)
        attempts = 10
        area = float(H * W)
        target = area * uniform((n, attempts), *self.scale, generator, device).double()
        log_r = torch.log(torch.tensor(self.ratio, dtype=torch.float32))
        aspect = torch.exp(uniform((n, attempts), float(log_r[0]), float(log_r[1]),
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
        top = torch.where(found, randint(H - h + 1, n, generator, device), (H - h) // 2)
        left = torch.where(found, randint(W - w + 1, n, generator, device), (W - w) // 2)
        return {"top": top, "left": left, "height": h, "width": w}

    def apply(self, x, params):
        return resized_crop(x, params["top"], params["left"], params["height"],
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


class Resize(Op):
    """T.Resize on PIL (an int size is the smaller edge)."""

    name = "resize"

    def setup(self, spec, where):
        self.size, self.max_size = spec["size"], spec["max_size"]
        self.interpolation = _supported_filter(spec["interpolation"], where)

    def apply(self, x, params):
        B, _, H, W = x.shape
        oh, ow = _resize_output(H, W, self.size, self.max_size)
        if (oh, ow) == (H, W):
            return x
        zero = torch.zeros(B, dtype=torch.long, device=x.device)
        return resized_crop(x, zero, zero, torch.full_like(zero, H), torch.full_like(zero, W),
                            (oh, ow), self.interpolation)
