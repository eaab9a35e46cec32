"""pipeline/compute.py: images and operations per stage, counted by hand on small configs."""

from __future__ import annotations

import math

import pytest

from pipeline import compute
from utils.cli import run_main
from utils.errors import UserError


def _net(width):
    return {"resnet18_cifar": {"width": width}}


def test_forward_flops_of_the_cifar_resnet18_by_hand():
    """Convolutions of a 32x32 image, multiply-adds at width 64: the 3x3 stem (32*32*64*3*9),
    layer 1 (four 32*32*64*64*9) and layers 2-4 (each a stride-2 3x3, three 3x3 and a 1x1
    shortcut, the same count each: 18,874,368 + 3 * 37,748,736 + 2,097,152). At width w the
    stem scales with w, the rest with w^2; two operations per multiply-add."""
    stem = 32 * 32 * 64 * 3 * 9
    rest = 4 * 32 * 32 * 64 * 64 * 9 + 3 * (18_874_368 + 3 * 37_748_736 + 2_097_152)
    assert 2 * (stem + rest) == compute.forward_flops({"network": _net(64)})
    w = 8
    assert compute.forward_flops({"network": _net(w)}) == 2 * (stem * w // 64 +
                                                                 rest * w * w // 64 ** 2)


def test_stage_passes_by_hand():
    loader = {"batch_size": 4}
    stages = {"supervise": {"num_epochs": 2}, "simclr": {"num_epochs": 3},
              "finetune": {"warmup": {"loader": loader, "criterion": {"sce": {}},
                                      "num_epochs": 1},
                           "semi": {"epsilon": 0.5, "loader": loader,
                                    "criterion": {"mixmatch": {}}, "num_epochs": 2,
                                    "mixmatch": {"train_iteration": 5, "temperature": 0.5,
                                                 "alpha": 0.75}}}}
    assert compute.stage_passes(stages, 100) == {
        "No Defense": {"train": 200, "forward": 0},
        "SimCLR": {"train": 600, "forward": 0},       # two views per image and epoch
        "warm-up": {"train": 0, "forward": 100},      # the backbone only forward
        "split": {"train": 0, "forward": 200},        # one scoring per MixMatch epoch
        # per step: 2 x 4 guessed (forward), 4 labelled + 8 unlabelled trained
        "MixMatch": {"train": 2 * 5 * 12, "forward": 2 * 5 * 8},
    }


def test_a_longer_simclr_adds_exactly_its_epochs():
    base = compute.experiment_compute("badnets", "quick", [])
    longer = compute.experiment_compute("badnets", "quick", ["simclr:num_epochs=10"])
    n, f = base["train_size"], base["forward_flops_per_image"]
    extra = longer["passes"]["SimCLR"]["train"] - base["passes"]["SimCLR"]["train"]
    assert extra == 2 * n * (10 - base["passes"]["SimCLR"]["train"] // (2 * n))
    assert longer["dbd_flops"] - base["dbd_flops"] == compute.TRAIN_PASS * f * extra
    assert longer["no_defense_flops"] == base["no_defense_flops"]
    assert base["dbd_flops"] == sum(v for k, v in base["flops"].items() if k != "No Defense")


def test_the_curve_and_its_errors(tmp_path, capsys):
    points = tmp_path / "points.csv"
    points.write_text("# a comment\nlabel,attack,profile,sets,no_defense_ba,dbd_ba,dbd_asr\n"
                      "long,badnets,quick,simclr:num_epochs=20,80,60,2\n"
                      "short,badnets,quick,,80,50,9\n")
    rows = compute.curve(compute.read_points(points))
    assert [r["label"] for r in rows] == ["short", "long"]  # by compute
    assert [r["ba_gap"] for r in rows] == [30.0, 20.0]
    slope, _, _ = compute.fit_trend(rows)
    doublings = math.log2(rows[1]["dbd_pflop"] / rows[0]["dbd_pflop"])
    assert slope == pytest.approx(-10 / doublings)
    bad = tmp_path / "bad.csv"
    bad.write_text("label,attack\nx,badnets\n")
    with pytest.raises(SystemExit) as exc:
        run_main(compute.main, ["--curve", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code != 0 and len(err) == 1 and "expected the columns" in err[0]


def test_the_training_set_size():
    assert compute.train_size({"train_subset": 600, "dataset_dir": "x/cifar"}, None) == 600
    assert compute.train_size({"dataset_dir": "x/cifar-10"}, None) == compute.CIFAR_TRAIN
    assert compute.train_size({"dataset": "imagefolder"}, 1234) == 1234
    with pytest.raises(UserError, match="--train-size"):
        compute.train_size({"dataset": "imagefolder", "dataset_dir": "x"}, None)
