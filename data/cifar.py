"""CIFAR-10 from the official python-batch folder (docs/original.md §2.1)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from utils.errors import ConfigError, DatasetError

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


DATASETS = ("cifar10", "imagefolder", "poisoned")


def check_dataset_kind(cfg: dict) -> str:
    """The original accepts a CIFAR folder only when ``dataset_dir`` contains 'cifar'.

    An explicit ``dataset: cifar10`` key is accepted too, ``dataset: imagefolder`` (or
    ``dataset: {imagefolder: {...}}``) names a folder of image files (``data.imagefolder``),
    and ``dataset: poisoned`` a poisoned set made elsewhere (``data.poisoned_set``).
    """
    kind = cfg.get("dataset")
    if isinstance(kind, dict):
        if list(kind) != ["imagefolder"]:
            raise ConfigError(f"dataset: expected 'imagefolder: {{...}}' as a mapping, got {kind!r}")
        kind = "imagefolder"
    if kind is not None:
        if str(kind).lower() not in DATASETS:
            raise ConfigError(f"dataset: '{kind}' is not supported (supported: "
                              f"{', '.join(DATASETS)})")
        return str(kind).lower()
    if "cifar" in str(cfg.get("dataset_dir", "")):
        return "cifar10"
    raise ConfigError(
        f"dataset_dir '{cfg.get('dataset_dir')}' does not contain 'cifar': name the dataset "
        "with 'dataset: cifar10' in the config"
    )


def find_batches_dir(dataset_dir: str | Path) -> Path:
    """Accept the batches folder itself or a folder holding ``cifar-10-batches-py``."""
    d = Path(os.path.expanduser(str(dataset_dir)))
    if (d / "test_batch").exists() or not (d / "cifar-10-batches-py").is_dir():
        return d
    return d / "cifar-10-batches-py"


def is_image_folder_root(dataset_dir: str | Path) -> bool:
    d = Path(os.path.expanduser(str(dataset_dir)))
    return (d / "train").is_dir() and (d / "val").is_dir() and not (d / "test_batch").exists()


def check_cifar_files(dataset_dir: str | Path, files=None) -> Path:
    """The batches folder, after checking that every batch file is there.

    The scripts' checks call this for every dataset: an image-folder root (``train/`` and
    ``val/`` folders, ``dataset: imagefolder``) is left to ``data.imagefolder``'s own checks
    when the data are loaded. Loading CIFAR (``files`` given) always checks.
    """
    if files is None:
        if is_image_folder_root(dataset_dir):
            return Path(os.path.expanduser(str(dataset_dir)))
        files = TRAIN_FILES + TEST_FILES
    d = find_batches_dir(dataset_dir)
    how = f"download it with: python -m data.download cifar10 {d.parent}"
    if not d.is_dir():
        raise DatasetError(f"CIFAR-10 folder not found: {d} ({how})")
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 folder {d} is incomplete: {missing[0]} is missing ({how})")
    return d


def load_cifar10(dataset_dir: str | Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 NHWC, targets int64) for the train or test split."""
    files = TRAIN_FILES if train else TEST_FILES
    d = check_cifar_files(dataset_dir, files)
    how = f"download it with: python -m data.download cifar10 {d.parent}"
    data, labels = [], []
    for f in files:
        try:
            with open(d / f, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
            if len(x) != len(y):
                raise ValueError("data and labels differ in length")
        except Exception as e:  # any unreadable batch is the user's data problem
            raise DatasetError(
                f"CIFAR-10 batch {d / f} is corrupt ({type(e).__name__}: {e}); {how}"
            ) from None
        data.append(x)
        labels.append(y)
    images = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))
    return images, np.concatenate(labels)


def balanced_subset(targets: np.ndarray, n: int, seed: int, num_classes: int) -> np.ndarray:
    """Sorted indices of a seeded, class-balanced subset of size ``n``."""
    if n <= 0:
        raise ConfigError(f"subset size must be positive, got {n}")
    if n >= len(targets):
        return np.arange(len(targets))
    rng = np.random.RandomState(seed)
    per = [n // num_classes + (1 if c < n % num_classes else 0) for c in range(num_classes)]
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        chosen.append(rng.choice(idx, size=min(per[c], len(idx)), replace=False))
    return np.sort(np.concatenate(chosen))
