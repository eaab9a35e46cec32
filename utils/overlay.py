"""Config files that build on others: ``base:``, ``include:`` and ``!replace``.

Transform order is YAML order, which ``yaml.safe_load`` preserves.

A config may build on another instead of repeating it: ``base: <path>`` names the
file it builds on, relative to its own folder (which may itself be an overlay), and the file
then holds only what differs. ``include: <path or list of paths>`` (relative to the including
file's folder) applies fragments: partial configs shared by several files, such as a
profile's values under ``config/profiles/`` or an attack's backdoor section under
``config/attacks/``. A fragment has no ``base`` and may include other
fragments; it is never a config of its own (no run folder: a config's run folder comes from
its own path). A file resolves as its base, then its includes in list order, then its own
keys. ``resolve`` does this, so every caller (``utils.config.load_yaml``) gets the whole config,
without ``base`` or ``include``:

- mappings merge key by key (recursively); any other value (number, text, list, null), or a
  mapping where the base has none, replaces the base's. Keys keep the base's order and keys the
  base lacks follow, in the overlay's order (transform order is YAML order); top-level keys
  come in the schema's order (``utils.schema.Config``).
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
from .schema import TOP_LEVEL_KEYS

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
    unknown = sorted(set(body) - set(TOP_LEVEL_KEYS) - {BASE_KEY, INCLUDE_KEY})
    if unknown:
        raise ConfigError(
            f"unknown key '{unknown[0]}' in {path} (known keys: {', '.join(sorted(TOP_LEVEL_KEYS))}, "
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
    return {k: merged[k] for k in sorted(merged, key=TOP_LEVEL_KEYS.index)}


def inherited(path: str | Path) -> dict:
    """What the file at ``path`` lays its own keys on: its base with its includes applied
    (for a fragment, its includes alone)."""
    path = Path(path)
    return _under(read_layer(path), ())


def resolve(path: str | Path) -> dict:
    """The config at ``path`` with its bases and includes resolved (module docstring)."""
    return _resolve(Path(path), ())
