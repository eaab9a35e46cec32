"""What every attack offers: the trigger transform, its poison-index rule, its set-up steps.

An attack is built from its ``backdoor.<name>`` mapping (``from_config``) and then used as

- ``attack(images)`` / ``attack.apply(images)``: the trigger on a uint8 HWC image or an NHWC
  batch, returning a new array. Triggers act on the stored images before any augmentation
  (docs/original.md §2.6), so the datasets apply them once, up front;
- ``clean_label``: the poison-index rule. False: the poisoned samples are drawn among the
  non-target samples and relabelled; True: among the target class, labels kept
  (``data.attacks.poison.gen_poison_idx``);
- ``supports_image_folders``: whether it runs on ``dataset: imagefolder`` (decoded lazily, so
  no set-up over the whole training set);
- ``check(cfg)``: what the attack needs of the rest of the config and of earlier runs, checked
  before a stage writes anything;
- ``prerequisite()``: a run the attack needs before any poisoned set can be built (the
  label-consistent attack's clean model), as (its supervise config, its checkpoint), so that
  dbd.py trains it first;
- ``restore(folder)``: re-use artefacts an earlier stage saved in ``folder`` (nothing written);
- ``prepare(images, targets, poison_idx, target_label, folder)``: the training set's set-up,
  saving its artefacts in ``folder``; returns the images to stamp and any noise-mode samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from utils.errors import UserError


@dataclass
class Prepared:
    """The training set as an attack leaves it before the trigger is stamped: ``images``, and
    optionally ``cross_idx`` (0/1) samples that ``cross_transform`` changes but that keep their
    labels (WaNet's noise mode)."""

    images: np.ndarray
    cross_idx: np.ndarray | None = None
    cross_transform: Callable[[np.ndarray], np.ndarray] | None = None


class Attack:
    """The defaults: a poison-label attack with nothing to check, restore or prepare."""

    name: str = ""
    clean_label: bool = False
    supports_image_folders: bool = False

    @classmethod
    def from_config(cls, sub: dict, root: Path | None = None, resize: bool = False) -> Attack:
        """From the config's ``backdoor.<name>`` mapping; relative paths that do not exist from
        the working directory are taken from ``root`` (the repository)."""
        raise NotImplementedError

    def apply(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.apply(images)

    def check(self, cfg: dict) -> None:
        """Raise ConfigError / UserError when the rest of ``cfg`` does not suit the attack."""

    def prerequisite(self) -> tuple[Path, Path] | None:
        """(supervise config, checkpoint) of a run to train before this attack, or None."""
        return None

    def restore(self, folder: Path | None) -> None:
        """Re-use what an earlier stage saved in ``folder``."""

    def prepare(self, images: np.ndarray, targets: np.ndarray, poison_idx: np.ndarray,
                target_label: int, folder: Path) -> Prepared:
        return Prepared(images)


def resolve(path: Path, root: Path | None) -> Path:
    """``path`` as given when it exists or is absolute, else relative to ``root``."""
    if not path.is_absolute() and root is not None and not path.exists():
        return root / path
    return path


def open_trigger(path: str | Path, key: str) -> Image.Image:
    """The trigger image at ``path`` as RGB; ``key`` names the attack in the error."""
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
