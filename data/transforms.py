"""Image transforms built from the config's ``transform`` section (docs/original.md §2.5).

A section has three parts applied in order: ``pre``, ``primary`` (augmentation) and ``remaining``
(to_tensor + normalize). Each part is a mapping ``name: {arguments}`` built in YAML order;
entries whose value is null are skipped. The config is never mutated (docs/differences.md #14).

When ``remaining`` is exactly to_tensor followed by normalize, the dataset hands out uint8 CHW
tensors and normalisation happens on the training device, in one batched operation. The result
equals ToTensor + Normalize (docs/differences.md #3).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from utils.errors import ConfigError

from . import augment_schema as schema

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

class GaussianBlur:
    """MoCo-style blur: sigma ~ U(sigma_min, sigma_max) from Python's ``random``, then PIL's
    GaussianBlur with that radius (docs/original.md §2.5). ``sigma`` is checked as the argument of the
    ``gaussian_blur`` entry of ``data.augment_schema``, which the batched blur reads too."""

    def __init__(self, sigma=schema.OPS["gaussian_blur"].defaults["sigma"],
                 where: str = "gaussian_blur"):
        self.sigma = schema.blur_sigma(sigma, where)

    def __call__(self, img: Image.Image) -> Image.Image:
        radius = random.uniform(self.sigma[0], self.sigma[1])
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self):
        return f"GaussianBlur(sigma={list(self.sigma)})"


# The PIL / torchvision op of every entry of data.augment_schema.OPS. Each builder gets the
# entry's arguments as written (``kw``, a fresh dict; torchvision's defaults, which are the
# schema's, for the others) after the schema has checked them into ``spec``.

def _plain(op_cls):
    return lambda kw, spec: op_cls(**kw)


def _random_apply(op_cls):
    """``{p, ...}`` -> RandomApply([op_cls(...)], p), p 1 by default."""
    def build(kw, spec):
        p = kw.pop("p", 1.0)
        return T.RandomApply([op_cls(**kw)], p=p)
    return build


def _resampling(op_cls):
    """The interpolation as the InterpolationMode of the schema's name; scale, ratio tuples."""
    def build(kw, spec):
        if "interpolation" in kw:
            kw["interpolation"] = InterpolationMode(spec["interpolation"])
        for k in ("scale", "ratio"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return op_cls(**kw)
    return build


_TORCHVISION = {
    "random_crop": _plain(T.RandomCrop),
    "random_resize_crop": _resampling(T.RandomResizedCrop),
    "resize": _resampling(T.Resize),
    "center_crop": _plain(T.CenterCrop),
    "random_horizontal_flip": _plain(T.RandomHorizontalFlip),
    "random_color_jitter": _random_apply(T.ColorJitter),
    "random_grayscale": _plain(T.RandomGrayscale),
    "gaussian_blur": _random_apply(GaussianBlur),
    "to_tensor": lambda kw, spec: T.ToTensor(),
    "normalize": _plain(T.Normalize),
}


def _build_one(name: str, args, where: str):
    kw = schema.entry_kwargs(name, args, where)
    return _TORCHVISION[name](kw, schema.OPS[name].parse(kw, where))


def build_compose(part: dict | None, where: str) -> T.Compose:
    if part is None:
        return T.Compose([])
    if not isinstance(part, dict):
        raise ConfigError(f"{where} must be a mapping of transform names, got {part!r}")
    ops = []
    for name, args in part.items():
        if args is None:
            continue
        try:
            ops.append(_build_one(name, args, f"{where}.{name}"))
        except TypeError as e:
            raise ConfigError(f"{where}.{name}: bad arguments ({e})") from None
    return T.Compose(ops)


def _device_normalize(remaining: dict | None, where: str):
    """(mean, std) when ``remaining`` is exactly to_tensor + normalize, else None."""
    if not isinstance(remaining, dict):
        return None
    names = [k for k, v in remaining.items() if v is not None]
    if names == ["to_tensor", "normalize"] and remaining["to_tensor"]:
        schema.parse_entry("to_tensor", remaining["to_tensor"], f"{where}.to_tensor")
        norm = schema.parse_entry("normalize", remaining["normalize"], f"{where}.normalize")
        return norm["mean"], norm["std"]
    return None


class ImageTransform:
    """HWC uint8 numpy image -> tensor, for one part of ``transform`` (train, test, aug).

    ``pre`` and ``primary`` act on PIL images. With device normalisation (``mean`` set) the
    output is a uint8 CHW tensor; otherwise the configured ``remaining`` produces it.
    """

    def __init__(self, section: dict | None, where: str, pre: dict | None = None):
        section = section or {}
        self.section, self.where = section, where  # the fast path builds its batched version
        self.pre = build_compose(pre if pre is not None else section.get("pre"), f"{where}.pre")
        self.primary = build_compose(section.get("primary"), f"{where}.primary")
        norm = _device_normalize(section.get("remaining"), f"{where}.remaining")
        if norm is not None:
            self.mean, self.std = norm
            self.remaining = None
        else:
            self.mean = self.std = None
            self.remaining = build_compose(section.get("remaining"), f"{where}.remaining")

    @property
    def has_pre(self) -> bool:
        return len(self.pre.transforms) > 0

    def apply_pre(self, img: np.ndarray) -> np.ndarray:
        return np.array(self.pre(Image.fromarray(img))) if self.has_pre else img

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        pil = Image.fromarray(img)
        pil = self.primary(pil)
        if self.remaining is None:
            arr = np.asarray(pil, dtype=np.uint8)
            if arr.ndim == 2:
                arr = np.repeat(arr[:, :, None], 3, axis=2)
            return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        out = self.remaining(pil)
        if not isinstance(out, torch.Tensor):
            raise ConfigError("transform remaining must end in to_tensor (got a non-tensor)")
        return out

    def __repr__(self):
        rem = f"device normalize(mean={self.mean}, std={self.std})" if self.mean else self.remaining
        return f"pre={self.pre}\nprimary={self.primary}\nremaining={rem}"


class Normalizer:
    """Turn a batch from the loader into normalised float on the device.

    uint8 batches are normalised here ((x - 255·mean) / (255·std), same as ToTensor + Normalize);
    float batches were normalised per image already and only move.
    """

    def __init__(self, mean, std, device):
        self.device = device
        if mean is None:
            self.mean = self.std = None
        else:
            self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
            self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, x: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            if self.mean is None:
                raise RuntimeError("uint8 batch without normalisation constants")
            x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=memory_format)


def transform_for(cfg: dict, part: str) -> ImageTransform:
    """The config's ``transform.<part>`` section (``train``, ``test``, ``aug``), after
    ``transform.pre``."""
    t = cfg.get("transform") or {}
    if part not in t:
        raise ConfigError(f"config has no 'transform.{part}' section")
    return ImageTransform(t.get(part), f"transform.{part}", pre=t.get("pre"))
