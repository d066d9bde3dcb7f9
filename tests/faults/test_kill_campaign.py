"""A bounded, seeded, randomized fault campaign: engines killed and stopped at random moments
against a real server, every loaded byte checked; then a server killed under the simulator.

Per CPU transfer mode, a server with a small L1 (so slots are reused all the time) and a short
lock TTL serves the test's own Truth engine and, round after round, one engine process that
stores and loads chunks of prompts from a small universe (so prompts repeat and loads hit) and
checks every byte it loads itself, reporting over a pipe as it goes (a killed engine's reports
are already in the pipe). At a random moment the test SIGKILLs it (some of those kills land
while it registers), or SIGSTOPs it until its locks have expired, pushes every L1 slot through
reuse with Truth's stores, and lets it go on and finish. After every round: no engine saw a
wrong byte, Truth's cached chunks load byte-exact, the server answers and is healthy, and no
lock, ticket, orphaned slot or byte of L1 is left behind; at the end, no engine file is left in
/dev/shm either.

Reproduce a failure with the seed it prints: LMCACHE_CAMPAIGN_SEED=<seed> pytest this file.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from engine_support import (
    BPC, CHUNK, CHUNK_BYTES, TTL, Truth, chunk_hashes, fill_chunks, page_value, process_state, shm_files,
    wait_until, wrong_bytes,
)
from lmcache import protocol as p
from lmcache.client import MPClient, ServerError, ServerUnavailableError
from lmcache.kv_transfer import register_kv_caches
from lmcache.keys import HASH_BYTES, split_hashes
from lmcache.server.process import ServerProcess, free_port
from lmcache.testing.vllm_like import make_kv

ROOT = Path(__file__).resolve().parents[2]
MODES = ("engine_driven", "lmcache_driven")
# One seed for the whole file (each mode derives its own from it); printed and recorded.
SEED = int(os.environ.get("LMCACHE_CAMPAIGN_SEED", "20261202"))
# Per mode: the kinds of rounds, shuffled by the seed (the first is always a plain kill, so the
# registration time the later registration kills aim at has been measured once).
SCHEDULE = ("kill",) * 4 + ("register_kill",) * 3 + ("stop",) * 3
STOP_TRIES = 30  # lmcache_driven: SIGSTOPs tried per stop round to land it inside its target copy
SENTINEL = -1.0  # what a block holds before a load: no chunk's page holds it (they hold 0..255)

# Truth cycles through 96 prompts of 8 chunks (768 chunks, 3x the ~256 slots of L1), so its
# stores keep evicting and every slot keeps being handed out again.
TRUTH_PROMPTS = [chunk_hashes(8, seed=1000 + i) for i in range(96)]
# What engines play: 6 prompts of their own and 2 of Truth's (so engines also load chunks Truth
# stored, and store chunks Truth loads), cut to a random number of leading chunks each time.
UNIVERSE = [chunk_hashes(8, seed=5000 + b) for b in range(6)] + TRUTH_PROMPTS[:2]


# --- the engine process -----------------------------------------------------------------------


def campaign_engine(port: int, mode: str, seed: int, universe: list[bytes], stop: Any, conn: Any) -> None:
    """Registers once, then loops until ``stop`` is set: looks a random prompt up, loads its
    cached leading chunks into random blocks (sometimes skipping leading blocks, as vLLM does for
    blocks it holds) and checks every byte, then stores the prompt. Reports each finding at once
    (``conn`` is a one-way pipe: a small message is written whole or not at all)."""
    torch.set_num_threads(1)  # two cores, shared with the server and the test
    rng = random.Random(seed)
    conn.send(("registering",))
    started = time.monotonic()
    client = MPClient("127.0.0.1", port, timeout_s=30)
    kv = make_kv("LBHNC", "float16")
    reg = register_kv_caches(client, kv, model="m", instance_id=f"campaign-{os.getpid()}", mode=mode)
    conn.send(("registered", time.monotonic() - started))
    scope = reg.scope()
    n_blocks = kv[0].shape[0]
    try:
        while not stop.is_set():
            # Mostly the universe (loads hit); now and then a prompt never seen, whose store
            # needs fresh slots (in lmcache_driven mode: raw offsets this engine writes).
            base = rng.choice(universe) if rng.random() < 0.7 else chunk_hashes(8, seed=rng.randrange(1 << 40))
            hashes = base[: rng.randint(1, len(base) // HASH_BYTES) * HASH_BYTES]
            blocks = rng.sample(range(n_blocks), len(hashes) // HASH_BYTES * BPC)
            written = checked = stored = 0
            try:
                hit = client.lookup(scope, hashes)
                if hit:
                    skip = rng.choice([0, 0, rng.randrange(hit * BPC)])
                    wanted = blocks[: hit * BPC]
                    index = torch.tensor(wanted)
                    for t in kv:
                        t.index_fill_(0, index, SENTINEL)
                    written = reg.retrieve(hashes[: hit * HASH_BYTES], wanted, skip_blocks=skip).retrieved
                    checked = check_load(conn, kv, hashes[: written * HASH_BYTES], wanted, skip)
                if rng.random() < 0.8:
                    fill_chunks(kv, hashes, blocks)
                    stored = reg.store(hashes, blocks).stored
            except (ServerError, ServerUnavailableError) as e:
                conn.send(("error", type(e).__name__, str(e)[:500]))
            conn.send(("iter", written, checked, stored))
        client.close()
        conn.send(("done",))
    except BaseException:
        conn.send(("crash", traceback.format_exc()[-3000:]))
        raise


def check_load(conn: Any, kv: list[torch.Tensor], hashes: bytes, blocks: list[int], skip: int) -> int:
    """Checks the blocks of the chunks a load reported written: the skipped leading blocks must
    still hold the sentinel, every other page its chunk's values. Reports wrong bytes at once;
    returns the bytes checked."""
    checked = 0
    for c, h in enumerate(split_hashes(hashes)):
        bad = 0
        for layer, t in enumerate(kv):
            for j in range(BPC):
                i = c * BPC + j
                page = t[blocks[i]]
                bad += wrong_bytes(page, SENTINEL if i < skip else page_value(h, layer, j))
                checked += page.numel() * page.element_size()
        if bad:
            conn.send(("mismatch", f"chunk {c} ({h.hex()}) of a {len(hashes) // HASH_BYTES}-chunk load, "
                                   f"skip {skip}", bad))
    return checked


# --- the test's side of one engine --------------------------------------------------------------


class EngineRun:
    """One campaign engine process and everything it reported (read by a thread, so the pipe
    never fills while the test is busy)."""

    def __init__(self, ctx: Any, port: int, mode: str, seed: int) -> None:
        self.rx, tx = ctx.Pipe(duplex=False)
        self.stop = ctx.Event()
        self.proc = ctx.Process(target=campaign_engine, args=(port, mode, seed, UNIVERSE, self.stop, tx), daemon=True)
        self.proc.start()
        tx.close()  # the engine holds the only write end: its death ends the reader
        self.pid: int = self.proc.pid
        self.messages: list[tuple[Any, ...]] = []
        self._changed = threading.Condition()
        self._eof = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                message = self.rx.recv()
            except (EOFError, OSError):
                break
            with self._changed:
                self.messages.append(message)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        with self._changed:
            return [m for m in self.messages if m[0] == kind]

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not condition():
                crash = [m for m in self.messages if m[0] == "crash"]
                assert not crash, f"engine {self.pid} crashed:\n{crash[0][1]}"
                remaining = deadline - time.monotonic()
                assert remaining > 0 and not self._eof, (
                    f"engine {self.pid}: {'it ended' if self._eof else 'timed out'} before {what}")
                self._changed.wait(min(remaining, 0.1))

    def iterations(self) -> int:
        return len(self.of("iter"))

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def reap(self, timeout_s: float = 15.0) -> None:
        """Waits for the process to end (killing it if it must) and for the last reports."""
        if self.proc.exitcode is None and process_state(self.pid) == "T":
            os.kill(self.pid, signal.SIGCONT)
        self.proc.join(timeout_s)
        if self.proc.exitcode is None:
            self.kill()
            self.proc.join(timeout_s)
        with self._changed:
            self._changed.wait_for(lambda: self._eof, timeout_s)


@dataclass
class Tally:
    rounds: int = 0
    kills: int = 0
    register_kills: int = 0
    register_kills_before_registered: int = 0  # the engine had not finished registering
    stops: int = 0
    stop_tries: int = 0
    stops_inside_a_store: int = 0  # it held write slots when it stopped (lmcache_driven)
    stops_inside_a_load: int = 0  # it held read locks when it stopped
    orphans_seen: int = 0
    engine_iterations: int = 0
    engine_chunks_loaded: int = 0
    engine_bytes_checked: int = 0
    engine_chunks_stored: int = 0
    engine_errors: int = 0
    truth_stores: int = 0
    truth_chunks_checked: int = 0
    mismatched_bytes: int = 0


class TruthFeed:
    """Truth storing its prompts in turn, paced or flat out."""

    def __init__(self, truth: Truth, tally: Tally) -> None:
        self.truth, self.tally, self.next = truth, tally, 0

    def store(self, n: int = 1) -> None:
        for _ in range(n):
            self.truth.store(TRUTH_PROMPTS[self.next % len(TRUTH_PROMPTS)])
            self.next += 1
            self.tally.truth_stores += 1

    def run_for(self, seconds: float) -> None:
        """Stores at a steady pace while an engine runs (that is the random moment's wait)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.store()
            time.sleep(0.01)  # paced: the engine's own chunks must survive long enough to hit


# --- checks -----------------------------------------------------------------------------------


def quiet_problem(status: dict[str, Any]) -> str | None:
    """What is still held, or None: no lock, no open ticket, no orphan, no byte beyond the objects."""
    l1 = status["l1"]
    held = {k: l1[k] for k in ("read_locked", "writing", "orphans") if l1[k]}
    if status["tickets"]["open"]:
        held["open tickets"] = status["tickets"]["open"]
    if l1["used_bytes"] != l1["objects"] * CHUNK_BYTES:
        held["used_bytes"] = f"{l1['used_bytes']} for {l1['objects']} objects"
    return ", ".join(f"{k} {v}" for k, v in held.items()) or None


def wait_quiet(client: MPClient, where: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (problem := quiet_problem(client.status())) is not None:
        assert time.monotonic() < deadline, f"{where}: still held after {timeout_s} s: {problem}"
        time.sleep(0.05)


def assert_serving(server: ServerProcess, client: MPClient, http: httpx.Client, where: str) -> None:
    assert client.ping(timeout=2) == p.Pong(), where
    health = http.get("/healthcheck")
    assert health.status_code == 200 and health.json() == {"status": "healthy"}, f"{where}: {health.text}"
    bad = [line for line in server.lines if "Traceback" in line or "LMCache ERROR" in line or "CRITICAL" in line]
    assert not bad, f"{where}: the server logged {bad[:5]}:\n{server.output()[-3000:]}"


# --- the campaign -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines() -> Any:
    """Engines fork from multiprocessing's fork server, which has imported torch and our code
    once: a spawned engine takes ~2.5 s to start on this machine, a forked one ~0.2 s, which is
    what lets twenty rounds fit in the time. Each is still a process of its own (its own
    interpreter state, sockets, SHM mappings and flocks), killed and stopped for real."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lmcache.client", "lmcache.transfer.registered", "engine_support", __name__])
    return ctx


@dataclass(frozen=True)
class Round:
    """One round, drawn whole from the seed before it runs (so timing never shifts the draws)."""

    kind: str  # kill, register_kill or stop
    engine_seed: int  # the engine's own choices: prompts, lengths, blocks, skips
    run_s: float  # kill and stop rounds: how long it runs (while Truth stores) before the fault
    register_kill_at: float  # register_kill: when, as a fraction of a measured registration
    target: str  # stop, lmcache_driven: catch it holding slots to write ("writing") or read
    flood: int  # stop: Truth prompts (8 chunks each) stored while it is stopped
    tries_seed: int  # stop: the pauses between tries to catch it in a copy


def plan(seed: int) -> list[Round]:
    rng = random.Random(seed)
    # The first round is a plain kill, so the registration time that registration kills aim
    # within has been measured; stop rounds aim at stores and loads in turn.
    kinds = ["kill"] + rng.sample(SCHEDULE[1:], len(SCHEDULE) - 1)
    first = rng.randrange(2)
    stops = [i for i, kind in enumerate(kinds) if kind == "stop"]
    return [
        Round(kind, rng.randrange(1 << 32), rng.uniform(0.05, 0.6), rng.random(),
              ("writing", "read_locked")[(stops.index(i) + first) % 2] if kind == "stop" else "",
              rng.randint(64, 96), rng.randrange(1 << 32))
        for i, kind in enumerate(kinds)
    ]


@pytest.mark.parametrize("mode", MODES)
def test_engines_killed_and_stopped_at_random_never_cost_a_byte(
    engines: Any, mode: str, record_property: Callable[[str, object], None]
) -> None:
    seed = SEED + MODES.index(mode)
    record_property("seed", seed)
    print(f"kill campaign ({mode}): seed {seed}; rerun with LMCACHE_CAMPAIGN_SEED={SEED}")
    tally = Tally()
    errors: list[str] = []
    registration_s: list[float] = []
    pids: list[int] = []
    args = ["--chunk-size", str(CHUNK), "--lock-ttl", TTL]
    # About 1 MiB of L1: 4 KiB chunks, ~256 slots.
    with ServerProcess(l1_size_gb=1 / 1024, extra_args=args) as server, \
            MPClient("127.0.0.1", server.port, timeout_s=30) as client, \
            httpx.Client(base_url=server.http_url, timeout=5.0) as http:
        feed = TruthFeed(Truth(client), tally)
        for number, rnd in enumerate(plan(seed)):
            run = EngineRun(engines, server.port, mode, rnd.engine_seed)
            pids.append(run.pid)
            where = f"seed {seed}, {mode}, round {number} {rnd}, engine pid {run.pid}"
            try:
                if rnd.kind == "register_kill":
                    run.wait_for(lambda: bool(run.of("registering")), "it starts registering")
                    # The fault's own moment, not a wait for a condition: within the time a
                    # registration takes here, as measured on the earlier rounds.
                    time.sleep(rnd.register_kill_at * statistics.median(registration_s or [0.05]))
                    run.kill()
                else:
                    run.wait_for(lambda: run.iterations() >= 1, "it ran once")
                    feed.run_for(rnd.run_s)
                    if rnd.kind == "kill":
                        run.kill()
                    else:
                        stop_and_resume(run, client, feed, rnd, mode, tally, where)
            finally:
                run.reap()
            account(run, rnd.kind, tally, registration_s, where)
            errors.extend(f"{e[1]}: {e[2]}" for e in run.of("error"))
            tally.truth_chunks_checked += feed.truth.check_all()  # asserts every byte
            assert_serving(server, client, http, where)
            wait_quiet(client, where)
        where = f"seed {seed}, {mode}, after all rounds"
        # Clean exits and kills alike: every file an engine made in /dev/shm goes (the server
        # sweeps those whose creator's flock is gone, once they are 2 s old).
        deadline = time.monotonic() + 20
        while left := [f for pid in pids for f in shm_files(pid)]:
            assert time.monotonic() < deadline, f"{where}: engine files left in /dev/shm: {left}"
            time.sleep(0.05)
        wait_quiet(client, where)
        tally.truth_chunks_checked += feed.truth.check_all()
        assert_serving(server, client, http, where)
    print(f"kill campaign ({mode}), seed {seed}: {json.dumps(asdict(tally))}")
    print(f"engine errors: {sorted(set(errors))}")
    print(f"server warnings: {sorted({line for line in server.lines if 'LMCache INFO' not in line})[:20]}")
    record_property("tally", asdict(tally))
    assert tally.mismatched_bytes == 0
    assert tally.rounds == len(SCHEDULE) and tally.kills + tally.stops == len(SCHEDULE)
    assert tally.engine_chunks_loaded > 0, "no engine ever loaded a chunk: the campaign checked nothing"
    if mode == "lmcache_driven":
        # The stops that matter: an engine holding raw arena offsets while its locks expire.
        assert tally.stops_inside_a_store + tally.stops_inside_a_load > 0, tally


def settled_l1(client: MPClient) -> dict[str, Any]:
    """L1's figures once two reads 20 ms apart agree: a request the engine sent just before it
    stopped has been served by then (the engine sends nothing more while stopped)."""
    keys = ("writing", "read_locked", "orphans")
    last = client.status()["l1"]
    deadline = time.monotonic() + 5.0
    while True:
        time.sleep(0.02)  # the settling interval itself, inside a deadline
        now = client.status()["l1"]
        if all(now[k] == last[k] for k in keys) or time.monotonic() > deadline:
            return now
        last = now


def stop_and_resume(run: EngineRun, client: MPClient, feed: TruthFeed, rnd: Round, mode: str,
                    tally: Tally, where: str) -> None:
    """SIGSTOPs the engine (in lmcache_driven mode, retrying to catch it inside a store's or a
    load's copy, whichever the round drew), waits until its locks expired, reuses every slot,
    then lets it go on and finish."""
    tries = random.Random(rnd.tries_seed)
    for attempt in range(STOP_TRIES if mode == "lmcache_driven" else 1):
        tally.stop_tries += 1
        if mode == "lmcache_driven":
            # Catch it in the act: the server shows it holding slots of the drawn kind (a copy
            # window lasts about a round trip, so a blind stop rarely lands in a store's).
            deadline = time.monotonic() + 0.5
            while not client.status()["l1"][rnd.target] and time.monotonic() < deadline:
                pass
        os.kill(run.pid, signal.SIGSTOP)
        wait_until(lambda: process_state(run.pid) == "T", f"{where}: it stopped")
        l1 = settled_l1(client)  # Truth is idle: whatever is locked now is the engine's
        if l1[rnd.target] or attempt == STOP_TRIES - 1 or mode != "lmcache_driven":
            break
        os.kill(run.pid, signal.SIGCONT)
        feed.run_for(tries.uniform(0, 0.05))
    writing, reading = l1["writing"], l1["read_locked"]
    tally.stops += 1
    tally.stops_inside_a_store += bool(writing)
    tally.stops_inside_a_load += bool(reading)
    # Past the lock TTL its locks are gone, though it may still copy when it wakes up.
    wait_until(lambda: (lambda s: s["read_locked"] == 0 and s["writing"] == 0)(client.status()["l1"]),
               f"{where}: the stopped engine's locks expired", timeout_s=15)
    # An expired load's ticket goes; a store's stays while its engine lives (at most one: the
    # engine was stopped in one request).
    wait_until(lambda: client.status()["tickets"]["open"] <= 1, f"{where}: an expired load's ticket went",
               timeout_s=10)
    status = client.status()
    # The slots it was writing stay its own (orphans, never reused) while it lives; in
    # engine_driven mode the server did its copies itself, so it holds nothing.
    expected = writing if mode == "lmcache_driven" else 0
    assert status["l1"]["orphans"] == expected, f"{where}: {status} (writing {writing} when stopped)"
    assert status["tickets"]["open"] == 1 or not expected, f"{where}: {status}"
    tally.orphans_seen += status["l1"]["orphans"]
    feed.store(rnd.flood)  # 512-768 chunks through ~256 slots: every free slot reused
    assert process_state(run.pid) == "T", f"{where}: it woke up before the slots were reused"
    before = run.iterations()
    os.kill(run.pid, signal.SIGCONT)  # it now finishes the copy it was stopped in, late
    run.wait_for(lambda: run.iterations() >= before + 3, f"{where}: it runs on after SIGCONT")
    if mode == "lmcache_driven":
        # The iteration it was stopped in: a load whose locks expired counts nothing as loaded,
        # a store whose slots were orphaned publishes nothing (its bytes may be stale by now).
        _, written, _, stored = run.of("iter")[before]
        assert not (reading and written), f"{where}: a load whose locks expired reported {written} chunks"
        assert not (writing and stored), f"{where}: a store whose slots were orphaned published {stored} chunks"
    run.stop.set()
    run.wait_for(lambda: bool(run.of("done")), f"{where}: it finishes cleanly")
    run.proc.join(15)
    assert run.proc.exitcode == 0, f"{where}: exit status {run.proc.exitcode}"


def account(run: EngineRun, kind: str, tally: Tally, registration_s: list[float], where: str) -> None:
    """Adds the round's reports to the tally; asserts the engine saw no wrong byte and failed
    no request it had no reason to fail."""
    crash = run.of("crash")
    assert not crash, f"{where}: the engine crashed:\n{crash[0][1]}"
    if kind == "stop":
        assert run.proc.exitcode == 0, f"{where}: exit status {run.proc.exitcode}"
    else:
        assert run.proc.exitcode == -signal.SIGKILL, f"{where}: exit status {run.proc.exitcode}"
        tally.kills += 1
    registered = run.of("registered")
    registration_s.extend(m[1] for m in registered)
    if kind == "register_kill":
        tally.register_kills += 1
        tally.register_kills_before_registered += not registered
    tally.rounds += 1
    iterations = run.of("iter")
    tally.engine_iterations += len(iterations)
    tally.engine_chunks_loaded += sum(m[1] for m in iterations)
    tally.engine_bytes_checked += sum(m[2] for m in iterations)
    tally.engine_chunks_stored += sum(m[3] for m in iterations)
    mismatches = run.of("mismatch")
    tally.mismatched_bytes += sum(m[2] for m in mismatches)
    assert not mismatches, f"{where}: the engine loaded wrong bytes: {mismatches[:5]}"
    errors = run.of("error")
    tally.engine_errors += len(errors)
    # Only an engine that was stopped past the lock TTL may have had a request refused: the
    # late FinishRetrieve of a load whose ticket expired (it counts as a failed load).
    unexpected = [e for e in errors if kind != "stop" or e[1] != "ServerError" or "expired" not in e[2]]
    assert not unexpected, f"{where}: requests failed: {unexpected[:5]}"


# --- the server killed under the simulator ----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_server_killed_under_the_simulator_is_replaced_and_serves_again(
    tmp_path: Path, mode: str, record_property: Callable[[str, object], None]
) -> None:
    """`python -m sim` plays chat traffic against a server that is SIGKILLed mid-run and
    replaced by a new one on the same ports: the simulator must finish, exact, and be served
    (stores and hits) by the new server, which its workers register with again (engine_driven:
    moving their KV into fresh segments; lmcache_driven: mapping the new arena). --timeout-s 3
    bounds a request the dead server never answers (the connector's default is 5 s; the
    simulator's own default, 60, would stall the run a minute)."""
    seed = SEED + 10 + MODES.index(mode)
    rng = random.Random(seed)
    sim_seed, kill_after = rng.randrange(1000), rng.randint(20, 120)  # the kill: after that many stores
    record_property("seed", seed)
    print(f"simulator restart ({mode}): seed {seed} (sim --seed {sim_seed}, kill after {kill_after} stores); "
          f"rerun with LMCACHE_CAMPAIGN_SEED={SEED}")
    port, http_port = free_port(), free_port()
    args = ["--chunk-size", "256", "--lock-ttl", TTL]
    report = tmp_path / "report.json"
    requests = 300  # ~5 s of sequential play here, after ~4 s of start-up
    first = ServerProcess(l1_size_gb=0.05, port=port, http_port=http_port, extra_args=args).start()
    second: ServerProcess | None = None
    sim = subprocess.Popen(
        [sys.executable, "-m", "sim", "synth", "chat", "--requests", str(requests), "--prompt-tokens", "1024",
         "--seed", str(sim_seed),
         "--sequential", "--host", "127.0.0.1", "--port", str(port), "--transfer-mode", mode, "--timeout-s", "3",
         "--report", str(report)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(sim.stdout or ()), daemon=True)
    reader.start()
    try:
        # Mid-run: it has stored and loaded through the first server (and is far from done).
        wait_until(lambda: sim.poll() is None and sum("Stored" in line for line in first.lines) >= kill_after
                   and any("Retrieved" in line for line in first.lines),
                   f"the simulator makes progress (its output so far: {''.join(output)[-2000:]})", timeout_s=60)
        first.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        assert sim.poll() is None, "the simulator finished before the server was killed: give it more requests"
        second = ServerProcess(l1_size_gb=0.05, port=port, http_port=http_port, extra_args=args).start()
        # The new server removed the dead one's L1 arena from /dev/shm when it started.
        assert not os.path.exists(f"/dev/shm/lmcache_l1_{first.proc.pid}")
        code = sim.wait(timeout=90)
        finished_after_s = time.monotonic() - killed_at
        reader.join(10)
        text = "".join(output)
        assert code == 0, f"the simulator failed (exit status {code}):\n{text[-4000:]}"
        result = json.loads(report.read_text())
        record_property("sim_report", result)
        assert result["mismatched_bytes"] == 0, text[-4000:]
        assert result["requests"] == requests
        with MPClient("127.0.0.1", port, timeout_s=5) as client:
            status = client.status()
        # The new server started empty: whatever it stored and served came after the restart.
        assert status["l1"]["stored"] > 0 and status["l1"]["hits"] > 0, status["l1"]
        assert any(e["instance_id"].startswith("sim-") for e in status["engines"]), "the workers registered again"
        warnings = [line.strip() for line in text.splitlines() if "WARNING" in line]
        print(f"simulator ({mode}) across a server restart: finished {finished_after_s:.1f} s after the kill; "
              f"new server stored {status['l1']['stored']} chunks, hit {status['l1']['hits']}; "
              f"its warnings: {warnings}; report: {json.dumps(result)}")
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()
        for server in (first, second):
            if server is not None and server.proc is not None and server.proc.poll() is None:
                server.stop()
