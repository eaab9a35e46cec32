"""DBD on a poisoned set made elsewhere (``dataset: poisoned``, ``dbd.py --data``): a set
this project poisons, exported to the .npz layout and run as someone else's, gives the same
models and figures as the built-in run; bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dbd
from data.build import given_set, poison_index
from data.export_poisoned import export
from data.poisoned_set import PoisonedSet, load_poisoned_set, save_npz
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


def test_images_the_profiles_do_not_fit_are_refused(tmp_path, fake_cifar, capsys):
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    ps = export(load_yaml(paths["supervise"]))
    big = PoisonedSet(**{**ps.__dict__, **{k: np.repeat(np.repeat(getattr(ps, k), 2, 1), 2, 2)
                                          for k in ("train_images", "test_images", "bd_images")}})
    npz = save_npz(tmp_path / "big.npz", big)
    with pytest.raises(SystemExit):
        run_main(dbd.main, ["--data", str(npz), "--out", str(tmp_path / "exp")])
    assert "64x64" in capsys.readouterr().err
