"""The fast data path against the reference DataLoader path: same samples in the same order,
same labels, same images where nothing is random, deterministic augmentation per epoch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml

from data.attacks import build_attack
from data.build import build_poison_train, choose_data_path, make_eval_loader, make_loader
from data.dataset import MixMatchDataset, SelfPoisonDataset
from data.transforms import ImageTransform, Normalizer
from utils.errors import ConfigError

from .conftest import REPO_ROOT

SUP = REPO_ROOT / "config/supervise/badnets/cifar10_resnet18/example.yaml"
SIM = REPO_ROOT / "config/defense/simclr/badnets/cifar10_resnet18/example.yaml"
SETTINGS = {"batch_size": 16, "num_workers": 0, "pin_memory": False}


def _dataset(part="train", src=SUP, n=64, section=None):
    cfg = yaml.safe_load(src.read_text())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    targets = rng.integers(0, 10, n)
    poison = (np.arange(n) % 4 == 0).astype(np.int64)
    tf = ImageTransform(section if section is not None else cfg["transform"][part],
                        f"transform.{part}")
    bd = build_attack(cfg["backdoor"], REPO_ROOT)
    return cfg, build_poison_train(cfg, poison, images, targets, tf, bd), tf


def _reference_batches(loader, tf):
    norm = Normalizer(tf.mean, tf.std, torch.device("cpu"))
    out = []
    for b in loader:
        out.append({k: norm(v) if k.startswith("img") else v for k, v in b.items()})
    return out


def test_auto_picks_fast_for_shipped_transforms_and_reference_otherwise():
    _, ds, _ = _dataset()
    assert choose_data_path(ds, "auto") == "fast"
    assert choose_data_path(ds, "reference") == "reference"
    odd = {"primary": {"random_rotation": {"degrees": 10}}, "remaining": None}
    ds.transform.section = odd  # a transform the fast path lacks
    assert choose_data_path(ds, "auto") == "reference"
    with pytest.raises(ConfigError, match="random_rotation"):
        choose_data_path(ds, "fast")
    with pytest.raises(ConfigError, match="data_path"):
        choose_data_path(ds, "gpu")


def test_test_transform_gives_identical_batches():
    _, ds, tf = _dataset("test")
    fast = list(make_eval_loader(ds, SETTINGS, data_path="fast"))
    ref = _reference_batches(make_eval_loader(ds, SETTINGS, data_path="reference"), tf)
    assert len(fast) == len(ref) == 4
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f["img"], r["img"], rtol=0, atol=1e-6)
        for k in ("target", "poison", "origin"):
            assert torch.equal(f[k], r[k]), k


def test_training_batches_follow_the_same_sampler():
    _, ds, tf = _dataset("train")
    fast = make_loader(ds, SETTINGS, seed=3, data_path="fast")
    ref = make_loader(ds, SETTINGS, seed=3, data_path="reference")
    assert fast.path == "fast" and ref.path == "reference"
    for loader in (fast, ref):
        loader.batch_sampler.set_epoch(5)
    fb, rb = list(fast), _reference_batches(ref, tf)
    assert [b["origin"].tolist() for b in fb] == [b["origin"].tolist() for b in rb]
    assert [b["poison"].tolist() for b in fb] == [b["poison"].tolist() for b in rb]
    # same value distribution: a random crop with zero padding and a flip keep the pixel
    # multiset of the visible area, so the per-batch means are close
    f_mean = torch.stack([b["img"].mean() for b in fb])
    r_mean = torch.stack([b["img"].mean() for b in rb])
    assert (f_mean - r_mean).abs().max() < 0.15


def test_poisoned_images_carry_the_trigger_and_target_label():
    cfg, ds, _ = _dataset("test")
    batch = next(iter(make_eval_loader(ds, {**SETTINGS, "batch_size": 64}, data_path="fast")))
    target = cfg["backdoor"]["target_label"]
    p = batch["poison"].bool()
    assert (batch["target"][p] == target).all()
    assert torch.equal(batch["target"][~p], batch["origin"][~p])
    # BadNets trigger pixels are identical on every poisoned image (no augmentation here)
    mask = torch.from_numpy(build_attack(cfg["backdoor"], REPO_ROOT).mask).permute(2, 0, 1)
    assert mask.sum() > 0
    trig = batch["img"][p][:, mask]  # [poisoned, trigger elements]
    assert torch.equal(trig, trig[:1].expand_as(trig))
    assert not torch.equal(batch["img"][p][:, ~mask][:1], batch["img"][p][:, ~mask][1:2])


def test_augmentation_is_a_function_of_seed_epoch_and_pass():
    _, ds, _ = _dataset("train")

    def epoch_images(seed, epoch):
        loader = make_loader(ds, SETTINGS, seed=seed, data_path="fast")
        loader.batch_sampler.set_epoch(epoch)
        return torch.cat([b["img"] for b in loader])

    a, b = epoch_images(1, 2), epoch_images(1, 2)
    assert torch.equal(a, b)  # what a resumed run sees
    assert not torch.equal(a, epoch_images(1, 3))
    loader = make_loader(ds, SETTINGS, seed=1, data_path="fast")
    loader.batch_sampler.set_epoch(2)
    first = torch.cat([x["img"] for x in loader])
    second = torch.cat([x["img"] for x in loader])  # a restarted loader (MixMatch) reshuffles
    assert torch.equal(first, a) and not torch.equal(first, second)


def test_simclr_views_differ_and_mixmatch_subsets_read_the_right_rows():
    cfg, ds, _ = _dataset("aug", src=SIM)
    pairs = make_loader(SelfPoisonDataset(ds, ds.transform), SETTINGS, data_path="fast")
    pairs.batch_sampler.set_epoch(1)
    b = next(iter(pairs))
    assert set(b) >= {"img1", "img2", "target", "poison", "origin"}
    assert b["img1"].shape == b["img2"].shape == (16, 3, 32, 32)
    assert not torch.equal(b["img1"], b["img2"])  # two independent views

    _, ds, _ = _dataset("test")
    semi = np.zeros(len(ds), dtype=np.int64)
    semi[::3] = 1
    lab = make_loader(MixMatchDataset(ds, semi, True), SETTINGS, shuffle=False, data_path="fast")
    unl = make_loader(MixMatchDataset(ds, semi, False), SETTINGS, shuffle=False,
                      data_path="fast")
    lab_rows = np.flatnonzero(semi == 1)
    got = torch.cat([x["origin"] for x in lab]).numpy()
    assert np.array_equal(got, ds.origin[lab_rows[: len(got)]])
    u = next(iter(unl))
    assert "img1" in u and "img2" in u and "img" not in u
    # no augmentation in the test transform: both views equal the stored image, normalised
    ref = torch.from_numpy(ds.data[np.flatnonzero(semi == 0)[:16]]).permute(0, 3, 1, 2)
    norm = Normalizer(ds.transform.mean, ds.transform.std, torch.device("cpu"))
    torch.testing.assert_close(u["img1"], norm(ref), rtol=0, atol=1e-6)


def test_the_config_is_not_mutated():
    cfg = yaml.safe_load(SIM.read_text())
    before = copy.deepcopy(cfg)
    _dataset("aug", src=SIM, section=cfg["transform"]["aug"])
    loader = make_loader(_dataset("aug", src=SIM, section=cfg["transform"]["aug"])[1],
                         SETTINGS, data_path="fast")
    next(iter(loader))
    assert cfg == before


def test_device_copies_are_built_once_and_owned_by_the_fast_path():
    import gc
    import weakref

    from data import fast
    _, ds, _ = _dataset("test", n=16)
    a = fast.device_tensors(ds, torch.device("cpu"))
    assert fast.device_tensors(ds, "cpu") is a  # reused by every loader of this dataset
    assert torch.equal(a["images"], torch.from_numpy(ds.data).permute(0, 3, 1, 2))
    held = [v for v in vars(ds).values() if isinstance(v, dict)]
    assert not any(x is a for d in held for x in d.values())  # not stored on the dataset
    ref = weakref.ref(a["images"])
    del a, ds
    gc.collect()
    assert ref() is None  # the copies go with their dataset
