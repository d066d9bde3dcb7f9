"""Where the simulator's requests come from: Mooncake traces and synthetic generators.

Every request is (arrival time in seconds, prompt token ids, tokens to generate). Token ids are deterministic, so
two requests share a prefix exactly when their sources say they do.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 32_000
TRACE_BLOCK = 512  # tokens behind one Mooncake hash id


@dataclass(frozen=True)
class SimRequest:
    req_id: str
    arrival_s: float
    tokens: list[int]
    output_tokens: int = 16


def _block_tokens(hash_id: int) -> list[int]:
    return np.random.default_rng([0x4C4D43, hash_id]).integers(1, VOCAB, TRACE_BLOCK).tolist()


class TraceError(ValueError):
    """A trace line that is not a request; the message names the file, the line and what is wrong."""


def _integer(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _ids(value: object) -> bool:
    return isinstance(value, list) and all(_integer(x, 0) for x in value)


# key, required, check, what the check wants
_FIELDS: tuple[tuple[str, bool, Callable[[object], bool], str], ...] = (
    ("timestamp", True, _number, "a number (ms)"),
    ("input_length", True, lambda v: _integer(v, 1), "a positive integer"),
    ("hash_ids", True, _ids, "a list of integers >= 0"),
    ("output_length", False, lambda v: _integer(v, 0), "an integer >= 0"),
)


def _parse(path: Path, lineno: int, line: str) -> dict[str, Any]:
    where = f"{path}, line {lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise TraceError(f"{where}: not a JSON object")
    for key, required, check, what in _FIELDS:
        if key not in row:
            if required:
                raise TraceError(f"{where}: missing key {key!r}")
        elif not check(row[key]):
            raise TraceError(f"{where}: {key!r} must be {what}, not {row[key]!r}")
    if row["input_length"] > TRACE_BLOCK * len(row["hash_ids"]):  # the prompt would be cut short silently
        raise TraceError(f"{where}: 'input_length' {row['input_length']} needs at least "
                         f"{-(-row['input_length'] // TRACE_BLOCK)} 'hash_ids' ({TRACE_BLOCK} tokens each), not "
                         f"{len(row['hash_ids'])}")
    return row


def trace_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The requests of a Mooncake trace, one JSON object a line, checked; blank lines are skipped
    (they are not requests: --requests and --skip do not count them)."""
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield _parse(path, lineno, line)


def count_requests(path: Path, limit: int, skip: int = 0) -> int:
    """How many of ``limit`` requests after the first ``skip`` the trace holds; checks each line
    up to there (raising TraceError), so a bad line is found before anything starts."""
    return max(0, sum(1 for _ in itertools.islice(trace_rows(path), skip + limit)) - skip)


def mooncake(path: Path, limit: int | None = None, skip: int = 0) -> Iterator[SimRequest]:
    """A Mooncake trace: each hash id stands for 512 deterministic tokens; prompts are cut to
    ``input_length``, so prefix sharing is exactly the trace's. ``skip``: start after that many
    requests (arrival times then count from the first one played)."""
    cache: dict[int, list[int]] = {}
    start: float | None = None
    for i, row in enumerate(trace_rows(path)):
        if i < skip:
            continue
        if limit is not None and i >= skip + limit:
            return
        start = row["timestamp"] if start is None else start
        row["timestamp"] -= start
        tokens: list[int] = []
        for hash_id in row["hash_ids"]:
            if hash_id not in cache:
                cache[hash_id] = _block_tokens(hash_id)
            tokens.extend(cache[hash_id])
        yield SimRequest(f"t{i}", row["timestamp"] / 1000, tokens[: row["input_length"]], row.get("output_length", 16))


def trace_chunk_keys(path: Path, chunk_size: int, limit: int | None = None) -> Iterator[tuple[int, list[tuple]]]:
    """(input length, identity of each whole chunk) per request, from the hash ids alone: what a
    replay's hits must match. Needs chunk_size to divide the 512-token trace blocks."""
    assert TRACE_BLOCK % chunk_size == 0
    per_block = TRACE_BLOCK // chunk_size
    for i, row in enumerate(trace_rows(path)):
        if limit is not None and i >= limit:
            return
        n = row["input_length"] // chunk_size
        ids = row["hash_ids"]
        yield row["input_length"], [(tuple(ids[: k // per_block + 1]), k % per_block) for k in range(n)]


KINDS = ("chat", "system-prompt", "rag", "random", "repeat")


def synthetic(kind: str, requests: int, prompt_tokens: int, seed: int = 0, rate: float = 20.0) -> Iterator[SimRequest]:
    """Workloads users recognise. ``prompt_tokens`` sets the typical prompt size; requests arrive
    ``rate`` per second."""
    for req in _synthetic(kind, requests, prompt_tokens, seed):
        yield SimRequest(req.req_id, req.arrival_s / rate, req.tokens)


def _synthetic(kind: str, requests: int, prompt_tokens: int, seed: int) -> Iterator[SimRequest]:
    rng = random.Random(seed)

    def text(n: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(n)]

    if kind == "repeat":  # every prompt twice in a row: store, then load
        prompt: list[int] = []
        for i in range(requests):
            if i % 2 == 0:
                prompt = text(prompt_tokens)
            yield SimRequest(f"s{i}", float(i), prompt)
    elif kind == "random":  # no reuse at all
        for i in range(requests):
            yield SimRequest(f"s{i}", float(i), text(prompt_tokens))
    elif kind == "system-prompt":  # one long shared system prompt, short questions
        system = text(prompt_tokens)
        for i in range(requests):
            yield SimRequest(f"s{i}", float(i), system + text(max(8, prompt_tokens // 8)))
    elif kind == "rag":  # a few documents from a pool, then a question
        pool = [text(prompt_tokens // 2) for _ in range(8)]
        for i in range(requests):
            docs = rng.sample(range(len(pool)), 2)
            yield SimRequest(f"s{i}", float(i), pool[docs[0]] + pool[docs[1]] + text(32))
    elif kind == "chat":  # conversations whose every turn repeats the history
        conversations: list[list[int]] = []
        for i in range(requests):
            if not conversations or rng.random() < 0.3:
                conversations.append(text(prompt_tokens // 2))
            c = rng.randrange(len(conversations))
            conversations[c] = conversations[c] + text(prompt_tokens // 4)  # answer + next question
            yield SimRequest(f"s{i}", float(i), list(conversations[c]))
    else:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
