"""Shared fixtures: a tiny synthetic CIFAR-format folder, and the real copy when available."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_fake_cifar(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py`` with learnable class-coloured noise images."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)

    base = rng.integers(0, 256, size=(10, 3, 1, 1))  # one colour per class, train and test

    def batch(n):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        imgs = np.clip(base[labels] + rng.normal(0, 40, size=(n, 3, 32, 32)), 0, 255)
        return {"data": imgs.astype(np.uint8).reshape(n, 3072), "labels": labels.tolist()}

    per = n_train // 5
    for i in range(1, 6):
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(per), f)
    with open(d / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    return d


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory) -> Path:
    return write_fake_cifar(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def real_cifar() -> Path:
    d = os.environ.get("DBD_CIFAR_DIR")
    if not d or not (Path(d) / "data_batch_1").is_file():
        pytest.skip("real CIFAR-10 not available: build it with "
                    "`python ../shared/data/build_cifar10.py DIR` and set "
                    "DBD_CIFAR_DIR=DIR/cifar-10-batches-py")
    return Path(d)


@pytest.fixture(scope="session")
def shared_triggers() -> Path:
    d = REPO_ROOT.parent / "shared" / "triggers"
    if not d.is_dir():
        pytest.skip("../shared/triggers (the original trigger images) is not beside the repository")
    return d
