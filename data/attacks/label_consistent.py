"""Label-consistent backdoor (Turner, Tsipras & Madry 2019).

Only target-class training images are poisoned and they keep their (correct) labels. To make the
network rely on the trigger, their content is first made hard to classify: an L∞ PGD perturbation
(ε = 16/255 by default) against a model trained on clean data (``supervise.py`` with
``poison_ratio: 0``). Then a small black-and-white pattern is stamped in the four image corners
(mirrored, so a horizontal flip keeps it). At test time the pattern alone, on non-target images,
should turn them into the target.

The perturbation needs the clean model and a few hundred gradient steps per image, so it is
computed once and cached in ``data.build.attack_dir`` (``<saved_dir>/attacks``), in a file named
by a hash of everything it depends on (settings, clean checkpoint, images); every stage of the
attack (No Defense, SimCLR, fine-tuning) loads it from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.config import load_yaml
from utils.errors import ConfigError, DatasetError, UserError
from utils.setup import config_location, resume_path, run_dirs

from ..transforms import transform_for
from .base import Attack, Prepared, resolve

# 1 = white, 0 = black: a 3×3 checkerboard in the spirit of Turner et al.'s corner pattern (their
# exact pixels are not reproduced here; any pattern can be given in the config).
DEFAULT_PATTERN = [[1, 0, 1], [0, 1, 0], [1, 0, 1]]

_KEYS = {"clean_model_config": None, "clean_model_checkpoint": "latest_model.pt",
         "epsilon": 16, "steps": 100, "step_size": 2, "pattern": DEFAULT_PATTERN,
         "amplitude": 1.0, "batch_size": 256}

log = logging.getLogger("dbd")


def pgd_perturb(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, epsilon: float,
                steps: int, step_size: float, mean, std, device=None,
                batch_size: int = 256) -> np.ndarray:
    """L∞ PGD that raises the cross-entropy of ``model`` on the true ``labels``.

    ``images``: uint8 [N, H, W, 3]; ``epsilon`` and ``step_size`` in 0–255 pixel units; the
    model takes (x − mean) / std with x in [0, 1]. No random start: the result is deterministic.
    Returns uint8 [N, H, W, 3], rounded, so |x_adv − x| ≤ ε + 0.5 pixel units.
    """
    device = torch.device(device or "cpu")
    model = model.to(device).eval()
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    eps, alpha = float(epsilon) / 255, float(step_size) / 255
    out = np.empty_like(images)
    for i in range(0, len(images), batch_size):
        x0 = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)
        x0 = x0.permute(0, 3, 1, 2).float() / 255
        y = torch.as_tensor(labels[i:i + batch_size], dtype=torch.long, device=device)
        x = x0.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            loss = F.cross_entropy(model((x - m) / s), y)
            (grad,) = torch.autograd.grad(loss, x)
            x = x.detach() + alpha * grad.sign()
            x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp(0, 1)
        x = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        out[i:i + batch_size] = x.cpu().numpy()
    return out


def _hash_file(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LabelConsistent(Attack):
    """The corner trigger (``apply``) and the cached adversarial perturbation of the poisoned
    training images (``poison_train_images``, the ``prepare`` step). Poisons the target class
    (``clean_label``); ``check`` wants ``transform.pre`` null and the clean model trained."""

    name = "label_consistent"
    clean_label = True

    def __init__(self, clean_model_config: str | Path, clean_model_checkpoint: str = "latest_model.pt",
                 epsilon: float = 16, steps: int = 100, step_size: float = 2,
                 pattern=DEFAULT_PATTERN, amplitude: float = 1.0, batch_size: int = 256,
                 root: Path | None = None):
        self.clean_model_config = resolve(Path(os.path.expanduser(str(clean_model_config))), root)
        self.clean_model_checkpoint = str(clean_model_checkpoint)
        self.epsilon, self.steps, self.step_size = float(epsilon), int(steps), float(step_size)
        self.pattern = np.asarray(pattern, dtype=np.float32)
        self.amplitude = float(amplitude)
        self.batch_size = int(batch_size)
        self._corners: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_config(cls, sub: dict, root: Path | None = None,
                    resize: bool = False) -> LabelConsistent:
        """Not for image folders: ``resize`` changes nothing."""
        where = "backdoor.label_consistent"
        unknown = set(sub) - set(_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key '{sorted(unknown)[0]}' "
                              f"(known: {', '.join(_KEYS)})")
        kw = {**_KEYS, **sub}
        if not kw["clean_model_config"]:
            raise ConfigError(f"{where}.clean_model_config: name the supervise config of the clean "
                              "model (trained with backdoor.poison_ratio 0)")
        for key, low, high in (("epsilon", 0, 255), ("step_size", 0, 255), ("amplitude", 0, 1)):
            v = kw[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not low < v <= high:
                raise ConfigError(f"{where}.{key} must be in ({low}, {high}], got {v!r}")
        for key in ("steps", "batch_size"):
            v = kw[key]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{where}.{key} must be a positive integer, got {v!r}")
        try:
            pattern = np.asarray(kw["pattern"], dtype=np.float32)
        except (TypeError, ValueError):
            pattern = None
        if pattern is None or pattern.ndim not in (2, 3) or (pattern.ndim == 3 and pattern.shape[2] != 3) \
                or pattern.size == 0 or pattern.min() < 0 or pattern.max() > 1:
            raise ConfigError(f"{where}.pattern must be a 2-D list (rows of 0..1 values, 1 = white) "
                              f"or rows of RGB triples, got {kw['pattern']!r}")
        return cls(kw["clean_model_config"], kw["clean_model_checkpoint"], kw["epsilon"],
                   kw["steps"], kw["step_size"], pattern, kw["amplitude"], kw["batch_size"], root)

    # -- the trigger ----------------------------------------------------------------------------
    def corners(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(mask [h, w] bool, values [h, w, 3] float32): the pattern in each corner, mirrored
        left-right and top-bottom so that the four copies are symmetric."""
        if (h, w) not in self._corners:
            p = self.pattern if self.pattern.ndim == 3 else self.pattern[..., None].repeat(3, 2)
            ph, pw = p.shape[:2]
            if 2 * ph > h or 2 * pw > w:
                raise ConfigError(f"backdoor.label_consistent.pattern ({ph}x{pw}) does not fit "
                                  f"twice in a {h}x{w} image")
            mask = np.zeros((h, w), dtype=bool)
            values = np.zeros((h, w, 3), dtype=np.float32)
            for rows, flip_v in ((slice(0, ph), False), (slice(h - ph, h), True)):
                for cols, flip_h in ((slice(0, pw), False), (slice(w - pw, w), True)):
                    q = p[::-1] if flip_v else p
                    q = q[:, ::-1] if flip_h else q
                    values[rows, cols] = 255 * q
                    mask[rows, cols] = True
            self._corners[(h, w)] = mask, values
        return self._corners[(h, w)]

    def apply(self, img: np.ndarray) -> np.ndarray:
        """``img``: uint8 HWC or NHWC; the corner pixels move ``amplitude`` of the way to the
        pattern (1: replaced by it). Returns a new array."""
        if not isinstance(img, np.ndarray) or img.ndim not in (3, 4):
            raise TypeError("LabelConsistent expects a uint8 HWC (or NHWC) numpy array")
        mask, values = self.corners(img.shape[-3], img.shape[-2])
        out = img.copy()
        x = out[..., mask, :].astype(np.float32)
        x += np.float32(self.amplitude) * (values[mask] - x)
        out[..., mask, :] = np.clip(np.round(x), 0, 255).astype(np.uint8)
        return out

    # -- the clean model ------------------------------------------------------------------------
    def clean_model_paths(self) -> tuple[Path, Path]:
        """(clean config, clean checkpoint). A bare checkpoint name lives in the clean config's
        checkpoint folder (as test.py's --resume); a path is taken as it is."""
        cfg_path = self.clean_model_config
        if not cfg_path.is_file():
            raise UserError(f"backdoor.label_consistent.clean_model_config: the clean model's "
                            f"config {cfg_path} does not exist")
        _, ckpt_dir = run_dirs(load_yaml(cfg_path), *config_location(cfg_path))
        return cfg_path, resume_path(ckpt_dir, os.path.expanduser(self.clean_model_checkpoint))

    def prerequisite(self) -> tuple[Path, Path]:
        """The clean model the perturbation is computed against."""
        return self.clean_model_paths()

    def check(self, cfg: dict) -> None:
        if (cfg.get("transform") or {}).get("pre") is not None:
            raise ConfigError("backdoor.label_consistent: transform.pre must be null (the "
                              "perturbation is computed on the stored images)")
        self.check_clean_model()

    def check_clean_model(self) -> None:
        """The clean model must exist before any poisoned training set can be built."""
        cfg_path, ckpt = self.clean_model_paths()
        if not ckpt.is_file():
            raise UserError(
                f"label-consistent attack: the clean model checkpoint {ckpt} was not found; "
                f"train the clean model first: python supervise.py --config {cfg_path} "
                "--resume False")

    def load_clean_model(self):
        """(model in eval mode, mean, std, checkpoint path) from the clean run."""
        from model import build_linear_model
        from utils.checkpoint import load_checkpoint, load_model_state

        self.check_clean_model()
        cfg_path, ckpt_path = self.clean_model_paths()
        cfg = load_yaml(cfg_path)
        tf = transform_for(cfg, "test")
        if tf.mean is None:
            raise ConfigError(f"{cfg_path}: transform.test.remaining must be to_tensor + "
                              "normalize for the label-consistent PGD")
        model = build_linear_model(cfg)
        load_model_state(model, load_checkpoint(ckpt_path)["model_state_dict"], ckpt_path)
        return model.eval(), tf.mean, tf.std, ckpt_path

    # -- the poisoned training images -----------------------------------------------------------
    def prepare(self, images: np.ndarray, targets: np.ndarray, poison_idx: np.ndarray,
                target_label: int, folder: Path) -> Prepared:
        return Prepared(self.poison_train_images(images, targets, poison_idx, target_label, folder))

    def cache_file(self, folder: Path, images: np.ndarray, chosen: np.ndarray,
                   ckpt_path: Path) -> Path:
        h = hashlib.sha1()
        settings = {"epsilon": self.epsilon, "steps": self.steps, "step_size": self.step_size,
                    "n": len(images), "shape": list(images.shape[1:])}
        h.update(json.dumps(settings, sort_keys=True).encode())
        h.update(_hash_file(ckpt_path).encode())
        h.update(np.ascontiguousarray(chosen, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(images[chosen]).tobytes())
        return Path(folder) / f"label_consistent_{h.hexdigest()[:16]}.npz"

    def poison_train_images(self, images: np.ndarray, targets: np.ndarray,
                            poison_idx: np.ndarray, target_label: int,
                            cache_folder: Path) -> np.ndarray:
        """A copy of ``images`` whose poisoned rows carry the PGD perturbation (no trigger yet:
        the dataset stamps it, as for every attack). Loaded from the cache when present."""
        chosen = np.flatnonzero(np.asarray(poison_idx) == 1)
        out = images.copy()
        if len(chosen) == 0:
            return out
        wrong = chosen[np.asarray(targets)[chosen] != target_label]
        if len(wrong):
            raise ConfigError(f"label-consistent attack: {len(wrong)} poisoned samples are not "
                              f"of the target class {target_label} (a poison index of another "
                              "attack?)")
        self.check_clean_model()
        _, ckpt_path = self.clean_model_paths()
        path = self.cache_file(cache_folder, images, chosen, ckpt_path)
        if path.is_file():
            adv = self._load_cache(path, images, chosen)
            log.info(f"Label-consistent: loaded {len(chosen)} perturbed images from {path}")
        else:
            model, mean, std, ckpt_path = self.load_clean_model()
            device = (torch.device("cuda", torch.cuda.current_device())
                      if torch.cuda.is_available() else torch.device("cpu"))
            log.info(f"Label-consistent: PGD (eps {self.epsilon:g}/255, {self.steps} steps of "
                     f"{self.step_size:g}/255) on {len(chosen)} images against {ckpt_path}")
            adv = pgd_perturb(model, images[chosen], np.asarray(targets)[chosen], self.epsilon,
                              self.steps, self.step_size, mean, std, device, self.batch_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, images=adv, indices=chosen, n_train=len(images))
            os.replace(tmp, path)
            log.info(f"Label-consistent: saved the perturbed images to {path}")
        out[chosen] = adv
        return out

    @staticmethod
    def _load_cache(path: Path, images: np.ndarray, chosen: np.ndarray) -> np.ndarray:
        try:
            with np.load(path) as z:
                adv, idx, n = z["images"], z["indices"], int(z["n_train"])
        except Exception as e:
            raise DatasetError(f"label-consistent cache {path} is unreadable "
                               f"({type(e).__name__}: {e}); delete it to recompute") from None
        if n != len(images) or not np.array_equal(idx, chosen) \
                or adv.shape != (len(chosen), *images.shape[1:]):
            raise DatasetError(f"label-consistent cache {path} holds {len(idx)} images of a "
                               f"{n}-image training set, but this one has {len(chosen)} poisoned "
                               f"of {len(images)}; delete it to recompute")
        return adv

    def __repr__(self):
        return (f"LabelConsistent(clean_model_config={str(self.clean_model_config)!r}, "
                f"clean_model_checkpoint={self.clean_model_checkpoint!r}, "
                f"epsilon={self.epsilon:g}/255, steps={self.steps}, "
                f"step_size={self.step_size:g}/255, pattern {self.pattern.shape[0]}x"
                f"{self.pattern.shape[1]} in the four corners, amplitude={self.amplitude})")
