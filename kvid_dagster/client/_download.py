"""Download plumbing shared by both clients: where a video goes, and a size-capped, hashing sink
that writes to a temporary file beside the target and renames it into place only when complete.

A reader of the destination folder therefore never sees half a video, and a failed or aborted
download leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import IO

import httpx

from .errors import KvidDownloadTooLargeError, KvidProtocolError
from .results import DownloadedFile

DEFAULT_MAX_BYTES = 512 * 1024 * 1024


def safe_file_name(name: str | None, fallback: str = "video.mp4") -> str:
    """A server-chosen name reduced to a plain file name (no folders, no '..')."""
    base = PurePosixPath((name or "").replace("\\", "/")).name.strip()
    if base in ("", ".", "..") or any(ord(c) < 32 for c in base):
        return fallback
    return base


def target_path(dest: str | os.PathLike[str], suggested_name: str | None) -> Path:
    """``dest`` itself, or ``dest/<suggested name>`` when ``dest`` is an existing folder."""
    path = Path(dest).expanduser()
    if path.is_dir():
        path = path / safe_file_name(suggested_name)
    return path.absolute()


class DownloadSink:
    """Receives one download attempt after another; keeps only a complete one."""

    def __init__(self, target: Path, max_bytes: int) -> None:
        self.target = target
        self.max_bytes = max_bytes
        self.tmp_path: Path | None = None
        self._file: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self._size = 0

    def accept(self, response: httpx.Response) -> bool:
        """Start a new attempt; False for an error answer (its body is then read as usual)."""
        if not 200 <= response.status_code < 300:
            return False
        announced = response.headers.get("Content-Length", "")
        if announced.isdigit() and int(announced) > self.max_bytes:
            raise KvidDownloadTooLargeError(
                f"{response.request.url.path}: Content-Length {announced} exceeds "
                f"max_bytes={self.max_bytes}",
                status_code=response.status_code,
            )
        self._start()
        return True

    def _start(self) -> None:
        if self._file is None:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(
                dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".part"
            )
            self.tmp_path = Path(name)
            self._file = os.fdopen(fd, "wb")
        else:  # a retry: start over (the API promises no Range support)
            self._file.seek(0)
            self._file.truncate()
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, chunk: bytes) -> None:
        assert self._file is not None, "write() before accept()"
        self._size += len(chunk)
        if self._size > self.max_bytes:
            raise KvidDownloadTooLargeError(
                f"{self.target.name}: more than max_bytes={self.max_bytes} bytes received"
            )
        self._hash.update(chunk)
        self._file.write(chunk)

    def check_size(self, expected_kb: float | None) -> None:
        """Refuse an empty body, or one far from the size the result announced.

        HTTP cannot see a file that was cut short *and* served with a matching Content-Length;
        the result's ``size`` (kilobytes) can. The margins allow for KB = 1000 or 1024 and any
        rounding, so only a real mismatch (a half video) is refused.
        """
        if self._size == 0:
            raise KvidProtocolError(f"{self.target.name}: the download is empty")
        if expected_kb is None or expected_kb <= 0:
            return
        low = max(0.0, (expected_kb - 1) * 1000 * 0.9)
        high = (expected_kb + 1) * 1024 * 1.1
        if not low <= self._size <= high:
            raise KvidProtocolError(
                f"{self.target.name}: got {self._size} bytes but the result announced "
                f"{expected_kb} KB: the file is incomplete or not the one announced"
            )

    def commit(self) -> DownloadedFile:
        """Make the download durable and visible under its final name."""
        assert self._file is not None and self.tmp_path is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.tmp_path, self.target)
        self.tmp_path = None
        return DownloadedFile(self.target, self._size, self._hash.hexdigest())

    def discard(self) -> None:
        """Forget a partial download (no-op after ``commit``)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.tmp_path.unlink()
            self.tmp_path = None
