"""WaNet and the label-consistent attack: the triggers, the poisoned training sets, the cache of
the adversarial perturbations, and supervise.py end to end on the synthetic CIFAR folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import data.attacks.label_consistent as lc_module
from data.attacks import WaNet, build_attack, gen_poison_idx
from data.attacks.label_consistent import pgd_perturb
from data.build import attack_dir, build_poison_train, build_test_sets, poison_index
from data.transforms import ImageTransform
from model import LinearModel, resnet18_cifar
from utils.checkpoint import save_checkpoint
from utils.config import load_yaml
from utils.errors import ConfigError, UserError

from .conftest import REPO_ROOT, assert_metrics_match, count_predictions

TEST_TF = {"primary": None, "remaining": {"to_tensor": True, "normalize": {
    "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}}}


def smooth_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Natural-ish images (smooth gradients plus a little noise): a small warp moves pixel
    values a little, unlike on pure noise."""
    rng = np.random.RandomState(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(-1, 1, 3)
        base = 128 + 100 * np.sin(3 * a * xx + 3 * b * yy + c)
        img = base[..., None] * rng.uniform(0.5, 1, 3) + rng.normal(0, 3, (size, size, 3))
        out.append(np.clip(img, 0, 255))
    return np.stack(out).astype(np.uint8)


def cfg_with(backdoor: dict, tmp_path, **extra) -> dict:
    return {"seed": {"seed": 100}, "dataset": "cifar10", "num_classes": 10,
            "saved_dir": str(tmp_path / "saved"),
            "backdoor": {"target_label": 3, **backdoor},
            "transform": {"pre": None, "test": TEST_TF}, **extra}


# --- WaNet --------------------------------------------------------------------------------------

def test_wanet_is_identity_at_zero_strength():
    x = np.random.RandomState(1).randint(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(WaNet(s=0.0)(x), x)
    assert np.array_equal(WaNet(s=0.0, k=8)(x[0]), x[0])  # one HWC image too


def test_wanet_warps_slightly_and_deterministically():
    x = smooth_images(8)
    w = WaNet(k=4, s=0.5, seed=0)
    y = w(x)
    assert y.dtype == np.uint8 and y.shape == x.shape
    assert not np.array_equal(y, x)
    diff = np.abs(y.astype(int) - x.astype(int))
    assert diff.max() > 0 and diff.mean() < 8  # a sub-pixel-to-pixel move, not a new image
    assert np.array_equal(w(x), y)  # deterministic
    assert not np.array_equal(WaNet(k=4, s=0.5, seed=1)(x), y)  # the seed draws the field
    # the field: k x k x 2, mean |value| 1
    assert w.field.shape == (2, 4, 4) and np.abs(w.field).mean() == pytest.approx(1, rel=1e-5)


def test_wanet_field_file_is_saved_and_reused(tmp_path):
    x = smooth_images(4)
    first = WaNet(seed=3)
    path = first.save_field(tmp_path)
    assert path == tmp_path / "wanet_field_k4_seed3.npy" and path.is_file()
    assert np.array_equal(np.load(path), first.field)
    # another seed, but the saved field file is used: the same output
    other = WaNet.from_config({"seed": 7, "field_path": str(path)})
    assert np.array_equal(other(x), first(x))
    # a saved file wins over the seed also through the default location
    np.save(path, -first.field)
    again = WaNet(seed=3)
    again.use_saved_field(tmp_path)
    assert np.array_equal(again.field, -first.field) and not np.array_equal(again(x), first(x))
    with pytest.raises(ConfigError, match="k = 5"):
        WaNet(k=5, seed=3, field_path=path)


def test_wanet_config_errors():
    with pytest.raises(ConfigError, match="backdoor.wanet: unknown key 'strength'"):
        WaNet.from_config({"strength": 0.5})
    with pytest.raises(ConfigError, match="backdoor.wanet.k"):
        WaNet.from_config({"k": 0})
    with pytest.raises(ConfigError, match="exactly one of"):
        build_attack({"wanet": {}, "badnets": {"trigger_path": "x.png"}})


def test_wanet_training_set_poison_and_noise_mode(tmp_path):
    rng = np.random.RandomState(0)
    images = smooth_images(200, seed=2)
    targets = rng.randint(0, 10, size=200)
    cfg = cfg_with({"poison_ratio": 0.1, "poison_mode": "exact",
                    "wanet": {"k": 4, "s": 0.5, "cross_ratio": 2, "seed": 0}}, tmp_path)
    idx = poison_index(cfg, targets, None, lambda m: None)
    tf = ImageTransform(TEST_TF, "transform.test")
    ds = build_poison_train(cfg, idx, images, targets, tf)
    bd = build_attack(cfg["backdoor"])
    poisoned = np.flatnonzero(idx == 1)
    cross = np.flatnonzero(ds.cross_idx == 1)
    assert len(poisoned) == 20 and len(cross) == 40  # cross ratio 2
    assert not set(cross) & set(poisoned)  # cross samples are not poisoned ...
    assert np.array_equal(ds.targets[cross], targets[cross])  # ... and keep their labels
    assert np.all(ds.poison_idx[cross] == 0)
    assert np.all(ds.targets[poisoned] == 3)
    assert np.array_equal(ds.data[poisoned], bd(images[poisoned]))
    # cross samples: warped, but not with the plain field (the grid noise)
    assert not np.array_equal(ds.data[cross], images[cross])
    assert not np.array_equal(ds.data[cross], bd(images[cross]))
    rest = np.flatnonzero((idx == 0) & (ds.cross_idx == 0))
    assert np.array_equal(ds.data[rest], images[rest])
    # the field was saved for the later stages, and a rebuild gives the same set
    assert (attack_dir(cfg) / "wanet_field_k4_seed0.npy").is_file()
    again = build_poison_train(cfg, idx, images, targets, tf)
    assert np.array_equal(again.data, ds.data) and np.array_equal(again.cross_idx, ds.cross_idx)
    # the ASR set: non-target test images, warped, labelled with the target
    clean, asr = build_test_sets(cfg, None, images, targets)
    keep = targets != 3
    assert len(asr) == keep.sum() and np.all(asr.targets == 3)
    assert np.array_equal(asr.data, bd(images[keep])) and np.array_equal(clean.data, images)


# --- label-consistent ---------------------------------------------------------------------------

def test_clean_label_poison_index_only_target_class():
    targets = np.arange(1000) % 10
    idx = gen_poison_idx(targets, 3, 0.025, seed=1, mode="exact", clean_label=True)
    assert idx.sum() == 25 and np.all(targets[idx == 1] == 3)
    idx = gen_poison_idx(targets, 3, 0.025, seed=1, mode="bernoulli", clean_label=True)
    assert 0 < idx.sum() and np.all(targets[idx == 1] == 3)
    with pytest.raises(ConfigError, match="are of the target class"):
        gen_poison_idx(targets, 3, 0.2, mode="exact", clean_label=True)


def tiny_model(seed=0) -> LinearModel:
    torch.manual_seed(seed)
    return LinearModel(resnet18_cifar(width=8), 64, 10)


def test_pgd_stays_in_the_ball_and_raises_the_loss():
    model = tiny_model().eval()
    x = smooth_images(16, seed=5)
    y = np.full(16, 3)
    mean, std = TEST_TF["remaining"]["normalize"]["mean"], TEST_TF["remaining"]["normalize"]["std"]
    adv = pgd_perturb(model, x, y, epsilon=8, steps=5, step_size=2, mean=mean, std=std,
                      batch_size=8)
    assert adv.dtype == np.uint8 and adv.shape == x.shape
    delta = np.abs(adv.astype(int) - x.astype(int))
    assert delta.max() <= 8 + 1 and delta.max() > 0

    def loss(imgs):
        t = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
        t = (t - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            return F.cross_entropy(model(t), torch.as_tensor(y)).item()
    assert loss(adv) > loss(x) + 1e-3


def write_clean_model(tmp_path, **network) -> str:
    """A clean supervise config and a checkpoint of a random tiny model where its run keeps it."""
    clean = load_yaml(REPO_ROOT / "config/supervise/clean/cifar10_resnet18/quick.yaml")
    clean.update(storage_dir=str(tmp_path / "storage"), saved_dir=str(tmp_path / "saved"))
    clean["network"] = {"resnet18_cifar": {"num_classes": 10, "width": 8, **network}}
    path = tmp_path / "config" / "supervise" / "clean" / "tiny.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(clean, sort_keys=False))
    ckpt = tmp_path / "storage" / "supervise" / "clean" / "tiny" / "checkpoint"
    ckpt.mkdir(parents=True)
    save_checkpoint({"epoch": 1, "model_state_dict": tiny_model().state_dict()},
                    ckpt / "latest_model.pt")
    return str(path)


def lc_cfg(tmp_path, clean_config: str, **lc) -> dict:
    return cfg_with({"poison_ratio": 0.05, "poison_mode": "exact", "label_consistent": {
        "clean_model_config": clean_config, "epsilon": 16, "steps": 3, "step_size": 4,
        "batch_size": 32, **lc}}, tmp_path)


def test_label_consistent_training_set_and_cache(tmp_path, monkeypatch):
    images = smooth_images(200, seed=3)
    targets = np.arange(200) % 10
    cfg = lc_cfg(tmp_path, write_clean_model(tmp_path))
    idx = poison_index(cfg, targets, None, lambda m: None)
    poisoned = np.flatnonzero(idx == 1)
    assert len(poisoned) == 10 and np.all(targets[poisoned] == 3)  # target class only

    calls = []
    real = lc_module.pgd_perturb
    monkeypatch.setattr(lc_module, "pgd_perturb",
                        lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    tf = ImageTransform(TEST_TF, "transform.test")
    ds = build_poison_train(cfg, idx, images, targets, tf)
    assert calls == [10]  # PGD on the poisoned images only
    assert np.array_equal(ds.targets, targets)  # labels kept: label-consistent
    assert np.array_equal(ds.poison_idx, idx.astype(int))
    bd = build_attack(cfg["backdoor"])
    mask, values = bd.corners(32, 32)
    assert mask.sum() == 4 * 9
    assert np.array_equal(ds.data[poisoned][:, mask], np.broadcast_to(values[mask], (10, 36, 3)))
    delta = np.abs(ds.data[poisoned].astype(int) - images[poisoned].astype(int))[:, ~mask]
    assert 0 < delta.max() <= 16 + 1  # the perturbation, within epsilon
    rest = np.flatnonzero(idx == 0)
    assert np.array_equal(ds.data[rest], images[rest])
    cached = list(attack_dir(cfg).glob("label_consistent_*.npz"))
    assert len(cached) == 1

    # the second build loads the cache: PGD must not run again
    def fail(*a, **k):
        raise AssertionError("PGD ran although its result was cached")
    monkeypatch.setattr(lc_module, "pgd_perturb", fail)
    again = build_poison_train(cfg, idx, images, targets, tf)
    assert np.array_equal(again.data, ds.data)

    # another poison index: another cache file, computed again
    monkeypatch.setattr(lc_module, "pgd_perturb", real)
    other = gen_poison_idx(targets, 3, 0.05, seed=5, mode="exact", clean_label=True)
    build_poison_train(cfg, other, images, targets, tf)
    assert len(list(attack_dir(cfg).glob("label_consistent_*.npz"))) == 2

    # the ASR set: the corner pattern only, on non-target images, labelled with the target
    _, asr = build_test_sets(cfg, None, images, targets)
    keep = targets != 3
    assert len(asr) == keep.sum() and np.all(asr.targets == 3)
    assert np.array_equal(asr.data[:, ~mask], images[keep][:, ~mask])
    assert np.all(asr.data[:, mask] == values[mask].astype(np.uint8))


def test_label_consistent_cache_of_another_set_is_refused(tmp_path):
    images = smooth_images(100, seed=3)
    targets = np.arange(100) % 10
    cfg = lc_cfg(tmp_path, write_clean_model(tmp_path))
    idx = poison_index(cfg, targets, None, lambda m: None)
    bd = build_attack(cfg["backdoor"])
    bd.poison_train_images(images, targets, idx, 3, attack_dir(cfg))
    path = next(attack_dir(cfg).glob("label_consistent_*.npz"))
    with np.load(path) as z:
        np.savez(path, images=z["images"], indices=z["indices"], n_train=50)
    with pytest.raises(UserError, match="delete it to recompute"):
        bd.poison_train_images(images, targets, idx, 3, attack_dir(cfg))


def test_label_consistent_needs_its_clean_model(tmp_path):
    clean = write_clean_model(tmp_path)
    bd = build_attack(lc_cfg(tmp_path, clean)["backdoor"])
    bd.check_clean_model()
    (tmp_path / "storage/supervise/clean/tiny/checkpoint/latest_model.pt").unlink()
    with pytest.raises(UserError, match="clean model checkpoint .*latest_model.pt was not found"):
        bd.check_clean_model()
    bd = build_attack(lc_cfg(tmp_path, str(tmp_path / "nowhere.yaml"))["backdoor"])
    with pytest.raises(UserError, match="nowhere.yaml does not exist"):
        bd.check_clean_model()
    with pytest.raises(ConfigError, match="clean_model_config"):
        build_attack({"label_consistent": {}})
    with pytest.raises(ConfigError, match="epsilon"):
        build_attack({"label_consistent": {"clean_model_config": clean, "epsilon": 0}})
    with pytest.raises(ConfigError, match="pattern"):
        build_attack({"label_consistent": {"clean_model_config": clean, "pattern": [[2]]}})


def test_corner_pattern_is_mirrored():
    bd = build_attack({"label_consistent": {"clean_model_config": "x.yaml",
                                              "pattern": [[1, 0], [0, 0]]}})
    img = np.full((8, 8, 3), 100, dtype=np.uint8)
    out = bd(img)[..., 0]
    assert out[0, 0] == out[0, 7] == out[7, 0] == out[7, 7] == 255  # the outer corners
    assert out[0, 1] == out[1, 0] == out[6, 7] == out[7, 6] == 0
    assert np.all(out[2:6, 2:6] == 100)


# --- configs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", ["wanet", "label_consistent"])
@pytest.mark.parametrize("name", ["example.yaml", "quick.yaml"])
def test_attack_configs_are_the_badnets_ones_but_the_backdoor(attack, name):
    """The attack's three configs are BadNets' but for the backdoor section (and the SimCLR run
    the fine-tuning reads): overlays on the BadNets ones (utils/overlay.py, ``base``)."""
    def stages(a):
        return [load_yaml(REPO_ROOT / f"config/{stage}/{a}/cifar10_resnet18/{name}")
                for stage in ("supervise", "defense/simclr", "defense/mixmatch_finetune")]
    sup, pre, ft = stages(attack)
    assert ft["pretrain_config_path"] == f"config/defense/simclr/{attack}/cifar10_resnet18/{name}"
    assert sup["backdoor"] == pre["backdoor"] and attack in sup["backdoor"]
    for ours, theirs in zip((sup, pre, ft), stages("badnets")):
        drop = ("backdoor", "pretrain_config_path")
        assert {k: v for k, v in ours.items() if k not in drop} == \
            {k: v for k, v in theirs.items() if k not in drop}
    if attack == "label_consistent":
        clean_path = sup["backdoor"]["label_consistent"]["clean_model_config"]
        assert clean_path == f"config/supervise/clean/cifar10_resnet18/{name}"
        clean = load_yaml(REPO_ROOT / clean_path)
        assert clean["backdoor"]["poison_ratio"] == 0
        assert {k: v for k, v in clean.items() if k != "backdoor"} == \
            {k: v for k, v in stages("badnets")[0].items() if k != "backdoor"}


# --- supervise.py end to end --------------------------------------------------------------------
# In-process (as dbd.py runs the stages): a fresh interpreter per run costs more than the run.

def run_script(name: str, *args) -> None:
    spec = importlib.util.spec_from_file_location(f"dbd_script_{name}", REPO_ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(a) for a in args])


def tiny_supervise_config(tmp_path, dataset_dir, attack: str, name: str = "tiny") -> Path:
    cfg = load_yaml(REPO_ROOT / f"config/supervise/{attack}/cifar10_resnet18/quick.yaml")
    cfg.update(dataset_dir=str(dataset_dir), saved_dir=str(tmp_path / "saved"),
               storage_dir=str(tmp_path / "storage"), num_epochs=1, train_subset=None,
               test_subset=None, lr_scheduler=None,
               loader={"batch_size": 32, "num_workers": 0, "pin_memory": False})
    cfg["network"]["resnet18_cifar"]["width"] = 8
    cfg["speed"] = {"amp": "off", "channels_last": False}
    path = tmp_path / "config" / "supervise" / attack / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_supervise_wanet_end_to_end(tmp_path, fake_cifar, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    cfg = tiny_supervise_config(tmp_path, fake_cifar, "wanet")
    run_script("supervise", "--config", cfg, "--resume", "False", "--quiet")
    saved = tmp_path / "saved" / "supervise" / "wanet" / "tiny"
    field = tmp_path / "saved" / "attacks" / "wanet_field_k4_seed0.npy"
    assert field.is_file() and np.load(field).shape == (2, 4, 4)
    log = (saved / "log" / "supervise.log").read_text()
    assert "WaNet(k=4, s=0.5" in log and "noise-mode samples keep their labels" in log
    final = json.loads((saved / "final_metrics.json").read_text())
    assert final["poisoned"] == int(np.load(saved / "poison_idx.npy").sum()) > 0
    ckpt = tmp_path / "storage" / "supervise" / "wanet" / "tiny" / "checkpoint"
    capsys.readouterr()
    run_script("test", "--config", cfg, "--ckpt-dir", ckpt, "--resume", "latest_model.pt",
               "--json", "--quiet")
    m = json.loads(capsys.readouterr().out)
    assert m["clean_images"] == 100 and m["poison_images"] == 90
    assert m["ASR"] == pytest.approx(final["ASR"])  # test.py warps with the same field


def test_supervise_label_consistent_end_to_end(tmp_path, fake_cifar, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    clean = tiny_supervise_config(tmp_path, fake_cifar, "clean")
    cfg = yaml.safe_load(tiny_supervise_config(tmp_path, fake_cifar, "label_consistent")
                         .read_text())
    cfg["backdoor"]["label_consistent"].update(clean_model_config=str(clean), steps=2)
    cfg["backdoor"]["poison_ratio"] = 0.05
    path = tmp_path / "config" / "supervise" / "label_consistent" / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # without the clean model: a clear error before anything is written
    with pytest.raises(UserError, match="clean model checkpoint .* not found; train the clean "
                                        "model first: python supervise.py --config"):
        run_script("supervise", "--config", path, "--resume", "False", "--quiet")
    assert not (tmp_path / "saved" / "supervise" / "label_consistent").exists()
    run_script("supervise", "--config", clean, "--resume", "False", "--quiet")
    run_script("supervise", "--config", path, "--resume", "False", "--quiet")
    saved = tmp_path / "saved" / "supervise" / "label_consistent" / "tiny"
    idx = np.load(saved / "poison_idx.npy")
    assert idx.sum() == 10  # 5 % of 200, all of the target class
    assert len(list((tmp_path / "saved" / "attacks").glob("label_consistent_*.npz"))) == 1
    assert "Label-consistent: PGD" in (saved / "log" / "supervise.log").read_text()
    final = json.loads((saved / "final_metrics.json").read_text())
    assert final["poisoned"] == 10
    # BA, ASR and RA: the latest model's predictions on the test set with the corner trigger,
    # counted by hand
    ckpt = tmp_path / "storage" / "supervise" / "label_consistent" / "tiny" / "checkpoint"
    counts = count_predictions(path, ckpt / "latest_model.pt")
    assert counts["triggered_total"] == 90
    assert_metrics_match(final, counts)
