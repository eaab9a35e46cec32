"""DBD stages 2 and 3: warm-up of a linear head on the SimCLR backbone with SCE, then every epoch
a loss-based split into labelled/unlabelled halves and MixMatch fine-tuning of the whole network
(reference §1.5, §5).

    python mixmatch_finetune.py --config config/defense/mixmatch_finetune/badnets/cifar10_resnet18/example.yaml --resume False
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from data.build import (
    REPO_ROOT,
    PoisonData,
    build_poison_train,
    build_test_sets,
    load_poison_data,
    load_poison_index,
    loader_settings,
    make_eval_loader,
    make_loader,
    transform_for,
)
from data.cifar import check_cifar_files, check_dataset_kind
from data.dataset import MixMatchDataset
from data.transforms import Normalizer
from loss import build_criterion
from model import LinearModel, SelfModel, build_backbone
from utils import dist
from utils.checkpoint import (
    load_checkpoint,
    load_model_state,
    rng_state,
)
from utils.cli import base_parser, run_main
from utils.config import apply_overrides, check_seed, config_location, load_yaml
from utils.dist import unwrap
from utils.errors import ConfigError
from utils.loops import accumulate_train_meters, evaluate, progress
from utils.metrics import Meter, format_row, read_csv
from utils.optim import build_optimizer, build_scheduler
from utils.run import restore, start_run
from utils.semi import mixmatch_step, split_by_loss, split_quality
from utils.setup import run_dirs, seed_from_config

SEMI_KEYS = {"epsilon", "loader", "criterion", "mixmatch", "num_epochs", "per_class"}
WARMUP_KEYS = {"loader", "criterion", "num_epochs", "freeze_bn"}


def merged_config(args) -> tuple[dict, Path, dict]:
    """The pretrain config shallow-updated with the finetune config (§1.5), then ``--set``.

    Also returns the pretrain config itself (with any ``--set saved_dir/storage_dir``), whose
    run folders hold the SimCLR checkpoint and poison index, as in the original.
    """
    ft = load_yaml(args.config)
    if "pretrain_config_path" not in ft:
        raise ConfigError(f"{args.config}: 'pretrain_config_path' is missing")
    pre_path = Path(ft["pretrain_config_path"])
    if not pre_path.is_file() and (REPO_ROOT / pre_path).is_file():
        pre_path = REPO_ROOT / pre_path
    pre = load_yaml(pre_path)
    # the SimCLR run's lr schedule is not the fine-tuning's: that one comes from this file only
    pre_for_merge = {k: v for k, v in pre.items() if k != "lr_scheduler"}
    cfg = apply_overrides({**pre_for_merge, "lr_scheduler": None, **ft}, args.overrides)
    check_seed(cfg.get("seed"), "--set")
    folders = [o for o in args.overrides if o.split("=", 1)[0].strip() in ("saved_dir",
                                                                           "storage_dir")]
    return cfg, pre_path, apply_overrides(pre, folders)


def check(cfg: dict) -> PoisonData:
    check_dataset_kind(cfg)
    check_cifar_files(cfg["dataset_dir"])
    build_backbone(cfg.get("network"))
    for part in ("train", "test"):
        transform_for(cfg, part)
    w, s = cfg.get("warmup") or {}, cfg.get("semi") or {}
    for name, sec, keys in (("warmup", w, WARMUP_KEYS), ("semi", s, SEMI_KEYS)):
        unknown = set(sec) - keys
        if unknown:
            raise ConfigError(f"{name}: unknown key '{sorted(unknown)[0]}'")
        loader_settings(sec.get("loader"), f"{name}.loader")
        build_criterion(sec.get("criterion"), f"{name}.criterion")
        n = sec.get("num_epochs")
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"{name}.num_epochs must be a non-negative integer, got {n!r}")
    eps = s.get("epsilon")
    if not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ConfigError(f"semi.epsilon must be in (0, 1), got {eps!r}")
    mm = s.get("mixmatch") or {}
    unknown = set(mm) - {"train_iteration", "temperature", "alpha", "num_classes"}
    if unknown:
        raise ConfigError(f"semi.mixmatch: unknown key '{sorted(unknown)[0]}'")
    it = mm.get("train_iteration")
    if not isinstance(it, int) or it <= 0:
        raise ConfigError(f"semi.mixmatch.train_iteration must be a positive integer, got {it!r}")
    return load_poison_data(cfg)


def warmup_epoch(model, loader, criterion, optimizer, normalize, speed, freeze_bn, quiet, desc):
    """Only the linear layer learns: backbone forward without gradients, in train mode so its
    BN statistics move as in the original (§5.1), unless ``freeze_bn``."""
    model.train()
    net = unwrap(model)  # backbone and head are called apart, so the head's gradients are
    if freeze_bn:        # averaged over processes by hand
        net.backbone.eval()
    meter = Meter()
    for batch in progress(loader, desc, quiet):
        x = normalize(batch["img"], speed.memory_format)
        y = batch["target"].to(normalize.device)
        poison = batch["poison"].to(normalize.device).bool()
        with speed.autocast():
            with torch.no_grad():
                feats = net.backbone(x)
            logits = net.linear(feats.float())
        criterion.reduction = "none"
        losses = criterion(logits.float(), y)
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        speed.backward_step(loss, optimizer,
                            lambda: dist.average_gradients(net.linear.parameters()))
        accumulate_train_meters(meter, losses.detach(), logits.detach().argmax(1) == y, poison)
    return meter.result()


@torch.no_grad()
def record_losses(model, loader, criterion, normalize, speed, quiet) -> np.ndarray:
    """Per-sample SCE loss over the training set in dataset order, eval mode, on train-time
    augmented images (§5.2). Each process scores its part; every process gets all losses."""
    model.eval()
    criterion.reduction = "none"
    out = []
    for batch in progress(loader, "split", quiet):
        x = normalize(batch["img"], speed.memory_format)
        y = batch["target"].to(normalize.device)
        with speed.autocast():
            logits = model(x)
        out.append(criterion(logits.float(), y))
    mine = torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.float32)
    return np.concatenate(dist.all_gather_objects(mine))


def _cycle(loader):
    """Restart the loader when it runs out, and only then (DECISIONS #17)."""
    while True:
        yield from loader


def mixmatch_epoch(model, labeled_loader, unlabeled_loader, criterion, optimizer, normalize,
                   speed, mm: dict, epoch_index: int, num_classes: int, quiet, desc) -> dict:
    model.train()
    meter = Meter()
    n_iter = mm["train_iteration"]
    lab, unl = _cycle(labeled_loader), _cycle(unlabeled_loader)
    for i in progress(range(n_iter), desc, quiet):
        lb, ub = next(lab), next(unl)
        x = normalize(lb["img"], speed.memory_format)
        y = lb["target"].to(normalize.device)
        u1 = normalize(ub["img1"], speed.memory_format)
        u2 = normalize(ub["img2"], speed.memory_format)
        t = epoch_index + i / n_iter  # DECISIONS #5
        loss, lx, lu, lam = mixmatch_step(model, x, y, u1, u2, criterion, t, num_classes,
                                          mm["temperature"], mm["alpha"], speed)
        optimizer.zero_grad(set_to_none=True)
        speed.backward_step(loss, optimizer)
        meter.add("loss", loss.detach(), 1)
        meter.add("xloss", lx.detach(), 1)
        meter.add("uloss", lu.detach(), 1)
        meter.add("lambda_u", lam, 1)
    return meter.result()


def main(argv=None):
    args = base_parser(__doc__.strip().splitlines()[0]).parse_args(argv)
    cfg, pre_path, pre_cfg = merged_config(args)
    pre_saved, pre_ckpt_dir = run_dirs(pre_cfg, *config_location(pre_path))
    if not cfg.get("pretrain_checkpoint"):
        raise ConfigError("pretrain_checkpoint is missing (e.g. epoch100.pt)")
    pre_ckpt = pre_ckpt_dir / str(cfg["pretrain_checkpoint"])
    pretrained = load_checkpoint(pre_ckpt)  # before any output: a bad checkpoint writes nothing
    run = start_run(args, "mixmatch_finetune.log", cfg, check=check)
    log, device, speed = run.log, run.device, run.speed
    log.info(f"Pretrain config {pre_path}: run folder {pre_saved}, checkpoints {pre_ckpt_dir}")

    log.info("===Prepare data===")
    data = run.data
    bd = data.bd
    images, targets = data.train_images, data.train_targets
    # the poison index is the one the SimCLR stage drew and used (§1.5)
    poison_idx = load_poison_index(pre_saved / "poison_idx.npy", len(targets))
    if run.is_main:
        np.save(run.saved_dir / "poison_idx.npy", poison_idx)
    log.info(f"Poisoned {int(poison_idx.sum())} of {len(poison_idx)} training samples "
             f"(from {pre_saved / 'poison_idx.npy'})")
    train_tf = transform_for(cfg, "train")
    log.info(f"Training transformations:\n{train_tf}")
    train_set = build_poison_train(cfg, poison_idx, images, targets, train_tf, bd)
    clean_test, poison_test = build_test_sets(cfg, bd, data.test_images, data.test_targets)
    w, s = cfg["warmup"], cfg["semi"]
    wl = loader_settings(w["loader"], "warmup.loader")
    sl = loader_settings(s["loader"], "semi.loader")
    seed = seed_from_config(cfg)
    path = speed.data_path
    train_loader = make_loader(train_set, wl, shuffle=True, device=device, seed=seed,
                               data_path=path)
    # the split scores augmented images (§5.2), so its loader draws augmentations too
    eval_loader = make_eval_loader(train_set, wl, device=device, data_path=path, seed=seed)
    clean_loader = make_eval_loader(clean_test, wl, device=device, data_path=path)
    poison_loader = make_eval_loader(poison_test, wl, device=device, data_path=path)
    log.info(f"Data path: {train_loader.path}")
    normalize = Normalizer(train_tf.mean, train_tf.std, device)
    test_norm = Normalizer(clean_test.transform.mean, clean_test.transform.std, device)
    n_labeled = int(len(train_set) * s["epsilon"])
    if min(n_labeled, len(train_set) - n_labeled) < sl["batch_size"]:
        raise ConfigError(f"semi.loader.batch_size {sl['batch_size']} is larger than the "
                          f"labelled or unlabelled set ({n_labeled} / "
                          f"{len(train_set) - n_labeled} samples)")

    log.info("===Setup training===")
    backbone = build_backbone(cfg["network"])
    num_classes = int(cfg.get("num_classes", 10))
    self_model = SelfModel(backbone, backbone.feature_dim, 128)
    load_model_state(self_model, pretrained["model_state_dict"], pre_ckpt)
    log.info(f"Loaded the pretrained backbone from {pre_ckpt} "
             f"(epoch {pretrained.get('epoch')})")
    model = speed.prepare(LinearModel(backbone, backbone.feature_dim, num_classes))
    model = run.wrap(model, bool(cfg.get("sync_bn")))
    warm_crit = build_criterion(w["criterion"], "warmup.criterion")
    semi_crit = build_criterion(s["criterion"], "semi.criterion")
    # one Adam for both phases, over backbone and head (§1.5)
    optimizer = build_optimizer(cfg["optimizer"], model.parameters(),
                                options=speed.optimizer_options())
    # none in the original (null in its configs); optional here, stepped after every epoch of
    # the stage (warm-up epochs included), e.g. an lr drop before the last epoch of a short run
    scheduler = build_scheduler(cfg.get("lr_scheduler"), optimizer)

    start_epoch, best_acc, best_epoch, result = restore(run, unwrap(model), optimizer, scheduler)

    mm = dict(s["mixmatch"])
    n_warm, n_semi = w["num_epochs"], s["num_epochs"]
    num_epochs = n_warm + n_semi
    t0 = time.perf_counter()
    for epoch in range(start_epoch + 1, num_epochs + 1):
        e0 = time.perf_counter()
        desc = f"epoch {epoch}/{num_epochs}"
        split = None
        if epoch <= n_warm:
            train_loader.batch_sampler.set_epoch(epoch)
            train = warmup_epoch(model, train_loader, warm_crit, optimizer, normalize, speed,
                                 bool(w.get("freeze_bn", False)), args.quiet, desc + " warm-up")
            phase = "warm-up"
        else:
            if eval_loader.path == "fast":  # its augmentations depend on the epoch alone
                eval_loader.batch_sampler.set_epoch(epoch)
            losses = record_losses(model, eval_loader, warm_crit, normalize, speed, args.quiet)
            semi_idx = split_by_loss(losses, s["epsilon"], train_set.targets,
                                     bool(s.get("per_class", False)))
            split = split_quality(semi_idx, poison_idx)
            # per-sample losses of the first split (the warm-up model's) and the latest one,
            # for the report's histogram
            for tag in ("first", "last") if epoch == n_warm + 1 else ("last",):
                if not run.is_main:
                    break
                np.savez_compressed(run.saved_dir / f"split_losses_{tag}.npz", epoch=epoch,
                                    losses=losses, poison=poison_idx, semi_idx=semi_idx,
                                    epsilon=s["epsilon"], origin=train_set.origin)
            log.info(f"{split['poisoned_labeled']}/{split['labeled']} poisoned samples in the "
                     f"labelled set ({split['poisoned_total']} poisoned in all)")
            labeled = make_loader(MixMatchDataset(train_set, semi_idx, True), sl, shuffle=True,
                                  drop_last=True, device=device, seed=seed, data_path=path,
                                  stream=1)
            unlabeled = make_loader(MixMatchDataset(train_set, semi_idx, False), sl,
                                    shuffle=True, drop_last=True, device=device, seed=seed + 1,
                                    data_path=path, stream=2)
            labeled.batch_sampler.set_epoch(epoch)
            unlabeled.batch_sampler.set_epoch(epoch)
            train = mixmatch_epoch(model, labeled, unlabeled, semi_crit, optimizer, normalize,
                                   speed, mm, epoch - 1, num_classes, args.quiet,
                                   desc + " MixMatch")
            phase = "MixMatch"
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        clean = evaluate(model, clean_loader, test_norm, speed, warm_crit, args.quiet, "clean")
        poison = evaluate(model, poison_loader, test_norm, speed, warm_crit, args.quiet, "poison")
        result = {"poison_train": train,
                  "clean_test": {"loss": clean["loss"], "acc": clean["acc"]},
                  "poison_test": {"loss": poison["loss"], "acc": poison["acc"],
                                  "robust acc": poison["origin acc"]}}
        if split is not None:
            result["split"] = split
        run.record(epoch, result)
        if clean["acc"] > best_acc:
            best_acc, best_epoch, is_best = clean["acc"], epoch, True
        else:
            is_best = False
        log.info(f"epoch {epoch:3d}/{num_epochs} {phase:8s} {format_row(train)}  "
                 f"BA {clean['acc']:.4f}  ASR {poison['acc']:.4f}  RA {poison['origin acc']:.4f}"
                 f"  lr {lr:.5g}  {time.perf_counter() - e0:.0f}s")
        state = {"epoch": epoch, "result": result,
                 "model_state_dict": unwrap(model).state_dict(),
                 "optimizer_state_dict": optimizer.state_dict(),
                 "scheduler_state_dict": scheduler.state_dict() if scheduler else None,
                 "best_acc": best_acc,
                 "best_epoch": best_epoch, "rng_state": rng_state()}
        run.save(state, *(["best_model.pt"] if is_best else []), "latest_model.pt")
    final = {"epoch": num_epochs, "BA": result.get("clean_test", {}).get("acc"),
             "ASR": result.get("poison_test", {}).get("acc"),
             "RA": result.get("poison_test", {}).get("robust acc"),
             "best_acc": best_acc, "best_epoch": best_epoch,
             "last_split": result.get("split"),
             "splits": read_csv(run.saved_dir / "log" / "split.csv"),
             "poisoned": int(poison_idx.sum()), "train_size": len(poison_idx),
             "wall_time_s": time.perf_counter() - t0, "device": str(device)}
    log.info(f"Final: BA {final['BA']:.4f}  ASR {final['ASR']:.4f}  RA {final['RA']:.4f}")
    log.info(f"Checkpoints in {run.ckpt_dir}")
    run.finish(final)


if __name__ == "__main__":
    run_main(main)
