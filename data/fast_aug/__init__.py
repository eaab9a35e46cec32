"""Batched augmentation on the device, with per-sample random parameters (docs/original.md §2.5).

``BatchTransform`` is built from the same YAML-shaped section as ``data.transforms.ImageTransform``
(``primary`` then ``remaining``; null entries skipped), with the same op names, arguments and
validation (``data.augment_schema``), and augments a whole uint8 batch ``[B, 3, H, W]`` at once,
on whatever device the batch lives on. Each op draws its parameters for every sample
separately — a torchvision transform given a batched tensor would draw one set for the whole
batch (STYLE: airbench).

The reference path is PIL + torchvision per image, and the aim is the same distribution of
images, so every op reproduces the PIL arithmetic it stands for (Pillow 13 sources): the
fixed-point two-pass resampling of ``Image.resize`` (Resample.c, ``resample.py``), the
truncating ``Image.blend`` behind ``ImageEnhance``, PIL's integer ``L`` conversion and uint8
HSV round trip (``colour.py``), and the extended box blur with which PIL approximates
``GaussianBlur`` (BoxBlur.c, ``blur.py``). Given the same parameters the result equals the
reference pixel for pixel (tests/test_fast_aug.py). Images are float32 holding the integers
0..255 between ops, as PIL holds uint8. Resampling and blurring multiply integer fixed-point
weights in float64 (on the CPU: split into two float32 halves whose sums stay below 2**24, see
``resample.py``), where every sum is exact, so the matrix products do not depend on summation
order or device, and TF32 cannot touch them. The HSV round trip of the hue shift is table
lookups built with PIL's float steps. Only ``to_tensor`` / ``normalize`` leave 0..255, with
torchvision's float32 operations (``tensor.py``).

Ops expose ``sample(n, generator, device, size=None)`` (per-sample parameters, first dimension
n; ``size`` is the (H, W) of the images, needed by random_crop and random_resize_crop) and
``apply(x, params)``, so parameters can be fixed in tests. Not reproduced (see
``unsupported_reason``): ops that ``data.augment_schema.OPS`` does not name, nearest
interpolation, negative padding, non-integer fill, ops after to_tensor.
"""

from __future__ import annotations

import torch

from utils.errors import ConfigError

from .base import Op, Unsupported
from .blur import GaussianBlur
from .colour import RandomColorJitter, RandomGrayscale
from .geometry import CenterCrop, RandomCrop, RandomHorizontalFlip, RandomResizedCrop, Resize
from .tensor import Normalize, ToTensor

__all__ = ["BatchTransform", "unsupported_reason", "CenterCrop", "GaussianBlur", "Normalize",
           "RandomColorJitter", "RandomCrop", "RandomGrayscale", "RandomHorizontalFlip",
           "RandomResizedCrop", "Resize", "ToTensor"]

# The batched implementation of every op of data.augment_schema.OPS.
_OPS = {cls.name: cls for cls in (RandomCrop, CenterCrop, RandomHorizontalFlip,
                                  RandomResizedCrop, Resize, RandomColorJitter, RandomGrayscale,
                                  GaussianBlur, ToTensor, Normalize)}


def _build_op(name: str, args, where: str) -> Op:
    if name not in _OPS:
        raise Unsupported(f"{where}: transformation '{name}' is not supported")
    return _OPS[name].from_entry(args, where)


def _build_ops(section, where: str) -> list[Op]:
    """Ops of ``primary`` then ``remaining`` in YAML order; raises Unsupported / ConfigError."""
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
            raise Unsupported(f"{where}: '{name}' after to_tensor is not supported")
    return ops


def unsupported_reason(section, where: str = "transform") -> str | None:
    """None if every op of ``section`` (primary and remaining) can run batched; otherwise a
    short string naming the first op or argument that cannot. A config that is merely invalid
    is not "unsupported": building a BatchTransform from it raises the ConfigError."""
    try:
        _build_ops(section, where)
    except Unsupported as e:
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
        except Unsupported as e:
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
