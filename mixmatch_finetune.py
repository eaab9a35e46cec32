"""DBD stages 2 and 3: warm-up of a linear head on the SimCLR backbone with SCE, then every epoch
a loss-based split into labelled/unlabelled halves and MixMatch fine-tuning of the whole network
(docs/original.md §1.5, §5). The file follows the algorithm: the config, the split (DBD's own
step), then the loop that runs the warm-up epochs (``utils.loops.warmup_epoch``) and, each
later epoch, a split and a MixMatch epoch (``loss.mixmatch``).

    python mixmatch_finetune.py --config config/defense/mixmatch_finetune/badnets/cifar10_resnet18/example.yaml --resume False
"""

from __future__ import annotations

import time

import numpy as np

from data.build import (
    build_poison_train,
    build_test_sets,
    check_dataset,
    make_eval_loader,
    make_loader,
    transform_for,
)
from data.dataset import MixMatchDataset
from data.fast import FastLoader
from data.transforms import Normalizer
from loss import build_criterion
from loss.mixmatch import mixmatch_epoch
from model import LinearModel, SelfModel, build_backbone
from pipeline.stage import epoch_test, finetune_config, open_stage
from tools.detection import SUSPECTS_FILE, write_suspects
from utils.checkpoint import load_checkpoint, load_model_state
from utils.cli import StageArgs, base_parser, run_main, stage_args
from utils.config import num_classes_of, seed_settings
from utils.errors import ConfigError
from utils.loops import record_losses, warmup_epoch
from utils.metrics import format_row, read_csv
from utils.optim import build_optimizer, build_scheduler
from utils.schema import Semi, Warmup, section
from utils.setup import config_location, run_dirs

# ---- Config: the SimCLR config merged with this stage's (``pipeline.stage.finetune_config``),
# checked before any output


def check(cfg: dict) -> None:
    """The config alone; the data and trigger are checked as they load."""
    check_dataset(cfg)
    build_backbone(cfg.get("network"))
    for part in ("train", "test"):
        transform_for(cfg, part)
    for key, cls in (("warmup", Warmup), ("semi", Semi)):
        section(cfg, cls, key)
        build_criterion(cfg[key]["criterion"], f"{key}.criterion")


# ---- Split (docs/original.md §5.2): the lowest-loss fraction is the labelled set --------


def split_by_loss(losses: np.ndarray, epsilon: float, targets: np.ndarray | None = None,
                  per_class: bool = False, class_floor: float = 0.0) -> np.ndarray:
    """semi_idx: 1 for the ``int(N·epsilon)`` lowest-loss samples (labelled), 0 for the rest.

    Global by default, as the original (docs/original.md §5.2, docs/differences.md #6).
    ``per_class`` keeps the lowest-loss ``int(n_c·epsilon)`` of each given label c instead.
    ``class_floor`` (φ in [0, 1]) keeps the same labelled count as the global split but first
    gives each given label its ``int(φ·N·epsilon/K)`` lowest-loss samples (all of them if it
    has fewer; K labels present), then fills the rest by the global ranking: 0 is the global
    split, 1 an equal share per label, which a label swollen by relabelled samples does not
    enlarge. Neither reads which samples are poisoned. Ties break by index (stable sort).
    """
    losses = np.asarray(losses)
    n_labelled = int(len(losses) * epsilon)
    semi_idx = np.zeros(len(losses), dtype=np.int64)
    if per_class and class_floor:
        raise ValueError("per_class and class_floor are two different splits")
    if per_class or class_floor:
        classes = np.unique(targets)
        for c in classes:
            members = np.flatnonzero(targets == c)
            keep = (int(len(members) * epsilon) if per_class
                    else min(len(members), int(class_floor * n_labelled / len(classes))))
            semi_idx[members[np.argsort(losses[members], kind="stable")[:keep]]] = 1
        if per_class:
            return semi_idx
    rest = np.flatnonzero(semi_idx == 0)
    rest = rest[np.argsort(losses[rest], kind="stable")]
    semi_idx[rest[: n_labelled - int(semi_idx.sum())]] = 1
    return semi_idx


def hold_out(losses: np.ndarray, held: np.ndarray) -> np.ndarray:
    """The losses with the ``held`` samples ranked last (``semi.oracle_split``, a diagnostic:
    ``held`` is the ground truth, so the split never labels a poisoned sample while it can
    label a clean one)."""
    return np.where(np.asarray(held) == 1, np.inf, np.asarray(losses, dtype=np.float64))


def split_quality(semi_idx: np.ndarray, poison_idx: np.ndarray) -> dict:
    """How well "unlabelled" works as a poison detector (counts as integers;
    docs/differences.md #15)."""
    labelled = np.asarray(semi_idx) == 1
    poison = np.asarray(poison_idx) == 1
    caught = int((poison & ~labelled).sum())
    unlabelled = int((~labelled).sum())
    total = int(poison.sum())
    return {"labelled": int(labelled.sum()), "unlabelled": unlabelled,
            "poisoned_labelled": int((poison & labelled).sum()), "poisoned_total": total,
            "precision": caught / unlabelled if unlabelled else float("nan"),
            "recall": caught / total if total else float("nan")}


# ---- Loop: warm-up epochs, then a split and a MixMatch epoch each epoch; tests, checkpoints


def train(args: StageArgs) -> dict:
    """The stage; returns what it writes to ``final_metrics.json``."""
    cfg, pre_path, pre_folders = finetune_config(args)
    pre_saved, pre_ckpt_dir = run_dirs(pre_folders.apply({}), *config_location(pre_path))
    if not cfg.get("pretrain_checkpoint"):
        raise ConfigError("pretrain_checkpoint is missing (e.g. epoch100.pt)")
    pre_ckpt = pre_ckpt_dir / str(cfg["pretrain_checkpoint"])
    pretrained = load_checkpoint(pre_ckpt)  # before any output: a bad checkpoint writes nothing
    # the poison index is the one the SimCLR stage drew and used (docs/original.md §1.5)
    stage = open_stage(args, "mixmatch_finetune.log", cfg, check,
                       poison_from=pre_saved / "poison_idx.npy")
    log, device, speed, data = stage.log, stage.device, stage.speed, stage.data
    poison_idx = stage.poison_idx
    log.info(f"Pretrain config {pre_path}: run folder {pre_saved}, checkpoints {pre_ckpt_dir}")

    train_tf = transform_for(cfg, "train")
    log.info(f"Training transformations:\n{train_tf}")
    train_set = build_poison_train(cfg, poison_idx, data.train_images, data.train_targets,
                                   train_tf, data.bd)
    clean_test, poison_test = build_test_sets(cfg, data.bd, data.test_images, data.test_targets)
    w, s = section(cfg, Warmup, "warmup"), section(cfg, Semi, "semi")
    seed = seed_settings(cfg).seed
    path = speed.data_path
    train_loader = make_loader(train_set, w.loader, shuffle=True, device=device, seed=seed,
                               data_path=path)
    # the split scores augmented images (§5.2), so its loader draws augmentations too
    eval_loader = make_eval_loader(train_set, w.loader, device=device, data_path=path, seed=seed)
    clean_loader = make_eval_loader(clean_test, w.loader, device=device, data_path=path)
    poison_loader = make_eval_loader(poison_test, w.loader, device=device, data_path=path)
    log.info(f"Data path: {train_loader.path}")
    normalize = Normalizer(train_tf.mean, train_tf.std, device)
    test_norm = Normalizer(clean_test.transform.mean, clean_test.transform.std, device)
    n_labelled = int(len(train_set) * s.epsilon)
    if min(n_labelled, len(train_set) - n_labelled) < s.loader.batch_size:
        raise ConfigError(f"semi.loader.batch_size {s.loader.batch_size} is larger than the "
                          f"labelled or unlabelled set ({n_labelled} / "
                          f"{len(train_set) - n_labelled} samples)")

    if s.oracle_split and not data.poison_known:
        raise ConfigError("semi.oracle_split needs to know which training samples are "
                          "poisoned, and this dataset does not say")
    log.info(f"Split: {s.split}")
    log.info("===Setup training===")
    backbone = build_backbone(cfg["network"])
    num_classes = num_classes_of(cfg)
    self_model = SelfModel(backbone, backbone.feature_dim, 128)
    load_model_state(self_model, pretrained["model_state_dict"], pre_ckpt)
    log.info(f"Loaded the pretrained backbone from {pre_ckpt} "
             f"(epoch {pretrained.get('epoch')})")
    model = speed.prepare(LinearModel(backbone, backbone.feature_dim, num_classes))
    model = stage.run.wrap(model, bool(cfg.get("sync_bn")))
    warm_crit = build_criterion(w.criterion, "warmup.criterion", num_classes)
    semi_crit = build_criterion(s.criterion, "semi.criterion")
    # one Adam for both phases, over backbone and head (§1.5)
    optimizer = build_optimizer(cfg["optimizer"], model.parameters(),
                                options=speed.optimizer_options())
    # none in the original (null in its configs); optional here, stepped after every epoch of
    # the stage (warm-up epochs included), e.g. an lr drop before the last epoch of a short run
    scheduler = build_scheduler(cfg.get("lr_scheduler"), optimizer)
    start_epoch, result = stage.restore(model, optimizer, scheduler)

    num_epochs = w.num_epochs + s.num_epochs
    for epoch in range(start_epoch + 1, num_epochs + 1):
        e0 = time.perf_counter()
        desc = f"epoch {epoch}/{num_epochs}"
        split = None
        if epoch <= w.num_epochs:
            train_loader.batch_sampler.set_epoch(epoch)
            train = warmup_epoch(model, train_loader, warm_crit, optimizer, normalize, speed,
                                 w.freeze_bn, args.quiet, desc + " warm-up")
            phase = "warm-up"
        else:
            if isinstance(eval_loader, FastLoader):  # its augmentations follow the epoch alone
                eval_loader.batch_sampler.set_epoch(epoch)
            losses = record_losses(model, eval_loader, warm_crit, normalize, speed, args.quiet)
            ranked = hold_out(losses, poison_idx) if s.oracle_split else losses
            semi_idx = split_by_loss(ranked, s.epsilon, train_set.targets, s.per_class,
                                     s.class_floor)
            if s.oracle_split:  # a class more poisoned than 1 - ε: fewer labelled, none poisoned
                semi_idx[poison_idx == 1] = 0
            split = split_quality(semi_idx, poison_idx)
            # per-sample losses of the first split (the warm-up model's) and the latest one,
            # for the report's histogram
            for tag in ("first", "last") if epoch == w.num_epochs + 1 else ("last",):
                if not stage.run.is_main:
                    break
                np.savez_compressed(stage.run.saved_dir / f"split_losses_{tag}.npz",
                                    epoch=epoch, losses=losses, poison=poison_idx,
                                    semi_idx=semi_idx, epsilon=s.epsilon,
                                    origin=train_set.origin, targets=train_set.targets,
                                    known=data.poison_known)
            log.info(f"{split['poisoned_labelled']}/{split['labelled']} poisoned samples in the "
                     f"labelled set ({split['poisoned_total']} poisoned in all)")
            labelled = make_loader(MixMatchDataset(train_set, semi_idx, True), s.loader,
                                   shuffle=True, drop_last=True, device=device, seed=seed,
                                   data_path=path, stream=1)
            unlabelled = make_loader(MixMatchDataset(train_set, semi_idx, False), s.loader,
                                     shuffle=True, drop_last=True, device=device, seed=seed + 1,
                                     data_path=path, stream=2)
            labelled.batch_sampler.set_epoch(epoch)
            unlabelled.batch_sampler.set_epoch(epoch)
            train = mixmatch_epoch(model, labelled, unlabelled, semi_crit, optimizer, normalize,
                                   speed, s.mixmatch, epoch - 1, num_classes, args.quiet,
                                   desc + " MixMatch")
            phase = "MixMatch"
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        result = {"poison_train": train, **epoch_test(model, clean_loader, poison_loader,
                                                     test_norm, speed, warm_crit, args.quiet)}
        if split is not None:
            result["split"] = split
        clean, poison = result["clean_test"], result["poison_test"]
        stage.end_epoch(epoch, result, model, optimizer, scheduler,
                        f"epoch {epoch:3d}/{num_epochs} {phase:8s} {format_row(train)}  "
                        f"BA {clean['BA']:.4f}  ASR {poison['ASR']:.4f}  RA {poison['RA']:.4f}"
                        f"  lr {lr:.5g}  {time.perf_counter() - e0:.0f}s")
    if stage.run.is_main:  # the split as a detector: every sample's score and decision
        write_suspects(stage.run.saved_dir, stage.run.saved_dir / SUSPECTS_FILE,
                       cfg["backdoor"]["target_label"])
    return stage.finish(num_epochs, result, split_rule=s.split, last_split=result.get("split"),
                        splits=read_csv(stage.run.saved_dir / "log" / "split.csv"))


def main(argv=None):
    parser = base_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--pretrain-dirs", nargs=2, metavar=("SAVED_DIR", "STORAGE_DIR"),
                        default=None,
                        help="saved_dir and storage_dir of the SimCLR run (default: this "
                             "run's, as in the original)")
    train(stage_args(parser, argv))


if __name__ == "__main__":
    run_main(main)
