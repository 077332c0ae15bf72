"""File-level machinery: reentrant flock, atomic publication, log part names, quarantine.

Nothing here knows about the meaning of the tables; see ``core.py`` for the protocol.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger("kvid_dagster.catalog")

#: Final log part names; anything else in a log folder is ignored (temp files start with ".").
PART_RE = re.compile(r"^(\d{16})-(\d+)-([0-9a-f]{8})\.parquet$")


class CatalogWarning(UserWarning):
    """A damaged file was skipped (quarantined or bypassed); the read itself succeeded."""


def warn(message: str) -> None:
    logger.warning(message)
    warnings.warn(message, CatalogWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# locks


class FileLock:
    """An exclusive ``flock`` that is reentrant for the thread holding it.

    flock locks belong to an open file description, so two ``os.open`` calls of the same file in
    one process would deadlock each other: one FileLock per path per process (see ``file_lock``)
    lets ``catalog.update()`` run inside ``with catalog.lock():``. Other threads of the process
    wait on the thread lock, other processes on the flock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = threading.RLock()
        self._fd: int | None = None
        self._depth = 0
        self._owner: int | None = None

    @property
    def fd(self) -> int:
        if self._fd is None or self._owner != threading.get_ident():
            raise RuntimeError(f"{self.path} is not held by this thread")
        return self._fd

    def held(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._depth > 0 and self._owner == threading.get_ident()

    def acquire(self, timeout: float | None = None) -> None:
        """Block until held; ``timeout`` (seconds, 0 = try once) raises TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._thread_lock.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            raise TimeoutError(f"timed out waiting for {self.path}")
        try:
            if self._depth == 0:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    _flock(fd, deadline, self.path)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd, self._owner = fd, threading.get_ident()
            self._depth += 1
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        if not self.held():
            raise RuntimeError(f"{self.path} is not held by this thread")
        self._depth -= 1
        if self._depth == 0:
            fd, self._fd, self._owner = self._fd, None, None
            assert fd is not None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._thread_lock.release()

    @contextlib.contextmanager
    def hold(self, timeout: float | None = None) -> Iterator[None]:
        self.acquire(timeout)
        try:
            yield
        finally:
            self.release()


def _flock(fd: int, deadline: float | None, path: Path) -> None:
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out waiting for {path}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


_LOCKS: dict[str, FileLock] = {}
_LOCKS_GUARD = threading.Lock()


def file_lock(path: Path) -> FileLock:
    """The process-wide FileLock for ``path`` (pass a resolved path: symlinks are not
    followed here, on the hot path of every write)."""
    key = str(path)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = FileLock(path)
        return lock


def _forget_locks_after_fork() -> None:
    # A forked child shares the parent's open file descriptions: unlocking them would release
    # the parent's flock, so the child just starts with fresh FileLocks (and new descriptions).
    global _LOCKS_GUARD
    _LOCKS.clear()
    _LOCKS_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_forget_locks_after_fork)


def read_counter(fd: int) -> int | None:
    """The sequence counter stored in the lock file (None if missing or unparsable)."""
    raw = os.pread(fd, 64, 0).strip()
    if not raw:
        return 0
    try:
        return int(raw)
    except ValueError:
        return None


def write_counter(fd: int, value: int) -> None:
    # fixed width, so the file never needs truncating and a reader never sees a mix
    os.pwrite(fd, b"%020d\n" % value, 0)


# ---------------------------------------------------------------------------------------------
# files


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(tmp_dir: Path, kind: str) -> Path:
    # the leading "." keeps it out of pyarrow/Spark/DuckDB discovery wherever it ends up
    return tmp_dir / f".{kind}-{os.getpid()}-{uuid.uuid4().hex}.parquet"


def write_parquet(table: pa.Table, path: Path, *, durable: bool, **kwargs: Any) -> None:
    """Write ``table`` to ``path`` (a temp name) and fsync it before anyone renames it."""
    try:
        pq.write_table(table, path, **kwargs)
        if durable:
            fsync_path(path)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


@dataclass(frozen=True, order=True)
class Part:
    """A log part file; parts are applied in (seq, name) order."""

    seq: int
    name: str
    path: Path


def part_name(seq: int) -> str:
    return f"{seq:016d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"


def list_parts(log_dir: Path, after: int = 0) -> list[Part]:
    """Final-named parts with seq > ``after``, sorted; temp files and strangers are ignored."""
    parts = []
    try:
        with os.scandir(log_dir) as it:
            for entry in it:
                m = PART_RE.match(entry.name)
                if m and int(m.group(1)) > after:
                    parts.append(Part(int(m.group(1)), entry.name, Path(entry.path)))
    except FileNotFoundError:
        return []
    parts.sort()
    return parts


def read_bytes(path: Path) -> bytes:
    """Read a whole file (FileNotFoundError when it vanished, e.g. deleted by a compactor).

    The bytes are copied rather than memory-mapped: a file truncated in place by a third party
    would kill a mapping reader with SIGBUS.
    """
    with open(path, "rb") as f:
        return f.read()


def parse_parquet(data: bytes, *, use_threads: bool = True) -> pa.Table:
    # ParquetFile.read is ~3x cheaper than read_table (no dataset layer) on tiny log parts
    return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=use_threads)


def quarantine(path: Path, quarantine_dir: Path, reason: str) -> None:
    """Move a damaged file aside (keeping its bytes for a post-mortem) and warn."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    dest = quarantine_dir / f"{path.parent.name}-{path.name}.{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, dest)
    except FileNotFoundError:
        return  # another reader moved it first and warned
    warn(f"kvid catalog: damaged file {path} moved to {dest}: {reason}")


def remove_stale_temps(dirs: list[Path], max_age: float) -> int:
    """Delete leftovers of killed writers: ``.``/``_``-prefixed files older than ``max_age``."""
    removed = 0
    cutoff = time.time() - max_age
    for d in dirs:
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.name[:1] not in "._" or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                    os.unlink(entry.path)
                    removed += 1
    return removed


def file_identity(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when ``path`` is replaced (None when it does not exist)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
