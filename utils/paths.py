"""Where the repository is, so that default paths work from any working directory."""

from __future__ import annotations

from pathlib import Path

# The folder holding utils/, data/, config/: defaults are relative to it, not to the caller's
# working directory.
REPO_ROOT = Path(__file__).resolve().parent.parent
