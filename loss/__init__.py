"""Losses, built from a config section such as ``criterion: {sce: {alpha: 0.1, ...}}``."""

from __future__ import annotations

import torch.nn as nn

from utils.errors import ConfigError

from .ce import CrossEntropyLoss
from .mixmatch import MixMatchLoss
from .sce import RCELoss, SCELoss
from .simclr import SimCLRLoss

__all__ = ["CrossEntropyLoss", "MixMatchLoss", "RCELoss", "SCELoss", "SimCLRLoss",
           "build_criterion"]


def build_criterion(section: dict, where: str = "criterion",
                    num_classes: int | None = None) -> nn.Module:
    """The loss a section names; ``num_classes`` (the config's, ``utils.config.num_classes_of``)
    is given to the losses that take it when the section does not."""
    if not isinstance(section, dict) or len(section) != 1:
        raise ConfigError(f"{where}: expected exactly one loss name")
    name, kw = next(iter(section.items()))
    kw = dict(kw or {})
    factories = {"cross_entropy": CrossEntropyLoss, "sce": SCELoss, "rce": RCELoss,
                 "simclr": SimCLRLoss, "mixmatch": MixMatchLoss}
    if name not in factories:
        raise ConfigError(f"{where}: loss '{name}' is not supported ({', '.join(factories)})")
    if num_classes is not None and name in ("sce", "rce") and kw.get("num_classes") is None:
        kw["num_classes"] = num_classes
    try:
        return factories[name](**kw)
    except TypeError as e:
        raise ConfigError(f"{where}.{name}: bad arguments ({e})") from None
