"""BadNets (docs/original.md §2.6): a fixed patch overwrites part of the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from utils.errors import ConfigError, UserError

from .base import Attack, open_trigger, resolve


class BadNets(Attack):
    """Overwrite the trigger's nonzero elements (per row, column and channel) with its values.

    With ``resize`` (image-folder datasets, whose images need not match the trigger's size) the
    trigger is resized to each image size with nearest-neighbour sampling, so its pixels stay
    exact and its place scales with the image; otherwise a size mismatch is an error.
    """

    name = "badnets"
    supports_image_folders = True

    def __init__(self, trigger_path: str | Path, resize: bool = False):
        self.trigger_path = str(trigger_path)
        self.image = open_trigger(trigger_path, "badnets")
        self.trigger = np.asarray(self.image, dtype=np.uint8)
        self.mask = self.trigger != 0
        self.resize = bool(resize)
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_config(cls, sub: dict, root: Path | None = None, resize: bool = False) -> BadNets:
        sub = dict(sub)
        path = resolve(Path(sub.pop("trigger_path", "") or ""), root)
        if sub:
            raise ConfigError(f"backdoor.badnets: unknown key '{next(iter(sub))}'")
        return cls(path, resize=resize)

    def _for_size(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        if (h, w) == self.trigger.shape[:2]:
            return self.trigger, self.mask
        if not self.resize:
            raise UserError(
                f"backdoor.badnets.trigger_path: trigger {self.trigger_path} is "
                f"{self.trigger.shape[1]}x{self.trigger.shape[0]} but images are {w}x{h}"
            )
        if (h, w) not in self._cache:
            trig = np.asarray(self.image.resize((w, h), Image.NEAREST), dtype=np.uint8)
            self._cache[(h, w)] = trig, trig != 0
        return self._cache[(h, w)]

    def apply(self, img: np.ndarray) -> np.ndarray:
        """``img``: uint8 HWC, or a batch NHWC. Returns a new array."""
        if not isinstance(img, np.ndarray) or img.ndim not in (3, 4):
            raise TypeError("BadNets expects a uint8 HWC (or NHWC) numpy array")
        trigger, mask = self._for_size(img.shape[-3], img.shape[-2])
        out = img.copy()
        out[..., mask] = 0
        out += trigger * mask
        return out

    def __repr__(self):
        return f"BadNets(trigger_path={self.trigger_path!r})"
