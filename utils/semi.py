"""The pieces of DBD's semi-supervised stage (reference §5): the loss-based split and MixMatch."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import dist


def split_by_loss(losses: np.ndarray, epsilon: float, targets: np.ndarray | None = None,
                  per_class: bool = False) -> np.ndarray:
    """semi_idx: 1 for the ``int(N·epsilon)`` lowest-loss samples (labelled), 0 for the rest.

    Global by default, as the original (reference §5.2, DECISIONS #6); ``per_class`` keeps the
    lowest-loss fraction within each (current) label instead. Ties break by index (stable sort).
    """
    losses = np.asarray(losses)
    semi_idx = np.zeros(len(losses), dtype=np.int64)
    if not per_class:
        semi_idx[np.argsort(losses, kind="stable")[: int(len(losses) * epsilon)]] = 1
        return semi_idx
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        order = members[np.argsort(losses[members], kind="stable")]
        semi_idx[order[: int(len(members) * epsilon)]] = 1
    return semi_idx


def split_quality(semi_idx: np.ndarray, poison_idx: np.ndarray) -> dict:
    """How well "unlabelled" works as a poison detector (integers, not floats; DECISIONS #15)."""
    labeled = np.asarray(semi_idx) == 1
    poison = np.asarray(poison_idx) == 1
    caught = int((poison & ~labeled).sum())
    unlabeled = int((~labeled).sum())
    total = int(poison.sum())
    return {"labeled": int(labeled.sum()), "unlabeled": unlabeled,
            "poisoned_labeled": int((poison & labeled).sum()), "poisoned_total": total,
            "precision": caught / unlabeled if unlabeled else float("nan"),
            "recall": caught / total if total else float("nan")}


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), renormalised over classes. p: [B, C]."""
    pt = p ** (1.0 / temperature)
    return pt / pt.sum(dim=1, keepdim=True)


def mixup(inputs: torch.Tensor, targets: torch.Tensor, alpha: float):
    """One λ ~ Beta(α, α) from numpy's global RNG with λ = max(λ, 1 − λ), one permutation from
    torch's CPU RNG shared by all samples (§5.3). Returns (mixed inputs, mixed targets, λ)."""
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
    """One MixMatch update's forward pass and loss (§5.3); the caller steps the optimiser.

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
