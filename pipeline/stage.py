"""What every training stage does around its own story, written once: the set-up (config and
overrides, checks, data and attack, run folders, device, seeds, logger, the poison index,
resuming), the end of an epoch (CSV rows, the best model, checkpoints) and the end-of-stage
record (``final_metrics.json``).

    stage = open_stage(args, "supervise.log", cfg, check)   # nothing written on bad input
    ...                                                     # the stage's own data and model
    start_epoch, result = stage.restore(model, optimizer, scheduler)
    for epoch in ...:
        ...
        stage.end_epoch(epoch, result, model, optimizer, scheduler, message)
    stage.finish(num_epochs, result)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.build import PoisonData, load_poison_data, load_poison_index, poison_index
from utils.checkpoint import training_checkpoint
from utils.cli import StageArgs
from utils.config import apply_overrides, load_yaml, seed_settings
from utils.dist import unwrap
from utils.errors import ConfigError
from utils.loops import evaluate
from utils.metrics import current_names
from utils.paths import REPO_ROOT
from utils.run import Run, restore, start_run
from utils.schema import RUN_FOLDER_KEYS, check_config
from utils.setup import RunFolders


@dataclass
class Stage:
    """A running stage: its config, run, data and poison index, the best clean accuracy so
    far (``best``: None for a stage that does not test its model) and its clock."""
    args: StageArgs
    cfg: dict
    run: Run
    data: PoisonData
    poison_idx: np.ndarray
    best: tuple[float, int] | None = None
    t0: float = 0.0

    @property
    def log(self):
        return self.run.log

    @property
    def device(self):
        return self.run.device

    @property
    def speed(self):
        return self.run.speed

    @property
    def quiet(self) -> bool:
        return self.args.quiet

    def restore(self, model, optimizer, scheduler=None) -> tuple[int, dict]:
        """The ``--resume`` checkpoint loaded (model, optimiser, scheduler, RNGs, best
        accuracy); returns (its epoch, its result), (0, {}) on a fresh run. Starts the clock."""
        epoch, best_acc, best_epoch, result = restore(self.run, unwrap(model), optimizer,
                                                      scheduler)
        if self.best is not None:
            self.best = (best_acc, best_epoch)
        self.t0 = time.perf_counter()
        return epoch, {kind: current_names(kind, row) for kind, row in result.items()}

    def end_epoch(self, epoch: int, result: dict, model, optimizer, scheduler, message: str,
                  keep: tuple[str, ...] = (), checkpoint_result: dict | None = None) -> None:
        """One CSV row per result kind, the log line, and the checkpoints: ``keep`` (e.g.
        ``epoch20.pt``), ``best_model.pt`` when the clean accuracy is the best so far (updated
        before saving, docs/differences.md #8), then ``latest_model.pt``."""
        self.run.record(epoch, result)
        names = list(keep)
        if self.best is not None and result["clean_test"]["BA"] > self.best[0]:
            self.best = (result["clean_test"]["BA"], epoch)
            names.append("best_model.pt")
        self.log.info(message)
        state = training_checkpoint(epoch, result if checkpoint_result is None
                                    else checkpoint_result, model, optimizer, scheduler,
                                    best=self.best, poison_idx_path=self.run.poison_idx_path)
        # kept epochs before latest_model.pt: a kill between the two writes must not lose a
        # kept epoch, since the resumed run starts after it
        self.run.save(state, *names, "latest_model.pt")

    def finish(self, epoch: int, result: dict, **extra) -> dict:
        """``final_metrics.json``: the last epoch's BA / ASR / RA and the best accuracy (stages
        that test their model), ``extra``, the poisoned count, wall time and device."""
        final: dict = {"epoch": epoch}
        if self.best is not None:
            final.update(last_test_metrics(result))
            final["best_acc"], final["best_epoch"] = self.best
        final.update(extra)
        final.update(poisoned=int(self.poison_idx.sum()), train_size=len(self.poison_idx),
                     wall_time_s=time.perf_counter() - self.t0, device=str(self.device))
        if self.best is not None and final["BA"] is not None:
            self.log.info(f"Final: BA {final['BA']:.4f}  ASR {final['ASR']:.4f}  "
                          f"RA {final['RA']:.4f}")
        self.log.info(f"Checkpoints in {self.run.ckpt_dir}")
        self.run.finish(final)
        return final


def pretrain_config_path(ft: dict, where) -> Path:
    """The SimCLR config a fine-tuning config names (from the working directory or the
    repository)."""
    if "pretrain_config_path" not in ft:
        raise ConfigError(f"{where}: 'pretrain_config_path' is missing")
    path = Path(ft["pretrain_config_path"])
    if not path.is_file() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    return path


def finetune_config(args: StageArgs) -> tuple[dict, Path, RunFolders]:
    """The pretrain config shallow-updated with the finetune config (docs/original.md §1.5), then ``--set``,
    then the run folders ``args.folders`` gives (if any).

    Also returns the pretrain config's path and the run folders of the SimCLR run, which hold
    its checkpoint and poison index: ``args.pretrain_folders`` when given (dbd.py's sweeps),
    else this run's own (as in the original).
    """
    ft = load_yaml(args.config)
    pre_path = pretrain_config_path(ft, args.config)
    pre = load_yaml(pre_path)
    # the SimCLR run's lr schedule is not the fine-tuning's: that one comes from this file only
    pre_for_merge = {k: v for k, v in pre.items() if k != "lr_scheduler"}
    cfg = apply_overrides({**pre_for_merge, "lr_scheduler": None, **ft}, args.overrides)
    seed_settings(cfg, "--set")
    check_config(cfg)
    # the SimCLR run lies under this run's folders, as in the original's one pair of folders
    pre_run = apply_overrides(pre, [o for o in args.overrides if o.key in RUN_FOLDER_KEYS])
    if args.folders is not None:
        cfg, pre_run = args.folders.apply(cfg), args.folders.apply(pre_run)
    return cfg, pre_path, args.pretrain_folders or RunFolders.from_config(pre_run)


def last_test_metrics(result: dict) -> dict:
    """BA, ASR and RA of an epoch's result (None where it has no test)."""
    clean, poison = result.get("clean_test", {}), result.get("poison_test", {})
    return {"BA": clean.get("BA"), "ASR": poison.get("ASR"), "RA": poison.get("RA")}


def open_stage(args: StageArgs, log_name: str, cfg: dict, check, tests: bool = True,
               poison_from: Path | None = None) -> Stage:
    """Check the config (``check(cfg)``), load the data and the attack, and only then make the
    run folders and the logger, seed, and read or draw the poison index (``poison_from``: the
    index file of the run this stage builds on, copied into its own folder). ``tests``: the
    stage tests its model every epoch and keeps the best one."""
    check(cfg)
    data = load_poison_data(cfg)  # before any output: bad data writes nothing
    run = start_run(args, log_name, cfg)
    run.log.info("===Prepare data===")
    run.log.info(f"Backdoor: {data.bd}")
    if poison_from is None:
        idx = poison_index(cfg, data.train_targets, run.saved_dir, run.log.info,
                           reuse=not run.fresh, write=run.is_main)
    else:
        idx = load_poison_index(poison_from, len(data.train_targets))
        if run.is_main:
            np.save(run.poison_idx_path, idx)
        run.log.info(f"Poisoned {int(idx.sum())} of {len(idx)} training samples "
                     f"(from {poison_from})")
    return Stage(args, cfg, run, data, idx, (0.0, 0) if tests else None)


def epoch_test(model, clean_loader, poison_loader, normalize, speed, criterion=None,
               quiet: bool = False) -> dict:
    """The epoch's test: BA on the clean test set, ASR and RA on the triggered one (the
    result kinds ``clean_test`` and ``poison_test``)."""
    clean = evaluate(model, clean_loader, normalize, speed, criterion, quiet, "clean test")
    poison = evaluate(model, poison_loader, normalize, speed, criterion, quiet, "poison test")
    return {"clean_test": {"loss": clean["loss"], "BA": clean["acc"]},
            "poison_test": {"loss": poison["loss"], "ASR": poison["acc"], "RA": poison["RA"]}}
