"""The config schema: every section's keys, their types and defaults, declared once.

Each fixed section is a frozen dataclass; ``Config`` lists the top-level keys in the order a
resolved config writes them. Everything that reads a config goes through these declarations:
the overlay loader (``utils.overlay``: which top-level keys exist and their order), ``--set``
(``utils.config.apply_overrides``: a key a config leaves out may be set when it is declared
here, with the declared type), and the scripts, which read their sections with ``section``:

    semi = section(cfg, Semi, "semi")          # typed, checked, defaults filled in
    semi.epsilon, semi.loader.batch_size, semi.per_class

Sections that name one of several variants (``network``, ``criterion``, ``optimizer``,
``lr_scheduler``, ``transform``, the attack under ``backdoor``, ``dataset: {imagefolder}``) are
declared as ``Named``: the variant's own arguments are checked by the registry that builds it
(``model``, ``loss``, ``utils.optim``, ``data.augment_schema``, ``data.attacks``);
``VARIANT_ARGS`` declares those of their arguments that a config may leave out but ``--set``
may still name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError


def _limits(lo=None, hi=None, *, open_lo=False, open_hi=False, doc: str = "") -> dict:
    return {"lo": lo, "hi": hi, "open_lo": open_lo, "open_hi": open_hi, "doc": doc}


POSITIVE = _limits(1)
NON_NEGATIVE = _limits(0)


@dataclass(frozen=True)
class Named:
    """A mapping that names a variant (``{name: {arguments}}``) of the registry ``registry``,
    which checks the variant's arguments (a transform names several: its ops)."""
    registry: str


@dataclass(frozen=True)
class Seed:
    """``seed``: a mapping of these keys, or a plain int meaning ``{seed: <int>}``; absent or
    null means all defaults (the original's configs' values)."""
    seed: int = 100
    deterministic: bool = False
    benchmark: bool = True


@dataclass(frozen=True)
class SpeedSettings:
    """``speed``: switches that change how fast a stage runs, never what it computes
    (docs/speed.md)."""
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = True
    data_path: Literal["auto", "fast", "reference"] = "auto"
    compile: bool = False
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    sync_every_step: bool = False


@dataclass(frozen=True)
class Loader:
    """``loader``, ``test_loader``, ``warmup.loader``, ``semi.loader``: torch DataLoader
    settings (the reference data path uses all of them, the fast path the batch size)."""
    batch_size: int = field(metadata=POSITIVE)
    num_workers: int = field(default=0, metadata=NON_NEGATIVE)
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = None


@dataclass(frozen=True)
class SimCLRSchedule:
    """``simclr``: SimCLR's saved epochs (docs/original.md §1.4)."""
    num_stage_epochs: int = field(default=100, metadata=POSITIVE)
    min_interval: int = field(default=20, metadata=POSITIVE)
    max_interval: int = field(default=100, metadata=POSITIVE)


@dataclass(frozen=True)
class MixMatch:
    """``semi.mixmatch`` (docs/original.md §5.3)."""
    train_iteration: int = field(metadata=POSITIVE)
    temperature: float
    alpha: float
    num_classes: int | None = None


@dataclass(frozen=True)
class Warmup:
    """``warmup``: the linear head's training on the SimCLR backbone (docs/original.md §5.1)."""
    loader: Loader
    criterion: dict = field(metadata={"named": Named("loss")})
    num_epochs: int = field(metadata=NON_NEGATIVE)
    freeze_bn: bool = False


@dataclass(frozen=True)
class Semi:
    """``semi``: the split and MixMatch (docs/original.md §5.2, §5.3)."""
    epsilon: float = field(metadata=_limits(0, 1, open_lo=True, open_hi=True))
    loader: Loader
    criterion: dict = field(metadata={"named": Named("loss")})
    mixmatch: MixMatch
    num_epochs: int = field(metadata=NON_NEGATIVE)
    per_class: bool = False
    class_floor: float = field(default=0.0, metadata=_limits(0, 1))
    # a diagnostic, not a defense: the ground-truth poisoned samples are never labelled, so a
    # run measures what the split costs apart from the samples it leaks (docs/differences.md #6)
    oracle_split: bool = False

    def __post_init__(self):
        if self.per_class and self.class_floor:
            raise ConfigError("semi.per_class and semi.class_floor are two different splits: "
                              "set one of them")

    @property
    def split(self) -> str:
        """Which split this asks for, in words (docs/differences.md #6)."""
        if self.per_class:
            rule = "per class (semi.per_class)"
        elif self.class_floor:
            rule = f"global with a class floor of {self.class_floor:g} (semi.class_floor)"
        else:
            rule = "global (the original's)"
        if self.oracle_split:
            rule += (", the poisoned samples never labelled (semi.oracle_split, a diagnostic "
                     "that reads the ground truth)")
        return rule


@dataclass(frozen=True)
class Backdoor:
    """``backdoor``: the poisoning, plus one mapping naming the attack (``data.attacks``)."""
    target_label: int = field(metadata=NON_NEGATIVE)
    poison_ratio: float = field(metadata=_limits(0, 1))
    poison_mode: Literal["bernoulli", "exact"] = "bernoulli"


@dataclass(frozen=True)
class NetworkArgs:
    """``network.<name>``: the arguments every network takes."""
    num_classes: int | None = None
    width: int = field(default=64, metadata=POSITIVE)


@dataclass(frozen=True)
class Config:
    """The top-level keys, in the order a resolved config lists them (the original's order,
    this project's additions among them)."""
    pretrain_config_path: str | None = None
    pretrain_checkpoint: str | None = None
    seed: Seed | int | None = None
    dataset: str | dict | None = None  # cifar10 | imagefolder | {imagefolder: {...}}
    dataset_dir: str | None = None
    num_classes: int | None = None
    saved_dir: str = "./saved_data"
    storage_dir: str = "./storage"
    prefetch: bool | None = None  # the original's; the data paths do not need it
    train_subset: int | None = field(default=None, metadata=POSITIVE)
    test_subset: int | None = field(default=None, metadata=POSITIVE)
    speed: SpeedSettings | None = None
    simclr: SimCLRSchedule | None = None
    test_loader: Loader | None = None
    transform: dict | None = field(default=None, metadata={"named": Named("transform")})
    backdoor: Backdoor | None = None
    loader: Loader | None = None
    network: dict | None = field(default=None, metadata={"named": Named("network")})
    sync_bn: bool | None = None
    criterion: dict | None = field(default=None, metadata={"named": Named("loss")})
    warmup: Warmup | None = None
    semi: Semi | None = None
    optimizer: dict | None = field(default=None, metadata={"named": Named("optimizer")})
    lr_scheduler: dict | None = field(default=None, metadata={"named": Named("lr_scheduler")})
    num_epochs: int | None = field(default=None, metadata=POSITIVE)


# Arguments of named variants that a config may leave out and ``--set`` may name ("*": any
# variant of the section), with their types; the registries hold their defaults.
VARIANT_ARGS: dict[str, type] = {
    "network.*.width": int,
    "criterion.simclr.symmetric": bool,
}

TOP_LEVEL_KEYS = tuple(f.name for f in dataclasses.fields(Config))
RUN_FOLDER_KEYS = ("saved_dir", "storage_dir")


# ---- Reading a section -------------------------------------------------------------------


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _options(tp) -> tuple:
    """The alternatives of a union type (``int | None`` -> (int, NoneType)), or (tp,)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return typing.get_args(tp)
    return (tp,)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def matches(tp, v) -> bool:
    """Whether ``v`` is a value of the declared type ``tp`` (any alternative of a union)."""
    if len(_options(tp)) > 1:
        return any(matches(t, v) for t in _options(tp))
    if tp is type(None):
        return v is None
    if tp is Any:
        return True
    if typing.get_origin(tp) is Literal:
        return isinstance(v, str) and v in typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return isinstance(v, dict)
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return _is_int(v)
    if tp is float:
        return _is_int(v) or isinstance(v, float)
    return isinstance(v, tp)


def type_name(tp) -> str:
    parts = []
    for t in _options(tp):
        if typing.get_origin(t) is Literal:
            parts.append(" | ".join(typing.get_args(t)))
        elif dataclasses.is_dataclass(t) or t is dict:
            parts.append("a mapping")
        elif t is type(None):
            parts.append("null")
        else:
            parts.append(t.__name__)
    return " or ".join(parts)


def yaml_word(tp, v):
    """YAML 1.1 reads off/no/on/yes as booleans; where the key holds one of a few words, take
    the word back (``amp: off``)."""
    if isinstance(v, bool):
        for t in _options(tp):
            if typing.get_origin(t) is Literal:
                word = "off" if not v else "on"
                if word in typing.get_args(t):
                    return word
    return v


def check_value(tp, value, where: str, limits: dict | None = None):
    """``value`` checked against the declared type ``tp`` (and its limits); returns it
    normalised (a YAML boolean word back to its word, an int to a float where a float is
    declared). Raises a one-line ConfigError naming ``where``."""
    value = yaml_word(tp, value)
    if not matches(tp, value):
        raise ConfigError(f"{where} must be {type_name(tp)}, got {value!r}")
    if limits and (_is_int(value) or isinstance(value, float)):
        lo, hi = limits.get("lo"), limits.get("hi")
        bad = (lo is not None and (value <= lo if limits.get("open_lo") else value < lo)) or \
              (hi is not None and (value >= hi if limits.get("open_hi") else value > hi))
        if bad:
            lo_b = "(" if limits.get("open_lo") else "["
            hi_b = ")" if limits.get("open_hi") else "]"
            if hi is None:
                want = "a positive integer" if lo == 1 else f"at least {lo}"
            else:
                want = f"in {lo_b}{lo}, {hi}{hi_b}"
            raise ConfigError(f"{where} must be {want}, got {value!r}")
    if float in _options(tp) and _is_int(value):
        value = float(value)
    return value


def parse(cls, mapping: dict | None, where: str, extra: bool = False, origin: str = ""):
    """The dataclass ``cls`` from the config mapping at key path ``where``: unknown keys,
    missing required keys and values of the wrong type are one-line ConfigErrors naming the
    key (and ``origin``, e.g. " in config.yaml"). With ``extra``, keys ``cls`` does not
    declare are allowed (the attack under ``backdoor``)."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}{origin} must be a mapping, got {mapping!r}")
    hints = _hints(cls)
    declared = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in mapping if k not in declared]
    if unknown and not extra:
        raise ConfigError(f"unknown key '{where}.{unknown[0]}'{origin} (known: "
                          f"{', '.join(declared)})")
    values = {}
    for name, f in declared.items():
        key = f"{where}.{name}"
        if name not in mapping:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}{origin} is missing")
            continue
        v = check_value(hints[name], mapping[name], key + origin, f.metadata)
        nested = _dataclass_of(hints[name])
        if nested is not None and isinstance(v, dict):
            v = parse(nested, v, key, origin=origin)
        values[name] = v
    return cls(**values)


def section(cfg: dict, cls, key: str, extra: bool = False):
    """``cfg[key]`` read as the dataclass ``cls`` (absent or null: its defaults, where it has
    a default for every key)."""
    return parse(cls, cfg.get(key), key, extra)


# ---- What a key path is declared as (``--set`` of a key the config leaves out) -----------


def _dataclass_of(tp):
    return next((t for t in _options(tp) if dataclasses.is_dataclass(t)), None)


def declared(parts: list[str]) -> tuple[object, dict] | None:
    """(type, limits) the schema declares for the key path ``parts`` (e.g. ['semi',
    'per_class']), or None when it declares none. Named variants' arguments come from
    ``VARIANT_ARGS`` (no limits)."""
    cls, found = Config, None
    for i, part in enumerate(parts):
        if cls is None:
            return None
        f = {f.name: f for f in dataclasses.fields(cls)}.get(part)
        if f is None:
            return None
        found = (_hints(cls)[part], dict(f.metadata))
        if "named" in f.metadata:
            rest, prefix = parts[i + 1:], ".".join(parts[: i + 1])
            if not rest:
                return found
            if len(rest) == 2:
                tp = (VARIANT_ARGS.get(f"{prefix}.{rest[0]}.{rest[1]}")
                      or VARIANT_ARGS.get(f"{prefix}.*.{rest[1]}"))
                return (tp, {}) if tp is not None else None
            return None
        cls = _dataclass_of(found[0])
    return found


def declared_type(parts: list[str]):
    """The declared type of the key path ``parts``, or None (``declared``)."""
    found = declared(parts)
    return found[0] if found else None


def optional_section(parts: list[str]) -> bool:
    """Whether the path names a declared section whose keys all have defaults (``speed``,
    ``simclr``), which ``--set`` may create when the config leaves it out."""
    tp = declared_type(parts)
    cls = _dataclass_of(tp) if tp else None
    return cls is not None and all(f.default is not dataclasses.MISSING
                                   for f in dataclasses.fields(cls))


def check_config(cfg: dict) -> None:
    """Every top-level value of a resolved config against its declaration, the fixed sections
    parsed whole (the named variants are checked by their registries as they are built)."""
    hints = _hints(Config)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in cfg.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{key}' (known keys: {', '.join(TOP_LEVEL_KEYS)})")
        check_value(hints[key], value, key, fields[key].metadata)
        nested = _dataclass_of(hints[key])
        if nested is not None and isinstance(value, dict):
            parse(nested, value, key, extra=nested is Backdoor)


def require(cfg: dict, *keys: str) -> None:
    """The top-level keys a stage cannot run without."""
    for key in keys:
        if cfg.get(key) is None:
            raise ConfigError(f"{key} is missing from the config (this stage needs it)")
