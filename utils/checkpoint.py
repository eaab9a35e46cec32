"""Checkpoints: atomic writes, safe loads, the original's key names, RNG states."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .dist import unwrap
from .errors import CheckpointError


def rng_state() -> dict:
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_checkpoint(epoch: int, result: dict, model: torch.nn.Module, optimizer,
                        scheduler=None, *, best: tuple[float, int] | None = None,
                        poison_idx_path: str | Path | None = None) -> dict:
    """What a training script saves after an epoch, under the original's key names, in this
    order: epoch, result, the model's (DDP wrapper removed), optimiser's and scheduler's state
    dicts, best_acc and best_epoch (given as ``best`` by the stages that keep a best model), the
    RNG states, and the poison index file the model was trained on."""
    state = {"epoch": epoch, "result": result,
             "model_state_dict": unwrap(model).state_dict(),
             "optimizer_state_dict": optimizer.state_dict(),
             "scheduler_state_dict": scheduler.state_dict() if scheduler else None}
    if best is not None:
        state["best_acc"], state["best_epoch"] = best
    state["rng_state"] = rng_state()
    if poison_idx_path is not None:
        state["poison_idx_path"] = str(poison_idx_path)
    return state


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write to a temporary file, flush it to disk, then rename: a kill leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated or not a "
                              f"PyTorch checkpoint ({msg[:160]})") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no model_state_dict)")
    return ckpt


def load_model_state(model: torch.nn.Module, state: dict, path: str | Path = "") -> None:
    """Strict load after stripping any DDP ``module.`` prefix; mismatches named in one line."""
    state = {k.replace("module.", "", 1) if k.startswith("module.") else k: v
             for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = []
        if missing:
            what.append(f"missing {len(missing)} key(s) such as '{missing[0]}'")
        if unexpected:
            what.append(f"unexpected {len(unexpected)} key(s) such as '{unexpected[0]}'")
        raise CheckpointError(f"checkpoint {path} does not fit this model: {', '.join(what)} "
                              "(another architecture or stage?)")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: '{k}' has shape {tuple(v.shape)}, "
                f"the model expects {tuple(own[k].shape)} (another width or number of classes?)")
    model.load_state_dict(state, strict=True)
