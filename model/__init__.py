"""Networks built from the config's ``network`` section."""

from __future__ import annotations

from utils.config import num_classes_of
from utils.errors import ConfigError
from utils.schema import NetworkArgs, parse

from .model import LinearModel, SelfModel
from .resnet_cifar import ResNetCIFAR, resnet18_cifar
from .resnet_imagenet import ResNetImageNet, resnet18_imagenet

__all__ = ["LinearModel", "SelfModel", "ResNetCIFAR", "ResNetImageNet", "resnet18_cifar",
           "resnet18_imagenet", "build_backbone", "build_linear_model"]

_NETWORKS = {"resnet18_cifar": resnet18_cifar, "resnet18_imagenet": resnet18_imagenet}


def build_backbone(network_cfg: dict):
    if not isinstance(network_cfg, dict) or len(network_cfg) != 1:
        raise ConfigError("network: expected exactly one network name, e.g. resnet18_cifar")
    name, kw = next(iter(network_cfg.items()))
    if name not in _NETWORKS:
        raise ConfigError(f"network: '{name}' is not supported (supported: {', '.join(_NETWORKS)})")
    args = parse(NetworkArgs, kw, f"network.{name}")  # the head's classes: num_classes_of
    return _NETWORKS[name](width=args.width)


def build_linear_model(cfg: dict) -> LinearModel:
    backbone = build_backbone(cfg.get("network"))
    return LinearModel(backbone, backbone.feature_dim, num_classes_of(cfg))
