"""Optimisers and schedulers from config sections such as ``optimizer: {SGD: {lr: 0.1}}``."""

from __future__ import annotations

import torch

from .errors import ConfigError


def _one(section, where):
    if not isinstance(section, dict) or len(section) != 1:
        raise ConfigError(f"{where}: expected exactly one name, e.g. {where}: {{SGD: {{lr: 0.1}}}}")
    name, kw = next(iter(section.items()))
    return name, dict(kw or {})


def build_optimizer(section: dict, params, where: str = "optimizer",
                    options: dict | None = None) -> torch.optim.Optimizer:
    """``options`` (e.g. ``Speed.optimizer_options()``: foreach or fused) only pick the
    implementation; the config's own ``foreach``/``fused`` keys win."""
    name, kw = _one(section, where)
    if options and not {"foreach", "fused"} & set(kw):
        kw = {**kw, **options}
    classes = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
    if name not in classes:
        raise ConfigError(f"{where}: '{name}' is not supported ({', '.join(classes)})")
    lr = kw.get("lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"{where}.{name}.lr must be a positive number, got {lr!r}")
    try:
        return classes[name](params, **kw)
    except TypeError as e:
        raise ConfigError(f"{where}.{name}: bad arguments ({e})") from None


def build_scheduler(section: dict | None, optimizer, where: str = "lr_scheduler"):
    if section is None:
        return None
    name, kw = _one(section, where)
    classes = {"multi_step": torch.optim.lr_scheduler.MultiStepLR,
               "cosine_annealing": torch.optim.lr_scheduler.CosineAnnealingLR}
    if name not in classes:
        raise ConfigError(f"{where}: '{name}' is not supported ({', '.join(classes)})")
    try:
        return classes[name](optimizer, **kw)
    except TypeError as e:
        raise ConfigError(f"{where}.{name}: bad arguments ({e})") from None
