"""Shared pieces of the engine fault tests (test_stalled_engines.py, test_kill_campaign.py):
chunks whose bytes are a function of their own hash, the test's own engine that stores chunks
it can check later (Truth), and small polling helpers.

Not a test module (pytest collects test_*.py only); the test modules import it by name, since
pytest puts this folder on sys.path (there is no __init__.py in tests/).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
from collections.abc import Callable
from typing import Any

import torch

from lmcache.client import MPClient
from lmcache.kv_transfer import register_kv_caches
from lmcache.keys import HASH_BYTES, prompt_hashes, split_hashes
from lmcache.testing.vllm_like import make_kv

CHUNK = 64  # 4 blocks of 16 tokens
BPC = 4  # blocks per chunk
TTL = "1"  # --lock-ttl of the servers under test, in seconds
# make_kv's default shape: 2 layers x 4 blocks x (16 tokens x 2 heads x 8 channels x 2 bytes).
CHUNK_BYTES = 2 * BPC * 16 * 2 * 8 * 2


def chunk_hashes(n: int, seed: int) -> bytes:
    """The chained hashes of ``n`` chunks of random tokens. random.choices is prefix-stable, so
    chunk_hashes(m, s) is a prefix of chunk_hashes(n, s) for m <= n: prompts share prefixes."""
    return prompt_hashes(random.Random(seed).choices(range(30_000), k=CHUNK * n), CHUNK)


def page_value(h: bytes, layer: int, j: int) -> float:
    """The value every element of block ``j`` of ``layer`` of chunk ``h`` holds (0..255, exact in
    every float dtype): a page from another chunk, layer or block position shows."""
    return float(h[(layer * BPC + j) % HASH_BYTES])


def fill_chunks(kv: list[torch.Tensor], hashes: bytes, blocks: list[int]) -> None:
    """Each chunk's blocks hold values taken from its own hash: a byte from another chunk shows."""
    for c, h in enumerate(split_hashes(hashes)):
        for layer, t in enumerate(kv):
            for j in range(BPC):
                t[blocks[c * BPC + j]].fill_(page_value(h, layer, j))


def chunks_match(kv: list[torch.Tensor], hashes: bytes, blocks: list[int]) -> bool:
    for c, h in enumerate(split_hashes(hashes)):
        for layer, t in enumerate(kv):
            for j in range(BPC):
                if not bool((t[blocks[c * BPC + j]] == page_value(h, layer, j)).all()):
                    return False
    return True


def wrong_bytes(page: torch.Tensor, value: float) -> int:
    """How many bytes of ``page`` differ from a page filled with ``value`` (compared as bytes,
    so a NaN or a -0.0 counts too)."""
    got = page.contiguous().view(torch.uint8)
    return int((got != torch.full_like(page, value).contiguous().view(torch.uint8)).sum())


def process_state(pid: int, thread: int | None = None) -> str:
    """The state letter of /proc/<pid>/stat, or of one of its threads ("T": stopped); "gone"
    once the process is reaped."""
    try:
        with open(f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def shm_files(pid: int) -> list[str]:
    """The /dev/shm files an engine process ``pid`` created (KV segments, its liveness mark)."""
    return [n for n in os.listdir("/dev/shm") if n.startswith((f"lmcache_kv_{pid}_", f"lmcache_live_{pid}_"))]


class Truth:
    """The test's own engine (engine_driven): stores chunks whose bytes it can check later."""

    def __init__(self, client: MPClient) -> None:
        self.client = client
        self.kv = make_kv("LBHNC", "float16")  # 32 blocks: 8 chunks per request
        self.reg = register_kv_caches(client, self.kv, model="m", instance_id="truth", mode="engine_driven")
        self.stored: dict[bytes, None] = {}  # every chunk it ever stored, once, in order

    def store(self, hashes: bytes) -> int:
        blocks = list(range(len(hashes) // HASH_BYTES * BPC))
        fill_chunks(self.kv, hashes, blocks)
        stored = self.reg.store(hashes, blocks).stored
        self.stored.update(dict.fromkeys(split_hashes(hashes)))
        return stored

    def flood(self, rounds: int, seed: int) -> None:
        """Stores far more than L1 holds: every free slot is handed out again, many times."""
        for r in range(rounds):
            self.store(chunk_hashes(8, seed=seed * 1000 + r))

    def check_all(self) -> int:
        """Loads every stored chunk still cached, into zeroed blocks; asserts each byte. Returns
        how many chunks it checked."""
        present = [h for h in self.stored if self.client.lookup(self.reg.scope(), h) == 1]
        checked = 0
        for i in range(0, len(present), 8):
            batch = b"".join(present[i : i + 8])
            blocks = list(range(len(batch) // HASH_BYTES * BPC))
            for t in self.kv:
                t.zero_()
            written = self.reg.retrieve(batch, blocks).retrieved
            # A chunk evicted since the lookup ends the batch early; what was written is checked.
            assert chunks_match(self.kv, batch[: written * HASH_BYTES], blocks), "a cached chunk holds wrong bytes"
            checked += written
        return checked


def spawn(target: Callable[..., None], *args: Any) -> tuple[Any, Any]:
    """Runs ``target(*args, conn)`` in a fresh interpreter; returns (process, the parent's end)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), daemon=True)
    proc.start()
    return proc, parent
