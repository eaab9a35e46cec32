"""The shipped configs: each passes its script's checks (with the dataset pointed at a fake
copy), the overlays resolve as their bases, fragments and changes say and repeat nothing, the
stages of one (attack, profile) agree, and overlay mistakes are one-line errors."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import yaml

import mixmatch_finetune
import simclr
import supervise
from data.attacks import build_attack
from data.build import load_poison_data
from pipeline.stage import finetune_config
from utils.cli import StageArgs
from utils.config import apply_overrides, load_yaml, num_classes_of, parse_override
from utils.errors import ConfigError, UserError
from utils.overlay import BASE_KEY, INCLUDE_KEY, Replace, inherited, merge, read_layer
from utils.setup import config_location

from .conftest import REPO_ROOT, original_trigger_dir, write_fake_imagefolder

# fragments: partial configs that configs include (utils/overlay.py), never run on their own
# (a profile's under config/profiles/, an attack's under config/attacks/)
FRAGMENT_DIR = REPO_ROOT / "config/profiles"
ATTACK_FRAGMENT_DIR = REPO_ROOT / "config/attacks"
FRAGMENTS = sorted([*FRAGMENT_DIR.rglob("*.yaml"), *ATTACK_FRAGMENT_DIR.rglob("*.yaml")])
CONFIGS = sorted(p for p in (REPO_ROOT / "config").rglob("*.yaml") if p not in FRAGMENTS)
STAGES = ("supervise", "defense/simclr", "defense/mixmatch_finetune")
# the fragment of config/profiles/<profile>/ that each stage's profile configs include
STAGE_FRAGMENT = {"supervise": "supervise.yaml", "defense/simclr": "simclr.yaml",
                  "defense/mixmatch_finetune": "mixmatch_finetune.yaml"}
# the original's six configs: whole files, kept exactly as the original's (its command lines)
ORIGINALS = [REPO_ROOT / f"config/{stage}/{attack}/cifar10_resnet18/example.yaml"
             for stage in STAGES for attack in ("badnets", "blend")]
OVERLAYS = [p for p in CONFIGS if p not in ORIGINALS]


def _original_hello_kitty() -> Path | None:
    d = original_trigger_dir()
    return d / "hello_kitty.png" if d is not None and (d / "hello_kitty.png").is_file() else None


def _hello_kitty_override(path: Path) -> list[str] | None:
    """[] when the config needs no download; the override that points a Blended config at a
    copy of the trigger in ``DBD_TRIGGER_DIR`` when it was not downloaded; None when there is
    no copy at all."""
    cfg = load_yaml(path)
    if "mixmatch_finetune" in str(path):
        cfg = load_yaml(REPO_ROOT / cfg["pretrain_config_path"])
    trigger = str((cfg["backdoor"].get("blend") or {}).get("trigger_path"))
    if not trigger.endswith("hello_kitty.png") or \
            (REPO_ROOT / "data/trigger/hello_kitty.png").exists():
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
    _, ckpt = build_attack(cfg["backdoor"], REPO_ROOT).clean_model_paths()
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
            cfg, _, _ = finetune_config(StageArgs(rel, overrides=tuple(map(parse_override,
                                                                             over))))
            mixmatch_finetune.check(cfg)
            load_poison_data(cfg)
        else:
            cfg = apply_overrides(load_yaml(path), over)
            (simclr if "simclr" in str(path) else supervise).check(cfg)
            load_poison_data(cfg)  # the attack's own checks (e.g. its clean model) run here


# ---- overlays: which files build on which, and what they resolve to -------------------------

def _id(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT / "config"))


def _config(stage: str, attack: str, profile: str, data: str = "cifar10_resnet18") -> dict:
    return load_yaml(REPO_ROOT / f"config/{stage}/{attack}/{data}/{profile}.yaml")


def _stage(path: Path) -> str:
    return str(path.parent.parent.parent.relative_to(REPO_ROOT / "config"))


def test_the_originals_configs_are_whole_files_and_the_rest_overlays():
    assert len(ORIGINALS) == 6 and all(p.is_file() for p in ORIGINALS)
    for p in ORIGINALS:
        assert read_layer(p).base is None and read_layer(p).includes == (), _id(p)
    for p in OVERLAYS:
        layer = read_layer(p)
        assert layer.base is not None and layer.base.is_file(), _id(p)
        attack = [i.resolve() for i in layer.includes
                  if ATTACK_FRAGMENT_DIR in i.resolve().parents]
        if p.name == "example.yaml":  # another attack's or dataset's example, changed
            assert layer.base.name == "example.yaml", _id(p)
            assert [i.resolve() for i in layer.includes] == attack, _id(p)
        else:
            # a profile: the same attack's example.yaml with the stage's profile fragment (and
            # what the attack does differently in that profile)
            assert layer.base == p.parent / "example.yaml", _id(p)
            want = FRAGMENT_DIR / p.stem / STAGE_FRAGMENT[_stage(p)]
            assert [i.resolve() for i in layer.includes] == [want, *attack], _id(p)


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_the_resolved_config_is_plain_and_has_no_base_key(path):
    cfg = load_yaml(path)
    assert BASE_KEY not in cfg and INCLUDE_KEY not in cfg
    text = yaml.safe_dump(cfg, sort_keys=False)  # what the run folder's config.yaml holds
    assert "!replace" not in text and yaml.safe_load(text) == cfg


def _repeats(base: dict, over: dict, prefix: str = ""):
    """Key paths ``over`` sets to what ``base`` already holds, and needless ``!replace`` tags."""
    for k, v in over.items():
        key = f"{prefix}{k}"
        if k not in base:
            continue
        if isinstance(v, Replace):
            if merge({k: base[k]}, {k: dict(v)}, Path(key))[k] == dict(v):
                yield f"{key} (!replace where a merge gives the same)"
        elif isinstance(v, dict) and isinstance(base[k], dict):
            yield from _repeats(base[k], v, f"{key}.")
        elif v == base[k] and type(v) is type(base[k]):
            yield key


@pytest.mark.parametrize("path", OVERLAYS + FRAGMENTS, ids=_id)
def test_overlays_write_no_value_their_base_already_gives(path):
    """No config value is written twice for one (attack, profile): an overlay holds changes only,
    to its base with its includes applied, and a fragment to its includes (a ``!replace``
    mapping counts as one value, needed only when it drops a key)."""
    layer = read_layer(path)
    assert list(_repeats(inherited(path), layer.body)) == []


def _written(node: dict, prefix: str = ""):
    """(key path, value) of each value a file writes (a ``!replace`` mapping is one value)."""
    for k, v in node.items():
        if isinstance(v, dict) and not isinstance(v, Replace) and v:
            yield from _written(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _files_of(path: Path) -> list[Path]:
    """``path`` and the fragments it includes, directly or through other fragments."""
    files = [path.resolve()]
    for name in read_layer(path).includes:
        files += [f for f in _files_of(name) if f not in files]
    return files




def _profile_runs() -> list:
    """(attack, profile) of every profile (not example) config on CIFAR-10."""
    return sorted({(p.parent.parent.name, p.stem) for p in OVERLAYS
                   if p.name != "example.yaml" and p.parent.name == "cifar10_resnet18"})


@pytest.mark.parametrize("attack,profile", _profile_runs(), ids="-".join)
def test_no_value_is_written_twice_for_one_attack_and_profile(attack, profile):
    """Across the stages' profile configs of one (attack, profile) and the fragments they
    include (each fragment counted once), every value is written in one file only."""
    files = []
    for stage in STAGES:
        path = REPO_ROOT / f"config/{stage}/{attack}/cifar10_resnet18/{profile}.yaml"
        if path.is_file():
            files += [f for f in _files_of(path) if f not in files]
    assert any(FRAGMENT_DIR in f.parents for f in files)
    seen: dict[str, list] = {}
    for f in files:
        for key, value in _written(read_layer(f).body):
            seen.setdefault(key, []).append((f, value))
    twice = {key for key, where in seen.items()
             if any(v == w for i, (_, v) in enumerate(where) for _, w in where[i + 1:])}
    assert twice == set()


def _included() -> set:
    """Every file that some config includes, directly or through fragments."""
    found = set()
    for p in CONFIGS:
        found.update(f for f in _files_of(p) if f != p.resolve())
    return found


def test_fragments_are_included_and_are_not_configs():
    assert FRAGMENTS, "config/profiles/ and config/attacks/ hold the fragments"
    included = _included()
    for f in FRAGMENTS:
        assert f.resolve() in included, f"{_id(f)} is included by no config"
        assert read_layer(f).base is None, f"{_id(f)}: a fragment has no base"
    # only fragments are included, and no config names one as a config to load (a run folder
    # comes from the config's own path)
    assert included <= {f.resolve() for f in FRAGMENTS}
    for p in CONFIGS:
        text = yaml.safe_dump(load_yaml(p))
        assert "config/profiles" not in text and "config/attacks" not in text, _id(p)
    quick = REPO_ROOT / "config/supervise/badnets/cifar10_resnet18/quick.yaml"
    assert config_location(quick.relative_to(REPO_ROOT)) == ("supervise/badnets/cifar10_resnet18",
                                                            "quick")


@pytest.mark.parametrize("profile", ["quick", "cpu"])
def test_the_stages_of_a_profile_take_shared_values_from_its_fragments(profile):
    """What every stage of a profile shares (speed, width) is in its common.yaml, what the
    supervise and SimCLR stages share (subset, loader) in its subset.yaml."""
    common = read_layer(FRAGMENT_DIR / profile / "common.yaml").body
    subset = read_layer(FRAGMENT_DIR / profile / "subset.yaml").body
    for stage in STAGES:
        cfg = _config(stage, "badnets", profile)
        assert cfg["speed"] == common["speed"]
        assert cfg["network"]["resnet18_cifar"]["width"] == \
            common["network"]["resnet18_cifar"]["width"]
        if stage != "defense/mixmatch_finetune":
            assert {k: cfg[k] for k in ("train_subset", "test_subset")} == \
                {k: subset[k] for k in ("train_subset", "test_subset")}
            assert cfg["loader"]["num_workers"] == subset["loader"]["num_workers"]


SPEED = {"amp": "bf16", "channels_last": True, "data_path": "auto"}
# What each BadNets profile changes in the stage's example.yaml (dotted key paths).
PROFILES = {
    ("supervise", "quick"): {
        "train_subset": 20000, "test_subset": 2000, "speed": SPEED, "loader.num_workers": 0,
        "network.resnet18_cifar.width": 16, "lr_scheduler.multi_step.milestones": [19, 21],
        "num_epochs": 22},
    ("supervise", "cpu"): {
        "train_subset": 20000, "test_subset": 2000, "speed": SPEED, "loader.num_workers": 0,
        "network.resnet18_cifar.width": 16, "lr_scheduler.multi_step.milestones": [19, 21],
        "num_epochs": 22},
    ("defense/simclr", "quick"): {
        "train_subset": 20000, "test_subset": 2000, "speed": SPEED,
        "simclr": {"num_stage_epochs": 5, "min_interval": 5, "max_interval": 5},
        "loader.batch_size": 256, "loader.num_workers": 0, "network.resnet18_cifar.width": 16,
        "lr_scheduler.cosine_annealing.T_max": 50, "num_epochs": 5},
    ("defense/simclr", "cpu"): {
        "train_subset": 20000, "test_subset": 2000, "speed": SPEED,
        "simclr": {"num_stage_epochs": 40, "min_interval": 5, "max_interval": 5},
        "loader.batch_size": 256, "loader.num_workers": 0, "network.resnet18_cifar.width": 16,
        "lr_scheduler.cosine_annealing.T_max": 400, "num_epochs": 40},
    ("defense/mixmatch_finetune", "quick"): {
        "pretrain_config_path": "config/defense/simclr/badnets/cifar10_resnet18/quick.yaml",
        "pretrain_checkpoint": "epoch5.pt", "speed": SPEED, "network.resnet18_cifar.width": 16,
        "warmup.loader.num_workers": 0, "warmup.num_epochs": 3, "semi.loader.num_workers": 0,
        "semi.criterion.mixmatch.rampup_length": 7, "semi.mixmatch.train_iteration": 200,
        "semi.num_epochs": 4},
    ("defense/mixmatch_finetune", "cpu"): {
        "pretrain_config_path": "config/defense/simclr/badnets/cifar10_resnet18/cpu.yaml",
        "pretrain_checkpoint": "epoch40.pt", "speed": SPEED, "network.resnet18_cifar.width": 16,
        "warmup.loader.num_workers": 0, "warmup.num_epochs": 10, "semi.loader.num_workers": 0,
        "semi.criterion.mixmatch.rampup_length": 17, "semi.num_epochs": 7},
}


def _set(cfg: dict, changes: dict) -> dict:
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


@pytest.mark.parametrize("stage,profile", sorted(PROFILES))
def test_badnets_profiles_are_the_example_with_their_changes(stage, profile):
    got = _config(stage, "badnets", profile)
    want = _set(_config(stage, "badnets", "example"), PROFILES[stage, profile])
    assert got == want
    # transform order is YAML order: the profile keeps the example's
    assert yaml.safe_dump(got["transform"], sort_keys=False) == \
        yaml.safe_dump(want["transform"], sort_keys=False)


LC = {"clean_model_checkpoint": "latest_model.pt", "epsilon": 16, "steps": 100, "step_size": 2,
      "pattern": [[1, 0, 1], [0, 1, 0], [1, 0, 1]], "amplitude": 1.0, "batch_size": 256}
WANET = {"k": 4, "s": 0.5, "grid_rescale": 1, "cross_ratio": 2, "seed": 0, "field_path": None}


def _backdoor(attack: str, profile: str) -> dict:
    """Each attack's backdoor section, the same for every profile and dataset."""
    if attack == "clean":
        return {**_config("supervise", "badnets", profile)["backdoor"], "poison_ratio": 0.0}
    if attack in ("blend", "blend_random"):
        trigger = "hello_kitty.png" if attack == "blend" else "random_pattern.png"
        return {"poison_ratio": 0.05, "target_label": 3,
                "blend": {"alpha": 0.1, "trigger_path": f"./data/trigger/{trigger}"}}
    if attack == "wanet":
        return {"poison_ratio": 0.05, "target_label": 3, "wanet": WANET}
    if attack == "sig":
        return {"poison_ratio": 0.05, "target_label": 3, "poison_mode": "exact",
                "sig": {"delta": 20, "frequency": 6}}
    assert attack == "label_consistent"
    clean = f"config/supervise/clean/cifar10_resnet18/{profile}.yaml"
    return {"poison_ratio": 0.025, "target_label": 3, "poison_mode": "exact",
            "label_consistent": {"clean_model_config": clean, **LC}}


VARIANTS = [p for p in OVERLAYS if p.parent.parent.name != "badnets"]
# The No-Defense budgets an attack's profile sets for itself (dotted key paths): an attack that
# is learned more slowly than BadNets trains longer.
BUDGETS = {
    ("supervise", "blend", "cpu"): {"num_epochs": 32,
                                    "lr_scheduler.multi_step.milestones": [29, 31]},
}


@pytest.mark.parametrize("attack", ["blend", "blend_random", "wanet", "label_consistent", "sig",
                                    "clean"])
def test_each_attack_has_one_backdoor_section(attack):
    assert _config("supervise", attack, "example")["backdoor"] == _backdoor(attack, "example")


@pytest.mark.parametrize("path", VARIANTS, ids=_id)
def test_other_attacks_are_badnets_with_their_backdoor(path):
    """Every other attack's config is BadNets' of the same stage, dataset and profile (the
    Blended random-noise example: Blended's) with the attack's backdoor section; fine-tuning
    differs only in the SimCLR config it loads."""
    data, attack, profile = path.parent.name, path.parent.parent.name, path.stem
    stage = str(path.parent.parent.parent.relative_to(REPO_ROOT / "config"))
    like = "blend" if attack == "blend_random" and data == "cifar10_resnet18" and \
        profile == "example" else "badnets"
    want = _config(stage, like, profile, data)
    if stage == "defense/mixmatch_finetune":
        want["pretrain_config_path"] = f"config/defense/simclr/{attack}/{data}/{profile}.yaml"
    else:
        want["backdoor"] = _backdoor(attack, profile)
    _set(want, BUDGETS.get((stage, attack, profile), {}))
    assert load_yaml(path) == want


def _stage_sets() -> list:
    """(attack, data, profile) of every run with configs for all three stages."""
    root = REPO_ROOT / "config/defense/mixmatch_finetune"
    return sorted((p.parent.parent.name, p.parent.name, p.stem) for p in root.rglob("*.yaml"))


@pytest.mark.parametrize("attack,data,profile", _stage_sets(), ids="-".join)
def test_the_stages_of_a_run_agree(attack, data, profile):
    sup = _config("supervise", attack, profile, data)
    pre = _config("defense/simclr", attack, profile, data)
    ft = _config("defense/mixmatch_finetune", attack, profile, data)
    assert ft["pretrain_config_path"] == f"config/defense/simclr/{attack}/{data}/{profile}.yaml"
    # same data, subset and seed: No Defense and DBD poison the same images; same network so
    # test.py evaluates the DBD checkpoint with the supervise config
    for key in ("dataset", "dataset_dir", "num_classes", "train_subset", "test_subset", "seed",
                "backdoor", "speed"):
        assert sup.get(key) == pre.get(key), key
    assert sup["network"] == pre["network"] == ft["network"]
    # the fine-tuning stage runs on the SimCLR config updated with its own
    # (docs/original.md §1.5)
    assert num_classes_of({**pre, **ft}) == num_classes_of(sup)
    if attack == "label_consistent":
        assert (REPO_ROOT / sup["backdoor"]["label_consistent"]["clean_model_config"]).is_file()


# ---- num_classes: read from one place ------------------------------------------------------

def test_num_classes_is_the_top_level_key_and_others_must_agree():
    net = {"resnet18_cifar": {"num_classes": 30}}
    assert num_classes_of({}) == 10
    assert num_classes_of({"num_classes": 30}) == 30
    assert num_classes_of({"network": net}) == 30  # no top-level key: the first other one
    assert num_classes_of({"num_classes": 30, "network": net,
                           "warmup": {"criterion": {"sce": {"num_classes": 30}}},
                           "semi": {"mixmatch": {"num_classes": 30}}}) == 30
    for cfg, match in (
            ({"num_classes": 10, "network": net}, "network.resnet18_cifar.num_classes is 30 but "
                                                  "num_classes is 10"),
            ({"num_classes": 30, "warmup": {"criterion": {"sce": {"num_classes": 10}}}},
             "warmup.criterion.sce.num_classes is 10"),
            ({"num_classes": 30, "semi": {"mixmatch": {"num_classes": 10}}},
             "semi.mixmatch.num_classes is 10"),
            ({"num_classes": "ten"}, "num_classes must be a positive integer"),
            ({"num_classes": 0}, "num_classes must be a positive integer")):
        with pytest.raises(ConfigError, match=match) as e:
            num_classes_of(cfg)
        assert "\n" not in str(e.value)


def test_a_disagreeing_num_classes_stops_the_checks(fake_cifar, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    cfg = apply_overrides(_config("supervise", "badnets", "quick"),
                          [f"dataset_dir={fake_cifar}", "network.resnet18_cifar.num_classes=30"])
    with pytest.raises(ConfigError, match="network.resnet18_cifar.num_classes is 30"):
        supervise.check(cfg)


def test_sce_takes_the_config_number_of_classes():
    from loss import build_criterion
    assert build_criterion({"sce": {"alpha": 0.1, "beta": 1}}, num_classes=30).rce.num_classes \
        == 30
    assert build_criterion({"sce": {"num_classes": 10}}, num_classes=10).rce.num_classes == 10


# ---- overlay mistakes: one-line errors naming the file ---------------------------------------

def _files(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    return tmp_path / f"{next(iter(files))}.yaml"


def test_overlay_merge_rules_and_key_order(tmp_path):
    top = _files(tmp_path, top="base: b.yaml\ntrain_subset: 5\n"
                              "transform: {train: {primary: {z: 3}}}\n",
                 a="num_epochs: 1\ntransform: {train: {primary: {x: 1, y: 1}}}\n"
                   "lr_scheduler: {multi_step: {milestones: [1]}}\n",
                 b="base: a.yaml\nnum_epochs: 2\ntransform: {train: {primary: {y: 2}}}\n"
                   "lr_scheduler: !replace {cosine_annealing: {T_max: 4}}\n")
    cfg = load_yaml(top)
    assert cfg == {"train_subset": 5, "transform": {"train": {"primary": {"x": 1, "y": 2,
                                                                         "z": 3}}},
                   "lr_scheduler": {"cosine_annealing": {"T_max": 4}}, "num_epochs": 2}
    assert list(cfg) == ["train_subset", "transform", "lr_scheduler", "num_epochs"]
    assert list(cfg["transform"]["train"]["primary"]) == ["x", "y", "z"]
    assert type(cfg["lr_scheduler"]) is dict  # no Replace left: safe_dump writes it


@pytest.mark.parametrize("files,match", [
    ({"top": "base: gone.yaml\n"}, r"base file not found: .*gone\.yaml \(named in .*top\.yaml\)"),
    ({"top": "base: top.yaml\n"}, r"base in .*top\.yaml makes a cycle"),
    ({"top": "base: a.yaml\n", "a": "base: top.yaml\n"}, r"base in .*a\.yaml makes a cycle"),
    ({"top": "base: [a.yaml]\n"}, r"base in .*top\.yaml must be one file path"),
    ({"top": "base:\n"}, r"base in .*top\.yaml must be one file path"),
    ({"top": "base: a.yaml\nnetwork: !replace 3\n", "a": "network: {r: {}}\n"},
     r"!replace in .*top\.yaml at line 2 must tag a mapping"),
    ({"top": "network: !replace {r: {}}\n"}, r"!replace at 'network' in .*top\.yaml: the file "
                                             r"has no 'base'"),
    ({"top": "base: a.yaml\nbackdoor: {blend: !replace {alpha: 1}}\n",
      "a": "backdoor: {badnets: {}}\n"}, r"!replace at 'backdoor\.blend' in .*top\.yaml: the "
                                         r"base has no 'backdoor\.blend'"),
    ({"top": "base: a.yaml\nnetwork: !replace {r: !replace {w: 1}}\n", "a": "network: {r: {}}\n"},
     r"!replace at 'network\.r' in .*top\.yaml is inside"),
    ({"top": "base: a.yaml\n", "a": "num_epoch: 3\n"}, r"unknown key 'num_epoch' in .*a\.yaml"),
    # include
    ({"top": "include: gone.yaml\n"},
     r"include file not found: .*gone\.yaml \(named in .*top\.yaml\)"),
    ({"top": "include: [a.yaml]\n", "a": "include: gone.yaml\n"},
     r"include file not found: .*gone\.yaml \(named in .*a\.yaml\)"),
    ({"top": "include: top.yaml\n"}, r"include in .*top\.yaml makes a cycle: .*top\.yaml"),
    ({"top": "include: a.yaml\n", "a": "include: b.yaml\n", "b": "include: a.yaml\n"},
     r"include in .*b\.yaml makes a cycle: .*a\.yaml leads back to it"),
    ({"top": "base: a.yaml\n", "a": "include: top.yaml\n"},
     r"include in .*a\.yaml makes a cycle: .*top\.yaml"),
    ({"top": "include: a.yaml\n", "a": "base: b.yaml\n", "b": "num_epochs: 1\n"},
     r"base in .*a\.yaml: a fragment \(included by .*top\.yaml\) cannot have a base"),
    ({"top": "include: [a.yaml, 3]\n"}, r"include in .*top\.yaml must be a file path or a list"),
    ({"top": "include: []\n"}, r"include in .*top\.yaml must be a file path or a list"),
    ({"top": "include:\n"}, r"include in .*top\.yaml must be a file path or a list"),
    ({"top": "include: a.yaml\n", "a": "network: !replace {r: {}}\n"},
     r"!replace at 'network' in .*a\.yaml: the config it is included into has no 'network'"),
    ({"top": "include: a.yaml\nloader: !replace {b: 1}\n", "a": "num_epochs: 1\n"},
     r"!replace at 'loader' in .*top\.yaml: what it is laid on \(base and includes\) has "
     r"no 'loader'"),
    ({"top": "include: a.yaml\n", "a": "num_epoch: 3\n"},
     r"unknown key 'num_epoch' in .*a\.yaml"),
])
def test_overlay_mistakes_are_one_line_errors(tmp_path, files, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_yaml(_files(tmp_path, **files))
    assert "\n" not in str(e.value)


def test_include_order_nesting_and_replace(tmp_path):
    """Base first, then each include in list order (a fragment's own includes before its
    keys), then the file's own keys; ``!replace`` in a fragment replaces what it lands on."""
    top = _files(tmp_path, top="base: b.yaml\ninclude: [f1.yaml, f2.yaml]\nnum_epochs: 9\n",
                 b="num_epochs: 1\nloader: {batch_size: 1, num_workers: 1}\n"
                   "network: {r: {w: 1}}\n",
                 f1="include: f3.yaml\nloader: {batch_size: 2}\nspeed: {amp: bf16}\n"
                    "num_epochs: 2\n",
                 f2="loader: {batch_size: 3}\nnetwork: !replace {s: {}}\ntrain_subset: 5\n",
                 f3="loader: {num_workers: 4}\nspeed: {data_path: auto}\nnum_epochs: 3\n")
    cfg = load_yaml(top)
    assert cfg == {"train_subset": 5, "speed": {"data_path": "auto", "amp": "bf16"},
                   "loader": {"batch_size": 3, "num_workers": 4}, "network": {"s": {}},
                   "num_epochs": 9}
    assert list(cfg) == ["train_subset", "speed", "loader", "network", "num_epochs"]
    assert list(cfg["speed"]) == ["data_path", "amp"]  # f3 (included by f1) before f1's keys
    assert list(cfg["loader"]) == ["batch_size", "num_workers"]  # the base's order
    assert type(cfg["network"]) is dict
    assert inherited(top)["num_epochs"] == 2  # what the file's own keys are laid on
    assert inherited(tmp_path / "f1.yaml") == {"loader": {"num_workers": 4},
                                               "speed": {"data_path": "auto"}, "num_epochs": 3}
    # the later include wins; no base: the includes alone; one fragment twice is no cycle
    swap = _files(tmp_path, swap="include: [f3.yaml, f1.yaml, f3.yaml]\n")
    assert load_yaml(swap) == {"speed": {"data_path": "auto", "amp": "bf16"},
                               "loader": {"num_workers": 4, "batch_size": 2}, "num_epochs": 3}
    # a path relative to the including file's folder
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.yaml").write_text("include: ../f3.yaml\n")
    assert load_yaml(tmp_path / "sub" / "inner.yaml")["num_epochs"] == 3


def test_base_cannot_be_set_from_the_command_line():
    with pytest.raises(ConfigError, match="unknown key 'base'"):
        apply_overrides(_config("supervise", "badnets", "quick"), ["base=example.yaml"])
    with pytest.raises(ConfigError, match="unknown key 'include'"):
        apply_overrides(_config("supervise", "badnets", "quick"),
                        ["include=../../../profiles/cpu/supervise.yaml"])
