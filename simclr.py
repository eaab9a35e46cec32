"""DBD stage 1: SimCLR self-supervised training on the poisoned images, labels unused
(docs/original.md §1.4, §2.8, §4.1).

    python simclr.py --config config/defense/simclr/badnets/cifar10_resnet18/example.yaml --resume False
"""

from __future__ import annotations

import time

from data.build import (
    build_poison_train,
    check_dataset,
    loader_settings,
    make_loader,
    transform_for,
)
from data.dataset import SelfPoisonDataset
from data.transforms import Normalizer
from loss import build_criterion
from model import SelfModel, build_backbone
from pipeline.stage import open_stage
from utils.cli import StageArgs, base_parser, run_main, stage_args
from utils.config import seed_settings
from utils.loops import simclr_epoch
from utils.optim import build_optimizer, build_scheduler
from utils.run import load_config
from utils.schema import SimCLRSchedule, require, section


def saved_epochs(num_epochs: int, stage: int = 100, min_interval: int = 20,
                 max_interval: int = 100) -> set[int]:
    """Epochs whose checkpoint is kept as ``epoch{e}.pt`` (docs/original.md §1.4): every
    ``min_interval`` epochs in the first and last ``stage`` epochs, every ``max_interval`` in
    between. With fewer epochs than ``stage``, ``stage`` shrinks to the run's length."""
    stage = min(stage, num_epochs)
    epochs = set(range(min_interval, stage, min_interval))
    epochs |= set(range(stage, num_epochs - stage, max_interval))
    epochs |= set(range(num_epochs - stage, num_epochs + min_interval, min_interval))
    epochs.discard(0)
    return {e for e in epochs if e <= num_epochs} | {stage}


def check(cfg: dict) -> None:
    """The config alone; the data and trigger are checked as they load."""
    check_dataset(cfg)
    loader_settings(cfg.get("loader"), "loader")
    build_backbone(cfg.get("network"))
    transform_for(cfg, "aug")
    build_criterion(cfg["criterion"])
    require(cfg, "num_epochs")


def train(args: StageArgs) -> dict:
    """The stage; returns what it writes to ``final_metrics.json``."""
    cfg = load_config(args)
    stage = open_stage(args, "simclr.log", cfg, check, tests=False)
    log, device, speed, data = stage.log, stage.device, stage.speed, stage.data

    aug = transform_for(cfg, "aug")
    log.info(f"Augmented transformations:\n{aug}")
    base = build_poison_train(cfg, stage.poison_idx, data.train_images, data.train_targets, aug,
                              data.bd)
    dataset = SelfPoisonDataset(base, aug)
    loader = make_loader(dataset, loader_settings(cfg["loader"], "loader"), shuffle=True,
                         device=device, seed=seed_settings(cfg).seed, data_path=speed.data_path)
    log.info(f"Data path: {loader.path}")
    normalize = Normalizer(aug.mean, aug.std, device)

    log.info("===Setup training===")
    backbone = build_backbone(cfg["network"])
    model = speed.prepare(SelfModel(backbone, backbone.feature_dim, 128))
    model = stage.run.wrap(model, bool(cfg.get("sync_bn")))
    criterion = build_criterion(cfg["criterion"])
    log.info(f"Criterion: {cfg['criterion']}")
    optimizer = build_optimizer(cfg["optimizer"], model.parameters(),
                                options=speed.optimizer_options())
    scheduler = build_scheduler(cfg.get("lr_scheduler"), optimizer)
    start_epoch, resumed = stage.restore(model, optimizer, scheduler)
    num_epochs = cfg["num_epochs"]
    s = section(cfg, SimCLRSchedule, "simclr")
    keep = saved_epochs(num_epochs, s.num_stage_epochs, s.min_interval, s.max_interval)
    log.info(f"Set saved epoch to {sorted(keep)}")

    train = resumed.get("self_train", {})  # what a run resumed after its last epoch reports
    for epoch in range(start_epoch + 1, num_epochs + 1):
        e0 = time.perf_counter()
        loader.batch_sampler.set_epoch(epoch)
        train = simclr_epoch(model, loader, criterion, optimizer, normalize, speed, args.quiet,
                            f"epoch {epoch}/{num_epochs}")
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        kept = (f"epoch{epoch}.pt",) if epoch in keep else ()
        stage.end_epoch(epoch, {"self_train": {"loss": train["loss"], "lr": lr}}, model,
                        optimizer, scheduler,
                        f"epoch {epoch:4d}/{num_epochs}  loss {train['loss']:.4f}  lr {lr:.5g}  "
                        f"{train['images_per_s']:.0f} img/s  {time.perf_counter() - e0:.0f}s",
                        keep=kept, checkpoint_result={"self_train": {"loss": train["loss"]}})
        if kept:
            log.info(f"Save the model in saved epoch to {stage.run.ckpt_dir / kept[0]}")
    return stage.finish(num_epochs, {}, loss=train.get("loss"))


def main(argv=None):
    train(stage_args(base_parser(__doc__.strip().splitlines()[0]), argv))


if __name__ == "__main__":
    run_main(main)
