"""No Defense: supervised training on the poisoned training set (docs/original.md §1.3).

    python supervise.py --config config/supervise/badnets/cifar10_resnet18/example.yaml --resume False
"""

from __future__ import annotations

import time

from data.build import (
    PoisonData,
    build_poison_train,
    build_test_sets,
    load_poison_data,
    loader_settings,
    make_eval_loader,
    make_loader,
    poison_index,
    transform_for,
)
from data.cifar import check_cifar_files, check_dataset_kind
from data.transforms import Normalizer
from loss import build_criterion
from model import build_linear_model
from utils.checkpoint import training_checkpoint
from utils.cli import base_parser, run_main
from utils.dist import unwrap
from utils.errors import ConfigError
from utils.loops import evaluate, train_supervised
from utils.metrics import format_row
from utils.optim import build_optimizer, build_scheduler
from utils.run import load_config, restore, start_run
from utils.setup import seed_from_config


def check(cfg: dict) -> None:
    """The config alone; the data and trigger are checked as they load."""
    check_dataset_kind(cfg)
    check_cifar_files(cfg["dataset_dir"])
    loader_settings(cfg.get("loader"), "loader")
    build_linear_model(cfg)
    for part in ("train", "test"):
        transform_for(cfg, part)
    n = cfg.get("num_epochs")
    if not isinstance(n, int) or n <= 0:
        raise ConfigError(f"num_epochs must be a positive integer, got {n!r}")


def main(argv=None):
    args = base_parser(__doc__.strip().splitlines()[0]).parse_args(argv)
    cfg = load_config(args)
    check(cfg)
    data: PoisonData = load_poison_data(cfg)  # before any output: bad data writes nothing
    run = start_run(args, "supervise.log", cfg)
    log, device, speed = run.log, run.device, run.speed

    log.info("===Prepare data===")
    bd = data.bd
    log.info(f"Backdoor: {bd}")
    images, targets = data.train_images, data.train_targets
    poison_idx = poison_index(cfg, targets, run.saved_dir, log.info, reuse=not run.fresh,
                              write=run.is_main)
    train_tf = transform_for(cfg, "train")
    log.info(f"Training transformations:\n{train_tf}")
    train_set = build_poison_train(cfg, poison_idx, images, targets, train_tf, bd)
    clean_test, poison_test = build_test_sets(cfg, bd, data.test_images, data.test_targets)
    log.info(f"Train {len(train_set)} images, clean test {len(clean_test)}, "
             f"poisoned test {len(poison_test)}")
    ls = loader_settings(cfg["loader"], "loader")
    path = speed.data_path
    train_loader = make_loader(train_set, ls, shuffle=True, device=device,
                               seed=seed_from_config(cfg), data_path=path)
    clean_loader = make_eval_loader(clean_test, ls, device=device, data_path=path)
    poison_loader = make_eval_loader(poison_test, ls, device=device, data_path=path)
    log.info(f"Data path: {train_loader.path}")
    normalize = Normalizer(train_tf.mean, train_tf.std, device)
    test_normalize = Normalizer(clean_test.transform.mean, clean_test.transform.std, device)

    log.info("===Setup training===")
    model = speed.prepare(build_linear_model(cfg))
    log.info(f"Network: {cfg['network']} ({sum(p.numel() for p in model.parameters()):,} "
             "parameters)")
    model = run.wrap(model, bool(cfg.get("sync_bn")))  # sync_bn honoured (docs/differences.md #9)
    criterion = build_criterion(cfg["criterion"])
    optimizer = build_optimizer(cfg["optimizer"], model.parameters(),
                                options=speed.optimizer_options())
    scheduler = build_scheduler(cfg.get("lr_scheduler"), optimizer)
    start_epoch, best_acc, best_epoch, result = restore(run, unwrap(model), optimizer, scheduler)

    num_epochs = cfg["num_epochs"]
    t0 = time.perf_counter()
    for epoch in range(start_epoch + 1, num_epochs + 1):
        e0 = time.perf_counter()
        train_loader.batch_sampler.set_epoch(epoch)
        train = train_supervised(model, train_loader, criterion, optimizer, normalize, speed,
                                 args.quiet, desc=f"epoch {epoch}/{num_epochs}")
        clean = evaluate(model, clean_loader, test_normalize, speed, quiet=args.quiet,
                         desc="clean test")
        poison = evaluate(model, poison_loader, test_normalize, speed, quiet=args.quiet,
                          desc="poison test")
        if scheduler is not None:
            scheduler.step()
        result = {"poison_train": train, "clean_test": {"loss": clean["loss"], "acc": clean["acc"]},
                  "poison_test": {"loss": poison["loss"], "acc": poison["acc"],
                                  "robust acc": poison["origin acc"]}}
        run.record(epoch, result)
        is_best = clean["acc"] > best_acc
        if is_best:  # updated before saving (docs/differences.md #8)
            best_acc, best_epoch = clean["acc"], epoch
        log.info(f"epoch {epoch:3d}/{num_epochs}  loss {train['loss']:.4f}  "
                 f"train acc {train['acc']:.4f}  BA {clean['acc']:.4f}  ASR {poison['acc']:.4f}  "
                 f"RA {poison['origin acc']:.4f}  lr {optimizer.param_groups[0]['lr']:.4g}  "
                 f"{train['images_per_s']:.0f} img/s  {time.perf_counter() - e0:.0f}s")
        state = training_checkpoint(epoch, result, model, optimizer, scheduler,
                                    best=(best_acc, best_epoch),
                                    poison_idx_path=run.poison_idx_path)
        run.save(state, *(["best_model.pt"] if is_best else []), "latest_model.pt")
    final = {"epoch": num_epochs, "BA": result.get("clean_test", {}).get("acc"),
             "ASR": result.get("poison_test", {}).get("acc"),
             "RA": result.get("poison_test", {}).get("robust acc"),
             "best_acc": best_acc, "best_epoch": best_epoch,
             "poisoned": int(poison_idx.sum()), "train_size": len(poison_idx),
             "wall_time_s": time.perf_counter() - t0, "device": str(device)}
    log.info("Final: " + format_row({k: final[k] for k in ("BA", "ASR", "RA")}))
    log.info(f"Checkpoints in {run.ckpt_dir}")
    run.finish(final)


if __name__ == "__main__":
    run_main(main)
