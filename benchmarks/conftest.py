"""The benchmarks' figures: the ``figures`` fixture, and one block at the end of the run.

Each benchmark records its figures with ``figures.record(name, value, unit, ceiling=(name,
value, unit), goal=...)`` (``benchmarks/figures.py``). After pytest-benchmark's tables the run
ends with one block, a line per figure: MET, MISSED or NO GOAL, our value, the ceiling measured in
the same run, ours / ceiling, the goal; a benchmark that was skipped or failed gets a line saying
so. Missed goals are counted in pytest's last line ("19 passed, 3 goals MISSED") but never fail
the run. ``--figures-json PATH`` (or ``LMCACHE_FIGURES_JSON=PATH``) also writes the block as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from figures import Figure, Goal, fmt, make_figure

JSON_ENV = "LMCACHE_FIGURES_JSON"
FIGURES = pytest.StashKey[list[Figure]]()
RECORDER = pytest.StashKey["Recorder"]()
_NOTED = pytest.StashKey[bool]()  # the test already has its line saying why it recorded nothing


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--figures-json", metavar="PATH", default=os.environ.get(JSON_ENV) or None,
                     help=f"also write the benchmarks' figures, goals and verdicts as JSON to PATH (or ${JSON_ENV})")


def _quick(config: pytest.Config) -> bool:
    """Benchmarks run once as tests (--benchmark-disable, the default here), not measured."""
    session = getattr(config, "_benchmarksession", None)
    if session is not None:
        return bool(session.disabled)
    return bool(config.getoption("benchmark_disable", False)) and not config.getoption("benchmark_enable", False)


class Recorder:
    """What the ``figures`` fixture gives a benchmark."""

    def __init__(self, config: pytest.Config, item: pytest.Item) -> None:
        self._store = config.stash.setdefault(FIGURES, [])
        self._test = item.nodeid
        self.quick = _quick(config)
        self.recorded = 0

    def record(self, name: str, value: float, unit: str, *, ceiling: tuple[str, float, str] | None = None,
               goal: Goal | tuple[Goal, ...] | None = None) -> Figure:
        """``ceiling``: (what it is, value, unit), measured in the same run; ``goal``: stated once
        next to the benchmark, on the value or (unit "x") on ours / ceiling."""
        fig = make_figure(name, self._test, value, unit, ceiling, goal, self.quick)
        self._store.append(fig)
        self.recorded += 1
        return fig


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Recorder:
    rec = Recorder(request.config, request.node)
    request.node.stash[RECORDER] = rec
    return rec


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """A benchmark that recorded nothing (skipped, failed, or forgot to) gets a line saying why."""
    report = yield
    if "figures" not in getattr(item, "fixturenames", ()) or item.stash.get(_NOTED, False):
        return report
    rec = item.stash.get(RECORDER, None)
    status = reason = ""
    if report.skipped:
        status = "SKIPPED"
        longrepr = report.longrepr
        reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr).removeprefix("Skipped: ")
    elif report.failed:
        status, reason = "FAILED", f"the test failed (in {report.when}); any figure it recorded may be wrong"
    elif report.when == "call" and (rec is None or rec.recorded == 0):
        status, reason = "NOT RECORDED", "the test passed without recording a figure"
    if status:
        item.stash[_NOTED] = True
        name = f"{item.path.name}::{item.name}"
        item.config.stash.setdefault(FIGURES, []).append(Figure(name, item.nodeid, status, quick=_quick(item.config),
                                                                reason=reason))
    return report


_MARKUP = {"MET": {"green": True}, "MISSED": {"red": True, "bold": True}}


def _columns(fig: Figure) -> list[str]:
    ceiling = f"{fig.ceiling_name} {fmt(fig.ceiling, fig.ceiling_unit)}" if fig.ceiling is not None else "-"
    ratio = "-" if fig.ratio is None else f"{fig.ratio:.2f}x"
    goal = " and ".join(fig.goals) or "-"
    if fig.missed and len(fig.missed) < len(fig.goals):
        goal += f" (missed: {' and '.join(fig.missed)})"
    return [fig.status, fig.name, fmt(fig.value, fig.unit), ceiling, ratio, goal]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    figs = config.stash.get(FIGURES, [])
    if not figs:
        return
    counts: dict[str, int] = {}
    for f in figs:
        counts[f.status] = counts.get(f.status, 0) + 1
    order = ["MISSED", "MET", "NO GOAL", "NO CEILING", "SKIPPED", "FAILED", "NOT RECORDED"]
    title = ", ".join(f"{counts[s]} {s if s == 'MISSED' else s.lower()}" for s in order if s in counts)
    missed = counts.get("MISSED", 0)
    quick = _quick(config)
    tr = terminalreporter
    tr.write_sep("=", f"benchmark figures: {title}", red=bool(missed), green=not missed, bold=True)
    if quick:
        tr.write_line("Run once as tests (--benchmark-disable): few rounds, smaller sizes where the name says so. "
                      "Measure with --benchmark-enable.")
    else:
        tr.write_line("Measured (--benchmark-enable).")
    measured = [f for f in figs if f.value is not None]
    header = ["verdict", "figure", "ours", "ceiling (same run)", "ours/ceiling", "goal"]
    rows = [_columns(f) for f in measured]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    widths[0] = max(len(f.status) for f in [*figs, Figure("", "", header[0])])
    align = ["<", "<", ">", ">", ">"]

    def line(cols: list[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cols, align, widths, strict=False)) + "  " + cols[5]

    tr.write_line(line(header), bold=True)
    for f in figs:
        if f.value is None:
            tr.write_line(f"{f.status:<{widths[0]}}  {f.name}: {f.reason}", yellow=True)
        else:
            tr.write_line(line(_columns(f)), **_MARKUP.get(f.status, {}))
    if missed:
        tr.write_line(f"{missed} goal{'s' if missed > 1 else ''} MISSED (timing never fails the run; see the lines above)",
                      red=True, bold=True)
        # pytest's last line counts any other key of ``stats`` too: "19 passed, 3 goals MISSED in 60s".
        tr.stats.setdefault(f"goal{'s' if missed > 1 else ''} MISSED", []).extend(f for f in figs if f.status == "MISSED")
    path = config.getoption("figures_json", None)
    if path:
        Path(path).write_text(json.dumps({"mode": "quick" if quick else "measured", "counts": counts,
                                          "figures": [dataclasses.asdict(f) for f in figs]}, indent=1) + "\n")
        tr.write_line(f"figures written to {path}")
