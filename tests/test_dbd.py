"""dbd.py end to end on tiny synthetic data: stages, skipping, the report."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import dbd
import pipeline.plan
import pipeline.sweep
import simclr
from pipeline.experiment import clean_model_stage, run_experiment
from pipeline.plan import SharedFolders
from tools.detection import auroc, der
from tools.features import poisoned_neighbour_share
from utils.cli import run_main
from utils.config import load_yaml, parse_override
from utils.run import load_config
from utils.setup import config_location, run_dirs

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


def use_tiny_attack(mp, paths: dict) -> None:
    """Make the configs ``paths`` the attack "tiny" of every profile."""
    for module in (dbd, pipeline.plan, pipeline.sweep):
        mp.setattr(module, "stage_configs", lambda attack, profile: paths, raising=False)
    mp.setattr(dbd, "available_attacks", lambda profile: ["tiny"])


def saved_dir_of(args) -> Path:
    """The run folder a stage's arguments write to."""
    return run_dirs(args.folders.apply({}), *config_location(args.config))[0]


def test_dbd_end_to_end_and_skip(tmp_path, fake_cifar, monkeypatch):
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    use_tiny_attack(monkeypatch, paths)
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
    ft_dir = out / "saved/defense/mixmatch_finetune/tiny/cifar10_resnet18/t"
    ft_final = json.loads((ft_dir / "final_metrics.json").read_text())
    # test.py on the latest checkpoints gives the numbers the stages measured at their end
    assert entry["no_defense"]["BA"] == pytest.approx(sup_final["BA"])
    assert entry["no_defense"]["ASR"] == pytest.approx(sup_final["ASR"])
    assert entry["dbd"]["ASR"] == pytest.approx(ft_final["ASR"])
    assert entry["split"][0]["poisoned_labelled"] == ft_final["last_split"]["poisoned_labelled"]
    # the markdown table parses back to the same numbers
    rows = [r for r in (out / "report.md").read_text().splitlines() if r.startswith("| No Def")
            or r.startswith("| DBD")]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert cells[0][:2] == ["No Defense", "tiny"] and cells[1][:2] == ["DBD", "tiny"]
    assert float(cells[0][2]) == pytest.approx(100 * entry["no_defense"]["BA"], abs=0.006)
    assert float(cells[1][3]) == pytest.approx(100 * entry["dbd"]["ASR"], abs=0.006)
    assert set(entry["wall_time_s"]) >= {"No Defense (supervise.py)", "SimCLR (simclr.py)"}
    # the labelled half by true class: exactly the split's labelled samples, counted by class
    by_class = entry["labelled_by_class"]
    assert set(by_class) == {"first", "last"}
    for tag, row in by_class.items():
        split = np.load(ft_dir / f"split_losses_{tag}.npz")
        labelled = split["origin"][split["semi_idx"] == 1]
        assert row["labelled"] == np.bincount(labelled, minlength=10).tolist()
        assert row["total"] == np.bincount(split["origin"], minlength=10).tolist()
    assert sum(by_class["last"]["labelled"]) == entry["split"][-1]["labelled"]
    md = (out / "report.md").read_text()
    assert "Split: global (the original's)." in md and entry["setting"]["split"].startswith("global")
    first = by_class["first"]
    assert "| split | airplane | automobile | bird | cat |" in md  # class names, not numbers
    assert (f"| first (epoch {first['epoch']}) | {first['labelled'][0]} / {first['total'][0]} |"
            in md)
    # the poisoned samples' neighbours: a mean over the (all, < 300) poisoned samples of the
    # poisoned share of their 10 nearest, so a multiple of 1 / (10 n); the report says both
    shares = entry["poisoned_neighbours"]
    n = sup_final["poisoned"]
    assert len(shares) == 2 and 0 < n < 300
    for v in shares.values():
        assert abs(v * 10 * n - round(v * 10 * n)) < 1e-3 and f"{100 * v:.0f} %" in md

    # the split as a detector: the figures are those of the saved losses and flags
    last = np.load(ft_dir / "split_losses_last.npz")
    first_split = np.load(ft_dir / "split_losses_first.npz")
    det = entry["detection"]
    assert det["first"]["auroc"] == pytest.approx(auroc(first_split["losses"],
                                                        first_split["poison"]))
    assert det["last"]["decision"]["tp"] == int(((last["semi_idx"] == 0) & (last["poison"] == 1))
                                                 .sum())
    assert det["last"]["decision"]["recall"] == pytest.approx(entry["split"][-1]["recall"])
    assert "### The split as a poisoned-sample detector" in md
    for table in (out / "suspected_poison.csv", ft_dir / "suspected_poison.csv"):
        rows = list(csv.DictReader(table.open()))
        assert len(rows) == sup_final["train_size"] == len(last["losses"])
        assert list(rows[0]) == ["index", "label", "score_first", "score_last", "labelled_last",
                                 "poisoned"]
        assert [int(r["poisoned"]) for r in rows] == last["poison"].tolist()
        assert [int(r["labelled_last"]) for r in rows] == last["semi_idx"].tolist()
        assert [int(r["label"]) for r in rows] == last["targets"].tolist()
        assert np.allclose([float(r["score_last"]) for r in rows], last["losses"], rtol=1e-5)
    # DER from the two models' figures, in the report and the leaderboard's dbd row
    nd, d = entry["no_defense"], entry["dbd"]
    assert entry["der"] == pytest.approx(der(nd["BA"], nd["ASR"], d["BA"], d["ASR"]))
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert rows[1]["der"] == f"{100 * entry['der']:.2f}" and rows[0]["der"] == ""
    assert float(rows[0]["supervise_s"]) > 0 and rows[0]["simclr_s"] == ""
    for row, m in zip(rows, (nd, d)):  # ASR's floor and the trigger's lift
        assert m["lift"] == pytest.approx(m["ASR"] - m["floor"])
        assert row["asr_floor"] == f"{100 * m['floor']:.2f}"
    assert float(rows[1]["simclr_s"]) > 0 and float(rows[1]["finetune_s"]) > 0

    # a second run skips every finished stage (no new checkpoint is written)
    ckpt = out / "storage/supervise/tiny/cifar10_resnet18/t/checkpoint/latest_model.pt"
    before = ckpt.stat().st_mtime_ns
    dbd.main(["--attack", "tiny", "--device", "cpu", "--out", str(out), "--quiet"])
    assert ckpt.stat().st_mtime_ns == before


def test_dbd_continues_an_interrupted_stage(tmp_path, fake_cifar, monkeypatch):
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    use_tiny_attack(monkeypatch, paths)
    out = tmp_path / "exp"
    calls = []

    def interrupt_simclr(args):
        calls.append(args)
        if len(calls) == 1:
            # one epoch, then "killed": the checkpoint exists but the stage is not finished
            simclr.train(dataclasses.replace(
                args, overrides=args.overrides + (parse_override("num_epochs=1"),)))
            (saved_dir_of(args) / "final_metrics.json").unlink()
            raise KeyboardInterrupt
        return simclr.train(args)

    monkeypatch.setitem(dbd.RUNNERS, "simclr", interrupt_simclr)
    with pytest.raises(KeyboardInterrupt):
        dbd.main(["--attack", "tiny", "--device", "cpu", "--out", str(out), "--quiet"])
    dbd.main(["--attack", "tiny", "--device", "cpu", "--out", str(out), "--quiet"])
    assert [a.resume for a in calls] == ["False", "latest_model.pt"]
    log = (out / "saved/defense/simclr/tiny/cifar10_resnet18/t/log/self_train.csv").read_text()
    assert [line.split(",")[0] for line in log.splitlines()[1:]] == ["1", "2"]
    assert "Resumed from" in (out / "saved/defense/simclr/tiny/cifar10_resnet18/t/log/"
                              "simclr.log").read_text()
    assert (out / "report.md").is_file()


def test_no_entry_script_is_loaded_by_path():
    """The project loads no module from a file path (test.py's name shadows the standard
    library's ``test``, so it is run, never imported): the evaluation lives in
    ``pipeline.evaluate``, which test.py and dbd.py both call."""
    code = [p for p in REPO_ROOT.rglob("*.py")
            if not {"tests", ".venv", "experiments"} & set(p.relative_to(REPO_ROOT).parts)]
    assert len(code) > 40
    for p in code:
        text = p.read_text()
        for name in ("spec_from_file_location", "exec_module", "run_path", "import_module"):
            assert name not in text, f"{p.relative_to(REPO_ROOT)} uses {name}"
    probe = ("import sys, dbd, pipeline.evaluate as e, pipeline.experiment as x; "
             "import os; here = os.path.abspath('test.py'); "
             "assert not [m for m in list(sys.modules.values()) "
             "if os.path.abspath(getattr(m, '__file__', None) or '') == here]; "
             "assert x.evaluate_checkpoint is e.evaluate_checkpoint")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "from pipeline.evaluate import" in (REPO_ROOT / "test.py").read_text()


def test_unknown_attack_is_a_clear_error(capsys):
    from utils.errors import UserError
    with pytest.raises(UserError, match="available"):
        dbd.main(["--attack", "nope", "--profile", "quick"])


def _recording_runners(monkeypatch, seen: dict, stop_at: str = "finetune"):
    """Replace the stages by ones that record their arguments and resolved configs."""
    for name in dbd.RUNNERS:
        def record(args, name=name):
            cfg = (pipeline.plan.resolve_stage(name, args))
            seen[name] = (args, cfg)
            if name == stop_at:
                raise KeyboardInterrupt  # every stage's arguments are seen by now
            saved = saved_dir_of(args)  # "finished", so the next stage runs
            saved.mkdir(parents=True, exist_ok=True)
            (saved / "final_metrics.json").write_text("{}")
            if name == "simclr":
                (saved / "poison_idx.npy").write_bytes(b"")
        monkeypatch.setitem(dbd.RUNNERS, name, record)


def test_set_reaches_every_stage(tmp_path, fake_cifar, monkeypatch):
    use_tiny_attack(monkeypatch, tiny_stage_configs(tmp_path, fake_cifar))
    seen = {}
    _recording_runners(monkeypatch, seen, stop_at="supervise")
    with pytest.raises(KeyboardInterrupt):
        dbd.main(["--attack", "tiny", "--device", "cpu", "--out", str(tmp_path / "exp"),
                  "--quiet", "--set", "seed.seed=7"])
    args, cfg = seen["supervise"]
    assert parse_override("seed.seed=7") in args.overrides
    assert cfg["seed"]["seed"] == 7 and load_config(args)["seed"]["seed"] == 7
    # the run folders come as values, placed by --out
    assert args.folders == (tmp_path / "exp/saved", tmp_path / "exp/storage")
    assert cfg["saved_dir"] == str(tmp_path / "exp/saved")


def test_poisoned_neighbour_share_tells_a_cluster_from_a_mix():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(200, 8, generator=g)
    poison = np.r_[np.zeros(200, bool), np.ones(40, bool)]
    apart = torch.cat([clean, torch.randn(40, 8, generator=g) * 0.1 + 10])  # a cluster of its own
    mixed = torch.cat([clean, torch.randn(40, 8, generator=g)])  # same distribution as the rest
    assert poisoned_neighbour_share(apart, poison) == 1.0
    # mixed in: about their share of the other samples (39 / 239)
    assert abs(poisoned_neighbour_share(mixed, poison) - 39 / 239) < 0.08
    assert np.isnan(poisoned_neighbour_share(clean, np.zeros(200, bool)))


def test_label_consistent_clean_model_is_trained_first_when_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clean = load_yaml(REPO_ROOT / "config/supervise/clean/cifar10_resnet18/quick.yaml")
    clean_path = _write(tmp_path / "config/supervise/clean/cifar10_resnet18/t.yaml", clean)
    sup = SimpleNamespace(cfg={"backdoor": {"label_consistent": {
        "clean_model_config": str(clean_path)}}})
    given = [parse_override(o) for o in ("speed.amp=off", "dataset_dir=/d",
                                         "finetune:semi.epsilon=0.4")]
    stage = clean_model_stage(sup, given, "cpu", True)
    assert stage is not None and stage[0].config == clean_path
    # the overrides every stage takes; a stage's own ones stay with that stage
    assert [str(o) for o in stage[0].overrides] == ["speed.amp=off", "dataset_dir=/d"]
    assert stage[1]["dataset_dir"] == "/d" and stage[0].folders is None
    # once its checkpoint exists, nothing to do; other attacks have no clean model
    ckpt = tmp_path / "storage/supervise/clean/cifar10_resnet18/t/checkpoint/latest_model.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    assert clean_model_stage(sup, given, "cpu", True) is None
    badnets = load_yaml(REPO_ROOT / "config/supervise/badnets/cifar10_resnet18/quick.yaml")
    assert clean_model_stage(SimpleNamespace(cfg=badnets), given, "cpu", True) is None


def test_the_clean_model_is_trained_before_no_defense(tmp_path, fake_cifar, monkeypatch):
    paths = tiny_stage_configs(tmp_path, fake_cifar)
    clean = yaml.safe_load(paths["supervise"].read_text())
    clean["backdoor"] = {"poison_ratio": 0}
    clean_path = _write(tmp_path / "config/supervise/clean/cifar10_resnet18/t.yaml", clean)
    sup = yaml.safe_load(paths["supervise"].read_text())
    sup["backdoor"] = {"target_label": 3, "poison_ratio": 0.05,
                       "label_consistent": {"clean_model_config": str(clean_path)}}
    _write(paths["supervise"], sup)
    use_tiny_attack(monkeypatch, paths)
    calls = []

    def first_stage_only(args):
        calls.append(Path(args.config))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment("tiny", "quick", [], SharedFolders(tmp_path / "exp"), tmp_path / "exp",
                       "cpu", {"supervise": first_stage_only})
    assert calls == [clean_path]


def test_set_with_a_stage_prefix_reaches_that_stage_only(tmp_path, fake_cifar, monkeypatch):
    use_tiny_attack(monkeypatch, tiny_stage_configs(tmp_path, fake_cifar))
    seen = {}
    _recording_runners(monkeypatch, seen)
    with pytest.raises(KeyboardInterrupt):
        dbd.main(["--attack", "tiny", "--device", "cpu", "--out", str(tmp_path / "exp"),
                  "--quiet", "--set", "seed.seed=7", "--set", "finetune:semi.num_epochs=3",
                  "--set", "simclr:num_epochs=3"])
    assert set(seen) == {"supervise", "simclr", "finetune"}
    for name, (args, cfg) in seen.items():
        given = [str(o) for o in args.overrides]
        assert "seed.seed=7" in given and cfg["seed"]["seed"] == 7
        assert ("semi.num_epochs=3" in given) == (name == "finetune")
        assert ("num_epochs=3" in given) == (name == "simclr")
    assert seen["finetune"][1]["semi"]["num_epochs"] == 3
    assert seen["simclr"][1]["num_epochs"] == 3 and seen["supervise"][1]["num_epochs"] == 2


@pytest.mark.parametrize("item, message", [("simclar:num_epochs=2", "unknown stage 'simclar'"),
                                           ("saved_dir=/x", "use --out")])
def test_bad_set_for_dbd_is_a_clear_error(tmp_path, capsys, item, message):
    with pytest.raises(SystemExit) as exc:
        run_main(dbd.main, ["--attack", "badnets", "--out", str(tmp_path / "exp"),
                            "--set", item])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code != 0 and len(err) == 1 and message in err[0]
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
