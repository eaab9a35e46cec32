"""What every batched op shares: the op interface, per-sample random draws, per-sample
selection."""

from __future__ import annotations

import torch

from data import augment_schema as schema


class Unsupported(Exception):
    """A valid config that the batched augmentation does not reproduce."""


# --------------------------------------------------------------------------- random helpers

def rand(shape, generator, device, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def uniform(n, lo, hi, generator, device, dtype=torch.float32) -> torch.Tensor:
    return lo + (hi - lo) * rand(n, generator, device, dtype)


def randint(high: torch.Tensor | int, n, generator, device) -> torch.Tensor:
    """Uniform integers in [0, high) with a per-sample ``high`` (torch.randint takes a scalar)."""
    u = rand(n, generator, device, torch.float64)  # float64: u * high never rounds up to high
    high = torch.as_tensor(high, device=device)
    return torch.minimum((u * high).floor().long(), high.long() - 1)


# --------------------------------------------------------------------------- per-sample selection

def where_samples(mask: torch.Tensor, fn, x: torch.Tensor, out=None) -> torch.Tensor:
    """``out`` (default: x) with fn applied to the samples in ``mask``: fn(x[idx], idx). On
    the CPU only those samples are computed, and written into ``out`` in place (into a copy
    of x by default); on an accelerator the whole batch is, then selected, because picking a
    data-dependent subset would synchronise with the host."""
    if x.device.type == "cpu":
        idx = mask.nonzero().squeeze(1)
        out = x.clone() if out is None else out
        if len(idx):
            out[idx] = fn(x[idx], idx)
        return out
    everything = torch.arange(x.shape[0], device=x.device)
    return torch.where(mask.view(-1, 1, 1, 1), fn(x, everything), x if out is None else out)


# --------------------------------------------------------------------------- ops

class Op:
    """A batched op: ``sample`` draws per-sample parameters, ``apply`` uses them.

    Built from keyword arguments (``Op(where, **arguments)``) or from a config entry
    (``Op.from_entry(args, where)``); either way the arguments go through the op's entry of
    ``data.augment_schema.OPS``, and ``setup`` takes the values it returns.
    """

    name = ""
    image_op = True  # holds 0..255 integers afterwards (False for to_tensor / normalize)

    def __init__(self, where: str, **kw):
        self.setup(schema.OPS[self.name].parse(kw, where), where)

    @classmethod
    def from_entry(cls, args, where: str) -> Op:
        op = cls.__new__(cls)
        op.setup(schema.parse_entry(cls.name, args, where), where)
        return op

    def setup(self, spec: dict, where: str) -> None:
        """Keep the schema's values; raise ``Unsupported`` for what is not reproduced."""

    def sample(self, n: int, generator: torch.Generator, device, size=None) -> dict:
        return {}

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class CoinOp(Op):
    """An op applied to each sample with probability ``p``: parameter ``key`` [B] bool."""

    key = ""

    def setup(self, spec, where):
        self.p = spec["p"]

    def sample(self, n, generator, device, size=None):
        return {self.key: rand(n, generator, device) < self.p}

    def apply(self, x, params):
        return torch.where(params[self.key].view(-1, 1, 1, 1), self.change(x), x)

    def change(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def need_size(op: Op, size):
    if size is None:
        raise ValueError(f"{op.name}.sample needs size=(H, W) of the images")
    return int(size[0]), int(size[1])
