"""The poisoning that comes with a dataset someone else made (``dataset: poisoned``,
``data.poisoned_set``): its training images are stored already triggered and relabelled,
its triggered test images already triggered, so this attack stamps nothing. Its poisoned
samples are the set's own flags (none known: none flagged)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.errors import ConfigError

from .base import Attack


class Given(Attack):
    """Identity: ``backdoor: {given: {}, target_label: T, poison_ratio: 0}``."""

    name = "given"

    @classmethod
    def from_config(cls, sub: dict, root: Path | None = None, resize: bool = False) -> Given:
        if sub:
            raise ConfigError("backdoor.given takes no settings: the dataset holds the "
                              f"poisoning (got '{next(iter(sub))}')")
        return cls()

    def apply(self, images: np.ndarray) -> np.ndarray:
        return np.array(images, copy=True)

    def check(self, cfg: dict) -> None:
        kind = cfg.get("dataset")
        if kind != "poisoned":
            raise ConfigError("backdoor.given goes with dataset: poisoned (a poisoned set "
                              "made elsewhere; docs/usage.md, \"Your own poisoned data\")")

    def __repr__(self):
        return "Given(the dataset's own poisoning)"
