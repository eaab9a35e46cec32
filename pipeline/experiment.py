"""One experiment: No Defense, SimCLR and the fine-tuning (each skipped when finished and
continued from its latest checkpoint when interrupted), then both models evaluated and their
features compared.

The stages run through the scripts' own ``train`` functions, which ``dbd.py`` hands in
(``StageRunners``), so this module imports no entry script.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from data.attacks import build_attack
from data.build import class_names
from data.cifar import check_dataset_kind
from tools.features import feature_maps
from utils.cli import StageArgs
from utils.config import Override, apply_overrides, load_yaml
from utils.metrics import write_json
from utils.paths import REPO_ROOT
from utils.schema import RUN_FOLDER_KEYS, Semi, section
from utils.setup import config_location, run_dirs

from .evaluate import evaluate_checkpoint
from .plan import STAGE_TITLES, Placement, StagePlan, digest, finished, plan_experiment

# a stage's ``train(StageArgs)``: supervise.train, simclr.train, mixmatch_finetune.train
StageRunners = Mapping[str, Callable[[StageArgs], dict]]
CLEAN_MODEL_TITLE = "clean model for the attack (supervise.py)"
TEST_TITLE = "test (test.py, both models)"


@dataclass
class ExperimentResult:
    """What the report needs of one experiment: both models' test metrics, the stages' run
    folders (their logs and split files), the wall time of each stage, and the setting."""
    no_defense: dict
    dbd: dict
    stages: dict[str, Path]  # supervise, simclr, finetune: each stage's run folder
    warmup_epochs: int
    timings: dict[str, float]
    setting: dict
    features: dict | None = None  # tools.features.feature_maps

    @property
    def stage_seconds(self) -> dict[str, float]:
        """The wall time of each training stage that ran (or was reused), by stage name."""
        return {name: self.timings[title] for name, title in STAGE_TITLES.items()
                if title in self.timings}


class Timings:
    """The wall time of each stage, kept in ``<out>/<attack>_timings.json`` across
    continuations (a stage continued later adds to its time)."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = (json.loads(path.read_text()) if path.is_file()
                                          else {})

    def add(self, name: str, seconds: float, replace_it: bool = False) -> None:
        self.seconds[name] = seconds if replace_it else self.seconds.get(name, 0.0) + seconds
        self.path.write_text(json.dumps(self.seconds, indent=2) + "\n")


def run_stage(train: Callable[[StageArgs], dict], args: StageArgs, cfg: dict) -> bool:
    """Run a stage unless it finished; continue it from ``latest_model.pt`` when one exists.
    Returns whether it ran now."""
    saved, ckpt = run_dirs(cfg, *config_location(args.config))
    if finished(saved):
        return False
    resume = "latest_model.pt" if (ckpt / "latest_model.pt").is_file() else "False"
    print(f"[dbd] {args.config}: {'continuing' if resume != 'False' else 'starting'}")
    train(replace(args, resume=resume))
    return True


def _run_planned(train, stage: StagePlan, placement: Placement, timings: Timings) -> None:
    """A planned stage, timed; in a sweep its record (``stage.json``: what it computes, which
    finished run it reuses, its wall time) is kept in its own folder."""
    record = stage.root / "stage.json" if stage.root is not None else None
    if record is not None:
        stage.root.mkdir(parents=True, exist_ok=True)
        reused = placement.reused(stage.key)
        if not record.is_file():
            extra = {"reused": [str(p) for p in reused]} if reused else {}
            write_json(record, {"key": stage.key, **stage.identity, **extra})
        if reused:
            print(f"[dbd] {stage.name}: reusing the finished run in {reused.saved.parent}")
    t0 = time.perf_counter()
    title = STAGE_TITLES[stage.name]
    if run_stage(train, stage.args, stage.cfg):
        seconds = time.perf_counter() - t0
        timings.add(title, seconds)
        if record is not None:
            kept = json.loads(record.read_text())
            kept["wall_time_s"] = kept.get("wall_time_s", 0.0) + seconds
            write_json(record, kept)
    elif record is not None and title not in timings.seconds:
        kept = json.loads(record.read_text()).get("wall_time_s")  # run for another value
        if kept is not None:
            timings.add(title, kept, replace_it=True)


def evaluate_stage(stage: StagePlan, eval_cfg: dict, device) -> dict:
    """test.py's evaluation of the stage's latest model on ``eval_cfg``'s test sets; in a
    sweep the result is kept in the stage run's folder and reused while the model and the
    evaluation config stay the same."""
    ckpt = run_dirs(stage.cfg, *config_location(stage.args.config))[1] / "latest_model.pt"
    if stage.root is None:
        return evaluate_checkpoint(eval_cfg, ckpt, device)
    st = ckpt.stat()
    key = digest({"metrics": 2, "model": str(ckpt), "mtime_ns": st.st_mtime_ns, "size": st.st_size,
                  "test": {k: v for k, v in eval_cfg.items() if k not in RUN_FOLDER_KEYS}})
    cache = stage.root / "test.json"
    if cache.is_file():
        kept = json.loads(cache.read_text())
        if kept.get("key") == key:
            return kept["metrics"]
    metrics = evaluate_checkpoint(eval_cfg, ckpt, device)
    write_json(cache, {"key": key, "metrics": metrics})
    return metrics


def clean_model_stage(sup: StagePlan, overrides: list[Override], device: str,
                      quiet: bool) -> tuple[StageArgs, dict] | None:
    """The run an attack needs before any poisoned set (the label-consistent attack's clean
    model), when it has not been trained yet. It lives where its own config puts it, which
    is where the attack looks for it; it takes the experiment's unprefixed overrides."""
    needed = build_attack(sup.cfg["backdoor"], REPO_ROOT).prerequisite()
    if needed is None or needed[1].is_file():
        return None
    ovr = tuple(o for o in overrides if o.stage is None and o.key not in RUN_FOLDER_KEYS)
    args = StageArgs(needed[0], device=device, quiet=quiet, overrides=ovr)
    return args, apply_overrides(load_yaml(needed[0]), list(ovr))


def run_experiment(attack: str, profile: str, overrides: list[Override], placement: Placement,
                   out: Path, device, runners: StageRunners, quiet: bool = False,
                   clean_skip: tuple[Override, ...] = (),
                   template: str | None = None) -> ExperimentResult:
    """Train (or skip, or continue) the stages of one experiment and evaluate both models.
    ``clean_skip``: overrides not given to the attack's clean model (a sweep's value);
    ``template``: whose configs to run (a poisoned set made elsewhere: ``DATA_TEMPLATE``)."""
    dev = str(device)
    plan = plan_experiment(attack, profile, overrides, placement, dev, quiet, template)
    sup, pre, ft = plan["supervise"], plan["simclr"], plan["finetune"]
    timings = Timings(out / f"{attack}_timings.json")
    clean = clean_model_stage(sup, [o for o in overrides if o not in clean_skip], dev, quiet)
    if clean is not None:
        t0 = time.perf_counter()
        if run_stage(runners["supervise"], *clean):
            timings.add(CLEAN_MODEL_TITLE, time.perf_counter() - t0)
    for stage in (sup, pre, ft):
        _run_planned(runners[stage.name], stage, placement, timings)

    t0 = time.perf_counter()
    nd = evaluate_stage(sup, sup.cfg, device)
    dbd = evaluate_stage(ft, sup.cfg, device)
    timings.add(TEST_TITLE, time.perf_counter() - t0, replace_it=True)
    print(f"[dbd] {attack}: No Defense BA {100 * nd['BA']:.2f} ASR {100 * nd['ASR']:.2f} | "
          f"DBD BA {100 * dbd['BA']:.2f} ASR {100 * dbd['ASR']:.2f}")
    stages = {s.name: run_dirs(s.cfg, *config_location(s.args.config))[0] for s in plan.values()}
    pre_ckpt = run_dirs(pre.cfg, *config_location(pre.args.config))[1]
    features = feature_maps(sup.cfg, stages["supervise"], Path(nd["checkpoint"]), pre.cfg,
                            pre_ckpt / str(ft.cfg["pretrain_checkpoint"]), device)
    return ExperimentResult(nd, dbd, stages, ft.cfg["warmup"]["num_epochs"], timings.seconds,
                            {**experiment_setting(sup.cfg, stages["supervise"], nd),
                             "split": section(ft.cfg, Semi, "semi").split}, features)


def experiment_setting(sup_cfg: dict, sup_saved: Path, nd: dict) -> dict:
    """The leaderboard's description of an experiment (tools/report.py, leaderboard.csv)."""
    final = sup_saved / "final_metrics.json"
    record = json.loads(final.read_text()) if final.is_file() else {}
    train_size = record.get("train_size")
    kind = check_dataset_kind(sup_cfg)
    ratio = (sup_cfg.get("backdoor") or {}).get("poison_ratio")
    if kind == "poisoned":  # the set's own share of poisoned samples, where it says
        ratio = round(record["poisoned"] / train_size, 4) if record.get("poisoned") else None
    return {"dataset": kind, "model": next(iter(sup_cfg["network"])), "poison_ratio": ratio,
            "train_size": train_size, "test_size": nd.get("clean_images"),
            "target_label": (sup_cfg.get("backdoor") or {}).get("target_label"),
            "classes": class_names(sup_cfg)}
