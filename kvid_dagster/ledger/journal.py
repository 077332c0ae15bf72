"""The last resort for a paid request_id: a local file, replayed into the ledger on next start.

Used only when the ledger cannot be written right after a generate returned (the database is
down, the disk is full): one JSON line per paid job, appended and fsynced. Replaying takes the
file away first (a rename), so two processes never replay the same lines, and recording a
request_id is idempotent, so a replay interrupted half-way is simply replayed again.

Appending and taking hold the file's ``flock``: an appender that opened the journal just before
a replayer renamed it waits until the replayer is done with that file, sees the name now holds
another file (or none), and appends to the journal under its name instead. Without the lock its
line would land in the taken file after the replayer read it, and be deleted with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class JournalEntry:
    submission_id: int
    request_hash: str
    attempt: int
    partition_key: str
    request_id: str


def _line(entry: JournalEntry) -> bytes:
    return (json.dumps(asdict(entry), sort_keys=True) + "\n").encode()


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a replayer may have renamed it)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, entry: JournalEntry) -> None:
        self.append_all([entry])

    def append_all(self, entries: Iterable[JournalEntry]) -> None:
        """Append ``entries`` (fsynced) to the file named ``path`` when the lock is got."""
        data = b"".join(_line(e) for e in entries)
        if not data:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not _same_file(fd, self.path):
                    continue  # taken while we waited: that file is being replayed, not ours
                os.write(fd, data)  # one write of short lines: O_APPEND keeps them whole
                os.fsync(fd)
                return
            finally:
                os.close(fd)  # and the lock with it

    def pending(self) -> bool:
        return self.path.exists() or any(self._taken())

    def _taken(self) -> Iterator[Path]:
        return self.path.parent.glob(f".{self.path.name}.*.replaying")

    @contextlib.contextmanager
    def taken(self) -> Iterator[list[JournalEntry]]:
        """The journal's entries, each once, taken away from appenders and other replayers:
        the journal itself (renamed under its lock) and the files a killed replayer left,
        each locked while the block runs. On a clean exit those files are deleted, so the
        block must first record the entries, or append back those it could not record; on an
        error they are kept and taken again by the next replay."""
        with contextlib.ExitStack() as held:
            locked = dict(self._take_journal(held))
            for file in sorted(self._taken()):
                if file not in locked and (fd := self._lock_taken(file, held)) is not None:
                    locked[file] = fd
            entries = []
            for file in sorted(locked):  # oldest name first: the journal's own is newest
                with os.fdopen(os.dup(locked[file]), "rb") as f:
                    text = f.read().decode("utf-8", errors="replace")
                for line in text.splitlines():
                    if line.strip():
                        try:
                            entries.append(JournalEntry(**json.loads(line)))
                        except (ValueError, TypeError):
                            continue  # a line torn by a crash mid-write holds nothing usable
            yield list(dict.fromkeys(entries))  # a line appended back twice is one entry
            for file in locked:
                with contextlib.suppress(FileNotFoundError):
                    file.unlink()  # still locked: no appender writes into it meanwhile

    def _take_journal(self, held: contextlib.ExitStack) -> list[tuple[Path, int]]:
        """The journal renamed away, and kept locked until ``held`` closes: appenders that
        opened it wait, then append to a new journal."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return []
        held.callback(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not _same_file(fd, self.path):  # another replayer took it while we waited
            return []
        taken = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.replaying")
        os.rename(self.path, taken)
        return [(taken, fd)]

    @staticmethod
    def _lock_taken(file: Path, held: contextlib.ExitStack) -> int | None:
        """``file`` open and locked until ``held`` closes; None if another replayer has it (a
        killed one's lock went with it) or it is gone."""
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            return None
        held.callback(os.close, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        return fd if _same_file(fd, file) else None
