"""How much KV the simulated engines may allocate (--memory-gb), and --num-blocks sized from it.

Checked before the server or any engine starts (and importing no torch: see sim/_deps.py): an engine that allocates more than the machine
has is killed by the kernel halfway through, which tells the user nothing and can leave its KV
segment in /dev/shm.
"""

from __future__ import annotations

from lmcache.config import GIB
from lmcache.storage.memory import available_memory_bytes

MAX_BLOCKS = 8192  # the most blocks a rank gets unless --num-blocks says otherwise: 128k tokens at 16 a block
DEFAULT_SHARE = 0.5  # of the memory available now: the rest for the server's L1, the ranks' processes, others


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class BudgetError(ValueError):
    """A run that does not fit the budget, as one line blaming ``option``."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def budget_bytes(memory_gb: float | None) -> int:
    """--memory-gb in bytes; by default a share of what MemAvailable (or the cgroup) leaves."""
    available = available_memory_bytes()
    if memory_gb is None:
        return int(available * DEFAULT_SHARE)
    if memory_gb * GIB > available:
        raise BudgetError("--memory-gb", f"asks for {memory_gb:g} GiB but only {human_bytes(available)} of memory "
                                         "is available now")
    return int(memory_gb * GIB)


def num_blocks(budget: int, block_bytes: int, ranks: int, given: int | None, least: int, shape: str) -> int:
    """Blocks per rank: ``given`` if all ``ranks`` fit in ``budget`` with that many, else as many as
    fit, at most MAX_BLOCKS and at least ``least`` (what a one-chunk prompt needs)."""
    per_block = block_bytes * ranks  # one block on every rank of every engine
    what = f"{shape} ({human_bytes(block_bytes)} a block) on {ranks} rank{'s' if ranks > 1 else ''}"
    if given is not None:
        if given * per_block > budget:
            raise BudgetError("--num-blocks", f"{given} blocks of {what} need {human_bytes(given * per_block)} of KV, "
                                              f"more than the {human_bytes(budget)} budget; lower --num-blocks or "
                                              "raise --memory-gb")
        return given
    fits = min(MAX_BLOCKS, budget // per_block)
    if fits < least:
        raise BudgetError("--memory-gb", f"{human_bytes(budget)} holds {fits} blocks of {what}, fewer than the {least} "
                                         "a one-chunk prompt needs; raise --memory-gb or pick a smaller --model-shape")
    return fits
