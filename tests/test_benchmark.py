"""The benchmark: every stage's code runs in both settings, the table and JSON come out, and an
existing result file is never replaced unless asked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tools import benchmark

from .conftest import REPO_ROOT


@pytest.mark.parametrize("stage", benchmark.STAGES)
@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_every_stage_runs_in_both_settings(stage, mode):
    res = benchmark.run_one(stage, mode, torch.device("cpu"), width=4, steps=1, workers=0)
    assert res["stage"] == stage and res["mode"] == mode
    assert res["images_per_s"] > 0 and res["seconds"] > 0 and res["peak_mem_mb"] > 0
    per_step = {"simclr": 1024, "mixmatch": 384, "model_mixmatch": 384}.get(stage, 128)
    assert res["images_per_step"] == per_step
    assert res["tflops"] > 0


def test_model_only_steps_train_the_model():
    """The model-only rows time real updates: the weights move and stay finite."""
    from model import LinearModel, build_backbone
    from utils.speed import Speed

    speed = Speed(benchmark.speed_settings("fast", torch.device("cpu")), torch.device("cpu"))
    backbone = build_backbone({"resnet18_cifar": {"num_classes": 10, "width": 4}})
    model = speed.prepare(LinearModel(backbone, backbone.feature_dim, 10))
    before = [p.detach().clone() for p in model.parameters()]
    for stage in benchmark.MODEL_ONLY:
        path = benchmark.SUP if stage == "model" else benchmark.FT
        cfg = yaml.safe_load((REPO_ROOT / path).read_text())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        benchmark._model_only(stage, model, cfg, opt, speed, torch.device("cpu"), 8, 2)()
    moved = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert all(moved)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _bench(*extra):
    cmd = [sys.executable, "-m", "tools.benchmark", "--device", "cpu", "--width", "4",
           "--steps", "1", "--repeats", "1", "--workers", "0", *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_benchmark_writes_table_and_json_and_keeps_an_existing_file(tmp_path):
    out = tmp_path / "bench.json"
    r = _bench("--stages", "model,model_mixmatch", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["stages"]) == {"model", "model_mixmatch"}
    for s in data["stages"].values():
        assert s["ratio"] == pytest.approx(s["fast"]["images_per_s"] /
                                           s["reference"]["images_per_s"])
    assert "model_mixmatch" in r.stdout and "TFLOP/s" in r.stdout
    written = out.read_bytes()
    again = _bench("--stages", "model", "--out", str(out))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"error: {out} exists; name another with --out or pass --overwrite"]
    assert out.read_bytes() == written
    forced = _bench("--stages", "model", "--out", str(out), "--overwrite")
    assert forced.returncode == 0, forced.stderr
    assert set(json.loads(out.read_text())["stages"]) == {"model"}


def test_unknown_stage_is_one_error_line(tmp_path):
    r = _bench("--stages", "nonsense", "--out", str(tmp_path / "b.json"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: unknown stage 'nonsense' (known: " + ", ".join(benchmark.STAGES) + ")"]
