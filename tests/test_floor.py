"""ASR against its floor: the share of the same non-target test images a model sends to the
target without the trigger, and the trigger's lift (ASR - floor), as test.py and the reports
give them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from model import build_linear_model
from pipeline.evaluate import evaluate_checkpoint
from utils.checkpoint import save_checkpoint

from .conftest import REPO_ROOT

SUP = REPO_ROOT / "config/supervise/badnets/cifar10_resnet18/example.yaml"


def _setup(tmp_path, fake_cifar, trigger: np.ndarray | None = None, always: int | None = None):
    """A supervise config on the fake CIFAR folder (width 8) and a checkpoint of an untrained
    model, or of one whose head always answers ``always``."""
    cfg = yaml.safe_load(SUP.read_text())
    cfg.update(dataset_dir=str(fake_cifar), loader={"batch_size": 32, "num_workers": 0})
    cfg["network"]["resnet18_cifar"]["width"] = 8
    if trigger is not None:
        Image.fromarray(trigger).save(tmp_path / "trigger.png")
        cfg["backdoor"]["badnets"]["trigger_path"] = str(tmp_path / "trigger.png")
    torch.manual_seed(0)
    model = build_linear_model(cfg)
    if always is not None:
        with torch.no_grad():
            model.linear.weight.zero_()
            model.linear.bias.zero_()
            model.linear.bias[always] = 10.0
    ckpt = tmp_path / "model.pt"
    save_checkpoint({"epoch": 1, "model_state_dict": model.state_dict()}, ckpt)
    path = tmp_path / "sup.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg, path, ckpt


def test_a_trigger_that_changes_no_pixel_lifts_nothing(tmp_path, fake_cifar):
    cfg, _, ckpt = _setup(tmp_path, fake_cifar, trigger=np.zeros((32, 32, 3), np.uint8))
    m = evaluate_checkpoint(cfg, ckpt, torch.device("cpu"))
    assert m["lift"] == 0.0 and m["ASR"] == m["floor"]
    # the floor counts the non-target clean images predicted as the target
    assert m["floor"] * m["poison_images"] == pytest.approx(round(m["floor"] * m["poison_images"]))


def test_a_model_that_always_answers_the_target_has_floor_100(tmp_path, fake_cifar):
    cfg, path, ckpt = _setup(tmp_path, fake_cifar, always=3)
    m = evaluate_checkpoint(cfg, ckpt, torch.device("cpu"))
    assert m["floor"] == 1.0 and m["ASR"] == 1.0 and m["lift"] == 0.0 and m["RA"] == 0.0
    assert m["BA"] == pytest.approx(10 / 100)  # the fake test set: 10 of its 100 are cats
    # test.py says both, in its table and its JSON
    run = [sys.executable, "test.py", "--config", str(path), "--ckpt-dir", str(tmp_path),
           "--resume", "model.pt", "--device", "cpu", "--quiet"]
    table = subprocess.run(run, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    rows = {r.split("|")[1].strip(): r.split("|")[2].strip()
            for r in table.stdout.splitlines()[2:]}
    assert rows["floor"] == "100.00" and rows["lift"] == "0.00" and rows["ASR"] == "100.00"
    out = subprocess.run(run + ["--json"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert json.loads(out.stdout)["floor"] == 1.0
