"""An experiment's plan: which config each stage runs (by attack and profile), with which
overrides, in which run folders, and what each stage run computes (its key).

A plain run keeps every stage under ``<out>/saved`` and ``<out>/storage`` (``SharedFolders``).
A sweep gives each distinct stage run its own folder ``<sweep>/runs/<stage>-<key>/``, named by
what it computes, so experiments that share a stage share its run (``SweepFolders``), and may
use another experiment's finished runs of the same key (``ReusingFolders``, ``--reuse``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import NamedTuple, Protocol

import yaml

from data.poisoned_set import load_poisoned_set
from pipeline.stage import finetune_config
from utils.cli import StageArgs
from utils.config import Override, parse_override
from utils.errors import UserError
from utils.paths import REPO_ROOT
from utils.run import load_config
from utils.schema import RUN_FOLDER_KEYS
from utils.setup import RunFolders, config_location, run_dirs

PROFILES = {"paper": "example.yaml", "quick": "quick.yaml", "cpu": "cpu.yaml"}
STAGES = ("supervise", "simclr", "finetune")
STAGE_CONFIG_DIRS = {"supervise": "config/supervise", "simclr": "config/defense/simclr",
                     "finetune": "config/defense/mixmatch_finetune"}
STAGE_TITLES = {"supervise": "No Defense (supervise.py)", "simclr": "SimCLR (simclr.py)",
                "finetune": "warm-up + MixMatch (mixmatch_finetune.py)"}


def stage_configs(attack: str, profile: str) -> dict[str, Path] | None:
    """The three stages' configs of an attack and profile (relative to the repository), or
    None when the attack has no configs for that profile."""
    name = PROFILES[profile]
    paths = {s: Path(d) / attack / "cifar10_resnet18" / name for s, d in STAGE_CONFIG_DIRS.items()}
    return paths if all((REPO_ROOT / p).is_file() for p in paths.values()) else None


def available_attacks(profile: str) -> list[str]:
    root = REPO_ROOT / STAGE_CONFIG_DIRS["supervise"]
    return sorted(p.name for p in root.iterdir() if p.is_dir() and stage_configs(p.name, profile))


# the configs a poisoned set made elsewhere runs with (dbd.py --data): BadNets' stages, their
# backdoor section replaced by the set's own poisoning
DATA_TEMPLATE = "badnets"
LARGE_IMAGES = 64  # from this side length on, --data runs the ImageNet ResNet-18
SIZED_OPS = ("random_crop", "random_resize_crop", "center_crop")


def given_set_overrides(path: str | Path, profile: str) -> list[Override]:
    """What ``dbd.py --data PATH`` sets in every stage: the set as the dataset, its target,
    its number of classes (the copies the original's configs carry are dropped); for images
    other than 32x32, the crops at the images' size and, from ``LARGE_IMAGES`` px on, the
    ImageNet ResNet-18 at the profile's width (``fit_to_images``)."""
    path = Path(path).expanduser().resolve()
    ps = load_poisoned_set(path)
    h, w = (int(v) for v in ps.train_images.shape[1:3])
    backdoor = {"target_label": ps.target_label, "poison_ratio": 0.0, "given": {}}
    out = [parse_override(item) for item in (
        "dataset=poisoned", f"dataset_dir={path}", f"backdoor={json.dumps(backdoor)}",
        f"num_classes={ps.num_classes}", "finetune:warmup.criterion.sce.num_classes=null",
        "finetune:semi.mixmatch.num_classes=null")]
    if (h, w) == (32, 32):  # the profiles' own size
        return out + [parse_override("network.resnet18_cifar.num_classes=null")]
    paths = stage_configs(DATA_TEMPLATE, profile)
    for stage in STAGES:
        cfg = resolve_stage(stage, StageArgs(paths[stage]))
        out += [o._replace(stage=stage) for o in fit_to_images(cfg, h, w)]
    return out


def fit_to_images(cfg: dict, h: int, w: int) -> list[Override]:
    """Overrides that fit a 32x32 config to h x w images: every crop of size 32 to [h, w]
    (random_crop's padding scaled with the shorter side), and the network: the CIFAR
    ResNet-18 below ``LARGE_IMAGES`` px, the ImageNet one (its stride-2 stem and max-pool,
    as the ImageNet-30 configs) at and above, either with the config's width."""
    (_, kw), = cfg["network"].items()
    net = "resnet18_cifar" if min(h, w) < LARGE_IMAGES else "resnet18_imagenet"
    width = (kw or {}).get("width", 64)
    out = [parse_override(f"network={json.dumps({net: {'width': width}})}")]
    for part, section in (cfg.get("transform") or {}).items():
        pipelines = section.items() if isinstance(section, dict) else ()
        for stage_part, ops in pipelines:
            for op, args in (ops.items() if isinstance(ops, dict) else ()):
                if op not in SIZED_OPS or not isinstance(args, dict):
                    continue
                key = f"transform.{part}.{stage_part}.{op}"
                if args.get("size") not in (32, [32], [32, 32]):
                    raise UserError(f"--data: {key}.size is {args.get('size')!r}, not 32; "
                                    "write configs with dataset: poisoned for these images")
                fitted = {**args, "size": h if h == w else [h, w]}
                if op == "random_crop" and args.get("padding"):
                    fitted["padding"] = max(1, round(args["padding"] * min(h, w) / 32))
                out.append(parse_override(f"{key}={json.dumps(fitted)}"))
    return out


def stage_overrides(overrides: list[Override]) -> dict[str, list[Override]]:
    """``--set`` values per stage: an override without a stage prefix goes to every stage,
    ``STAGE:KEY=VALUE`` to that stage only. Run folders are placed by ``--out``, not ``--set``."""
    out: dict[str, list[Override]] = {name: [] for name in STAGES}
    for o in overrides:
        if o.key in RUN_FOLDER_KEYS:
            raise UserError(f"--set {o}: the experiment places the run folders itself (use --out)")
        if o.stage is not None and o.stage not in out:
            raise UserError(f"--set {o}: unknown stage '{o.stage}' (use {', '.join(out)}, or no "
                            "prefix for every stage)")
        for name in ([o.stage] if o.stage else STAGES):
            out[name].append(o._replace(stage=None))
    return out


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def stage_identity(stage: str, config: Path, cfg: dict, after: dict[str, str]) -> dict:
    """What a stage's run computes: its fully resolved config (``--set`` and ``--sweep``
    applied) without the run folders, the location of its config file (which names its run
    folder) and the keys of the stage runs it builds on."""
    return {"stage": stage, "config": "/".join(config_location(config)),
            "resolved": {k: v for k, v in cfg.items() if k not in RUN_FOLDER_KEYS},
            "after": after}


def resolve_stage(stage: str, args: StageArgs) -> dict:
    """The stage's resolved config, as its script will read it."""
    return finetune_config(args)[0] if stage == "finetune" else load_config(args)


# ---- Where the stage runs go ---------------------------------------------------------------


class Placement(Protocol):
    def folders(self, stage: str, key: str) -> RunFolders:
        """The run folders of the stage run with this key."""

    def root(self, stage: str, key: str) -> Path | None:
        """The stage run's own record folder (sweeps), None in a plain run."""

    def reused(self, key: str) -> RunFolders | None:
        """Another experiment's finished run used for this key, if any."""


class SharedFolders:
    """A plain run: every stage under ``<out>/saved`` and ``<out>/storage``."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def folders(self, stage: str, key: str) -> RunFolders:
        return RunFolders(self.out / "saved", self.out / "storage")

    def root(self, stage: str, key: str) -> Path | None:
        return None

    def reused(self, key: str) -> RunFolders | None:
        return None


class SweepFolders:
    """A sweep: each distinct stage run in ``<sweep>/runs/<stage>-<key>/`` (``saved/``,
    ``storage/``, ``stage.json`` with what it computes, ``test.json`` with its model's test
    evaluation), so experiments that share a stage share its run."""

    def __init__(self, out: Path, found: dict[str, RunFolders] | None = None):
        self.out = Path(out)
        self.found = found or {}

    def root(self, stage: str, key: str) -> Path:
        return self.out / "runs" / f"{stage}-{key}"

    def folders(self, stage: str, key: str) -> RunFolders:
        """A run that another experiment finished with the same key is used where it lies
        (read only: a finished stage is skipped); the sweep's own folder keeps its records."""
        r = self.root(stage, key)
        return self.found.get(key) or RunFolders(r / "saved", r / "storage")

    def reused(self, key: str) -> RunFolders | None:
        return self.found.get(key)


def finished(saved: Path) -> bool:
    return (saved / "final_metrics.json").is_file()


def saved_dir(folders: RunFolders, config: Path) -> Path:
    """The run folder (logs, CSVs, final metrics) of ``config`` under ``folders``."""
    return run_dirs(folders.apply({}), *config_location(config))[0]


def reusable_runs(dirs: list[str], paths: dict[str, Path]) -> dict[str, RunFolders]:
    """The finished stage runs in experiment folders (``dbd.py --out`` of a plain run or of a
    sweep), by the key of what they computed: a plain run's from the config each stage wrote
    beside its log, a sweep's from its ``runs/<stage>-<key>`` names."""
    found: dict[str, RunFolders] = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UserError(f"--reuse {d}: no such folder")
        before = len(found)
        for run in sorted((d / "runs").glob("*-*")) if (d / "runs").is_dir() else []:
            stage, key = run.name.split("-", 1)
            record = run / "stage.json"
            reused = json.loads(record.read_text()).get("reused") if record.is_file() else None
            folders = RunFolders.of(reused) if reused else RunFolders(run / "saved",
                                                                      run / "storage")
            if stage in paths and finished(saved_dir(folders, paths[stage])):
                found.setdefault(key, folders)
        keys: dict[str, str] = {}
        plain = RunFolders(d / "saved", d / "storage")
        for stage in STAGES:
            saved = saved_dir(plain, paths[stage])
            written = saved / paths[stage].name
            if not (finished(saved) and written.is_file()):
                continue
            if stage == "finetune" and "simclr" not in keys:
                continue
            after = {"simclr": keys["simclr"]} if stage == "finetune" else {}
            cfg = yaml.safe_load(written.read_text())
            keys[stage] = digest(stage_identity(stage, paths[stage], cfg, after))
            found.setdefault(keys[stage], plain)
        if len(found) == before:
            print(f"[dbd] --reuse {d}: no finished stage run there (of these configs)")
    return found


# ---- The plan ------------------------------------------------------------------------------


class StagePlan(NamedTuple):
    """One stage of an experiment: what its script is given (``args``), its resolved config
    (run folders included), its key and identity, and its record folder (sweeps)."""
    name: str
    args: StageArgs
    cfg: dict
    key: str
    identity: dict
    root: Path | None


def plan_experiment(attack: str, profile: str, overrides: list[Override], placement: Placement,
                    device: str = "auto", quiet: bool = False,
                    template: str | None = None) -> dict[str, StagePlan]:
    """The three stages of one experiment, with the configs of ``template`` (default: the
    attack's); a bad ``--set`` is a ConfigError before anything runs."""
    paths = stage_configs(template or attack, profile)
    per_stage = stage_overrides(overrides)
    plan: dict[str, StagePlan] = {}
    for stage in STAGES:
        args = StageArgs(paths[stage], device=device, quiet=quiet,
                         overrides=tuple(per_stage[stage]))
        after = {"simclr": plan["simclr"].key} if stage == "finetune" else {}
        resolved = resolve_stage(stage, args)
        identity = stage_identity(stage, paths[stage], resolved, after)
        key = digest(identity)
        folders = placement.folders(stage, key)
        pretrain = None
        if stage == "finetune":
            pre = placement.folders("simclr", plan["simclr"].key)
            pretrain = pre if pre != folders else None
        args = dataclasses.replace(args, folders=folders, pretrain_folders=pretrain)
        plan[stage] = StagePlan(stage, args, folders.apply(resolved), key, identity,
                                placement.root(stage, key))
    return plan
