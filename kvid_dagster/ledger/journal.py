"""The last resort for a paid request_id: a local file, replayed into the ledger on next start.

Used only when the ledger cannot be written right after a generate returned (the database is
down, the disk is full): one JSON line per paid job, appended and fsynced. Replaying takes the
file away first (a rename), so two processes never replay the same lines, and recording a
request_id is idempotent, so a replay interrupted half-way is simply replayed again.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class JournalEntry:
    submission_id: int
    request_hash: str
    attempt: int
    partition_key: str
    request_id: str


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, entry: JournalEntry) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(asdict(entry), sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)  # one write of one short line: O_APPEND keeps lines whole
            os.fsync(fd)
        finally:
            os.close(fd)

    def pending(self) -> bool:
        return self.path.exists() or any(self._taken())

    def _taken(self) -> Iterator[Path]:
        return self.path.parent.glob(f".{self.path.name}.*.replaying")

    def take(self) -> list[tuple[Path, list[JournalEntry]]]:
        """The journal's entries, with the files holding them (delete each once recorded);
        files a killed replayer left behind are taken again."""
        if self.path.exists():
            taken = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.replaying")
            with contextlib.suppress(FileNotFoundError):  # another process took it first
                os.rename(self.path, taken)
        batches = []
        for file in sorted(self._taken()):
            entries = []
            try:
                text = file.read_text(encoding="utf-8")
            except FileNotFoundError:  # another process replayed it meanwhile
                continue
            for line in text.splitlines():
                if line.strip():
                    try:
                        entries.append(JournalEntry(**json.loads(line)))
                    except (ValueError, TypeError):
                        continue  # a line torn by a crash mid-write holds nothing usable
            batches.append((file, entries))
        return batches
