"""The evaluation of a checkpoint (test.py, dbd.py's report): BA on the clean test set, ASR
and RA on the triggered non-target test images, sample-weighted, in one metric vocabulary;
and ASR's floor, the share of the same non-target images sent to the target WITHOUT the
trigger (the clean test images of the other classes), and the trigger's lift, ASR − floor: a
weak model confuses other classes with the target, and ASR alone cannot tell that from a
backdoor. (For a poisoned set made elsewhere, whose triggered images come apart from its
clean ones, the floor is taken on its clean test images of the other classes.)"""

from __future__ import annotations

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
from utils.loops import evaluate
from utils.speed import Speed

# What each metric is, as test.py's table and the reports say it.
METRICS = {"BA": "clean test accuracy",
           "ASR": "triggered non-target images -> target",
           "RA": "triggered non-target images -> true label",
           "floor": "the same images untriggered -> target",
           "lift": "ASR - floor: what the trigger adds"}


def evaluate_checkpoint(cfg: dict, ckpt_path: Path, device, quiet: bool = True) -> dict:
    """BA, ASR and RA of the linear model in ``ckpt_path`` on the test sets of ``cfg`` (a
    supervise config: data, attack, network), with its losses and image counts."""
    check_dataset_kind(cfg)
    backdoor_settings(cfg)
    ckpt = load_checkpoint(ckpt_path)
    model = build_linear_model(cfg)
    load_model_state(model, ckpt["model_state_dict"], ckpt_path)
    speed = Speed({"amp": "off", "channels_last": True}, device)
    model = speed.prepare(model)
    bd = backdoor_for(cfg)  # the saved WaNet field, image-size triggers on image folders
    target = backdoor_settings(cfg).target_label
    clean_set, poison_set = build_test_sets(cfg, bd)
    ls = loader_settings(cfg.get("test_loader") or cfg["loader"], "loader")
    tf = transform_for(cfg, "test")
    norm = Normalizer(tf.mean, tf.std, device)
    path = speed.data_path
    clean = evaluate(model, make_eval_loader(clean_set, ls, device=device, data_path=path), norm,
                     speed, quiet=quiet, desc="clean test", target_label=target)
    poison = evaluate(model, make_eval_loader(poison_set, ls, device=device, data_path=path),
                      norm, speed, quiet=quiet, desc="poison test")
    return {"checkpoint": str(ckpt_path), "epoch": ckpt.get("epoch"),
            "BA": clean["acc"], "ASR": poison["acc"], "RA": poison["RA"],
            "floor": clean["to_target"], "lift": poison["acc"] - clean["to_target"],
            "clean_loss": clean["loss"], "poison_loss": poison["loss"],
            "clean_images": len(clean_set), "poison_images": len(poison_set)}
