"""Evaluate a checkpoint: BA (clean accuracy), ASR (triggered non-target images classified as the
target) and RA (the same images classified as their true class), sample-weighted.

    python test.py --config config/supervise/badnets/cifar10_resnet18/example.yaml \\
                   --ckpt-dir storage/supervise/badnets/cifar10_resnet18/example/checkpoint \\
                   --resume latest_model.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.evaluate import METRICS, evaluate_checkpoint
from utils.cli import run_main
from utils.config import apply_overrides, load_yaml, parse_override
from utils.errors import UserError
from utils.setup import resolve_device, resume_path, seed_everything


def parse(argv):
    p = argparse.ArgumentParser(description="Report BA, ASR and RA of a checkpoint.")
    p.add_argument("--config", required=True,
                   help="the supervise config of the attack (data, trigger, network)")
    p.add_argument("--ckpt-dir", default="checkpoint", help="folder holding the checkpoint")
    p.add_argument("--resume", required=True, help="checkpoint file name, e.g. latest_model.pt")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--gpu", default=None, help="CUDA device index (the original's option)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   type=parse_override)
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write the metrics as JSON to FILE (or stdout with no FILE)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    log = logging.getLogger("test")
    if args.quiet:
        log.setLevel(logging.WARNING)
    cfg = apply_overrides(load_yaml(args.config), args.overrides)
    device = resolve_device(args.device, args.gpu)
    seed_everything(cfg)
    path = resume_path(Path(args.ckpt_dir), args.resume)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (check --ckpt-dir and --resume)")
    log.info(f"Load checkpoint {path} on {device}")
    m = evaluate_checkpoint(cfg, path, device, quiet=args.quiet)
    log.info(f"Checkpoint epoch: {m['epoch']}")
    counts = {"BA": f"{m['clean_images']} images", "ASR": f"{m['poison_images']}"}
    if args.json == "-":
        print(json.dumps(m, indent=2))
    else:
        print("| metric | value (%) | what |")
        print("|--------|-----------|------|")
        for name, what in METRICS.items():
            n = f" ({counts[name]})" if name in counts else ""
            print(f"| {name:<6} | {100 * m[name]:9.2f} | {what}{n} |")
        if args.json:
            Path(args.json).write_text(json.dumps(m, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
