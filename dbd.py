"""The whole experiment in one command: No Defense, DBD (SimCLR, then warm-up + split + MixMatch),
the evaluation of both models, and a report with pictures.

    python dbd.py --attack badnets --profile quick      # CPU-sized, on the real CIFAR-10
    python dbd.py --attack all --profile paper --device cuda

Each stage runs through the same code as its script (supervise.py, simclr.py,
mixmatch_finetune.py, test.py). Stages whose results exist are skipped and an interrupted stage
continues from its latest checkpoint, so running the command again after a kill continues the
experiment.

    python dbd.py --attack badnets --sweep finetune:semi.epsilon=0.3,0.5,0.7

runs one experiment per value of one config key; each stage run is named by what it computes
(its resolved config and the runs it builds on), so the values share the stages the key leaves
unchanged (docs/usage.md, "Sweeps").
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
import yaml

import mixmatch_finetune
import simclr
import supervise
from data.attacks import build_attack
from data.build import REPO_ROOT, build_poison_train, load_split, transform_for
from data.cifar import check_cifar_files, check_dataset_kind, find_batches_dir
from data.transforms import Normalizer
from model import SelfModel, build_backbone, build_linear_model
from tools.report import write_report, write_sweep_report
from utils.checkpoint import load_checkpoint, load_model_state
from utils.cli import run_main
from utils.config import apply_overrides, config_location, load_yaml
from utils.errors import ConfigError, DatasetError, UserError
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
                        "(default); cpu: the larger CPU-sized run (about 85 min)")
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
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one experiment per value of one config key (stage prefix as for "
                        "--set, e.g. finetune:semi.epsilon=0.3,0.5), sharing the stage runs "
                        "the key leaves unchanged, and a combined report (sweep.md)")
    p.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="with --sweep: use the finished stage runs of another experiment "
                        "folder (a plain run's or a sweep's --out) whose resolved config is the "
                        "same, instead of training them again (repeatable)")
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
              cfg: dict, script_args: list[str] = ()) -> tuple[Path, Path, bool]:
    """Run one training stage unless finished; continue it when a checkpoint exists.
    ``script_args``: more arguments for the script (the SimCLR run's folders, in a sweep)."""
    saved, ckpt = run_dirs(cfg, *config_location(config))
    if _finished(saved):
        return saved, ckpt, False
    resume = "latest_model.pt" if (ckpt / "latest_model.pt").is_file() else "False"
    argv = ["--config", str(config), "--resume", resume, "--device", device,
            *script_args]
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


# ---- Where the stages run: a plain run shares one pair of folders, a sweep gives each distinct
# stage run its own folder, named by what it computes ----------------------------------------

RUN_FOLDER_KEYS = ("saved_dir", "storage_dir")
STAGE_MODULES = {"supervise": supervise, "simclr": simclr, "finetune": mixmatch_finetune}
STAGE_TITLES = {"supervise": "No Defense (supervise.py)", "simclr": "SimCLR (simclr.py)",
                "finetune": "warm-up + MixMatch (mixmatch_finetune.py)"}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage_identity(stage: str, config: Path, cfg: dict, after: dict[str, str]) -> dict:
    """What a stage's run computes: its fully resolved config (``--set`` and ``--sweep``
    applied) without the run folders, the location of its config file (which names its run
    folder) and the keys of the stage runs it builds on."""
    return {"stage": stage, "config": "/".join(config_location(config)),
            "resolved": {k: v for k, v in cfg.items() if k not in RUN_FOLDER_KEYS},
            "after": after}


class SharedFolders:
    """A plain run: every stage under ``<out>/saved`` and ``<out>/storage``."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def root(self, stage: str, key: str) -> Path | None:
        return None

    def folders(self, stage: str, key: str) -> tuple[Path, Path]:
        return self.out / "saved", self.out / "storage"


class StageFolders:
    """A sweep: each distinct stage run in ``<sweep>/runs/<stage>-<key>/`` (``saved/``,
    ``storage/``, ``stage.json`` with what it computes, ``test.json`` with its model's test
    evaluation), so experiments that share a stage share its run."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def root(self, stage: str, key: str) -> Path | None:
        return self.out / "runs" / f"{stage}-{key}"

    def folders(self, stage: str, key: str) -> tuple[Path, Path]:
        r = self.root(stage, key)
        return r / "saved", r / "storage"

    def reused(self, key: str) -> tuple[Path, Path] | None:
        """Another experiment's finished run used for this key (``--reuse``), if any."""
        return None


class ReusingFolders(StageFolders):
    """A sweep with ``--reuse``: a stage run that another experiment finished with the same
    resolved config is used where it lies (read only, since a finished stage is skipped);
    the sweep's own ``runs/<stage>-<key>/`` keeps only its records."""

    def __init__(self, out: Path, found: dict[str, tuple[Path, Path]]):
        super().__init__(out)
        self.found = found

    def folders(self, stage: str, key: str) -> tuple[Path, Path]:
        return self.found.get(key) or super().folders(stage, key)

    def reused(self, key: str) -> tuple[Path, Path] | None:
        return self.found.get(key)


def reusable_runs(dirs: list[str], paths: dict[str, Path]) -> dict[str, tuple[Path, Path]]:
    """The finished stage runs in experiment folders (``dbd.py --out`` of a plain run or of a
    sweep), by the key of what they computed (``stage_identity``): a plain run's from the
    config each stage wrote beside its log, a sweep's from its ``runs/<stage>-<key>`` names."""
    found: dict[str, tuple[Path, Path]] = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UserError(f"--reuse {d}: no such folder")
        before = len(found)
        for run in sorted((d / "runs").glob("*-*")) if (d / "runs").is_dir() else []:
            stage, key = run.name.split("-", 1)
            record = run / "stage.json"
            reused = json.loads(record.read_text()).get("reused") if record.is_file() else None
            folders = tuple(map(Path, reused)) if reused else (run / "saved", run / "storage")
            if stage in paths and _finished(_saved_dir(folders, paths[stage])):
                found.setdefault(key, folders)
        keys: dict[str, str] = {}
        for stage in ("supervise", "simclr", "finetune"):
            saved = _saved_dir((d / "saved", d / "storage"), paths[stage])
            written = saved / paths[stage].name
            if not (_finished(saved) and written.is_file()):
                continue
            if stage == "finetune" and "simclr" not in keys:
                continue
            after = {"simclr": keys["simclr"]} if stage == "finetune" else {}
            cfg = yaml.safe_load(written.read_text())
            keys[stage] = _digest(stage_identity(stage, paths[stage], cfg, after))
            found.setdefault(keys[stage], (d / "saved", d / "storage"))
        if len(found) == before:
            print(f"[dbd] --reuse {d}: no finished stage run there (of these configs)")
    return found


def _saved_dir(folders: tuple[Path, Path], config: Path) -> Path:
    cfg = {"saved_dir": str(folders[0]), "storage_dir": str(folders[1])}
    return run_dirs(cfg, *config_location(config))[0]


@dataclasses.dataclass
class Stage:
    name: str
    config: Path
    overrides: list[str]
    cfg: dict
    key: str
    identity: dict
    root: Path | None  # the stage run's own folder (sweeps), None in a plain run
    argv: list[str]  # extra arguments of the script


def plan_experiment(attack: str, profile: str, overrides: list[str], placement,
                    dataset_dir: str | None = None) -> dict[str, Stage]:
    """The three stages of one experiment with their resolved configs and run folders; raises
    a ConfigError for a bad ``--set`` before anything runs."""
    paths = stage_configs(attack, profile)
    user = [f"dataset_dir={dataset_dir}"] if dataset_dir else []
    per_stage = {k: user + v for k, v in stage_overrides(overrides).items()}

    def resolve(stage, ovr):
        if stage == "finetune":
            ft_args = argparse.Namespace(config=str(paths[stage]), overrides=ovr)
            return mixmatch_finetune.merged_config(ft_args)[0]
        return apply_overrides(load_yaml(REPO_ROOT / paths[stage]), ovr)

    plan: dict[str, Stage] = {}
    for stage in ("supervise", "simclr", "finetune"):
        after = {"simclr": plan["simclr"].key} if stage == "finetune" else {}
        identity = stage_identity(stage, paths[stage], resolve(stage, per_stage[stage]), after)
        key = _digest(identity)
        saved, storage = placement.folders(stage, key)
        ovr = [f"saved_dir={saved}", f"storage_dir={storage}"] + per_stage[stage]
        argv = []
        if stage == "finetune":
            pre = plan["simclr"]
            pre_dirs = placement.folders("simclr", pre.key)
            if pre_dirs != (saved, storage):
                argv = ["--pretrain-dirs", *map(str, pre_dirs)]
        plan[stage] = Stage(stage, paths[stage], ovr, resolve(stage, ovr), key, identity,
                            placement.root(stage, key), argv)
    return plan


def evaluate_stage(stage: Stage, ckpt_dir: Path, sup_cfg: dict, device) -> dict:
    """test.py on the stage's latest model; in a sweep the result is kept in the stage run's
    folder and reused while the model and the evaluation config stay the same."""
    ckpt = ckpt_dir / "latest_model.pt"
    if stage.root is None:
        return evaluate_checkpoint(sup_cfg, ckpt, device)
    st = ckpt.stat()
    key = _digest({"model": str(ckpt), "mtime_ns": st.st_mtime_ns, "size": st.st_size,
                   "test": {k: v for k, v in sup_cfg.items() if k not in RUN_FOLDER_KEYS}})
    cache = stage.root / "test.json"
    if cache.is_file():
        kept = json.loads(cache.read_text())
        if kept.get("key") == key:
            return kept["metrics"]
    metrics = evaluate_checkpoint(sup_cfg, ckpt, device)
    cache.write_text(json.dumps({"key": key, "metrics": metrics}, indent=2) + "\n")
    return metrics


def run_attack(attack: str, args, out: Path, device) -> dict:
    """A plain run: the experiment's stages under ``out/saved`` and ``out/storage``."""
    dataset = ensure_dataset(args.dataset_dir) if args.dataset_dir else None
    return run_experiment(attack, args, args.overrides, SharedFolders(out), out, device, dataset)


def run_experiment(attack: str, args, overrides: list[str], placement, out: Path, device,
                   dataset_dir: str | None = None, clean_skip: tuple[str, ...] = ()) -> dict:
    """Train (or skip, or continue) the stages of one experiment and evaluate both models.
    ``clean_skip``: overrides not given to the clean model of a label-consistent attack."""
    plan = plan_experiment(attack, args.profile, overrides, placement, dataset_dir)
    sup, pre, ft = plan["supervise"], plan["simclr"], plan["finetune"]
    timings_path = out / f"{attack}_timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    def timed(name, fn, root=None):
        t0 = time.perf_counter()
        result = fn()
        record = root / "stage.json" if root is not None else None
        if result[2]:  # the stage ran (or continued) now
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            timings_path.write_text(json.dumps(timings, indent=2) + "\n")
            if record is not None:
                kept = json.loads(record.read_text()) if record.is_file() else {}
                kept["wall_time_s"] = kept.get("wall_time_s", 0.0) + time.perf_counter() - t0
                record.write_text(json.dumps(kept, indent=2, default=str) + "\n")
        elif record is not None and name not in timings and record.is_file():
            kept = json.loads(record.read_text()).get("wall_time_s")  # run for another value
            if kept is not None:
                timings[name] = kept
                timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        return result

    def run(stage: Stage):
        if stage.root is not None:
            stage.root.mkdir(parents=True, exist_ok=True)
            record = stage.root / "stage.json"
            reused = placement.reused(stage.key)
            if not record.is_file():
                extra = {"reused": [str(p) for p in reused]} if reused else {}
                record.write_text(json.dumps({"key": stage.key, **stage.identity, **extra},
                                             indent=2, default=str) + "\n")
            if reused:
                print(f"[dbd] {stage.name}: reusing the finished run in {reused[0].parent}")
        extra = {"script_args": stage.argv} if stage.argv else {}
        return timed(STAGE_TITLES[stage.name], lambda: run_stage(
            STAGE_MODULES[stage.name], stage.config, stage.overrides, dev, args.quiet, stage.cfg,
            **extra), stage.root)

    dev = str(device)
    unprefixed = ([f"dataset_dir={dataset_dir}"] if dataset_dir else []) + [
        o for o in overrides if split_stage_prefix(o)[0] is None and o not in clean_skip]
    clean = clean_model_stage(sup.cfg, unprefixed)
    if clean:
        timed("clean model for the attack (supervise.py)", lambda: run_stage(
            supervise, *clean, dev, args.quiet, apply_overrides(load_yaml(clean[0]), clean[1])))
    sup_saved, sup_ckpt, _ = run(sup)
    pre_saved, pre_ckpt, _ = run(pre)
    ft_saved, ft_ckpt, _ = run(ft)

    t0 = time.perf_counter()
    nd = evaluate_stage(sup, sup_ckpt, sup.cfg, device)
    dbd = evaluate_stage(ft, ft_ckpt, sup.cfg, device)
    timings["test (test.py, both models)"] = time.perf_counter() - t0
    print(f"[dbd] {attack}: No Defense BA {100 * nd['BA']:.2f} ASR {100 * nd['ASR']:.2f} | "
          f"DBD BA {100 * dbd['BA']:.2f} ASR {100 * dbd['ASR']:.2f}")
    feats = feature_maps(sup.cfg, sup_saved, sup_ckpt / "latest_model.pt", pre.cfg,
                         pre_ckpt / str(ft.cfg["pretrain_checkpoint"]), device)
    return {"no_defense": nd, "dbd": dbd, "timings": timings, "features": feats,
            "stages": {"supervise": sup_saved, "simclr": pre_saved, "finetune": ft_saved,
                       "warmup_epochs": ft.cfg["warmup"]["num_epochs"]},
            "setting": experiment_setting(sup.cfg, sup_saved, nd)}


def experiment_setting(sup_cfg: dict, sup_saved: Path, nd: dict) -> dict:
    """The leaderboard's description of an experiment (tools/report.py, leaderboard.csv)."""
    final = sup_saved / "final_metrics.json"
    train_size = json.loads(final.read_text()).get("train_size") if final.is_file() else None
    return {"dataset": check_dataset_kind(sup_cfg), "model": next(iter(sup_cfg["network"])),
            "poison_ratio": (sup_cfg.get("backdoor") or {}).get("poison_ratio"),
            "train_size": train_size, "test_size": nd.get("clean_images")}


# ---- Sweeps: one experiment per value of one config key, sharing the stages it leaves alone --


@dataclasses.dataclass
class Sweep:
    spec: str  # as given: [STAGE:]KEY=V1,V2,...
    prefix: str  # "finetune:" etc. or ""
    key: str
    values: list[str]  # the value texts, parsed like --set values when applied

    def item(self, value: str) -> str:
        return f"{self.prefix}{self.key}={value}"

    @property
    def name(self) -> str:
        return f"{self.prefix.replace(':', '-')}{self.key}"


def split_values(text: str) -> list[str]:
    """``a,b,[1, 2]`` -> ``['a', 'b', '[1, 2]']``: commas inside brackets or braces stay."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def parse_sweep(specs: list[str]) -> Sweep:
    if len(specs) > 1:
        raise UserError("--sweep: one key per command (got " + ", ".join(specs) + ")")
    spec = specs[0]
    if "=" not in spec:
        raise UserError(f"--sweep expects [STAGE:]KEY=V1,V2,..., got '{spec}'")
    stage, rest = split_stage_prefix(spec)
    if stage is not None and stage not in STAGE_MODULES:
        raise UserError(f"--sweep {spec}: unknown stage '{stage}' (use "
                        f"{', '.join(STAGE_MODULES)}, or no prefix for every stage)")
    key, text = rest.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--sweep {spec}: no key before '='")
    if key in RUN_FOLDER_KEYS:
        raise UserError(f"--sweep {spec}: a sweep places the run folders itself (use --out)")
    values = split_values(text)
    if not text.strip() or any(v == "" for v in values):
        raise UserError(f"--sweep {spec}: give a comma-separated list of values, none empty")
    if len(set(values)) != len(values):
        raise UserError(f"--sweep {spec}: a value is repeated")
    return Sweep(spec, f"{stage}:" if stage else "", key, values)


def value_folder(sweep: Sweep, value: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", value)
    return f"{sweep.key}={safe}"


def check_sweep(attack: str, args, sweep: Sweep, placement) -> None:
    """Resolve every experiment's configs, so a bad value or key stops the sweep before it
    starts (a ``--set`` error is reported as one, a ``--sweep`` error as one)."""
    plan_experiment(attack, args.profile, args.overrides, placement)
    for value in sweep.values:
        try:
            plan_experiment(attack, args.profile, args.overrides + [sweep.item(value)],
                            placement)
        except ConfigError as e:
            raise ConfigError(f"--sweep {sweep.spec}: value '{value}': "
                              f"{str(e).removeprefix('--set ')}") from None


def run_sweep(attack: str, args, sweep: Sweep, device) -> Path:
    out = Path(args.out or f"experiments/{attack}-{args.profile}-sweep-{sweep.name}")
    placement = StageFolders(out)
    if args.reuse:
        placement = ReusingFolders(out, reusable_runs(args.reuse,
                                                      stage_configs(attack, args.profile)))
    if any(split_stage_prefix(o)[1].split("=", 1)[0].strip() in RUN_FOLDER_KEYS
           for o in args.overrides):
        raise UserError("--sweep places the run folders itself: use --out, not --set "
                        "saved_dir/storage_dir")
    check_sweep(attack, args, sweep, placement)
    out.mkdir(parents=True, exist_ok=True)
    if args.dataset_dir:
        find_batches_dir(args.dataset_dir)
    dataset = ensure_dataset(args.dataset_dir) if args.dataset_dir else None
    entries = []
    for value in sweep.values:
        exp = out / value_folder(sweep, value)
        exp.mkdir(exist_ok=True)
        print(f"[dbd] sweep {sweep.prefix}{sweep.key} = {value}: {exp}")
        result = run_experiment(attack, args, args.overrides + [sweep.item(value)], placement,
                                exp, device, dataset, clean_skip=(sweep.item(value),))
        report = write_report(exp, args.profile, {attack: result})
        (exp / "stages.json").write_text(json.dumps(
            {k: str(v) for k, v in result["stages"].items()}, indent=2) + "\n")
        entries.append({"value": value, "folder": exp.name, "result": result,
                        "report": report["attacks"][attack]})
    write_sweep_report(out, args.profile, attack, f"{sweep.prefix}{sweep.key}", entries)
    return out


def main(argv=None):
    args = parse(argv)
    sweep = parse_sweep(args.sweep) if args.sweep else None
    if sweep and args.attack == "all":
        raise UserError("--sweep runs one attack: give --attack NAME, not all")
    if args.reuse and not sweep:
        raise UserError("--reuse goes with --sweep (a plain run continues in its own --out)")
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
    if sweep:
        out = run_sweep(args.attack, args, sweep, device)
        print(f"[dbd] sweep report: {out / 'sweep.md'}")
        return
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
