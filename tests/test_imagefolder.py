"""Image-folder datasets (``dataset: imagefolder``), their triggers, the data-path choice and the
ImageNet ResNet-18."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import supervise
from data.attacks import BadNets, Blend
from data.attacks.triggers import BADNETS_PATCH
from data.build import (
    build_poison_train,
    build_test_sets,
    choose_data_path,
    load_poison_data,
    load_split,
)
from data.dataset import MixMatchDataset, SelfPoisonDataset
from data.fast import fast_path_problem
from data.imagefolder import ImageFolderPoisonDataset, ImageFolderSource, scan_split
from data.transforms import ImageTransform
from model import build_backbone, build_linear_model
from utils.config import load_yaml
from utils.errors import ConfigError, DatasetError

from .conftest import REPO_ROOT, write_fake_imagefolder

CLASSES = ("cat", "airplane", "dog")  # written unsorted: labels follow the sorted names
NORM = {"to_tensor": True, "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}


@pytest.fixture
def folder(tmp_path):
    return write_fake_imagefolder(tmp_path / "tiny", CLASSES, per_class=4, size=(40, 48))


def tiny_cfg(folder, tmp_path, **extra) -> dict:
    cfg = {"seed": {"seed": 100}, "dataset": "imagefolder", "dataset_dir": str(folder),
           "num_classes": 3, "saved_dir": str(tmp_path / "saved"),
           "transform": {"pre": {"resize": {"size": [64, 64]}},
                         "train": {"primary": {"random_resize_crop": {"size": 32}},
                                   "remaining": NORM},
                         "test": {"primary": {"resize": {"size": 36}, "center_crop": {"size": 32}},
                                  "remaining": NORM}},
           "backdoor": {"poison_ratio": 0.25, "poison_mode": "exact", "target_label": 0,
                        "badnets": {"trigger_path": "./data/trigger/cifar_1.png"}}}
    cfg.update(extra)
    return cfg


def test_scan_sorted_classes_and_splits(folder):
    paths, labels, classes = scan_split(folder, "train")
    assert classes == sorted(CLASSES) == ["airplane", "cat", "dog"]
    assert len(paths) == 12 and np.array_equal(labels, np.repeat([0, 1, 2], 4))
    assert all(f"/train/{classes[y]}/" in p for p, y in zip(paths, labels))
    assert {p.rsplit(".", 1)[1] for p in paths} == {"png", "jpg"}
    val_paths, val_labels, val_classes = scan_split(folder, "val")
    assert val_classes == classes and len(val_paths) == 12
    assert all("/val/" in p for p in val_paths)


def test_load_split_subset_and_bad_folders(folder, tmp_path):
    cfg = tiny_cfg(folder, tmp_path)
    train, targets = load_split(cfg, train=True)
    assert isinstance(train, ImageFolderSource) and np.array_equal(train.targets, targets)
    img = train.load(0)
    assert img.dtype == np.uint8 and img.shape == (40, 48, 3)
    sub, sub_targets = load_split(dict(cfg, train_subset=6), train=True)
    assert len(sub) == 6 and np.array_equal(np.bincount(sub_targets), [2, 2, 2])
    with pytest.raises(ConfigError, match="3 class folders but num_classes is 10"):
        load_split(dict(cfg, num_classes=10), train=True)
    with pytest.raises(DatasetError, match="image folder not found"):
        load_split(dict(cfg, dataset_dir=str(tmp_path / "nowhere")), train=True)
    (folder / "val" / "dog").rename(folder / "val" / "wolf")
    with pytest.raises(DatasetError, match="train and val class folders differ"):
        load_split(cfg, train=False)


def test_corrupt_image_names_the_file(folder, tmp_path):
    bad = folder / "train" / "cat" / "img9.jpg"
    bad.write_bytes(b"not a jpeg at all")
    cfg = tiny_cfg(folder, tmp_path)
    train, targets = load_split(cfg, train=True)
    ds = build_poison_train(cfg, np.zeros(len(train)), train, targets,
                            ImageTransform(cfg["transform"]["train"], "transform.train",
                                           pre=cfg["transform"]["pre"]))
    i = train.paths.index(str(bad))
    with pytest.raises(DatasetError, match=r"cannot read image .*train/cat/img9\.jpg"):
        ds[i]
    ds[0]  # the others still load
    # the first image is decoded by the scripts' checks: a bad one fails before any output
    bad.rename(folder / "train" / "airplane" / "aaa.png")
    with pytest.raises(DatasetError, match=r"train/airplane/aaa\.png"):
        load_poison_data(cfg)


def test_poisoned_items_and_resized_badnets_trigger(folder, tmp_path):
    cfg = tiny_cfg(folder, tmp_path)
    data = load_poison_data(cfg)
    idx = np.zeros(12)
    idx[[4, 9]] = 1  # a cat and a dog
    tf = ImageTransform(cfg["transform"]["train"], "transform.train", pre=cfg["transform"]["pre"])
    ds = build_poison_train(cfg, idx, data.train_images, data.train_targets, tf)
    assert isinstance(ds, ImageFolderPoisonDataset)
    assert np.array_equal(ds.targets, np.where(idx == 1, 0, data.train_targets))
    item = ds[4]
    assert item["img"].shape == (3, 32, 32) and item["target"] == 0 and item["poison"] == 1
    assert item["origin"] == 1
    # the 2x2 trigger at rows/columns 4-5 of 32, resized (nearest) to the 64x64 pre-resized
    # image: a 4x4 patch at rows/columns 8-11 with the same colours
    img = ds.data[4]
    assert img.shape == (64, 64, 3)
    for (r, c), rgb in BADNETS_PATCH.items():
        assert np.all(img[2 * r:2 * r + 2, 2 * c:2 * c + 2] == rgb)
    clean = ds.data[5]
    assert not np.all(clean[8:12, 8:12] == img[8:12, 8:12])
    # the ASR set: the non-target validation images, triggered, labelled with the target
    clean_set, asr = build_test_sets(cfg, data.bd, data.test_images, data.test_targets)
    assert len(clean_set) == 12 and len(asr) == 8 and np.all(asr.targets == 0)
    assert set(asr.origin) == {1, 2} and asr[0]["img"].shape == (3, 32, 32)
    assert np.all(asr.data[0][8:10, 8:10] == BADNETS_PATCH[(4, 4)])


def test_cached_images_are_decoded_once(folder, tmp_path):
    cfg = tiny_cfg(folder, tmp_path, dataset={"imagefolder": {"cache": True}})
    train, targets = load_split(cfg, train=True)
    tf = ImageTransform(cfg["transform"]["test"], "transform.test", pre=cfg["transform"]["pre"])
    ds = build_poison_train(cfg, np.zeros(12), train, targets, tf)
    first = ds.data[3]
    train.paths[3] = "/nowhere/gone.png"  # a second decode would fail
    assert ds.data[3] is first
    with pytest.raises(ConfigError, match="dataset.imagefolder: unknown key 'cahce'"):
        load_poison_data(dict(cfg, dataset={"imagefolder": {"cahce": True}}))


def test_badnets_and_blend_follow_the_image_size():
    trigger = REPO_ROOT / "data/trigger/cifar_1.png"
    img = np.full((96, 64, 3), 7, dtype=np.uint8)
    out = BadNets(trigger, resize=True)(img)
    assert np.all(out[12:15, 8:10] == BADNETS_PATCH[(4, 4)])  # rows x3, columns x2
    with pytest.raises(Exception, match="32x32 but images are 64x96"):
        BadNets(trigger)(img)
    blended = Blend(REPO_ROOT / "data/trigger/random_pattern.png", 0.5)(img)
    assert blended.shape == img.shape and not np.array_equal(blended, img)


def test_image_folders_take_the_reference_path(folder, tmp_path):
    cfg = tiny_cfg(folder, tmp_path)
    train, targets = load_split(cfg, train=True)
    tf = ImageTransform(cfg["transform"]["train"], "transform.train", pre=cfg["transform"]["pre"])
    ds = build_poison_train(cfg, np.zeros(12), train, targets, tf)
    assert fast_path_problem(ds)  # not a PoisonLabelDataset: a reason, no fast path
    for wrapped in (ds, SelfPoisonDataset(ds, tf), MixMatchDataset(ds, np.ones(12), True)):
        assert choose_data_path(wrapped, "auto") == "reference"
        with pytest.raises(ConfigError, match="not held in memory"):
            choose_data_path(wrapped, "fast")
    pair = SelfPoisonDataset(ds, tf)[2]
    assert pair["img1"].shape == pair["img2"].shape == (3, 32, 32)


def test_wanet_and_label_consistent_refused_on_image_folders(folder, tmp_path):
    cfg = tiny_cfg(folder, tmp_path)
    cfg["backdoor"] = {"poison_ratio": 0.1, "target_label": 0, "wanet": {}}
    with pytest.raises(ConfigError, match="backdoor.wanet is not supported on image folders"):
        load_poison_data(cfg)


@pytest.mark.parametrize("size", [64, 224])
def test_imagenet_resnet18_forward(size):
    model = build_linear_model({"network": {"resnet18_imagenet": {"num_classes": 30}},
                                "num_classes": 30}).eval()
    assert model.backbone.feature_dim == 512
    assert model.backbone.conv1.kernel_size == (7, 7) and model.backbone.conv1.stride == (2, 2)
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 30)
    narrow = build_backbone({"resnet18_imagenet": {"width": 8}})
    assert narrow.feature_dim == 64 and narrow(torch.randn(1, 3, size, size)).shape == (1, 64)
    # 11.2 M parameters at width 64 with a 30-class head (torchvision's resnet18: 11.7 M with
    # its 1000-class head)
    assert 11.1e6 < sum(p.numel() for p in model.parameters()) < 11.3e6


def test_supervise_on_an_image_folder_end_to_end(folder, tmp_path, monkeypatch):
    """supervise.py then test.py with the shipped ImageNet config, shrunk: lazy loading, the
    resized trigger, the ImageNet stem, on the reference data path."""
    monkeypatch.chdir(REPO_ROOT)
    cfg = load_yaml(REPO_ROOT / "config/supervise/badnets/imagenet30_resnet18/example.yaml")
    cfg.update(dataset_dir=str(folder), num_classes=3, num_epochs=1, lr_scheduler=None,
               saved_dir=str(tmp_path / "saved"), storage_dir=str(tmp_path / "storage"),
               loader={"batch_size": 8, "num_workers": 0, "pin_memory": False})
    cfg["backdoor"].update(poison_ratio=0.3, poison_mode="exact", target_label=0)
    cfg["network"] = {"resnet18_imagenet": {"num_classes": 3, "width": 8}}
    t = cfg["transform"]
    t["pre"] = {"resize": {"size": 64}, "center_crop": {"size": 64}}
    t["train"]["primary"]["random_resize_crop"]["size"] = 56
    t["test"]["primary"] = {"resize": {"size": 64}, "center_crop": {"size": 56}}
    path = tmp_path / "config" / "supervise" / "imagefolder" / "tiny.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    supervise.main(["--config", str(path), "--resume", "False", "--quiet"])
    saved = tmp_path / "saved" / "supervise" / "imagefolder" / "tiny"
    final = json.loads((saved / "final_metrics.json").read_text())
    assert final["train_size"] == 12 and final["poisoned"] > 0
    assert "Data path: reference" in (saved / "log" / "supervise.log").read_text()
    proc = subprocess.run([sys.executable, "test.py", "--config", str(path), "--ckpt-dir",
                           str(tmp_path / "storage/supervise/imagefolder/tiny/checkpoint"),
                           "--resume", "latest_model.pt", "--json", "--quiet"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["clean_images"] == 12 and m["poison_images"] == 8
    assert m["BA"] == pytest.approx(final["BA"]) and m["ASR"] == pytest.approx(final["ASR"])
