"""Training and evaluation loops shared by the scripts. Metrics stay on the device and are
synchronised once per epoch; accuracies are sample-weighted (docs/differences.md #7)."""

from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm

from .metrics import Meter


def progress(iterable, desc: str, quiet: bool, total=None):
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty())


def train_supervised(model, loader, criterion, optimizer, normalize, speed, quiet=False,
                     desc="train") -> dict:
    """One epoch of cross-entropy training on the poisoned set (docs/original.md §7.3 meters)."""
    model.train()
    meter = Meter()
    start = time.perf_counter()
    seen = 0
    for batch in progress(loader, desc, quiet):
        x = normalize(batch["img"], speed.memory_format)
        y = batch["target"].to(normalize.device, non_blocking=True)
        poison = batch["poison"].to(normalize.device, non_blocking=True).bool()
        with speed.autocast():
            logits = model(x)
        losses = criterion(logits.float(), y, reduction="none")
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        speed.backward_step(loss, optimizer)
        accumulate_train_meters(meter, losses.detach(), logits.detach().argmax(1) == y, poison)
        seen += len(y)
    out = meter.result()
    out["images_per_s"] = seen / (time.perf_counter() - start)
    return out


def accumulate_train_meters(meter, losses, correct, poison):
    """loss/acc overall and on the poisoned and clean samples of a batch (docs/original.md §5.1)."""
    clean = ~poison
    meter.add("loss", losses.sum(), len(losses))
    meter.add("acc", correct.sum(), len(losses))
    meter.add("poison loss", (losses * poison).sum(), poison.sum())
    meter.add("poison acc", (correct & poison).sum(), poison.sum())
    meter.add("clean loss", (losses * clean).sum(), clean.sum())
    meter.add("clean acc", (correct & clean).sum(), clean.sum())


@torch.no_grad()
def evaluate(model, loader, normalize, speed, criterion=None, quiet=False, desc="test") -> dict:
    """loss and acc against ``target``; ``origin acc`` against the true labels (RA on the
    poisoned set). Sample-weighted."""
    model.eval()
    meter = Meter()
    for batch in progress(loader, desc, quiet):
        x = normalize(batch["img"], speed.memory_format)
        y = batch["target"].to(normalize.device, non_blocking=True)
        origin = batch["origin"].to(normalize.device, non_blocking=True)
        with speed.autocast():
            logits = model(x)
        logits = logits.float()
        if criterion is None:
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        else:
            loss = criterion(logits, y, reduction="sum")
        pred = logits.argmax(1)
        meter.add("loss", loss, len(y))
        meter.add("acc", (pred == y).sum(), len(y))
        meter.add("origin acc", (pred == origin).sum(), len(y))
    return meter.result()
