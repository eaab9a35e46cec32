"""The whole experiment in one command: No Defense, DBD (SimCLR, then warm-up + split + MixMatch),
the evaluation of both models, and a report with pictures.

    python dbd.py --attack badnets --profile quick      # CPU-sized, on the real CIFAR-10
    python dbd.py --attack all --profile paper --device cuda

Each stage runs through the same code as its script (supervise.py, simclr.py,
mixmatch_finetune.py, test.py). Stages whose results exist are skipped and an interrupted stage
continues from its latest checkpoint, so running the command again after a kill continues the
experiment.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

import mixmatch_finetune
import simclr
import supervise
from data.attacks import build_attack
from data.build import REPO_ROOT, build_poison_train, load_split, transform_for
from data.cifar import check_cifar_files, find_batches_dir
from data.transforms import Normalizer
from model import SelfModel, build_backbone, build_linear_model
from tools.report import write_report
from utils.checkpoint import load_checkpoint, load_model_state
from utils.cli import run_main
from utils.config import apply_overrides, config_location, load_yaml
from utils.errors import DatasetError, UserError
from utils.setup import resolve_device, run_dirs


@functools.cache
def _test_script():
    """test.py, loaded by path the first time it is needed: the name ``test`` is also a
    standard-library package, so it cannot be imported by name."""
    spec = importlib.util.spec_from_file_location("dbd_test_script", REPO_ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate_checkpoint(cfg: dict, ckpt_path: Path, device) -> dict:
    """BA, ASR and RA of a checkpoint, by test.py's own evaluation."""
    return _test_script().evaluate_checkpoint(cfg, ckpt_path, device)

PROFILES = {"paper": "example.yaml", "quick": "quick.yaml", "cpu": "cpu.yaml"}
STAGES = (("supervise", "config/supervise"), ("simclr", "config/defense/simclr"),
          ("finetune", "config/defense/mixmatch_finetune"))


def stage_configs(attack: str, profile: str) -> dict[str, Path] | None:
    name = PROFILES[profile]
    paths = {s: Path(d) / attack / "cifar10_resnet18" / name for s, d in STAGES}
    return paths if all((REPO_ROOT / p).is_file() for p in paths.values()) else None


def available_attacks(profile: str) -> list[str]:
    root = REPO_ROOT / "config/supervise"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and stage_configs(p.name, profile))


def parse(argv):
    p = argparse.ArgumentParser(description="Run No Defense and DBD for an attack and report.")
    p.add_argument("--attack", required=True, help="badnets, blend, blend_random, ... or all")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                   help="paper: the original settings; quick: about 14 min on a laptop CPU "
                        "(default); cpu: the larger CPU-sized run (about 45 min)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dataset-dir", default=None,
                   help="CIFAR-10 folder for every stage (downloaded there when absent)")
    p.add_argument("--out", default=None,
                   help="experiment folder (default experiments/<attack>-<profile>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every stage, e.g. --set speed.amp=off, or "
                        "in one stage with a prefix: supervise:, simclr: or finetune: (e.g. "
                        "--set finetune:semi.num_epochs=8); type-checked against each "
                        "stage's config")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def ensure_dataset(dataset_dir: str) -> str:
    d = Path(dataset_dir).expanduser()
    try:
        return str(check_cifar_files(d))
    except DatasetError:
        pass
    from data.download import DownloadError, download_cifar10
    print(f"CIFAR-10 not found in {d}: downloading it there")
    try:
        return str(download_cifar10(d if d.name != "cifar-10-batches-py" else d.parent))
    except DownloadError as e:
        raise UserError(
            f"could not download CIFAR-10 ({e}); fetch "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz by hand and unpack it in "
            f"{d if d.name != 'cifar-10-batches-py' else d.parent}") from None


def _finished(saved_dir: Path) -> bool:
    return (saved_dir / "final_metrics.json").is_file()


def run_stage(module, config: Path, overrides: list[str], device: str, quiet: bool,
              cfg: dict) -> tuple[Path, Path, bool]:
    """Run one training stage unless finished; continue it when a checkpoint exists."""
    saved, ckpt = run_dirs(cfg, *config_location(config))
    if _finished(saved):
        return saved, ckpt, False
    resume = "latest_model.pt" if (ckpt / "latest_model.pt").is_file() else "False"
    argv = ["--config", str(config), "--resume", resume, "--device", device]
    for o in overrides:
        argv += ["--set", o]
    if quiet:
        argv.append("--quiet")
    print(f"[dbd] {module.__name__}: {'continuing' if resume != 'False' else 'starting'} "
          f"({config})")
    module.main(argv)
    return saved, ckpt, True


@torch.no_grad()
def feature_maps(sup_cfg, sup_saved, nd_ckpt, pre_cfg, pre_ckpt, device, per_class=150,
                 max_poison=300) -> dict:
    """2-D PCA of penultimate features of training images: No Defense vs SimCLR."""
    images, targets = load_split(sup_cfg, train=True)
    poison_idx = np.load(sup_saved / "poison_idx.npy")
    tf = transform_for(sup_cfg, "test")
    ds = build_poison_train(sup_cfg, poison_idx, images, targets, tf,
                            build_attack(sup_cfg["backdoor"], REPO_ROOT))
    rng = np.random.RandomState(0)
    pois = np.flatnonzero(poison_idx == 1)
    sel = [rng.choice(pois, min(max_poison, len(pois)), replace=False)] if len(pois) else []
    for c in np.unique(targets):
        members = np.flatnonzero((targets == c) & (poison_idx == 0))
        sel.append(rng.choice(members, min(per_class, len(members)), replace=False))
    sel = np.concatenate(sel)
    x = torch.from_numpy(ds.data[sel]).permute(0, 3, 1, 2)
    x = Normalizer(tf.mean, tf.std, device)(x)

    nd = build_linear_model(sup_cfg)
    load_model_state(nd, load_checkpoint(nd_ckpt)["model_state_dict"], nd_ckpt)
    bb = build_backbone(pre_cfg["network"])
    sm = SelfModel(bb, bb.feature_dim, 128)
    load_model_state(sm, load_checkpoint(pre_ckpt)["model_state_dict"], pre_ckpt)
    poison = ds.poison_idx[sel] == 1
    out = {"maps": {}, "poisoned_neighbours": {}, "poisoned_share": float(poison.mean())}
    for title, backbone in (("No Defense (supervised on poisoned labels)", nd.backbone),
                            ("DBD stage 1 (SimCLR, no labels)", sm.backbone)):
        backbone = backbone.to(device).eval()
        f = torch.cat([backbone(chunk) for chunk in x.split(256)]).float()
        f = f - f.mean(0, keepdim=True)
        _, _, v = torch.pca_lowrank(f, q=2, center=False)
        out["maps"][title] = ((f @ v[:, :2]).cpu().numpy(), ds.origin[sel], poison)
        out["poisoned_neighbours"][title] = poisoned_neighbour_share(f.cpu(), poison)
    return out


def poisoned_neighbour_share(features: torch.Tensor, poison: np.ndarray, k: int = 10) -> float:
    """Mean share of poisoned samples among the ``k`` nearest neighbours (Euclidean, the full
    feature space, the sample itself excluded) of each poisoned sample: near 1 when the poisoned
    samples form a cluster of their own, near their overall share when they mix with the rest."""
    if poison.sum() == 0 or len(poison) <= k:
        return float("nan")
    d = torch.cdist(features[torch.from_numpy(poison)], features)
    d[torch.arange(d.shape[0]), torch.from_numpy(np.flatnonzero(poison))] = float("inf")
    nearest = d.topk(k, largest=False).indices
    return float(torch.from_numpy(poison)[nearest].float().mean())


def clean_model_stage(sup_cfg: dict, overrides: list[str]) -> tuple[Path, list[str]] | None:
    """(config, overrides) of the clean model a label-consistent attack perturbs against, when
    it has not been trained yet; it lives where its own config puts it (``saved_dir`` and
    ``storage_dir`` of that config, so those overrides are dropped), which is where the
    attack looks for it."""
    backdoor = sup_cfg.get("backdoor") or {}
    if "label_consistent" not in backdoor:
        return None
    cfg_path, ckpt = build_attack(backdoor, REPO_ROOT).clean_model_paths()
    if ckpt.is_file():
        return None
    return cfg_path, [o for o in overrides
                      if o.split("=", 1)[0].strip() not in ("saved_dir", "storage_dir")]


def split_stage_prefix(item: str) -> tuple[str | None, str]:
    """``STAGE:KEY=VALUE`` -> (STAGE, KEY=VALUE); ``KEY=VALUE`` -> (None, KEY=VALUE)."""
    if ":" not in item.split("=", 1)[0]:
        return None, item
    stage, rest = item.split(":", 1)
    return stage.strip(), rest


def stage_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """``--set`` values per stage: ``KEY=VALUE`` goes to every stage, ``STAGE:KEY=VALUE`` to that
    stage only (the clean model of a label-consistent attack takes the unprefixed ones)."""
    out = {name: [] for name, _ in STAGES}
    for item in overrides:
        stage, rest = split_stage_prefix(item)
        if stage is None:
            for lst in out.values():
                lst.append(rest)
        elif stage in out:
            out[stage].append(rest)
        else:
            raise UserError(f"--set {item}: unknown stage '{stage}' (use "
                            f"{', '.join(out)}, or no prefix for every stage)")
    return out


def run_attack(attack: str, args, out: Path, device) -> dict:
    paths = stage_configs(attack, args.profile)
    common = [f"saved_dir={out / 'saved'}", f"storage_dir={out / 'storage'}"]
    if args.dataset_dir:
        common.append(f"dataset_dir={ensure_dataset(args.dataset_dir)}")
    per_stage = {k: common + v for k, v in stage_overrides(args.overrides).items()}
    unprefixed = common + [o for o in args.overrides if split_stage_prefix(o)[0] is None]
    timings_path = out / f"{attack}_timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        if result[2]:  # the stage ran (or continued) now
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        return result

    sup_cfg = apply_overrides(load_yaml(REPO_ROOT / paths["supervise"]), per_stage["supervise"])
    pre_cfg = apply_overrides(load_yaml(REPO_ROOT / paths["simclr"]), per_stage["simclr"])
    ft_args = argparse.Namespace(config=str(paths["finetune"]), overrides=per_stage["finetune"])
    ft_cfg, _, _ = mixmatch_finetune.merged_config(ft_args)
    dev = str(device)
    clean = clean_model_stage(sup_cfg, unprefixed)
    if clean:
        timed("clean model for the attack (supervise.py)", lambda: run_stage(
            supervise, *clean, dev, args.quiet, apply_overrides(load_yaml(clean[0]), clean[1])))
    sup_saved, sup_ckpt, _ = timed("No Defense (supervise.py)", lambda: run_stage(
        supervise, paths["supervise"], per_stage["supervise"], dev, args.quiet, sup_cfg))
    pre_saved, pre_ckpt, _ = timed("SimCLR (simclr.py)", lambda: run_stage(
        simclr, paths["simclr"], per_stage["simclr"], dev, args.quiet, pre_cfg))
    ft_saved, ft_ckpt, _ = timed("warm-up + MixMatch (mixmatch_finetune.py)", lambda: run_stage(
        mixmatch_finetune, paths["finetune"], per_stage["finetune"], dev, args.quiet, ft_cfg))

    t0 = time.perf_counter()
    nd = evaluate_checkpoint(sup_cfg, sup_ckpt / "latest_model.pt", device)
    dbd = evaluate_checkpoint(sup_cfg, ft_ckpt / "latest_model.pt", device)
    timings["test (test.py, both models)"] = time.perf_counter() - t0
    print(f"[dbd] {attack}: No Defense BA {100 * nd['BA']:.2f} ASR {100 * nd['ASR']:.2f} | "
          f"DBD BA {100 * dbd['BA']:.2f} ASR {100 * dbd['ASR']:.2f}")
    feats = feature_maps(sup_cfg, sup_saved, sup_ckpt / "latest_model.pt", pre_cfg,
                         pre_ckpt / str(ft_cfg["pretrain_checkpoint"]), device)
    return {"no_defense": nd, "dbd": dbd, "timings": timings, "features": feats,
            "stages": {"supervise": sup_saved, "simclr": pre_saved, "finetune": ft_saved,
                       "warmup_epochs": ft_cfg["warmup"]["num_epochs"]}}


def main(argv=None):
    args = parse(argv)
    device = resolve_device(args.device)
    attacks = available_attacks(args.profile)
    if args.attack == "all":
        chosen = attacks
        if "blend" in chosen and not (REPO_ROOT / "data/trigger/hello_kitty.png").is_file():
            chosen = [a for a in chosen if a != "blend"]
            print("[dbd] skipping blend: fetch its trigger with "
                  "python -m data.download trigger hello_kitty")
    elif args.attack in attacks:
        chosen = [args.attack]
    else:
        raise UserError(f"--attack {args.attack}: no {args.profile} configs for it "
                        f"(available: {', '.join(attacks)}, or all)")
    stage_overrides(args.overrides)  # a bad stage prefix is reported before anything runs
    out = Path(args.out or f"experiments/{args.attack}-{args.profile}")
    out.mkdir(parents=True, exist_ok=True)
    if args.dataset_dir:
        find_batches_dir(args.dataset_dir)
    results = {a: run_attack(a, args, out, device) for a in chosen}
    write_report(out, args.profile, results)
    print(f"[dbd] report: {out / 'report.md'}")


CONTINUE_HINT = ("run the same command again to continue (finished stages are skipped, the "
                 "interrupted one continues)")

if __name__ == "__main__":
    run_main(main, continue_hint=CONTINUE_HINT)
