"""YAML configs in the original's shape, with ``--set key.path=value`` overrides.

The original loads a YAML file under ``config/`` and derives the run folders from the path
between ``config/`` and the file name (reference §1.1). Transform order is YAML order, which
``yaml.safe_load`` preserves.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .errors import ConfigError
from .speed import KEYS as SPEED_KEYS

# Top-level keys a config may hold. Anything else is almost certainly a typo.
KNOWN_KEYS = {
    # the original's keys (reference §1.6)
    "seed", "dataset_dir", "num_classes", "saved_dir", "storage_dir", "prefetch", "transform",
    "backdoor", "loader", "network", "sync_bn", "criterion", "optimizer", "lr_scheduler",
    "num_epochs", "pretrain_config_path", "pretrain_checkpoint", "warmup", "semi",
    # this project's additions
    "dataset", "train_subset", "test_subset", "speed", "simclr", "finetune", "test_loader",
}


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file to --config)")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"YAML syntax error in {path}{where}: {problem}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a YAML mapping at the top level")
    unknown = sorted(set(cfg) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(
            f"unknown key '{unknown[0]}' in {path} (known keys: {', '.join(sorted(KNOWN_KEYS))})"
        )
    check_seed(cfg.get("seed"), str(path))
    return cfg


SEED_KEYS = {"seed": int, "deterministic": bool, "benchmark": bool}


def check_seed(seed, where: str) -> None:
    """``seed: {seed: int, deterministic: bool, benchmark: bool}`` (or a plain int)."""
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool)):
        return
    if not isinstance(seed, dict):
        raise ConfigError(f"seed in {where} must be a mapping or an integer, got {seed!r}")
    for k, v in seed.items():
        if k not in SEED_KEYS:
            raise ConfigError(f"unknown key 'seed.{k}' in {where} (known: seed, deterministic, "
                              "benchmark)")
        want = SEED_KEYS[k]
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"seed.{k} in {where} must be {want.__name__}, got {v!r}")


def config_location(path: str | Path) -> tuple[str, str]:
    """(inner_dir, config_name) as reference §1.1: the folders between ``config/`` and the file.

    A config outside any ``config`` folder gets an empty inner_dir (the original refused those).
    """
    path = Path(path)
    parts = path.resolve().parts if path.is_absolute() else path.parts
    parts = [p for p in parts if p not in (".", "")]
    name = path.stem
    if "config" in parts[:-1]:
        last = len(parts) - 2 - parts[:-1][::-1].index("config")
        inner = "/".join(parts[last + 1 : -1])
    else:
        inner = ""
    return inner, name


# Keys a config may leave out (their defaults apply) but ``--set`` may still name: the speed
# switches and this project's optional additions (README, "Config additions"). Their values
# are checked again where they are used.
OPTIONAL_KEYS = {
    **{f"speed.{k}": bool if k in ("channels_last", "compile", "sync_every_step") else str
       for k in SPEED_KEYS},
    "backdoor.poison_mode": str,
    "network.*.width": int,
    "criterion.simclr.symmetric": bool,
    "warmup.freeze_bn": bool,
    "semi.per_class": bool,
}
OPTIONAL_SECTIONS = {"speed"}


def _generic(parts: list[str]) -> str:
    """The OPTIONAL_KEYS name of a key path (the network's name is a wildcard)."""
    if len(parts) == 3 and parts[0] == "network":
        return f"network.*.{parts[2]}"
    return ".".join(parts)


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _type_ok(old, new) -> bool:
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return not (isinstance(old, int) and isinstance(new, float) and not new.is_integer())
    return isinstance(new, type(old))


def apply_overrides(cfg: dict, overrides: list[str] | None) -> dict:
    """Return a copy of ``cfg`` with ``key.path=value`` overrides applied.

    Values are parsed as YAML and must have the type of the value they replace; a key that is
    not in the config is an error naming its path, unless it is an optional key (OPTIONAL_KEYS,
    e.g. ``semi.per_class``) or a new key under a mapping whose current value is null (e.g.
    ``transform.pre``) or a known top-level key.
    """
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got '{item}'")
        key, text = item.split("=", 1)
        key = key.strip()
        value = _parse_value(text)
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if (isinstance(node, dict) and node.get(part) is None
                    and ".".join(parts[: i + 1]) in OPTIONAL_SECTIONS):
                node[part] = {}  # e.g. speed: absent from the config, all at their defaults
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"--set {key}: unknown key '{'.'.join(parts[: i + 1])}'")
            if node[part] is None:
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[:-1])}' is not a mapping")
        if last not in node:
            if node is cfg and last in KNOWN_KEYS:
                node[last] = value
                continue
            want = OPTIONAL_KEYS.get(_generic(parts))
            if want is None:
                raise ConfigError(f"--set {key}: unknown key '{key}'")
            if isinstance(value, bool) and want is str:
                value = text.strip()
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(f"--set {key}: expected {want.__name__}, got "
                                  f"{type(value).__name__} '{text}'")
            node[last] = value  # an optional key the config leaves at its default
            continue
        if isinstance(node[last], str) and isinstance(value, bool):
            value = text.strip()  # YAML reads off/on/yes/no as booleans; this key holds text
        if not _type_ok(node[last], value):
            raise ConfigError(
                f"--set {key}: expected {type(node[last]).__name__}, got {type(value).__name__} "
                f"'{text}'"
            )
        if isinstance(node[last], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        node[last] = value
    return cfg
