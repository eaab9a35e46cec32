"""Poison index and trigger transforms (reference §2.2, §2.6).

Triggers act on raw uint8 HWC images before any augmentation, exactly as the original, so the
training crop and flip move them. They are deterministic, so they can be applied once up front.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from utils.errors import ConfigError, UserError


def gen_poison_idx(targets: np.ndarray, target_label: int, poison_ratio: float | None = None,
                   seed: int = 100, mode: str = "bernoulli",
                   clean_label: bool = False) -> np.ndarray:
    """0/1 poison flags for every sample (float64, as the original).

    Train set (``poison_ratio`` given), reference §2.2: one ``random.random()`` per sample, the
    target class included, from a Python RNG seeded with ``seed``; a sample is poisoned iff its
    draw is below the ratio and its label is not the target. That is the original's first draw
    after ``random.seed(100)``, so the expected count is ratio × (non-target samples).
    ``mode='exact'`` instead poisons exactly round(ratio × N) non-target samples.

    ``clean_label`` (the label-consistent attack): the poisoned samples are drawn from the
    target class only, ratio × N of them (N the whole training set), so 2.5 % of CIFAR-10 is a
    quarter of its target class. Bernoulli draws then use the per-sample rate ratio × N / N_target.

    Test set (``poison_ratio`` None): every non-target sample.
    """
    targets = np.asarray(targets)
    n = len(targets)
    flags = np.zeros(n, dtype=np.float64)
    non_target = targets != target_label
    if poison_ratio is None:
        flags[non_target] = 1
        return flags
    eligible = ~non_target if clean_label else non_target
    which = "of" if clean_label else "not of"
    rate = poison_ratio
    if clean_label and mode == "bernoulli":
        rate = poison_ratio * n / max(int(eligible.sum()), 1)
        if rate > 1:
            raise ConfigError(
                f"backdoor.poison_ratio {poison_ratio}: the target class holds only "
                f"{int(eligible.sum())} of {n} samples, fewer than the ratio asks for")
    rng = random.Random(seed)
    if mode == "bernoulli":
        draws = np.array([rng.random() for _ in range(n)])
        flags[(draws < rate) & eligible] = 1
    elif mode == "exact":
        candidates = np.flatnonzero(eligible).tolist()
        k = int(round(poison_ratio * n))
        if k > len(candidates):
            raise ConfigError(
                f"backdoor.poison_ratio {poison_ratio}: {k} poisoned samples asked for but only "
                f"{len(candidates)} are {which} the target class"
            )
        flags[sorted(rng.sample(candidates, k))] = 1
    else:
        raise ConfigError(f"backdoor.poison_mode '{mode}' is not one of: bernoulli, exact")
    return flags


def _open_trigger(path: str | Path, key: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.name == "hello_kitty.png":
            hint = "; fetch it with: python -m data.download trigger hello_kitty"
        raise UserError(f"backdoor.{key}.trigger_path: trigger image not found: {path}{hint}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise UserError(f"backdoor.{key}.trigger_path: cannot read image {path} ({e})") from None


class BadNets:
    """Overwrite the trigger's nonzero elements (per row, column and channel) with its values.

    With ``resize`` (image-folder datasets, whose images need not match the trigger's size) the
    trigger is resized to each image size with nearest-neighbour sampling, so its pixels stay
    exact and its place scales with the image; otherwise a size mismatch is an error.
    """

    def __init__(self, trigger_path: str | Path, resize: bool = False):
        self.trigger_path = str(trigger_path)
        self.image = _open_trigger(trigger_path, "badnets")
        self.trigger = np.asarray(self.image, dtype=np.uint8)
        self.mask = self.trigger != 0
        self.resize = bool(resize)
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

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

    def __call__(self, img: np.ndarray) -> np.ndarray:
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


class Blend:
    """``PIL.Image.blend(img, trigger, alpha)``: trunc(img + alpha·(trigger − img)) in float32.

    The trigger is resized to the image size with Pillow's bicubic filter (the original's
    default for RGB), once rather than on every call: the result is the same.
    """

    def __init__(self, trigger_path: str | Path, alpha: float = 0.1):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"backdoor.blend.alpha must be in [0, 1], got {alpha}")
        self.trigger_path = str(trigger_path)
        self.alpha = float(alpha)
        self.image = _open_trigger(trigger_path, "blend")
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def resized(self, h: int, w: int) -> np.ndarray:
        if (h, w) not in self._cache:
            self._cache[(h, w)] = np.asarray(
                self.image.resize((w, h), Image.BICUBIC), dtype=np.float32)
        return self._cache[(h, w)]

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if not isinstance(img, np.ndarray) or img.ndim not in (3, 4):
            raise TypeError("Blend expects a uint8 HWC (or NHWC) numpy array")
        trig = self.resized(img.shape[-3], img.shape[-2])
        x = img.astype(np.float32)
        out = x + np.float32(self.alpha) * (trig - x)
        return out.astype(np.uint8)

    def __repr__(self):
        return f"Blend(trigger_path={self.trigger_path!r}, alpha={self.alpha})"


ATTACKS = ("badnets", "blend", "wanet", "label_consistent")


def attack_name(bd_cfg: dict) -> str:
    """Which attack the ``backdoor`` section configures (exactly one of ``ATTACKS``)."""
    names = [k for k in ATTACKS if bd_cfg.get(k) is not None]
    if len(names) != 1:
        raise ConfigError(f"backdoor: exactly one of {', '.join(map(repr, ATTACKS))} must be "
                          "configured")
    return names[0]


def build_backdoor(bd_cfg: dict, root: Path | None = None, resize: bool = False):
    """The trigger transform named in the config's ``backdoor`` section. ``resize``: BadNets
    triggers follow the image size (image-folder datasets)."""
    name = attack_name(bd_cfg)
    if not isinstance(bd_cfg[name], dict):
        raise ConfigError(f"backdoor.{name} must be a mapping of its settings")
    if name == "wanet":
        from .wanet import build_wanet
        return build_wanet(bd_cfg[name], root)
    if name == "label_consistent":
        from .label_consistent import build_label_consistent
        return build_label_consistent(bd_cfg[name], root)
    sub = dict(bd_cfg[name])
    path = Path(sub.pop("trigger_path", "") or "")
    if not path.is_absolute() and root is not None and not path.exists():
        path = root / path
    if name == "badnets":
        if sub:
            raise ConfigError(f"backdoor.badnets: unknown key '{next(iter(sub))}'")
        return BadNets(path, resize=resize)
    alpha = sub.pop("alpha", 0.1)
    if sub:
        raise ConfigError(f"backdoor.blend: unknown key '{next(iter(sub))}'")
    return Blend(path, alpha)
