"""Everything a script does before its first epoch: config, checks, folders, logger, device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import dist
from .checkpoint import load_checkpoint, save_checkpoint
from .config import apply_overrides, load_yaml, seed_settings
from .errors import UserError
from .metrics import CSVLog, write_json
from .schema import check_config
from .setup import (
    config_location,
    get_logger,
    is_fresh,
    prepare_run_dirs,
    resolve_device,
    resume_path,
    run_dirs,
    seed_everything,
    write_config,
)
from .speed import Speed


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
    is_main: bool = True  # rank 0 (or the only process): the one that writes files
    speed: Speed | None = None

    @property
    def poison_idx_path(self) -> Path:
        """Where this run keeps its training poison index."""
        return self.saved_dir / "poison_idx.npy"

    def save(self, state: dict, *names: str) -> None:
        """Write a checkpoint (``utils.checkpoint.training_checkpoint``) under each name in the
        checkpoint folder (rank 0 only)."""
        if self.is_main:
            for name in names:
                save_checkpoint(state, self.ckpt_dir / name)

    def record(self, epoch: int, result: dict) -> None:
        """One CSV row per result kind (rank 0 only)."""
        if self.is_main:
            log = CSVLog(self.saved_dir / "log")
            for kind, row in result.items():
                log.write(kind, epoch, row)

    def finish(self, final: dict) -> None:
        if self.is_main:
            write_json(self.saved_dir / "final_metrics.json", final)
        dist.barrier()
        dist.cleanup()

    def wrap(self, model, sync_bn: bool = False):
        """DistributedDataParallel under torchrun (global batch norm when ``sync_bn``)."""
        return dist.wrap(model, self.device, sync_bn, self.log.info)

    def info(self, msg: str) -> None:
        self.log.info(msg)


def load_config(args) -> dict:
    """The stage's config: the file, its ``--set`` overrides, then the run folders ``args``
    places it in (``StageArgs.folders``), if any."""
    cfg = apply_overrides(load_yaml(args.config), args.overrides)
    seed_settings(cfg, "--set")
    check_config(cfg)
    folders = getattr(args, "folders", None)
    return folders.apply(cfg) if folders is not None else cfg


def start_run(args, log_name: str, cfg: dict) -> Run:
    """Make the run folders and the logger, once the script has checked its config and loaded
    its data; the device, the speed settings and the ``--resume`` checkpoint are checked here
    before anything is written.

    Nothing is created or moved when the config, data or checkpoint is bad.
    """
    device = resolve_device(args.device, args.gpu)
    world = dist.env_world()
    if world.enabled and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    dist.init(world, device)
    speed = Speed(cfg.get("speed"), device)
    inner, name = config_location(args.config)
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
    if world.is_main:  # only rank 0 creates, moves or writes anything
        saved_dir, ckpt_dir = prepare_run_dirs(cfg, inner, name, args.resume, args.overwrite,
                                               log=print)
        log = get_logger(saved_dir / "log" / log_name, append=not fresh, quiet=args.quiet)
        write_config(cfg, saved_dir, ckpt_dir.parent, name=Path(args.config).name)
    else:
        saved_dir, ckpt_dir = run_dirs(cfg, inner, name)
        log = get_logger(None, name=f"dbd.rank{world.rank}", quiet=True)
    dist.barrier()
    log.info(f"Config: {args.config} -> logs in {saved_dir}, checkpoints in {ckpt_dir}")
    log.info(f"Device: {device}" + (f", {world.world} processes under torchrun"
                                    if world.enabled else ""))
    seed_everything(cfg)
    log.info(f"Speed settings: {speed}")
    return Run(cfg, Path(args.config), saved_dir, ckpt_dir, device, log, fresh, resume_ckpt,
               world.is_main, speed)


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
