"""YAML configs in the original's shape, with ``--set key.path=value`` overrides.

The original loads a YAML file under ``config/`` and derives the run folders from the path
between ``config/`` and the file name (docs/original.md §1.1). Transform order is YAML order, which
``yaml.safe_load`` preserves.

Overlays. A config may build on another instead of repeating it: ``base: <path>`` names the
file it builds on, relative to its own folder (which may itself be an overlay), and the file
then holds only what differs. ``include: <path or list of paths>`` (relative to the including
file's folder) applies fragments: partial configs shared by several files, such as a
profile's values under ``config/profiles/`` or an attack's backdoor section under
``config/attacks/``. A fragment has no ``base`` and may include other
fragments; it is never a config of its own (no run folder: a config's run folder comes from
its own path). A file resolves as its base, then its includes in list order, then its own
keys. ``load_yaml`` resolves this, so every caller gets the whole config, without ``base`` or
``include``:

- mappings merge key by key (recursively); any other value (number, text, list, null), or a
  mapping where the base has none, replaces the base's. Keys keep the base's order and keys the
  base lacks follow, in the overlay's order (transform order is YAML order); top-level keys
  come in KEY_ORDER.
- a mapping tagged ``!replace`` replaces the base's mapping whole instead of merging into it,
  e.g. ``backdoor: !replace {...}`` drops the base's ``badnets`` variant for another attack's.
  It must tag a mapping, at a key that what comes before it (the base, earlier includes)
  already sets.
- a missing base or include, a cycle of bases or includes, or a fragment with a base is an
  error naming the file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ConfigError
from .speed import KEYS as SPEED_KEYS

# Top-level keys a config may hold, in the order a resolved overlay lists them (the order of
# the original's configs, this project's additions among them). Anything else is almost
# certainly a typo.
KEY_ORDER = (
    "pretrain_config_path", "pretrain_checkpoint", "seed", "dataset", "dataset_dir",
    "num_classes", "saved_dir", "storage_dir", "prefetch", "train_subset", "test_subset", "speed",
    "simclr", "finetune", "test_loader", "transform", "backdoor", "loader", "network", "sync_bn",
    "criterion", "warmup", "semi", "optimizer", "lr_scheduler", "num_epochs",
)
KNOWN_KEYS = set(KEY_ORDER)
# The overlay keys (see the module docstring): read while loading a file, never in the result,
# and not settable with --set.
BASE_KEY = "base"
INCLUDE_KEY = "include"
REPLACE_TAG = "!replace"


class Replace(dict):
    """A mapping tagged ``!replace`` in an overlay: it replaces the base's mapping whole."""


class _TagError(Exception):
    def __init__(self, line: int):
        self.line = line


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` plus the ``!replace`` tag."""


def _construct_replace(loader: _Loader, node) -> Replace:
    if not isinstance(node, yaml.MappingNode):
        raise _TagError(node.start_mark.line + 1)
    return Replace(loader.construct_mapping(node, deep=True))


_Loader.add_constructor(REPLACE_TAG, _construct_replace)


@dataclass(frozen=True)
class Layer:
    """One config file as written: the file it builds on (None for a whole file or a
    fragment), its own keys (``!replace`` mappings kept as ``Replace``) and the fragments it
    includes, in order."""
    path: Path
    base: Path | None
    body: dict
    includes: tuple[Path, ...] = ()


def read_layer(path: str | Path) -> Layer:
    """Read one config file without resolving its base or includes; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file to --config)")
    try:
        with open(path) as f:
            body = yaml.load(f, Loader=_Loader)  # a SafeLoader plus the one tag
    except _TagError as e:
        raise ConfigError(f"{REPLACE_TAG} in {path} at line {e.line} must tag a mapping") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"YAML syntax error in {path}{where}: {problem}") from None
    if not isinstance(body, dict) or isinstance(body, Replace):
        raise ConfigError(f"{path} must hold a YAML mapping at the top level")
    unknown = sorted(set(body) - KNOWN_KEYS - {BASE_KEY, INCLUDE_KEY})
    if unknown:
        raise ConfigError(
            f"unknown key '{unknown[0]}' in {path} (known keys: {', '.join(sorted(KNOWN_KEYS))}, "
            f"and {BASE_KEY}, {INCLUDE_KEY} for an overlay)"
        )
    has_base = BASE_KEY in body
    name = body.pop(BASE_KEY, None)
    if has_base and (not isinstance(name, str) or not name):
        raise ConfigError(f"{BASE_KEY} in {path} must be one file path (relative to its folder), "
                          f"got {name!r}")
    has_include = INCLUDE_KEY in body
    included = body.pop(INCLUDE_KEY, None)
    names = [included] if isinstance(included, str) else included
    if has_include and (not isinstance(names, list) or not names
                        or not all(isinstance(n, str) and n for n in names)):
        raise ConfigError(f"{INCLUDE_KEY} in {path} must be a file path or a list of file paths "
                          f"(relative to its folder), got {included!r}")
    return Layer(path, path.parent / name if has_base else None, body,
                 tuple(path.parent / n for n in names or ()))


def _find_replace(node, prefix: str = "") -> str | None:
    """The key path of the first ``!replace`` mapping in ``node``, if any."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, Replace):
                return f"{prefix}{k}"
            found = _find_replace(v, f"{prefix}{k}.")
            if found:
                return found
    return None


def _plain(node, path: Path, prefix: str):
    """``node`` as plain dicts and lists (safe to dump); a nested ``!replace`` is an error."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if isinstance(v, Replace):
                raise ConfigError(f"{REPLACE_TAG} at '{prefix}{k}' in {path} is inside a mapping "
                                  "that is replaced or new already (tag the outer one only)")
            out[k] = _plain(v, path, f"{prefix}{k}.")
        return out
    if isinstance(node, list):
        return [_plain(v, path, prefix) for v in node]
    return node


def merge(base: dict, over: dict, path: Path, prefix: str = "", onto: str = "the base") -> dict:
    """``over`` laid on ``base`` by the overlay rules (module docstring); copies, never edits.
    ``onto`` names ``base`` in errors."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        key = f"{prefix}{k}"
        if isinstance(v, Replace):
            if k not in base:
                raise ConfigError(f"{REPLACE_TAG} at '{key}' in {path}: {onto} has no '{key}' "
                                  "to replace (drop the tag to add it)")
            out[k] = _plain(dict(v), path, f"{key}.")
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            out[k] = merge(base[k], v, path, f"{key}.", onto)
        else:
            out[k] = _plain(v, path, f"{key}.")
    return out


def _under(layer: Layer, chain: tuple[Path, ...]) -> dict:
    """What ``layer``'s own keys are laid on: its base resolved, then its includes applied in
    order ({} for a file with neither). ``chain`` holds the files being resolved (cycles)."""
    chain = chain + (layer.path.resolve(),)
    if layer.base is None:
        return _include({}, layer, chain)
    if not layer.base.is_file():
        raise ConfigError(f"{BASE_KEY} file not found: {layer.base} (named in {layer.path})")
    if layer.base.resolve() in chain:
        raise ConfigError(f"{BASE_KEY} in {layer.path} makes a cycle: {layer.base} builds on it "
                          "again")
    return _include(_resolve(layer.base, chain), layer, chain)


def _include(cfg: dict, layer: Layer, chain: tuple[Path, ...]) -> dict:
    """``cfg`` with ``layer``'s fragments applied in order, each with its own includes first."""
    for name in layer.includes:
        if not name.is_file():
            raise ConfigError(f"{INCLUDE_KEY} file not found: {name} (named in {layer.path})")
        if name.resolve() in chain:
            raise ConfigError(f"{INCLUDE_KEY} in {layer.path} makes a cycle: {name} leads back "
                              "to it")
        fragment = read_layer(name)
        if fragment.base is not None:
            raise ConfigError(f"{BASE_KEY} in {name}: a fragment (included by {layer.path}) "
                              "cannot have a base")
        cfg = _include(cfg, fragment, chain + (name.resolve(),))
        cfg = merge(cfg, fragment.body, name, onto="the config it is included into")
    return cfg


def _onto(layer: Layer) -> str:
    """How errors name what ``layer``'s own keys are laid on."""
    return "the base" if not layer.includes else "what it is laid on (base and includes)"


def _resolve(path: Path, chain: tuple[Path, ...]) -> dict:
    layer = read_layer(path)
    if layer.base is None and not layer.includes:
        where = _find_replace(layer.body)
        if where:
            raise ConfigError(f"{REPLACE_TAG} at '{where}' in {path}: the file has no "
                              f"'{BASE_KEY}' (or '{INCLUDE_KEY}') whose mapping it could replace")
        return _plain(layer.body, path, "")  # a whole file, as written
    merged = merge(_under(layer, chain), layer.body, path, onto=_onto(layer))
    return {k: merged[k] for k in sorted(merged, key=KEY_ORDER.index)}


def inherited(path: str | Path) -> dict:
    """What the file at ``path`` lays its own keys on: its base with its includes applied
    (for a fragment, its includes alone)."""
    path = Path(path)
    return _under(read_layer(path), ())


def load_yaml(path: str | Path) -> dict:
    """The config at ``path`` with its bases resolved (module docstring), checked."""
    path = Path(path)
    cfg = _resolve(path, ())
    check_seed(cfg.get("seed"), str(path))
    return cfg


SEED_KEYS = {"seed": int, "deterministic": bool, "benchmark": bool}
SEED_DEFAULTS = {"seed": 100, "deterministic": False, "benchmark": True}


@dataclass(frozen=True)
class SeedSettings:
    seed: int = 100
    deterministic: bool = False
    benchmark: bool = True


def seed_settings(cfg: dict, where: str = "the config") -> SeedSettings:
    """The one reading of a config's ``seed``, used for every seeded draw (the RNGs, the
    subsets, the poison index and the loaders' shuffles).

    ``seed: {seed: int, deterministic: bool, benchmark: bool}``, each key optional (defaults
    100, False, True as in the original's configs), or a plain int meaning ``{seed: <int>}``;
    absent or null means all defaults.
    """
    s = cfg.get("seed")
    if s is None:
        return SeedSettings()
    if isinstance(s, int) and not isinstance(s, bool):
        return SeedSettings(seed=s)
    if not isinstance(s, dict):
        raise ConfigError(f"seed in {where} must be a mapping or an integer, got {s!r}")
    for k, v in s.items():
        if k not in SEED_KEYS:
            raise ConfigError(f"unknown key 'seed.{k}' in {where} (known: seed, deterministic, "
                              "benchmark)")
        want = SEED_KEYS[k]
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"seed.{k} in {where} must be {want.__name__}, got {v!r}")
    return SeedSettings(**{**SEED_DEFAULTS, **s})


def check_seed(seed, where: str) -> None:
    """``seed: {seed: int, deterministic: bool, benchmark: bool}`` (or a plain int)."""
    seed_settings({"seed": seed}, where)


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


def config_location(path: str | Path) -> tuple[str, str]:
    """(inner_dir, config_name) as docs/original.md §1.1: the folders between ``config/`` and the file.

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
# switches and this project's optional additions (docs/usage.md, "Config additions"). Their values
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
