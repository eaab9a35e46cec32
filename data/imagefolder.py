"""Image-folder datasets (``dataset: imagefolder``), e.g. the paper's 30-class ImageNet subset.

``dataset_dir`` holds ``train/<class>/*`` and ``val/<class>/*`` (JPEG, PNG, ...); classes are
the sorted folder names, as torchvision's ImageFolder. Images are decoded lazily, one per item,
so memory stays small; ``dataset: {imagefolder: {cache: true}}`` keeps the decoded (resized,
triggered) images of each process in memory after their first use, for small folders.

Per item, in the order of the CIFAR path: decode (RGB) → ``transform.pre`` (e.g. a resize to a
fixed size) → trigger if poisoned → ``primary`` augmentation → ``remaining``. Only BadNets
(trigger resized to the image, nearest) and Blended (bicubic) triggers are supported here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from utils.errors import ConfigError, DatasetError

from .transforms import ImageTransform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = {True: "train", False: "val"}


def imagefolder_options(cfg: dict) -> dict:
    """``dataset: imagefolder`` or ``dataset: {imagefolder: {cache: bool}}``."""
    kind = cfg.get("dataset")
    opts = {"cache": False}
    if isinstance(kind, dict):
        sub = kind.get("imagefolder") or {}
        if not isinstance(sub, dict):
            raise ConfigError(f"dataset.imagefolder must be a mapping, got {sub!r}")
        unknown = set(sub) - set(opts)
        if unknown:
            raise ConfigError(f"dataset.imagefolder: unknown key '{sorted(unknown)[0]}' "
                              "(known: cache)")
        opts.update(sub)
        if not isinstance(opts["cache"], bool):
            raise ConfigError(f"dataset.imagefolder.cache must be True or False, got "
                              f"{opts['cache']!r}")
    return opts


def scan_split(root: str | Path, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(file paths, labels, class names) of ``root/split``, in sorted class and file order."""
    root = Path(os.path.expanduser(str(root)))
    d = root / split
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root} (expected {root}/train/<class>/* "
                           f"and {root}/val/<class>/*)")
    if not d.is_dir():
        raise DatasetError(f"image folder {root} has no '{split}' folder (expected "
                           f"{d}/<class>/*)")
    classes = sorted(p.name for p in d.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{d} holds no class folders")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(
            os.path.join(dirpath, f)
            for dirpath, _, names in os.walk(d / name, followlinks=True)
            for f in names if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DatasetError(f"class folder {d / name} holds no images "
                               f"({', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [c] * len(files)
    return paths, np.asarray(labels, dtype=np.int64), classes


def read_image(path: str) -> np.ndarray:
    """uint8 HWC RGB; a file that cannot be decoded is a DatasetError naming it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:
        raise DatasetError(f"cannot read image {path} ({type(e).__name__}: {e})") from None


class ImageFolderSource:
    """The files of one split: paths and labels; nothing is decoded until ``load``."""

    def __init__(self, paths: list[str], targets: np.ndarray, classes: list[str]):
        self.paths, self.targets, self.classes = list(paths), np.asarray(targets), list(classes)

    def __len__(self):
        return len(self.paths)

    def subset(self, idx) -> ImageFolderSource:
        idx = np.asarray(idx, dtype=np.int64)
        return ImageFolderSource([self.paths[i] for i in idx], self.targets[idx], self.classes)

    def load(self, i: int) -> np.ndarray:
        return read_image(self.paths[i])

    def __repr__(self):
        return f"ImageFolderSource({len(self)} images, {len(self.classes)} classes)"


def load_imagefolder(root: str | Path, train: bool, num_classes: int) -> ImageFolderSource:
    paths, targets, classes = scan_split(root, SPLITS[train])
    if len(classes) != num_classes:
        raise ConfigError(f"{Path(root) / SPLITS[train]} has {len(classes)} class folders but "
                          f"num_classes is {num_classes}")
    if not train:
        train_classes = scan_classes(root, SPLITS[True])
        if train_classes != classes:
            extra = sorted(set(classes) ^ set(train_classes))
            raise DatasetError(f"{root}: the train and val class folders differ "
                               f"(e.g. '{extra[0] if extra else classes[0]}')")
    return ImageFolderSource(paths, targets, classes)


def scan_classes(root: str | Path, split: str) -> list[str]:
    d = Path(os.path.expanduser(str(root))) / split
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


class _LazyImages:
    """``dataset.data[i]``: the (pre-transformed, triggered) uint8 HWC image i, as the in-memory
    datasets' ``data`` array, so SimCLR's and MixMatch's wrappers work unchanged."""

    def __init__(self, dataset: ImageFolderPoisonDataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return self.dataset.image(int(i))
        idx = np.arange(len(self))[i]
        return np.stack([self.dataset.image(int(j)) for j in idx])


class ImageFolderPoisonDataset(Dataset):
    """``PoisonLabelDataset`` for files: the same items (``img``, ``target``, ``poison``,
    ``origin``), images decoded and triggered per item.

    Not a PoisonLabelDataset on purpose: the fast data path keeps the whole uint8 set on the
    device and does not apply to these (``data.fast.fast_path_problem`` gives the reason).
    """

    def __init__(self, source: ImageFolderSource, poison_idx: np.ndarray, bd_transform,
                 target_label: int, transform: ImageTransform, cache: bool = False):
        self.source = source
        self.poison_idx = np.asarray(poison_idx).astype(np.int64)
        if len(self.poison_idx) != len(source):
            raise ValueError("poison_idx and the image list differ in length")
        self.origin = np.asarray(source.targets, dtype=np.int64)
        self.targets = np.where(self.poison_idx == 1, target_label, self.origin)
        self.target_label = int(target_label)
        self.bd_transform = bd_transform
        self.transform = transform
        self.cache = {} if cache else None
        self.data = _LazyImages(self)

    def __len__(self):
        return len(self.source)

    def image(self, i: int) -> np.ndarray:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        img = self.transform.apply_pre(self.source.load(i))
        if self.poison_idx[i] == 1:
            img = self.bd_transform(img)
        if self.cache is not None:
            self.cache[i] = img
        return img

    def __getitem__(self, i):
        return {"img": self.transform(self.image(i)), "target": int(self.targets[i]),
                "poison": int(self.poison_idx[i]), "origin": int(self.origin[i])}
