"""DBD stages 2 and 3: warm-up of a linear head on the SimCLR backbone with SCE, then every epoch
a loss-based split into labelled/unlabelled halves and MixMatch fine-tuning of the whole network
(docs/original.md §1.5, §5). The file follows the algorithm: the config, the warm-up, the split, the
MixMatch step, then the loop that runs them.

    python mixmatch_finetune.py --config config/defense/mixmatch_finetune/badnets/cifar10_resnet18/example.yaml --resume False
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
from data.fast import FastLoader
from data.transforms import Normalizer
from loss import build_criterion
from model import LinearModel, SelfModel, build_backbone
from utils import dist
from utils.checkpoint import load_checkpoint, load_model_state, training_checkpoint
from utils.cli import base_parser, run_main
from utils.config import apply_overrides, check_seed, config_location, load_yaml, num_classes_of
from utils.dist import unwrap
from utils.errors import ConfigError
from utils.loops import accumulate_train_meters, evaluate, progress
from utils.metrics import Meter, format_row, read_csv
from utils.optim import build_optimizer, build_scheduler
from utils.run import restore, start_run
from utils.setup import run_dirs, seed_from_config

SEMI_KEYS = {"epsilon", "loader", "criterion", "mixmatch", "num_epochs", "per_class"}
WARMUP_KEYS = {"loader", "criterion", "num_epochs", "freeze_bn"}


# ---- Config: the pretrain config merged with this stage's, checked before any output -----


def merged_config(args) -> tuple[dict, Path, dict]:
    """The pretrain config shallow-updated with the finetune config (§1.5), then ``--set``.

    Also returns the pretrain config itself (with any ``--set saved_dir/storage_dir``, or the
    folders ``--pretrain-dirs`` names), whose run folders hold the SimCLR checkpoint and poison
    index, as in the original.
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
    pre_dirs = getattr(args, "pretrain_dirs", None)
    if pre_dirs:  # the SimCLR run lives under other folders than this run (dbd.py --sweep)
        folders = [f"saved_dir={pre_dirs[0]}", f"storage_dir={pre_dirs[1]}"]
    return cfg, pre_path, apply_overrides(pre, folders)


def check(cfg: dict) -> None:
    """The config alone; the data and trigger are checked as they load."""
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


# ---- Warm-up (docs/original.md §5.1): a linear head on the SimCLR backbone, SCE loss ----


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
        losses = criterion(logits.float(), y, reduction="none")
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        speed.backward_step(loss, optimizer,
                            lambda: dist.average_gradients(net.linear.parameters()))
        accumulate_train_meters(meter, losses.detach(), logits.detach().argmax(1) == y, poison)
    return meter.result()


# ---- Split (docs/original.md §5.2): the lowest-loss fraction is the labelled set --------


@torch.no_grad()
def record_losses(model, loader, criterion, normalize, speed, quiet) -> np.ndarray:
    """Per-sample SCE loss over the training set in dataset order, eval mode, on train-time
    augmented images (§5.2). Each process scores its part; every process gets all losses."""
    model.eval()
    out = []
    for batch in progress(loader, "split", quiet):
        x = normalize(batch["img"], speed.memory_format)
        y = batch["target"].to(normalize.device)
        with speed.autocast():
            logits = model(x)
        out.append(criterion(logits.float(), y, reduction="none"))
    mine = torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.float32)
    return np.concatenate(dist.all_gather_objects(mine))


def split_by_loss(losses: np.ndarray, epsilon: float, targets: np.ndarray | None = None,
                  per_class: bool = False) -> np.ndarray:
    """semi_idx: 1 for the ``int(N·epsilon)`` lowest-loss samples (labelled), 0 for the rest.

    Global by default, as the original (docs/original.md §5.2, docs/differences.md #6); ``per_class`` keeps the
    lowest-loss fraction within each (current) label instead. Ties break by index (stable sort).
    """
    losses = np.asarray(losses)
    semi_idx = np.zeros(len(losses), dtype=np.int64)
    if not per_class:
        semi_idx[np.argsort(losses, kind="stable")[: int(len(losses) * epsilon)]] = 1
        return semi_idx
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        order = members[np.argsort(losses[members], kind="stable")]
        semi_idx[order[: int(len(members) * epsilon)]] = 1
    return semi_idx


def split_quality(semi_idx: np.ndarray, poison_idx: np.ndarray) -> dict:
    """How well "unlabelled" works as a poison detector (integers, not floats; docs/differences.md #15)."""
    labeled = np.asarray(semi_idx) == 1
    poison = np.asarray(poison_idx) == 1
    caught = int((poison & ~labeled).sum())
    unlabeled = int((~labeled).sum())
    total = int(poison.sum())
    return {"labeled": int(labeled.sum()), "unlabeled": unlabeled,
            "poisoned_labeled": int((poison & labeled).sum()), "poisoned_total": total,
            "precision": caught / unlabeled if unlabeled else float("nan"),
            "recall": caught / total if total else float("nan")}


# ---- MixMatch step (docs/original.md §5.3): guess, sharpen, mix up, interleave ----------


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), renormalised over classes. p: [B, C]."""
    pt = p ** (1.0 / temperature)
    return pt / pt.sum(dim=1, keepdim=True)


def mixup(inputs: torch.Tensor, targets: torch.Tensor, alpha: float):
    """One λ ~ Beta(α, α) from numpy's global RNG with λ = max(λ, 1 − λ), one permutation from
    torch's CPU RNG shared by all samples (§5.3). Returns (mixed inputs, mixed targets, λ)."""
    lam = float(np.random.beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(inputs.shape[0]).to(inputs.device)
    return (lam * inputs + (1 - lam) * inputs[perm],
            lam * targets + (1 - lam) * targets[perm], lam)


def _offsets(batch: int, nu: int) -> list[int]:
    groups = [batch // (nu + 1)] * (nu + 1)
    for x in range(batch - sum(groups)):
        groups[-x - 1] += 1
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + g)
    return offsets


def interleave(chunks: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """Swap group i of chunk 0 with group i of chunk i (groups of ``batch // len(chunks)``,
    the remainder in the last groups), so each BN batch mixes labelled and unlabelled samples.
    Applying it twice gives the input back."""
    nu = len(chunks) - 1
    off = _offsets(batch, nu)
    parts = [[c[off[p]:off[p + 1]] for p in range(nu + 1)] for c in chunks]
    for i in range(1, nu + 1):
        parts[0][i], parts[i][i] = parts[i][i], parts[0][i]
    return [torch.cat(p, dim=0) for p in parts]


def mixmatch_step(model, x, y, u1, u2, criterion, t: float, num_classes: int, temperature: float,
                  alpha: float, speed):
    """One MixMatch update's forward pass and loss (§5.3); the caller steps the optimiser.

    x: labelled images [b, ...] with labels y [b]; u1, u2: two views of b unlabelled images.
    Under torchrun these are this process's slices of the global batches: the mixup, the
    interleave and the loss act on the gathered global batch, and each process forwards its
    slice of every interleaved chunk, so the update equals the single-process one (with global
    batch norm). Returns (loss, Lx, Lu, λ_u).
    """
    with torch.no_grad():  # label guessing, model in train mode (BN batch statistics)
        with speed.autocast():
            p1, p2 = model(u1), model(u2)
        p = (torch.softmax(p1.float(), dim=1) + torch.softmax(p2.float(), dim=1)) / 2
        q = sharpen(p, temperature)
        onehot = F.one_hot(y, num_classes).float()
        inputs = torch.cat([dist.gather(x), dist.gather(u1), dist.gather(u2)], dim=0)
        targets = torch.cat([dist.gather(onehot), dist.gather(q), dist.gather(q)], dim=0)
    batch = inputs.shape[0] // 3  # the global labelled batch
    mixed_x, mixed_y, _ = mixup(inputs, targets, alpha)
    chunks = interleave(list(torch.split(mixed_x, batch)), batch)
    share, r = batch // dist.world_size(), dist.rank()
    with speed.autocast():
        logits = [model(c[r * share:(r + 1) * share]) for c in chunks]
    logits = interleave([dist.gather_with_grad(lg.float()) for lg in logits], batch)
    return criterion(logits[0], mixed_y[:batch], torch.cat(logits[1:], dim=0), mixed_y[batch:], t)


def _cycle(loader):
    """Restart the loader when it runs out, and only then (docs/differences.md #17)."""
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
        t = epoch_index + i / n_iter  # docs/differences.md #5
        loss, lx, lu, lam = mixmatch_step(model, x, y, u1, u2, criterion, t, num_classes,
                                          mm["temperature"], mm["alpha"], speed)
        optimizer.zero_grad(set_to_none=True)
        speed.backward_step(loss, optimizer)
        meter.add("loss", loss.detach(), 1)
        meter.add("xloss", lx.detach(), 1)
        meter.add("uloss", lu.detach(), 1)
        meter.add("lambda_u", lam, 1)
    return meter.result()


# ---- Loop: warm-up epochs, then a split and a MixMatch epoch each epoch; tests, checkpoints


def main(argv=None):
    parser = base_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--pretrain-dirs", nargs=2, metavar=("SAVED_DIR", "STORAGE_DIR"),
                        default=None,
                        help="saved_dir and storage_dir of the SimCLR run (default: this "
                             "run's, as in the original)")
    args = parser.parse_args(argv)
    cfg, pre_path, pre_cfg = merged_config(args)
    pre_saved, pre_ckpt_dir = run_dirs(pre_cfg, *config_location(pre_path))
    if not cfg.get("pretrain_checkpoint"):
        raise ConfigError("pretrain_checkpoint is missing (e.g. epoch100.pt)")
    pre_ckpt = pre_ckpt_dir / str(cfg["pretrain_checkpoint"])
    pretrained = load_checkpoint(pre_ckpt)  # before any output: a bad checkpoint writes nothing
    check(cfg)
    data: PoisonData = load_poison_data(cfg)  # so are bad data and trigger
    run = start_run(args, "mixmatch_finetune.log", cfg)
    log, device, speed = run.log, run.device, run.speed
    log.info(f"Pretrain config {pre_path}: run folder {pre_saved}, checkpoints {pre_ckpt_dir}")

    log.info("===Prepare data===")
    bd = data.bd
    images, targets = data.train_images, data.train_targets
    # the poison index is the one the SimCLR stage drew and used (§1.5)
    poison_idx = load_poison_index(pre_saved / "poison_idx.npy", len(targets))
    if run.is_main:
        np.save(run.poison_idx_path, poison_idx)
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
    num_classes = num_classes_of(cfg)
    self_model = SelfModel(backbone, backbone.feature_dim, 128)
    load_model_state(self_model, pretrained["model_state_dict"], pre_ckpt)
    log.info(f"Loaded the pretrained backbone from {pre_ckpt} "
             f"(epoch {pretrained.get('epoch')})")
    model = speed.prepare(LinearModel(backbone, backbone.feature_dim, num_classes))
    model = run.wrap(model, bool(cfg.get("sync_bn")))
    warm_crit = build_criterion(w["criterion"], "warmup.criterion", num_classes)
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
            if isinstance(eval_loader, FastLoader):  # its augmentations follow the epoch alone
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
        state = training_checkpoint(epoch, result, model, optimizer, scheduler,
                                    best=(best_acc, best_epoch),
                                    poison_idx_path=run.poison_idx_path)
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
