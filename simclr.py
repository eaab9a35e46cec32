"""DBD stage 1: SimCLR self-supervised training on the poisoned images, labels unused
(docs/original.md §1.4, §2.8, §4.1).

    python simclr.py --config config/defense/simclr/badnets/cifar10_resnet18/example.yaml --resume False
"""

from __future__ import annotations

import time

import torch

from data.build import (
    PoisonData,
    build_poison_train,
    load_poison_data,
    loader_settings,
    make_loader,
    poison_index,
    transform_for,
)
from data.cifar import check_cifar_files, check_dataset_kind
from data.dataset import SelfPoisonDataset
from data.transforms import Normalizer
from loss import build_criterion
from model import SelfModel, build_backbone
from utils import dist
from utils.checkpoint import training_checkpoint
from utils.cli import base_parser, run_main
from utils.dist import unwrap
from utils.errors import ConfigError
from utils.loops import progress
from utils.metrics import Meter
from utils.optim import build_optimizer, build_scheduler
from utils.run import load_config, restore, start_run
from utils.setup import seed_from_config


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


def settings(cfg: dict) -> dict:
    s = {"num_stage_epochs": 100, "min_interval": 20, "max_interval": 100}
    extra = cfg.get("simclr") or {}
    for k, v in extra.items():
        if k not in s:
            raise ConfigError(f"simclr: unknown key '{k}' (known: {', '.join(s)})")
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"simclr.{k} must be a positive integer, got {v!r}")
        s[k] = v
    return s


def check(cfg: dict) -> None:
    """The config alone; the data and trigger are checked as they load."""
    check_dataset_kind(cfg)
    check_cifar_files(cfg["dataset_dir"])
    loader_settings(cfg.get("loader"), "loader")
    build_backbone(cfg.get("network"))
    transform_for(cfg, "aug")
    build_criterion(cfg["criterion"])
    settings(cfg)
    n = cfg.get("num_epochs")
    if not isinstance(n, int) or n <= 0:
        raise ConfigError(f"num_epochs must be a positive integer, got {n!r}")


def train_epoch(model, loader, criterion, optimizer, normalize, speed, quiet, desc) -> dict:
    model.train()
    meter = Meter()
    seen, start = 0, time.perf_counter()
    for batch in progress(loader, desc, quiet):
        # views interleaved per image, [x1_0, x2_0, x1_1, ...]: one BN batch of 2b (§4.1)
        x = torch.stack([batch["img1"], batch["img2"]], dim=1).flatten(0, 1)
        x = normalize(x, speed.memory_format)
        b = len(batch["img1"])
        with speed.autocast():
            z = model(x)
        # the loss over the global batch, gathered in rank order, with the gradient of one
        # process seeing it all (docs/differences.md #11)
        z = dist.gather_with_grad(z.float())
        loss = criterion(z.view(-1, 2, z.shape[-1]))
        optimizer.zero_grad(set_to_none=True)
        speed.backward_step(loss, optimizer)
        meter.add("loss", loss.detach() * b, b)  # identical on every process
        seen += 2 * b
    out = meter.result()
    out["images_per_s"] = seen / (time.perf_counter() - start)
    return out


def main(argv=None):
    args = base_parser(__doc__.strip().splitlines()[0]).parse_args(argv)
    cfg = load_config(args)
    check(cfg)
    data: PoisonData = load_poison_data(cfg)  # before any output: bad data writes nothing
    run = start_run(args, "simclr.log", cfg)
    log, device, speed = run.log, run.device, run.speed

    log.info("===Prepare data===")
    bd = data.bd
    log.info(f"Backdoor: {bd}")
    images, targets = data.train_images, data.train_targets
    poison_idx = poison_index(cfg, targets, run.saved_dir, log.info, reuse=not run.fresh,
                              write=run.is_main)
    aug = transform_for(cfg, "aug")
    log.info(f"Augmented transformations:\n{aug}")
    base = build_poison_train(cfg, poison_idx, images, targets, aug, bd)
    dataset = SelfPoisonDataset(base, aug)
    ls = loader_settings(cfg["loader"], "loader")
    loader = make_loader(dataset, ls, shuffle=True, device=device, seed=seed_from_config(cfg),
                         data_path=speed.data_path)
    log.info(f"Data path: {loader.path}")
    normalize = Normalizer(aug.mean, aug.std, device)

    log.info("===Setup training===")
    backbone = build_backbone(cfg["network"])
    model = speed.prepare(SelfModel(backbone, backbone.feature_dim, 128))
    model = run.wrap(model, bool(cfg.get("sync_bn")))
    criterion = build_criterion(cfg["criterion"])
    log.info(f"Criterion: {cfg['criterion']}")
    optimizer = build_optimizer(cfg["optimizer"], model.parameters(),
                                options=speed.optimizer_options())
    scheduler = build_scheduler(cfg.get("lr_scheduler"), optimizer)
    start_epoch, _, _, resumed = restore(run, unwrap(model), optimizer, scheduler)
    num_epochs = cfg["num_epochs"]
    s = settings(cfg)
    keep = saved_epochs(num_epochs, s["num_stage_epochs"], s["min_interval"], s["max_interval"])
    log.info(f"Set saved epoch to {sorted(keep)}")

    t0 = time.perf_counter()
    train = resumed.get("self_train", {})  # what a run resumed after its last epoch reports
    for epoch in range(start_epoch + 1, num_epochs + 1):
        e0 = time.perf_counter()
        loader.batch_sampler.set_epoch(epoch)
        train = train_epoch(model, loader, criterion, optimizer, normalize, speed, args.quiet,
                            f"epoch {epoch}/{num_epochs}")
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        run.record(epoch, {"self_train": {"loss": train["loss"], "lr": lr}})
        log.info(f"epoch {epoch:4d}/{num_epochs}  loss {train['loss']:.4f}  lr {lr:.5g}  "
                 f"{train['images_per_s']:.0f} img/s  {time.perf_counter() - e0:.0f}s")
        state = training_checkpoint(epoch, {"self_train": {"loss": train["loss"]}}, model,
                                    optimizer, scheduler, poison_idx_path=run.poison_idx_path)
        # epoch{e}.pt before latest_model.pt: a kill between the two writes must not lose the kept
        # epoch, since the resumed run starts after it
        run.save(state, *([f"epoch{epoch}.pt"] if epoch in keep else []), "latest_model.pt")
        if epoch in keep:
            log.info(f"Save the model in saved epoch to {run.ckpt_dir / f'epoch{epoch}.pt'}")
    log.info(f"Checkpoints in {run.ckpt_dir}")
    run.finish({"epoch": num_epochs, "loss": train.get("loss"), "poisoned": int(poison_idx.sum()),
                "train_size": len(poison_idx), "wall_time_s": time.perf_counter() - t0,
                "device": str(device)})


if __name__ == "__main__":
    run_main(main)
