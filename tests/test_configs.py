"""Every shipped config passes its script's checks (with the dataset pointed at a fake copy)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import mixmatch_finetune
import simclr
import supervise
from utils.config import apply_overrides, load_yaml

from .conftest import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "config").rglob("*.yaml"))


def _needs_hello_kitty(path: Path) -> bool:
    text = path.read_text()
    if "mixmatch_finetune" in str(path):
        text = (REPO_ROOT / load_yaml(path)["pretrain_config_path"]).read_text()
    return "hello_kitty.png" in text and not (REPO_ROOT / "data/trigger/hello_kitty.png").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT / "config")))
def test_config_passes_checks(path, fake_cifar, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    rel = path.relative_to(REPO_ROOT)
    over = [f"dataset_dir={fake_cifar}"]
    if _needs_hello_kitty(path):
        pytest.skip("hello_kitty.png not downloaded (python -m data.download trigger hello_kitty)")
    if "mixmatch_finetune" in str(path):
        cfg, _, _ = mixmatch_finetune.merged_config(SimpleNamespace(config=str(rel), overrides=over))
        mixmatch_finetune.check(cfg)
    elif "simclr" in str(path):
        simclr.check(apply_overrides(load_yaml(path), over))
    else:
        supervise.check(apply_overrides(load_yaml(path), over))


def test_cpu_configs_share_subset_and_width():
    for attack in ("badnets",):
        sup = load_yaml(REPO_ROOT / f"config/supervise/{attack}/cifar10_resnet18/cpu.yaml")
        pre = load_yaml(REPO_ROOT / f"config/defense/simclr/{attack}/cifar10_resnet18/cpu.yaml")
        ft = load_yaml(
            REPO_ROOT / f"config/defense/mixmatch_finetune/{attack}/cifar10_resnet18/cpu.yaml")
        # same subset and seed: No Defense and DBD poison the same images; same width so
        # test.py evaluates the DBD checkpoint with the supervise config
        for key in ("train_subset", "test_subset", "seed", "backdoor"):
            assert sup[key] == pre[key], key
        width = sup["network"]["resnet18_cifar"]["width"]
        assert pre["network"]["resnet18_cifar"]["width"] == width
        assert ft["network"]["resnet18_cifar"]["width"] == width
