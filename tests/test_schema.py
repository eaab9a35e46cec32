"""The config schema (utils/schema.py): every key a config holds and every key the code reads
is declared there once, with its type and default."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

import mixmatch_finetune
import pipeline.evaluate
import simclr
import supervise
from data.attacks import ATTACKS
from utils import schema
from utils.cli import StageArgs
from utils.config import apply_overrides, load_yaml
from utils.errors import ConfigError
from utils.setup import config_location, run_dirs

from .conftest import REPO_ROOT, tiny_stage_configs

NAMED = {f.name for f in dataclasses.fields(schema.Config) if "named" in f.metadata}


def declared(parts: tuple[str, ...]) -> bool:
    """Whether the schema declares the key path: a fixed section's key, or a key under a
    named variant (``network.resnet18_cifar.width``, ``backdoor.badnets.trigger_path``), which
    the variant's registry declares."""
    if schema.declared_type(list(parts)) is not None:
        return True
    if parts[0] in NAMED and len(parts) >= 2:
        return True
    section_of_named = {"warmup": "criterion", "semi": "criterion"}
    if len(parts) >= 3 and section_of_named.get(parts[0]) == parts[1]:
        return True  # warmup.criterion.sce.alpha: the loss registry's
    return parts[0] == "backdoor" and len(parts) >= 2 and parts[1] in ATTACKS


def _paths(node, prefix=()):
    for k, v in node.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


def test_every_key_of_every_shipped_config_is_declared():
    configs = [p for p in (REPO_ROOT / "config").rglob("*.yaml")
               if "profiles" not in p.parts and "attacks" not in p.parts]
    assert len(configs) > 30
    for path in configs:
        cfg = load_yaml(path)
        schema.check_config(cfg)
        for parts in _paths(cfg):
            assert declared(parts), f"{path.relative_to(REPO_ROOT)}: {'.'.join(parts)}"


def test_an_undeclared_key_is_an_error_naming_it():
    cfg = load_yaml(REPO_ROOT / "config/defense/mixmatch_finetune/badnets/cifar10_resnet18/"
                    "example.yaml")
    cfg["semi"] = {**cfg["semi"], "epsilom": 0.3}
    with pytest.raises(ConfigError, match="unknown key 'semi.epsilom'"):
        schema.check_config(cfg)
    cfg["semi"] = {**cfg["semi"], "epsilon": 1.5}
    cfg["semi"].pop("epsilom")
    with pytest.raises(ConfigError, match=r"semi.epsilon must be in \(0, 1\), got 1.5"):
        schema.check_config(cfg)
    with pytest.raises(ConfigError, match=r"--set semi.epsilon must be in \(0, 1\)"):
        apply_overrides(load_yaml(REPO_ROOT / "config/defense/mixmatch_finetune/badnets/"
                                  "cifar10_resnet18/example.yaml"), ["semi.epsilon=1.5"])


def test_key_order_and_optional_keys_come_from_the_schema():
    # the overlay loader orders top-level keys by the schema's declaration
    cfg = load_yaml(REPO_ROOT / "config/supervise/badnets/cifar10_resnet18/quick.yaml")
    order = [schema.TOP_LEVEL_KEYS.index(k) for k in cfg]
    assert order == sorted(order)
    # every key with a default may be set when a config leaves it out, with its type
    for cls, section in ((schema.SpeedSettings, "speed"), (schema.Semi, "semi"),
                         (schema.Warmup, "warmup")):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                assert schema.declared_type([section, f.name]) is not None
    assert schema.declared_type(["semi", "per_class"]) is bool
    assert schema.declared_type(["semi", "per_klass"]) is None
    assert schema.declared_type(["network", "resnet18_cifar", "width"]) is int


class Tracked(dict):
    """A config mapping that records the key paths the code reads."""

    def __init__(self, data, path=(), seen=None):
        super().__init__(data)
        self.path, self.seen = path, seen if seen is not None else set()

    def _wrap(self, key, value):
        self.seen.add(self.path + (key,))
        return Tracked(value, self.path + (key,), self.seen) if isinstance(value, dict) \
            else value

    def __getitem__(self, key):
        return self._wrap(key, super().__getitem__(key))

    def get(self, key, default=None):
        return self._wrap(key, super().get(key, default))

    def __contains__(self, key):
        self.seen.add(self.path + (key,))
        return super().__contains__(key)

    def __deepcopy__(self, memo):
        return Tracked(copy.deepcopy(dict(self), memo), self.path, self.seen)


def test_the_stages_read_only_declared_keys(tmp_path, fake_cifar, monkeypatch):
    """Every stage and the evaluation run on configs that record what is read: every key path
    read is declared (a key used in code but not in the schema fails here)."""
    seen: set[tuple[str, ...]] = set()
    monkeypatch.setitem(yaml.SafeDumper.yaml_representers, Tracked,
                        yaml.representer.SafeRepresenter.represent_dict)
    for module in (supervise, simclr):
        real = module.load_config
        monkeypatch.setattr(module, "load_config", lambda a, real=real: Tracked(real(a), (), seen))
    real_ft = mixmatch_finetune.finetune_config

    def finetune_config(args):
        cfg, *rest = real_ft(args)
        return (Tracked(cfg, (), seen), *rest)

    monkeypatch.setattr(mixmatch_finetune, "finetune_config", finetune_config)
    def short(sup, pre, ft):
        ft["semi"]["mixmatch"]["train_iteration"] = 2

    paths = tiny_stage_configs(tmp_path, fake_cifar, 2, edit=short)
    supervise.train(StageArgs(paths["supervise"], device="cpu", quiet=True))
    simclr.train(StageArgs(paths["simclr"], device="cpu", quiet=True))
    mixmatch_finetune.train(StageArgs(paths["finetune"], device="cpu", quiet=True))
    sup_cfg = load_yaml(paths["supervise"])
    ckpt = run_dirs(sup_cfg, *config_location(paths["supervise"]))[1] / "latest_model.pt"
    pipeline.evaluate.evaluate_checkpoint(Tracked(sup_cfg, (), seen), ckpt, "cpu")
    assert {"semi", "warmup", "loader", "backdoor", "network"} <= {p[0] for p in seen}
    assert ("semi", "epsilon") in seen and ("backdoor", "target_label") in seen
    undeclared = sorted(".".join(p) for p in seen if not declared(p))
    assert undeclared == []
