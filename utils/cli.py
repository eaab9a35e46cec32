"""The command line shared by every training script, as one typed value (``StageArgs``), and
the one-line error wrapper."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import Override, parse_override
from .errors import UserError, one_line
from .setup import RunFolders


@dataclass(frozen=True)
class StageArgs:
    """What a training stage is asked to do: its config and ``--set`` overrides, where it runs
    and what it continues. ``folders`` places the run (``saved_dir``, ``storage_dir``) and
    ``pretrain_folders`` the SimCLR run the fine-tuning reads, instead of the configs' own
    (dbd.py gives both as values)."""
    config: Path
    resume: str = "False"
    device: str = "auto"
    gpu: str | None = None
    overrides: tuple[Override, ...] = ()
    folders: RunFolders | None = None
    pretrain_folders: RunFolders | None = None
    overwrite: bool = False
    quiet: bool = False
    debug: bool = False


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, type=Path, help="YAML config under config/")
    p.add_argument("--resume", default="False",
                   help="'False' starts fresh; a checkpoint file name in the run's checkpoint "
                        "folder (e.g. latest_model.pt) continues from it")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--gpu", default=None,
                   help="CUDA device index (the original's option; the CPU is used without CUDA)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   type=parse_override,
                   help="override a config value, e.g. --set optimizer.SGD.lr=0.05 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="on a fresh run, delete earlier results of this config instead of moving "
                        "them aside")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stdout logging")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def stage_args(parser: argparse.ArgumentParser, argv=None) -> StageArgs:
    """The parsed command line as ``StageArgs`` (``--pretrain-dirs`` where the script has it)."""
    ns = parser.parse_args(argv)
    pre = getattr(ns, "pretrain_dirs", None)
    return StageArgs(config=ns.config, resume=ns.resume, device=ns.device, gpu=ns.gpu,
                     overrides=tuple(ns.overrides), overwrite=ns.overwrite, quiet=ns.quiet,
                     debug=ns.debug, pretrain_folders=RunFolders.of(pre) if pre else None)


def run_main(main, argv=None,
             continue_hint: str = "continue with --resume latest_model.pt") -> None:
    """Call ``main(argv)``; user errors become one ``error: ...`` line and exit status 2, an
    interruption one line saying how to continue (``continue_hint``) and exit status 130."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except UserError as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"interrupted: the last saved checkpoint is intact; {continue_hint}",
              file=sys.stderr)
        sys.exit(130)
