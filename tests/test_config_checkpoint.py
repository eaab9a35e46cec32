"""Config loading and --set overrides; checkpoint round trip and safe loading."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from data.attacks import gen_poison_idx
from data.build import load_split, poison_index
from model import build_linear_model
from utils.checkpoint import (
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from utils.config import apply_overrides, load_yaml, seed_settings
from utils.errors import CheckpointError, ConfigError
from utils.run import load_config
from utils.schema import Seed as SeedSettings
from utils.setup import config_location, seed_everything

from .conftest import REPO_ROOT

SUP = REPO_ROOT / "config/supervise/badnets/cifar10_resnet18/example.yaml"


def test_config_location():
    assert config_location("config/defense/simclr/badnets/cifar10_resnet18/example.yaml") == (
        "defense/simclr/badnets/cifar10_resnet18", "example")
    assert config_location("./config/x.yaml") == ("", "x")


def test_overrides_typed_and_nested():
    cfg = load_yaml(SUP)
    out = apply_overrides(cfg, ["optimizer.SGD.lr=0.05", "num_epochs=3", "train_subset=500",
                                "loader.pin_memory=false", "optimizer.SGD.weight_decay=0"])
    assert out["optimizer"]["SGD"]["lr"] == 0.05 and out["num_epochs"] == 3
    assert out["train_subset"] == 500 and out["loader"]["pin_memory"] is False
    assert isinstance(out["optimizer"]["SGD"]["weight_decay"], float)
    assert cfg["num_epochs"] == 200  # the loaded config is not modified


def test_yaml_boolean_words_stay_text_for_text_keys():
    cpu = load_yaml(REPO_ROOT / "config/supervise/badnets/cifar10_resnet18/quick.yaml")
    out = apply_overrides(cpu, ["speed.amp=off", "speed.channels_last=off"])
    assert out["speed"]["amp"] == "off"  # a text key: the word, not YAML's boolean
    assert out["speed"]["channels_last"] is False  # a boolean key: YAML's boolean
    # a speed switch the config does not name can be set too; other unknown keys cannot
    out = apply_overrides(cpu, ["speed.sync_every_step=True", "speed.optimizer_impl=for_loop"])
    assert out["speed"]["sync_every_step"] is True and out["speed"]["optimizer_impl"] == "for_loop"
    assert out["speed"]["amp"] == cpu["speed"]["amp"]
    with pytest.raises(ConfigError, match="unknown key 'speed.turbo'"):
        apply_overrides(cpu, ["speed.turbo=True"])


def test_optional_keys_can_be_set_when_the_config_leaves_them_out():
    ft = load_yaml(REPO_ROOT / "config/defense/mixmatch_finetune/badnets/cifar10_resnet18/quick.yaml")
    pre = load_yaml(REPO_ROOT / "config/defense/simclr/badnets/cifar10_resnet18/quick.yaml")
    assert "per_class" not in ft["semi"] and "freeze_bn" not in ft["warmup"]
    out = apply_overrides(ft, ["semi.per_class=true", "warmup.freeze_bn=yes"])
    assert out["semi"]["per_class"] is True and out["warmup"]["freeze_bn"] is True
    assert "per_class" not in ft["semi"]  # the loaded config is not modified
    out = apply_overrides(pre, ["criterion.simclr.symmetric=True", "backdoor.poison_mode=exact"])
    assert out["criterion"]["simclr"]["symmetric"] is True
    assert out["backdoor"]["poison_mode"] == "exact"
    sup = load_yaml(SUP)
    assert apply_overrides(sup, ["network.resnet18_cifar.width=16"])["network"][
        "resnet18_cifar"]["width"] == 16
    no_speed = {k: v for k, v in sup.items() if k != "speed"}
    assert apply_overrides(no_speed, ["speed.amp=off"])["speed"] == {"amp": "off"}
    for bad, match in (("semi.per_class=maybe", "expected bool"),
                       ("network.resnet18_cifar.width=wide", "expected int"),
                       ("semi.per_klass=true", "unknown key 'semi.per_klass'")):
        with pytest.raises(ConfigError, match=match):
            apply_overrides(ft, [bad])
    with pytest.raises(ConfigError, match="unknown key 'semi'"):
        apply_overrides(sup, ["semi.per_class=true"])  # only where the section exists


@pytest.mark.parametrize("override,match", [
    ("optimizer.SGD.lrr=0.1", "optimizer.SGD.lrr"),
    ("optimiser.SGD.lr=0.1", "optimiser"),
    ("num_epochs=ten", "expected int"),
    ("num_epochs=2.5", "expected int"),
    ("loader.pin_memory=3", "expected bool"),
    ("noequals", "key.path=value"),
])
def test_override_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(load_yaml(SUP), [override])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed:\n  seed: 100\n num_classes: [10\n")
    with pytest.raises(ConfigError, match="line"):
        load_yaml(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("num_epoch: 10\n")
    with pytest.raises(ConfigError, match="num_epoch"):
        load_yaml(typo)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("seed,want", [
    (None, SeedSettings(100, False, True)),
    (7, SeedSettings(7, False, True)),
    (0, SeedSettings(0, False, True)),
    ({"seed": 7}, SeedSettings(7, False, True)),
    ({"seed": 100, "deterministic": False, "benchmark": True}, SeedSettings(100, False, True)),
    ({"deterministic": True}, SeedSettings(100, True, True)),  # no seed key: 100
    ({}, SeedSettings(100, False, True)),
])
def test_seed_settings(seed, want):
    assert seed_settings({} if seed is None else {"seed": seed}) == want


@pytest.mark.parametrize("seed,match", [
    ("seven", "seed in the config must be a mapping or an integer"),
    (True, "must be a mapping or an integer"),
    ([7], "must be a mapping or an integer"),
    ({"seed": "7"}, "seed.seed in the config must be int"),
    ({"seed": True}, "seed.seed in the config must be int"),
    ({"deterministic": 1}, "seed.deterministic in the config must be bool"),
    ({"sede": 7}, "unknown key 'seed.sede'"),
])
def test_bad_seeds_are_one_line_errors(seed, match, tmp_path):
    with pytest.raises(ConfigError, match=match) as e:
        seed_settings({"seed": seed})
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"seed": seed}))
    with pytest.raises(ConfigError, match=match.replace("the config", ".*bad.yaml")):
        load_yaml(bad)
    # through --set: the override's type check or the seed check, one line either way
    with pytest.raises(ConfigError, match="seed") as e:
        load_config(SimpleNamespace(config=str(SUP), overrides=[f"seed={json.dumps(seed)}"]))
    assert "\n" not in str(e.value)
    if isinstance(seed, dict):
        with pytest.raises(ConfigError, match=match.replace("the config", "--set")):
            load_config(SimpleNamespace(config=str(SUP), overrides=[f"seed={json.dumps(seed)}"]))


def _poison(seed) -> np.ndarray:
    cfg = {"backdoor": {"poison_ratio": 0.1, "target_label": 3}}
    if seed is not None:
        cfg["seed"] = seed
    return poison_index(cfg, np.arange(1000) % 10, None, lambda msg: None)


def test_one_seed_for_the_poison_draw_and_the_subsets(fake_cifar):
    """A plain int seeds the poison draw and the subsets as the mapping form does; a mapping
    without ``seed`` and no seed at all both mean 100."""
    assert np.array_equal(_poison(7), _poison({"seed": 7}))
    assert np.array_equal(_poison(7), gen_poison_idx(np.arange(1000) % 10, 3, 0.1, seed=7))
    assert not np.array_equal(_poison(7), _poison(None))
    assert np.array_equal(_poison({"deterministic": False}), _poison(None))
    assert np.array_equal(_poison(None), gen_poison_idx(np.arange(1000) % 10, 3, 0.1, seed=100))

    def subset(seed, train=True):
        cfg = {"dataset_dir": str(fake_cifar), "train_subset": 50, "test_subset": 30}
        if seed is not None:
            cfg["seed"] = seed
        return load_split(cfg, train)[0]
    for train in (True, False):
        assert np.array_equal(subset(7, train), subset({"seed": 7}, train))
        assert not np.array_equal(subset(7, train), subset(None, train))
        assert np.array_equal(subset({"benchmark": True}, train), subset(None, train))
        assert np.array_equal(subset(None, train), subset(100, train))


def test_seed_everything_takes_a_plain_int():
    seed_everything({"seed": 7})
    assert torch.initial_seed() == 7 and seed_settings({"seed": 7}).seed == 7
    seed_everything({"seed": {"benchmark": True}})
    assert torch.initial_seed() == 100 and seed_settings({}).seed == 100


def _model():
    return build_linear_model({"network": {"resnet18_cifar": {"num_classes": 10, "width": 8}}})


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1])
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step()
    random.seed(3)
    np.random.seed(3)
    state = {"epoch": 7, "result": {"clean_test": {"acc": 0.5}},
             "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
             "scheduler_state_dict": sched.state_dict(), "best_acc": 0.5, "best_epoch": 7,
             "rng_state": rng_state()}
    path = tmp_path / "latest_model.pt"
    save_checkpoint(state, path)
    assert not list(tmp_path.glob(".*.tmp"))
    expected = (random.random(), np.random.rand(), torch.rand(1))
    ck = load_checkpoint(path)  # weights_only=True
    assert ck["epoch"] == 7 and ck["best_acc"] == 0.5 and ck["result"]["clean_test"]["acc"] == 0.5
    other = _model()
    load_model_state(other, ck["model_state_dict"], path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    opt2 = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ck["optimizer_state_dict"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01)
    set_rng_state(ck["rng_state"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="truncated or not"):
        load_checkpoint(junk)
    good = tmp_path / "good.pt"
    save_checkpoint({"model_state_dict": _model().state_dict()}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError):
        load_checkpoint(cut)
    wide = build_linear_model({"network": {"resnet18_cifar": {"width": 16}}})
    with pytest.raises(CheckpointError, match="shape"):
        load_model_state(wide, load_checkpoint(good)["model_state_dict"], good)
    ddp = {"module." + k: v for k, v in _model().state_dict().items()}
    load_model_state(_model(), ddp)  # DDP prefix stripped


def test_result_files_of_earlier_versions_are_read_under_todays_names(tmp_path):
    """CSV files (and checkpoints' results) written with the earlier names (``acc``,
    ``robust acc``, ``labeled``, spaces) read back under BA / ASR / RA and "labelled"."""
    from utils.metrics import CSVLog, current_names, read_csv

    log = tmp_path / "log"
    log.mkdir()
    (log / "poison_test.csv").write_text("epoch,loss,acc,robust acc\n1,2.5,0.9,0.05\n")
    (log / "clean_test.csv").write_text("epoch,loss,acc\n1,0.5,0.8\n")
    (log / "split.csv").write_text("epoch,labeled,unlabeled,poisoned_labeled,poisoned_total,"
                                   "precision,recall\n4,10,10,3,5,0.2,0.4\n")
    (log / "poison_train.csv").write_text("epoch,loss,acc,poison loss,poison acc\n1,1,0.5,2,0.1\n")
    assert read_csv(log / "poison_test.csv") == [{"epoch": 1, "loss": 2.5, "ASR": 0.9, "RA": 0.05}]
    assert read_csv(log / "clean_test.csv") == [{"epoch": 1, "loss": 0.5, "BA": 0.8}]
    assert read_csv(log / "split.csv")[0] == {"epoch": 4, "labelled": 10, "unlabelled": 10,
                                              "poisoned_labelled": 3, "poisoned_total": 5,
                                              "precision": 0.2, "recall": 0.4}
    assert list(read_csv(log / "poison_train.csv")[0]) == ["epoch", "loss", "acc", "poison_loss",
                                                           "poison_acc"]
    # a new row continues an old file under the new names, without a space in any header
    CSVLog(log).write("clean_test", 2, {"loss": 0.4, "BA": 0.85})
    assert (log / "clean_test.csv").read_text().splitlines() == ["epoch,loss,BA", "1,0.5,0.8",
                                                                 "2,0.4,0.85"]
    assert current_names("poison_test", {"acc": 0.5, "robust acc": 0.1}) == {"ASR": 0.5, "RA": 0.1}
