"""Poisoned datasets (docs/original.md §2.3, §2.7, §2.8, §2.9).

Triggers are deterministic and come before augmentation, so they are applied once when the
dataset is built instead of in every ``__getitem__``; the images a model sees are the same.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from .transforms import ImageTransform


class PoisonLabelDataset(Dataset):
    """Images with the trigger on the poisoned ones and their labels set to the target.

    Items: ``img`` (uint8 CHW, or float when normalisation happens per image), ``target`` (the
    training label: ``target_label`` when poisoned), ``poison`` (0/1), ``origin`` (true label).

    ``cross_idx`` (0/1, optional) marks samples that ``cross_transform`` changes but that keep
    their labels and are not poisoned: WaNet's noise-mode samples.
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, poison_idx: np.ndarray,
                 bd_transform, target_label: int, transform: ImageTransform,
                 cross_idx: np.ndarray | None = None, cross_transform=None):
        self.poison_idx = np.asarray(poison_idx).astype(np.int64)
        self.origin = np.asarray(targets, dtype=np.int64)
        self.targets = np.where(self.poison_idx == 1, target_label, self.origin)
        self.target_label = int(target_label)
        self.transform = transform
        data = np.stack([transform.apply_pre(x) for x in images]) if transform.has_pre else images
        data = data.copy()
        hit = np.flatnonzero(self.poison_idx)
        if len(hit):
            data[hit] = bd_transform(data[hit])
        self.cross_idx = np.zeros(len(data), dtype=np.int64)
        if cross_idx is not None:
            self.cross_idx = np.asarray(cross_idx).astype(np.int64)
            if np.any((self.cross_idx == 1) & (self.poison_idx == 1)):
                raise ValueError("cross samples must not be poisoned samples")
            cross = np.flatnonzero(self.cross_idx)
            if len(cross):
                data[cross] = cross_transform(data[cross])
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"img": self.transform(self.data[i]), "target": int(self.targets[i]),
                "poison": int(self.poison_idx[i]), "origin": int(self.origin[i])}


def poison_test_set(images, targets, bd_transform, target_label, transform):
    """The ASR set (§2.7): every non-target test image, triggered, labelled with the target."""
    keep = np.flatnonzero(np.asarray(targets) != target_label)
    return PoisonLabelDataset(images[keep], np.asarray(targets)[keep], np.ones(len(keep)),
                              bd_transform, target_label, transform)


def clean_set(images, targets, transform):
    return PoisonLabelDataset(images, targets, np.zeros(len(targets)), None, 0, transform)


class SelfPoisonDataset(Dataset):
    """Two independently augmented views of each (possibly triggered) image, for SimCLR (§2.8)."""

    def __init__(self, base: PoisonLabelDataset, aug: ImageTransform):
        self.base = base
        self.aug = aug

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        b = self.base
        x = b.data[i]
        return {"img1": self.aug(x), "img2": self.aug(x), "target": int(b.targets[i]),
                "poison": int(b.poison_idx[i]), "origin": int(b.origin[i])}


class MixMatchDataset(Dataset):
    """The labelled (semi_idx == 1) or unlabelled (== 0) part of the training set (§2.9).

    Labelled items hold one augmented view; unlabelled items hold two (``img1``, ``img2``).
    """

    def __init__(self, base: PoisonLabelDataset, semi_idx: np.ndarray, labelled: bool):
        self.base = base
        self.labelled = labelled
        self.indices = np.flatnonzero(np.asarray(semi_idx) == (1 if labelled else 0))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        b = self.base
        item = {"target": int(b.targets[j]), "poison": int(b.poison_idx[j]),
                "origin": int(b.origin[j]), "labelled": self.labelled}
        if self.labelled:
            item["img"] = b.transform(b.data[j])
        else:
            item["img1"] = b.transform(b.data[j])
            item["img2"] = b.transform(b.data[j])
        return item
