"""Download plumbing shared by both clients: where a video goes, and a size-capped, hashing sink
that writes to a temporary file beside the target and renames it into place only when complete.

A reader of the destination folder therefore never sees half a video, and a failed or aborted
download leaves nothing behind, unless the caller asked for a ``partial`` file: then the bytes
received so far stay in it, and a later download into the same ``partial`` resumes where this
one stopped when the server allows (an HTTP Range request guarded by ``If-Range``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import httpx

from .errors import KvidDownloadBusyError, KvidDownloadTooLargeError, KvidProtocolError
from .results import DownloadedFile

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+)\s*$", re.IGNORECASE)


def create_new_file(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A file of a fresh random name in ``folder``, created (``O_EXCL``) and opened for
    writing with the mode ``open()`` gives, 0666 less the umask; ``tempfile.mkstemp`` makes
    0600, which the rename into place would pass on to a video (or a preview) its folder's
    other readers then cannot open."""
    while True:
        path = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:  # 48 random bits: another writer's, try another name
            continue


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


@dataclass
class PartialDownload:
    """Where a download keeps the bytes it received, so a later one can continue from them.

    Pass the same ``PartialDownload`` (or one with the same ``path``) to each ``download`` of
    one file. After each call, whether it succeeded, failed or was cancelled, ``kept_bytes``
    says how many bytes ``path`` holds and ``resumed`` whether that call continued bytes kept
    before it (the server honoured the Range request) instead of starting over.
    """

    path: Path
    kept_bytes: int = 0
    resumed: bool = False


@dataclass(frozen=True)
class _Origin:
    """What identifies the bytes in a partial file: a resumed request must get the same file.

    The URL is not kept: a signed result URL expires and the next one differs, for one file."""

    length: int | None  # the whole file's size, as the first answer announced it
    etag: str | None  # a strong ETag, the validator If-Range prefers
    last_modified: str | None

    @classmethod
    def of(cls, response: httpx.Response, length: int | None) -> _Origin:
        etag = response.headers.get("ETag")
        if etag is not None and etag.strip().startswith("W/"):
            etag = None  # If-Range needs a strong validator
        return cls(length, etag, response.headers.get("Last-Modified"))

    @property
    def validator(self) -> str | None:
        return self.etag or self.last_modified


class DownloadSink:
    """Receives one download attempt after another; keeps only a complete one.

    With ``partial``, the bytes go to that file (locked while this sink holds it: a second
    downloader of the same file gets :class:`KvidDownloadBusyError`) and stay there when the
    download stops short; its origin (size, validators) is kept beside it in ``<partial>.json``.
    """

    def __init__(self, target: Path, max_bytes: int, kept: PartialDownload | None = None) -> None:
        self.target = target
        self.max_bytes = max_bytes
        self.kept = kept
        self.partial = None if kept is None else kept.path
        self.tmp_path: Path | None = None
        self._file: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._origin: _Origin | None = None
        if self.partial is not None:
            self._open_partial(self.partial)

    # ---- a partial file kept across downloads ------------------------------------------------

    @property
    def _origin_path(self) -> Path:
        assert self.partial is not None
        return self.partial.with_name(self.partial.name + ".json")

    def _open_partial(self, partial: Path) -> None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise KvidDownloadBusyError(
                f"{partial.name}: another download of this file is in progress"
            ) from None
        self._file = os.fdopen(fd, "r+b")
        self.tmp_path = partial
        self._size = self._file.seek(0, os.SEEK_END)
        self._note(resumed=False)
        with contextlib.suppress(OSError, ValueError, TypeError):
            self._origin = _Origin(**json.loads(self._origin_path.read_text()))
        if self._size and (self._origin is None or self._origin.length is None):
            self._restart()  # bytes of unknown origin can never be resumed safely

    def resume_headers(self) -> dict[str, str]:
        """The Range headers of the next attempt: none unless there are bytes to continue."""
        if self._origin is None or not self._size or self._origin.length is None:
            return {}
        if self._size >= self._origin.length:
            self._restart()  # complete, yet never committed: it was refused (too short, say)
            return {}
        headers = {"Range": f"bytes={self._size}-"}
        if self._origin.validator is not None:
            headers["If-Range"] = self._origin.validator
        return headers

    def _save_origin(self) -> None:
        if self.partial is not None and self._origin is not None:
            self._origin_path.write_text(json.dumps(asdict(self._origin)))

    # ---- one attempt -------------------------------------------------------------------------

    def accept(self, response: httpx.Response) -> bool:
        """Start a new attempt; False for an error answer (its body is then read as usual)."""
        if response.status_code == 416 and self.partial is not None:
            self._restart()  # the kept bytes are not a prefix of this file: start over next time
            return False
        if not 200 <= response.status_code < 300:
            return False
        announced = response.headers.get("Content-Length", "")
        length = int(announced) if announced.isdigit() else None
        if response.status_code == 206:
            if not self._continues(response):
                self._restart()  # a piece of something else: never glue it onto the kept bytes
                raise KvidProtocolError(
                    f"{response.request.url.path}: a partial answer (206, Content-Range "
                    f"{response.headers.get('Content-Range')!r}) that does not continue the "
                    f"{self._size} bytes kept; the next attempt starts over"
                )
            total = self._origin.length if self._origin else None
        else:
            total = length
            self._start(_Origin.of(response, length))
        if total is not None and total > self.max_bytes:
            raise KvidDownloadTooLargeError(
                f"{response.request.url.path}: Content-Length {total} exceeds "
                f"max_bytes={self.max_bytes}",
                status_code=response.status_code,
            )
        return True

    def _continues(self, response: httpx.Response) -> bool:
        """A 206 that is the rest of the kept bytes' file: same length, starting where they end;
        the hash is then brought up to date with the kept bytes."""
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        origin = self._origin
        if match is None or origin is None or self._file is None:
            return False
        start, total = int(match.group(1)), int(match.group(3))
        if start != self._size or total != origin.length:
            return False
        self._hash = hashlib.sha256()
        self._file.seek(0)
        for chunk in iter(lambda: self._file.read(1 << 20), b""):  # type: ignore[union-attr]
            self._hash.update(chunk)
        self._file.seek(0, os.SEEK_END)
        self._note(resumed=True)
        return True

    def _start(self, origin: _Origin) -> None:
        if self._file is None:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp_path = create_new_file(
                self.target.parent, prefix=f".{self.target.name}.", suffix=".part"
            )
            self._file = os.fdopen(fd, "wb")
        self._restart()
        self._origin = origin
        self._save_origin()

    def _restart(self) -> None:
        """Forget the bytes received so far (a retry without Range starts over)."""
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
        self._hash = hashlib.sha256()
        self._size = 0
        self._note(resumed=False)

    def _note(self, *, resumed: bool | None = None) -> None:
        """Tell the caller's ``PartialDownload`` what its file holds now."""
        if self.kept is not None:
            self.kept.kept_bytes = self._size
            if resumed is not None:
                self.kept.resumed = resumed

    def write(self, chunk: bytes) -> None:
        assert self._file is not None, "write() before accept()"
        self._size += len(chunk)
        if self._size > self.max_bytes:
            raise KvidDownloadTooLargeError(
                f"{self.target.name}: more than max_bytes={self.max_bytes} bytes received"
            )
        self._hash.update(chunk)
        self._file.write(chunk)
        self._note()

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
        os.replace(self.tmp_path, self.target)
        self._file.close()  # after the rename: the lock covers the partial until it is gone
        self._file = None
        self.tmp_path = None
        if self.partial is not None:
            with contextlib.suppress(FileNotFoundError):
                self._origin_path.unlink()
            self._note()
        return DownloadedFile(self.target, self._size, self._hash.hexdigest())

    def forget(self) -> None:
        """Drop the bytes received, kept ones included: the next download starts over."""
        if self._file is not None:
            self._restart()

    def discard(self) -> None:
        """Forget a partial download (no-op after ``commit``); a ``partial`` file keeps what
        it received, for the next download to resume."""
        if self._file is not None:
            if self.partial is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._file.flush()
            if self.tmp_path is not None and (self.partial is None or not self._size):
                # nothing worth keeping; unlinked while still locked, so no one resumes it
                with contextlib.suppress(FileNotFoundError):
                    self.tmp_path.unlink()
                if self.partial is not None:
                    with contextlib.suppress(FileNotFoundError):
                        self._origin_path.unlink()
            self._file.close()
            self._file = None
        self.tmp_path = None
