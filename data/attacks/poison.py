"""The poison index (docs/original.md §2.2): which training samples an attack poisons."""

from __future__ import annotations

import random

import numpy as np

from utils.errors import ConfigError


def gen_poison_idx(targets: np.ndarray, target_label: int, poison_ratio: float | None = None,
                   seed: int = 100, mode: str = "bernoulli",
                   clean_label: bool = False) -> np.ndarray:
    """0/1 poison flags for every sample (float64, as the original).

    Train set (``poison_ratio`` given), docs/original.md §2.2: one ``random.random()`` per sample, the
    target class included, from a Python RNG seeded with ``seed``; a sample is poisoned iff its
    draw is below the ratio and its label is not the target. That is the original's first draw
    after ``random.seed(100)``, so the expected count is ratio × (non-target samples).
    ``mode='exact'`` instead poisons exactly round(ratio × N) non-target samples.

    ``clean_label`` (the label-consistent and SIG attacks): the poisoned samples are drawn from
    the target class only, ratio × N of them (N the whole training set), so 2.5 % of CIFAR-10 is
    a quarter of its target class. Bernoulli draws then use the per-sample rate ratio × N / N_target.

    Test set (``poison_ratio`` None): every non-target sample.
    """
    targets = np.asarray(targets)
    n = len(targets)
    flags = np.zeros(n, dtype=np.float64)
    non_target = targets != target_label
    if poison_ratio is None:
        flags[non_target] = 1
        return flags
    eligible = ~non_target if clean_label else non_target
    which = "of" if clean_label else "not of"
    rate = poison_ratio
    if clean_label and mode == "bernoulli":
        rate = poison_ratio * n / max(int(eligible.sum()), 1)
        if rate > 1:
            raise ConfigError(
                f"backdoor.poison_ratio {poison_ratio}: the target class holds only "
                f"{int(eligible.sum())} of {n} samples, fewer than the ratio asks for")
    rng = random.Random(seed)
    if mode == "bernoulli":
        draws = np.array([rng.random() for _ in range(n)])
        flags[(draws < rate) & eligible] = 1
    elif mode == "exact":
        candidates = np.flatnonzero(eligible).tolist()
        k = int(round(poison_ratio * n))
        if k > len(candidates):
            raise ConfigError(
                f"backdoor.poison_ratio {poison_ratio}: {k} poisoned samples asked for but only "
                f"{len(candidates)} are {which} the target class"
            )
        flags[sorted(rng.sample(candidates, k))] = 1
    else:
        raise ConfigError(f"backdoor.poison_mode '{mode}' is not one of: bernoulli, exact")
    return flags
