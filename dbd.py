"""The whole experiment in one command: No Defense, DBD (SimCLR, then warm-up + split + MixMatch),
the evaluation of both models, and a report with pictures.

    python dbd.py --attack badnets --profile quick      # CPU-sized, on the real CIFAR-10
    python dbd.py --attack all --profile paper --device cuda
    python dbd.py --data poisoned.npz                    # a poisoned set made elsewhere

Each stage runs through its script's own code (supervise.py, simclr.py, mixmatch_finetune.py;
the evaluation is test.py's). Stages whose results exist are skipped and an interrupted stage
continues from its latest checkpoint, so running the command again after a kill continues the
experiment.

    python dbd.py --attack badnets --sweep finetune:semi.epsilon=0.3,0.5,0.7

runs one experiment per value of one config key; each stage run is named by what it computes
(its resolved config and the runs it builds on), so the values share the stages the key leaves
unchanged (docs/usage.md, "Sweeps").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mixmatch_finetune
import simclr
import supervise
from data.attacks import unavailable
from data.cifar import check_cifar_files, find_batches_dir
from data.download import DownloadError, download_cifar10
from pipeline.experiment import run_experiment
from pipeline.plan import (
    DATA_TEMPLATE,
    PROFILES,
    SharedFolders,
    available_attacks,
    given_set_overrides,
    stage_configs,
    stage_overrides,
)
from pipeline.sweep import parse_sweep, run_sweep
from tools.report import write_report
from utils.cli import run_main
from utils.config import load_yaml, parse_override
from utils.errors import DatasetError, UserError
from utils.paths import REPO_ROOT
from utils.setup import resolve_device

RUNNERS = {"supervise": supervise.train, "simclr": simclr.train,
           "finetune": mixmatch_finetune.train}
CONTINUE_HINT = ("run the same command again to continue (finished stages are skipped, the "
                 "interrupted one continues)")


def parse(argv):
    p = argparse.ArgumentParser(description="Run No Defense and DBD for an attack and report.")
    p.add_argument("--attack", help="badnets, blend, blend_random, ... or all")
    p.add_argument("--data", metavar="PATH",
                   help="instead of --attack: a poisoned set made elsewhere (a .npz file or a "
                        "folder, docs/usage.md \"Your own poisoned data\"), run with the "
                        "profile's BadNets configs")
    p.add_argument("--name", help="with --data: the experiment's name in the report "
                                  "(default: the file's name)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                   help="paper: the original settings; quick: about 14 min on a laptop CPU "
                        "(default); cpu: the larger CPU-sized run (about 85 min)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dataset-dir", default=None,
                   help="CIFAR-10 folder for every stage (downloaded there when absent)")
    p.add_argument("--out", default=None, type=Path,
                   help="experiment folder (default experiments/<attack>-<profile>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   type=parse_override,
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
    """The CIFAR-10 batches folder at ``dataset_dir``, downloaded there when absent."""
    d = Path(dataset_dir).expanduser()
    try:
        return str(check_cifar_files(d))
    except DatasetError:
        pass
    into = d if d.name != "cifar-10-batches-py" else d.parent
    print(f"CIFAR-10 not found in {d}: downloading it there")
    try:
        return str(download_cifar10(into))
    except DownloadError as e:
        raise UserError(
            f"could not download CIFAR-10 ({e}); fetch "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz by hand and unpack it in "
            f"{into}") from None


def chosen_attacks(attack: str, profile: str) -> list[str]:
    """The attacks to run: one by name, or every attack with configs for the profile whose
    files are at hand (an attack says what it misses, e.g. a trigger to fetch)."""
    attacks = available_attacks(profile)
    if attack != "all":
        if attack not in attacks:
            raise UserError(f"--attack {attack}: no {profile} configs for it "
                            f"(available: {', '.join(attacks)}, or all)")
        return [attack]
    chosen = []
    for name in attacks:
        cfg = load_yaml(REPO_ROOT / stage_configs(name, profile)["supervise"])
        reason = unavailable(cfg["backdoor"], REPO_ROOT)
        if reason:
            print(f"[dbd] skipping {name}: {reason}")
        else:
            chosen.append(name)
    return chosen


def main(argv=None):
    args = parse(argv)
    if (args.attack is None) == (args.data is None):
        raise UserError("give --attack NAME (this project's poisoning) or --data PATH (a "
                        "poisoned set made elsewhere), one of them")
    sweep = parse_sweep(args.sweep) if args.sweep else None
    if sweep and args.attack == "all":
        raise UserError("--sweep runs one attack: give --attack NAME, not all")
    if args.reuse and not sweep:
        raise UserError("--reuse goes with --sweep (a plain run continues in its own --out)")
    device = resolve_device(args.device)
    stage_overrides(args.overrides)  # a bad stage prefix is reported before anything runs
    overrides = list(args.overrides)
    template = None
    if args.data:
        if args.dataset_dir:
            raise UserError("--data names the dataset itself: drop --dataset-dir")
        chosen, template = [args.name or Path(args.data).stem], DATA_TEMPLATE
        overrides = given_set_overrides(args.data, args.profile) + overrides
        args.attack = chosen[0]
    else:
        chosen = chosen_attacks(args.attack, args.profile)
    if args.dataset_dir:
        find_batches_dir(args.dataset_dir)
        overrides.insert(0, parse_override(f"dataset_dir={ensure_dataset(args.dataset_dir)}"))
    if sweep:
        out = args.out or Path(f"experiments/{args.attack}-{args.profile}-sweep-{sweep.name}")
        run_sweep(args.attack, args.profile, overrides, sweep, out, device, RUNNERS,
                  args.reuse, args.quiet, template)
        print(f"[dbd] sweep report: {out / 'sweep.md'}")
        return
    out = args.out or Path(f"experiments/{args.attack}-{args.profile}")
    out.mkdir(parents=True, exist_ok=True)
    results = {a: run_experiment(a, args.profile, overrides, SharedFolders(out), out, device,
                                 RUNNERS, args.quiet, template=template) for a in chosen}
    write_report(out, args.profile, results)
    print(f"[dbd] report: {out / 'report.md'}")


if __name__ == "__main__":
    run_main(main, continue_hint=CONTINUE_HINT)
