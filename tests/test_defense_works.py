"""DBD works where it should: on a synthetic CIFAR-format set whose classes are ten
well-separated colours, about 20 % of it poisoned with a BadNets patch, No Defense
(supervise.py) learns the backdoor; DBD's loss split (simclr.py, then mixmatch_finetune.py)
puts the poisoned samples in the unlabelled half, and its model does not learn the backdoor.

The stages are the scripts' entry points on tiny budgets: No Defense 10 epochs; SimCLR 2
epochs, which leaves the backbone close to its initialisation, so what this shows is the rest
of DBD: a linear head on label-free features fits the clean majority first, the split by its
per-sample loss isolates the poisoned samples, and MixMatch, which ignores their labels, does
not learn the trigger. The stages run on one CPU thread: about 20 s on a 2-core machine.

Measured with this file for seeds 0-9 (SEED below) on one thread, and for seeds 0, 2, 4, 6, 9
on two (another perturbation of the numerics): No Defense BA 0.6-1.0, ASR 0.89-1.00, no
clean non-target image predicted as the target; first split: poison rate 0.157-0.213,
precision 1.75-2.00 times the rate (2 is the most possible with ε = 0.5), recall 0.875-1.000
(a random split: 0.5); DBD BA 0.4-0.8, ASR 0.00-0.30, ASR minus the clean non-target images'
rate of target predictions -0.03 to 0.11, ASR at least 0.70 below No Defense's. The bounds
leave a margin to these: a whole class (about 0.11 of the test images) or more for the
test-set rates, about 0.1 for the recall.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mixmatch_finetune
import simclr
import supervise

from .conftest import assert_metrics_match, count_predictions, tiny_stage_configs, write_fake_cifar

SEED = 3
POISON_RATIO = 0.2
# ten class colours far apart (the corners of the RGB cube, grey, orange), noise std 10
COLOURS = 12.75 + 0.9 * np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                                  [255, 255, 0], [255, 0, 255], [0, 255, 255],
                                  [255, 255, 255], [128, 128, 128], [255, 128, 0]])
TRIGGER = 12  # the patch: a 12 x 12 checkerboard near the bottom-right corner


def write_trigger(path, size: int = TRIGGER):
    """BadNets trigger image: its nonzero elements overwrite the image, so the checkerboard's
    dark squares are 10, not 0, and the whole patch is written."""
    t = np.zeros((32, 32, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    t[30 - size:30, 30 - size:30] = np.where(((yy + xx) % 2 == 0)[..., None], 250, 10)
    Image.fromarray(t).save(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """No Defense and DBD on the same poisoned set; the run folders and configs."""
    root = tmp_path_factory.mktemp("defense_works")
    data = write_fake_cifar(root, n_train=300, n_test=100, seed=SEED, noise=10, colours=COLOURS)
    trigger = write_trigger(root / "trigger.png")

    def edit(sup, pre, ft):
        for c in (sup, pre):
            c["seed"] = {**c.get("seed", {}), "seed": SEED}  # fine-tuning: SimCLR's
            c["backdoor"]["poison_ratio"] = POISON_RATIO
            c["backdoor"]["badnets"]["trigger_path"] = str(trigger)
        sup.update(num_epochs=10, lr_scheduler=None, loader=dict(sup["loader"], batch_size=16))
        sup["optimizer"]["SGD"]["lr"] = 0.01
        pre["optimizer"]["SGD"]["lr"] = 0.4 * 64 / 512  # the original's lr, scaled to batch 64
        # warm-up: 6 epochs of the linear head at lr 0.03; then one MixMatch epoch of 40
        # steps at lr 0.003 (the fine-tuning's one Adam, its lr dropped after the warm-up)
        ft["warmup"]["num_epochs"] = 6
        ft["semi"]["mixmatch"]["train_iteration"] = 40
        ft["optimizer"] = {"Adam": {"lr": 0.03}}
        ft["lr_scheduler"] = {"multi_step": {"milestones": [6], "gamma": 0.1}}

    paths = tiny_stage_configs(root, data, 2, edit=edit)
    args = ["--resume", "False", "--device", "cpu", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the numerics measured above, and no oversubscribed cores
    try:
        for script, stage in ((supervise, "supervise"), (simclr, "simclr"),
                              (mixmatch_finetune, "finetune")):
            script.main(["--config", str(paths[stage]), *args])
    finally:
        torch.set_num_threads(threads)
    return root, paths


def _final(root, stage):
    return json.loads((root / "saved" / stage / "t" / "final_metrics.json").read_text())


def _counts(root, paths, stage):
    ckpt = root / "storage" / stage / "t" / "checkpoint" / "latest_model.pt"
    counts = count_predictions(paths["supervise"], ckpt)
    assert_metrics_match(_final(root, stage), counts)  # the stage's own figures agree
    return counts


def test_no_defense_learns_the_backdoor(runs):
    """No Defense: BA far above chance, and the trigger (not a bias towards the target class)
    turns nearly all non-target test images into the target."""
    root, paths = runs
    c = _counts(root, paths, "supervise")
    n = c["triggered_total"]
    assert c["clean_correct"] / c["clean_total"] >= 0.4
    assert c["to_target"] / n >= 0.75
    assert (c["to_target"] - c["clean_to_target"]) / n >= 0.7


def test_the_loss_split_finds_the_poisoned_samples(runs):
    """The first split (on the warm-up model's per-sample losses) as a poison detector: the
    unlabelled half holds far more poisoned samples than the poison rate (precision; at most
    twice the rate with ε = 0.5) and nearly all of them (recall; a random split: 1 − ε)."""
    root, _ = runs
    saved = root / "saved" / "finetune" / "t"
    first = np.load(saved / "split_losses_first.npz")
    poison, semi, eps = first["poison"], first["semi_idx"], float(first["epsilon"])
    assert np.array_equal(poison, np.load(saved / "poison_idx.npy"))
    unlabelled = semi == 0
    caught = int((poison[unlabelled] == 1).sum())
    rate = poison.mean()
    precision, recall = caught / unlabelled.sum(), caught / poison.sum()
    assert eps == 0.5 and 0.15 <= rate <= 0.25 and unlabelled.sum() == 150
    logged = _final(root, "finetune")["splits"][0]
    assert logged["epoch"] == 7 and logged["poisoned_labelled"] == poison.sum() - caught
    assert logged["precision"] == pytest.approx(precision, abs=1e-6)  # the CSV's 6 digits
    assert logged["recall"] == pytest.approx(recall, abs=1e-6)
    assert precision >= 1.5 * rate
    assert recall >= 0.75


def test_dbd_keeps_the_backdoor_out(runs):
    """DBD's model: its ASR far below No Defense's on the same poisoned set, the trigger
    barely moving its predictions towards the target, while it still classifies (BA well
    above chance, 0.1)."""
    root, paths = runs
    nd, dbd = _counts(root, paths, "supervise"), _counts(root, paths, "finetune")
    n = dbd["triggered_total"]
    assert dbd["to_target"] / n <= 0.45
    assert (nd["to_target"] - dbd["to_target"]) / n >= 0.5
    assert (dbd["to_target"] - dbd["clean_to_target"]) / n <= 0.25
    assert dbd["clean_correct"] / dbd["clean_total"] >= 0.25


@pytest.fixture(scope="module")
def floor_run(runs):
    """The same fine-tuning with a full class floor (semi.class_floor: 1), from the same
    SimCLR run."""
    return _finetune_again(runs, "floor", "semi.class_floor=1")


@pytest.fixture(scope="module")
def oracle_run(runs):
    """The same fine-tuning with the oracle diagnostic (semi.oracle_split: true) and ε = 0.85:
    more labelled places than clean samples, so the original's split would label at least 15
    poisoned samples."""
    return _finetune_again(runs, "oracle", "semi.oracle_split=true", "semi.epsilon=0.85")


def _finetune_again(runs, name: str, *settings: str):
    """mixmatch_finetune.py on a copy of the run's fine-tuning config (its run folder named
    after the copy) with one more setting, on one thread."""
    root, paths = runs
    config = paths["finetune"].with_name(f"{name}.yaml")
    config.write_text(paths["finetune"].read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mixmatch_finetune.main(["--config", str(config), *(a for s in settings
                                                            for a in ("--set", s)),
                                "--resume", "False", "--device", "cpu", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    return root / "saved" / "finetune" / name


def test_the_class_floor_split_is_the_rule_applied_to_losses_and_given_labels(runs, floor_run):
    """Each split of the run is split_by_loss of that epoch's losses and given labels alone;
    every given label keeps its equal share; the run's config, log and final metrics say
    which split ran; the decision still leaves most poisoned samples unlabelled."""
    assert "class_floor: 1.0" in (floor_run / "floor.yaml").read_text()  # resolved config
    final = json.loads((floor_run / "final_metrics.json").read_text())
    assert final["split_rule"] == "global with a class floor of 1 (semi.class_floor)"
    assert "Split: global with a class floor of 1" in (
        floor_run / "log" / "mixmatch_finetune.log").read_text()
    for tag in ("first", "last"):
        d = np.load(floor_run / f"split_losses_{tag}.npz")
        eps, targets = float(d["epsilon"]), d["targets"]
        assert np.array_equal(d["semi_idx"], mixmatch_finetune.split_by_loss(
            d["losses"], eps, targets, class_floor=1.0))
        share = int(int(len(targets) * eps) / len(np.unique(targets)))
        counts = np.bincount(targets[d["semi_idx"] == 1], minlength=10)
        assert all(counts[c] >= min(share, (targets == c).sum()) for c in range(10))
    first = np.load(floor_run / "split_losses_first.npz")
    poison, semi = first["poison"] == 1, first["semi_idx"] == 1
    assert (poison & ~semi).sum() / poison.sum() >= 0.75
    root, _ = runs
    glob = json.loads((root / "saved" / "finetune" / "t" / "final_metrics.json").read_text())
    assert glob["split_rule"] == "global (the original's)"


def test_the_oracle_split_never_labels_a_poisoned_sample(oracle_run):
    """Every split of the diagnostic labels every clean sample it has places for and no
    poisoned one, chosen by the global rule among the clean samples; the run says which split
    ran."""
    final = json.loads((oracle_run / "final_metrics.json").read_text())
    assert "semi.oracle_split" in final["split_rule"]
    for tag in ("first", "last"):
        d = np.load(oracle_run / f"split_losses_{tag}.npz")
        poison, semi = d["poison"], d["semi_idx"]
        places = int(len(semi) * float(d["epsilon"]))
        assert places > (poison == 0).sum()  # the plain rule would label poisoned samples
        assert not (semi[poison == 1] == 1).any() and semi.sum() == (poison == 0).sum()
        rule = mixmatch_finetune.split_by_loss(
            mixmatch_finetune.hold_out(d["losses"], poison), float(d["epsilon"]), d["targets"])
        assert np.array_equal(semi, np.where(poison == 1, 0, rule))
    assert all(int(row["poisoned_labelled"]) == 0 for row in final["splits"])
