"""What the reports and benchmarks say about the machine they ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine(device: str | torch.device | None = None) -> str:
    """The CPU model and its logical cores, and the GPU where ``device`` is a CUDA device (or,
    with no device given, where CUDA is present)."""
    cpu = platform.processor() or platform.machine() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cuda = (torch.device(device).type == "cuda") if device is not None \
        else torch.cuda.is_available()
    gpu = f", {torch.cuda.get_device_name(device)}" if cuda else ""
    return f"{cpu} ({os.cpu_count()} logical cores){gpu}"
