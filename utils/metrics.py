"""Metrics accumulated on the device and synchronised once per epoch; CSV and JSON output."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch


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
        out = {}
        for k, s in self.sums.items():
            s = float(s) if isinstance(s, torch.Tensor) else s
            c = float(self.counts[k])
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
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < epoch]
            for r in rows:
                header += [k for k in r if k not in header]
        rows.append({k: _fmt(v) for k, v in row.items()})
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header, restval="")
            w.writeheader()
            w.writerows(rows)
        tmp.replace(path)


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
