"""Sweeps: one experiment per value of one config key (``dbd.py --sweep [STAGE:]KEY=V1,V2``),
sharing the stage runs the key leaves unchanged, and a combined report (sweep.md/json/csv/png;
docs/usage.md, "Sweeps")."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from tools.report import write_report, write_sweep_report
from utils.config import Override, parse_override
from utils.errors import ConfigError, UserError
from utils.metrics import write_json
from utils.schema import RUN_FOLDER_KEYS

from .experiment import StageRunners, run_experiment
from .plan import STAGES, SweepFolders, plan_experiment, reusable_runs, stage_configs


class Sweep(NamedTuple):
    spec: str  # as given: [STAGE:]KEY=V1,V2,...
    stage: str | None
    key: str
    values: list[str]  # the value texts, parsed like --set values when applied

    def item(self, value: str) -> Override:
        return parse_override(f"{self.prefix}{self.key}={value}")

    @property
    def prefix(self) -> str:
        return f"{self.stage}:" if self.stage else ""

    @property
    def name(self) -> str:
        return f"{self.prefix.replace(':', '-')}{self.key}"

    def folder(self, value: str) -> str:
        """The experiment folder of one value."""
        return f"{self.key}={re.sub(r'[^A-Za-z0-9._+-]', '_', value)}"


def split_values(text: str) -> list[str]:
    """``a,b,[1, 2]`` -> ``['a', 'b', '[1, 2]']``: commas inside brackets or braces stay."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def parse_sweep(specs: list[str]) -> Sweep:
    if len(specs) > 1:
        raise UserError("--sweep: one key per command (got " + ", ".join(specs) + ")")
    spec = specs[0]
    if "=" not in spec:
        raise UserError(f"--sweep expects [STAGE:]KEY=V1,V2,..., got '{spec}'")
    o = parse_override(spec)
    if o.stage is not None and o.stage not in STAGES:
        raise UserError(f"--sweep {spec}: unknown stage '{o.stage}' (use {', '.join(STAGES)}, "
                        "or no prefix for every stage)")
    if o.key in RUN_FOLDER_KEYS:
        raise UserError(f"--sweep {spec}: a sweep places the run folders itself (use --out)")
    values = split_values(o.text)
    if not o.text.strip() or any(v == "" for v in values):
        raise UserError(f"--sweep {spec}: give a comma-separated list of values, none empty")
    if len(set(values)) != len(values):
        raise UserError(f"--sweep {spec}: a value is repeated")
    return Sweep(spec, o.stage, o.key, values)


def check_sweep(attack: str, profile: str, overrides: list[Override], sweep: Sweep,
                placement, template: str | None = None) -> None:
    """Resolve every experiment's configs, so a bad value or key stops the sweep before it
    starts (a ``--set`` error is reported as one, a ``--sweep`` error as one)."""
    plan_experiment(attack, profile, overrides, placement, template=template)
    for value in sweep.values:
        try:
            plan_experiment(attack, profile, overrides + [sweep.item(value)], placement,
                            template=template)
        except ConfigError as e:
            raise ConfigError(f"--sweep {sweep.spec}: value '{value}': "
                              f"{str(e).removeprefix('--set ')}") from None


def run_sweep(attack: str, profile: str, overrides: list[Override], sweep: Sweep, out: Path,
              device, runners: StageRunners, reuse: list[str] = (), quiet: bool = False,
              template: str | None = None) -> Path:
    """Every value's experiment (sharing stage runs), its report, and the sweep's report.
    ``template``: whose configs to run (default: the attack's)."""
    found = reusable_runs(list(reuse), stage_configs(template or attack, profile)) if reuse else {}
    placement = SweepFolders(out, found)
    check_sweep(attack, profile, overrides, sweep, placement, template)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for value in sweep.values:
        exp = out / sweep.folder(value)
        exp.mkdir(exist_ok=True)
        print(f"[dbd] sweep {sweep.prefix}{sweep.key} = {value}: {exp}")
        item = sweep.item(value)
        result = run_experiment(attack, profile, overrides + [item], placement, exp, device,
                                runners, quiet, clean_skip=(item,), template=template)
        report = write_report(exp, profile, {attack: result})
        write_json(exp / "stages.json", {k: str(v) for k, v in result.stages.items()})
        entries.append({"value": value, "folder": exp.name, "result": result,
                        "report": report["attacks"][attack]})
    write_sweep_report(out, profile, attack, f"{sweep.prefix}{sweep.key}", entries)
    return out
