"""The fast data path against the reference DataLoader path: same samples in the same order,
same labels, the same pixels wherever nothing is random, deterministic augmentation per epoch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from data.attacks import build_attack
from data.build import build_poison_train, choose_data_path, make_eval_loader, make_loader
from data.dataset import MixMatchDataset, SelfPoisonDataset
from data.transforms import ImageTransform, Normalizer
from utils.errors import ConfigError
from utils.speed import Speed

from .conftest import REPO_ROOT

SUP = REPO_ROOT / "config/supervise/badnets/cifar10_resnet18/example.yaml"
SIM = REPO_ROOT / "config/defense/simclr/badnets/cifar10_resnet18/example.yaml"
SETTINGS = {"batch_size": 16, "num_workers": 0, "pin_memory": False}
# The two paths normalise with two float32 formulas, (x / 255 - mean) / std and
# (x - 255 mean) / (255 std): for values below 3 they differ by at most a couple of ulps.
ROUNDING = 4 * torch.finfo(torch.float32).eps


def _synthetic(n):
    """Random uint8 images (no two alike), random labels, every fourth sample poisoned."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    targets = rng.integers(0, 10, n)
    poison = (np.arange(n) % 4 == 0).astype(np.int64)
    return images, targets, poison


def _dataset(part="train", src=SUP, n=64, section=None):
    cfg = yaml.safe_load(src.read_text())
    images, targets, poison = _synthetic(n)
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


def _pixels(x, tf) -> torch.Tensor:
    """Normalised images back to the uint8 pixels they were made from; checks that they are
    whole grey levels (the normalisation's rounding is far below half a level)."""
    p = x * (torch.tensor(tf.std).view(1, 3, 1, 1) * 255) \
        + torch.tensor(tf.mean).view(1, 3, 1, 1) * 255
    assert (p - p.round()).abs().max() < 1e-3 and p.min() > -0.5 and p.max() < 255.5
    return p.round().to(torch.uint8)


def _stored(ds, rows=slice(None)) -> torch.Tensor:
    """The dataset's (triggered) uint8 images, NCHW."""
    return torch.from_numpy(ds.data[rows]).permute(0, 3, 1, 2)


def _rows_of(images: torch.Tensor, ds) -> list[int]:
    """Which stored image each uint8 image is (the random images are all different)."""
    where = {_stored(ds, [i]).numpy().tobytes(): i for i in range(len(ds))}
    assert len(where) == len(ds)
    return [where[x[None].numpy().tobytes()] for x in images]


def _epoch(loader, epoch, tf=None):
    loader.batch_sampler.set_epoch(epoch)
    return list(loader) if tf is None else _reference_batches(loader, tf)


def _cat(batches, key):
    return torch.cat([b[key] for b in batches])


def test_auto_picks_fast_for_shipped_transforms_and_reference_otherwise():
    _, ds, _ = _dataset()
    assert choose_data_path(ds, "auto") == "fast"
    assert choose_data_path(ds, "reference") == "reference"
    odd = {"primary": {"random_rotation": {"degrees": 10}}, "remaining": None}
    ds.transform.section = odd  # a transform the fast path lacks
    assert choose_data_path(ds, "auto") == "reference"
    with pytest.raises(ConfigError, match="random_rotation"):
        choose_data_path(ds, "fast")
    with pytest.raises(ConfigError, match="speed.data_path must be auto | fast | reference"):
        Speed({"data_path": "gpu"}, torch.device("cpu"))  # checked once, with the section


def test_test_transform_gives_identical_batches():
    """Evaluation loaders: both paths give the stored pixels and labels in dataset order, and
    the same floats up to the rounding of the normalisation."""
    _, ds, tf = _dataset("test")
    fast = list(make_eval_loader(ds, SETTINGS, data_path="fast"))
    ref = _reference_batches(make_eval_loader(ds, SETTINGS, data_path="reference"), tf)
    assert len(fast) == len(ref) == 4
    for i, (f, r) in enumerate(zip(fast, ref)):
        rows = slice(16 * i, 16 * (i + 1))
        assert torch.equal(_pixels(f["img"], tf), _stored(ds, rows))
        assert torch.equal(_pixels(r["img"], tf), _stored(ds, rows))
        torch.testing.assert_close(f["img"], r["img"], rtol=0, atol=ROUNDING)
        for k, want in (("target", ds.targets), ("poison", ds.poison_idx),
                        ("origin", ds.origin)):
            assert torch.equal(f[k], torch.from_numpy(want[rows])), k
            assert torch.equal(r[k], f[k]), k


def test_same_seed_and_epoch_give_the_same_samples_in_the_same_order():
    """Shuffled training loaders without augmentation: both paths give identical batches (the
    pixels exactly, the floats up to rounding), each epoch a permutation of the whole set
    with the labels of its rows; another epoch or seed gives another order."""
    _, ds, tf = _dataset("train", section=yaml.safe_load(SUP.read_text())["transform"]["test"])

    def order(path, seed, epoch):
        loader = make_loader(ds, SETTINGS, seed=seed, data_path=path)
        assert loader.path == path
        return _epoch(loader, epoch, tf if path == "reference" else None)

    fb, rb = order("fast", 3, 5), order("reference", 3, 5)
    assert [len(b["img"]) for b in fb] == [len(b["img"]) for b in rb] == [16] * 4
    for f, r in zip(fb, rb):
        assert torch.equal(_pixels(f["img"], tf), _pixels(r["img"], tf))
        torch.testing.assert_close(f["img"], r["img"], rtol=0, atol=ROUNDING)
        for k in ("target", "poison", "origin"):
            assert torch.equal(f[k], r[k]), k
    rows = _rows_of(_pixels(_cat(fb, "img"), tf), ds)
    assert sorted(rows) == list(range(len(ds))) and rows != sorted(rows)
    for k, want in (("target", ds.targets), ("poison", ds.poison_idx), ("origin", ds.origin)):
        assert np.array_equal(_cat(fb, k).numpy(), want[rows]), k
    for seed, epoch in ((3, 6), (4, 5)):
        other = _rows_of(_pixels(_cat(order("fast", seed, epoch), "img"), tf), ds)
        assert sorted(other) == sorted(rows) and other != rows


def test_training_batches_are_crops_and_flips_of_the_same_samples():
    """With the training transform (random crop, zero padding 4, flip) both paths take the
    samples of the un-augmented order, and every image is exactly one of the 9 x 9 x 2
    crops and flips of its stored image; the crops and flips vary within a batch."""
    cfg, ds, tf = _dataset("train")
    plain = _dataset("train", section=cfg["transform"]["test"])[1]
    pad = cfg["transform"]["train"]["primary"]["random_crop"]["padding"]
    fast = make_loader(ds, SETTINGS, seed=3, data_path="fast")
    ref = make_loader(ds, SETTINGS, seed=3, data_path="reference")
    unaug = make_loader(plain, SETTINGS, seed=3, data_path="fast")
    assert fast.path == "fast" and ref.path == "reference"
    fb, rb, ub = _epoch(fast, 5), _epoch(ref, 5, tf), _epoch(unaug, 5)
    rows = _rows_of(_pixels(_cat(ub, "img"), tf), ds)
    for k in ("target", "poison", "origin"):
        assert torch.equal(_cat(fb, k), _cat(ub, k)) and torch.equal(_cat(rb, k), _cat(ub, k))
    src = torch.nn.functional.pad(_stored(ds, rows), (pad,) * 4)  # [N, 3, 40, 40], fill 0
    views = src.unfold(2, 32, 1).unfold(3, 32, 1)  # [N, 3, 9, 9, 32, 32]: every crop
    for batches in (fb, rb):
        got = _pixels(_cat(batches, "img"), tf)
        params = set()
        for i, x in enumerate(got):
            mine = set()
            for flip, y in ((0, x), (1, x.flip(-1))):
                hit = (views[i] == y[:, None, None]).flatten(3).all(-1).all(0).nonzero()
                mine |= {(flip, int(t), int(left)) for t, left in hit}
            assert len(mine) == 1, f"image {i}: {len(mine)} crops or flips of its stored image"
            params |= mine
        assert {p[0] for p in params} == {0, 1} and len(params) > 20


def test_deterministic_transforms_give_identical_batches():
    """Augmentation ops whose outcome is fixed (centre crop, bicubic resize, a flip with
    p = 1): the fast path's training batches equal the reference's pixel for pixel."""
    section = {"primary": {"center_crop": {"size": 28},
                           "resize": {"size": 32, "interpolation": 3},
                           "random_horizontal_flip": {"p": 1.0}},
               "remaining": yaml.safe_load(SUP.read_text())["transform"]["test"]["remaining"]}
    _, ds, tf = _dataset("train", section=section)
    assert choose_data_path(ds, "auto") == "fast"
    fb = _epoch(make_loader(ds, SETTINGS, seed=2, data_path="fast"), 1)
    rb = _epoch(make_loader(ds, SETTINGS, seed=2, data_path="reference"), 1, tf)
    for f, r in zip(fb, rb, strict=True):
        assert torch.equal(_pixels(f["img"], tf), _pixels(r["img"], tf))
        torch.testing.assert_close(f["img"], r["img"], rtol=0, atol=ROUNDING)
        assert torch.equal(f["origin"], r["origin"]) and torch.equal(f["poison"], r["poison"])


def test_poisoned_images_carry_the_trigger_and_target_label():
    """Both paths: a poisoned image is its raw image with the BadNets trigger's nonzero
    elements written over it (trigger read by hand), a clean one is its raw image."""
    cfg, ds, tf = _dataset("test")
    images, targets, poison = _synthetic(len(ds))
    trigger = np.asarray(Image.open(REPO_ROOT / cfg["backdoor"]["badnets"]["trigger_path"]))
    mask = trigger != 0
    assert 0 < mask.sum() < mask.size
    want = images.copy()
    want[poison == 1] = np.where(mask, trigger, images[poison == 1])
    want = torch.from_numpy(want).permute(0, 3, 1, 2)
    settings = {**SETTINGS, "batch_size": 64}
    fast = next(iter(make_eval_loader(ds, settings, data_path="fast")))
    ref = _reference_batches(make_eval_loader(ds, settings, data_path="reference"), tf)[0]
    target = cfg["backdoor"]["target_label"]
    for batch in (fast, ref):
        assert torch.equal(_pixels(batch["img"], tf), want)
        p = batch["poison"].bool()
        assert torch.equal(p, torch.from_numpy(poison).bool())
        assert (batch["target"][p] == target).all()
        assert torch.equal(batch["target"][~p], batch["origin"][~p])
        assert torch.equal(batch["origin"], torch.from_numpy(targets))


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


def test_simclr_views_differ_and_follow_the_reference_order():
    """SimCLR pairs: two independent views per image, the samples in the reference path's
    order for the same seed and epoch."""
    _, ds, _ = _dataset("aug", src=SIM)
    pairs = [make_loader(SelfPoisonDataset(ds, ds.transform), SETTINGS, seed=5, data_path=p)
             for p in ("fast", "reference")]
    fb, rb = _epoch(pairs[0], 1), _epoch(pairs[1], 1)
    assert set(fb[0]) >= {"img1", "img2", "target", "poison", "origin"}
    assert fb[0]["img1"].shape == fb[0]["img2"].shape == (16, 3, 32, 32)
    assert not torch.equal(fb[0]["img1"], fb[0]["img2"])  # two independent views
    for k in ("target", "poison", "origin"):
        assert torch.equal(_cat(fb, k), _cat(rb, k)), k


@pytest.mark.parametrize("labelled", [True, False])
def test_mixmatch_subsets_read_the_right_rows(labelled):
    """The labelled (semi_idx 1) or unlabelled part: unshuffled, both paths give exactly the
    stored images and labels of those rows in order (both views alike without augmentation);
    shuffled, the two paths agree batch for batch on a permutation of those rows."""
    _, ds, tf = _dataset("test")
    semi = np.zeros(len(ds), dtype=np.int64)
    semi[::3] = 1
    rows = np.flatnonzero(semi == (1 if labelled else 0))
    views = ("img",) if labelled else ("img1", "img2")
    sub = MixMatchDataset(ds, semi, labelled)
    for path in ("fast", "reference"):
        loader = make_loader(sub, SETTINGS, shuffle=False, data_path=path)
        got = _epoch(loader, 1, tf if path == "reference" else None)
        assert set(got[0]) >= {*views, "target", "poison", "origin"}
        assert "img" not in got[0] or labelled
        for v in views:
            assert torch.equal(_pixels(_cat(got, v), tf), _stored(ds, rows)), (path, v)
        for k, want in (("target", ds.targets), ("poison", ds.poison_idx),
                        ("origin", ds.origin)):
            assert np.array_equal(_cat(got, k).numpy(), want[rows]), (path, k)
    fb, rb = (_epoch(make_loader(sub, SETTINGS, seed=7, data_path=p), 4,
                     tf if p == "reference" else None) for p in ("fast", "reference"))
    for f, r in zip(fb, rb, strict=True):
        for v in views:
            assert torch.equal(_pixels(f[v], tf), _pixels(r[v], tf))
        assert torch.equal(f["origin"], r["origin"])
    shuffled = _rows_of(_pixels(_cat(fb, views[0]), tf), ds)
    assert sorted(shuffled) == rows.tolist() and shuffled != rows.tolist()


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
