"""Where videos, previews and the Parquet catalogs live: the data dir, or any fsspec URL.

``KVID_STORAGE_URL`` (``storage_url`` on the project) is a local path or a URL such as
``s3://bucket/prefix``, opened through universal_pathlib (what Dagster's own UPath IO managers
use); S3 needs the ``[s3]`` extra (s3fs), which takes ``AWS_ENDPOINT_URL`` and the credentials
from the environment as boto does. A local root is a plain :class:`pathlib.Path`, so local
storage behaves exactly as it did before storage was configurable; only the ledger never moves
(it stays in its database).

Object stores have no rename, but a PUT of one object is atomic (a reader sees the old object
or the new one), so files are made and verified locally and then streamed to their final key
in bounded parts (:func:`put_file`): a failed upload leaves the old object, never half a file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fsspec import AbstractFileSystem
from upath import UPath

STORAGE_URL_ENV = "KVID_STORAGE_URL"
#: one part of an upload held in memory: S3's smallest multipart part is 5 MiB
PART_BYTES = 8 * 1024 * 1024

_LOCAL_PROTOCOLS = ("", "file", "local")
#: a storage location: a local path, or a remote one
StoragePath = Path | UPath


class StorageError(OSError):
    """An upload to (or a read from) storage failed; what was there before is unchanged."""


def storage_path(location: str | os.PathLike[str], **options: Any) -> StoragePath:
    """``location`` as a local :class:`~pathlib.Path` (a path or a ``file://`` URL, resolved)
    or a :class:`~upath.UPath` for any other fsspec URL (``options``: its filesystem's storage
    options; unset, s3fs reads the ``AWS_*`` environment as boto does)."""
    if isinstance(location, UPath) and is_remote(location):
        return location
    text = os.fspath(location) if not isinstance(location, UPath) else str(location)
    if "://" not in text:
        return Path(text).resolve()
    path = UPath(text, **options)
    return path if is_remote(path) else Path(path.path).resolve()


def filesystem(path: UPath) -> AbstractFileSystem:
    """The fsspec filesystem of a remote ``path``, its package asked for now (an ImportError
    naming the extra to install, not a failure mid-run)."""
    try:
        return path.fs
    except ImportError as exc:
        extra = " (pip install 'kvid-dagster[s3]')" if path.protocol == "s3" else ""
        raise ImportError(f"storage {path}: {exc}{extra}") from exc


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True for a location on an object store (not a local file), such as ``s3://b/k``."""
    if isinstance(path, UPath):
        return path.protocol not in _LOCAL_PROTOCOLS
    if isinstance(path, Path):
        return False
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def uri(path: StoragePath) -> str:
    """What the catalog and ``dagster/uri`` show: a local path, or the object's URL."""
    return str(path)


@contextlib.contextmanager
def open_for_write(path: UPath) -> Iterator[IO[bytes]]:
    """A remote file written in parts of :data:`PART_BYTES`; published on a clean exit, and
    abandoned on an error (an unfinished multipart upload is aborted: nothing appears).

    fsspec's deferred commit (``autocommit=False``, what ``fs.transaction`` uses): closing
    uploads the parts and publishes nothing; ``commit()`` publishes, ``discard()`` drops them.
    """
    fs, key = path.fs, path.path
    file = fs.open(key, "wb", block_size=PART_BYTES, autocommit=False)
    try:
        yield file
        file.close()
        file.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            file.close()  # closed first, as a transaction does: a later close cannot publish
        with contextlib.suppress(Exception):
            file.discard()
        raise


def put_file(local: Path, target: StoragePath) -> str:
    """Stream the finished local file ``local`` to ``target`` (its final name) and return the
    stored URI; the stored size is checked against the local one. Local targets are not
    handled here: the caller renames into place. Raises :class:`StorageError`."""
    if not is_remote(target):
        raise ValueError(f"put_file is for remote storage, got {target}")
    assert isinstance(target, UPath)
    size = local.stat().st_size
    try:
        with local.open("rb") as source, open_for_write(target) as sink:
            shutil.copyfileobj(source, sink, PART_BYTES)
        stored = int(target.fs.info(target.path)["size"])
    except Exception as exc:
        raise StorageError(f"uploading {uri(target)}: {type(exc).__name__}: {exc}") from exc
    if stored != size:
        raise StorageError(f"uploading {uri(target)}: stored {stored} bytes of {size}")
    return uri(target)


def put_bytes(data: bytes, target: StoragePath) -> None:
    """A small object (a preview) written whole to ``target``; raises :class:`StorageError`."""
    assert isinstance(target, UPath)
    try:
        with open_for_write(target) as sink:
            sink.write(data)
    except Exception as exc:
        raise StorageError(f"writing {uri(target)}: {type(exc).__name__}: {exc}") from exc


def exists(location: str | os.PathLike[str]) -> bool:
    """A file (local) or an object (remote) is at ``location``; False when it cannot be told."""
    try:
        return storage_path(location).is_file()
    except (OSError, ValueError):
        return False


def arrow_location(path: StoragePath) -> tuple[str | Path, Any]:
    """``(path, filesystem)`` for pyarrow's readers: ``filesystem`` is None for a local path,
    else the fsspec filesystem wrapped for Arrow, its cached listings of ``path`` dropped (a
    stale size would make a file another host replaced since look damaged)."""
    if not is_remote(path):
        assert isinstance(path, Path)
        return path, None
    assert isinstance(path, UPath)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, key = path.fs, path.path
    fs.invalidate_cache(key)
    return key, PyFileSystem(FSSpecHandler(fs))


@dataclass(frozen=True)
class Storage:
    """A project's storage root: ``videos/`` and ``catalog/`` under it."""

    root: StoragePath

    @classmethod
    def from_setting(cls, setting: str | os.PathLike[str] | None, data_dir: Path) -> Storage:
        """``setting`` (a path or URL), else ``$KVID_STORAGE_URL``, else ``data_dir``."""
        chosen = setting or os.environ.get(STORAGE_URL_ENV, "").strip() or data_dir
        root = storage_path(chosen)
        if isinstance(root, UPath) and is_remote(root):
            filesystem(root)
        return cls(root)

    @property
    def is_local(self) -> bool:
        return not is_remote(self.root)

    @property
    def videos_dir(self) -> StoragePath:
        return self.root / "videos"

    @property
    def catalog_dir(self) -> StoragePath:
        return self.root / "catalog"
