"""One batch sampler for one process or many.

Each epoch draws one permutation from a generator seeded with (seed, epoch) and cuts it into
global batches of the config's batch size; with N processes, process r takes the r-th
contiguous slice of every global batch (evaluation instead gives each process a contiguous
part of the dataset, see ``shard``). So the global batches are the same whatever the number
of processes, and the order depends only on the seed and the epoch, which makes resumed runs
see the same data order as uninterrupted ones.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

from utils import dist


class ShardedBatchSampler(Sampler):
    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool = False,
                 seed: int = 0, rank: int | None = None, world: int | None = None):
        self.n, self.batch_size = int(n), int(batch_size)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, int(seed)
        self.rank = dist.rank() if rank is None else rank
        self.world = dist.world_size() if world is None else world
        self.epoch = 0
        self.passes = 0  # loaders restarted within an epoch (MixMatch) reshuffle each time

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.passes = 0

    def global_batches(self) -> list[np.ndarray]:
        if self.shuffle:
            g = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.epoch) * 10_007 + self.passes)
            order = torch.randperm(self.n, generator=g).numpy()
        else:
            order = np.arange(self.n)
        batches = [order[i: i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if batches and len(batches[-1]) < self.batch_size:
            # with several processes the last, partial batch is cut to a multiple of their
            # number so that every process gets the same share (at most world-1 samples skip
            # that epoch); one process keeps it whole, as the original
            keep = 0 if self.drop_last else len(batches[-1]) // self.world * self.world
            if keep == 0:
                batches.pop()
            else:
                batches[-1] = batches[-1][:keep]
        return batches

    def __iter__(self):
        batches = self.global_batches()
        self.passes += 1
        for b in batches:
            share = len(b) // self.world
            yield b[self.rank * share: (self.rank + 1) * share].tolist()

    def __len__(self):
        return len(self.global_batches())


def shard(n: int) -> np.ndarray:
    """This process's contiguous part of range(n), for evaluation passes (all samples kept)."""
    return np.array_split(np.arange(n), dist.world_size())[dist.rank()]
