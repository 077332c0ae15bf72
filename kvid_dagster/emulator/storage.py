"""The videos' origin: publishing a job's video under its own name, its (signed, expiring) URL,
and serving it from ``/files/`` or the separate storage listener's ``/videos/``."""

from __future__ import annotations

import math
import re
import secrets
import time
from email.message import Message
from email.utils import formatdate
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs

from kvid_dagster.emulator.faults import Fault
from kvid_dagster.emulator.jobs import Job
from kvid_dagster.emulator.responses import Response, error, xml_error
from kvid_dagster.emulator.routing import FILES_PREFIX, STORAGE_PREFIX
from kvid_dagster.emulator.transport import range_response

_FILE_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]+\.mp4$")


class FileResponder:
    """KvidEmulator's file serving (a mixin: the files and URL tokens are the emulator's)."""

    def _publish(self, job: Job, path: Path) -> str:
        """Serve the job's video under its own name (its URL outlives ``forget_jobs``)."""
        name = f"{job.request_id}.mp4"
        with self._lock:
            self._files[name] = path
        return name

    def _file_url(self, name: str) -> str:
        """Where ``name`` is served; with ``result_url_ttl_s``, signed by a fresh token."""
        if self._storage is not None:
            url = f"{self.storage_url}{STORAGE_PREFIX}{name}"
        else:
            url = f"{self.config.public_base_url or self.base_url}{FILES_PREFIX}{name}"
        ttl = self._edges.result_url_ttl_s
        if not ttl:
            return url
        token = secrets.token_urlsafe(16)
        now = time.monotonic()
        with self._lock:
            # issued in time order: drop the expired from the front (they answer 403 all the same)
            while self._url_tokens:
                oldest = next(iter(self._url_tokens))
                if now - self._url_tokens[oldest][1] < ttl:
                    break
                del self._url_tokens[oldest]
            self._url_tokens[token] = (name, now)
        return f"{url}?expires={math.ceil(time.time() + ttl)}&signature={token}"

    def _file(self, name: str, query: str, method: str, headers: Message) -> Response:
        path = self._files.get(name) if _FILE_NAME.match(name) else None
        if path is None or not path.is_file():
            if self._storage is not None:
                return xml_error(404, "NoSuchKey", "The specified key does not exist.")
            return error(404, f"No such file: {name}")
        ttl = self._edges.result_url_ttl_s
        if ttl:
            token = parse_qs(query).get("signature", [""])[0]
            with self._lock:
                issued = self._url_tokens.get(token)
            if issued is None or issued[0] != name or time.monotonic() - issued[1] >= ttl:
                return xml_error(403, "AccessDenied", "Request has expired")
        stat = path.stat()
        validators = {
            "ETag": f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"',
            "Last-Modified": formatdate(stat.st_mtime, usegmt=True),
        }
        if self.config.range_requests:
            ranged = range_response(path, stat.st_size, headers, validators)
            if ranged is not None:
                return ranged
        response = Response(200, content_type="video/mp4", file=path, file_bytes=stat.st_size)
        if self.config.range_requests:
            response.headers.update({**validators, "Accept-Ranges": "bytes"})
        return response

    def _file_fault(self, fault: Fault, name: str, query: str, method: str) -> Response:
        if fault.kind == "malformed":  # a truncated, undecodable video
            response = self._file(name, query, method, Message())
            if response.file is not None:
                response.file_bytes //= 2
            return response
        if fault.kind == "missing_fields":
            return Response(200, b"", "video/mp4")
        return self._fault_response(fault)
