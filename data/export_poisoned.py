"""Write a poisoned set this project makes (a supervise config's data, subsets, attack and
poison index) in the ``.npz`` layout of ``data.poisoned_set``, so that DBD runs on it as on
a set made elsewhere (``dbd.py --data``), or another toolkit reads it.

    python -m data.export_poisoned --config config/supervise/badnets/cifar10_resnet18/quick.yaml OUT.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

from utils.cli import run_main
from utils.config import apply_overrides, load_yaml, parse_override
from utils.errors import UserError

from .build import (
    build_poison_train,
    build_test_sets,
    class_names,
    load_poison_data,
    poison_index,
    transform_for,
)
from .cifar import check_dataset_kind
from .poisoned_set import PoisonedSet, save_npz


def export(cfg: dict) -> PoisonedSet:
    """The training set as No Defense trains on it (triggered, relabelled; the poison index
    drawn from the config's seed), the clean test set and the triggered test set."""
    if check_dataset_kind(cfg) != "cifar10":
        raise UserError("export takes a CIFAR-10 config (the images are kept as arrays)")
    data = load_poison_data(cfg)
    idx = poison_index(cfg, data.train_targets, None, lambda message: None)
    tf = transform_for(cfg, "test")  # the stored images: transforms act per batch, later
    train = build_poison_train(cfg, idx, data.train_images, data.train_targets, tf, data.bd)
    clean, triggered = build_test_sets(cfg, data.bd, data.test_images, data.test_targets)
    return PoisonedSet(train.data, train.targets, idx == 1, train.origin, clean.data,
                       clean.origin, triggered.data, triggered.origin,
                       int(cfg["backdoor"]["target_label"]), class_names(cfg))


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a poisoned set in the .npz layout.")
    p.add_argument("--config", required=True, help="a supervise config (data, attack)")
    p.add_argument("out", type=Path, help="the .npz file to write")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   type=parse_override)
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    ps = export(apply_overrides(load_yaml(args.config), args.overrides))
    save_npz(args.out, ps, overwrite=args.overwrite)
    print(f"{ps} written to {args.out}")


if __name__ == "__main__":
    run_main(main)
