"""simclr.py -> mixmatch_finetune.py -> test.py on a tiny synthetic CIFAR-format folder."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from loss import MixMatchLoss
from pipeline.stage import finetune_config
from utils.cli import StageArgs

from .conftest import REPO_ROOT, assert_metrics_match, count_predictions
from .test_end_to_end import CHECKPOINT_KEYS, run, tiny_config

SIMCLR = REPO_ROOT / "config/defense/simclr/badnets/cifar10_resnet18/example.yaml"
FINETUNE = REPO_ROOT / "config/defense/mixmatch_finetune/badnets/cifar10_resnet18/example.yaml"


def test_defense_pipeline(tmp_path, fake_cifar):
    sup = tiny_config(tmp_path, fake_cifar)
    pre = yaml.safe_load(SIMCLR.read_text())
    pre.update(dataset_dir=str(fake_cifar), saved_dir=str(tmp_path / "saved"),
               storage_dir=str(tmp_path / "storage"), num_epochs=2,
               simclr={"num_stage_epochs": 2, "min_interval": 1, "max_interval": 1})
    pre["backdoor"]["poison_ratio"] = 0.2
    pre["loader"] = {"batch_size": 64, "num_workers": 0, "pin_memory": False}
    pre["network"]["resnet18_cifar"]["width"] = 8
    pre_path = tmp_path / "config" / "defense" / "simclr" / "tiny.yaml"
    pre_path.parent.mkdir(parents=True)
    pre_path.write_text(yaml.safe_dump(pre, sort_keys=False))
    run("simclr.py", "--config", pre_path, "--resume", "False", "--gpu", "0", "--quiet")
    pre_saved = tmp_path / "saved" / "defense" / "simclr" / "tiny"
    pre_ckpt = tmp_path / "storage" / "defense" / "simclr" / "tiny" / "checkpoint"
    assert {p.name for p in pre_ckpt.iterdir()} >= {"epoch1.pt", "epoch2.pt", "latest_model.pt"}
    ck = torch.load(pre_ckpt / "epoch2.pt", weights_only=True)  # no best model in this stage
    assert list(ck) == [k for k in CHECKPOINT_KEYS if k not in ("best_acc", "best_epoch")]
    assert list(ck["result"]) == ["self_train"] and ck["result"]["self_train"]["loss"] > 0
    assert ck["poison_idx_path"] == str(pre_saved / "poison_idx.npy")
    rows = list(csv.DictReader(open(pre_saved / "log" / "self_train.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(float(r["loss"]) > 0 for r in rows)
    # same attack config, same seed: the DBD run poisons the same images as No Defense would
    sup_run = run("supervise.py", "--config", sup, "--resume", "False", "--set", "num_epochs=1",
                  "--quiet")
    assert sup_run.returncode == 0
    assert np.array_equal(np.load(pre_saved / "poison_idx.npy"),
                          np.load(tmp_path / "saved" / "supervise" / "tiny" / "poison_idx.npy"))

    ft = yaml.safe_load(FINETUNE.read_text())
    ft.update(pretrain_config_path=str(pre_path), pretrain_checkpoint="epoch2.pt")
    ft["network"]["resnet18_cifar"]["width"] = 8
    ft["warmup"]["loader"] = {"batch_size": 32, "num_workers": 0, "pin_memory": False}
    ft["warmup"]["num_epochs"] = 1
    ft["semi"]["loader"] = {"batch_size": 16, "num_workers": 0, "pin_memory": False}
    ft["semi"]["num_epochs"] = 1
    ft["semi"]["mixmatch"]["train_iteration"] = 3
    ft["semi"]["criterion"]["mixmatch"]["rampup_length"] = 4
    ft_path = tmp_path / "config" / "defense" / "finetune" / "tiny.yaml"
    ft_path.parent.mkdir(parents=True)
    ft_path.write_text(yaml.safe_dump(ft, sort_keys=False))
    run("mixmatch_finetune.py", "--config", ft_path, "--resume", "False", "--quiet")
    saved = tmp_path / "saved" / "defense" / "finetune" / "tiny"
    ckpt_dir = tmp_path / "storage" / "defense" / "finetune" / "tiny" / "checkpoint"
    final = json.loads((saved / "final_metrics.json").read_text())
    idx = np.load(pre_saved / "poison_idx.npy")
    ck = torch.load(ckpt_dir / "latest_model.pt", weights_only=True)
    assert list(ck) == CHECKPOINT_KEYS and ck["epoch"] == 2
    assert ck["best_acc"] == final["best_acc"] and ck["best_epoch"] == final["best_epoch"]
    assert ck["poison_idx_path"] == str(saved / "poison_idx.npy")
    split = final["last_split"]
    assert split["labelled"] == 100 and split["poisoned_total"] == int(idx.sum())
    # the labelled set is exactly the int(N·ε) lowest-loss samples of the losses the split
    # saved, and poisoned_labelled counts the poisoned samples among them
    saved_split = np.load(saved / "split_losses_last.npz")
    losses, semi = saved_split["losses"], saved_split["semi_idx"]
    assert int(saved_split["epoch"]) == 2 and float(saved_split["epsilon"]) == 0.5
    assert np.array_equal(saved_split["poison"], idx) and len(losses) == len(idx) == 200
    assert set(np.unique(semi)) == {0, 1} and int(semi.sum()) == int(200 * 0.5)
    assert losses[semi == 1].max() <= losses[semi == 0].min()
    assert split["poisoned_labelled"] == int(idx[semi == 1].sum())
    assert split["unlabelled"] == 100
    assert split["precision"] == pytest.approx(int(idx[semi == 0].sum()) / 100)
    assert split["recall"] == pytest.approx(
        1 - split["poisoned_labelled"] / split["poisoned_total"])
    split_rows = list(csv.DictReader(open(saved / "log" / "split.csv")))
    assert [r["epoch"] for r in split_rows] == ["2"]
    assert int(split_rows[0]["poisoned_labelled"]) == split["poisoned_labelled"]

    # resume for one more MixMatch epoch: λ_u continues from the global epoch index
    run("mixmatch_finetune.py", "--config", ft_path, "--resume", "latest_model.pt",
        "--set", "semi.num_epochs=2", "--quiet")
    train_rows = list(csv.DictReader(open(saved / "log" / "poison_train.csv")))
    assert [r["epoch"] for r in train_rows] == ["1", "2", "3"]
    ramp = MixMatchLoss(15, 4)
    for row, index in ((train_rows[1], 1), (train_rows[2], 2)):
        expected = np.mean([ramp.weight(index + i / 3) for i in range(3)])
        assert float(row["lambda_u"]) == pytest.approx(expected, rel=1e-4)

    out = run("test.py", "--config", sup, "--ckpt-dir", ckpt_dir, "--resume", "latest_model.pt",
              "--json")
    m = json.loads(out.stdout)
    assert m["epoch"] == 3 and m["poison_images"] == 90 and m["clean_images"] == 100
    # test.py's BA, ASR and RA are the fractions of the model's predictions counted by hand,
    # and the resumed run's final metrics are the same model's
    assert_metrics_match(m, count_predictions(sup, ckpt_dir / "latest_model.pt"))
    final = json.loads((saved / "final_metrics.json").read_text())
    assert final["epoch"] == 3 and final["ASR"] == m["ASR"] and final["BA"] == m["BA"]


def test_finetune_lr_schedule_is_its_own_and_survives_a_resume(tmp_path, fake_cifar):
    """The fine-tuning stage takes lr_scheduler from its own file only (the SimCLR run's cosine
    schedule is not inherited), steps it after every epoch and restores it on resume."""
    pre = yaml.safe_load(SIMCLR.read_text())
    assert pre["lr_scheduler"] is not None
    pre.update(dataset_dir=str(fake_cifar), saved_dir=str(tmp_path / "saved"),
               storage_dir=str(tmp_path / "storage"), num_epochs=1,
               simclr={"num_stage_epochs": 1, "min_interval": 1, "max_interval": 1},
               loader={"batch_size": 64, "num_workers": 0, "pin_memory": False})
    pre["network"]["resnet18_cifar"]["width"] = 8
    pre_path = tmp_path / "config" / "defense" / "simclr" / "tiny.yaml"
    pre_path.parent.mkdir(parents=True)
    pre_path.write_text(yaml.safe_dump(pre, sort_keys=False))
    run("simclr.py", "--config", pre_path, "--resume", "False", "--quiet")

    ft = yaml.safe_load(FINETUNE.read_text())
    del ft["lr_scheduler"]
    ft.update(pretrain_config_path=str(pre_path), pretrain_checkpoint="epoch1.pt")
    ft["network"]["resnet18_cifar"]["width"] = 8
    ft["warmup"].update(loader={"batch_size": 32, "num_workers": 0, "pin_memory": False},
                        num_epochs=1)
    ft["semi"].update(loader={"batch_size": 16, "num_workers": 0, "pin_memory": False},
                      num_epochs=1)
    ft["semi"]["mixmatch"]["train_iteration"] = 2
    ft_path = tmp_path / "config" / "defense" / "finetune" / "tiny.yaml"
    ft_path.parent.mkdir(parents=True)
    ft_path.write_text(yaml.safe_dump(ft, sort_keys=False))
    merged, _, _ = finetune_config(StageArgs(ft_path))
    assert merged["lr_scheduler"] is None  # not the SimCLR run's cosine schedule

    ft["lr_scheduler"] = {"multi_step": {"milestones": [1], "gamma": 0.1}}
    ft_path.write_text(yaml.safe_dump(ft, sort_keys=False))
    run("mixmatch_finetune.py", "--config", ft_path, "--resume", "False", "--quiet")
    ckpt_dir = tmp_path / "storage" / "defense" / "finetune" / "tiny" / "checkpoint"
    log = tmp_path / "saved" / "defense" / "finetune" / "tiny" / "log" / "mixmatch_finetune.log"
    lrs = [float(line.split(" lr ")[1].split()[0]) for line in log.read_text().splitlines()
           if " lr " in line and "/2 " in line]
    assert lrs == pytest.approx([0.002, 0.0002])  # epoch 1 at the base lr, epoch 2 dropped
    ck = torch.load(ckpt_dir / "latest_model.pt", weights_only=True)
    assert ck["scheduler_state_dict"]["last_epoch"] == 2
    run("mixmatch_finetune.py", "--config", ft_path, "--resume", "latest_model.pt",
        "--set", "semi.num_epochs=2", "--quiet")
    ck = torch.load(ckpt_dir / "latest_model.pt", weights_only=True)
    assert ck["epoch"] == 3 and ck["scheduler_state_dict"]["last_epoch"] == 3
    assert ck["optimizer_state_dict"]["param_groups"][0]["lr"] == pytest.approx(0.0002)
