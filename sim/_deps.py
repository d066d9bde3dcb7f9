"""What `python -m sim` needs beyond the base install: the `sim` extra (torch, and matplotlib for --plot).

Importing this module checks for torch. ``sim/__main__.py`` imports it before any module that
imports torch (its name sorts first among sim's modules), so that a base install gets one line
saying what to install (exit status 2), not a traceback from deep inside the engine's imports.
"""

from __future__ import annotations

import importlib.util
import sys

INSTALL = "pip install -e '.[sim]'"


def missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def require_torch() -> None:
    if missing("torch"):
        print(f"python -m sim needs torch, which the base install does not bring: {INSTALL}", file=sys.stderr)
        raise SystemExit(2)


require_torch()
