"""Imports point only down: the layering of scripts/import_graph.py holds for lmcache/ and sim/.

Why a test: the layering is only worth something if a change that breaks it fails CI, and a new
module must be given a layer on purpose rather than fall outside the check.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "import_graph.py"


def load_script() -> ModuleType:
    """scripts/ is not a package, so the checker is loaded from its file."""
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NamedTuple classes look their module up while being built
    spec.loader.exec_module(module)
    return module


ig = load_script()


def test_every_module_has_a_layer_and_imports_point_down() -> None:
    report = ig.check(ig.working_tree_files())
    assert report.edges, "no imports found: the checker read nothing"
    assert not report.unassigned, "modules without a layer (add each to LAYERS in scripts/import_graph.py):\n" + "\n".join(
        report.unassigned
    )
    assert not report.violations, "imports that point up or cross a forbidden edge:\n" + "\n".join(report.violations)


def test_the_checker_sees_hidden_imports() -> None:
    """Function-local imports, `from pkg import submodule` and relative imports all count."""
    files = [
        ("lmcache/__init__.py", ""),
        ("lmcache/protocol.py", "def f():\n    from lmcache.server import engine\n"),
        ("lmcache/client.py", "from . import protocol\nimport lmcache.testing.helpers\n"),
        ("lmcache/server/__init__.py", ""),
        ("lmcache/server/engine.py", "from ..client import x\n"),
        ("lmcache/testing/__init__.py", ""),
        ("lmcache/testing/helpers.py", ""),
        ("lmcache/newthing.py", ""),
    ]
    report = ig.check(files)
    assert report.violations == (
        "VIOLATION: lmcache.client (clients) imports lmcache.testing.helpers (faces)",
        "VIOLATION: lmcache.protocol (wire) imports lmcache.server.engine (engine)",
        "VIOLATION: lmcache.server.engine (engine) imports lmcache.client (clients)",
    )
    assert report.unassigned == ("lmcache.newthing",)
    assert ig.Edge("lmcache.client", "lmcache.protocol") in report.edges
    assert "lmcache.protocol -> lmcache.server" in ig.package_graph(report)
