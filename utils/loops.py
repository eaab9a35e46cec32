"""The epochs of every stage, each a loop over a loader: supervised training (No Defense),
SimCLR, the warm-up of the linear head, the per-sample losses of the split, and the test.
Metrics stay on the device and are synchronised once per epoch; accuracies are
sample-weighted (docs/differences.md #7). MixMatch's epoch is in ``loss.mixmatch``."""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from . import dist
from .dist import unwrap
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


def simclr_epoch(model, loader, criterion, optimizer, normalize, speed, quiet, desc) -> dict:
    """One SimCLR epoch (docs/original.md §4.1): both views of every image in one batch-norm
    batch, the NT-Xent loss over the global batch."""
    model.train()
    meter = Meter()
    seen, start = 0, time.perf_counter()
    for batch in progress(loader, desc, quiet):
        # views interleaved per image, [x1_0, x2_0, x1_1, ...]: one BN batch of 2b (docs/original.md §4.1)
        x = torch.stack([batch["img1"], batch["img2"]], dim=1).flatten(0, 1)
        x = normalize(x, speed.memory_format)
        b = len(batch["img1"])
        with speed.autocast():
            z = model(x)
        # the loss over the global batch, gathered in rank order, with the gradient of one
        # process seeing it all (docs/differences.md #11)
        z = dist.gather_with_grad(z.float())
        loss = criterion(z.view(-1, 2, z.shape[-1]))
        optimizer.zero_grad(set_to_none=True)
        speed.backward_step(loss, optimizer)
        meter.add("loss", loss.detach() * b, b)  # identical on every process
        seen += 2 * b
    out = meter.result()
    out["images_per_s"] = seen / (time.perf_counter() - start)
    return out



def warmup_epoch(model, loader, criterion, optimizer, normalize, speed, freeze_bn, quiet, desc):
    """Only the linear layer learns: backbone forward without gradients, in train mode so its
    BN statistics move as in the original (docs/original.md §5.1), unless ``freeze_bn``."""
    model.train()
    net = unwrap(model)  # backbone and head are called apart, so the head's gradients are
    if freeze_bn:        # averaged over processes by hand
        net.backbone.eval()
    meter = Meter()
    for batch in progress(loader, desc, quiet):
        x = normalize(batch["img"], speed.memory_format)
        y = batch["target"].to(normalize.device)
        poison = batch["poison"].to(normalize.device).bool()
        with speed.autocast():
            with torch.no_grad():
                feats = net.backbone(x)
            logits = net.linear(feats.float())
        losses = criterion(logits.float(), y, reduction="none")
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        speed.backward_step(loss, optimizer,
                            lambda: dist.average_gradients(net.linear.parameters()))
        accumulate_train_meters(meter, losses.detach(), logits.detach().argmax(1) == y, poison)
    return meter.result()


@torch.no_grad()
def record_losses(model, loader, criterion, normalize, speed, quiet) -> np.ndarray:
    """Per-sample SCE loss over the training set in dataset order, eval mode, on train-time
    augmented images (docs/original.md §5.2). Each process scores its part; every process gets all losses."""
    model.eval()
    out = []
    for batch in progress(loader, "split", quiet):
        x = normalize(batch["img"], speed.memory_format)
        y = batch["target"].to(normalize.device)
        with speed.autocast():
            logits = model(x)
        out.append(criterion(logits.float(), y, reduction="none"))
    mine = torch.cat(out).cpu().numpy() if out else np.zeros(0, dtype=np.float32)
    return np.concatenate(dist.all_gather_objects(mine))


def accumulate_train_meters(meter, losses, correct, poison):
    """loss/acc overall and on the poisoned and clean samples of a batch (docs/original.md §5.1)."""
    clean = ~poison
    meter.add("loss", losses.sum(), len(losses))
    meter.add("acc", correct.sum(), len(losses))
    meter.add("poison_loss", (losses * poison).sum(), poison.sum())
    meter.add("poison_acc", (correct & poison).sum(), poison.sum())
    meter.add("clean_loss", (losses * clean).sum(), clean.sum())
    meter.add("clean_acc", (correct & clean).sum(), clean.sum())


@torch.no_grad()
def evaluate(model, loader, normalize, speed, criterion=None, quiet=False, desc="test",
             target_label: int | None = None) -> dict:
    """``loss`` and ``acc`` against the labels the set gives (BA on the clean test set, ASR on
    the triggered one, labelled with the target); ``RA`` against the true labels (the robust
    accuracy, on the triggered set). With ``target_label``, also ``to_target``: the share of
    the samples of the other true classes predicted as the target (on the clean test set, the
    floor under ASR: how often the model calls those images the target without a trigger).
    Sample-weighted."""
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
        meter.add("RA", (pred == origin).sum(), len(y))
        if target_label is not None:
            others = origin != target_label
            meter.add("to_target", (others & (pred == target_label)).sum(), others.sum())
    return meter.result()
