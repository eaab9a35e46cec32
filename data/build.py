"""From a config to datasets and loaders: subsets, the poison index, triggers, transforms."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from utils.config import num_classes_of, seed_settings
from utils.errors import ConfigError, DatasetError
from utils.paths import REPO_ROOT
from utils.schema import Backdoor, Loader, parse

from .attacks import (
    Attack,
    build_attack,
    gen_poison_idx,
    image_folder_attacks,
    poisons_target_class,
)
from .cifar import CLASSES, balanced_subset, check_cifar_files, check_dataset_kind, load_cifar10
from .dataset import PoisonLabelDataset, clean_set, poison_test_set
from .fast import FastLoader, fast_eval_loader, fast_loader, fast_path_problem
from .imagefolder import (
    ImageFolderPoisonDataset,
    ImageFolderSource,
    imagefolder_options,
    load_imagefolder,
)
from .poisoned_set import load_poisoned_set
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


def check_dataset(cfg: dict) -> str:
    """The dataset's kind, after checking that its files are there (before any output)."""
    kind = check_dataset_kind(cfg)
    if kind == "poisoned":
        path = Path(os.path.expanduser(str(cfg.get("dataset_dir"))))
        if not path.exists():
            raise DatasetError(f"poisoned set not found: {path} (dataset_dir names a .npz "
                               "file or a folder; docs/usage.md, \"Your own poisoned data\")")
    else:
        check_cifar_files(cfg["dataset_dir"])  # an image-folder root is checked as it loads
    return kind


def class_names(cfg: dict) -> list[str]:
    """The classes' names, in label order: CIFAR-10's, an image folder's class folders, or
    a poisoned set's own."""
    kind = check_dataset_kind(cfg)
    if kind == "imagefolder":
        return list(load_imagefolder(cfg["dataset_dir"], False, num_classes_of(cfg)).classes)
    if kind == "poisoned":
        return list(given_set(cfg).classes)
    return list(CLASSES)


@dataclass(frozen=True)
class GivenSet:
    """A poisoned set made elsewhere (``dataset: poisoned``), its subsets applied: the
    training set as given (images already triggered, labels as given), its poisoned flags
    (all False where the set does not know them, ``known`` False) and true classes (the
    given labels where unknown), the clean test set and the triggered test set (true
    labels)."""
    train_images: np.ndarray
    train_labels: np.ndarray
    poisoned: np.ndarray
    known: bool
    train_origin: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    bd_images: np.ndarray
    bd_labels: np.ndarray
    classes: tuple[str, ...]


def given_set(cfg: dict) -> GivenSet:
    """``dataset_dir``'s poisoned set, checked against the config (its classes, its target)
    and reduced to the seeded class-balanced subsets of ``train_subset`` and ``test_subset``
    (of the given labels; the triggered test set is used whole). Read once per set and
    settings, however many times a stage asks."""
    path = Path(os.path.expanduser(str(cfg["dataset_dir"])))
    return _given_set(str(path), path.stat().st_mtime, num_classes_of(cfg),
                      backdoor_settings(cfg).target_label, cfg.get("train_subset"),
                      cfg.get("test_subset"), seed_settings(cfg).seed)


@functools.lru_cache(maxsize=2)
def _given_set(path: str, stamp: float, n_classes: int, target: int, train_subset,
               test_subset, seed: int) -> GivenSet:
    ps = load_poisoned_set(path)
    if ps.num_classes != n_classes:
        raise ConfigError(f"{path} has {ps.num_classes} classes but num_classes is "
                          f"{n_classes} (dbd.py --data sets it from the set)")
    if ps.target_label != target:
        raise ConfigError(f"{path} has target {ps.target_label} but backdoor.target_label is "
                          f"{target} (dbd.py --data sets it from the set)")
    known = ps.poisoned is not None
    poisoned = ps.poisoned if known else np.zeros(len(ps.train_labels), dtype=bool)
    if np.any(ps.train_labels[poisoned] != target):
        raise DatasetError(f"{path}: a poisoned training sample is not labelled with the "
                           f"target {target}: only all-to-one attacks are supported")
    origin = ps.train_true_labels if ps.train_true_labels is not None else ps.train_labels
    tr = _subset(train_subset, "train_subset", ps.train_labels, seed, n_classes)
    te = _subset(test_subset, "test_subset", ps.test_labels, seed + 1, n_classes)
    return GivenSet(ps.train_images[tr], ps.train_labels[tr], poisoned[tr], known, origin[tr],
                    ps.test_images[te], ps.test_labels[te], ps.bd_images, ps.bd_labels,
                    tuple(ps.classes))


def _subset(n, key: str, targets: np.ndarray, seed: int, num_classes: int) -> np.ndarray:
    """The indices of the seeded class-balanced subset of ``n`` samples that the config's
    ``key`` asks for (all when it asks for none)."""
    if n is None:
        return np.arange(len(targets))
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {n!r}")
    return balanced_subset(targets, n, seed, num_classes)


def load_split(cfg: dict, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10 split, reduced to the seeded class-balanced subset when configured.

    Subsets are taken before poisoning, so the poison index is drawn over the subset. For
    ``dataset: imagefolder`` the "images" are an ``ImageFolderSource`` (files, decoded lazily);
    for ``dataset: poisoned``, the given set's training images (as given) or clean test set.
    """
    kind = check_dataset_kind(cfg)
    if kind == "poisoned":
        g = given_set(cfg)
        return (g.train_images, g.train_labels) if train else (g.test_images, g.test_labels)
    if kind == "imagefolder":
        images = load_imagefolder(cfg["dataset_dir"], train, num_classes_of(cfg))
        targets = images.targets
    else:
        images, targets = load_cifar10(cfg["dataset_dir"], train)
    key = "train_subset" if train else "test_subset"
    if cfg.get(key) is not None:
        seed = seed_settings(cfg).seed
        idx = _subset(cfg[key], key, targets, seed + (0 if train else 1), num_classes_of(cfg))
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
    if cfg.get("dataset") == "poisoned":  # the set's own flags (none where unknown)
        g = given_set(cfg)
        idx = g.poisoned.astype(np.int64)
        if path is not None and write:
            np.save(path, idx)
        log(f"Poisoned {int(idx.sum())} of {len(idx)} training samples, as the set says"
            if g.known else f"The set does not say which of its {len(idx)} training samples "
            "are poisoned")
        return idx
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
    poison_known: bool = True  # False: a poisoned set that does not say which are poisoned


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
    known = given_set(cfg).known if check_dataset_kind(cfg) == "poisoned" else True
    return PoisonData(bd, *train, *test, poison_known=known)


def build_test_sets(cfg: dict, bd=None, images=None, targets=None):
    """(clean test set, poisoned test set) with the test transform."""
    s = backdoor_settings(cfg)
    bd = bd or backdoor_for(cfg)
    tf = transform_for(cfg, "test")
    if check_dataset_kind(cfg) == "poisoned":  # the set's own triggered images, true labels
        g = given_set(cfg)
        return (clean_set(g.test_images, g.test_labels, tf),
                PoisonLabelDataset(g.bd_images, g.bd_labels, np.ones(len(g.bd_labels)), bd,
                                   s.target_label, tf))
    if images is None:
        images, targets = load_split(cfg, train=False)
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
    if check_dataset_kind(cfg) == "poisoned":  # stored triggered; true classes where known
        targets = given_set(cfg).train_origin
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
