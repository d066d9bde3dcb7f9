"""L2: the disk tier under L1. Real files in temporary directories, real server processes.

What it must show: write-through (every stored chunk lands on disk with a valid header), warm
restarts after SIGTERM and SIGKILL that serve the same bytes, damaged files that are misses and
never wrong bytes, a full disk that stops writes and keeps reads, a full write queue that never
holds up a Store, the tier's own eviction policy (any of L1's), and flags that are refused in one
line.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from lmcache.client import MPClient
from lmcache.config import EvictionPolicy
from lmcache.keys import CacheScope, prompt_hashes, split_hashes
from lmcache.kv_transfer import register_kv_caches
from lmcache.server.process import ServerProcess, lmcache_command
from lmcache.storage.l2 import chunk_file
from lmcache.storage.l2.chunk_file import HEADER_BYTES
from lmcache.storage.l2.disk import ROOT_NAME, DirectoryInUse, DiskTier
from lmcache.testing.vllm_like import block_bytes, fill, make_kv

CHUNK = 64  # 4 blocks of 16 tokens (make_kv's default block size)
SCOPE = CacheScope("m", 1, 0, "fmt/a", "")
OTHER = CacheScope("m", 1, 0, "fmt/b", "")


def _until(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _payload(i: int, n: int = 4096) -> bytes:
    return random.Random(i).randbytes(n)


def _chunk_files(root: Path) -> list[Path]:
    return sorted(root.glob(f"{ROOT_NAME}/*/*.kv"))


# --- the disk tier on its own ---------------------------------------------------------------


def _tier_with(tmp_path: Path, n: int = 3, max_bytes: int = 1 << 20,
               policy: EvictionPolicy = EvictionPolicy.LRU) -> tuple[DiskTier, list[bytes]]:
    tier = DiskTier(tmp_path, max_bytes, policy)
    key = chunk_file.scope_id(SCOPE)
    hashes = [bytes([i]) * 16 for i in range(n)]
    for i, h in enumerate(hashes):
        assert tier.put(SCOPE, key, h, CHUNK, memoryview(_payload(i)))
    return tier, hashes


def _get(tier: DiskTier, scope: CacheScope, h: bytes) -> bytes | None:
    into = bytearray(4096)
    return bytes(into) if tier.get(chunk_file.scope_id(scope), h, memoryview(into)) else None


def test_a_chunk_round_trips_with_a_valid_header(tmp_path: Path) -> None:
    tier, hashes = _tier_with(tmp_path)
    for i, h in enumerate(hashes):
        assert _get(tier, SCOPE, h) == _payload(i)
    files = _chunk_files(tmp_path)
    assert len(files) == 3
    header = chunk_file.unpack(files[0].read_bytes()[:HEADER_BYTES])
    assert header.tokens == CHUNK and header.payload_bytes == 4096 and header.scope_id == chunk_file.scope_id(SCOPE)
    assert tier.status()["objects"] == 3 and tier.status()["used_bytes"] == 3 * (4096 + HEADER_BYTES)


def _flip_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 1234] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _bad_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:4] = b"NOPE"
    path.write_bytes(bytes(data))


def _other_hash_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[40] ^= 1  # the chunk hash in the header
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def test_one_directory_serves_one_process_at_a_time(tmp_path: Path) -> None:
    tier, _ = _tier_with(tmp_path)
    with pytest.raises(DirectoryInUse, match="another lmcache server uses"):
        DiskTier(tmp_path, 1 << 20)
    tier.close()
    DiskTier(tmp_path, 1 << 20).close()  # free again


def test_a_file_that_is_not_a_regular_file_is_never_read(tmp_path: Path) -> None:
    tier, hashes = _tier_with(tmp_path)
    target = next(p for p in _chunk_files(tmp_path) if p.name.startswith(hashes[2].hex()))
    target.unlink()
    os.mkfifo(target)  # a read of it would block forever
    assert _get(tier, SCOPE, hashes[2]) is None
    elsewhere = tmp_path / "elsewhere.kv"
    elsewhere.write_bytes((next(p for p in _chunk_files(tmp_path) if p.name.startswith(hashes[0].hex()))).read_bytes())
    victim = next(p for p in _chunk_files(tmp_path) if p.name.startswith(hashes[0].hex()))
    victim.unlink()
    victim.symlink_to(elsewhere)  # a symlink planted under a chunk's name
    assert _get(tier, SCOPE, hashes[0]) is None
    assert not victim.is_symlink() and elsewhere.exists()  # the link is removed, not what it names
    assert tier.counters.corrupt == 2
    assert _get(tier, SCOPE, hashes[1]) == _payload(1)


@pytest.mark.parametrize("damage", [_flip_payload_byte, _truncate, _bad_magic, _other_hash_header, _empty])
def test_a_damaged_chunk_is_a_miss_deleted_and_counted(tmp_path: Path, damage) -> None:
    tier, hashes = _tier_with(tmp_path)
    target = next(p for p in _chunk_files(tmp_path) if p.name.startswith(hashes[1].hex()))
    damage(target)
    assert _get(tier, SCOPE, hashes[1]) is None
    assert not target.exists() and tier.payload_bytes(chunk_file.scope_id(SCOPE), hashes[1]) is None
    assert tier.counters.corrupt == 1
    assert _get(tier, SCOPE, hashes[0]) == _payload(0) and _get(tier, SCOPE, hashes[2]) == _payload(2)


def test_a_chunk_of_another_scope_is_never_served(tmp_path: Path) -> None:
    tier, hashes = _tier_with(tmp_path)
    # The same file copied under another format's directory (a mixed-up or hostile directory).
    src = next(p for p in _chunk_files(tmp_path) if p.name.startswith(hashes[0].hex()))
    other = tmp_path / ROOT_NAME / chunk_file.scope_id(OTHER).hex()
    other.mkdir()
    copy = other / src.name
    copy.write_bytes(src.read_bytes())
    assert _get(tier, OTHER, hashes[0]) is None and tier.counters.corrupt == 1  # a read checks the header
    assert not copy.exists()
    copy.write_bytes(src.read_bytes())
    tier.close()
    tier = DiskTier(tmp_path, 1 << 20)  # a restart checks it too: never indexed, deleted
    assert tier.payload_bytes(chunk_file.scope_id(OTHER), hashes[0]) is None and not copy.exists()
    assert tier.counters.corrupt == 1
    assert _get(tier, SCOPE, hashes[0]) == _payload(0)


def test_a_restart_rebuilds_the_index_and_removes_partial_files(tmp_path: Path) -> None:
    first, hashes = _tier_with(tmp_path)
    first.close()
    scope_dir = _chunk_files(tmp_path)[0].parent
    (scope_dir / f"{'ab' * 16}.kv.123.tmp").write_bytes(b"half a chunk")
    (scope_dir / f"{'cd' * 16}.kv").write_bytes(b"short")  # shorter than a header
    tier = DiskTier(tmp_path, 1 << 20)
    assert sorted(p.name for p in scope_dir.iterdir()) == sorted([f"{h.hex()}.kv" for h in hashes] + ["scope.json"])
    assert [_get(tier, SCOPE, h) for h in hashes] == [_payload(i) for i in range(3)]


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)  # takes no space


def test_a_restart_indexes_only_files_whose_header_says_they_are_that_chunk(tmp_path: Path) -> None:
    # A foreign file under a chunk's name is counted by nothing it claims: else one larger than
    # the tier made the restart evict (delete) every valid chunk to make room for it.
    one = 4096 + HEADER_BYTES
    first, hashes = _tier_with(tmp_path, max_bytes=8 * one)
    first.close()
    folder = _chunk_files(tmp_path)[0].parent
    src = folder / f"{hashes[0].hex()}.kv"
    planted = {
        "ff" * 16: lambda p: _sparse(p, 1 << 30),  # larger than the tier
        "ee" * 16: lambda p: _sparse(p, 7 * one),  # fits, but zeros: no header
        "dd" * 16: lambda p: p.write_bytes(src.read_bytes()),  # another chunk's header (hash 00..)
        "cc" * 16: lambda p: p.write_bytes(chunk_file.pack(CHUNK, chunk_file.scope_id(SCOPE), b"\xcc" * 16,
                                                       _payload(7)) + _payload(7) + bytes(5 * one)),  # longer than it says
    }
    for name, plant in planted.items():
        plant(folder / f"{name}.kv")
        os.utime(folder / f"{name}.kv")  # the newest: what an eviction by age keeps
    tier = DiskTier(tmp_path, 8 * one)
    assert tier.status()["objects"] == 3 and tier.status()["used_bytes"] == 3 * one
    assert tier.counters.evictions == 0 and tier.counters.corrupt == len(planted)
    assert sorted(p.name for p in _chunk_files(tmp_path)) == sorted(f"{h.hex()}.kv" for h in hashes)
    assert [_get(tier, SCOPE, h) for h in hashes] == [_payload(i) for i in range(3)]


def test_a_key_is_indexed_under_one_spelling_only(tmp_path: Path) -> None:
    # bytes.fromhex also reads upper case and spaces: a second spelling of a key was indexed (and
    # its bytes counted) twice, while reads and evictions use the lower-case name, for good.
    import shutil

    one = 4096 + HEADER_BYTES
    first = DiskTier(tmp_path, 4 * one)
    key = chunk_file.scope_id(SCOPE)
    hashes = [bytes([0xa0 + i]) * 16 for i in range(3)]  # letters: an upper-case spelling differs
    for i, h in enumerate(hashes):
        assert first.put(SCOPE, key, h, CHUNK, memoryview(_payload(i)))
    first.close()
    folder = _chunk_files(tmp_path)[0].parent
    for h in hashes:
        shutil.copy(folder / f"{h.hex()}.kv", folder / f"{h.hex().upper()}.kv")
    spaced = " ".join(hashes[0].hex()[i:i + 2] for i in range(0, 32, 2))
    shutil.copy(folder / f"{hashes[0].hex()}.kv", folder / f"{spaced}.kv")
    shutil.copytree(folder, folder.with_name(folder.name.upper()))  # the whole scope, other spelling
    tier = DiskTier(tmp_path, 4 * one)
    assert tier.status()["objects"] == 3 and tier.status()["used_bytes"] == 3 * one
    assert sorted(p.name for p in folder.glob("*.kv")) == sorted(f"{h.hex()}.kv" for h in hashes)
    assert [_get(tier, SCOPE, h) for h in hashes] == [_payload(i) for i in range(3)]
    for i in range(10):  # the accounting stays exact through evictions
        assert tier.put(SCOPE, key, (1000 + i).to_bytes(16, "big"), CHUNK, memoryview(_payload(i)))
        on_disk = list(folder.glob("*.kv"))
        assert tier.status()["used_bytes"] == sum(p.stat().st_size for p in on_disk) == len(on_disk) * one <= 4 * one


def test_a_chunk_larger_than_the_tier_is_counted_and_logged_once(tmp_path: Path, caplog) -> None:
    tier = DiskTier(tmp_path, 1000)  # smaller than one chunk
    key = chunk_file.scope_id(SCOPE)
    for i in range(3):
        assert not tier.put(SCOPE, key, bytes([i]) * 16, CHUNK, memoryview(_payload(i)))
    assert tier.status()["write_errors"] == 3 and tier.status()["objects"] == 0
    told = [r for r in caplog.records if "larger than the whole tier" in r.getMessage()]
    assert len(told) == 1 and told[0].levelname == "WARNING"


def test_the_tier_evicts_its_least_recently_used_chunks_when_full(tmp_path: Path) -> None:
    one = 4096 + HEADER_BYTES
    tier, hashes = _tier_with(tmp_path, n=3, max_bytes=3 * one)
    assert _get(tier, SCOPE, hashes[0]) == _payload(0)  # used: 1 is now the least recently used
    key = chunk_file.scope_id(SCOPE)
    assert tier.put(SCOPE, key, b"\x09" * 16, CHUNK, memoryview(_payload(9)))
    assert tier.payload_bytes(key, hashes[1]) is None and tier.counters.evictions == 1
    assert {p.name[:2] for p in _chunk_files(tmp_path)} == {"00", "02", "09"}
    assert tier.status()["used_bytes"] == 3 * one


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_every_policy_keeps_the_tier_within_its_size_with_exact_bytes_and_accounting(tmp_path: Path, policy) -> None:
    one = 4096 + HEADER_BYTES
    tier, _ = _tier_with(tmp_path, n=0, max_bytes=8 * one, policy=policy)
    key = chunk_file.scope_id(SCOPE)
    rng = random.Random(3)
    for i in range(200):
        h = bytes([i % 50]) * 16  # keys come back after eviction
        if rng.random() < 0.5:
            tier.put(SCOPE, key, h, CHUNK, memoryview(_payload(i % 50)))
        got = _get(tier, SCOPE, h)
        assert got in (None, _payload(i % 50))
        files = _chunk_files(tmp_path)
        assert len(files) == tier.status()["objects"] <= 8
        assert tier.status()["used_bytes"] == sum(f.stat().st_size for f in files) == len(files) * one
    assert tier.status()["eviction_policy"] == policy.value
    tier.close()
    again = DiskTier(tmp_path, 8 * one, policy)  # a restart hands the policy what is on disk
    assert again.status()["objects"] == len(_chunk_files(tmp_path))
    assert again.put(SCOPE, key, b"\xee" * 16, CHUNK, memoryview(_payload(99)))
    assert len(_chunk_files(tmp_path)) <= 8


@pytest.mark.parametrize("policy", [EvictionPolicy.LRU, EvictionPolicy.LONG_2Q])
def test_concurrent_writers_readers_deletes_and_clears_keep_index_files_and_bytes_in_step(tmp_path: Path, policy) -> None:
    one = 4096 + HEADER_BYTES
    tier = DiskTier(tmp_path, 6 * one, policy)
    key = chunk_file.scope_id(SCOPE)
    failures: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):  # 12 keys, so writers of the same chunk meet, and evictions too
                k = rng.randrange(12)
                h = bytes([k]) * 16
                r = rng.random()
                if r < 0.5:
                    tier.put(SCOPE, key, h, CHUNK, memoryview(_payload(k)))
                elif r < 0.9:
                    assert _get(tier, SCOPE, h) in (None, _payload(k))
                elif r < 0.99:
                    tier.delete(key, h)
                else:
                    tier.clear()
        except BaseException as e:  # noqa: BLE001  # reported below, from the test's thread
            failures.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    on_disk = {(bytes.fromhex(p.parent.name), bytes.fromhex(p.stem)) for p in _chunk_files(tmp_path)}
    indexed = {(key, h) for h in (bytes([k]) * 16 for k in range(12)) if tier.payload_bytes(key, h) is not None}
    assert on_disk == indexed  # no entry without its file, no file without its entry
    assert tier.status()["used_bytes"] == len(indexed) * one == sum(p.stat().st_size for p in _chunk_files(tmp_path))
    assert tier.status()["objects"] == len(indexed) <= 6


_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


def _set_immutable(fd: int, on: bool) -> None:
    import fcntl
    import struct

    flags = struct.unpack("l", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
    fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("l", flags | _FS_IMMUTABLE_FL if on else flags & ~_FS_IMMUTABLE_FL))


@pytest.fixture
def freeze():
    """Makes a directory's entries impossible to delete, add or rename (and a file impossible to
    change): chmod for a user, the immutable flag for root (whom chmod does not stop). Undone at
    the end through a descriptor (the tier may have renamed the path), so the directory can go."""
    frozen: list[tuple[int, int]] = []

    def apply(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        mode = os.fstat(fd).st_mode
        try:
            if os.geteuid() == 0:
                _set_immutable(fd, True)
            else:
                os.fchmod(fd, 0o555 if path.is_dir() else 0o444)
        except OSError as e:
            os.close(fd)
            pytest.skip(f"cannot make a file undeletable here ({e})")
        frozen.append((fd, mode))

    yield apply
    for fd, mode in reversed(frozen):
        if os.geteuid() == 0:
            _set_immutable(fd, False)
        else:
            os.fchmod(fd, mode)
        os.close(fd)


def test_a_clear_that_leaves_chunk_files_says_so_and_serves_none(tmp_path: Path, freeze) -> None:
    from lmcache.storage.l2.tier import TierClearError

    tier, hashes = _tier_with(tmp_path)
    key = chunk_file.scope_id(SCOPE)
    folder = _chunk_files(tmp_path)[0].parent
    freeze(tmp_path)  # the root cannot be renamed away ...
    freeze(folder)  # ... nor its chunk files deleted
    for f in folder.glob("*.kv"):
        freeze(f)
    with pytest.raises(TierClearError, match="3 chunk file"):
        tier.clear()
    assert len(_chunk_files(tmp_path)) == 3  # they are there ...
    assert tier.status()["objects"] == 0 and not any(tier.may_hold(key, h) for h in hashes)  # ... and never served


def test_a_clear_that_cannot_delete_chunk_files_disowns_them_for_good(tmp_path: Path, freeze, caplog) -> None:
    """A clear writes a new epoch before it deletes anything: the files it cannot delete are of
    the old one, served neither by this server nor by one restarted on the directory (after new
    weights under the same model name, they would be the old model's KV)."""
    tier, hashes = _tier_with(tmp_path)
    folder = _chunk_files(tmp_path)[0].parent
    freeze(tmp_path / ROOT_NAME)  # the root cannot be renamed away ...
    freeze(folder)  # ... nor its chunk files deleted; the epoch can be written
    assert tier.clear() == 3
    assert any("never served" in r.getMessage() for r in caplog.records)
    assert len(_chunk_files(tmp_path)) == 3 and tier.status()["objects"] == 0
    assert _get(tier, SCOPE, hashes[0]) is None and tier.status()["corrupt"] == 0  # a miss, not damage
    # Files of an epoch are of header version 2: a server from before epochs takes them for foreign.
    assert all(f.read_bytes()[4:6] == b"\x01\x00" for f in _chunk_files(tmp_path))
    tier.close()
    again = DiskTier(tmp_path, 1 << 20)  # a restart: they are still there, and not chunks of it
    assert again.status()["objects"] == 0 and len(_chunk_files(tmp_path)) == 3
    assert _get(again, SCOPE, hashes[0]) is None


def test_a_restart_indexes_only_the_chunks_of_the_directorys_epoch(tmp_path: Path, caplog) -> None:
    tier, hashes = _tier_with(tmp_path)
    tier.close()
    (tmp_path / ".epoch").write_text("12345\n")  # as a clear leaves it when the server dies right after
    again = DiskTier(tmp_path, 1 << 20)
    assert again.status()["objects"] == 0 and _chunk_files(tmp_path) == []
    key = chunk_file.scope_id(SCOPE)
    assert again.put(SCOPE, key, hashes[0], CHUNK, memoryview(_payload(0)))
    again.close()
    warm = DiskTier(tmp_path, 1 << 20)  # chunks written in the directory's epoch survive restarts
    assert warm.status()["objects"] == 1 and _get(warm, SCOPE, hashes[0]) == _payload(0)
    warm.close()
    (tmp_path / ".epoch").write_text("not a number")  # damaged: which chunks are current is unknown
    damaged = DiskTier(tmp_path, 1 << 20)
    assert damaged.status()["objects"] == 0 and _get(damaged, SCOPE, hashes[0]) is None
    assert any(".epoch is unreadable" in r.getMessage() for r in caplog.records)
    assert damaged.put(SCOPE, key, hashes[1], CHUNK, memoryview(_payload(1)))
    assert all(f.read_bytes()[4:6] == b"\x02\x00" for f in _chunk_files(tmp_path))  # version 2: has an epoch
    (tmp_path / ".epoch").unlink()  # removed by hand: written again when the tier next looks
    assert damaged.status()["objects"] == 1 and (tmp_path / ".epoch").exists()
    damaged.close()
    assert DiskTier(tmp_path, 1 << 20).status()["objects"] == 1  # its new epoch was kept


def test_a_clear_that_deletes_the_files_in_place_succeeds(tmp_path: Path, freeze) -> None:
    tier, hashes = _tier_with(tmp_path)
    freeze(tmp_path)  # the root cannot be renamed away, but its files can be deleted
    assert tier.clear() == 3
    assert _chunk_files(tmp_path) == [] and tier.status()["objects"] == tier.status()["used_bytes"] == 0
    key = chunk_file.scope_id(SCOPE)
    assert tier.put(SCOPE, key, hashes[0], CHUNK, memoryview(_payload(0)))  # the tier goes on
    assert _get(tier, SCOPE, hashes[0]) == _payload(0)


def test_a_cleared_root_that_cannot_be_deleted_is_never_indexed(tmp_path: Path, freeze, caplog) -> None:
    tier, hashes = _tier_with(tmp_path)
    freeze(_chunk_files(tmp_path)[0].parent)  # renamed away, then its files cannot be deleted
    assert tier.clear() == 3  # what is left is out of the root: only disk space
    assert any("could not be removed" in r.getMessage() for r in caplog.records)
    assert tier.status()["objects"] == 0 and _chunk_files(tmp_path) == []
    tier.close()
    again = DiskTier(tmp_path, 1 << 20)  # a restart, the trash still there: not a chunk of it
    assert again.status()["objects"] == 0 and list(tmp_path.glob(f".{ROOT_NAME}.cleared.*/*/*.kv"))
    assert _get(again, SCOPE, hashes[0]) is None


def test_a_directory_emptied_by_hand_is_written_again_with_exact_accounting(tmp_path: Path) -> None:
    import shutil

    tier, hashes = _tier_with(tmp_path)
    for p in tmp_path.iterdir():  # rm -rf <path>/*: the chunks, and the .lock
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert tier.status()["objects"] == tier.status()["used_bytes"] == 0  # what went is not reported
    key = chunk_file.scope_id(SCOPE)
    assert tier.put(SCOPE, key, b"\x09" * 16, CHUNK, memoryview(_payload(9)))  # folders made again
    assert _get(tier, SCOPE, b"\x09" * 16) == _payload(9) and len(_chunk_files(tmp_path)) == 1
    assert tier.status()["objects"] == 1 and tier.status()["used_bytes"] == 4096 + HEADER_BYTES
    assert tier.status()["state"] == "ok"
    with pytest.raises(DirectoryInUse):  # its .lock was taken again
        DiskTier(tmp_path, 1 << 20)
    # A scope folder removed alone: its chunks are forgotten when a write finds it gone.
    assert tier.put(SCOPE, key, hashes[0], CHUNK, memoryview(_payload(0)))
    shutil.rmtree(_chunk_files(tmp_path)[0].parent)
    assert tier.put(SCOPE, key, hashes[1], CHUNK, memoryview(_payload(1)))
    assert tier.status()["objects"] == 1 and [p.name[:2] for p in _chunk_files(tmp_path)] == ["01"]
    assert tier.status()["write_errors"] == 0


def test_a_tier_whose_lock_another_server_took_stops_writing(tmp_path: Path, caplog) -> None:
    tier, hashes = _tier_with(tmp_path)
    (tmp_path / ".lock").unlink()
    second = DiskTier(tmp_path, 1 << 20)  # the directory looks free: another server takes it
    assert tier.status()["state"] == "lock_lost"
    assert any(r.levelname == "WARNING" and "stops taking writes" in r.getMessage() for r in caplog.records)
    key = chunk_file.scope_id(SCOPE)
    assert not tier.put(SCOPE, key, b"\x09" * 16, CHUNK, memoryview(_payload(9)))
    assert _get(tier, SCOPE, hashes[0]) == _payload(0)  # reads go on (each is checked)
    second.close()
    assert tier.status()["state"] == "lock_lost"  # for good: the other server may have changed the directory


def test_names_and_unlinks_change_only_under_the_tiers_lock(tmp_path: Path, monkeypatch) -> None:
    # Else an eviction could unlink a file between another writer's rename and its indexing,
    # leaving an entry without its file (a hit that reads nothing) or a file without an entry.
    import lmcache.storage.l2.disk as disk

    one = 4096 + HEADER_BYTES
    tier = DiskTier(tmp_path, 2 * one)
    locked: list[tuple[str, bool]] = []
    rename, unlink = os.rename, disk._unlink
    monkeypatch.setattr(disk.os, "rename", lambda a, b: (locked.append(("rename", tier._lock.locked())), rename(a, b)))
    monkeypatch.setattr(disk, "_unlink", lambda p: (locked.append(("unlink", tier._lock.locked())), unlink(p)))
    key = chunk_file.scope_id(SCOPE)
    for i in range(3):  # the third evicts the first
        assert tier.put(SCOPE, key, bytes([i]) * 16, CHUNK, memoryview(_payload(i)))
    tier.delete(key, bytes([2]) * 16)
    assert ("rename", True) in locked and ("unlink", True) in locked
    assert all(held for _, held in locked), locked


def test_a_2q_long_tier_keeps_a_chunk_that_was_read_through_a_flood(tmp_path: Path) -> None:
    one = 4096 + HEADER_BYTES
    tier, hashes = _tier_with(tmp_path, n=1, max_bytes=20 * one, policy=EvictionPolicy.LONG_2Q)
    assert _get(tier, SCOPE, hashes[0]) == _payload(0)  # read once: protected
    key = chunk_file.scope_id(SCOPE)
    for i in range(100):  # chunks written once and never read
        assert tier.put(SCOPE, key, (1000 + i).to_bytes(16, "big"), CHUNK, memoryview(_payload(i)))
    assert _get(tier, SCOPE, hashes[0]) == _payload(0)  # LRU would have dropped it long ago
    assert tier.counters.evictions == 81


_FULL_DISK = """
import resource, signal, sys
from lmcache.keys import CacheScope
from lmcache.storage.l2 import chunk_file
from lmcache.storage.l2.disk import DiskTier
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
scope = CacheScope("m", 1, 0, "fmt/a", "")
key = chunk_file.scope_id(scope)
tier = DiskTier(sys.argv[1], 1 << 30)
assert tier.put(scope, key, b"\\x01" * 16, 64, memoryview(bytes(4096)))
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # the "disk" takes no file over 2 KiB
assert not tier.put(scope, key, b"\\x02" * 16, 64, memoryview(bytes(4096)))
assert tier.state.value == "read_only", tier.state
assert not tier.put(scope, key, b"\\x03" * 16, 64, memoryview(bytes(16)))  # stopped, even if it would fit
into = bytearray(4096)
assert tier.get(key, b"\\x01" * 16, memoryview(into))  # reads go on
print("ok", tier.counters.write_errors)
"""


def test_a_full_disk_stops_writes_and_keeps_reads(tmp_path: Path) -> None:
    # A file size limit makes the kernel refuse the write as a full disk would (in a child
    # process: the limit is per process).
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "1"]
    assert "stops taking writes" in out.stderr
    assert [p.name[:2] for p in _chunk_files(tmp_path)] == ["01"]
    assert not list(tmp_path.glob(f"{ROOT_NAME}/*/*.tmp"))


# --- the flag -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("{not json", "is not valid JSON"),
        ('["disk"]', 'must be a JSON object with a "type"'),
        ('{"type": "tape", "path": "/tmp"}', "unknown type 'tape'"),
        ('{"type": "disk", "max_gb": 1}', 'needs "path"'),
        ('{"type": "disk", "path": "/proc/lmcache-l2", "max_gb": 1}', "cannot create /proc/lmcache-l2"),
        ('{"type": "disk", "path": "TMP", "max_gb": 0}', '"max_gb" must be a size'),
        ('{"type": "disk", "path": "TMP", "max_gb": 100000}', "more than the filesystem"),
        ('{"type": "disk", "path": "TMP", "max_gb": 1, "size": 3}', "unknown key(s) size"),
        ('{"type": "disk", "path": "TMP", "max_gb": 1, "eviction_policy": "MRU"}', '"eviction_policy" must be one of'),
    ],
)
def test_a_bad_l2_adapter_is_refused_in_one_line(tmp_path: Path, value: str, text: str) -> None:
    value = value.replace("TMP", str(tmp_path))
    out = subprocess.run(
        [*lmcache_command(), "server", "--l1-size-gb", "0.01", "--l2-adapter", value],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "--l2-adapter" in out.stderr and text in out.stderr, out.stderr


# --- through real servers ---------------------------------------------------------------------


def _server(path: Path, *extra: str, l1_size_gb: float = 0.05) -> ServerProcess:
    adapter = f'{{"type": "disk", "path": "{path}", "max_gb": 1}}'
    return ServerProcess(l1_size_gb=l1_size_gb, extra_args=["--chunk-size", str(CHUNK), "--l2-adapter", adapter, *extra])


def _l2(server: ServerProcess) -> dict:
    return httpx.get(f"{server.http_url}/status", timeout=10).json()["l2"]


def _drained(server: ServerProcess, chunks: int) -> bool:
    l2 = _l2(server)
    return l2["queue_chunks"] == 0 and l2["tiers"][0]["objects"] >= chunks


def _store_prompt(server: ServerProcess, n_chunks: int, seed: int, mode: str) -> tuple[bytes, list[bytes]]:
    """Stores a prompt of ``n_chunks`` from a freshly filled KV cache; returns its hashes and the
    bytes of its blocks (what a later load must reproduce)."""
    kv = make_kv("LBHNC", "bfloat16")
    fill(kv, "LBHNC", seed=seed)
    hashes = prompt_hashes(random.Random(seed).choices(range(30_000), k=CHUNK * n_chunks), CHUNK)
    blocks = list(range(4 * n_chunks))
    with MPClient("127.0.0.1", server.port, timeout_s=30) as client:
        reg = register_kv_caches(client, kv, "m", instance_id=f"writer-{seed}", mode=mode)
        assert reg.store(hashes, blocks).stored == n_chunks
        want = [block_bytes(t, "LBHNC", b) for t in kv for b in blocks]
        reg.unregister()
    return hashes, want


def _load_prompt(server: ServerProcess, hashes: bytes, mode: str) -> list[bytes]:
    n_chunks = len(hashes) // 16
    kv = make_kv("LBHNC", "bfloat16")
    blocks = list(range(4 * n_chunks))
    with MPClient("127.0.0.1", server.port, timeout_s=30) as client:
        reg = register_kv_caches(client, kv, "m", instance_id="reader", mode=mode)
        assert client.lookup(reg.scope(), hashes) == n_chunks
        assert reg.retrieve(hashes, blocks).retrieved == n_chunks
        return [block_bytes(t, "LBHNC", b) for t in kv for b in blocks]


@pytest.mark.parametrize("mode", ["lmcache_driven", "engine_driven"])
def test_stores_are_written_through_and_a_restart_serves_them(tmp_path: Path, mode: str) -> None:
    with _server(tmp_path) as server:
        hashes, want = _store_prompt(server, 6, seed=1, mode=mode)
        _until(lambda: _drained(server, 6), "the chunks to be written to disk")
        status = httpx.get(f"{server.http_url}/status", timeout=10).json()
        assert status["l2"]["queue_limit_bytes"] == status["l1"]["capacity_bytes"] // 4  # 1 GiB asked, L1 is smaller
        files = _chunk_files(tmp_path)
        assert sorted(p.name for p in files) == sorted(f"{h.hex()}.kv" for h in split_hashes(hashes))
        for path in files:
            header = chunk_file.unpack(path.read_bytes()[:HEADER_BYTES])
            assert header.tokens == CHUNK and header.payload_bytes == path.stat().st_size - HEADER_BYTES
        server.stop(signal.SIGTERM)
    with _server(tmp_path) as server:  # an empty L1 on the same directory
        assert server.wait_for_line("6 chunks", 10)
        assert _load_prompt(server, hashes, mode) == want
        assert _l2(server)["tiers"][0]["hit_chunks"] == 6


def test_a_killed_server_leaves_a_disk_the_next_one_serves(tmp_path: Path) -> None:
    with _server(tmp_path) as server:
        hashes, want = _store_prompt(server, 5, seed=2, mode="lmcache_driven")
        _until(lambda: _drained(server, 5), "the chunks to be written to disk")
        assert server.proc is not None
        server.proc.kill()
        server.proc.wait(10)
    with _server(tmp_path) as server:
        assert _load_prompt(server, hashes, "lmcache_driven") == want


def test_clear_cache_keeps_l2_unless_asked(tmp_path: Path) -> None:
    with _server(tmp_path) as server:
        hashes, want = _store_prompt(server, 3, seed=3, mode="lmcache_driven")
        _until(lambda: _drained(server, 3), "the chunks to be written to disk")
        assert httpx.post(f"{server.http_url}/clear-cache", timeout=10).status_code == 200
        assert _load_prompt(server, hashes, "lmcache_driven") == want  # back from disk
        assert httpx.post(f"{server.http_url}/clear-cache?tier=all", timeout=30).status_code == 200
        assert _l2(server)["tiers"][0]["objects"] == 0 and _chunk_files(tmp_path) == []
        with MPClient("127.0.0.1", server.port, timeout_s=30) as client:
            assert client.lookup(CacheScope("m", 1, 0, "", ""), hashes) == 0
        assert httpx.post(f"{server.http_url}/clear-cache?tier=l3", timeout=10).status_code == 400


def test_a_full_write_queue_never_holds_up_a_store(tmp_path: Path) -> None:
    # A queue smaller than one chunk: every chunk stays L1-only, and every store still succeeds.
    with _server(tmp_path, "--l2-write-queue-mb", "0.001") as server:
        hashes, want = _store_prompt(server, 4, seed=4, mode="lmcache_driven")
        l2 = _l2(server)
        assert l2["dropped_writes"] == 4 and l2["queued_chunks"] == 0
        assert _load_prompt(server, hashes, "lmcache_driven") == want  # from L1
        assert _chunk_files(tmp_path) == []


def test_two_servers_compute_the_same_keys(tmp_path: Path) -> None:
    """Warm restarts rest on this: the chunk keys (scope digest and chained hashes) of the same
    tokens are the same in every process."""
    code = (
        "from lmcache.keys import CacheScope, prompt_hashes; from lmcache.storage.l2.chunk_file import scope_id;"
        "print(scope_id(CacheScope('m', 2, 1, 'f', 's')).hex(), prompt_hashes(list(range(1000)), 64).hex())"
    )
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=str(seed))).stdout for seed in (1, 2)}
    assert len(runs) == 1


def test_a_stalled_disk_never_holds_up_a_store(tmp_path: Path) -> None:
    """The tier's own lock held by the test stalls every disk write (as a hung disk would):
    stores still commit and answer, the queue holds what waits, and it drains afterwards."""
    from lmcache import protocol as p
    from lmcache.config import ServerConfig
    from lmcache.server.engine import CacheEngine
    from lmcache.transfer.layouts import describe
    from lmcache.transfer.liveness import process_mark

    adapter = f'{{"type": "disk", "path": "{tmp_path}", "max_gb": 1}}'
    config = ServerConfig(l1_size_gb=0.01, port=1, http_port=2, chunk_size=CHUNK, l2_adapters=(adapter,))
    engine = CacheEngine(config)  # its L1 in SHM, as lmcache_driven engines need
    engine.start()
    try:
        layout, _ = describe(make_kv("LBHNC", "float16"))
        engine.register_kv_cache(p.RegisterKVCache("e", "m", 1, 0, layout, [], p.TransferMode.LMCACHE_DRIVEN,
                                                   liveness=process_mark()))
        assert engine.l2 is not None
        tier = engine.l2.tiers[0]
        with tier._lock:  # the disk hangs
            for seed in range(3):
                hashes = prompt_hashes(random.Random(seed).choices(range(30_000), k=2 * CHUNK), CHUNK)
                grant = engine.prepare_store("e", hashes)
                assert engine.commit_store(grant.ticket, [True, True]).stored == 2
            assert tier.status()["objects"] == 0  # queued, or in the writer's hands: none written
            assert engine.status()["l1"]["objects"] == 6
        assert engine.l2.drain(20)
        assert tier.status()["objects"] == 6 and len(_chunk_files(tmp_path)) == 6
    finally:
        engine.close()


def test_a_second_server_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    adapter = f'{{"type": "disk", "path": "{tmp_path}", "max_gb": 1}}'
    with _server(tmp_path):
        out = subprocess.run([*lmcache_command(), "server", "--l1-size-gb", "0.01", "--port", "1", "--http-port", "2",
                              "--l2-adapter", adapter], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "another lmcache server uses the L2 directory" in out.stdout + out.stderr
    twice = subprocess.run([*lmcache_command(), "server", "--l1-size-gb", "0.01", "--l2-adapter", adapter,
                            "--l2-adapter", adapter], capture_output=True, text=True, timeout=60)
    assert twice.returncode == 2 and "same directory" in twice.stderr
