"""From a config to datasets and loaders: subsets, the poison index, triggers, transforms."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from utils.config import num_classes_of, seed_settings
from utils.errors import ConfigError
from utils.paths import REPO_ROOT
from utils.schema import Backdoor, Loader, parse

from .attacks import (
    Attack,
    build_attack,
    gen_poison_idx,
    image_folder_attacks,
    poisons_target_class,
)
from .cifar import CLASSES, balanced_subset, check_dataset_kind, load_cifar10
from .dataset import PoisonLabelDataset, clean_set, poison_test_set
from .fast import FastLoader, fast_eval_loader, fast_loader, fast_path_problem
from .imagefolder import (
    ImageFolderPoisonDataset,
    ImageFolderSource,
    imagefolder_options,
    load_imagefolder,
)
from .sampler import ShardedBatchSampler, shard
from .transforms import ImageTransform, transform_for

__all__ = ["REPO_ROOT"]  # re-exported: where relative trigger and config paths are found


def backdoor_settings(cfg: dict) -> Backdoor:
    """The ``backdoor`` section (``utils.schema.Backdoor``; the attack's own mapping is checked
    by ``data.attacks``), its target a class of this dataset."""
    bd = cfg.get("backdoor")
    if not isinstance(bd, dict):
        raise ConfigError("config has no 'backdoor' section")
    num_classes = num_classes_of(cfg)
    target = bd.get("target_label")
    if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < num_classes:
        raise ConfigError(
            f"backdoor.target_label must be a class index in [0, {num_classes - 1}], got {target!r}")
    return parse(Backdoor, bd, "backdoor", extra=True)


def class_names(cfg: dict) -> list[str]:
    """The classes' names, in label order: CIFAR-10's, or an image folder's class folders."""
    if check_dataset_kind(cfg) == "imagefolder":
        return list(load_imagefolder(cfg["dataset_dir"], False, num_classes_of(cfg)).classes)
    return list(CLASSES)


def load_split(cfg: dict, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10 split, reduced to the seeded class-balanced subset when configured.

    Subsets are taken before poisoning, so the poison index is drawn over the subset. For
    ``dataset: imagefolder`` the "images" are an ``ImageFolderSource`` (files, decoded lazily).
    """
    if check_dataset_kind(cfg) == "imagefolder":
        images = load_imagefolder(cfg["dataset_dir"], train, num_classes_of(cfg))
        targets = images.targets
    else:
        images, targets = load_cifar10(cfg["dataset_dir"], train)
    key = "train_subset" if train else "test_subset"
    n = cfg.get(key)
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {n!r}")
        seed = seed_settings(cfg).seed
        idx = balanced_subset(targets, n, seed + (0 if train else 1), num_classes_of(cfg))
        images = images.subset(idx) if isinstance(images, ImageFolderSource) else images[idx]
        targets = targets[idx]
    return images, targets


def poison_index(cfg: dict, targets: np.ndarray, saved_dir: Path | None, log,
                 reuse: bool = True, write: bool = True) -> np.ndarray:
    """Draw the training poison index once and save it to ``saved_dir/poison_idx.npy``.

    When the file already exists (a resumed run) and ``reuse`` is set, it is loaded instead, so
    the index saved is always the index used (docs/differences.md #1).
    """
    s = backdoor_settings(cfg)
    path = None if saved_dir is None else Path(saved_dir) / "poison_idx.npy"
    if reuse and path is not None and path.is_file():
        idx = np.load(path)
        if len(idx) != len(targets):
            raise ConfigError(f"{path} has {len(idx)} entries but the training set has "
                              f"{len(targets)}: it belongs to another dataset or subset")
        log(f"Load poisoned index from {path}")
    else:
        seed = seed_settings(cfg).seed
        # the attack's poison-index rule: label-consistent and SIG poison target-class samples only
        idx = gen_poison_idx(targets, s.target_label, s.poison_ratio, seed=seed,
                             mode=s.poison_mode,
                             clean_label=poisons_target_class(cfg["backdoor"]))
        if path is not None and write:
            np.save(path, idx)
            log(f"Save poisoned index to {path}")
    n = int(idx.sum())
    log(f"Poisoned {n} of {len(idx)} training samples ({100 * n / max(len(idx), 1):.2f} %), "
        f"target label {s.target_label}")
    return idx


def load_poison_index(path: Path, n: int) -> np.ndarray:
    if not path.is_file():
        raise ConfigError(f"poison index not found: {path} (run the pretraining stage first)")
    idx = np.load(path)
    if len(idx) != n:
        raise ConfigError(f"{path} has {len(idx)} entries but the training set has {n}")
    return idx


def attack_dir(cfg: dict) -> Path:
    """Where an attack's own artefacts live (the WaNet field, the label-consistent
    perturbations): ``<saved_dir>/attacks``, beside the run folders rather than in one, so every
    stage of an attack and test.py find them, and a fresh run (which moves its run folder
    aside) keeps them."""
    return Path(os.path.expanduser(str(cfg.get("saved_dir", "./saved_data")))) / "attacks"


def backdoor_for(cfg: dict) -> Attack:
    """The config's attack, with what earlier stages saved (the WaNet field) when there is
    any; BadNets triggers follow the image size on image folders."""
    bd = build_attack(cfg["backdoor"], REPO_ROOT, resize=check_dataset_kind(cfg) == "imagefolder")
    bd.restore(attack_dir(cfg))
    return bd


@dataclass
class PoisonData:
    """What every stage reads: the trigger and both splits (subsets applied)."""

    bd: Attack
    train_images: np.ndarray | ImageFolderSource  # uint8 NHWC, or files (dataset: imagefolder)
    train_targets: np.ndarray
    test_images: np.ndarray | ImageFolderSource
    test_targets: np.ndarray


def load_poison_data(cfg: dict) -> PoisonData:
    """Load and check the data and trigger up front, so bad input fails before any output."""
    backdoor_settings(cfg)
    bd = backdoor_for(cfg)
    train = load_split(cfg, train=True)
    test = load_split(cfg, train=False)
    if isinstance(train[0], ImageFolderSource):
        if not bd.supports_image_folders:
            raise ConfigError(f"backdoor.{bd.name} is not supported on image folders "
                              f"({' and '.join(image_folder_attacks())} are)")
        imagefolder_options(cfg)
        pre = ImageTransform({}, "transform", pre=(cfg.get("transform") or {}).get("pre"))
        bd(pre.apply_pre(train[0].load(0)))  # decodes one image, applies the trigger
    else:
        bd(train[0][:1])  # a trigger of the wrong size fails here, naming the file
    bd.check(cfg)  # e.g. the label-consistent attack's clean model
    return PoisonData(bd, *train, *test)


def build_test_sets(cfg: dict, bd=None, images=None, targets=None):
    """(clean test set, poisoned test set) with the test transform."""
    s = backdoor_settings(cfg)
    bd = bd or backdoor_for(cfg)
    if images is None:
        images, targets = load_split(cfg, train=False)
    tf = transform_for(cfg, "test")
    if isinstance(images, ImageFolderSource):
        cache = imagefolder_options(cfg)["cache"]
        keep = np.flatnonzero(np.asarray(targets) != s.target_label)
        return (ImageFolderPoisonDataset(images, np.zeros(len(images)), None, 0, tf, cache),
                ImageFolderPoisonDataset(images.subset(keep), np.ones(len(keep)), bd,
                                         s.target_label, tf, cache))
    return clean_set(images, targets, tf), poison_test_set(images, targets, bd, s.target_label, tf)


def build_poison_train(cfg: dict, poison_idx: np.ndarray, images, targets, transform,
                       bd=None) -> PoisonLabelDataset | ImageFolderPoisonDataset:
    """The poisoned training set. Label-consistent: the poisoned (target-class) images are
    first adversarially perturbed (cached in ``attack_dir``); WaNet: the noise-mode samples
    are warped too, and the field is saved for the later stages."""
    s = backdoor_settings(cfg)
    bd = bd or backdoor_for(cfg)
    if isinstance(images, ImageFolderSource):
        return ImageFolderPoisonDataset(images, poison_idx, bd, s.target_label, transform,
                                        imagefolder_options(cfg)["cache"])
    prep = bd.prepare(images, targets, poison_idx, s.target_label, attack_dir(cfg))
    return PoisonLabelDataset(prep.images, targets, poison_idx, bd, s.target_label, transform,
                              prep.cross_idx, prep.cross_transform)


def loader_settings(section: dict | Loader | None, where: str = "loader") -> Loader:
    """A loader section (``utils.schema.Loader``), checked."""
    return section if isinstance(section, Loader) else parse(Loader, section, where)


def _loader_kwargs(settings: Loader, device) -> dict:
    kw = {"num_workers": settings.num_workers,
          "pin_memory": settings.pin_memory and device is not None and device.type == "cuda"}
    if settings.num_workers > 0:
        kw.update(persistent_workers=settings.persistent_workers,
                  prefetch_factor=settings.prefetch_factor)
    return kw


def choose_data_path(dataset, data_path: str = "reference") -> str:
    """``fast`` or ``reference`` for the ``speed.data_path`` setting (auto | fast | reference,
    checked with the ``speed`` section): auto takes the fast path whenever it supports every
    transform of the dataset."""
    if data_path == "reference":
        return "reference"
    problem = fast_path_problem(dataset)
    if problem is None:
        return "fast"
    if data_path == "fast":
        raise ConfigError(f"speed.data_path is fast but {problem}; use auto or reference")
    return "reference"


class ReferenceLoader(DataLoader):
    """torch's DataLoader: per-image transforms on the host, in worker processes when the
    config asks for them."""

    path: ClassVar[str] = "reference"  # the data path it takes (``choose_data_path``)


def make_loader(dataset, settings: Loader | dict, shuffle: bool = True, drop_last: bool = False,
                device: torch.device | None = None, seed: int = 0,
                data_path: str = "reference", stream: int = 0) -> FastLoader | ReferenceLoader:
    """A training loader whose global batch is the config's batch size, split across processes.
    Call ``loader.batch_sampler.set_epoch(epoch)`` at the start of every epoch. ``loader.path``
    says which data path it takes; ``stream`` separates the augmentation randomness of fast
    loaders that share a seed."""
    settings = loader_settings(settings)
    if choose_data_path(dataset, data_path) == "fast":
        return fast_loader(dataset, settings.batch_size, shuffle, drop_last,
                           device or torch.device("cpu"), seed, stream)
    sampler = ShardedBatchSampler(len(dataset), settings.batch_size, shuffle, drop_last, seed)
    return ReferenceLoader(dataset, batch_sampler=sampler, **_loader_kwargs(settings, device))


def make_eval_loader(dataset, settings: Loader | dict, device: torch.device | None = None,
                     data_path: str = "reference", seed: int = 0) -> FastLoader | ReferenceLoader:
    """An evaluation loader over this process's part of the dataset (``shard``), in dataset
    order. A fast one draws its augmentations (if any) from the epoch its sampler was last
    given with ``loader.batch_sampler.set_epoch``."""
    settings = loader_settings(settings)
    if choose_data_path(dataset, data_path) == "fast":
        return fast_eval_loader(dataset, settings.batch_size, device or torch.device("cpu"),
                                seed)
    idx = shard(len(dataset))
    return ReferenceLoader(Subset(dataset, idx.tolist()), batch_size=settings.batch_size,
                           shuffle=False, **_loader_kwargs(settings, device))
