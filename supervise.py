"""No Defense: supervised training on the poisoned training set (docs/original.md §1.3).

    python supervise.py --config config/supervise/badnets/cifar10_resnet18/example.yaml --resume False
"""

from __future__ import annotations

import time

from data.build import (
    build_poison_train,
    build_test_sets,
    check_dataset,
    loader_settings,
    make_eval_loader,
    make_loader,
    transform_for,
)
from data.transforms import Normalizer
from loss import build_criterion
from model import build_linear_model
from pipeline.stage import epoch_test, open_stage
from utils.cli import StageArgs, base_parser, run_main, stage_args
from utils.config import seed_settings
from utils.loops import train_supervised
from utils.optim import build_optimizer, build_scheduler
from utils.run import load_config
from utils.schema import require


def check(cfg: dict) -> None:
    """The config alone; the data and trigger are checked as they load."""
    check_dataset(cfg)
    loader_settings(cfg.get("loader"), "loader")
    build_linear_model(cfg)
    for part in ("train", "test"):
        transform_for(cfg, part)
    require(cfg, "num_epochs")


def train(args: StageArgs) -> dict:
    """The stage; returns what it writes to ``final_metrics.json``."""
    cfg = load_config(args)
    stage = open_stage(args, "supervise.log", cfg, check)
    log, device, speed, data = stage.log, stage.device, stage.speed, stage.data

    train_tf = transform_for(cfg, "train")
    log.info(f"Training transformations:\n{train_tf}")
    train_set = build_poison_train(cfg, stage.poison_idx, data.train_images, data.train_targets,
                                   train_tf, data.bd)
    clean_test, poison_test = build_test_sets(cfg, data.bd, data.test_images, data.test_targets)
    log.info(f"Train {len(train_set)} images, clean test {len(clean_test)}, "
             f"poisoned test {len(poison_test)}")
    ls = loader_settings(cfg["loader"], "loader")
    path = speed.data_path
    train_loader = make_loader(train_set, ls, shuffle=True, device=device,
                               seed=seed_settings(cfg).seed, data_path=path)
    clean_loader = make_eval_loader(clean_test, ls, device=device, data_path=path)
    poison_loader = make_eval_loader(poison_test, ls, device=device, data_path=path)
    log.info(f"Data path: {train_loader.path}")
    normalize = Normalizer(train_tf.mean, train_tf.std, device)
    test_normalize = Normalizer(clean_test.transform.mean, clean_test.transform.std, device)

    log.info("===Setup training===")
    model = speed.prepare(build_linear_model(cfg))
    log.info(f"Network: {cfg['network']} ({sum(p.numel() for p in model.parameters()):,} "
             "parameters)")
    model = stage.run.wrap(model, bool(cfg.get("sync_bn")))  # docs/differences.md #9
    criterion = build_criterion(cfg["criterion"])
    optimizer = build_optimizer(cfg["optimizer"], model.parameters(),
                                options=speed.optimizer_options())
    scheduler = build_scheduler(cfg.get("lr_scheduler"), optimizer)
    start_epoch, result = stage.restore(model, optimizer, scheduler)

    num_epochs = cfg["num_epochs"]
    for epoch in range(start_epoch + 1, num_epochs + 1):
        e0 = time.perf_counter()
        train_loader.batch_sampler.set_epoch(epoch)
        train = train_supervised(model, train_loader, criterion, optimizer, normalize, speed,
                                 args.quiet, desc=f"epoch {epoch}/{num_epochs}")
        result = {"poison_train": train, **epoch_test(model, clean_loader, poison_loader,
                                                     test_normalize, speed, quiet=args.quiet)}
        if scheduler is not None:
            scheduler.step()
        clean, poison = result["clean_test"], result["poison_test"]
        stage.end_epoch(epoch, result, model, optimizer, scheduler,
                        f"epoch {epoch:3d}/{num_epochs}  loss {train['loss']:.4f}  "
                        f"train acc {train['acc']:.4f}  BA {clean['BA']:.4f}  "
                        f"ASR {poison['ASR']:.4f}  RA {poison['RA']:.4f}  "
                        f"lr {optimizer.param_groups[0]['lr']:.4g}  "
                        f"{train['images_per_s']:.0f} img/s  {time.perf_counter() - e0:.0f}s")
    return stage.finish(num_epochs, result)


def main(argv=None):
    train(stage_args(base_parser(__doc__.strip().splitlines()[0]), argv))


if __name__ == "__main__":
    run_main(main)
