"""The import graph of lmcache/ and sim/, checked against the layering: imports point only down.

Why: the layering (faces over clients over the engine over storage/transfer over the wire
vocabulary over base utilities) is what lets each part be read, tested and replaced on its own.
Written down only in prose it erodes one convenient import at a time; here it is data, and
tests/test_layers.py fails on any upward import and on any module not yet given a layer, so a
new module is placed deliberately.

Usage:
    python scripts/import_graph.py                         # the working tree; exit 1 on a violation
    python scripts/import_graph.py --git-rev REV           # the same check on the files of commit REV
    python scripts/import_graph.py --git-rev REV --graph-only   # only print the graph, never fail

Imports are read with `ast`, so nothing is imported or executed: every `import` and `from ... import`
anywhere in a file counts (function-local and TYPE_CHECKING ones included, because they are
dependencies all the same); `from pkg import name` counts as importing `pkg.name` when that is a
module. Imports hidden in strings (importlib.import_module) are not seen.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
TOP_PACKAGES = ("lmcache", "sim")

# Top to bottom. A module may import from its own layer or any layer below. "x.*" matches x and
# everything under it; any other pattern matches that one module exactly. `lmcache.config` sits in
# the wire layer, not base, because it imports lmcache.protocol for the transfer-mode names.
# The package __init__ of lmcache.server (a docstring only) is placed with the engine.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "faces",
        (
            "lmcache.cli",
            "lmcache.server.app",
            "lmcache.server.http",
            "lmcache.server.zmq_loop",
            "lmcache.server.process",
            "lmcache.server.metrics",
            "lmcache.integration.*",
            "lmcache.vllm_cpu",
            "lmcache.v1.*",
            "lmcache.testing.*",
            "sim.*",
        ),
    ),
    ("clients", ("lmcache.client", "lmcache.kv_transfer")),
    (
        "engine",
        (
            "lmcache.server",
            "lmcache.server.engine",
            "lmcache.server.activity",
            "lmcache.server.registry",
            "lmcache.server.copiers",
            "lmcache.server.devices",
            "lmcache.server.tickets",
            "lmcache.server.errors",
        ),
    ),
    ("storage/transfer", ("lmcache.storage.*", "lmcache.transfer.*")),
    ("wire", ("lmcache.protocol", "lmcache.keys", "lmcache.page_layout", "lmcache.config")),
    ("base", ("lmcache._fast.*", "lmcache.log", "lmcache.security", "lmcache.utils", "lmcache")),
)

# Edges named outright, on top of the layer order: they say the intent even if a module is moved
# between layers later. (importer patterns, imported patterns, importers exempt)
FORBIDDEN: tuple[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...] = (
    # The client side never reaches into the server process's code.
    (("lmcache.client", "lmcache.kv_transfer"), ("lmcache.server.*",), ()),
    # The engine knows nothing of its clients or of the faces in front of it.
    (LAYERS[2][1], ("lmcache.client", "lmcache.kv_transfer") + LAYERS[0][1], ()),
    # The wire vocabulary depends on no machinery.
    (("lmcache.protocol",), ("lmcache.transfer.*", "lmcache.storage.*", "lmcache.server.*"), ()),
    # Test helpers are never imported by product code (only by each other and the simulator).
    (("lmcache.*",), ("lmcache.testing.*",), ("lmcache.testing.*",)),
)

UNKNOWN = "?"


class Edge(NamedTuple):
    """One import: `src` (a module of the tree) imports `dst` (a module of lmcache or sim)."""

    src: str
    dst: str


class Report(NamedTuple):
    """What check() found; `ok` when there is neither a violation nor an unassigned module."""

    edges: frozenset[Edge]
    violations: tuple[str, ...]
    unassigned: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.violations and not self.unassigned


def matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return module == base or module.startswith(base + ".")
    return module == pattern


def layer_of(module: str) -> str:
    """The layer's name, or "?" when no pattern (or, by a mistake in LAYERS, more than one layer) claims it."""
    hits = [name for name, patterns in LAYERS if any(matches(module, p) for p in patterns)]
    return hits[0] if len(hits) == 1 else UNKNOWN


def height(layer: str) -> int:
    """Base is 0; a higher number is a higher layer."""
    names = [name for name, _ in LAYERS]
    return len(names) - 1 - names.index(layer)


def module_name(path: str) -> str | None:
    """`lmcache/server/engine.py` -> `lmcache.server.engine`; a package's __init__ is the package."""
    p = Path(path)
    if p.suffix not in (".py", ".pyx") or not p.parts or p.parts[0] not in TOP_PACKAGES:
        return None
    parts = list(p.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(module: str, source: str, is_package: bool, known: frozenset[str]) -> set[str]:
    """Internal modules one file imports, each resolved to the longest known module name."""

    def resolve(name: str) -> str:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in known:
                return ".".join(parts[:n])
        return name

    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=module)):
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else resolve(base))
    return {m for m in found if m.split(".")[0] in TOP_PACKAGES and m != module}


def package_of(module: str) -> str:
    """The node of the package-level graph: `sim`, a subpackage such as `lmcache.server`, or a top-level module."""
    parts = module.split(".")
    return parts[0] if parts[0] != "lmcache" else ".".join(parts[:2])


def check(files: Iterable[tuple[str, str]]) -> Report:
    """Checks (path, source) pairs: every module assigned a layer, no import pointing up."""
    files = list(files)
    known = frozenset(m for m in (module_name(path) for path, _ in files) if m is not None)
    edges: set[Edge] = set()
    for path, source in files:
        module = module_name(path)
        if module is None or not path.endswith(".py"):
            continue  # .pyx files are known names (for resolving imports), not parsed
        edges.update(Edge(module, dst) for dst in imports_of(module, source, path.endswith("__init__.py"), known))

    violations: set[str] = set()
    for src, dst in edges:
        ls, ld = layer_of(src), layer_of(dst)
        upward = UNKNOWN not in (ls, ld) and height(ld) > height(ls)
        forbidden = any(
            any(matches(src, p) for p in importers) and not any(matches(src, p) for p in exempt) and any(matches(dst, p) for p in imported)
            for importers, imported, exempt in FORBIDDEN
        )
        if upward or forbidden:
            violations.add(f"VIOLATION: {src} ({ls}) imports {dst} ({ld})")
    unassigned = sorted(m for m in known | {e.dst for e in edges} if layer_of(m) == UNKNOWN)
    return Report(frozenset(edges), tuple(sorted(violations)), tuple(unassigned))


def package_graph(report: Report) -> list[str]:
    """`A -> B` lines between packages, without self-edges, deduplicated and sorted."""
    return sorted({f"{package_of(s)} -> {package_of(d)}" for s, d in report.edges if package_of(s) != package_of(d)})


def working_tree_files(root: Path = ROOT) -> list[tuple[str, str]]:
    paths = sorted(p for top in TOP_PACKAGES for ext in ("py", "pyx") for p in (root / top).rglob(f"*.{ext}"))
    return [(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")) for p in paths]


def git_files(rev: str, root: Path = ROOT) -> list[tuple[str, str]]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout

    paths = [p for p in git("ls-tree", "-r", "--name-only", rev, "--", *TOP_PACKAGES).splitlines() if module_name(p)]
    return [(p, git("show", f"{rev}:{p}") if p.endswith(".py") else "") for p in paths]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--git-rev", metavar="REV", help="read the files of this commit instead of the working tree")
    parser.add_argument("--graph-only", action="store_true", help="print only the package graph; always exit 0")
    args = parser.parse_args(argv)

    report = check(git_files(args.git_rev) if args.git_rev else working_tree_files())
    print("\n".join(package_graph(report)))
    if args.graph_only:
        return 0
    for module in report.unassigned:
        print(f"UNASSIGNED: {module} ({UNKNOWN}): add it to a layer in scripts/import_graph.py")
    for violation in report.violations:
        print(violation)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
