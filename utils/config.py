"""Loading a config and overriding its values: ``load_yaml`` (the file with its overlays
resolved, ``utils.overlay``, checked against ``utils.schema``) and ``--set key.path=value``
overrides, parsed once into ``Override`` values and applied with ``apply_overrides``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import yaml

from . import schema
from .errors import ConfigError
from .overlay import resolve
from .schema import Seed


def load_yaml(path: str | Path) -> dict:
    """The config at ``path`` with its bases and includes resolved, its seed checked."""
    cfg = resolve(path)
    seed_settings(cfg, str(path))
    return cfg


# ---- Overrides -----------------------------------------------------------------------------


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


class Override(NamedTuple):
    """One ``[STAGE:]key.path=value``: the stage prefix (dbd.py's ``supervise:``, ``simclr:``,
    ``finetune:``; None for every stage), the key path, the value as written and as parsed
    (YAML)."""
    stage: str | None
    key: str
    text: str
    value: object

    @property
    def parts(self) -> list[str]:
        return self.key.split(".")

    def __str__(self) -> str:
        return f"{self.stage + ':' if self.stage else ''}{self.key}={self.text}"


def parse_override(item: str | Override) -> Override:
    """``[STAGE:]key.path=value`` as an ``Override`` (the type of every ``--set`` option)."""
    if isinstance(item, Override):
        return item
    if "=" not in item:
        raise ConfigError(f"--set expects key.path=value, got '{item}'")
    key, text = item.split("=", 1)
    stage = None
    if ":" in key:
        stage, key = (s.strip() for s in key.split(":", 1))
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item}: no key before '='")
    return Override(stage, key, text, _parse_value(text))


def _type_ok(old, new) -> bool:
    """A value of a key the schema leaves to a registry (an optimiser's lr, a transform's
    argument) may replace one of the same type."""
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return not (isinstance(old, int) and isinstance(new, float) and not new.is_integer())
    return isinstance(new, type(old))


def _checked(o: Override, parts: list[str], old):
    """``o``'s value for the key path ``parts``, checked against its declared type (or, for a
    key only a registry knows, against the type of the value it replaces)."""
    value = o.value
    tp = schema.declared_type(parts)
    if tp is None:
        if isinstance(old, str) and isinstance(value, bool):
            value = o.text.strip()  # YAML reads off/on/yes/no as booleans; this key holds text
        if not _type_ok(old, value):
            raise ConfigError(f"--set {o.key}: expected {type(old).__name__}, got "
                              f"{type(value).__name__} '{o.text}'")
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        return value
    options = schema._options(tp)
    if isinstance(value, bool) and str in options and bool not in options:
        value = o.text.strip()  # YAML reads off/on/yes/no as booleans; this key holds text
    value = schema.yaml_word(tp, value)
    if not schema.matches(tp, value):
        raise ConfigError(f"--set {o.key}: expected {schema.type_name(tp)}, got "
                          f"{type(value).__name__} '{o.text}'")
    return schema.check_value(tp, value, f"--set {o.key}", schema.declared(parts)[1])


def apply_overrides(cfg: dict, overrides: list[str | Override] | None) -> dict:
    """A copy of ``cfg`` with ``key.path=value`` overrides applied.

    Each value must have the type the schema declares for its key (``utils.schema``), or, for
    a key a registry declares (an optimiser's or a transform's argument), the type of the value
    it replaces. A key the config leaves out may be set when the schema declares it (e.g.
    ``semi.per_class``, ``speed.amp``, ``network.resnet18_cifar.width``) or when it goes under a
    mapping whose value is null (e.g. ``transform.pre``); anything else is an error naming it.
    """
    cfg = copy.deepcopy(cfg)
    for item in overrides or []:
        o = parse_override(item)
        if o.stage is not None:
            raise ConfigError(f"--set {o}: a stage prefix ('{o.stage}:') is for dbd.py only")
        node, parts = cfg, o.parts
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict):
                break
            if node.get(part) is None and schema.optional_section(parts[: i + 1]):
                node[part] = {}  # e.g. speed: absent from the config, all at their defaults
            if part not in node:
                raise ConfigError(f"--set {o.key}: unknown key '{'.'.join(parts[: i + 1])}'")
            if node[part] is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {o.key}: '{'.'.join(parts[:-1])}' is not a mapping")
        last = parts[-1]
        if last not in node and schema.declared_type(parts) is None:
            raise ConfigError(f"--set {o.key}: unknown key '{o.key}'")
        node[last] = _checked(o, parts, node.get(last))
    return cfg


# ---- Values read from one place -------------------------------------------------------------


def seed_settings(cfg: dict, where: str = "the config") -> Seed:
    """The one reading of a config's ``seed`` (``utils.schema.Seed``), used for every seeded
    draw (the RNGs, the subsets, the poison index and the loaders' shuffles)."""
    s = cfg.get("seed")
    if s is None:
        return Seed()
    if isinstance(s, int) and not isinstance(s, bool):
        return Seed(seed=s)
    if not isinstance(s, dict):
        raise ConfigError(f"seed in {where} must be a mapping or an integer, got {s!r}")
    return schema.parse(Seed, s, "seed", origin=f" in {where}")


def num_classes_of(cfg: dict) -> int:
    """The number of classes, read from one place: the top-level ``num_classes``.

    The original's configs also write it under ``network.<name>``, ``<stage>.criterion.<loss>``
    and ``semi.mixmatch``, where it is not needed. Without the top-level key the first of those
    applies, else 10 (CIFAR-10); any occurrence that disagrees is an error.
    """
    found = {}
    if cfg.get("num_classes") is not None:
        found["num_classes"] = cfg["num_classes"]
    sections = [("network", cfg.get("network")), ("criterion", cfg.get("criterion"))]
    for stage in ("warmup", "semi"):
        sec = cfg.get(stage)
        if isinstance(sec, dict):
            sections.append((f"{stage}.criterion", sec.get("criterion")))
            if stage == "semi":
                sections.append(("semi", {"mixmatch": sec.get("mixmatch")}))
    for where, sec in sections:
        for name, kw in (sec or {}).items() if isinstance(sec, dict) else ():
            if isinstance(kw, dict) and kw.get("num_classes") is not None:
                found[f"{where}.{name}.num_classes"] = kw["num_classes"]
    for key, n in found.items():
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {n!r}")
    first, n = next(iter(found.items()), ("", 10))
    for key, other in found.items():
        if other != n:
            raise ConfigError(f"{key} is {other} but {first} is {n} (give the number of classes "
                              "once, as the top-level num_classes)")
    return n
