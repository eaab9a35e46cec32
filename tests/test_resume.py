"""Kill each training stage with SIGKILL at random points, resume, and get the uninterrupted
run's final metrics bit for bit (CPU, deterministic seeds). Also: a kill during a checkpoint
save leaves a loadable checkpoint."""

from __future__ import annotations

import csv
import json
import random
import signal
import subprocess
import sys
import time

import pytest

from utils.checkpoint import load_checkpoint

from .conftest import REPO_ROOT, SCRIPTS, tiny_stage_configs


def _cfgs(root, fake_cifar, pretrained_from=None):
    def edit(sup, pre, ft):
        ft["semi"]["mixmatch"]["train_iteration"] = 4
        ft["semi"]["criterion"]["mixmatch"]["rampup_length"] = 4
    common = {"seed": {"seed": 100, "deterministic": True, "benchmark": False}}
    return tiny_stage_configs(root, fake_cifar, 4, common, edit, pretrained_from)


def _cmd(paths, stage, resume):
    return [sys.executable, SCRIPTS[stage], "--config", str(paths[stage]), "--resume", resume,
            "--device", "cpu", "--quiet"]


def _outcome(root, stage):
    saved = root / "saved" / stage / "t"
    final = json.loads((saved / "final_metrics.json").read_text())
    final = {k: v for k, v in final.items() if k not in ("wall_time_s",)}
    tables = {}
    for f in sorted((saved / "log").glob("*.csv")):
        with open(f) as fh:
            tables[f.name] = [{k: v for k, v in r.items() if k != "images_per_s"}
                              for r in csv.DictReader(fh)]
    return final, tables


def _killed_run(paths, root, stage, rng, kills=2):
    """Start, SIGKILL after a random delay, resume; repeat; then run to the end."""
    ckpt = root / "storage" / stage / "t" / "checkpoint" / "latest_model.pt"
    done = 0
    while done < kills:
        resume = "latest_model.pt" if ckpt.is_file() else "False"
        proc = subprocess.Popen(_cmd(paths, stage, resume), cwd=REPO_ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(4.0, 9.0))  # torch import takes a few seconds
        if proc.poll() is not None:
            break  # finished before the kill: nothing left to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done += 1
    resume = "latest_model.pt" if ckpt.is_file() else "False"
    subprocess.run(_cmd(paths, stage, resume), cwd=REPO_ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return done


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path, fake_cifar):
    rng = random.Random(0)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p_ref = _cfgs(ref, fake_cifar)
    p_cut = _cfgs(cut, fake_cifar, pretrained_from=p_ref["simclr"])  # same pretrained backbone
    for stage in ("supervise", "simclr", "finetune"):
        subprocess.run(_cmd(p_ref, stage, "False"), cwd=REPO_ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    for stage in ("supervise", "simclr", "finetune"):
        _killed_run(p_cut, cut, stage, rng)
        assert _outcome(cut, stage) == _outcome(ref, stage), stage


_WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from utils.checkpoint import save_checkpoint
i = 0
while True:
    i += 1
    save_checkpoint({{"model_state_dict": {{"w": torch.full((2_000_000,), float(i))}},
                     "epoch": i}}, {path!r})
"""


def test_kill_during_checkpoint_save_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "latest_model.pt"
    proc = subprocess.Popen([sys.executable, "-c",
                             _WRITER.format(root=str(REPO_ROOT), path=str(path))])
    try:
        deadline = time.time() + 60
        while not path.is_file() and time.time() < deadline:
            time.sleep(0.1)
        rng = random.Random(1)
        time.sleep(rng.uniform(0.2, 1.0))  # saves of 8 MB take a few tens of milliseconds
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ck = load_checkpoint(path)
    assert ck["epoch"] >= 1
    assert float(ck["model_state_dict"]["w"][0]) == ck["epoch"]
