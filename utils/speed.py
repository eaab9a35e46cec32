"""Precision and memory-format switches in one place: ``speed: {amp, channels_last}``."""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

_AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Speed:
    """``amp``: off | bf16 | fp16 (fp16 only on CUDA, with a gradient scaler).
    ``channels_last``: NHWC activations, faster convolutions on CPU and CUDA."""

    def __init__(self, cfg: dict | None, device: torch.device):
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"amp", "channels_last"}
        if unknown:
            raise ConfigError(f"speed: unknown key '{sorted(unknown)[0]}'")
        amp = cfg.get("amp", "off")
        amp = "off" if amp in (False, None) else str(amp)
        if amp not in _AMP:
            raise ConfigError(f"speed.amp must be one of off, bf16, fp16, got '{amp}'")
        if amp == "fp16" and device.type != "cuda":
            raise ConfigError("speed.amp fp16 needs CUDA; use bf16 on the CPU")
        self.device = device
        self.amp = amp
        self.dtype = _AMP[amp]
        self.channels_last = bool(cfg.get("channels_last", True))
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=self.memory_format) if self.channels_last else model

    def backward_step(self, loss, optimizer, before_step=None) -> None:
        """Backward and optimiser step; ``before_step()`` runs between them (e.g. to average
        gradients of parameters trained outside DistributedDataParallel)."""
        if self.scaler is None:
            loss.backward()
            if before_step is not None:
                before_step()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            if before_step is not None:
                before_step()
            self.scaler.step(optimizer)
            self.scaler.update()

    def __repr__(self):
        return f"Speed(amp={self.amp}, channels_last={self.channels_last})"
