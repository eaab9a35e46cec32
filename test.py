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

from data.build import (
    backdoor_for,
    backdoor_settings,
    build_test_sets,
    loader_settings,
    make_eval_loader,
    transform_for,
)
from data.cifar import check_dataset_kind
from data.transforms import Normalizer
from model import build_linear_model
from utils.checkpoint import load_checkpoint, load_model_state
from utils.cli import run_main
from utils.config import apply_overrides, load_yaml
from utils.errors import UserError
from utils.loops import evaluate
from utils.setup import resolve_device, seed_everything
from utils.speed import Speed


def parse(argv):
    p = argparse.ArgumentParser(description="Report BA, ASR and RA of a checkpoint.")
    p.add_argument("--config", required=True,
                   help="the supervise config of the attack (data, trigger, network)")
    p.add_argument("--ckpt-dir", default="checkpoint", help="folder holding the checkpoint")
    p.add_argument("--resume", required=True, help="checkpoint file name, e.g. latest_model.pt")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--gpu", default=None, help="CUDA device index (the original's option)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write the metrics as JSON to FILE (or stdout with no FILE)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def evaluate_checkpoint(cfg: dict, ckpt_path: Path, device, quiet=True) -> dict:
    check_dataset_kind(cfg)
    backdoor_settings(cfg)
    ckpt = load_checkpoint(ckpt_path)
    model = build_linear_model(cfg)
    load_model_state(model, ckpt["model_state_dict"], ckpt_path)
    speed = Speed({"amp": "off", "channels_last": True}, device)
    model = speed.prepare(model)
    bd = backdoor_for(cfg)  # the saved WaNet field, image-size triggers on image folders
    clean_set, poison_set = build_test_sets(cfg, bd)
    ls = loader_settings(cfg.get("test_loader") or cfg["loader"], "loader")
    tf = transform_for(cfg, "test")
    norm = Normalizer(tf.mean, tf.std, device)
    path = speed.data_path
    clean = evaluate(model, make_eval_loader(clean_set, ls, device=device, data_path=path), norm,
                     speed, quiet=quiet, desc="clean test")
    poison = evaluate(model, make_eval_loader(poison_set, ls, device=device, data_path=path),
                      norm, speed, quiet=quiet, desc="poison test")
    return {"checkpoint": str(ckpt_path), "epoch": ckpt.get("epoch"),
            "BA": clean["acc"], "ASR": poison["acc"], "RA": poison["origin acc"],
            "clean_loss": clean["loss"], "poison_loss": poison["loss"],
            "clean_images": len(clean_set), "poison_images": len(poison_set)}


def main(argv=None):
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    log = logging.getLogger("test")
    if args.quiet:
        log.setLevel(logging.WARNING)
    cfg = apply_overrides(load_yaml(args.config), args.overrides)
    device = resolve_device(args.device, args.gpu)
    seed_everything(cfg)
    path = Path(args.resume)
    if not path.is_absolute() and path.parent == Path("."):
        path = Path(args.ckpt_dir) / args.resume
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (check --ckpt-dir and --resume)")
    log.info(f"Load checkpoint {path} on {device}")
    m = evaluate_checkpoint(cfg, path, device, quiet=args.quiet)
    log.info(f"Checkpoint epoch: {m['epoch']}")
    rows = [("BA", m["BA"], f"clean test accuracy ({m['clean_images']} images)"),
            ("ASR", m["ASR"], f"triggered non-target images -> target ({m['poison_images']})"),
            ("RA", m["RA"], "triggered non-target images -> true label")]
    if args.json == "-":
        print(json.dumps(m, indent=2))
    else:
        print("| metric | value (%) | what |")
        print("|--------|-----------|------|")
        for name, v, what in rows:
            print(f"| {name:<6} | {100 * v:9.2f} | {what} |")
        if args.json:
            Path(args.json).write_text(json.dumps(m, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
