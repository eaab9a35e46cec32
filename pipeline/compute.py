"""What an experiment costs in machine-independent units: images passed through the network
and floating-point operations, per stage, from the stages' resolved configs (the same plan as
``dbd.py``, ``--set`` included).

    python -m pipeline.compute --attack badnets --profile cpu [--set KEY=VALUE ...]
    python -m pipeline.compute --curve docs/compute_points.csv --plot docs/compute_curve.png

Counted (docs/compute.md): No Defense trains ``num_epochs`` x N images; SimCLR trains two
views of each image per epoch; the warm-up passes N images forward through the backbone per
epoch (only the linear layer learns); each MixMatch epoch scores the N training images
(forward) for its split, then per step guesses labels on 2B unlabelled images (forward) and
trains on B labelled + 2B unlabelled mixed images. A training pass costs three forward
passes (forward, and a backward of about twice its operations); the heads (linear, SimCLR's
projection) are left out, under 1 % of a ResNet-18's operations. Per-epoch test evaluations
are monitoring, not the algorithm, and are not counted. N is ``train_subset`` or the
dataset's training-set size.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from data.cifar import check_dataset_kind
from model import build_backbone
from utils.cli import run_main
from utils.config import parse_override
from utils.errors import UserError
from utils.schema import Semi, Warmup, section

from .plan import SharedFolders, plan_experiment

CIFAR_TRAIN = 50_000
TRAIN_PASS = 3  # a training pass in forward-pass units


def forward_flops(cfg: dict, size: int = 32) -> int:
    """Floating-point operations (2 per multiply-add) of one size x size image through the
    backbone (the profiles' images are 32 x 32)."""
    backbone = build_backbone(cfg["network"]).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        backbone(torch.zeros(1, 3, size, size))
    return int(counter.get_total_flops())


def train_size(cfg: dict, given: int | None) -> int:
    """N: given, the config's ``train_subset``, or CIFAR-10's training set."""
    if given:
        return given
    if cfg.get("train_subset"):
        return int(cfg["train_subset"])
    if check_dataset_kind(cfg) == "cifar10":
        return CIFAR_TRAIN
    raise UserError("the training-set size is not in the config: give --train-size N")


def stage_passes(stages: dict[str, dict], n: int) -> dict[str, dict[str, int]]:
    """Per stage: images trained (forward + backward) and images passed forward only."""
    sup, pre, ft = stages["supervise"], stages["simclr"], stages["finetune"]
    w, s = section(ft, Warmup, "warmup"), section(ft, Semi, "semi")
    b = s.loader.batch_size
    steps = s.num_epochs * s.mixmatch.train_iteration
    return {
        "No Defense": {"train": int(sup["num_epochs"]) * n, "forward": 0},
        "SimCLR": {"train": 2 * int(pre["num_epochs"]) * n, "forward": 0},
        "warm-up": {"train": 0, "forward": w.num_epochs * n},
        "split": {"train": 0, "forward": s.num_epochs * n},
        "MixMatch": {"train": steps * 3 * b, "forward": steps * 2 * b},
    }


def experiment_compute(attack: str, profile: str, sets: list[str],
                       n: int | None = None) -> dict:
    """The compute of one experiment: per-stage passes, FLOPs per image, totals."""
    # planning names the run folders and creates none
    plan = plan_experiment(attack, profile, [parse_override(x) for x in sets],
                           SharedFolders(Path("experiments")), "cpu", True)
    cfgs = {name: p.cfg for name, p in plan.items()}
    n = train_size(cfgs["supervise"], n)
    passes = stage_passes(cfgs, n)
    per_image = forward_flops(cfgs["supervise"])
    flops = {k: per_image * (TRAIN_PASS * v["train"] + v["forward"]) for k, v in passes.items()}
    dbd = sum(v for k, v in flops.items() if k != "No Defense")
    return {"train_size": n, "forward_flops_per_image": per_image, "passes": passes,
            "flops": flops, "dbd_flops": dbd, "no_defense_flops": flops["No Defense"]}


def print_compute(c: dict) -> None:
    print(f"N = {c['train_size']:,} training images; one image forward: "
          f"{c['forward_flops_per_image'] / 1e6:.1f} MFLOP")
    print(f"{'stage':12s} {'trained':>14s} {'forward only':>14s} {'PFLOP':>9s}")
    for k, v in c["passes"].items():
        print(f"{k:12s} {v['train']:>14,} {v['forward']:>14,} {c['flops'][k] / 1e15:>9.3f}")
    print(f"DBD in all: {c['dbd_flops'] / 1e15:.3f} PFLOP "
          f"({c['dbd_flops'] / c['no_defense_flops']:.2f} x No Defense)")


# ---- The curve: measured points (a CSV) against their compute --------------------------------

POINT_COLUMNS = ("label", "attack", "profile", "sets", "no_defense_ba", "dbd_ba", "dbd_asr")


def read_points(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(row for row in f if not row.startswith("#"))]
    if not rows or not set(POINT_COLUMNS) <= set(rows[0]):
        raise UserError(f"{path}: expected the columns {', '.join(POINT_COLUMNS)}")
    return rows


def curve(points: list[dict]) -> list[dict]:
    out = []
    for p in points:
        sets = [x.strip() for x in p["sets"].split(";") if x.strip()]
        c = experiment_compute(p["attack"], p["profile"], sets)
        out.append({**p, "dbd_pflop": c["dbd_flops"] / 1e15,
                    "no_defense_pflop": c["no_defense_flops"] / 1e15,
                    "ba_gap": float(p["no_defense_ba"]) - float(p["dbd_ba"])})
    return sorted(out, key=lambda r: r["dbd_pflop"])


PAPER_GAP = 95.13 - 92.50  # the authors' BadNets BA cost (docs/original.md §10.1)


def fit_trend(rows: list[dict]) -> tuple[float, float, float]:
    """Least squares of the BA gap on log2(DBD PFLOP): (slope per doubling, mean log2 x,
    mean gap)."""
    xs = [math.log2(r["dbd_pflop"]) for r in rows]
    ys = [r["ba_gap"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return slope, mx, my


def reaching(trend, gap: float = PAPER_GAP) -> float | None:
    """The compute (PFLOP) at which the trend's line reaches ``gap``; None if it rises."""
    slope, mx, my = trend
    return 2 ** (mx + (gap - my) / slope) if slope < 0 else None


def plot_curve(rows: list[dict], path: Path, trend, paper_pflop: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    x = [r["dbd_pflop"] for r in rows]
    for ax, key, name in ((a1, "ba_gap", "BA gap (No Defense - DBD), points"),
                          (a2, "dbd_asr", "DBD ASR, %")):
        ax.plot(x, [float(r[key]) for r in rows], "o")
        for r in rows:
            ax.annotate(r["label"], (r["dbd_pflop"], float(r[key])), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel="DBD compute, PFLOP (log)", ylabel=name)
        ax.grid(alpha=0.3)
    slope, mx, my = trend
    end = max(paper_pflop, reaching(trend) or 0) * 1.3
    xt = [min(x) * 2 ** (i / 10) for i in range(int(10 * math.log2(end / min(x))) + 1)]
    line = [(v, my + slope * (math.log2(v) - mx)) for v in xt]
    line = [(v, g) for v, g in line if g >= 0]  # a gap below 0 is not a prediction
    a1.plot(*zip(*line), "--", c="C1", lw=1,
            label=f"trend: {slope:.1f} points per doubling (extrapolated)")
    a1.axhline(PAPER_GAP, ls=":", c="grey", lw=1, label=f"the paper's gap, {PAPER_GAP:.2f}")
    a1.axvline(paper_pflop, ls="-.", c="C2", lw=1,
               label=f"the paper's setting (50,000 images, width 64): {paper_pflop:.0f} PFLOP")
    a1.set_ylim(bottom=-1)
    a1.legend(fontsize=7, loc="lower left")
    fig.suptitle("DBD's BA gap and ASR against its compute (BadNets, 20,000 CIFAR-10 images, "
                 "width 16, the original's algorithm; No Defense fixed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--attack", default="badnets")
    p.add_argument("--profile", default="quick", choices=("quick", "cpu", "paper"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="as dbd.py's --set (stage prefixes supervise:, simclr:, finetune:)")
    p.add_argument("--train-size", type=int, help="N, where the config does not say it")
    p.add_argument("--curve", type=Path, help="a CSV of measured points (docs/compute.md)")
    p.add_argument("--plot", type=Path, help="with --curve: write the plot here")
    args = p.parse_args(argv)
    if args.curve is None:
        print_compute(experiment_compute(args.attack, args.profile, args.set, args.train_size))
        return
    rows = curve(read_points(args.curve))
    print("| point | DBD PFLOP | x No Defense | BA gap | DBD ASR |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = r["dbd_pflop"] / r["no_defense_pflop"]
        print(f"| {r['label']} | {r['dbd_pflop']:.3f} | {ratio:.2f} | {r['ba_gap']:.2f} | "
              f"{float(r['dbd_asr']):.2f} |")
    if len(rows) < 2:
        return
    trend = fit_trend(rows)
    print(f"trend: the BA gap changes by {trend[0]:.2f} points per doubling of DBD's compute")
    reach = reaching(trend)
    if reach is not None:
        print(f"the trend reaches the paper's gap ({PAPER_GAP:.2f}) at {reach:.2f} PFLOP "
              f"({reach / rows[-1]['dbd_pflop']:.0f} x the largest point)")
    paper = experiment_compute("badnets", "paper", [])["dbd_flops"] / 1e15
    print(f"the paper's setting: {paper:.0f} PFLOP")
    if args.plot:
        plot_curve(rows, args.plot, trend, paper)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    run_main(main)
