"""The fast data path: the uint8 training set held as one tensor on the training device, whole
batches augmented there with per-sample random parameters (``data.fast_aug``), no loader
workers and no per-image Python.

The triggers are already on the images (``PoisonLabelDataset`` applies them once, before any
augmentation, as the reference path does), so a batch is an index into the tensor followed by
the batched transform. Batches come from the same ``ShardedBatchSampler`` as the reference
path, so both paths see the same samples in the same order; only the random augmentation
parameters come from another generator. That generator is seeded from (seed, stream, epoch,
pass, rank), so a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import weakref
from typing import ClassVar

import numpy as np
import torch

from utils import dist

from .dataset import MixMatchDataset, PoisonLabelDataset, SelfPoisonDataset
from .fast_aug import BatchTransform, unsupported_reason
from .sampler import ShardedBatchSampler, shard


def _parts(dataset):
    """(base PoisonLabelDataset, rows of the base each dataset position reads, view names,
    transform section). Only in-memory uint8 arrays (``PoisonLabelDataset``) have a fast
    path; datasets read from files do not."""
    if isinstance(dataset, SelfPoisonDataset):
        parts = dataset.base, None, ("img1", "img2"), dataset.aug
    elif isinstance(dataset, MixMatchDataset):
        views = ("img",) if dataset.labelled else ("img1", "img2")
        parts = dataset.base, dataset.indices, views, dataset.base.transform
    else:
        parts = dataset, None, ("img",), getattr(dataset, "transform", None)
    if not isinstance(parts[0], PoisonLabelDataset):
        raise TypeError(f"the images of {type(parts[0]).__name__} are not held in memory")
    return parts


def fast_path_problem(dataset) -> str | None:
    """Why ``dataset`` cannot take the fast path, or None when it can."""
    try:
        _, _, _, tf = _parts(dataset)
    except TypeError as e:
        return str(e)
    return unsupported_reason(tf.section)


class DeviceTensorCache:
    """The device copies of in-memory datasets, per base dataset and device: the (triggered)
    images as uint8 NCHW and the labels. Each is built once, so the MixMatch loaders rebuilt
    every epoch reuse it; a dataset is held weakly, and its copies go when it does."""

    def __init__(self):
        self._copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, base: PoisonLabelDataset, device: torch.device) -> dict[str, torch.Tensor]:
        per_device = self._copies.setdefault(base, {})
        key = str(device)
        if key not in per_device:
            images = torch.from_numpy(np.ascontiguousarray(base.data)).permute(0, 3, 1, 2)
            per_device[key] = {
                "images": images.contiguous().to(device),
                "target": torch.as_tensor(base.targets, dtype=torch.long, device=device),
                "poison": torch.as_tensor(base.poison_idx, dtype=torch.long, device=device),
                "origin": torch.as_tensor(base.origin, dtype=torch.long, device=device),
            }
        return per_device[key]


_DEVICE_TENSORS = DeviceTensorCache()  # the one cache of the fast loaders


def device_tensors(base: PoisonLabelDataset, device: torch.device) -> dict[str, torch.Tensor]:
    """The (triggered) images as uint8 NCHW and the labels of ``base``, on ``device``."""
    return _DEVICE_TENSORS.get(base, device)


class _ChunkSampler:
    """Evaluation order: consecutive chunks of this process's share, every sample once."""

    def __init__(self, indices: np.ndarray, batch_size: int):
        self.indices, self.batch_size = indices, int(batch_size)
        self.epoch = self.passes = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.passes = int(epoch), 0

    def __iter__(self):
        self.passes += 1
        for i in range(0, len(self.indices), self.batch_size):
            yield self.indices[i: i + self.batch_size]

    def __len__(self):
        return (len(self.indices) + self.batch_size - 1) // self.batch_size


class FastLoader:
    """Iterates dict batches like the reference DataLoader (``img`` or ``img1``/``img2``,
    ``target``, ``poison``, ``origin``), already normalised, on ``device``."""

    path: ClassVar[str] = "fast"  # the data path it takes (``data.build.choose_data_path``)

    def __init__(self, dataset, batch_sampler, device: torch.device, seed: int = 0,
                 stream: int = 0):
        base, rows, self.views, tf = _parts(dataset)
        self.device = torch.device(device)
        self.tensors = device_tensors(base, self.device)
        self.rows = None if rows is None else torch.as_tensor(rows, device=self.device)
        self.transform = BatchTransform(tf.section, tf.where)
        self.batch_sampler = batch_sampler
        self.seed, self.stream = int(seed), int(stream)
        self.labelled = getattr(dataset, "labelled", None)

    def _generator(self) -> torch.Generator:
        s = self.batch_sampler
        g = torch.Generator(device=self.device)
        key = (((self.seed * 1_000_003 + self.stream) * 10_007 + s.epoch) * 1_009 + s.passes)
        g.manual_seed((key * 131 + dist.rank()) % (2 ** 63))
        return g

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        g = self._generator()  # before iterating: the sampler counts passes when it starts
        t = self.tensors
        for idx in self.batch_sampler:
            rows = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=self.device)
            if self.rows is not None:
                rows = self.rows[rows]
            x = t["images"][rows]
            batch = {v: self.transform(x, g) for v in self.views}
            for k in ("target", "poison", "origin"):
                batch[k] = t[k][rows]
            if self.labelled is not None:
                batch["labelled"] = self.labelled
            yield batch


def fast_loader(dataset, batch_size: int, shuffle: bool, drop_last: bool, device, seed: int,
                stream: int = 0) -> FastLoader:
    sampler = ShardedBatchSampler(len(dataset), batch_size, shuffle, drop_last, seed)
    return FastLoader(dataset, sampler, device, seed, stream)


def fast_eval_loader(dataset, batch_size: int, device, seed: int = 0) -> FastLoader:
    idx = shard(len(dataset))
    return FastLoader(dataset, _ChunkSampler(idx, batch_size), device, seed, stream=7)
