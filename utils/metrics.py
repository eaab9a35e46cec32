"""Metrics accumulated on the device and synchronised once per epoch; CSV and JSON output."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from . import dist


class Meter:
    """Sums of named values kept as device tensors; ``result()`` synchronises once."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor | float] = {}

    def add(self, name: str, total, count) -> None:
        """Add ``total`` (sum over ``count`` items) to ``name``."""
        total = total.detach().float() if isinstance(total, torch.Tensor) else float(total)
        if name in self.sums:
            self.sums[name] = self.sums[name] + total
            self.counts[name] = self.counts[name] + count
        else:
            self.sums[name] = total
            self.counts[name] = count

    def result(self) -> dict:
        """Means over everything added here, and over every process under torchrun."""
        keys = list(self.sums)
        dev = next((v.device for v in list(self.sums.values()) + list(self.counts.values())
                    if isinstance(v, torch.Tensor)), torch.device("cpu"))
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=dev).reshape(())
                            for k in keys for v in (self.sums[k], self.counts[k])])
        flat = dist.all_reduce_sum(flat).tolist()  # the one synchronisation of the epoch
        out = {}
        for i, k in enumerate(keys):
            s, c = flat[2 * i], flat[2 * i + 1]
            out[k] = s / c if c > 0 else math.nan
        return out


class CSVLog:
    """One CSV per result kind in ``log_dir``, with an ``epoch`` column."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)

    def write(self, kind: str, epoch: int, row: dict) -> None:
        path = self.log_dir / f"{kind}.csv"
        row = {"epoch": epoch, **row}
        rows, header = [], list(row)
        if path.is_file():
            with open(path, newline="") as f:  # an earlier version's rows under today's names
                rows = [current_names(kind, r) for r in csv.DictReader(f)
                        if int(r["epoch"]) < epoch]
            for r in rows:
                header += [k for k in r if k not in header]
        rows.append({k: _fmt(v) for k, v in row.items()})
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header, restval="")
            w.writeheader()
            w.writerows(rows)
        tmp.replace(path)


# Column names of files written before the metrics got one name each (BA / ASR / RA,
# "labelled", no spaces), by result kind: still read, under today's names.
LEGACY_NAMES = {
    "clean_test": {"acc": "BA"},
    "poison_test": {"acc": "ASR", "robust acc": "RA"},
    "poison_train": {"poison loss": "poison_loss", "poison acc": "poison_acc",
                     "clean loss": "clean_loss", "clean acc": "clean_acc"},
    "split": {"labeled": "labelled", "unlabeled": "unlabelled",
              "poisoned_labeled": "poisoned_labelled"},
}


def current_names(kind: str, row: dict) -> dict:
    """A row of result kind ``kind`` (``clean_test``, ``split``, ...) under today's names."""
    old = LEGACY_NAMES.get(kind, {})
    return {old.get(k, k): v for k, v in row.items()} if isinstance(row, dict) else row


def read_csv(path: Path) -> list[dict]:
    """The rows of a result CSV (numbers parsed), under today's column names whatever the
    version that wrote it (``LEGACY_NAMES``, by the file's name)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [current_names(path.stem, {k: _num(v) for k, v in row.items()})
                for row in csv.DictReader(f)]


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(v) else f


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def format_row(values: dict, keys=None) -> str:
    keys = keys or list(values)
    return "  ".join(f"{k} {values[k]:.4f}" if isinstance(values[k], float) else f"{k} {values[k]}"
                     for k in keys)
