"""MixMatch (Berthelot et al. 2019) as DBD's fine-tuning runs it: the loss and its λ_u ramp
(docs/original.md §4.3), and the step that forms its batch, guess, sharpen, mix up,
interleave (docs/original.md §5.3), and one epoch of it."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import dist
from utils.loops import progress
from utils.metrics import Meter


def linear_rampup(t: float, length: float) -> float:
    """clip(t / length, 0, 1); 1 when length is 0."""
    if length == 0:
        return 1.0
    return float(min(max(t / length, 0.0), 1.0))


class MixMatchLoss(nn.Module):
    """Lx + λ_u(t)·Lu.

    Lx: soft-target cross entropy, −mean_i Σ_k log_softmax(x_logits)_ik · x_targets_ik over the
    labelled (mixed) samples; Lu: mean squared error between softmax(u_logits) and u_targets over
    **all elements** (so divided by the number of classes too, as the original).
    Shapes: x_logits/x_targets [B, C], u_logits/u_targets [2B, C]; ``t`` is the epoch position
    (docs/differences.md #5: global epoch index counted from the first warm-up epoch + batch fraction).
    Returns (loss, Lx, Lu, λ_u).
    """

    def __init__(self, lambda_u: float = 15.0, rampup_length: float = 190.0):
        super().__init__()
        self.lambda_u = float(lambda_u)
        self.rampup_length = float(rampup_length)

    def weight(self, t: float) -> float:
        return self.lambda_u * linear_rampup(t, self.rampup_length)

    def forward(self, x_logits, x_targets, u_logits, u_targets, t: float):
        lx = -(F.log_softmax(x_logits.float(), dim=1) * x_targets).sum(dim=1).mean()
        lu = ((torch.softmax(u_logits.float(), dim=1) - u_targets) ** 2).mean()
        lam = self.weight(t)
        return lx + lam * lu, lx, lu, lam


# ---- The step (docs/original.md §5.3): guess, sharpen, mix up, interleave -------------


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), renormalised over classes. p: [B, C]."""
    pt = p ** (1.0 / temperature)
    return pt / pt.sum(dim=1, keepdim=True)


def mixup(inputs: torch.Tensor, targets: torch.Tensor, alpha: float):
    """One λ ~ Beta(α, α) from numpy's global RNG with λ = max(λ, 1 − λ), one permutation from
    torch's CPU RNG shared by all samples (docs/original.md §5.3). Returns (mixed inputs, mixed targets, λ)."""
    lam = float(np.random.beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    perm = torch.randperm(inputs.shape[0]).to(inputs.device)
    return (lam * inputs + (1 - lam) * inputs[perm],
            lam * targets + (1 - lam) * targets[perm], lam)


def _offsets(batch: int, nu: int) -> list[int]:
    groups = [batch // (nu + 1)] * (nu + 1)
    for x in range(batch - sum(groups)):
        groups[-x - 1] += 1
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + g)
    return offsets


def interleave(chunks: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """Swap group i of chunk 0 with group i of chunk i (groups of ``batch // len(chunks)``,
    the remainder in the last groups), so each BN batch mixes labelled and unlabelled samples.
    Applying it twice gives the input back."""
    nu = len(chunks) - 1
    off = _offsets(batch, nu)
    parts = [[c[off[p]:off[p + 1]] for p in range(nu + 1)] for c in chunks]
    for i in range(1, nu + 1):
        parts[0][i], parts[i][i] = parts[i][i], parts[0][i]
    return [torch.cat(p, dim=0) for p in parts]


def mixmatch_step(model, x, y, u1, u2, criterion, t: float, num_classes: int, temperature: float,
                  alpha: float, speed):
    """One MixMatch update's forward pass and loss (docs/original.md §5.3); the caller steps the optimiser.

    x: labelled images [b, ...] with labels y [b]; u1, u2: two views of b unlabelled images.
    Under torchrun these are this process's slices of the global batches: the mixup, the
    interleave and the loss act on the gathered global batch, and each process forwards its
    slice of every interleaved chunk, so the update equals the single-process one (with global
    batch norm). Returns (loss, Lx, Lu, λ_u).
    """
    with torch.no_grad():  # label guessing, model in train mode (BN batch statistics)
        with speed.autocast():
            p1, p2 = model(u1), model(u2)
        p = (torch.softmax(p1.float(), dim=1) + torch.softmax(p2.float(), dim=1)) / 2
        q = sharpen(p, temperature)
        onehot = F.one_hot(y, num_classes).float()
        inputs = torch.cat([dist.gather(x), dist.gather(u1), dist.gather(u2)], dim=0)
        targets = torch.cat([dist.gather(onehot), dist.gather(q), dist.gather(q)], dim=0)
    batch = inputs.shape[0] // 3  # the global labelled batch
    mixed_x, mixed_y, _ = mixup(inputs, targets, alpha)
    chunks = interleave(list(torch.split(mixed_x, batch)), batch)
    share, r = batch // dist.world_size(), dist.rank()
    with speed.autocast():
        logits = [model(c[r * share:(r + 1) * share]) for c in chunks]
    logits = interleave([dist.gather_with_grad(lg.float()) for lg in logits], batch)
    return criterion(logits[0], mixed_y[:batch], torch.cat(logits[1:], dim=0), mixed_y[batch:], t)


def _cycle(loader):
    """Restart the loader when it runs out, and only then (docs/differences.md #17)."""
    while True:
        yield from loader


def mixmatch_epoch(model, labelled_loader, unlabelled_loader, criterion, optimizer, normalize,
                   speed, mm, epoch_index: int, num_classes: int, quiet, desc) -> dict:
    model.train()
    meter = Meter()
    n_iter = mm.train_iteration
    lab, unl = _cycle(labelled_loader), _cycle(unlabelled_loader)
    for i in progress(range(n_iter), desc, quiet):
        lb, ub = next(lab), next(unl)
        x = normalize(lb["img"], speed.memory_format)
        y = lb["target"].to(normalize.device)
        u1 = normalize(ub["img1"], speed.memory_format)
        u2 = normalize(ub["img2"], speed.memory_format)
        t = epoch_index + i / n_iter  # docs/differences.md #5
        loss, lx, lu, lam = mixmatch_step(model, x, y, u1, u2, criterion, t, num_classes,
                                          mm.temperature, mm.alpha, speed)
        optimizer.zero_grad(set_to_none=True)
        speed.backward_step(loss, optimizer)
        meter.add("loss", loss.detach(), 1)
        meter.add("xloss", lx.detach(), 1)
        meter.add("uloss", lu.detach(), 1)
        meter.add("lambda_u", lam, 1)
    return meter.result()
