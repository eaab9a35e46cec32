"""The SIG attack (Barni, Kallas & Tondi 2019): the sinusoidal trigger's exact values, its
settings, its clean-label poison index, the training and test sets it builds, and its configs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data.attacks import (
    ATTACK_TYPES,
    SIG,
    build_attack,
    gen_poison_idx,
    image_folder_attacks,
    poisons_target_class,
)
from data.build import (
    build_poison_train,
    build_test_sets,
    load_poison_data,
    load_split,
    poison_index,
)
from data.transforms import ImageTransform
from utils.config import load_yaml
from utils.errors import ConfigError

from .conftest import REPO_ROOT, write_fake_imagefolder

TEST_TF = {"primary": None, "remaining": {"to_tensor": True, "normalize": {
    "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}}}


def reference(img: np.ndarray, delta: float = 20, f: float = 6) -> np.ndarray:
    """The trigger written out pixel by pixel with Python's math: x + Δ·sin(2π·j·f/m), clipped
    to [0, 255], rounded (``round``: ties to even, like NumPy's rint)."""
    img = np.asarray(img)
    out = np.empty_like(img)
    m = img.shape[-2]
    for idx in np.ndindex(img.shape):
        j = idx[-2]
        x = float(img[idx]) + delta * math.sin(2 * math.pi * j * f / m)
        out[idx] = round(min(255.0, max(0.0, x)))
    return out


def random_images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(n, h, w, 3)).astype(np.uint8)


def sig_cfg(tmp_path, ratio: float = 0.05, mode: str = "exact", **extra) -> dict:
    return {"seed": {"seed": 100}, "dataset": "cifar10", "num_classes": 10,
            "saved_dir": str(tmp_path / "saved"),
            "backdoor": {"target_label": 3, "poison_ratio": ratio, "poison_mode": mode,
                         "sig": {}},
            "transform": {"pre": None, "test": TEST_TF}, **extra}


# --- the trigger --------------------------------------------------------------------------------

def test_constant_grey_image_gets_the_rounded_sinusoid():
    x = np.full((32, 32, 3), 128, dtype=np.uint8)
    out = SIG()(x)
    # hand-checked: 20·sin(2π·6·j/32) = 20·sin(3πj/8) = 0, 18.48, 14.14, −7.65, −20, −7.65, ...
    assert out[0, :8, 0].tolist() == [128, 146, 142, 120, 108, 120, 142, 146]
    want = [min(255, max(0, 128 + round(20 * math.sin(2 * math.pi * 6 * j / 32))))
            for j in range(32)]
    assert out[0, :, 0].tolist() == want
    assert np.array_equal(out, reference(x))
    assert out.dtype == np.uint8 and out.shape == x.shape


def test_random_images_match_the_reference_and_other_settings_too():
    x = random_images(3, seed=1)
    assert np.array_equal(SIG()(x), reference(x))
    assert np.array_equal(SIG(delta=7.3, frequency=2.5)(x), reference(x, 7.3, 2.5))
    assert np.array_equal(SIG(delta=255, frequency=1)(x), reference(x, 255, 1))


def test_clipping_at_0_and_255():
    bd = SIG()
    high = bd(np.full((32, 32, 3), 250, dtype=np.uint8))[0, :, 0]
    low = bd(np.full((32, 32, 3), 5, dtype=np.uint8))[0, :, 0]
    assert high.max() == 255 and high[1] == 255 and high[4] == 230  # 250 + 18.48 clipped; 250 − 20
    assert low.min() == 0 and low[4] == 0 and low[1] == 23  # 5 − 20 clipped; 5 + 18.48
    # m = 8: 20·sin(3πj/2) = 0, −20, 0, 20, ...: white loses 20 where the sine is −1 only
    assert bd(np.full((4, 8, 3), 255, np.uint8))[0, :, 0].tolist() == \
        [255, 235, 255, 255, 255, 235, 255, 255]
    extremes = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    extremes[1] = 255
    assert np.array_equal(bd(extremes), reference(extremes))


def test_batch_equals_per_image_and_returns_a_new_array():
    x = random_images(5, seed=2)
    keep = x.copy()
    bd = SIG()
    batch = bd(x)
    assert batch is not x and batch.dtype == np.uint8 and batch.shape == x.shape
    assert np.array_equal(x, keep)  # the input is not changed
    assert np.array_equal(batch, np.stack([bd(img) for img in x]))
    single = bd(x[0])
    assert single is not x[0] and np.array_equal(single, batch[0])
    # a batch larger than one float64 block gives the same as its parts
    big = random_images(1100, h=4, w=8, seed=3)
    assert np.array_equal(bd(big), np.concatenate([bd(big[:600]), bd(big[600:])]))


def test_the_signal_is_the_same_for_every_row_and_channel_and_follows_the_width():
    x = np.full((24, 40, 3), 100, dtype=np.uint8)  # not square: m is the width, 40
    out = SIG()(x).astype(int)
    assert np.all(out == out[:1, :, :1])  # every row and channel alike
    want = [100 + round(20 * math.sin(2 * math.pi * 6 * j / 40)) for j in range(40)]
    assert out[0, :, 0].tolist() == want
    # columns, not rows: a transposed image gets a different signal
    assert not np.array_equal(SIG()(np.full((40, 24, 3), 100, np.uint8))[:, 0, 0],
                              out[0, :, 0])


def test_not_an_image_is_a_type_error():
    with pytest.raises(TypeError, match="HWC"):
        SIG()(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(TypeError, match="HWC"):
        SIG()([[1, 2, 3]])


# --- settings -----------------------------------------------------------------------------------

def test_registry_defaults_and_rule():
    assert ATTACK_TYPES["sig"] is SIG and SIG.name == "sig"
    bd = build_attack({"sig": {}})
    assert isinstance(bd, SIG) and (bd.delta, bd.frequency) == (20, 6)
    assert repr(bd) == "SIG(delta=20, frequency=6)"
    bd = build_attack({"sig": {"delta": 40, "frequency": 3}})
    assert (bd.delta, bd.frequency) == (40, 3)
    assert SIG.clean_label and poisons_target_class({"sig": {}, "target_label": 3})
    assert "sig" in image_folder_attacks()
    assert bd.prerequisite() is None


@pytest.mark.parametrize("sub,match", [
    ({"amplitude": 20}, r"backdoor\.sig: unknown key 'amplitude' \(known: delta, frequency\)"),
    ({"delta": 0}, r"backdoor\.sig\.delta must be in \(0, 255\]"),
    ({"delta": -5}, r"backdoor\.sig\.delta must be in \(0, 255\]"),
    ({"delta": 256}, r"backdoor\.sig\.delta must be in \(0, 255\]"),
    ({"delta": "20"}, r"backdoor\.sig\.delta must be a number, got '20'"),
    ({"delta": True}, r"backdoor\.sig\.delta must be a number, got True"),
    ({"delta": None}, r"backdoor\.sig\.delta must be a number, got None"),
    ({"delta": float("nan")}, r"backdoor\.sig\.delta must be a number"),
    ({"frequency": 0}, r"backdoor\.sig\.frequency must be positive"),
    ({"frequency": -1}, r"backdoor\.sig\.frequency must be positive"),
    ({"frequency": [6]}, r"backdoor\.sig\.frequency must be a number, got \[6\]"),
])
def test_config_errors_are_one_line(sub, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_attack({"sig": sub})
    assert "\n" not in str(e.value)


def test_sig_and_another_attack_or_no_mapping_are_refused():
    with pytest.raises(ConfigError, match="exactly one of") as e:
        build_attack({"sig": {}, "wanet": {}})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="backdoor.sig must be a mapping"):
        build_attack({"sig": 20})


# --- the poison index and the training set -----------------------------------------------------

def test_poison_index_is_drawn_from_the_target_class_only(tmp_path):
    targets = np.arange(2000) % 10  # 200 per class
    idx = poison_index(sig_cfg(tmp_path), targets, None, lambda m: None)
    poisoned = np.flatnonzero(idx == 1)
    assert len(poisoned) == 100 and np.all(targets[poisoned] == 3)  # 5 % of all = half of class 3
    # Bernoulli draws: target class only too, about half of it
    idx = poison_index(sig_cfg(tmp_path, mode="bernoulli"), targets, None, lambda m: None)
    poisoned = np.flatnonzero(idx == 1)
    assert np.all(targets[poisoned] == 3) and 60 < len(poisoned) < 140
    assert np.array_equal(idx, gen_poison_idx(targets, 3, 0.05, seed=100, clean_label=True))


@pytest.mark.parametrize("mode", ["exact", "bernoulli"])
def test_ratio_of_the_class_size_poisons_the_whole_class_and_more_is_refused(tmp_path, mode):
    """BackdoorBench's 10 %: ratio × N equals the target class (class-balanced 10 classes)."""
    targets = np.arange(20000) % 10  # the quick/cpu subset's size: 2,000 per class
    idx = gen_poison_idx(targets, 3, 0.1, seed=100, mode=mode, clean_label=True)
    assert np.array_equal(idx == 1, targets == 3)
    with pytest.raises(ConfigError, match="poison_ratio 0.11") as e:
        gen_poison_idx(targets, 3, 0.11, seed=100, mode=mode, clean_label=True)
    assert "\n" not in str(e.value)


def test_training_set_keeps_labels_and_signals_only_the_poisoned_images(tmp_path):
    images = random_images(200, seed=4)
    targets = np.arange(200) % 10
    cfg = sig_cfg(tmp_path)
    idx = poison_index(cfg, targets, None, lambda m: None)
    poisoned = np.flatnonzero(idx == 1)
    assert len(poisoned) == 10 and np.all(targets[poisoned] == 3)
    ds = build_poison_train(cfg, idx, images, targets, ImageTransform(TEST_TF, "transform.test"))
    assert np.array_equal(ds.targets, targets)  # labels kept: clean-label
    assert np.array_equal(ds.origin, targets)
    assert np.array_equal(ds.poison_idx, idx.astype(int))
    assert np.array_equal(ds.data[poisoned], reference(images[poisoned]))
    rest = np.flatnonzero(idx == 0)
    assert np.array_equal(ds.data[rest], images[rest])
    assert not (tmp_path / "saved").exists()  # nothing to prepare or save


# --- the triggered test set ---------------------------------------------------------------------

def test_triggered_test_set_is_the_non_target_images_labelled_with_the_target(tmp_path,
                                                                               fake_cifar):
    cfg = sig_cfg(tmp_path, dataset_dir=str(fake_cifar))
    images, targets = load_split(cfg, train=False)
    assert np.any(targets == 3) and np.any(targets != 3)
    clean, asr = build_test_sets(cfg)
    keep = targets != 3
    assert len(asr) == keep.sum() and len(clean) == len(targets)
    assert np.all(asr.targets == 3) and np.all(asr.poison_idx == 1)
    assert np.array_equal(asr.origin, targets[keep]) and np.all(asr.origin != 3)
    assert np.array_equal(asr.data, reference(images[keep]))
    assert np.array_equal(clean.data, images) and np.array_equal(clean.targets, targets)
    item = asr[0]
    assert item["target"] == 3 and item["poison"] == 1 and item["origin"] != 3


def test_runs_on_image_folders_at_the_pre_transform_size(tmp_path):
    """Non-square images resized by ``transform.pre`` (48 × 40 → 64 × 56): the signal follows
    the width, per image, on the poisoned training images and the triggered test set."""
    folder = write_fake_imagefolder(tmp_path / "tiny", ("cat", "airplane", "dog"), per_class=4)
    norm = {"to_tensor": True, "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    cfg = {"seed": {"seed": 100}, "dataset": "imagefolder", "dataset_dir": str(folder),
           "num_classes": 3, "saved_dir": str(tmp_path / "saved"),
           "transform": {"pre": {"resize": {"size": [64, 56]}},
                         "train": {"primary": None, "remaining": norm},
                         "test": {"primary": None, "remaining": norm}},
           "backdoor": {"poison_ratio": 0.25, "poison_mode": "exact", "target_label": 0,
                        "sig": {}}}
    data = load_poison_data(cfg)
    idx = poison_index(cfg, data.train_targets, None, lambda m: None)
    poisoned = np.flatnonzero(idx == 1)
    assert len(poisoned) == 3 and np.all(data.train_targets[poisoned] == 0)
    tf = ImageTransform(cfg["transform"]["train"], "transform.train", pre=cfg["transform"]["pre"])
    ds = build_poison_train(cfg, idx, data.train_images, data.train_targets, tf)
    assert np.array_equal(ds.targets, data.train_targets)
    for i in range(len(ds)):
        plain = tf.apply_pre(data.train_images.load(i))
        assert plain.shape == (64, 56, 3)
        want = reference(plain) if idx[i] == 1 else plain
        assert np.array_equal(ds.image(i), want)
    _, asr = build_test_sets(cfg)
    assert len(asr) == 8 and np.all(asr.targets == 0) and np.all(asr.origin != 0)
    assert asr[0]["img"].shape == (3, 64, 56)


# --- configs ------------------------------------------------------------------------------------

STAGES = ("supervise", "defense/simclr", "defense/mixmatch_finetune")


@pytest.mark.parametrize("profile", ["example", "quick", "cpu"])
def test_sig_configs_are_the_badnets_ones_but_the_backdoor(profile):
    def stages(attack):
        return [load_yaml(REPO_ROOT / f"config/{stage}/{attack}/cifar10_resnet18/{profile}.yaml")
                for stage in STAGES]
    sup, pre, ft = stages("sig")
    assert ft["pretrain_config_path"] == \
        f"config/defense/simclr/sig/cifar10_resnet18/{profile}.yaml"
    assert sup["backdoor"] == pre["backdoor"] == {
        "poison_ratio": 0.05, "target_label": 3, "poison_mode": "exact",
        "sig": {"delta": 20, "frequency": 6}}
    for ours, theirs in zip((sup, pre, ft), stages("badnets")):
        drop = ("backdoor", "pretrain_config_path")
        assert {k: v for k, v in ours.items() if k not in drop} == \
            {k: v for k, v in theirs.items() if k not in drop}
    build_attack(sup["backdoor"], REPO_ROOT)


@pytest.mark.parametrize("profile", ["quick", "cpu", "paper"])
def test_dbd_finds_the_sig_configs(profile):
    import dbd
    from pipeline.plan import stage_configs

    assert dbd.chosen_attacks("sig", profile) == ["sig"]
    assert stage_configs("sig", profile) is not None
