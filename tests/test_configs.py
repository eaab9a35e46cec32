"""Every shipped config passes its script's checks (with the dataset pointed at a fake copy)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest

import mixmatch_finetune
import simclr
import supervise
from data.backdoor import build_backdoor
from utils.config import apply_overrides, load_yaml
from utils.errors import UserError

from .conftest import REPO_ROOT, original_trigger_dir, write_fake_imagefolder

CONFIGS = sorted((REPO_ROOT / "config").rglob("*.yaml"))


def _original_hello_kitty() -> Path | None:
    d = original_trigger_dir()
    return d / "hello_kitty.png" if d is not None and (d / "hello_kitty.png").is_file() else None


def _hello_kitty_override(path: Path) -> list[str] | None:
    """[] when the config needs no download; the override that points a Blended config at a
    copy of the trigger in ``DBD_TRIGGER_DIR`` when it was not downloaded; None when there is
    no copy at all."""
    text = path.read_text()
    if "mixmatch_finetune" in str(path):
        text = (REPO_ROOT / load_yaml(path)["pretrain_config_path"]).read_text()
    if "hello_kitty.png" not in text or (REPO_ROOT / "data/trigger/hello_kitty.png").exists():
        return []
    copy = _original_hello_kitty()
    if copy is not None:
        return [f"backdoor.blend.trigger_path={copy}"]
    return None


def _clean_model_missing(path: Path) -> bool:
    """A label-consistent config whose clean model has not been trained: its check must say so."""
    cfg = load_yaml(path)
    if "mixmatch_finetune" in str(path):
        cfg = load_yaml(REPO_ROOT / cfg["pretrain_config_path"])
    if "label_consistent" not in cfg.get("backdoor", {}):
        return False
    _, ckpt = build_backdoor(cfg["backdoor"], REPO_ROOT).clean_model_paths()
    return not ckpt.is_file()


@pytest.fixture(scope="session")
def fake_imagenet30(tmp_path_factory) -> Path:
    return write_fake_imagefolder(tmp_path_factory.mktemp("imagenet30"),
                                  [f"n{c:02d}" for c in range(30)], per_class=1, size=(24, 32))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO_ROOT / "config")))
def test_config_passes_checks(path, fake_cifar, fake_imagenet30, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    rel = path.relative_to(REPO_ROOT)
    data_dir = fake_imagenet30 if "imagenet30" in path.parent.name else fake_cifar
    trigger = _hello_kitty_override(path)
    if trigger is None:
        pytest.skip("hello_kitty.png not downloaded (python -m data.download trigger hello_kitty)"
                    " and DBD_TRIGGER_DIR holds no copy")
    over = [f"dataset_dir={data_dir}", *trigger]
    expect = (pytest.raises(UserError, match="clean model checkpoint .* was not found")
              if _clean_model_missing(path) else nullcontext())
    with expect:
        if "mixmatch_finetune" in str(path):
            cfg, _, _ = mixmatch_finetune.merged_config(SimpleNamespace(config=str(rel),
                                                                        overrides=over))
            mixmatch_finetune.check(cfg)
        elif "simclr" in str(path):
            simclr.check(apply_overrides(load_yaml(path), over))
        else:
            supervise.check(apply_overrides(load_yaml(path), over))


@pytest.mark.parametrize("name", ["cpu.yaml", "quick.yaml"])
def test_cpu_configs_share_subset_and_width(name):
    for attack in ("badnets",):
        sup = load_yaml(REPO_ROOT / f"config/supervise/{attack}/cifar10_resnet18/{name}")
        pre = load_yaml(REPO_ROOT / f"config/defense/simclr/{attack}/cifar10_resnet18/{name}")
        ft = load_yaml(
            REPO_ROOT / f"config/defense/mixmatch_finetune/{attack}/cifar10_resnet18/{name}")
        assert ft["pretrain_config_path"].endswith(f"simclr/{attack}/cifar10_resnet18/{name}")
        # same subset and seed: No Defense and DBD poison the same images; same width so
        # test.py evaluates the DBD checkpoint with the supervise config
        for key in ("train_subset", "test_subset", "seed", "backdoor"):
            assert sup[key] == pre[key], key
        width = sup["network"]["resnet18_cifar"]["width"]
        assert pre["network"]["resnet18_cifar"]["width"] == width
        assert ft["network"]["resnet18_cifar"]["width"] == width


@pytest.mark.parametrize("attack", ["blend", "blend_random"])
@pytest.mark.parametrize("name", ["cpu.yaml", "quick.yaml"])
def test_cpu_sized_blend_configs_are_the_badnets_ones_but_the_trigger(attack, name):
    """The CPU-sized Blended configs are BadNets' with the Blended trigger of the attack's
    original config: when the BadNets ones change, copy them again."""
    def stages(a, n):
        return [load_yaml(REPO_ROOT / f"config/{st}/{a}/cifar10_resnet18/{n}")
                for st in ("supervise", "defense/simclr", "defense/mixmatch_finetune")]
    ours, badnets, original = stages(attack, name), stages("badnets", name), stages(attack,
                                                                                    "example.yaml")
    assert ours[0]["backdoor"] == ours[1]["backdoor"] == original[0]["backdoor"]
    assert ours[2]["pretrain_config_path"] == \
        f"config/defense/simclr/{attack}/cifar10_resnet18/{name}"
    for mine, theirs in zip(ours, badnets):
        drop = ("backdoor", "pretrain_config_path")
        assert {k: v for k, v in mine.items() if k not in drop} == \
            {k: v for k, v in theirs.items() if k not in drop}
