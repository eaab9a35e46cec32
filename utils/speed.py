"""Speed switches in one place, the config's ``speed`` section. None changes the algorithm:
batch-norm batches, losses and update rules stay as the original forms them.

    speed:
      amp: bf16             # off | bf16 | fp16 autocast (fp16 on CUDA only, with a grad scaler)
      channels_last: True   # NHWC activations: faster convolutions on CPU and CUDA
      data_path: auto       # fast: batched on-device augmentation (data.fast); reference: PIL
                            # per image in a DataLoader, as the original; auto: fast when it
                            # supports every transform of the config
      compile: False        # torch.compile the model (slow to start; off by default)
      optimizer_impl: auto  # auto (fused on CUDA, foreach on CPU) | fused | foreach | for_loop
      sync_every_step: False  # read the loss on the host after every step, as the original
                              # does (only for measuring what that costs)
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError
from .schema import SpeedSettings, parse

_AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Speed:
    """The ``speed`` section (``utils.schema.SpeedSettings``) put to work on a device."""

    def __init__(self, cfg: dict | None, device: torch.device):
        cfg = dict(cfg or {})
        if "amp" in cfg and cfg["amp"] is None:
            cfg["amp"] = "off"
        s = parse(SpeedSettings, cfg, "speed")
        if s.amp == "fp16" and device.type != "cuda":
            raise ConfigError("speed.amp fp16 needs CUDA; use bf16 on the CPU")
        self.device = device
        self.settings = s
        self.amp = s.amp
        self.dtype = _AMP[s.amp]
        self.channels_last = s.channels_last
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.scaler = torch.amp.GradScaler("cuda") if s.amp == "fp16" else None
        self.data_path = s.data_path
        self.compile = s.compile
        self.optimizer_impl = s.optimizer_impl
        self.sync_every_step = s.sync_every_step
    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move to the device and layout; compiled in place (state-dict keys unchanged)."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=self.memory_format)
        if self.compile:
            model.compile()
        return model

    def optimizer_options(self) -> dict:
        """Keyword arguments that pick the optimiser implementation (same update rule)."""
        impl = self.optimizer_impl
        if impl == "auto":
            impl = "fused" if self.device.type == "cuda" else "foreach"
        return {"fused": {"fused": True}, "foreach": {"foreach": True},
                "for_loop": {"foreach": False}}[impl]

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
        if self.sync_every_step:
            loss.item()

    def __repr__(self):
        return (f"Speed(amp={self.amp}, channels_last={self.channels_last}, "
                f"data_path={self.data_path}, compile={self.compile}, "
                f"optimizer_impl={self.optimizer_impl}, sync_every_step={self.sync_every_step})")
