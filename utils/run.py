"""Everything a script does before its first epoch: config, checks, folders, logger, device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .config import apply_overrides, config_location, load_yaml
from .errors import UserError
from .setup import get_logger, is_fresh, prepare_run_dirs, resolve_device, run_dirs, write_config


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
        _, ckpt_guess = run_dirs(cfg, inner, name)
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


def restore(run: Run, model, optimizer, scheduler=None) -> tuple[int, float, int, dict]:
    """Load the ``--resume`` checkpoint into model, optimiser, scheduler and the RNGs.

    Returns (epoch, best_acc, best_epoch, result); zeros and {} on a fresh run.
    """
    from .checkpoint import load_model_state, set_rng_state

    ck = run.resume_ckpt
    if ck is None:
        return 0, 0.0, 0, {}
    load_model_state(model, ck["model_state_dict"], ck["_path"])
    optimizer.load_state_dict(ck["optimizer_state_dict"])
    if scheduler is not None and ck.get("scheduler_state_dict"):
        scheduler.load_state_dict(ck["scheduler_state_dict"])
    set_rng_state(ck.get("rng_state"))
    run.info(f"Resumed from {ck['_path']} at epoch {ck['epoch']}")
    return ck["epoch"], ck.get("best_acc", 0.0), ck.get("best_epoch", 0), ck.get("result", {})
