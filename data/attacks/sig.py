"""SIG (Barni, Kallas & Tondi 2019, "A new backdoor attack in CNNs by training set corruption
without label poisoning"): a horizontal sinusoid added to the image.

A clean-label attack: only target-class training images carry the signal and they keep their
(correct) labels; at test time the same signal on a non-target image should turn it into the
target. The poisoned count follows the label-consistent rule of ``gen_poison_idx``: ratio × N
samples (N the whole training set), all of the target class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.errors import ConfigError

from .base import Attack

_KEYS = {"delta": 20, "frequency": 6}
_CHUNK = 1024  # images per float64 block of a batch (bounds the temporary memory)


class SIG(Attack):
    """The signal v(i, j) = Δ·sin(2π·j·f / m) over the columns j = 0 … m − 1 of an m-column
    image, the same for every row i and channel, added to the image.

    Defaults Δ = 20 and f = 6: the sinusoidal signal of Barni et al. 2019, and the defaults of
    the NAD reference code (bboylyg/NAD, ``plant_sin_trigger(img, delta=20, f=6)``, citing the
    paper) that BackdoorBench's SIG is based on. BackdoorBench (``utils/bd_img_transform/sig.py``)
    adds the same sinusoid, with ``sig_delta: 40``, ``sig_f: 6`` and ``pratio: 0.1`` in its
    default config (``config/attack/sig/default.yaml``).

    Arithmetic: in float64, x + v, clipped to [0, 255], then rounded to the nearest integer
    (NumPy's ``rint``, ties to even) and stored as uint8. BackdoorBench instead truncates
    (``np.uint8`` of the clipped float), which can differ by one grey level.

    Works per image of any size (m is the image's width), so it runs on image folders too.
    """

    name = "sig"
    clean_label = True
    supports_image_folders = True

    def __init__(self, delta: float = 20, frequency: float = 6):
        for key, v in (("delta", delta), ("frequency", frequency)):
            if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool) \
                    or not np.isfinite(v):
                raise ConfigError(f"backdoor.sig.{key} must be a number, got {v!r}")
        if not 0 < delta <= 255:
            raise ConfigError(f"backdoor.sig.delta must be in (0, 255] (pixel units), got {delta!r}")
        if not frequency > 0:
            raise ConfigError(f"backdoor.sig.frequency must be positive (cycles across the image "
                              f"width), got {frequency!r}")
        self.delta = float(delta)
        self.frequency = float(frequency)
        self._signals: dict[int, np.ndarray] = {}

    @classmethod
    def from_config(cls, sub: dict, root: Path | None = None, resize: bool = False) -> SIG:
        """Every key optional: ``delta`` (20) and ``frequency`` (6). No files: ``root`` and
        ``resize`` change nothing."""
        unknown = set(sub) - set(_KEYS)
        if unknown:
            raise ConfigError(f"backdoor.sig: unknown key '{sorted(unknown)[0]}' "
                              f"(known: {', '.join(_KEYS)})")
        kw = {**_KEYS, **sub}
        return cls(kw["delta"], kw["frequency"])

    def signal(self, width: int) -> np.ndarray:
        """v over the columns of a ``width``-column image, float64 [width, 1] (broadcasts over
        rows of HWC images and channels)."""
        if width not in self._signals:
            j = np.arange(width, dtype=np.float64)
            v = self.delta * np.sin(2 * np.pi * j * self.frequency / width)
            self._signals[width] = v[:, None]
        return self._signals[width]

    def apply(self, img: np.ndarray) -> np.ndarray:
        """``img``: uint8 HWC or NHWC; returns a new uint8 array of the same shape."""
        if not isinstance(img, np.ndarray) or img.ndim not in (3, 4):
            raise TypeError("SIG expects a uint8 HWC (or NHWC) numpy array")
        v = self.signal(img.shape[-2])
        if img.ndim == 3:
            return np.rint(np.clip(img + v, 0, 255)).astype(np.uint8)
        out = np.empty(img.shape, dtype=np.uint8)
        for i in range(0, len(img), _CHUNK):
            out[i:i + _CHUNK] = np.rint(np.clip(img[i:i + _CHUNK] + v, 0, 255))
        return out

    def __repr__(self):
        return f"SIG(delta={self.delta:g}, frequency={self.frequency:g})"
