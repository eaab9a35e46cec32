"""The transform ops a config's ``transform`` section may name (docs/original.md §2.5), in one table.

Each entry of ``OPS`` gives an op's arguments with their defaults (torchvision's, checked by
tests/test_transforms.py) and the validation that turns the arguments of a config entry into
checked, normalised values. Both augmentation paths read it: ``data.transforms`` validates an
entry here before building the PIL / torchvision op from it, and ``data.fast_aug`` builds its
batched op from the normalised values. Invalid arguments raise a one-line ``ConfigError``
naming the entry (``where``).

What the batched path cannot reproduce (an interpolation mode, negative padding, a fractional
fill) is valid here; ``data.fast_aug.unsupported_reason`` says so.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from utils.errors import ConfigError

# The one interpolation map: PIL filter codes (as ``Image.Resampling``) and the mode names
# (torchvision's InterpolationMode values) a config may use.
PIL_FILTER_CODES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box",
                    5: "hamming"}
INTERPOLATION_NAMES = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming",
                       "lanczos")


# --------------------------------------------------------------------------- argument checks

def _number(v) -> bool:
    return isinstance(v, numbers.Number) and not isinstance(v, bool)


def size(v, where: str) -> tuple[int, int]:
    """torchvision's _setup_size: int -> (v, v); [v] -> (v, v); [h, w]."""
    if _number(v):
        v = [v]
    if not isinstance(v, (list, tuple)) or len(v) not in (1, 2):
        raise ConfigError(f"{where}.size must be an int or [h, w], got {v!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in v):
        raise ConfigError(f"{where}.size must hold positive integers, got {v!r}")
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def probability(v, where: str) -> float:
    if not _number(v) or not 0.0 <= v <= 1.0:
        raise ConfigError(f"{where}.p must be a probability in [0, 1], got {v!r}")
    return float(v)


def interpolation(v, where: str) -> str:
    """A PIL filter code, a mode name (any case) or an InterpolationMode -> the mode name."""
    if isinstance(v, bool):
        raise ConfigError(f"{where}.interpolation: unknown mode {v!r}")
    if isinstance(v, int):
        if v not in PIL_FILTER_CODES:
            raise ConfigError(f"{where}.interpolation: unknown PIL filter code {v}")
        return PIL_FILTER_CODES[v]
    name = str(getattr(v, "value", v)).lower()  # an InterpolationMode passed from code
    if name not in INTERPOLATION_NAMES:
        raise ConfigError(f"{where}.interpolation: unknown mode '{v}'")
    return name


def jitter_range(v, name: str, where: str, center: float, bound: tuple[float, float],
                 clip: bool) -> tuple[float, float] | None:
    """ColorJitter._check_input: v -> [center - v, center + v] (clipped at 0), or [lo, hi];
    None when the adjustment does nothing."""
    if _number(v):
        if v < 0:
            raise ConfigError(f"{where}.{name}: a single number must be non-negative, got {v}")
        lo, hi = center - float(v), center + float(v)
        if clip:
            lo = max(lo, 0.0)
    elif isinstance(v, (list, tuple)) and len(v) == 2:
        lo, hi = float(v[0]), float(v[1])
    else:
        raise ConfigError(f"{where}.{name}: must be a number or a [min, max] pair, got {v!r}")
    if not bound[0] <= lo <= hi <= bound[1]:
        raise ConfigError(f"{where}.{name}: values must lie in {list(bound)}, got {[lo, hi]}")
    return None if lo == hi == center else (lo, hi)


def blur_sigma(v, where: str) -> tuple[float, float]:
    """gaussian_blur's sigma: [min, max], the range of the blur radius."""
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not 0 <= v[0] <= v[1]:
        raise ConfigError(f"{where}.sigma must be [min, max] with 0 <= min <= max, got {v!r}")
    return float(v[0]), float(v[1])


def _required_size(a: dict, where: str) -> tuple[int, int]:
    if a["size"] is None:
        raise ConfigError(f"{where}: bad arguments (missing 'size')")
    return size(a["size"], where)


def _min_max(v, key: str, where: str) -> tuple[float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not (0 < v[0] <= v[1]):
        raise ConfigError(f"{where}.{key} must be [min, max] with 0 < min <= max, got {v!r}")
    return float(v[0]), float(v[1])


# --------------------------------------------------------------------------- one check per op
#
# Each takes the complete arguments (defaults filled in) and returns the normalised values.

def _random_crop(a: dict, where: str) -> dict:
    out = {"size": _required_size(a, where)}
    padding = 0 if a["padding"] is None else a["padding"]
    if _number(padding):
        padding = [padding]
    if not isinstance(padding, (list, tuple)) or len(padding) not in (1, 2, 4) or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in padding):
        raise ConfigError(f"{where}.padding must be an int or a 2/4-list of ints, "
                          f"got {padding!r}")
    if len(padding) == 1:
        padding = padding * 4
    elif len(padding) == 2:
        padding = [padding[0], padding[1], padding[0], padding[1]]
    out["padding"] = tuple(padding)  # left, top, right, bottom
    if a["padding_mode"] not in ("constant", "edge", "reflect", "symmetric"):
        raise ConfigError(f"{where}.padding_mode must be constant, edge, reflect or "
                          f"symmetric, got {a['padding_mode']!r}")
    out["padding_mode"] = a["padding_mode"]
    out["pad_if_needed"] = bool(a["pad_if_needed"])
    fill = a["fill"]
    if _number(fill):
        fill = [fill] * 3
    if not isinstance(fill, (list, tuple)) or len(fill) not in (1, 3):
        raise ConfigError(f"{where}.fill must be a number or 3 numbers, got {fill!r}")
    out["fill"] = tuple(fill) * 3 if len(fill) == 1 else tuple(fill)
    return out


def _center_crop(a: dict, where: str) -> dict:
    return {"size": _required_size(a, where)}


def _probability_only(a: dict, where: str) -> dict:
    return {"p": probability(a["p"], where)}


def _random_resize_crop(a: dict, where: str) -> dict:
    return {"size": _required_size(a, where),
            "scale": _min_max(a["scale"], "scale", where),
            "ratio": _min_max(a["ratio"], "ratio", where),
            # antialias is ignored on PIL images (always antialiased): accepted, as torchvision
            "interpolation": interpolation(a["interpolation"], where)}


def _resize(a: dict, where: str) -> dict:
    v = a["size"]
    if v is None:
        raise ConfigError(f"{where}: bad arguments (missing 'size')")
    # [h, w] is the output size; an int (or [s]) the length of the smaller edge.
    out_size = size(v, where) if isinstance(v, (list, tuple)) and len(v) == 2 \
        else (size(v, where)[0],)
    max_size = a["max_size"]
    if max_size is not None and (len(out_size) == 2 or max_size <= out_size[0]):
        raise ConfigError(f"{where}.max_size must exceed an int size, got {max_size!r}")
    return {"size": out_size, "max_size": max_size,
            "interpolation": interpolation(a["interpolation"], where)}


def _random_color_jitter(a: dict, where: str) -> dict:
    p = probability(a["p"], where)
    ranges = {k: jitter_range(a[k], k, where, 1.0, (0, math.inf), True)
              for k in ("brightness", "contrast", "saturation")}
    ranges["hue"] = jitter_range(a["hue"], "hue", where, 0.0, (-0.5, 0.5), False)
    return {"p": p, "ranges": ranges}


def _gaussian_blur(a: dict, where: str) -> dict:
    return {"p": probability(a["p"], where), "sigma": blur_sigma(a["sigma"], where)}


def _to_tensor(a: dict, where: str) -> dict:
    return {}


def _normalize(a: dict, where: str) -> dict:
    for k in ("mean", "std"):
        v = a[k]
        if not isinstance(v, (list, tuple)) or len(v) not in (1, 3) or not all(
                isinstance(e, numbers.Number) for e in v):
            raise ConfigError(f"{where}.{k} must be a list of 1 or 3 numbers, got {v!r}")
    if any(s == 0 for s in a["std"]):
        raise ConfigError(f"{where}.std must not contain 0, got {a['std']!r}")
    return {"mean": tuple(float(m) for m in a["mean"]), "std": tuple(float(s) for s in a["std"])}


# --------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class OpSchema:
    name: str
    defaults: dict  # every argument the op takes -> its default (None for size, mean, std)
    check: Callable[[dict, str], dict]

    def parse(self, kw: dict, where: str) -> dict:
        """Keyword arguments of one entry -> the op's checked, normalised values."""
        unknown = sorted(set(kw) - set(self.defaults))
        if unknown:
            raise ConfigError(f"{where}: bad arguments (unexpected argument '{unknown[0]}')")
        return self.check({**self.defaults, **kw}, where)


OPS: dict[str, OpSchema] = {s.name: s for s in (
    OpSchema("random_crop", {"size": None, "padding": None, "pad_if_needed": False, "fill": 0,
                             "padding_mode": "constant"}, _random_crop),
    OpSchema("center_crop", {"size": None}, _center_crop),
    OpSchema("random_horizontal_flip", {"p": 0.5}, _probability_only),
    OpSchema("random_resize_crop", {"size": None, "scale": (0.08, 1.0),
                                    "ratio": (3.0 / 4.0, 4.0 / 3.0),
                                    "interpolation": "bilinear", "antialias": True},
             _random_resize_crop),
    OpSchema("resize", {"size": None, "interpolation": "bilinear", "max_size": None,
                        "antialias": True}, _resize),
    # p: the probability of RandomApply around ColorJitter / the blur
    OpSchema("random_color_jitter", {"p": 1.0, "brightness": 0, "contrast": 0,
                                     "saturation": 0, "hue": 0}, _random_color_jitter),
    OpSchema("random_grayscale", {"p": 0.1}, _probability_only),
    OpSchema("gaussian_blur", {"p": 1.0, "sigma": (0.1, 2.0)}, _gaussian_blur),
    OpSchema("to_tensor", {}, _to_tensor),
    OpSchema("normalize", {"mean": None, "std": None, "inplace": False}, _normalize),
)}


def entry_kwargs(name: str, args, where: str) -> dict:
    """The keyword arguments of the config entry ``name: args`` (a value that is not a
    mapping, e.g. ``random_horizontal_flip: True``, means the defaults)."""
    if name not in OPS:
        raise ConfigError(f"{where}: transformation '{name}' is not supported")
    if name == "to_tensor" and not args:
        raise ConfigError(f"{where}: to_tensor must be true when present")
    return dict(args) if isinstance(args, dict) else {}


def parse_entry(name: str, args, where: str) -> dict:
    """The checked, normalised values of the config entry ``name: args``."""
    return OPS[name].parse(entry_kwargs(name, args, where), where)
