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
from typing import NamedTuple

import numpy as np
import torch
import yaml

from .config import seed_settings
from .errors import UserError
from .schema import RUN_FOLDER_KEYS


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


def seed_everything(cfg: dict) -> None:
    s = seed_settings(cfg)
    set_seed(s.seed, s.deterministic, s.benchmark)


def _has_results(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


class RunFolders(NamedTuple):
    """A run's ``saved_dir`` and ``storage_dir`` (logs and checkpoints of every config under
    them), given as values where a caller places a run elsewhere than its config says."""
    saved: Path
    storage: Path

    @classmethod
    def of(cls, pair) -> RunFolders:
        return cls(Path(pair[0]), Path(pair[1]))

    @classmethod
    def from_config(cls, cfg: dict) -> RunFolders:
        return cls(Path(os.path.expanduser(str(cfg.get("saved_dir", "./saved_data")))),
                   Path(os.path.expanduser(str(cfg.get("storage_dir", "./storage")))))

    def apply(self, cfg: dict) -> dict:
        """``cfg`` with these folders as its ``saved_dir`` and ``storage_dir``."""
        out = dict(cfg)
        for key, folder in zip(RUN_FOLDER_KEYS, self):
            out[key] = str(folder)
        return out


def config_location(path: str | Path) -> tuple[str, str]:
    """(inner_dir, config_name) as docs/original.md §1.1: the folders between ``config/`` and
    the file name name the run folders. A config outside any ``config`` folder gets an empty
    inner_dir (the original refused those)."""
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


def run_dirs(cfg: dict, inner_dir: str, name: str) -> tuple[Path, Path]:
    """(saved_dir, checkpoint dir) of a config, as docs/original.md §1.1; creates nothing."""
    saved, storage = RunFolders.from_config(cfg)
    return saved / inner_dir / name, storage / inner_dir / name / "checkpoint"


def resume_path(ckpt_dir: Path, name: str | Path) -> Path:
    """A checkpoint named on the command line: a bare file name lies in ``ckpt_dir``, a path
    is taken as it is."""
    p = Path(name)
    return p if p.is_absolute() or p.parent != Path(".") else Path(ckpt_dir) / p


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
