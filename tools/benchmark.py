"""Throughput of every training stage, the original's way against this project's fast way.

    python -m tools.benchmark                      # CPU unless CUDA is present
    python -m tools.benchmark --device cuda --repeats 5 --out bench.json

For each stage (supervised epoch, SimCLR epoch, warm-up, split pass, MixMatch step, test pass)
it times a fixed number of steps of the stage's own code (``supervise``/``simclr``/
``mixmatch_finetune`` functions, the configs' transforms and batch sizes) on synthetic
CIFAR-sized images with the BadNets trigger, in two settings:

* ``reference``: the original's way: per-image PIL transforms in a DataLoader with worker
  processes, fp32, NCHW, torch's default optimiser implementation, and the loss read on the
  host after every step;
* ``fast``: the project's defaults for speed: the batched on-device data path, bf16 autocast
  (fp16 on CUDA when bf16 is unsupported), channels_last, foreach/fused optimisers, metrics
  synchronised once per epoch.

Two more rows time the model alone on fixed random tensors already on the device (no data,
no loop): ``model``, a supervised batch-128 training step, and ``model_mixmatch``, the MixMatch
step's model work (two guessing forwards and three trained forwards of 64 images). Their
ratio is the most the precision and layout switches can give the stages of the same batch.

Each (stage, setting, repeat) runs in a fresh process, so its peak memory is its own (peak
RSS on the CPU, peak allocated memory on CUDA). The table gives the median images/s over
the repeats and the ratio fast / reference, the achieved TFLOP/s (3.33 GFLOP per
trained image and 1.11 per evaluated image at full width, scaled by width²) and a projection of
the original DBD schedule's wall time from the measured rates. Results go to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from utils.machine import machine
from utils.paths import REPO_ROOT

SUP = "config/supervise/badnets/cifar10_resnet18/example.yaml"
SIM = "config/defense/simclr/badnets/cifar10_resnet18/example.yaml"
FT = "config/defense/mixmatch_finetune/badnets/cifar10_resnet18/example.yaml"
STAGES = ("supervised", "simclr", "warmup", "split", "mixmatch", "test", "model",
          "model_mixmatch")
# the model alone: no data, no loop, random tensors already on the device; the ceiling of what
# the precision and layout switches can give the stage of the same batch
MODEL_ONLY = ("model", "model_mixmatch")
# images a step of each stage counts, and how many of them are trained (fwd+bwd) vs evaluated
GFLOP_TRAIN, GFLOP_EVAL = 3.33, 1.11
# the original DBD schedule on CIFAR-10 (docs/original.md §1.4, §1.5): images each stage processes
ORIGINAL = {"simclr": 100 * 50_000 * 2, "warmup": 10 * 50_000, "split": 190 * 50_000,
            "mixmatch": 190 * 1024 * 384, "test": 200 * 19_000}


def _sys_path():
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def speed_settings(mode: str, device: torch.device) -> dict:
    if mode == "reference":
        return {"amp": "off", "channels_last": False, "data_path": "reference",
                "optimizer_impl": "for_loop" if device.type == "cpu" else "foreach",
                "sync_every_step": True}
    amp = "bf16"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        amp = "fp16"
    return {"amp": amp, "channels_last": True, "data_path": "fast", "optimizer_impl": "auto",
            "sync_every_step": False}


def _images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int64))


def run_one(stage: str, mode: str, device: torch.device, width: int, steps: int,
            workers: int) -> dict:
    """Time ``steps`` steps of one stage after one untimed pass of the same length."""
    _sys_path()
    import yaml

    from data.attacks import build_attack
    from data.build import build_poison_train, make_eval_loader, make_loader, transform_for
    from data.dataset import MixMatchDataset, SelfPoisonDataset
    from data.transforms import Normalizer
    from loss import build_criterion
    from loss.mixmatch import mixmatch_epoch
    from model import LinearModel, SelfModel, build_backbone
    from utils.loops import (
        evaluate,
        record_losses,
        simclr_epoch,
        train_supervised,
        warmup_epoch,
    )
    from utils.optim import build_optimizer
    from utils.schema import Loader, MixMatch, parse
    from utils.speed import Speed

    torch.manual_seed(0)
    speed = Speed(speed_settings(mode, device), device)
    cfg = yaml.safe_load((REPO_ROOT / (SUP if stage in ("supervised", "test", "model") else
                                       SIM if stage == "simclr" else FT)).read_text())
    if stage not in ("supervised", "simclr", "test", "model"):
        cfg = {**yaml.safe_load((REPO_ROOT / SIM).read_text()), **cfg}
    bd = build_attack(cfg["backdoor"], REPO_ROOT)
    net = {"resnet18_cifar": {"num_classes": 10, "width": width}}
    batch = {"supervised": 128, "simclr": 512, "warmup": 128, "split": 128, "mixmatch": 64,
             "test": 128, "model": 128, "model_mixmatch": 64}[stage]
    settings = {"batch_size": batch, "num_workers": workers if mode == "reference" else 0,
                "pin_memory": device.type == "cuda"}
    if settings["num_workers"]:
        settings["persistent_workers"] = True
    settings = parse(Loader, settings, "loader")
    n = steps * batch
    images, targets = _images(max(n, 2 * batch) * (2 if stage == "mixmatch" else 1))
    poison_idx = (np.random.default_rng(1).random(len(targets)) < 0.05).astype(np.int64)
    part = {"simclr": "aug", "test": "test"}.get(stage, "train")
    tf = transform_for(cfg, part)
    ds = build_poison_train(cfg, poison_idx, images, targets, tf, bd)
    normalize = Normalizer(tf.mean, tf.std, device)
    backbone = build_backbone(net)
    if stage == "simclr":
        model = speed.prepare(SelfModel(backbone, backbone.feature_dim, 128))
    else:
        model = speed.prepare(LinearModel(backbone, backbone.feature_dim, 10))
    opt_cfg = cfg["optimizer"]
    optimizer = build_optimizer(opt_cfg, model.parameters(), options=speed.optimizer_options())
    path = speed.data_path
    counted = {"mixmatch": 384, "model_mixmatch": 384, "simclr": 2 * batch}.get(stage, batch)
    trained = {"supervised": batch, "simclr": 2 * batch, "mixmatch": 192, "model": batch,
               "model_mixmatch": 192}.get(stage, 0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if stage == "supervised":
        loader = make_loader(ds, settings, device=device, data_path=path)
        crit = build_criterion(cfg["criterion"])
        once = lambda: train_supervised(model, loader, crit, optimizer, normalize, speed, True)
    elif stage == "simclr":
        loader = make_loader(SelfPoisonDataset(ds, tf), settings, device=device, data_path=path)
        crit = build_criterion(cfg["criterion"])
        once = lambda: simclr_epoch(model, loader, crit, optimizer, normalize, speed, True,
                                    "simclr")
    elif stage == "warmup":
        loader = make_loader(ds, settings, device=device, data_path=path)
        crit = build_criterion(cfg["warmup"]["criterion"], "warmup.criterion")
        once = lambda: warmup_epoch(model, loader, crit, optimizer, normalize, speed, False,
                                    True, "warm-up")
    elif stage == "split":
        loader = make_eval_loader(ds, settings, device=device, data_path=path)
        crit = build_criterion(cfg["warmup"]["criterion"], "warmup.criterion")
        once = lambda: record_losses(model, loader, crit, normalize, speed, True)
    elif stage == "test":
        loader = make_eval_loader(ds, settings, device=device, data_path=path)
        once = lambda: evaluate(model, loader, normalize, speed, quiet=True)
    elif stage in MODEL_ONLY:
        once = _model_only(stage, model, cfg, optimizer, speed, device, batch, steps)
    else:
        semi = np.zeros(len(ds), dtype=np.int64)
        semi[: len(ds) // 2] = 1
        lab = make_loader(MixMatchDataset(ds, semi, True), settings, drop_last=True,
                          device=device, data_path=path, stream=1)
        unl = make_loader(MixMatchDataset(ds, semi, False), settings, drop_last=True,
                          device=device, data_path=path, stream=2)
        crit = build_criterion(cfg["semi"]["criterion"], "semi.criterion")
        mm = parse(MixMatch, {**cfg["semi"]["mixmatch"], "train_iteration": steps},
                   "semi.mixmatch")
        once = lambda: mixmatch_epoch(model, lab, unl, crit, optimizer, normalize, speed, mm, 0,
                                      10, True, "mixmatch")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    once()  # warm-up pass: allocator, worker start, cuDNN/oneDNN kernel choice
    sync()
    start = time.perf_counter()
    once()
    sync()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    ips = steps * counted / elapsed
    scale = (width / 64) ** 2
    gflop = (trained * GFLOP_TRAIN + (counted - trained) * GFLOP_EVAL) * scale
    if stage in ("mixmatch", "model_mixmatch"):  # 192 mixed images trained, 128 guesses evaluated; 64 counted twice
        gflop = (192 * GFLOP_TRAIN + 128 * GFLOP_EVAL) * scale
    return {"stage": stage, "mode": mode, "images_per_s": ips, "steps": steps,
            "images_per_step": counted, "seconds": elapsed, "peak_mem_mb": peak,
            "tflops": steps * gflop / elapsed / 1000}


def _model_only(stage, model, cfg, optimizer, speed, device, batch, steps):
    """``steps`` training steps of the model on fixed random tensors: a supervised step, or
    the MixMatch step's model work (two guessing forwards without gradients, three trained
    forwards of ``batch`` images, the MixMatch loss) through the stage's own code."""
    from loss import build_criterion
    from loss.mixmatch import mixmatch_step

    g = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=g).to(device).contiguous(
            memory_format=speed.memory_format)

    x, u1, u2 = tensor(batch, 3, 32, 32), tensor(batch, 3, 32, 32), tensor(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    model.train()
    if stage == "model":
        crit = build_criterion(cfg["criterion"])

        def step():
            with speed.autocast():
                logits = model(x)
            return crit(logits.float(), y)
    else:
        crit = build_criterion(cfg["semi"]["criterion"], "semi.criterion")
        mm = cfg["semi"]["mixmatch"]

        def step():
            return mixmatch_step(model, x, y, u1, u2, crit, 0.0, 10, mm["temperature"],
                                 mm["alpha"], speed)[0]

    def once():
        for _ in range(steps):
            loss = step()
            optimizer.zero_grad(set_to_none=True)
            speed.backward_step(loss, optimizer)

    return once


STEPS_CPU = {"supervised": 6, "simclr": 2, "warmup": 8, "split": 8, "mixmatch": 4, "test": 8,
             "model": 6, "model_mixmatch": 4}
STEPS_CUDA = {"supervised": 50, "simclr": 20, "warmup": 50, "split": 50, "mixmatch": 50,
              "test": 50, "model": 50, "model_mixmatch": 50}


def _child(args, stage, mode) -> dict:
    cmd = [sys.executable, "-m", "tools.benchmark", "--one", stage, mode, "--device",
           args.device, "--width", str(args.width), "--steps", str(args.steps_for(stage)),
           "--workers", str(args.workers)]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{stage}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse(argv):
    p = argparse.ArgumentParser(description="Throughput of every stage, reference vs fast.")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 width (64 = full)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per stage")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader workers of the reference path (the original used 2-4)")
    p.add_argument("--out", default="benchmark.json", help="JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--one", nargs=2, metavar=("STAGE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.exit(2, "error: --device cuda was given but CUDA is not available here\n")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.exit(2, f"error: unknown stage '{bad[0]}' (known: {', '.join(STAGES)})\n")
    args.stage_list = stages
    if not args.one and Path(args.out).exists() and not args.overwrite:
        p.exit(2, f"error: {args.out} exists; name another with --out or pass --overwrite\n")
    default = STEPS_CUDA if args.device.startswith("cuda") else STEPS_CPU
    args.steps_for = lambda s: args.steps or default[s]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.one:
        stage, mode = args.one
        res = run_one(stage, mode, torch.device(args.device), args.width,
                      args.steps_for(stage), args.workers)
        print(json.dumps(res))
        return 0
    print(f"benchmark on {machine(args.device)}, torch {torch.__version__}, width {args.width}, "
          f"{args.repeats} repeats", flush=True)
    results = {}
    for stage in args.stage_list:
        for mode in ("reference", "fast"):
            runs = []
            for r in range(args.repeats):
                runs.append(_child(args, stage, mode))
                print(f"  {stage:14s} {mode:9s} run {r + 1}: "
                      f"{runs[-1]['images_per_s']:8.1f} img/s", flush=True)
            results.setdefault(stage, {})[mode] = {
                "images_per_s": statistics.median(x["images_per_s"] for x in runs),
                "images_per_s_runs": [x["images_per_s"] for x in runs],
                "peak_mem_mb": max(x["peak_mem_mb"] for x in runs),
                "tflops": statistics.median(x["tflops"] for x in runs),
                "steps": runs[0]["steps"], "images_per_step": runs[0]["images_per_step"]}
        s = results[stage]
        s["ratio"] = s["fast"]["images_per_s"] / s["reference"]["images_per_s"]
    header = f"{'stage':14s} {'reference img/s':>16s} {'fast img/s':>11s} {'ratio':>6s} " \
             f"{'ref peak MB':>11s} {'fast peak MB':>12s} {'fast TFLOP/s':>12s}"
    lines = [header]
    for stage, s in results.items():
        lines.append(f"{stage:14s} {s['reference']['images_per_s']:16.1f} "
                     f"{s['fast']['images_per_s']:11.1f} {s['ratio']:6.2f} "
                     f"{s['reference']['peak_mem_mb']:11.0f} {s['fast']['peak_mem_mb']:12.0f} "
                     f"{s['fast']['tflops']:12.3f}")
    projection = {}
    for mode in ("reference", "fast"):
        if all(k in results for k in ORIGINAL):
            secs = {k: n / results[k][mode]["images_per_s"] for k, n in ORIGINAL.items()}
            projection[mode] = {"hours": sum(secs.values()) / 3600,
                                "seconds_per_stage": secs}
    if projection:
        lines.append("projected wall time of the original DBD schedule (SimCLR 100 epochs, "
                     "warm-up 10, 190 MixMatch epochs of 1024 steps with a split each, tests): "
                     + ", ".join(f"{m} {p['hours']:.1f} h" for m, p in projection.items())
                     + f" at width {args.width}")
    print("\n".join(lines))
    out = {"machine": machine(args.device), "device": args.device,
           "torch": torch.__version__, "width": args.width, "repeats": args.repeats,
           "date": time.strftime("%Y-%m-%d"),
           "settings": {m: speed_settings(m, torch.device(args.device))
                        for m in ("reference", "fast")},
           "reference_workers": args.workers, "stages": results, "projection": projection}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
