"""dbd.py --sweep on tiny synthetic data: shared stage runs, continuing, the combined report,
bad input; and the leaderboard CSV of an experiment."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

import dbd
import pipeline.experiment
from pipeline.plan import STAGES, SharedFolders, SweepFolders, plan_experiment
from pipeline.sweep import parse_sweep, split_values
from tools.report import LEADERBOARD_COLUMNS
from utils.cli import run_main
from utils.config import parse_override

from .test_dbd import saved_dir_of, tiny_stage_configs, use_tiny_attack

CKPT_SWEEP = "finetune:pretrain_checkpoint=epoch1.pt,epoch2.pt"


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _runs(out: Path) -> dict[str, list[str]]:
    """Stage run folders of a sweep, by stage."""
    names = sorted(p.name for p in (out / "runs").iterdir())
    return {s: [n for n in names if n.startswith(s + "-")] for s in STAGES}


class Recorder:
    """Counts the stages that ran (or continued) and the test evaluations."""

    def __init__(self, mp, interrupt_finetune_of: str | None = None):
        self.ran, self.evaluated = [], []
        self.interrupt = interrupt_finetune_of
        real_eval = pipeline.experiment.evaluate_checkpoint
        for name, train in dict(dbd.RUNNERS).items():
            mp.setitem(dbd.RUNNERS, name, self._wrap(name, train))

        def evaluate(cfg, ckpt, device):
            self.evaluated.append(str(ckpt))
            return real_eval(cfg, ckpt, device)

        mp.setattr(pipeline.experiment, "evaluate_checkpoint", evaluate)

    def _wrap(self, name, train):
        def run(args):
            if (self.interrupt and name == "finetune"
                    and parse_override(f"pretrain_checkpoint={self.interrupt}") in args.overrides):
                # the warm-up epoch, then "killed": a checkpoint but no final metrics
                self.interrupt = None
                train(dataclasses.replace(
                    args, overrides=args.overrides + (parse_override("semi.num_epochs=0"),)))
                (saved_dir_of(args) / "final_metrics.json").unlink()
                raise KeyboardInterrupt
            self.ran.append((name, str(saved_dir_of(args))))
            return train(args)
        return run

    def count(self, name: str) -> int:
        return sum(n == name for n, _ in self.ran)


def _tiny(mp, root: Path, fake_cifar) -> None:
    use_tiny_attack(mp, tiny_stage_configs(root, fake_cifar))


def _sweep(out: Path, spec: str) -> None:
    dbd.main(["--attack", "tiny", "--device", "cpu", "--out", str(out), "--quiet",
              "--sweep", spec])


@pytest.fixture(scope="module")
def ckpt_sweep(tmp_path_factory, fake_cifar):
    """One uninterrupted sweep over the SimCLR checkpoint the fine-tuning starts from."""
    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        _tiny(mp, root, fake_cifar)
        rec = Recorder(mp)
        _sweep(root / "sweep", CKPT_SWEEP)
    return root / "sweep", rec


def test_a_finetune_key_shares_no_defense_and_simclr(ckpt_sweep):
    out, rec = ckpt_sweep
    assert (rec.count("supervise"), rec.count("simclr"), rec.count("finetune")) == (1, 1, 2)
    runs = _runs(out)
    assert [len(runs[s]) for s in ("supervise", "simclr", "finetune")] == [1, 1, 2]
    # No Defense is evaluated once, each fine-tuned model once
    assert len(rec.evaluated) == 3 and len(set(rec.evaluated)) == 3
    # each stage run says what it computes; the fine-tuning names the SimCLR run it builds on
    simclr_key = runs["simclr"][0].split("-", 1)[1]
    for name in runs["finetune"]:
        stage = json.loads((out / "runs" / name / "stage.json").read_text())
        assert stage["after"] == {"simclr": simclr_key} and stage["wall_time_s"] > 0
        assert name == f"finetune-{stage['key']}"
    picked = {json.loads((out / "runs" / n / "stage.json").read_text())["resolved"]
              ["pretrain_checkpoint"] for n in runs["finetune"]}
    assert picked == {"epoch1.pt", "epoch2.pt"}
    # the fine-tuning loaded the SimCLR run's checkpoint it was given
    for n in runs["finetune"]:
        log = next((out / "runs" / n / "saved").rglob("mixmatch_finetune.log")).read_text()
        assert str(out / "runs" / runs["simclr"][0] / "storage") in log


def test_the_combined_report_equals_the_experiments(ckpt_sweep):
    out, _ = ckpt_sweep
    for name in ("sweep.md", "sweep.json", "sweep.csv", "sweep.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["key"] == "finetune:pretrain_checkpoint"
    assert [v["value"] for v in sweep["values"]] == ["epoch1.pt", "epoch2.pt"]
    csv_rows = _rows(out / "sweep.csv")
    assert list(csv_rows[0]) == ["key", "value", *LEADERBOARD_COLUMNS]
    md = (out / "sweep.md").read_text()
    for v in sweep["values"]:
        exp = out / v["folder"]
        entry = json.loads((exp / "report.json").read_text())["attacks"]["tiny"]
        for model in ("no_defense", "dbd"):
            assert v[model] == {k: entry[model][k] for k in ("BA", "ASR", "RA", "floor", "lift")}
        assert v["split_first"]["poisoned_labelled"] == entry["split"][0]["poisoned_labelled"]
        assert v["split_last"]["poisoned_labelled"] == entry["split"][-1]["poisoned_labelled"]
        # the warm-up model's figures are the fine-tuning's test rows of its last warm-up epoch
        log = Path(v["stage_runs"]["finetune"]) / "log"
        assert v["warmup"]["epoch"] == 1
        assert v["warmup"]["BA"] == float(_rows(log / "clean_test.csv")[0]["BA"])
        assert float(v["warmup"]["ASR"]) == float(_rows(log / "poison_test.csv")[0]["ASR"])
        # DBD after every fine-tuning epoch, and the labelled count per class, in sweep.md too
        clean, poison = _rows(log / "clean_test.csv"), _rows(log / "poison_test.csv")
        assert [r["epoch"] for r in v["epochs"]] == [int(r["epoch"]) for r in clean]
        assert [r["BA"] for r in v["epochs"]] == [float(r["BA"]) for r in clean]
        assert [r["ASR"] for r in v["epochs"]] == [float(r["ASR"]) for r in poison]
        series = " ".join(f"{100 * float(r['BA']):.2f}" for r in clean)
        assert f"| {v['value']} | {series} | " in md
        assert v["labelled_by_class"] == entry["labelled_by_class"]
        last = entry["labelled_by_class"]["last"]
        cells = " | ".join(f"{k} / {m}" for k, m in zip(last["labelled"], last["total"]))
        assert f"| {v['value']} | last (epoch {last['epoch']}) | {cells} |" in md
        # each value's folder keeps its normal report, and its leaderboard rows are the sweep's
        assert (exp / "report.md").is_file() and (exp / "tiny_curves.png").is_file()
        mine = [{k: r[k] for k in LEADERBOARD_COLUMNS} for r in csv_rows
                if r["value"] == v["value"]]
        assert mine == _rows(exp / "leaderboard.csv")
        nd = v["no_defense"]
        assert (f"| [{v['value']}]({v['folder']}/report.md) | {100 * nd['BA']:.2f} | "
                f"{100 * nd['ASR']:.2f} | {100 * nd['RA']:.2f} |") in md
    # one No Defense model for both values
    assert len({v["stage_runs"]["supervise"] for v in sweep["values"]}) == 1
    assert len({v["stage_runs"]["finetune"] for v in sweep["values"]}) == 2


def test_leaderboard_csv_has_one_row_per_model(ckpt_sweep):
    out, _ = ckpt_sweep
    exp = out / json.loads((out / "sweep.json").read_text())["values"][0]["folder"]
    rows = _rows(exp / "leaderboard.csv")
    assert list(rows[0]) == list(LEADERBOARD_COLUMNS)
    assert [r["defense"] for r in rows] == ["none", "dbd"]
    report = json.loads((exp / "report.json").read_text())
    entry = report["attacks"]["tiny"]
    final = json.loads(next((out / "runs").glob("supervise-*/saved/**/final_metrics.json"))
                       .read_text())
    for row, key in zip(rows, ("no_defense", "dbd")):
        assert (row["dataset"], row["model"], row["attack"]) == ("cifar10", "resnet18_cifar",
                                                                 "tiny")
        assert float(row["poison_ratio"]) == 0.2 and row["profile"] == report["profile"]
        assert int(row["train_size"]) == final["train_size"] == 200
        assert int(row["test_size"]) == entry[key].get("clean_images", 100) == 100
        for col, metric in (("clean_acc", "BA"), ("asr", "ASR"), ("ra", "RA")):
            assert row[col] == f"{100 * entry[key][metric]:.2f}"


def test_an_unprefixed_key_reruns_every_stage(tmp_path, fake_cifar, monkeypatch):
    _tiny(monkeypatch, tmp_path, fake_cifar)
    rec = Recorder(monkeypatch)
    out = tmp_path / "sweep"
    _sweep(out, "backdoor.poison_ratio=0.1,0.2")
    assert (rec.count("supervise"), rec.count("simclr"), rec.count("finetune")) == (2, 2, 2)
    assert [len(v) for v in _runs(out).values()] == [2, 2, 2]
    rows = _rows(out / "sweep.csv")
    assert [(r["value"], r["poison_ratio"], r["defense"]) for r in rows] == [
        ("0.1", "0.1", "none"), ("0.1", "0.1", "dbd"), ("0.2", "0.2", "none"), ("0.2", "0.2", "dbd")]
    # a finished sweep run again runs nothing and evaluates nothing
    rec.ran.clear()
    rec.evaluated.clear()
    _sweep(out, "backdoor.poison_ratio=0.1,0.2")
    assert rec.ran == [] and rec.evaluated == []


def test_which_stages_a_key_changes(tmp_path, fake_cifar, monkeypatch):
    """The stage keys that name the run folders change exactly where the resolved configs (or
    the runs they build on) change."""
    _tiny(monkeypatch, tmp_path, fake_cifar)
    placement = SweepFolders(tmp_path / "s")

    def keys(*overrides):
        plan = plan_experiment("tiny", "quick", list(map(parse_override, overrides)), placement)
        return [plan[s].key for s in ("supervise", "simclr", "finetune")]

    base = keys()
    assert keys() == base  # the same settings, the same runs
    for item, changed in (("finetune:semi.epsilon=0.3", [False, False, True]),
                          ("simclr:num_epochs=3", [False, True, True]),
                          ("backdoor.poison_ratio=0.1", [True, True, True]),
                          ("supervise:num_epochs=3", [True, False, False])):
        assert [a != b for a, b in zip(keys(item), base)] == changed, item
    # the run folders do not count: a plain run's placement gives the same keys
    plain = plan_experiment("tiny", "quick", [], SharedFolders(tmp_path / "p"))
    assert [plain[s].key for s in ("supervise", "simclr", "finetune")] == base
    # a plain run's fine-tuning finds the SimCLR run in its own folders, as the original
    assert plain["finetune"].args.pretrain_folders is None
    assert plain["finetune"].args.folders == (tmp_path / "p/saved", tmp_path / "p/storage")


def test_an_interrupted_sweep_continues(tmp_path, fake_cifar, monkeypatch, ckpt_sweep):
    _tiny(monkeypatch, tmp_path, fake_cifar)
    out = tmp_path / "sweep"
    rec = Recorder(monkeypatch, interrupt_finetune_of="epoch2.pt")
    with pytest.raises(KeyboardInterrupt):
        _sweep(out, CKPT_SWEEP)
    first = set(rec.ran)
    assert [n for n, _ in rec.ran] == ["supervise", "simclr", "finetune"]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("latest_model.pt")}
    assert len(stamps) == 4  # the second fine-tuning has its warm-up checkpoint
    rec.ran.clear()
    _sweep(out, CKPT_SWEEP)
    # only the interrupted fine-tuning ran again, continuing from its checkpoint
    assert [n for n, _ in rec.ran] == ["finetune"] and not first & set(rec.ran)
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t]
    assert len(changed) == 1 and "finetune-" in changed[0].relative_to(out / "runs").parts[0]
    log = next(Path(rec.ran[0][1]).glob("log/mixmatch_finetune.log")).read_text()
    assert "Resumed from" in log
    # the same figures as the uninterrupted sweep
    whole = json.loads((ckpt_sweep[0] / "sweep.json").read_text())["values"]
    again = json.loads((out / "sweep.json").read_text())["values"]
    for a, b in zip(whole, again):
        for k in ("value", "no_defense", "dbd", "split_first", "split_last", "warmup"):
            assert a[k] == b[k], k


def test_a_sweep_reuses_the_finished_stages_of_other_experiments(tmp_path, fake_cifar,
                                                                  monkeypatch, ckpt_sweep):
    _tiny(monkeypatch, tmp_path, fake_cifar)
    rec = Recorder(monkeypatch)
    plain = tmp_path / "plain"
    dbd.main(["--attack", "tiny", "--device", "cpu", "--out", str(plain), "--quiet"])
    assert [n for n, _ in rec.ran] == ["supervise", "simclr", "finetune"]
    before = {p: p.stat().st_mtime_ns for p in plain.rglob("*") if p.is_file()}
    rec.ran.clear()
    rec.evaluated.clear()
    out = tmp_path / "sweep"
    argv = ["--attack", "tiny", "--device", "cpu", "--out", str(out), "--quiet", "--sweep",
            CKPT_SWEEP, "--reuse", str(plain)]
    dbd.main(argv)
    # No Defense, SimCLR and the epoch2.pt fine-tuning (the plain run's) are not trained again
    assert [n for n, _ in rec.ran] == ["finetune"]
    log = Path(rec.ran[0][1]).joinpath("log/mixmatch_finetune.log").read_text()
    # it fine-tuned the plain run's SimCLR checkpoint of epoch 1
    assert str(plain / "storage") in log and "epoch1.pt" in log
    assert {p: p.stat().st_mtime_ns for p in plain.rglob("*") if p.is_file()} == before
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*/stage.json")]
    assert sorted(r["stage"] for r in records if "reused" in r) == ["finetune", "simclr",
                                                                    "supervise"]
    # the figures of the sweep made from scratch
    whole = json.loads((ckpt_sweep[0] / "sweep.json").read_text())["values"]
    again = json.loads((out / "sweep.json").read_text())["values"]
    for a, b in zip(whole, again):
        for k in ("value", "no_defense", "dbd", "split_first", "split_last", "warmup"):
            assert a[k] == b[k], k
    # a sweep folder is reusable too: another sweep over the same runs trains nothing
    rec.ran.clear()
    dbd.main([*argv[:5], str(tmp_path / "sweep2"), *argv[6:-1], str(out)])
    assert rec.ran == []


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "simclar:num_epochs=1,2"], "unknown stage 'simclar'"),
    (["--sweep", "finetune:semi.epsilon"], "expects [STAGE:]KEY=V1,V2"),
    (["--sweep", "finetune:semi.epsilon="], "comma-separated list of values"),
    (["--sweep", "finetune:semi.epsilon=0.3,,0.5"], "none empty"),
    (["--sweep", "finetune:semi.epsilon=0.3,0.3"], "repeated"),
    (["--sweep", "finetune:semi.nope=1,2"], "unknown key 'semi.nope'"),
    (["--sweep", "finetune:semi.epsilon=0.3,high"], "value 'high': semi.epsilon: expected float"),
    (["--sweep", "semi.epsilon=0.3,0.5"], "unknown key 'semi'"),  # not in No Defense's config
    (["--sweep", "saved_dir=a,b"], "places the run folders itself"),
    (["--sweep", "seed.seed=1,2", "--sweep", "num_epochs=1,2"], "one key per command"),
    (["--sweep", "seed.seed=1,2", "--set", "storage_dir=x"], "places the run folders itself"),
    (["--sweep", "seed.seed=1,2", "--attack", "all"], "not all"),
    (["--reuse", "elsewhere"], "--reuse goes with --sweep"),
    (["--sweep", "seed.seed=1,2", "--reuse", "/nonexistent/exp"], "no such folder"),
])
def test_bad_sweeps_are_one_line_errors(tmp_path, fake_cifar, monkeypatch, capsys, argv,
                                        message):
    _tiny(monkeypatch, tmp_path, fake_cifar)
    ran = []
    for name in dbd.RUNNERS:
        monkeypatch.setitem(dbd.RUNNERS, name, lambda args: ran.append(args))
    out = tmp_path / "exp"
    with pytest.raises(SystemExit) as exc:
        run_main(dbd.main, ["--attack", "tiny", "--device", "cpu", "--out", str(out), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code != 0 and len(err) == 1 and message in err[0], err
    assert not out.exists() and not ran


def test_sweep_values_split_like_yaml_lists():
    assert split_values("0.1, 0.2,[1, 2],{a: 1, b: 2}") == ["0.1", "0.2", "[1, 2]",
                                                             "{a: 1, b: 2}"]
    sweep = parse_sweep(["finetune:semi.epsilon=0.3,0.5"])
    assert str(sweep.item("0.3")) == "finetune:semi.epsilon=0.3"
    assert sweep.item("0.3").value == 0.3 and sweep.item("0.3").stage == "finetune"
    assert sweep.name == "finetune-semi.epsilon"
    assert sweep.folder("a/b") == "semi.epsilon=a_b"
