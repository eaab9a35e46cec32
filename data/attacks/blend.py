"""Blended (docs/original.md §2.6): the whole image moves ``alpha`` of the way to a trigger image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from utils.errors import ConfigError

from .base import Attack, open_trigger, resolve


class Blend(Attack):
    """``PIL.Image.blend(img, trigger, alpha)``: trunc(img + alpha·(trigger − img)) in float32.

    The trigger is resized to the image size with Pillow's bicubic filter (the original's
    default for RGB), once rather than on every call: the result is the same.
    """

    name = "blend"
    supports_image_folders = True

    def __init__(self, trigger_path: str | Path, alpha: float = 0.1):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"backdoor.blend.alpha must be in [0, 1], got {alpha}")
        self.trigger_path = str(trigger_path)
        self.alpha = float(alpha)
        self.image = open_trigger(trigger_path, "blend")
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def from_config(cls, sub: dict, root: Path | None = None, resize: bool = False) -> Blend:
        """The trigger is resized to every image size anyway: ``resize`` changes nothing."""
        sub = dict(sub)
        path = resolve(Path(sub.pop("trigger_path", "") or ""), root)
        alpha = sub.pop("alpha", 0.1)
        if sub:
            raise ConfigError(f"backdoor.blend: unknown key '{next(iter(sub))}'")
        return cls(path, alpha)

    def resized(self, h: int, w: int) -> np.ndarray:
        if (h, w) not in self._cache:
            self._cache[(h, w)] = np.asarray(
                self.image.resize((w, h), Image.BICUBIC), dtype=np.float32)
        return self._cache[(h, w)]

    def apply(self, img: np.ndarray) -> np.ndarray:
        if not isinstance(img, np.ndarray) or img.ndim not in (3, 4):
            raise TypeError("Blend expects a uint8 HWC (or NHWC) numpy array")
        trig = self.resized(img.shape[-3], img.shape[-2])
        x = img.astype(np.float32)
        out = x + np.float32(self.alpha) * (trig - x)
        return out.astype(np.uint8)

    def __repr__(self):
        return f"Blend(trigger_path={self.trigger_path!r}, alpha={self.alpha})"
