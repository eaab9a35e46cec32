"""The command line shared by every script, and the one-line error wrapper."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError, one_line


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config under config/")
    p.add_argument("--resume", default="False",
                   help="'False' starts fresh; a checkpoint file name in the run's checkpoint "
                        "folder (e.g. latest_model.pt) continues from it")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--gpu", default=None,
                   help="CUDA device index (the original's option; the CPU is used without CUDA)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optimizer.SGD.lr=0.05 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="on a fresh run, delete earlier results of this config instead of moving "
                        "them aside")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stdout logging")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


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
