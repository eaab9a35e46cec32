"""Everything a script does before its first epoch: config, checks, folders, logger, device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .config import apply_overrides, config_location, load_yaml
from .errors import UserError
from .setup import get_logger, is_fresh, prepare_run_dirs, resolve_device, write_config


@dataclass
class Run:
    cfg: dict
    config_path: Path
    saved_dir: Path
    ckpt_dir: Path
    device: torch.device
    log: object  # logging.Logger
    fresh: bool
    resume_ckpt: dict | None

    def info(self, msg: str) -> None:
        self.log.info(msg)


def load_config(args) -> dict:
    return apply_overrides(load_yaml(args.config), args.overrides)


def resume_path(ckpt_dir: Path, resume: str) -> Path:
    p = Path(resume)
    return p if p.is_absolute() or p.parent != Path(".") else ckpt_dir / resume


def start_run(args, log_name: str, cfg: dict, check=None, inner_name=None) -> Run:
    """Validate first (``check(cfg)`` raises on bad input), then make folders and the logger.

    Nothing is created or moved when the config, data or checkpoint is bad.
    """
    device = resolve_device(args.device, args.gpu)
    if check is not None:
        check(cfg)
    inner, name = inner_name or config_location(args.config)
    fresh = is_fresh(args.resume)
    resume_ckpt = None
    if not fresh:
        saved_guess, ckpt_guess = _run_dirs(cfg, inner, name)
        path = resume_path(ckpt_guess, args.resume)
        if not path.is_file():
            raise UserError(f"--resume {args.resume}: checkpoint not found at {path} (start a "
                            "fresh run with --resume False)")
        resume_ckpt = load_checkpoint(path)
        resume_ckpt["_path"] = str(path)
    saved_dir, ckpt_dir = prepare_run_dirs(cfg, inner, name, args.resume, args.overwrite,
                                           log=print)
    log = get_logger(saved_dir / "log" / log_name, append=not fresh, quiet=args.quiet)
    log.info(f"Config: {args.config} -> logs in {saved_dir}, checkpoints in {ckpt_dir}")
    log.info(f"Device: {device}")
    write_config(cfg, saved_dir, ckpt_dir.parent, name=Path(args.config).name)
    return Run(cfg, Path(args.config), saved_dir, ckpt_dir, device, log, fresh, resume_ckpt)


def _run_dirs(cfg, inner, name):
    import os
    saved = Path(os.path.expanduser(str(cfg.get("saved_dir", "./saved_data")))) / inner / name
    storage = Path(os.path.expanduser(str(cfg.get("storage_dir", "./storage")))) / inner / name
    return saved, storage / "checkpoint"
