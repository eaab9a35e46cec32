"""Losses, built from a config section such as ``criterion: {sce: {alpha: 0.1, ...}}``."""

from __future__ import annotations

import torch.nn as nn

from utils.errors import ConfigError

from .mixmatch import MixMatchLoss
from .sce import RCELoss, SCELoss
from .simclr import SimCLRLoss

__all__ = ["MixMatchLoss", "RCELoss", "SCELoss", "SimCLRLoss", "build_criterion"]


def build_criterion(section: dict, where: str = "criterion") -> nn.Module:
    if not isinstance(section, dict) or len(section) != 1:
        raise ConfigError(f"{where}: expected exactly one loss name")
    name, kw = next(iter(section.items()))
    kw = dict(kw or {})
    factories = {"cross_entropy": nn.CrossEntropyLoss, "sce": SCELoss, "rce": RCELoss,
                 "simclr": SimCLRLoss, "mixmatch": MixMatchLoss}
    if name not in factories:
        raise ConfigError(f"{where}: loss '{name}' is not supported ({', '.join(factories)})")
    try:
        return factories[name](**kw)
    except TypeError as e:
        raise ConfigError(f"{where}.{name}: bad arguments ({e})") from None
