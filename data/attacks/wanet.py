"""WaNet (Nguyen & Tran, ICLR 2021): a fixed, smooth warping field is the trigger.

The field is a k×k×2 draw, uniform in [-1, 1], divided by its mean absolute value; upsampled
bicubically to the image size and scaled by s/H, it is added to the identity sampling grid,
(× grid_rescale) clamped to [-1, 1], and the image is resampled with ``grid_sample``. With k = 4
and s = 0.5 every pixel moves by a fraction of a pixel to about a pixel: invisible, but
learnable.

"Noise mode": besides the poisoned samples (warped, relabelled), cross_ratio × (poison count)
other samples are warped with the field plus a per-sample random perturbation of the grid and
keep their labels, so the network must learn the exact field rather than "any warp".

Warping is deterministic given the field, so like BadNets it is applied once, on the uint8 HWC
images before augmentation, and rounded back to uint8. The field depends only on (k, seed); it is
also written to a file that every stage and test.py read back when present
(``data.build.attack_dir``), so all of them use the same field even if the generator changed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import ConfigError, DatasetError

from .base import Attack, Prepared, resolve

_KEYS = {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0, "seed": 0, "field_path": None}


def draw_field(k: int, seed: int) -> np.ndarray:
    """The k×k×2 field as float32 [2, k, k] (x offsets, y offsets), mean |value| = 1."""
    field = np.random.RandomState(seed).uniform(-1.0, 1.0, size=(2, k, k))
    return (field / np.abs(field).mean()).astype(np.float32)


def load_field(path: Path, k: int) -> np.ndarray:
    try:
        field = np.load(path)
    except Exception as e:
        raise DatasetError(f"WaNet field {path} is unreadable ({type(e).__name__}: {e}); "
                           "delete it to draw it again from the seed") from None
    if field.shape != (2, k, k) or not np.isfinite(field).all():
        raise ConfigError(f"WaNet field {path} has shape {field.shape}, but backdoor.wanet.k = "
                          f"{k} needs (2, {k}, {k}); delete it or set k to match")
    return field.astype(np.float32)


def _save_atomic(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


class WaNet(Attack):
    """Warp uint8 HWC (or NHWC) images with the fixed field; ``warp_noisy`` for cross samples.

    ``restore`` reads the saved field; ``prepare`` saves it (or reads it when saved already) and
    adds the noise-mode samples."""

    name = "wanet"

    def __init__(self, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0,
                 cross_ratio: float = 2.0, seed: int = 0, field_path: str | Path | None = None):
        self.k, self.s, self.grid_rescale = int(k), float(s), float(grid_rescale)
        self.cross_ratio, self.seed = float(cross_ratio), int(seed)
        self.field_path = Path(field_path) if field_path else None
        self.field = draw_field(self.k, self.seed)
        self.source = f"drawn from seed {self.seed}"
        if self.field_path is not None and self.field_path.is_file():
            self._use(self.field_path)
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def from_config(cls, sub: dict, root: Path | None = None, resize: bool = False) -> WaNet:
        """Every key optional, defaults of the paper: k 4, s 0.5, grid_rescale 1, cross_ratio 2.
        Not for image folders: ``resize`` changes nothing."""
        unknown = set(sub) - set(_KEYS)
        if unknown:
            raise ConfigError(f"backdoor.wanet: unknown key '{sorted(unknown)[0]}' "
                              f"(known: {', '.join(_KEYS)})")
        kw = {**_KEYS, **sub}
        k = kw["k"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"backdoor.wanet.k must be a positive integer, got {k!r}")
        for key, low in (("s", 0.0), ("cross_ratio", 0.0)):
            v = kw[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < low:
                raise ConfigError(f"backdoor.wanet.{key} must be a number >= {low}, got {v!r}")
        r = kw["grid_rescale"]
        if not isinstance(r, (int, float)) or isinstance(r, bool) or r <= 0:
            raise ConfigError(f"backdoor.wanet.grid_rescale must be positive, got {r!r}")
        seed = kw["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"backdoor.wanet.seed must be a non-negative integer, got {seed!r}")
        path = kw["field_path"]
        if path is not None:
            path = resolve(Path(os.path.expanduser(str(path))), root)
        return cls(k, kw["s"], r, kw["cross_ratio"], seed, path)

    # -- the field file -------------------------------------------------------------------------
    def field_file(self, folder: Path | None) -> Path | None:
        """The explicit ``field_path``, else ``folder/wanet_field_k{k}_seed{seed}.npy``."""
        if self.field_path is not None:
            return self.field_path
        return None if folder is None else Path(folder) / f"wanet_field_k{self.k}_seed{self.seed}.npy"

    def _use(self, path: Path) -> None:
        self.field = load_field(path, self.k)
        self.source = str(path)
        self._grids = {}

    def restore(self, folder: Path | None) -> None:
        self.use_saved_field(folder)

    def use_saved_field(self, folder: Path | None) -> None:
        """Re-use the saved field when the file exists (nothing is written here)."""
        path = self.field_file(folder)
        if path is not None and path.is_file():
            self._use(path)

    def save_field(self, folder: Path | None) -> Path | None:
        """Write the field unless its file exists already (then re-use that one)."""
        path = self.field_file(folder)
        if path is None:
            return None
        if path.is_file():
            self._use(path)
        else:
            _save_atomic(self.field, path)
            self.source = str(path)
        return path

    # -- warping --------------------------------------------------------------------------------
    def grid(self, h: int, w: int) -> torch.Tensor:
        """The sampling grid [h, w, 2] (x, y in [-1, 1]) of the fixed warp."""
        if (h, w) not in self._grids:
            field = torch.from_numpy(self.field)[None]
            up = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True)[0]
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w),
                                    indexing="ij")
            # s/H along y and s/W along x: the same pixel-size warp in both directions
            offset = torch.stack([up[0] * (self.s / w), up[1] * (self.s / h)], dim=-1)
            grid = torch.stack([xs, ys], dim=-1) + offset
            self._grids[(h, w)] = (grid * self.grid_rescale).clamp(-1, 1)
        return self._grids[(h, w)]

    def _sample(self, images: np.ndarray, noise: np.ndarray | None = None,
                chunk: int = 512) -> np.ndarray:
        batch = images[None] if images.ndim == 3 else images
        n, h, w, _ = batch.shape
        base = self.grid(h, w)
        out = np.empty_like(batch)
        for i in range(0, n, chunk):
            x = torch.from_numpy(np.ascontiguousarray(batch[i:i + chunk])).permute(0, 3, 1, 2)
            grid = base.expand(len(x), h, w, 2)
            if noise is not None:
                grid = (grid + torch.from_numpy(noise[i:i + chunk])).clamp(-1, 1)
            y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros",
                              align_corners=True)
            y = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            out[i:i + chunk] = y.numpy()
        return out[0] if images.ndim == 3 else out

    def apply(self, img: np.ndarray) -> np.ndarray:
        """``img``: uint8 HWC or NHWC. Returns a new, warped array of the same shape."""
        if not isinstance(img, np.ndarray) or img.ndim not in (3, 4) or img.dtype != np.uint8:
            raise TypeError("WaNet expects a uint8 HWC (or NHWC) numpy array")
        return self._sample(img)

    def cross_index(self, poison_idx: np.ndarray) -> np.ndarray:
        """0/1 flags of the noise-mode samples: round(cross_ratio × poisoned) samples drawn,
        seeded, among the samples that are not poisoned."""
        poison_idx = np.asarray(poison_idx)
        flags = np.zeros(len(poison_idx), dtype=np.int64)
        candidates = np.flatnonzero(poison_idx == 0)
        n = min(int(round(self.cross_ratio * int(poison_idx.sum()))), len(candidates))
        if n > 0:
            rng = np.random.RandomState(self.seed + 1)
            flags[rng.choice(candidates, size=n, replace=False)] = 1
        return flags

    def warp_noisy(self, images: np.ndarray) -> np.ndarray:
        """Cross samples (uint8 NHWC): the fixed warp plus, per sample, a grid perturbation
        uniform in [-1, 1]/W (x) and /H (y), drawn once from a seeded generator."""
        if images.ndim != 4 or images.dtype != np.uint8:
            raise TypeError("warp_noisy expects a uint8 NHWC numpy array")
        n, h, w, _ = images.shape
        rng = np.random.RandomState(self.seed + 2)
        noise = rng.uniform(-1.0, 1.0, size=(n, h, w, 2)).astype(np.float32)
        noise /= np.array([w, h], dtype=np.float32)
        return self._sample(images, noise)

    def prepare(self, images: np.ndarray, targets: np.ndarray, poison_idx: np.ndarray,
                target_label: int, folder: Path) -> Prepared:
        """Save the field for the later stages; the noise-mode samples are warped too."""
        path = self.save_field(folder)
        cross = self.cross_index(poison_idx)
        logging.getLogger("dbd").info(
            f"WaNet: field {path}; {int(cross.sum())} noise-mode samples keep their labels")
        return Prepared(images, cross, self.warp_noisy)

    def __repr__(self):
        return (f"WaNet(k={self.k}, s={self.s}, grid_rescale={self.grid_rescale}, "
                f"cross_ratio={self.cross_ratio}, field {self.source})")
