"""supervise.py then test.py on a tiny synthetic CIFAR-format folder, plus bad-input handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from .conftest import REPO_ROOT, assert_metrics_match, count_predictions

SUP = REPO_ROOT / "config/supervise/badnets/cifar10_resnet18/example.yaml"
# the keys of a training checkpoint, in the order they are written (the original's names)
CHECKPOINT_KEYS = ["epoch", "result", "model_state_dict", "optimizer_state_dict",
                   "scheduler_state_dict", "best_acc", "best_epoch", "rng_state",
                   "poison_idx_path"]


def run(*args, cwd=REPO_ROOT, check=True):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def tiny_config(tmp_path: Path, dataset_dir: Path, src: Path = SUP, **extra) -> Path:
    cfg = yaml.safe_load(src.read_text())
    cfg.update(dataset_dir=str(dataset_dir), saved_dir=str(tmp_path / "saved"),
               storage_dir=str(tmp_path / "storage"), num_epochs=2)
    cfg["loader"] = {"batch_size": 32, "num_workers": 0, "pin_memory": False}
    cfg["network"]["resnet18_cifar"]["width"] = 8
    cfg["lr_scheduler"] = {"multi_step": {"milestones": [1]}}
    cfg["backdoor"]["poison_ratio"] = 0.2
    cfg.update(extra)
    path = tmp_path / "config" / "supervise" / "tiny.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_supervise_then_test(tmp_path, fake_cifar):
    cfg = tiny_config(tmp_path, fake_cifar)
    run("supervise.py", "--config", cfg, "--resume", "False", "--gpu", "0", "--quiet")
    saved = tmp_path / "saved" / "supervise" / "tiny"
    ckpt_dir = tmp_path / "storage" / "supervise" / "tiny" / "checkpoint"
    assert (ckpt_dir / "latest_model.pt").is_file() and (ckpt_dir / "best_model.pt").is_file()
    idx = np.load(saved / "poison_idx.npy")
    assert len(idx) == 200 and idx.sum() > 0
    ck = torch.load(ckpt_dir / "latest_model.pt", weights_only=True)
    assert list(ck) == CHECKPOINT_KEYS
    assert ck["epoch"] == 2 and ck["poison_idx_path"] == str(saved / "poison_idx.npy")
    for kind in ("poison_train", "clean_test", "poison_test"):
        lines = (saved / "log" / f"{kind}.csv").read_text().splitlines()
        assert lines[0].startswith("epoch,") and len(lines) == 3
    final = json.loads((saved / "final_metrics.json").read_text())
    assert final["poisoned"] == int(idx.sum())
    # BA, ASR and RA are the fractions of the latest model's predictions counted by hand
    counts = count_predictions(cfg, ckpt_dir / "latest_model.pt")
    assert counts["clean_total"] == 100 and counts["triggered_total"] == 90
    assert_metrics_match(final, counts)
    assert (saved / "tiny.yaml").is_file() and (saved / "log" / "supervise.log").is_file()

    out = run("test.py", "--config", cfg, "--ckpt-dir", ckpt_dir, "--resume", "latest_model.pt",
              "--gpu", "0", "--json")
    m = json.loads(out.stdout)
    assert m["clean_images"] == 100 and m["poison_images"] == 90
    assert m["BA"] == pytest.approx(final["BA"]) and m["ASR"] == pytest.approx(final["ASR"])
    table = run("test.py", "--config", cfg, "--ckpt-dir", ckpt_dir, "--resume",
                "latest_model.pt").stdout
    assert "| BA" in table and "| ASR" in table and "| RA" in table

    # resume: one more epoch continues from epoch 2, same poison index
    run("supervise.py", "--config", cfg, "--resume", "latest_model.pt", "--set", "num_epochs=3",
        "--quiet")
    assert len((saved / "log" / "clean_test.csv").read_text().splitlines()) == 4
    assert np.array_equal(np.load(saved / "poison_idx.npy"), idx)

    # a fresh run moves the earlier results aside instead of deleting them
    run("supervise.py", "--config", cfg, "--resume", "False", "--set", "num_epochs=1", "--quiet")
    aside = [p for p in (tmp_path / "saved" / "supervise").iterdir() if p.name.startswith("tiny.")]
    assert len(aside) == 1 and (aside[0] / "poison_idx.npy").is_file()


@pytest.mark.parametrize("args,match", [
    (["--set", "backdoor.poison_ratio=1.5"], "poison_ratio"),
    (["--set", "backdoor.target_label=12"], "target_label"),
    (["--set", "loader.batch_size=0"], "batch_size"),
    (["--set", "optimizer.SGD.lrr=0.1"], "optimizer.SGD.lrr"),
    (["--device", "cuda:7"], "cuda"),
])
def test_bad_input_one_line_no_traceback(tmp_path, fake_cifar, args, match):
    cfg = tiny_config(tmp_path, fake_cifar)
    if "cuda" in args[-1]:
        import torch
        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has 8 GPUs")
    proc = run("supervise.py", "--config", cfg, "--resume", "False", *args, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0]
    assert not (tmp_path / "saved").exists()  # nothing written


def test_missing_dataset_says_where_and_how(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "cifar-nowhere")
    proc = run("supervise.py", "--config", cfg, "--resume", "False", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cifar-nowhere" in proc.stderr and "python -m data.download cifar10" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "saved").exists()


def test_test_py_missing_checkpoint(tmp_path, fake_cifar):
    cfg = tiny_config(tmp_path, fake_cifar)
    proc = run("test.py", "--config", cfg, "--ckpt-dir", tmp_path, "--resume", "latest_model.pt",
               check=False)
    assert proc.returncode != 0 and "checkpoint not found" in proc.stderr
    assert "Traceback" not in proc.stderr
