"""The figures of the benchmarks: each one next to a ceiling measured in the same run and its goal.

A benchmark states its goal once, next to itself (``GOAL = at_most(10, "us")``), and records what
it measured through the ``figures`` fixture (``benchmarks/conftest.py``)::

    figures.record("hash a 32k-token prompt", 4.2, "us", ceiling=("xxhash loop", 38.0, "us"), goal=GOAL)

At the end of the run ``conftest.py`` prints one block, a line per figure: verdict (MET,
MISSED, NO GOAL, or why it was not measured), name, our value, the ceiling, ours / ceiling, and
the goal. A missed goal never fails a test: timing does not decide pass or fail.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Units a goal and a figure may be stated in; within a group values convert.
_SCALES = {
    "ns": ("time", 1e-9), "us": ("time", 1e-6), "ms": ("time", 1e-3), "s": ("time", 1.0),
    "MB/s": ("rate", 1e6), "GB/s": ("rate", 1e9),
}
RATIO = "x"  # the unit of a goal on ours / ceiling
_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


def convert(value: float, unit: str, to: str) -> float:
    if unit == to:
        return value
    if unit not in _SCALES or to not in _SCALES or _SCALES[unit][0] != _SCALES[to][0]:
        raise ValueError(f"cannot convert {unit!r} to {to!r}")
    return value * _SCALES[unit][1] / _SCALES[to][1]


@dataclass(frozen=True)
class Goal:
    """``op bound unit`` on our value, or on ours / ceiling when ``unit`` is ``"x"``."""

    op: str
    bound: float
    unit: str
    why: str = ""  # where the bound comes from, when it is not obvious

    def __post_init__(self) -> None:
        assert self.op in _OPS, self.op
        assert self.unit == RATIO or self.unit in _SCALES, self.unit

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}x" if self.unit == RATIO else f"{self.op} {self.bound:g} {self.unit}"

    def met(self, value: float, unit: str, ratio: float | None) -> bool | None:
        """None when the goal is on the ratio and there is no ceiling."""
        if self.unit == RATIO:
            return None if ratio is None else _OPS[self.op](ratio, self.bound)
        return _OPS[self.op](convert(value, unit, self.unit), self.bound)


def at_most(bound: float, unit: str) -> Goal:
    return Goal("<=", bound, unit)


def below(bound: float, unit: str) -> Goal:
    return Goal("<", bound, unit)


def at_least(bound: float, unit: str, why: str = "") -> Goal:
    return Goal(">=", bound, unit, why)


@dataclass
class Figure:
    """One line of the block. ``status``: MET, MISSED, NO GOAL, SKIPPED, FAILED, NOT RECORDED."""

    name: str
    test: str
    status: str
    value: float | None = None
    unit: str = ""
    ceiling_name: str = ""
    ceiling: float | None = None
    ceiling_unit: str = ""
    ratio: float | None = None
    goals: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    quick: bool = True  # measured in the run-once-as-a-test mode (fewer rounds, smaller sizes)
    reason: str = ""


def make_figure(name: str, test: str, value: float, unit: str, ceiling: tuple[str, float, str] | None,
                goal: Goal | Sequence[Goal] | None, quick: bool) -> Figure:
    goals = [] if goal is None else [goal] if isinstance(goal, Goal) else list(goal)
    for g in goals:
        if g.unit != RATIO:
            convert(1.0, unit, g.unit)  # raises on a goal stated in a unit the figure cannot be turned into
    fig = Figure(name, test, "", value, unit, quick=quick, goals=[str(g) for g in goals])
    if ceiling is not None:
        fig.ceiling_name, fig.ceiling, fig.ceiling_unit = ceiling
        ceiling_value = convert(fig.ceiling, fig.ceiling_unit, unit)
        fig.ratio = value / ceiling_value if ceiling_value > 0 else None
    verdicts = [g.met(value, unit, fig.ratio) for g in goals]
    fig.missed = [str(g) for g, ok in zip(goals, verdicts, strict=True) if ok is False]
    if not goals:
        fig.status = "NO GOAL"
    elif fig.missed:
        fig.status = "MISSED"
    elif None in verdicts:
        fig.status = "NO CEILING"
    else:
        fig.status = "MET"
    return fig


def interleaved(fns: Sequence[Callable[[], object]], rounds: int, inner: int = 1) -> list[list[float]]:
    """Seconds per call of each function, sampled round by round in turn, ``inner`` calls per
    sample, so that all of them see the same machine (a busy neighbour slows them alike)."""
    samples: list[list[float]] = [[] for _ in fns]
    clock = time.perf_counter
    for _ in range(rounds):
        for fn, out in zip(fns, samples, strict=True):
            start = clock()
            for _ in range(inner):
                fn()
            out.append((clock() - start) / inner)
    return samples


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    mag = abs(value)
    text = f"{value:.0f}" if mag >= 100 else f"{value:.1f}" if mag >= 10 else f"{value:.2f}" if mag >= 0.1 else f"{value:.3g}"
    return f"{text} {unit}".strip()
