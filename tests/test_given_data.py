"""DBD on a poisoned set made elsewhere (``dataset: poisoned``, ``dbd.py --data``): a set
this project poisons, exported to the .npz layout and run as someone else's, gives the same
models and figures as the built-in run; bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import dbd
from data.build import given_set, poison_index
from data.export_poisoned import export
from data.poisoned_set import PoisonedSet, load_poisoned_set, save_npz
from pipeline.plan import (
    DATA_TEMPLATE,
    SIZED_OPS,
    SharedFolders,
    fit_to_images,
    given_set_overrides,
    plan_experiment,
)
from utils.cli import run_main
from utils.config import load_yaml

from .test_dbd import tiny_stage_configs, use_tiny_attack


@pytest.fixture(scope="module")
def both_runs(tmp_path_factory, fake_cifar):
    """The tiny BadNets experiment, built in and from its exported .npz."""
    root = tmp_path_factory.mktemp("given")
    with pytest.MonkeyPatch.context() as mp:
        paths = tiny_stage_configs(root, fake_cifar)
        use_tiny_attack(mp, paths)
        npz = save_npz(root / "exported.npz", export(load_yaml(paths["supervise"])))
        dbd.main(["--attack", "tiny", "--device", "cpu", "--out", str(root / "builtin"),
                  "--quiet"])
        dbd.main(["--data", str(npz), "--device", "cpu", "--out", str(root / "given"),
                  "--quiet"])
    return root, npz


def test_the_export_is_the_training_set_no_defense_sees(both_runs, fake_cifar):
    root, npz = both_runs
    ps = load_poisoned_set(npz)
    idx = np.load(next((root / "builtin/saved").rglob("supervise/**/poison_idx.npy")))
    assert np.array_equal(ps.poisoned, idx == 1)
    assert ps.target_label == 3 and np.all(ps.train_labels[ps.poisoned] == 3)
    assert np.array_equal(ps.train_labels[~ps.poisoned], ps.train_true_labels[~ps.poisoned])
    # the triggered test set: every non-target test image, with its true label
    assert len(ps.bd_labels) == int((ps.test_labels != 3).sum()) and 3 not in ps.bd_labels
    assert ps.classes[3] == "cat" and len(ps.classes) == 10


def test_the_exported_set_gives_the_built_in_figures(both_runs):
    root, npz = both_runs
    a = json.loads((root / "builtin/report.json").read_text())["attacks"]["tiny"]
    b = json.loads((root / "given/report.json").read_text())["attacks"]["exported"]
    for model in ("no_defense", "dbd"):
        assert {k: a[model][k] for k in ("BA", "ASR", "RA", "clean_images", "poison_images")} \
            == {k: b[model][k] for k in ("BA", "ASR", "RA", "clean_images", "poison_images")}
    assert a["split"] == b["split"] and a["labelled_by_class"] == b["labelled_by_class"]
    assert a["detection"] == b["detection"]
    for ckpt in (root / "builtin/storage").rglob("latest_model.pt"):
        other = root / "given/storage" / ckpt.relative_to(root / "builtin/storage")
        sa = torch.load(ckpt, weights_only=True)["model_state_dict"]
        sb = torch.load(other, weights_only=True)["model_state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), ckpt
    # the leaderboard names the set, and its poisoned share is the set's own
    row = (root / "given/leaderboard.csv").read_text().splitlines()[1].split(",")
    ps = load_poisoned_set(npz)
    assert row[2:4] == ["exported", "none"]
    assert float(row[4]) == round(ps.poisoned.sum() / len(ps.poisoned), 4)
    assert (root / "given/suspected_poison.csv").read_text() == \
        (root / "builtin/suspected_poison.csv").read_text()


def test_a_set_that_does_not_say_which_are_poisoned(tmp_path, fake_cifar):
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    ps = export(load_yaml(paths["supervise"]))
    blind = PoisonedSet(**{**ps.__dict__, "poisoned": None, "train_true_labels": None})
    npz = save_npz(tmp_path / "blind.npz", blind)
    cfg = {**load_yaml(paths["supervise"]), "dataset": "poisoned", "dataset_dir": str(npz),
           "backdoor": {"target_label": 3, "poison_ratio": 0.0, "given": {}}}
    g = given_set(cfg)
    assert not g.known and not g.poisoned.any()
    assert np.array_equal(g.train_origin, ps.train_labels)  # no true labels: the given ones
    seen = []
    assert poison_index(cfg, g.train_labels, None, seen.append).sum() == 0
    assert "does not say" in seen[0]


@pytest.mark.parametrize("argv, message", [
    (["--attack", "badnets", "--data", "x.npz"], "one of them"),
    ([], "one of them"),
    (["--data", "/nonexistent/set.npz"], "not found"),
])
def test_bad_data_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        run_main(dbd.main, [*argv, "--out", str(tmp_path / "exp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code != 0 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "exp").exists()


def _upscaled(ps: PoisonedSet, factor: int) -> PoisonedSet:
    return PoisonedSet(**{**ps.__dict__, **{
        k: np.repeat(np.repeat(getattr(ps, k), factor, 1), factor, 2)
        for k in ("train_images", "test_images", "bd_images")}})


@pytest.mark.parametrize("factor, network", [(1, "resnet18_cifar"), (2, "resnet18_imagenet")])
def test_the_configs_are_fitted_to_the_images_size(tmp_path, fake_cifar, monkeypatch, factor,
                                                   network):
    """32x32: the profile's configs as they are; 64x64: every crop at 64 (random_crop's
    padding 8) and the ImageNet ResNet-18 at the profile's width, in every stage."""
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    use_tiny_attack(monkeypatch, paths)
    npz = save_npz(tmp_path / "set.npz", _upscaled(export(load_yaml(paths["supervise"])),
                                                   factor))
    plan = plan_experiment("set", "quick", given_set_overrides(npz, "quick"),
                           SharedFolders(tmp_path / "exp"), "cpu", True, DATA_TEMPLATE)
    for stage, p in plan.items():
        cfg, original = p.cfg, load_yaml(paths[stage])
        assert cfg["network"] == {network: {"width": 8, "num_classes": None}
                                  if factor == 1 else {"width": 8}}, stage
        sizes = [(part, op, args) for part, sec in cfg["transform"].items() if sec
                 for ops in sec.values() if isinstance(ops, dict)
                 for op, args in ops.items() if op in SIZED_OPS]
        assert sizes, stage
        for part, op, args in sizes:
            assert args["size"] == 32 * factor, (stage, part, op)
            if op == "random_crop":
                assert args["padding"] == 4 * factor
        if factor == 1:  # nothing else moved
            assert cfg["transform"] == (original.get("transform") or cfg["transform"])


def test_a_64px_set_runs_end_to_end(tmp_path, fake_cifar, monkeypatch):
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    use_tiny_attack(monkeypatch, paths)
    npz = save_npz(tmp_path / "big.npz", _upscaled(export(load_yaml(paths["supervise"])), 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dbd.main(["--data", str(npz), "--device", "cpu", "--out", str(tmp_path / "exp"),
                  "--quiet"])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "exp/report.json").read_text())["attacks"]["big"]
    assert report["dbd"]["clean_images"] == len(load_poisoned_set(npz).test_labels)
    ckpt = next((tmp_path / "exp/storage").rglob("supervise/**/latest_model.pt"))
    state = torch.load(ckpt, weights_only=True)["model_state_dict"]
    assert state["backbone.conv1.weight"].shape[-1] == 7  # the ImageNet stem


def test_a_set_the_configs_cannot_fit_is_refused(tmp_path, fake_cifar, monkeypatch, capsys):
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    sup = load_yaml(paths["supervise"])
    sup["transform"]["train"]["primary"]["random_crop"]["size"] = 28
    paths["supervise"].write_text(yaml.safe_dump(sup, sort_keys=False))
    use_tiny_attack(monkeypatch, paths)
    npz = save_npz(tmp_path / "big.npz", _upscaled(export(load_yaml(paths["supervise"])), 2))
    with pytest.raises(SystemExit):
        run_main(dbd.main, ["--data", str(npz), "--out", str(tmp_path / "exp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "random_crop.size is 28" in err[0], err


def test_non_square_images_get_their_own_crops_and_the_cifar_network_below_64px():
    cfg = {"network": {"resnet18_cifar": {"width": 16}},
           "transform": {"pre": None, "train": {"primary": {
               "random_crop": {"size": 32, "padding": 4}, "random_horizontal_flip": {"p": 0.5}},
               "remaining": {"to_tensor": True}}}}
    out = {o.key: o.value for o in fit_to_images(cfg, 48, 40)}
    assert out == {"network": {"resnet18_cifar": {"width": 16}},
                   "transform.train.primary.random_crop": {"size": [48, 40], "padding": 5}}
    assert fit_to_images(cfg, 64, 96)[0].value == {"resnet18_imagenet": {"width": 16}}


def test_the_oracle_split_on_a_set_without_flags_is_a_one_line_error(tmp_path, fake_cifar,
                                                                    monkeypatch, capsys):
    """semi.oracle_split reads the ground truth: a set that does not give it is refused at
    the fine-tuning stage, in one line, before that stage writes a checkpoint."""
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    use_tiny_attack(monkeypatch, paths)
    ps = export(load_yaml(paths["supervise"]))
    npz = save_npz(tmp_path / "blind.npz",
                   PoisonedSet(**{**ps.__dict__, "poisoned": None, "train_true_labels": None}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit) as exc:
            run_main(dbd.main, ["--data", str(npz), "--device", "cpu", "--quiet",
                                "--set", "finetune:semi.oracle_split=true",
                                "--out", str(tmp_path / "exp")])
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code != 0 and len(err) == 1 and "semi.oracle_split needs to know" in err[0], err
    assert not list((tmp_path / "exp").rglob("mixmatch_finetune/**/*.pt"))
