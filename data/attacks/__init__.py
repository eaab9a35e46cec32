"""The backdoor attacks, one class each with the surface of ``base.Attack``, and the registry
that builds the one a config's ``backdoor`` section names.

    attack = build_attack(cfg["backdoor"], REPO_ROOT)   # exactly one of ATTACKS configured
    attack(images)                                      # the trigger, uint8 HWC or NHWC

``data.build.backdoor_for`` adds the run's saved artefacts (``restore``); ``build_poison_train``
runs ``prepare``; ``load_poison_data`` runs ``check``.
"""

from __future__ import annotations

from pathlib import Path

from utils.errors import ConfigError, UserError, one_line

from .badnets import BadNets
from .base import Attack, Prepared
from .blend import Blend
from .given import Given
from .label_consistent import LabelConsistent
from .poison import gen_poison_idx
from .sig import SIG
from .wanet import WaNet

ATTACK_TYPES: dict[str, type[Attack]] = {
    cls.name: cls for cls in (BadNets, Blend, WaNet, LabelConsistent, SIG, Given)}
ATTACKS = tuple(ATTACK_TYPES)

__all__ = ["ATTACKS", "ATTACK_TYPES", "Attack", "BadNets", "Blend", "Given", "LabelConsistent",
           "Prepared", "SIG", "WaNet", "attack_name", "build_attack", "gen_poison_idx",
           "image_folder_attacks", "poisons_target_class", "unavailable"]


def attack_name(bd_cfg: dict) -> str:
    """Which attack the ``backdoor`` section configures (exactly one of ``ATTACKS``)."""
    names = [k for k in ATTACKS if bd_cfg.get(k) is not None]
    if len(names) != 1:
        raise ConfigError(f"backdoor: exactly one of {', '.join(map(repr, ATTACKS))} must be "
                          "configured")
    return names[0]


def poisons_target_class(bd_cfg: dict) -> bool:
    """The poison-index rule of the configured attack, read without building it: True when it
    poisons the target class (label-consistent), False when the other classes."""
    return any(cls.clean_label for name, cls in ATTACK_TYPES.items()
               if bd_cfg.get(name) is not None)


def image_folder_attacks() -> tuple[str, ...]:
    """The attacks that run on ``dataset: imagefolder``."""
    return tuple(name for name, cls in ATTACK_TYPES.items() if cls.supports_image_folders)


def build_attack(bd_cfg: dict, root: Path | None = None, resize: bool = False) -> Attack:
    """The attack named in the config's ``backdoor`` section. ``root``: where relative paths
    (triggers, the clean model's config) are looked up when they do not exist from the working
    directory; ``resize``: BadNets triggers follow the image size (image-folder datasets)."""
    name = attack_name(bd_cfg)
    if not isinstance(bd_cfg[name], dict):
        raise ConfigError(f"backdoor.{name} must be a mapping of its settings")
    return ATTACK_TYPES[name].from_config(bd_cfg[name], root, resize)


def unavailable(bd_cfg: dict, root: Path | None = None) -> str | None:
    """Why the attack a ``backdoor`` section names cannot be built here (a trigger image to
    fetch, say), or None when it can."""
    try:
        build_attack(bd_cfg, root)
    except UserError as e:
        return one_line(e)
    return None
