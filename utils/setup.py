"""Run set-up shared by every script: device, seeding, run folders, logger."""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from .config import seed_settings
from .errors import UserError


def resolve_device(device: str | None = "auto", gpu: str | None = None) -> torch.device:
    """One device option for every script (docs/differences.md #18).

    ``--device cpu|cuda|cuda:N|auto``; the original's ``--gpu N`` is still accepted and means
    ``cuda:N`` when CUDA is present, else the CPU (so the README's command lines run anywhere).
    """
    if device in (None, "auto"):
        if gpu not in (None, ""):
            if torch.cuda.is_available():
                first = str(gpu).split(",")[0].strip()
                if not first.isdigit():
                    raise UserError(f"--gpu expects a device index such as 0, got '{gpu}'")
                return _check_cuda(torch.device(f"cuda:{first}"))
            return torch.device("cpu")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device '{device}' is not a device (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda":
        return _check_cuda(dev)
    if dev.type != "cpu":
        raise UserError(f"--device '{device}' is not supported (use cpu, cuda, cuda:N or auto)")
    return dev


def _check_cuda(dev: torch.device) -> torch.device:
    if not torch.cuda.is_available():
        raise UserError("--device cuda was given but CUDA is not available here (use --device cpu)")
    index = dev.index or 0
    if index >= torch.cuda.device_count():
        raise UserError(
            f"--device cuda:{index}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    return torch.device("cuda", index)


def set_seed(seed: int = 100, deterministic: bool = False, benchmark: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = bool(benchmark) and not deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def seed_from_config(cfg: dict) -> int:
    """The config's seed (``utils.config.seed_settings``), e.g. for the loaders' shuffles."""
    return seed_settings(cfg).seed


def seed_everything(cfg: dict) -> None:
    s = seed_settings(cfg)
    set_seed(s.seed, s.deterministic, s.benchmark)


def _has_results(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def run_dirs(cfg: dict, inner_dir: str, name: str) -> tuple[Path, Path]:
    """(saved_dir, checkpoint dir) of a config, as docs/original.md §1.1; creates nothing."""
    saved = Path(os.path.expanduser(str(cfg.get("saved_dir", "./saved_data")))) / inner_dir / name
    storage = Path(os.path.expanduser(str(cfg.get("storage_dir", "./storage")))) / inner_dir / name
    return saved, storage / "checkpoint"


def prepare_run_dirs(cfg: dict, inner_dir: str, name: str, resume: str | None,
                     overwrite: bool = False, log=print) -> tuple[Path, Path]:
    """Create ``<saved_dir>/<inner>/<name>`` and ``<storage_dir>/<inner>/<name>/checkpoint``.

    A fresh run (``--resume False``) never deletes earlier results (docs/differences.md #16): an existing
    run folder is moved aside to a timestamped name, unless ``--overwrite`` asks to delete it.
    """
    saved, ckpt_dir = run_dirs(cfg, inner_dir, name)
    storage = ckpt_dir.parent
    fresh = is_fresh(resume)
    if fresh:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for d in (saved, storage):
            if _has_results(d):
                if overwrite:
                    shutil.rmtree(d)
                    log(f"Removed earlier results in {d} (--overwrite)")
                else:
                    aside = d.with_name(f"{d.name}.{stamp}")
                    n = 1
                    while aside.exists():
                        aside = d.with_name(f"{d.name}.{stamp}.{n}")
                        n += 1
                    d.rename(aside)
                    log(f"Moved earlier results in {d} aside to {aside}")
    (saved / "log").mkdir(parents=True, exist_ok=True)
    (storage / "checkpoint").mkdir(parents=True, exist_ok=True)
    return saved, storage / "checkpoint"


def is_fresh(resume: str | None) -> bool:
    return resume is not None and str(resume).lower() in ("false", "none", "no", "0")


def write_config(cfg: dict, *dirs: Path, name: str = "config.yaml") -> None:
    text = yaml.safe_dump(cfg, sort_keys=False)
    for d in dirs:
        (Path(d) / name).write_text(text)


class _Quiet(logging.Filter):
    def filter(self, record):  # noqa: D401 - logging API
        return False


def get_logger(log_file: Path | None, name: str = "dbd", append: bool = False,
               quiet: bool = False) -> logging.Logger:
    """A logger writing bare messages to stdout and to ``log_file`` (docs/original.md §7.1)."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    stream = logging.StreamHandler(sys.stdout)
    if quiet:
        stream.addFilter(_Quiet())
    logger.addHandler(stream)
    if log_file is not None:
        fh = logging.FileHandler(log_file, mode="a" if append else "w")
        logger.addHandler(fh)
    logger.info(f"Start at: {time.asctime()} at: {socket.gethostname()}")
    return logger
