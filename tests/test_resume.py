"""Interrupt each training stage at a set point (SIGKILL, and once Ctrl-C), continue it with
``--resume latest_model.pt``, and end bit for bit where an uninterrupted run ends: final
metrics, CSV logs, saved arrays and every checkpoint (CPU, deterministic seeds). Also: a kill
during a checkpoint save leaves a loadable checkpoint.

The scripts run as subprocesses, as a user runs them. Each interruption waits for the run to
write the checkpoint of a given epoch and stops it at once, early in the next epoch, so the
point is the same however slow the machine is; the test then checks that the process was still
running, that the stage had not finished, and that the continued run's log says it resumed
from that epoch.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from .conftest import REPO_ROOT, SCRIPTS, tiny_stage_configs, write_fake_cifar

EPOCHS = 4  # per stage; fine-tuning: 2 warm-up + 2 MixMatch epochs; supervised lr drop after 2
# each stage's interruptions, in order: (signal, epoch whose checkpoint the run must have
# written); every later run continues from the checkpoint the previous one left
PLAN = {
    "supervise": [(signal.SIGKILL, 1), (signal.SIGINT, 2)],  # before and at the lr drop
    "simclr": [(signal.SIGKILL, 1)],  # before the first kept epoch (epoch2.pt)
    # inside the MixMatch phase, whose mixing draws from the global RNGs: their state must
    # come back from the checkpoint
    "finetune": [(signal.SIGKILL, 3)],
}
TIMING = {"wall_time_s", "images_per_s"}  # the only values allowed to differ
# one thread per process: the reference and the interrupted runs go side by side
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
WAIT_S = 900  # a generous bound for one run on a slow, busy machine
RESUMED = re.compile(r"Resumed from (.+) at epoch (\d+)\s*$")


@pytest.fixture(scope="module")
def small_cifar(tmp_path_factory):
    return write_fake_cifar(tmp_path_factory.mktemp("cifar"), n_train=100, n_test=50)


def _cfgs(root, dataset_dir):
    def edit(sup, pre, ft):
        # supervised training on the original's per-image PIL path, whose augmentations draw
        # from the global RNGs (SimCLR and warm-up take the batched path, seeded per epoch)
        sup["speed"] = dict(sup.get("speed") or {}, data_path="reference")
        ft["semi"]["mixmatch"]["train_iteration"] = 4
        ft["semi"]["criterion"]["mixmatch"]["rampup_length"] = 4
    common = {"seed": {"seed": 100, "deterministic": True, "benchmark": False}}
    return tiny_stage_configs(root, dataset_dir, EPOCHS, common, edit)


def _cmd(paths, stage, resume):
    return [sys.executable, SCRIPTS[stage], "--config", str(paths[stage]), "--resume", resume,
            "--device", "cpu", "--quiet"]


def _saved(root, stage):
    return root / "saved" / stage / "t"


def _ckpt_dir(root, stage):
    return root / "storage" / stage / "t" / "checkpoint"


def _stat(path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _epoch_of(path):
    """The epoch a checkpoint holds (writes are atomic renames, so a read sees a whole file)."""
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])


def _tail(path, n=2000):
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


def _run(cmd, err):
    with open(err, "w") as fh:
        rc = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=fh,
                            timeout=WAIT_S).returncode
    assert rc == 0, f"{' '.join(cmd)} exited with {rc}:\n{_tail(err)}"


@dataclass
class Interruption:
    signal: int
    running: bool  # the process was alive, with no final metrics, when the signal went
    returncode: int
    stderr: str
    epoch: int  # of the checkpoint left behind: where the next run continues


def _default_sigint() -> None:
    """In the child before it runs the script: Ctrl-C handled as in a terminal. A test run
    started in the background inherits SIGINT ignored, and Python keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(cmd, ckpt, final, epoch, sig, err) -> Interruption:
    """Start ``cmd``; as soon as it has written the checkpoint of ``epoch``, send ``sig``."""
    seen = _stat(ckpt)  # the checkpoint it continues from, if any
    with open(err, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=fh, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{' '.join(cmd)} ended (exit {proc.returncode}) before writing the "
                            f"epoch-{epoch} checkpoint:\n{_tail(err)}")
            assert time.monotonic() < deadline, f"no epoch-{epoch} checkpoint in {WAIT_S} s"
            st = _stat(ckpt)
            if st is not None and st != seen:
                seen = st
                if _epoch_of(ckpt) >= epoch:
                    break
            time.sleep(0.02)
        running = proc.poll() is None and not final.exists()
        proc.send_signal(sig)
        rc = proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Interruption(sig, running, rc, _tail(err), _epoch_of(ckpt))


def _interrupted_stage(paths, root, stage) -> list[Interruption]:
    ckpt = _ckpt_dir(root, stage) / "latest_model.pt"
    final = _saved(root, stage) / "final_metrics.json"
    done = []
    for i, (sig, epoch) in enumerate(PLAN[stage]):
        resume = "latest_model.pt" if done else "False"
        done.append(_interrupt(_cmd(paths, stage, resume), ckpt, final, epoch, sig,
                               root / f"{stage}.{i}.err"))
    _run(_cmd(paths, stage, "latest_model.pt"), root / f"{stage}.last.err")
    return done


def _clean(x):
    """``x`` without its timing entries, at any depth."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _bits(t):
    """A tensor's bytes, so that NaNs and signed zeros compare bit for bit too."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _differences(a, b, where=""):
    """Where two loaded checkpoints (nested dicts, lists, tensors, numbers) differ, bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(_bits(a), _bits(b)))
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}/{i}")]
    return [] if a == b or (a != a and b != b) else [f"{where}: {a!r} != {b!r}"]


def _csv(path):
    with open(path, newline="") as fh:
        r = csv.DictReader(fh)
        rows = [_clean(row) for row in r]
        return [k for k in r.fieldnames if k not in TIMING], rows


def _compare_stage(ref, cut, stage):
    """Every difference between two finished runs of ``stage``, timing aside."""
    out = []
    s_ref, s_cut = _saved(ref, stage), _saved(cut, stage)
    a, b = (_clean(json.loads((s / "final_metrics.json").read_text())) for s in (s_ref, s_cut))
    if a != b:
        out.append(f"final_metrics.json: {a} != {b}")
    names = sorted(p.name for p in (s_ref / "log").glob("*.csv"))
    if names != sorted(p.name for p in (s_cut / "log").glob("*.csv")):
        out.append(f"CSV logs differ in name: {names}")
    for n in names:
        if _csv(s_ref / "log" / n) != _csv(s_cut / "log" / n):
            out.append(f"log/{n}")
    arrays = sorted(p.name for p in s_ref.iterdir() if p.suffix in (".npy", ".npz"))
    assert arrays, f"no saved arrays in {s_ref}"
    if arrays != sorted(p.name for p in s_cut.iterdir() if p.suffix in (".npy", ".npz")):
        out.append(f"saved arrays differ in name: {arrays}")
    for n in arrays:
        x, y = np.load(s_ref / n), np.load(s_cut / n)
        if n.endswith(".npy"):
            x, y = {"": x}, {"": y}
        if sorted(x.keys()) != sorted(y.keys()) or not all(
                np.array_equal(x[k], y[k]) for k in x.keys()):
            out.append(n)
    c_ref, c_cut = _ckpt_dir(ref, stage), _ckpt_dir(cut, stage)
    ckpts = sorted(p.name for p in c_ref.glob("*.pt"))
    assert "latest_model.pt" in ckpts
    if ckpts != sorted(p.name for p in c_cut.glob("*.pt")):
        out.append(f"checkpoints differ in name: {ckpts} != "
                   f"{sorted(p.name for p in c_cut.glob('*.pt'))}")
    for n in ckpts:
        x, y = (torch.load(c / n, map_location="cpu", weights_only=True) for c in (c_ref, c_cut))
        x.pop("poison_idx_path", None)  # names the run's own folder
        y.pop("poison_idx_path", None)
        assert x["model_state_dict"], n
        out += [f"{n}{d}" for d in _differences(_clean(x), _clean(y))]
    return out


def _reference(paths, root):
    for stage in ("supervise", "simclr", "finetune"):
        _run(_cmd(paths, stage, "False"), root / f"{stage}.err")


def _interrupted(paths, root, stages):
    # fine-tuning starts from this root's own SimCLR run, itself interrupted and continued
    return {stage: _interrupted_stage(paths, root, stage) for stage in stages}


@pytest.mark.slow
def test_interrupt_and_resume_is_bit_identical(tmp_path, small_cifar):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    p_ref, p_cut = _cfgs(ref, small_cifar), _cfgs(cut, small_cifar)
    with ThreadPoolExecutor(3) as pool:  # three runs at a time, about equal in length
        jobs = [pool.submit(_reference, p_ref, ref),
                pool.submit(_interrupted, p_cut, cut, ("supervise",)),
                pool.submit(_interrupted, p_cut, cut, ("simclr", "finetune"))]
        interruptions = jobs[1].result() | jobs[2].result()
        jobs[0].result()

    differences = {}
    for stage in ("supervise", "simclr", "finetune"):
        got = interruptions[stage]
        # every planned interruption happened, to a live run that had not finished yet
        assert [i.signal for i in got] == [s for s, _ in PLAN[stage]], stage
        for i, (sig, epoch) in zip(got, PLAN[stage]):
            assert i.running, (stage, i)
            if sig == signal.SIGKILL:
                assert i.returncode == -signal.SIGKILL, (stage, i)
            else:  # Ctrl-C: one line saying how to continue, exit status 130
                assert i.returncode == 130, (stage, i)
                assert "interrupted:" in i.stderr and "Traceback" not in i.stderr, (stage, i)
            assert epoch <= i.epoch < EPOCHS, (stage, i)
        # each continued run really resumed, from where the interrupted one stopped
        log = "\n".join(p.read_text() for p in sorted((_saved(cut, stage) / "log").glob("*.log")))
        resumed = [m.groups() for m in map(RESUMED.search, log.splitlines()) if m]
        assert [int(e) for _, e in resumed] == [i.epoch for i in got], (stage, resumed)
        assert all(p.endswith("latest_model.pt") for p, _ in resumed), resumed
        assert "Resumed from" not in "\n".join(
            p.read_text() for p in (_saved(ref, stage) / "log").glob("*.log"))
        # and it ends where the uninterrupted run ends
        differences[stage] = _compare_stage(ref, cut, stage)
    assert not any(differences.values()), "\n".join(
        f"{stage}: {len(d)} differences from the uninterrupted run, e.g. {d[:4]}"
        for stage, d in differences.items() if d)


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
    from utils.checkpoint import load_checkpoint

    path = tmp_path / "latest_model.pt"
    tmp = tmp_path / ".latest_model.pt.tmp"  # exists only while a save is under way
    proc = subprocess.Popen([sys.executable, "-c",
                             _WRITER.format(root=str(REPO_ROOT), path=str(path))])
    try:
        deadline = time.time() + 120
        # the first save is done and the second one has begun: kill in the middle of it
        while not (path.is_file() and tmp.is_file()) and time.time() < deadline:
            time.sleep(0.005)
        assert path.is_file(), "the writer saved nothing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ck = load_checkpoint(path)
    assert ck["epoch"] >= 1
    assert float(ck["model_state_dict"]["w"][0]) == ck["epoch"]
