"""The disk tier: one file per chunk (chunk_file.py) under a directory, with its own capacity.

Layout: ``<path>/lmcache-v1/<scope digest>/<chunk hash>.kv``, plus a ``scope.json`` per scope
that says what the digest stands for. One directory can serve several models and tenants: their
chunks live in different scope directories and carry their scope in every header.

Writes go to a temporary file that is renamed into place, so a reader never sees half a chunk;
there is no fsync per chunk: a crash may lose the latest chunks or leave a torn file, which its
checksum turns into a miss. The index (which chunks exist, and their sizes) is rebuilt at start
from the directory listing and each file's 80-byte header, without reading payloads: a file is
indexed only under the one spelling of its key (lower-case hex) and only if its header says it is
that chunk, of that size, and the tier could hold it; anything else under a chunk's name, and the
temporary files of a crash, are removed then (a foreign file must never push out checked
chunks). What goes when the tier is full is its own eviction policy's choice (the same classes as
L1's; LRU unless the adapter names another): a chunk read, or written again after it left L1,
counts as used. A restart hands the policy the files oldest first.

Bytes move between the file and L1 memory with ``os.pwritev`` / ``os.preadv`` on memoryviews of
the pool: no extra copy, and no GIL held while the kernel copies.

The directory may change under the tier (emptied by hand while the server runs): a write that
finds a folder gone makes the folders again and retries once, the chunks that went with a folder
are forgotten, and the tier checks that ``.lock`` is still the file it holds (else it takes it
again, or, if another server has it, stops writing).

A clear must hold even for files it cannot delete (an immutable file, a failing disk): each clear
first gives the tier a new random epoch, kept in ``<path>/.epoch``, and every chunk file carries
the epoch it was written in. A file of another epoch is never served and is removed at the next
start, so what a clear leaves behind is only disk space.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from lmcache.config import EvictionPolicy
from lmcache.keys import CacheScope
from lmcache.log import init_logger
from lmcache.storage.eviction import POLICIES
from lmcache.storage.l2 import chunk_file
from lmcache.storage.l2.chunk_file import HEADER_BYTES, BadChunk
from lmcache.storage.l2.tier import Outgoing, TierClearError

logger = init_logger(__name__)

ROOT_NAME = "lmcache-v1"
EPOCH_NAME = ".epoch"
SUFFIX = ".kv"
TMP_SUFFIX = ".tmp"
# Errors after which the tier stops taking writes (and keeps serving reads).
_STOP_WRITES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}

Key = tuple[bytes, bytes]  # (scope digest, chunk hash)


class TierState(str, enum.Enum):
    OK = "ok"
    READ_ONLY = "read_only"  # a write failed for lack of space or an I/O error: reads go on
    # Its .lock was removed and another server holds the new one: that server owns the directory
    # now (it may evict or overwrite our files), so this one writes nothing more until restarted.
    LOCK_LOST = "lock_lost"


@dataclass
class TierCounters:
    written_chunks: int = 0
    written_bytes: int = 0
    read_chunks: int = 0
    read_bytes: int = 0
    misses: int = 0
    corrupt: int = 0  # files that failed their header or checksum: deleted, never served
    evictions: int = 0
    write_errors: int = 0  # I/O errors, and chunks larger than the whole tier (logged once)


class DiskTier:
    kind = "disk"

    def __init__(self, path: str | Path, max_bytes: int, eviction_policy: EvictionPolicy = EvictionPolicy.LRU) -> None:
        self.path = Path(path)
        self.root = self.path / ROOT_NAME
        self.max_bytes = max_bytes
        self.state = TierState.OK
        self.counters = TierCounters()
        self._lock = threading.Lock()
        self._index: dict[Key, int] = {}  # -> file bytes
        self.eviction_policy = eviction_policy
        self._policy = POLICIES[eviction_policy](lambda key: key)  # holds the keys of the indexed chunks
        self._used = 0
        self._scopes: set[bytes] = set()  # scope directories known to exist
        self._generation = 0  # bumped by clear(): a write begun before it is not indexed
        self._told_too_large = False  # a chunk larger than the tier is logged once, not per chunk
        self.path.mkdir(parents=True, exist_ok=True)
        self._owner = _lock_directory(self.path)  # one server per directory
        self.root.mkdir(parents=True, exist_ok=True)
        # Clears a crash (or a failed delete) left behind: outside the root, so never indexed.
        for stale in self.path.glob(f".{ROOT_NAME}.cleared.*"):
            self._remove_trash(stale)
        for partial in self.path.glob(f"{EPOCH_NAME}.*{TMP_SUFFIX}"):
            _unlink(partial)
        self._epoch = self._read_epoch()
        self._rebuild()

    def _new_epoch(self) -> str:
        """Gives the directory a new epoch (lock held): "" once it is durable, else why not."""
        epoch = secrets.randbits(64)
        try:
            _replace_epoch_file(self.path, epoch)
        except OSError as e:
            return f"; nor could {EPOCH_NAME} be written ({e})"
        self._epoch = epoch  # on disk now: the tier's own writes must carry it
        try:
            _fsync_directory(self.path)
        except OSError as e:
            return f"; nor could {EPOCH_NAME} be made durable ({e})"
        return ""

    def _read_epoch(self) -> int:
        """The epoch of the chunks to index: 0 for a directory never cleared (or of a version
        before epochs). One that cannot be read is replaced: then no file is indexed."""
        try:
            return _valid_epoch(int((self.path / EPOCH_NAME).read_text()))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as e:
            epoch = secrets.randbits(64)
            logger.warning("L2 disk tier %s: %s is unreadable (%s); starting empty", self.path, EPOCH_NAME, e)
            try:
                _replace_epoch_file(self.path, epoch)
            except OSError as e:
                logger.warning("L2 disk tier %s: cannot write %s (%s)", self.path, EPOCH_NAME, e)
            return epoch

    # --- the index --------------------------------------------------------------------------

    def _rebuild(self) -> None:
        found: list[tuple[float, Key, int]] = []
        partial = foreign = stale = 0
        for scope_dir in os.scandir(self.root):
            scope = _canonical_hex(scope_dir.name)
            # Another spelling of a digest (upper case) is not where reads look: never indexed.
            if scope is None or not scope_dir.is_dir(follow_symlinks=False):
                continue
            self._scopes.add(scope)
            for entry in os.scandir(scope_dir.path):
                name = entry.name
                if name.endswith(TMP_SUFFIX):  # a write a crash interrupted
                    _unlink(entry.path)
                    partial += 1
                    continue
                if not name.endswith(SUFFIX) or not entry.is_file(follow_symlinks=False):
                    continue
                chunk_hash = _canonical_hex(name[: -len(SUFFIX)])
                try:
                    checked = None if chunk_hash is None else self._checked_file(entry.path, scope, chunk_hash)
                except OSError:  # unreadable now: neither indexed nor deleted
                    continue
                if checked is None or chunk_hash is None:
                    _unlink(entry.path)
                    foreign += 1
                    continue
                mtime, size, epoch = checked
                if epoch != self._epoch:  # written before a clear that could not delete it
                    _unlink(entry.path)
                    stale += 1
                    continue
                found.append((mtime, (scope, chunk_hash), size))
        found.sort(key=lambda f: f[0])
        for _, key, size in found:
            if key in self._index:  # cannot happen with one spelling per key; never count a key twice
                continue
            self._index[key] = size
            self._policy.add(key)
            self._used += size
        self.counters.corrupt += foreign
        logger.info("L2 disk tier %s: %d chunks (%.2f GB) found; %d partial, %d foreign or damaged and %d cleared "
                    "files removed", self.path, len(self._index), self._used / 1e9, partial, foreign, stale)
        self._make_room(0)

    def _checked_file(self, path: str, scope: bytes, chunk_hash: bytes) -> tuple[float, int, int] | None:
        """(mtime, size, epoch) of a chunk file whose header says it is this chunk, whose size is the
        header's and which the tier could hold; None if it is not one (the caller deletes it).
        One open and an 80-byte read per file: no payload is read (its checksum is checked when
        it is served)."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not HEADER_BYTES < st.st_size <= self.max_bytes:
                return None
            header = chunk_file.unpack(os.pread(fd, HEADER_BYTES, 0))
        except BadChunk:
            return None
        finally:
            os.close(fd)
        if (header.scope_id, header.chunk_hash) != (scope, chunk_hash) or HEADER_BYTES + header.payload_bytes != st.st_size:
            return None
        return st.st_mtime, st.st_size, header.epoch

    def payload_bytes(self, scope: bytes, chunk_hash: bytes) -> int | None:
        """The payload size of a chunk on disk, or None (no I/O: the index answers)."""
        size = self._index.get((scope, chunk_hash))
        return None if size is None else size - HEADER_BYTES

    def __contains__(self, key: Key) -> bool:
        return key in self._index

    def may_hold(self, scope_key: bytes, chunk_hash: bytes) -> bool:
        return (scope_key, chunk_hash) in self._index

    def held(self, scope_key: bytes, chunk_hashes: Sequence[bytes]) -> list[int | None]:
        return [self.payload_bytes(scope_key, h) for h in chunk_hashes]

    # --- writes -----------------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return self.state is TierState.OK

    def put_many(self, chunks: Sequence[Outgoing]) -> list[bool]:
        return [self.put(c.scope, c.scope_key, c.chunk_hash, c.tokens, c.payload, c.still_valid) for c in chunks]

    def put(self, scope: CacheScope, scope_key: bytes, chunk_hash: bytes, tokens: int, payload: memoryview,
            still_valid: Callable[[], bool] = lambda: True) -> bool:
        """Writes one chunk (an L1 object's bytes); True if it is on disk afterwards.
        ``still_valid()`` is asked once the bytes are written, before the file gets its name:
        False (the payload's memory may have changed under the copy) discards the file."""
        key = (scope_key, chunk_hash)
        size = HEADER_BYTES + len(payload)
        with self._lock:
            if key in self._index:
                self._used_again(key)
                return True
            if not self.writable:
                return False
            if size > self.max_bytes:
                self._too_large(size)
                return False
            self._make_room(size)
            self._used += size  # reserved now, so concurrent writers cannot overfill the tier
            generation, epoch = self._generation, self._epoch
        final = self._file(scope_key, chunk_hash)
        tmp = final.with_name(f"{final.name}.{secrets.token_hex(8)}{TMP_SUFFIX}")
        written = named = False
        try:
            header = chunk_file.pack(tokens, scope_key, chunk_hash, payload, epoch)
            try:
                self._write_file(scope, scope_key, tmp, [header, payload])
            except FileNotFoundError:  # a folder went (a clear, or removed by hand): made again, once
                if not self._check_directory(scope_key):
                    raise
                self._write_file(scope, scope_key, tmp, [header, payload])
            written = still_valid()
        except OSError as e:
            self._write_failed(e, scope_key)
        # The file gets its name under the lock, as the index changes with it: an eviction, a
        # delete or a clear (each of which unlinks under the lock) never meets a file it did
        # not index, and an indexed key always has its file.
        with self._lock:
            try:
                if written and self._generation == generation and key not in self._index:
                    os.rename(tmp, final)
                    named = True
            except OSError as e:
                self._write_failed(e, scope_key)
            finally:
                if not named:
                    _unlink(tmp)
            if self._generation != generation:  # cleared meanwhile: neither indexed nor kept
                self._used -= size  # (a clear leaves the bytes of writes under way reserved)
                return False
            if key in self._index:  # another writer of the same chunk came first: one file, counted once
                self._used -= size
                self._used_again(key)
                return True
            if not named:
                self._used -= size
                return False
            self._index[key] = size
            self._policy.add(key)
            self.counters.written_chunks += 1
            self.counters.written_bytes += size
        return True

    def _write_file(self, scope: CacheScope, scope_key: bytes, tmp: Path, buffers: list[Any]) -> None:
        self._ensure_scope(scope, scope_key)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, buffers)
        finally:
            os.close(fd)

    def _too_large(self, size: int) -> None:
        """A chunk the whole tier cannot hold (lock held): counted each time, logged once, as
        the next ones will be the same size (a tier configured smaller than one chunk)."""
        self.counters.write_errors += 1
        if not self._told_too_large:
            self._told_too_large = True
            logger.warning("L2 disk tier %s: a chunk of %d bytes is larger than the whole tier (%d bytes): "
                           "such chunks are not written (counted in write_errors)", self.path, size, self.max_bytes)

    def _write_failed(self, e: OSError, scope_key: bytes) -> None:
        if e.errno == errno.ENOENT:  # the scope directory went (a clear): made again next time
            self._scopes.discard(scope_key)
        self.counters.write_errors += 1
        if e.errno in _STOP_WRITES and self.state is TierState.OK:
            self.state = TierState.READ_ONLY
            logger.error("L2 disk tier %s stops taking writes (%s); it keeps serving what it holds", self.path, e)
        elif e.errno not in _STOP_WRITES:
            logger.warning("L2 disk tier %s: a write failed (%s)", self.path, e)

    def _make_room(self, size: int) -> None:
        """Evicts the policy's victims until ``size`` more bytes fit (lock held). Writes still
        under way are not in the policy yet: their bytes are reserved, never evicted."""
        while self._used + size > self.max_bytes:
            victim = self._policy.victim()
            if victim is None:
                return
            key = cast(Key, victim)
            self._policy.forget(key, evicted=True)
            self._used -= self._index.pop(key)
            self.counters.evictions += 1
            _unlink(self._file(*key))

    def _used_again(self, key: Key) -> None:
        """A read, or a write of a chunk it holds: a use, for the policy (lock held)."""
        self._policy.remove(key)
        self._policy.add(key)

    def _ensure_scope(self, scope: CacheScope, scope_key: bytes) -> None:
        if scope_key in self._scopes:
            return
        folder = self.root / scope_key.hex()
        folder.mkdir(parents=True, exist_ok=True)
        about = {
            "model": scope.model, "world_size": scope.world_size, "rank": scope.rank,
            "page_format": scope.page_format,
            "salt_digest": chunk_file.checksum(scope.salt.encode()).hex() if scope.salt else "",
        }
        (folder / "scope.json").write_text(json.dumps(about, indent=1) + "\n")
        self._scopes.add(scope_key)

    # --- reads ------------------------------------------------------------------------------

    def get(self, scope_key: bytes, chunk_hash: bytes, into: memoryview) -> bool:
        """Reads a chunk into ``into`` (an L1 slot of the chunk's size); False, and ``into`` is
        not to be used, if the chunk is absent, from before a clear, or fails its checks (then it
        is deleted)."""
        key = (scope_key, chunk_hash)
        path = self._file(scope_key, chunk_hash)
        try:
            # Never a symlink, never a FIFO or device that could block or lie: regular files only.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            return self._unreadable(key, path, e)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BadChunk("not a regular file")
            header = chunk_file.unpack(os.pread(fd, HEADER_BYTES, 0))
            if header.epoch != self._epoch:  # from before a clear: a miss, and not this read's to
                self.counters.misses += 1    # delete (a write since may have put the chunk there again)
                return False
            if header.payload_bytes != len(into):
                raise BadChunk(f"payload is {header.payload_bytes} bytes, the slot {len(into)}")
            if _read_all(fd, into, HEADER_BYTES) != len(into):
                raise BadChunk("the file is shorter than its header says")
            chunk_file.verify(header, scope_key, chunk_hash, into)
        except (BadChunk, OSError) as e:
            return self._unreadable(key, path, e)
        finally:
            os.close(fd)
        with self._lock:
            if key in self._index:
                self._used_again(key)
            self.counters.read_chunks += 1
            self.counters.read_bytes += HEADER_BYTES + len(into)
        return True

    def _unreadable(self, key: Key, path: Path, e: Exception) -> bool:
        """A read that failed: a missing file is forgotten; a damaged or foreign one (a bad
        header or checksum, a symlink, not a regular file) is deleted and counted; anything else
        (an I/O error) is a miss. Always False."""
        if isinstance(e, FileNotFoundError):
            with self._lock:
                if not os.path.lexists(path):  # not written again meanwhile (names change under the lock)
                    self._forget(key)
            self._check_directory(key[0])  # the whole folder may have gone with it
            self.counters.misses += 1
        elif isinstance(e, BadChunk) or (isinstance(e, OSError) and e.errno == errno.ELOOP):
            self.counters.corrupt += 1
            logger.warning("L2 disk tier %s: %s is damaged (%s); deleted, counted as a miss", self.path, path.name, e)
            with self._lock:  # the entry and the file go together (a rewrite meanwhile goes too: a miss)
                self._forget(key)
                _unlink(path)
        else:
            logger.warning("L2 disk tier %s: cannot read %s (%s)", self.path, path.name, e)
            self.counters.misses += 1
        return False

    # --- admin ------------------------------------------------------------------------------

    def delete(self, scope_key: bytes, chunk_hash: bytes, damaged: bool = False) -> None:
        self.counters.corrupt += damaged
        with self._lock:
            self._forget((scope_key, chunk_hash))
            _unlink(self._file(scope_key, chunk_hash))

    def clear(self) -> int:
        """Drops every chunk; a tier that had stopped taking writes takes them again. Raises
        TierClearError if chunk files may survive that a restart would serve: some could not be
        deleted, and neither could the new epoch be written that disowns them."""
        trash: Path | None = self.path / f".{ROOT_NAME}.cleared.{secrets.token_hex(4)}"
        with self._lock:
            dropped = len(self._index)
            for key in list(self._index):  # not a reset: the bytes of writes under way stay reserved
                self._forget(key)
            self._scopes.clear()
            self._generation += 1
            if not self._still_owner():
                raise TierClearError(f"L2 disk tier {self.path}: its .lock is not its own any more (another server took it); "
                                     "this server serves none of its chunks, but their files were left to that server")
            self.state = TierState.OK
            disowned = self._new_epoch()  # first: what this clear cannot delete (or a crash) leaves is never served
            try:
                os.rename(self.root, cast(Path, trash))  # at once; the files are deleted outside the lock
            except OSError as e:
                # Deleted in place, under the lock, so that no write is named meanwhile: the chunks
                # that survive are what this clear could not do.
                left = _remove_tree(self.root)
                survivors = _chunk_files_in(self.root)
                if survivors:
                    why = (f"{len(survivors)} chunk file(s) could not be deleted (renaming {self.root.name} away "
                           f"failed: {e}; then {left[0] if left else survivors[0]})")
                    if disowned:
                        raise TierClearError(f"L2 disk tier {self.path}: {why}{disowned}; this server no longer "
                                             "serves them, but a restart would") from e
                    logger.warning("L2 disk tier %s: %s; they are of an older epoch, never served, and removed "
                                   "at the next start", self.path, why)
                trash = None
            self.root.mkdir(parents=True, exist_ok=True)
        if trash is not None:
            self._remove_trash(trash)
        return dropped

    def _remove_trash(self, trash: Path) -> None:
        """Deletes a renamed-away root: what it holds is never indexed, so what cannot be deleted
        is only disk space (logged; tried again at the next start)."""
        left = _remove_tree(trash)
        if left:
            logger.warning("L2 disk tier %s: %s could not be removed (%s); its chunks are never served",
                           self.path, trash, left[0])

    def close(self) -> None:
        """Gives the directory up (another server may take it from now on)."""
        if self._owner >= 0:
            os.close(self._owner)
            self._owner = -1

    def status(self) -> dict[str, Any]:
        # Cheap (three stats), and /status is not asked per chunk; skipped while a writer holds
        # the lock (a stalled disk must not hold up /status): the next status checks.
        if self._lock.acquire(blocking=False):
            try:
                self._check_directory_locked(None)
            finally:
                self._lock.release()
        return {
            "type": self.kind,
            "path": str(self.path),
            "capacity_bytes": self.max_bytes,
            "used_bytes": self._used,
            "objects": len(self._index),
            "eviction_policy": self.eviction_policy.value,
            "state": self.state.value,
            **asdict(self.counters),
        }

    def _check_directory(self, scope_key: bytes | None) -> bool:
        with self._lock:
            return self._check_directory_locked(scope_key)

    def _check_directory_locked(self, scope_key: bytes | None) -> bool:
        """After a folder was found missing (and on each status): forgets the chunks that went
        with the root or ``scope_key``'s folder, makes the root again and checks the lock (lock
        held). Whether the tier may write."""
        if not self.root.is_dir():
            gone = list(self._index)
            self._scopes.clear()
        elif scope_key is not None and not (self.root / scope_key.hex()).is_dir():
            gone = [key for key in self._index if key[0] == scope_key]
            self._scopes.discard(scope_key)
        else:
            gone = []
        for key in gone:
            self._forget(key)
        if gone:
            logger.warning("L2 disk tier %s: %d chunks went with their folder (removed by hand?); forgotten",
                           self.path, len(gone))
        if not self._still_owner():
            return False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if self._epoch and not os.path.lexists(self.path / EPOCH_NAME):  # removed by hand: else a
                _replace_epoch_file(self.path, self._epoch)  # restart would drop every chunk written since
        except OSError:
            return False
        return self.writable

    def _still_owner(self) -> bool:
        """Whether ``.lock`` is still the file this tier holds its flock on (lock held). If it was
        removed, the tier takes a new one; if another server took it first, the tier stops
        writing for good (two servers on one directory delete each other's files)."""
        if self.state is TierState.LOCK_LOST:
            return False
        try:
            held, now = os.fstat(self._owner), os.stat(self.path / ".lock", follow_symlinks=False)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return True
        except FileNotFoundError:
            pass
        except OSError:  # cannot tell (closed, or the directory unreadable): nothing to act on
            return True
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = _lock_directory(self.path)
        except OSError as e:
            self.state = TierState.LOCK_LOST
            logger.warning("L2 disk tier %s stops taking writes: its .lock was removed and cannot be taken again (%s)",
                           self.path, e)
            return False
        os.close(self._owner)
        self._owner = fd
        logger.warning("L2 disk tier %s: its .lock was removed; taken again", self.path)
        return True

    def _forget(self, key: Key) -> None:
        """Drops a key from the index (lock held; its file is the caller's)."""
        size = self._index.pop(key, None)
        if size is not None:
            self._policy.forget(key)
            self._used -= size

    def _file(self, scope_key: bytes, chunk_hash: bytes) -> Path:
        return self.root / scope_key.hex() / f"{chunk_hash.hex()}{SUFFIX}"


class DirectoryInUse(OSError):
    """Another process serves this directory."""


def _lock_directory(path: Path) -> int:
    """An exclusive flock on ``<path>/.lock`` for as long as this process lives: two servers on
    one directory would delete each other's files."""
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DirectoryInUse(errno.EBUSY, f"another lmcache server uses the L2 directory {path}") from None
    return fd


def _write_all(fd: int, buffers: list[Any]) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    offset = 0
    while views:
        written = os.pwritev(fd, views, offset)
        if written <= 0:
            raise OSError(errno.EIO, "a write made no progress")
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _read_all(fd: int, into: memoryview, offset: int) -> int:
    view = into.cast("B") if into.format != "B" else into
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def _valid_epoch(epoch: int) -> int:
    if not 0 <= epoch < 1 << 64:
        raise ValueError(f"epoch {epoch} out of range")
    return epoch


def _replace_epoch_file(path: Path, epoch: int) -> None:
    """Replaces ``path``'s epoch file at once (written and synced, then renamed over the old one)."""
    tmp = path / f"{EPOCH_NAME}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, [f"{epoch}\n".encode()])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path / EPOCH_NAME)
    finally:
        _unlink(tmp)


def _fsync_directory(path: Path) -> None:
    """Makes the renames in ``path`` durable: a clear must outlive a crash that follows it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _canonical_hex(name: str) -> bytes | None:
    """The 16 bytes a file or folder name stands for, if it is their one spelling (lower-case
    hex, as ``bytes.hex`` writes it): ``bytes.fromhex`` also takes upper case and spaces, and a
    second spelling of a key would be indexed twice while reads and deletes use the first."""
    try:
        raw = bytes.fromhex(name)
    except ValueError:
        return None
    return raw if len(raw) == 16 and raw.hex() == name else None


def _remove_tree(path: Path) -> list[str]:
    """Deletes ``path`` and what it holds; what could not be deleted, as messages."""
    failures: list[str] = []

    def failed(_func: Any, where: str, exc: Any) -> None:
        failures.append(f"{where}: {exc[1]}")

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=failed)  # onexc is 3.12+
    return failures


def _chunk_files_in(root: Path) -> list[str]:
    """The chunk files left under ``root``; a folder that cannot be listed counts as one."""
    left: list[str] = []
    try:
        folders = list(os.scandir(root))
    except FileNotFoundError:
        return left
    except OSError:
        return [str(root)]
    for folder in folders:
        if folder.is_dir(follow_symlinks=False):
            try:
                left += [e.path for e in os.scandir(folder.path) if e.name.endswith(SUFFIX)]
            except OSError:
                left.append(folder.path)
    return left


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
