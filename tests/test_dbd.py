"""dbd.py end to end on tiny synthetic data: stages, skipping, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dbd
from utils.cli import run_main
from utils.config import load_yaml

from .conftest import REPO_ROOT


def _write(path, cfg):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tiny_stage_configs(tmp_path, fake_cifar):
    loader = {"batch_size": 32, "num_workers": 0, "pin_memory": False}
    sup = yaml.safe_load((REPO_ROOT / "config/supervise/badnets/cifar10_resnet18/example.yaml")
                         .read_text())
    sup.update(dataset_dir=str(fake_cifar), num_epochs=2, loader=loader,
               lr_scheduler={"multi_step": {"milestones": [1]}})
    sup["backdoor"]["poison_ratio"] = 0.2
    sup["network"]["resnet18_cifar"]["width"] = 8
    pre = yaml.safe_load((REPO_ROOT / "config/defense/simclr/badnets/cifar10_resnet18/example.yaml")
                         .read_text())
    pre.update(dataset_dir=str(fake_cifar), num_epochs=2, loader=dict(loader, batch_size=64),
               simclr={"num_stage_epochs": 2, "min_interval": 1, "max_interval": 1})
    pre["backdoor"]["poison_ratio"] = 0.2
    pre["network"]["resnet18_cifar"]["width"] = 8
    root = tmp_path / "config"
    pre_path = _write(root / "defense/simclr/tiny/cifar10_resnet18/t.yaml", pre)
    ft = yaml.safe_load((REPO_ROOT / "config/defense/mixmatch_finetune/badnets/cifar10_resnet18/"
                         "example.yaml").read_text())
    ft.update(pretrain_config_path=str(pre_path), pretrain_checkpoint="epoch2.pt")
    ft["network"]["resnet18_cifar"]["width"] = 8
    ft["warmup"].update(loader=loader, num_epochs=1)
    ft["semi"].update(loader=dict(loader, batch_size=16), num_epochs=1)
    ft["semi"]["mixmatch"]["train_iteration"] = 2
    return {"supervise": _write(root / "supervise/tiny/cifar10_resnet18/t.yaml", sup),
            "simclr": pre_path,
            "finetune": _write(root / "defense/mixmatch_finetune/tiny/cifar10_resnet18/t.yaml", ft)}


def test_dbd_end_to_end_and_skip(tmp_path, fake_cifar, monkeypatch):
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    monkeypatch.setattr(dbd, "stage_configs", lambda attack, profile: paths)
    monkeypatch.setattr(dbd, "available_attacks", lambda profile: ["tiny"])
    out = tmp_path / "exp"
    dbd.main(["--attack", "tiny", "--profile", "quick", "--device", "cpu", "--out", str(out),
              "--quiet"])
    for name in ("report.md", "report.json", "leaderboard.csv", "tiny_curves.png",
                 "tiny_split_hist.png", "tiny_features.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    # a plain run keeps every stage in out/saved and out/storage (no sweep folders)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["saved", "storage"]
    report = json.loads((out / "report.json").read_text())
    entry = report["attacks"]["tiny"]
    board = (out / "leaderboard.csv").read_text().splitlines()
    assert board[0].startswith("dataset,model,attack,defense,poison_ratio,clean_acc,asr,ra")
    assert [r.split(",")[2:4] for r in board[1:]] == [["tiny", "none"], ["tiny", "dbd"]]
    assert board[2].split(",")[5] == f"{100 * entry['dbd']['BA']:.2f}"
    sup_final = json.loads((out / "saved/supervise/tiny/cifar10_resnet18/t/final_metrics.json")
                           .read_text())
    ft_final = json.loads((out / "saved/defense/mixmatch_finetune/tiny/cifar10_resnet18/t/"
                           "final_metrics.json").read_text())
    # test.py on the latest checkpoints gives the numbers the stages measured at their end
    assert entry["no_defense"]["BA"] == pytest.approx(sup_final["BA"])
    assert entry["no_defense"]["ASR"] == pytest.approx(sup_final["ASR"])
    assert entry["dbd"]["ASR"] == pytest.approx(ft_final["ASR"])
    assert entry["split"][0]["poisoned_labeled"] == ft_final["last_split"]["poisoned_labeled"]
    # the markdown table parses back to the same numbers
    rows = [r for r in (out / "report.md").read_text().splitlines() if r.startswith("| No Def")
            or r.startswith("| DBD")]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert cells[0][:2] == ["No Defense", "tiny"] and cells[1][:2] == ["DBD", "tiny"]
    assert float(cells[0][2]) == pytest.approx(100 * entry["no_defense"]["BA"], abs=0.006)
    assert float(cells[1][3]) == pytest.approx(100 * entry["dbd"]["ASR"], abs=0.006)
    assert set(entry["wall_time_s"]) >= {"No Defense (supervise.py)", "SimCLR (simclr.py)"}
    # the labelled half by true class: the split's labelled count, spread over the classes
    by_class = entry["labelled_by_class"]
    assert set(by_class) == {"first", "last"}
    for row in by_class.values():
        assert sum(row["labelled"]) == entry["split"][-1]["labeled"]
        assert sum(row["total"]) == ft_final["train_size"]
        assert all(0 <= k <= t for k, t in zip(row["labelled"], row["total"]))
    md = (out / "report.md").read_text()
    first = by_class["first"]
    assert (f"| first (epoch {first['epoch']}) | {first['labelled'][0]} / {first['total'][0]} |"
            in md)
    shares = list(entry["poisoned_neighbours"].values())
    assert len(shares) == 2 and all(0 <= v <= 1 for v in shares)

    # a second run skips every finished stage (no new checkpoint is written)
    ckpt = out / "storage/supervise/tiny/cifar10_resnet18/t/checkpoint/latest_model.pt"
    before = ckpt.stat().st_mtime_ns
    dbd.main(["--attack", "tiny", "--device", "cpu", "--out", str(out), "--quiet"])
    assert ckpt.stat().st_mtime_ns == before


def test_dbd_continues_an_interrupted_stage(tmp_path, fake_cifar, monkeypatch):
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    monkeypatch.setattr(dbd, "stage_configs", lambda attack, profile: paths)
    monkeypatch.setattr(dbd, "available_attacks", lambda profile: ["tiny"])
    out = tmp_path / "exp"
    calls = []
    real = dbd.run_stage

    def interrupt_simclr(module, config, overrides, device, quiet, cfg):
        calls.append(module.__name__)
        if module.__name__ == "simclr" and calls.count("simclr") == 1:
            # one epoch, then "killed": the checkpoint exists but the stage is not finished
            module.main(["--config", str(config), "--resume", "False", "--device", "cpu",
                         "--quiet", "--set", "num_epochs=1",
                         *sum((["--set", o] for o in overrides), [])])
            (dbd.run_dirs(cfg, *dbd.config_location(config))[0] / "final_metrics.json").unlink()
            raise KeyboardInterrupt
        return real(module, config, overrides, device, quiet, cfg)

    monkeypatch.setattr(dbd, "run_stage", interrupt_simclr)
    with pytest.raises(KeyboardInterrupt):
        dbd.main(["--attack", "tiny", "--device", "cpu", "--out", str(out), "--quiet"])
    monkeypatch.setattr(dbd, "run_stage", real)
    dbd.main(["--attack", "tiny", "--device", "cpu", "--out", str(out), "--quiet"])
    log = (out / "saved/defense/simclr/tiny/cifar10_resnet18/t/log/self_train.csv").read_text()
    assert [line.split(",")[0] for line in log.splitlines()[1:]] == ["1", "2"]
    assert "Resumed from" in (out / "saved/defense/simclr/tiny/cifar10_resnet18/t/log/"
                              "simclr.log").read_text()
    assert (out / "report.md").is_file()


def test_test_script_is_loaded_when_first_needed():
    """Importing dbd does not run test.py; the first evaluation loads it, once."""
    code = ("import sys; import dbd; assert 'dbd_test_script' not in sys.modules; "
            "m = dbd._test_script(); assert m is dbd._test_script(); "
            "assert sys.modules.get('dbd_test_script') is None and callable(m.evaluate_checkpoint)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_unknown_attack_is_a_clear_error(capsys):
    from utils.errors import UserError
    with pytest.raises(UserError, match="available"):
        dbd.main(["--attack", "nope", "--profile", "quick"])


def test_set_reaches_every_stage(tmp_path, fake_cifar, monkeypatch):
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    monkeypatch.setattr(dbd, "stage_configs", lambda attack, profile: paths)
    monkeypatch.setattr(dbd, "available_attacks", lambda profile: ["tiny"])
    seen = []

    def record(module, config, overrides, device, quiet, cfg):
        seen.append((module.__name__, list(overrides), cfg["seed"]))
        raise KeyboardInterrupt  # stop after the first stage

    monkeypatch.setattr(dbd, "run_stage", record)
    with pytest.raises(KeyboardInterrupt):
        dbd.main(["--attack", "tiny", "--device", "cpu", "--out", str(tmp_path / "exp"),
                  "--quiet", "--set", "seed.seed=7"])
    name, overrides, seed = seen[0]
    assert name == "supervise" and "seed.seed=7" in overrides
    assert seed["seed"] == 7  # the stage's resolved config has it too


def test_poisoned_neighbour_share_tells_a_cluster_from_a_mix():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(200, 8, generator=g)
    poison = np.r_[np.zeros(200, bool), np.ones(40, bool)]
    apart = torch.cat([clean, torch.randn(40, 8, generator=g) * 0.1 + 10])  # a cluster of its own
    mixed = torch.cat([clean, torch.randn(40, 8, generator=g)])  # same distribution as the rest
    assert dbd.poisoned_neighbour_share(apart, poison) == 1.0
    # mixed in: about their share of the other samples (39 / 239)
    assert abs(dbd.poisoned_neighbour_share(mixed, poison) - 39 / 239) < 0.08
    assert np.isnan(dbd.poisoned_neighbour_share(clean, np.zeros(200, bool)))


def test_label_consistent_clean_model_is_trained_first_when_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clean = load_yaml(REPO_ROOT / "config/supervise/clean/cifar10_resnet18/quick.yaml")
    clean_path = _write(tmp_path / "config/supervise/clean/cifar10_resnet18/t.yaml", clean)
    sup = {"backdoor": {"label_consistent": {"clean_model_config": str(clean_path)}}}
    args = ["saved_dir=/exp/saved", "storage_dir=/elsewhere", "speed.amp=off", "dataset_dir=/d"]
    stage = dbd.clean_model_stage(sup, args)
    assert stage is not None and stage[0] == clean_path
    assert stage[1] == ["speed.amp=off", "dataset_dir=/d"]  # all but the run folders
    # once its checkpoint exists, nothing to do; other attacks have no clean model
    ckpt = tmp_path / "storage/supervise/clean/cifar10_resnet18/t/checkpoint/latest_model.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    assert dbd.clean_model_stage(sup, args) is None
    assert dbd.clean_model_stage({"backdoor": {"poison_ratio": 0.05}}, args) is None


def test_run_attack_trains_the_clean_model_before_no_defense(tmp_path, fake_cifar, monkeypatch):
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    clean = yaml.safe_load(paths["supervise"].read_text())
    clean["backdoor"] = {"poison_ratio": 0}
    clean_path = _write(tmp_path / "config/supervise/clean/cifar10_resnet18/t.yaml", clean)
    sup = yaml.safe_load(paths["supervise"].read_text())
    sup["backdoor"] = {"label_consistent": {"clean_model_config": str(clean_path)}}
    _write(paths["supervise"], sup)
    monkeypatch.setattr(dbd, "stage_configs", lambda attack, profile: paths)
    calls = []

    def first_stage_only(module, config, *rest):
        calls.append((module.__name__, Path(config)))
        raise KeyboardInterrupt

    monkeypatch.setattr(dbd, "run_stage", first_stage_only)
    with pytest.raises(KeyboardInterrupt):
        dbd.run_attack("tiny", dbd.parse(["--attack", "tiny"]), tmp_path / "exp", "cpu")
    assert calls == [("supervise", clean_path)]


def test_set_with_a_stage_prefix_reaches_that_stage_only(tmp_path, fake_cifar, monkeypatch):
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    monkeypatch.setattr(dbd, "stage_configs", lambda attack, profile: paths)
    monkeypatch.setattr(dbd, "available_attacks", lambda profile: ["tiny"])
    seen = {}

    def record(module, config, overrides, device, quiet, cfg):
        seen[module.__name__] = (list(overrides), cfg)
        if module.__name__ == "mixmatch_finetune":
            raise KeyboardInterrupt  # every stage's overrides are seen by now
        return tmp_path / module.__name__, tmp_path / module.__name__, False

    monkeypatch.setattr(dbd, "run_stage", record)
    with pytest.raises(KeyboardInterrupt):
        dbd.main(["--attack", "tiny", "--device", "cpu", "--out", str(tmp_path / "exp"),
                  "--quiet", "--set", "seed.seed=7", "--set", "finetune:semi.num_epochs=3",
                  "--set", "simclr:num_epochs=3"])
    assert set(seen) == {"supervise", "simclr", "mixmatch_finetune"}
    for name, (overrides, cfg) in seen.items():
        assert "seed.seed=7" in overrides and cfg["seed"]["seed"] == 7
        assert ("semi.num_epochs=3" in overrides) == (name == "mixmatch_finetune")
        assert ("num_epochs=3" in overrides) == (name == "simclr")
    assert seen["mixmatch_finetune"][1]["semi"]["num_epochs"] == 3
    assert seen["simclr"][1]["num_epochs"] == 3 and seen["supervise"][1]["num_epochs"] == 2


def test_set_with_an_unknown_stage_prefix_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main(dbd.main, ["--attack", "badnets", "--out", str(tmp_path / "exp"),
                            "--set", "simclar:num_epochs=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code != 0 and len(err) == 1 and "unknown stage 'simclar'" in err[0]
    assert not (tmp_path / "exp").exists()


def test_an_interruption_says_how_to_continue(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt
    for hint, expected in ((dbd.CONTINUE_HINT, "run the same command again"),
                           (None, "--resume latest_model.pt")):
        with pytest.raises(SystemExit) as exc:
            if hint is None:
                run_main(interrupted, [])
            else:
                run_main(interrupted, [], continue_hint=hint)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 130 and len(err) == 1
        assert err[0].startswith("interrupted: ") and expected in err[0]
