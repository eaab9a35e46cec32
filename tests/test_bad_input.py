"""Every kind of bad input: one 'error:' line, a non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mixmatch_finetune
import simclr
import supervise
from utils.cli import run_main

from .conftest import REPO_ROOT, write_fake_cifar

SCRIPTS = {"supervise": supervise, "simclr": simclr, "finetune": mixmatch_finetune}


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.fixture
def env(tmp_path, fake_cifar):
    """Configs for the three stages on the fake data, plus a finished tiny SimCLR checkpoint."""
    def load(rel):
        return yaml.safe_load((REPO_ROOT / rel).read_text())
    common = dict(dataset_dir=str(fake_cifar), saved_dir=str(tmp_path / "saved"),
                  storage_dir=str(tmp_path / "storage"))
    sup = load("config/supervise/badnets/cifar10_resnet18/example.yaml") | common
    pre = load("config/defense/simclr/badnets/cifar10_resnet18/example.yaml") | common
    ft = load("config/defense/mixmatch_finetune/badnets/cifar10_resnet18/example.yaml")
    paths = {}
    for name, cfg in (("supervise", sup), ("simclr", pre)):
        p = tmp_path / "config" / name / "t.yaml"
        p.parent.mkdir(parents=True)
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        paths[name] = p
    ft["pretrain_config_path"] = str(paths["simclr"])
    p = tmp_path / "config" / "finetune" / "t.yaml"
    p.parent.mkdir(parents=True)
    p.write_text(yaml.safe_dump(ft, sort_keys=False))
    paths["finetune"] = p
    # an existing run folder with results that must survive every failed command
    ckpt_dir = tmp_path / "storage" / "simclr" / "t" / "checkpoint"
    ckpt_dir.mkdir(parents=True)
    (tmp_path / "saved" / "simclr" / "t").mkdir(parents=True)
    np.save(tmp_path / "saved" / "simclr" / "t" / "poison_idx.npy", np.zeros(200))
    from model import SelfModel, resnet18_cifar
    torch.save({"epoch": 100, "model_state_dict": SelfModel(resnet18_cifar()).state_dict()},
               ckpt_dir / "epoch100.pt")
    return tmp_path, paths


def _write(tmp_path, name, text):
    p = tmp_path / "config" / "bad" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


def _edit(paths, stage, tmp_path, fn):
    cfg = yaml.safe_load(paths[stage].read_text())
    fn(cfg)
    return _write(tmp_path, f"{stage}_edited.yaml", yaml.safe_dump(cfg, sort_keys=False))


def _junk_dataset(tmp_path, kind):
    d = write_fake_cifar(tmp_path / f"cifar_{kind}")
    if kind == "incomplete":
        (d / "data_batch_3").unlink()
    else:
        # A fixed junk batch whose first byte is pickle's persistent-id opcode: pickle's
        # reason for it spans two lines, which the error must still print as one.
        (d / "data_batch_2").write_bytes(b"Q" + random.Random(2).randbytes(2999))
    return str(d)


def _bad_trigger(tmp_path, kind):
    p = tmp_path / f"trigger_{kind}.png"
    if kind == "unreadable":
        p.write_bytes(b"not a png")
    else:
        from PIL import Image
        Image.new("RGB", (16, 16)).save(p)
    return str(p)


CASES = [
    # (id, stage, argv builder, expected text in the message)
    ("config missing", "supervise", lambda t, p: ["--config", str(t / "nope.yaml")], "not found"),
    ("yaml syntax", "supervise",
     lambda t, p: ["--config", _write(t, "syntax.yaml", "seed: {seed: 100\nnum_classes: 10\n")],
     "line"),
    ("unknown top key", "supervise",
     lambda t, p: ["--config", _edit(p, "supervise", t, lambda c: c.update(num_epoch=3))],
     "num_epoch"),
    ("unknown nested key in file", "supervise",
     lambda t, p: ["--config", _edit(p, "supervise", t,
                                     lambda c: c["loader"].update(batchsize=3))], "batchsize"),
    ("unknown seed key in file", "simclr",
     lambda t, p: ["--config", _edit(p, "simclr", t, lambda c: c["seed"].update(sed=1))],
     "seed.sed"),
    ("wrong type in file", "supervise",
     lambda t, p: ["--config", _edit(p, "supervise", t, lambda c: c.update(num_epochs="ten"))],
     "num_epochs"),
    ("unknown --set key", "simclr",
     lambda t, p: ["--config", str(p["simclr"]), "--set", "optimizer.SGD.moment=0.9"],
     "optimizer.SGD.moment"),
    ("wrong --set type", "simclr",
     lambda t, p: ["--config", str(p["simclr"]), "--set", "loader.batch_size=big"],
     "loader.batch_size"),
    ("poison_ratio range", "supervise",
     lambda t, p: ["--config", str(p["supervise"]), "--set", "backdoor.poison_ratio=-0.1"],
     "poison_ratio"),
    ("target_label range", "simclr",
     lambda t, p: ["--config", str(p["simclr"]), "--set", "backdoor.target_label=10"],
     "target_label"),
    ("batch size", "supervise",
     lambda t, p: ["--config", str(p["supervise"]), "--set", "loader.batch_size=-4"],
     "batch_size"),
    ("speed.data_path value", "supervise",
     lambda t, p: ["--config", _edit(p, "supervise", t,
                                     lambda c: c.update(speed={"data_path": "gpu"}))],
     "speed.data_path"),
    ("epsilon range", "finetune",
     lambda t, p: ["--config", str(p["finetune"]), "--set", "semi.epsilon=1.0"], "epsilon"),
    ("dataset missing", "supervise",
     lambda t, p: ["--config", str(p["supervise"]), "--set", f"dataset_dir={t}/cifar_none"],
     "python -m data.download cifar10"),
    ("dataset incomplete", "simclr",
     lambda t, p: ["--config", str(p["simclr"]), "--set",
                   f"dataset_dir={_junk_dataset(t, 'incomplete')}"], "data_batch_3"),
    ("dataset corrupt", "supervise",
     lambda t, p: ["--config", str(p["supervise"]), "--set",
                   f"dataset_dir={_junk_dataset(t, 'corrupt')}"], "data_batch_2"),
    ("trigger missing", "supervise",
     lambda t, p: ["--config", str(p["supervise"]), "--set",
                   f"backdoor.badnets.trigger_path={t}/none.png"], "none.png"),
    ("trigger unreadable", "simclr",
     lambda t, p: ["--config", str(p["simclr"]), "--set",
                   f"backdoor.badnets.trigger_path={_bad_trigger(t, 'unreadable')}"],
     "trigger_unreadable.png"),
    ("trigger wrong size", "supervise",
     lambda t, p: ["--config", str(p["supervise"]), "--set",
                   f"backdoor.badnets.trigger_path={_bad_trigger(t, 'small')}"], "16x16"),
    ("resume checkpoint missing", "supervise",
     lambda t, p: ["--config", str(p["supervise"]), "--resume", "latest_model.pt"], "not found"),
    ("resume checkpoint random bytes", "simclr",
     lambda t, p: ["--config", str(p["simclr"]), "--resume", _junk_ckpt(t, "random")],
     "not a PyTorch checkpoint"),
    ("pretrain checkpoint truncated", "finetune",
     lambda t, p: ["--config", str(p["finetune"]), "--set", "pretrain_checkpoint=cut.pt"],
     "cut.pt"),
    ("device cuda without CUDA", "supervise",
     lambda t, p: ["--config", str(p["supervise"]), "--device", "cuda"], "CUDA"),
]


def _junk_ckpt(tmp_path, kind):
    p = tmp_path / f"{kind}.pt"
    p.write_bytes(random.Random(5).randbytes(5000))
    return str(p)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, env, capsys):
    name, stage, build, expected = case
    tmp_path, paths = env
    if name == "device cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if name == "pretrain checkpoint truncated":
        good = tmp_path / "storage/simclr/t/checkpoint/epoch100.pt"
        (good.parent / "cut.pt").write_bytes(good.read_bytes()[: 20000])
    argv = build(tmp_path, paths)
    if "--resume" not in argv:
        argv += ["--resume", "False"]
    before = snapshot(tmp_path / "saved"), snapshot(tmp_path / "storage")
    with pytest.raises(SystemExit) as exc:
        run_main(SCRIPTS[stage].main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected in err[0], err[0]
    assert "Traceback" not in err[0]
    assert (snapshot(tmp_path / "saved"), snapshot(tmp_path / "storage")) == before


def test_a_reason_with_line_breaks_is_printed_on_one_line(capsys):
    from utils.errors import DatasetError

    def main(argv):
        raise DatasetError("first part,\nsecond part\r\n  third")

    with pytest.raises(SystemExit) as exc:
        run_main(main, [])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "error: first part, second part third\n"
