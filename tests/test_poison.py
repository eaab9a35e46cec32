"""Poison index, triggers, poisoned datasets (docs/original.md §2.2, §2.3, §2.6, §2.7)."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
from PIL import Image

from data.attacks import BadNets, Blend, build_attack, gen_poison_idx
from data.attacks.triggers import badnets_trigger
from data.cifar import balanced_subset, load_cifar10
from data.dataset import PoisonLabelDataset, poison_test_set
from data.transforms import ImageTransform
from utils.errors import ConfigError, UserError

from .conftest import REPO_ROOT

TEST_TF = {"primary": None, "remaining": {"to_tensor": True, "normalize": {
    "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}}}


def test_poison_index_excludes_target_and_matches_bernoulli_rate():
    targets = np.arange(50000) % 10
    idx = gen_poison_idx(targets, target_label=3, poison_ratio=0.05, seed=100)
    assert idx.dtype == np.float64 and set(np.unique(idx)) <= {0.0, 1.0}
    assert idx[targets == 3].sum() == 0
    # Bernoulli(0.05) over 45000 non-target samples: mean 2250, sd ~46
    assert 2050 < idx.sum() < 2450


def test_poison_index_is_the_first_draw_after_random_seed():
    """Same flags as one random.random() per sample after random.seed(seed), docs/original.md §2.2."""
    targets = np.random.RandomState(1).randint(0, 10, 5000)
    random.seed(7)
    draws = np.array([random.random() for _ in range(5000)])
    expected = ((draws < 0.1) & (targets != 2)).astype(float)
    assert np.array_equal(gen_poison_idx(targets, 2, 0.1, seed=7), expected)


def test_poison_index_reference_draws():
    """2531 of the first 50000 draws after seed 100 are < 0.05; first ones 10, 30, 83 (§2.2)."""
    idx = gen_poison_idx(np.zeros(50000, dtype=int), target_label=3, poison_ratio=0.05, seed=100)
    assert idx.sum() == 2531
    assert np.flatnonzero(idx)[:10].tolist() == [10, 30, 83, 101, 137, 150, 156, 183, 185, 212]


def test_poison_index_exact_mode_and_test_mode():
    targets = np.arange(1000) % 10
    idx = gen_poison_idx(targets, 3, 0.05, seed=1, mode="exact")
    assert idx.sum() == 50 and idx[targets == 3].sum() == 0
    test_idx = gen_poison_idx(targets, 3, None)
    assert test_idx.sum() == 900 and np.all(test_idx[targets != 3] == 1)
    with pytest.raises(ConfigError):
        gen_poison_idx(targets, 3, 0.05, mode="sometimes")


def test_generated_badnets_trigger_equals_original(original_triggers):
    ours = np.asarray(Image.open(REPO_ROOT / "data/trigger/cifar_1.png").convert("RGB"))
    theirs = np.asarray(Image.open(original_triggers / "cifar_1.png").convert("RGB"))
    assert np.array_equal(ours, theirs)
    assert np.array_equal(ours, badnets_trigger())


def test_badnets_pixels_exact(original_triggers):
    bd = BadNets(original_triggers / "cifar_1.png")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = bd(img)
    trig = np.asarray(Image.open(original_triggers / "cifar_1.png").convert("RGB"))
    mask = trig != 0
    assert np.array_equal(out[mask], trig[mask])
    assert np.array_equal(out[~mask], img[~mask])
    assert out[4, 4].tolist() == [180, 249, 112] and out[5, 5].tolist() == [187, 201, 219]
    assert not np.shares_memory(out, img)
    batch = np.stack([img, img[::-1]])
    assert np.array_equal(bd(batch)[1], bd(img[::-1].copy()))


def test_badnets_size_mismatch_is_a_clear_error():
    bd = BadNets(REPO_ROOT / "data/trigger/cifar_1.png")
    with pytest.raises(UserError, match="32x32"):
        bd(np.zeros((64, 64, 3), dtype=np.uint8))


def _pil_blend(img, trigger_img, alpha):
    t = trigger_img.resize((img.shape[1], img.shape[0]))  # PIL default filter (bicubic)
    return np.asarray(Image.blend(Image.fromarray(img), t, alpha))


def test_blend_matches_pil_on_real_image(real_cifar, original_triggers):
    images, _ = load_cifar10(real_cifar, train=False)
    path = original_triggers / "hello_kitty.png"
    bd = Blend(path, alpha=0.1)
    trig = Image.open(path).convert("RGB")
    resized = np.asarray(trig.resize((32, 32), Image.BICUBIC))
    assert hashlib.md5(resized.tobytes()).hexdigest() == "11c14314672beb5193d21db2feb80f70"
    for i in (0, 1, 17, 999):
        assert np.array_equal(bd(images[i]), _pil_blend(images[i], trig, 0.1))
    assert np.array_equal(bd(images[:4]), np.stack([_pil_blend(x, trig, 0.1) for x in images[:4]]))


def test_blend_matches_pil_on_synthetic_image():
    bd = Blend(REPO_ROOT / "data/trigger/random_pattern.png", alpha=0.1)
    trig = Image.open(REPO_ROOT / "data/trigger/random_pattern.png").convert("RGB")
    img = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(bd(img), _pil_blend(img, trig, 0.1))


def test_missing_hello_kitty_says_how_to_fetch(tmp_path):
    with pytest.raises(UserError, match="python -m data.download trigger hello_kitty"):
        build_attack({"blend": {"alpha": 0.1, "trigger_path": str(tmp_path / "hello_kitty.png")}})


def test_poison_dataset_items_and_asr_set():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    original = images.copy()
    targets = np.arange(40) % 10
    idx = np.zeros(40)
    idx[[0, 1, 2]] = 1
    bd = BadNets(REPO_ROOT / "data/trigger/cifar_1.png")
    tf = ImageTransform(TEST_TF, "test")
    ds = PoisonLabelDataset(images, targets, idx, bd, 3, tf)
    item = ds[1]
    assert item["target"] == 3 and item["poison"] == 1 and item["origin"] == 1
    assert item["img"].dtype.is_floating_point is False
    assert item["img"][:, 4, 4].tolist() == [180, 249, 112]
    clean = ds[5]
    assert clean["target"] == 5 and clean["poison"] == 0
    assert np.array_equal(clean["img"].numpy().transpose(1, 2, 0), images[5])
    assert np.array_equal(images, original)  # the caller's images are not modified
    asr = poison_test_set(images, targets, bd, 3, tf)
    assert len(asr) == 36
    assert all(asr[i]["target"] == 3 and asr[i]["origin"] != 3 for i in range(len(asr)))


def test_balanced_subset_is_seeded_and_balanced():
    targets = np.repeat(np.arange(10), 100)
    a = balanced_subset(targets, 205, seed=1, num_classes=10)
    assert len(a) == 205 and len(set(a)) == 205
    counts = np.bincount(targets[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert np.array_equal(a, balanced_subset(targets, 205, seed=1, num_classes=10))
    assert not np.array_equal(a, balanced_subset(targets, 205, seed=2, num_classes=10))
