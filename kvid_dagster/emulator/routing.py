"""Where a request goes: the paths of both dialects and of the file origins, the methods each
endpoint takes, and what the request carries (api-key, job id or prompt, JSON body)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from email.message import Message
from typing import Any, Final
from urllib.parse import parse_qs

from kvid_dagster.emulator.generation import GENERATION_KINDS
from kvid_dagster.emulator.validation import JOB_KINDS, EmulatedDialect

_API_PREFIX: Final = "/ai/video/"
_GENERATION_PREFIX: Final = "/ai/generation/"
ID_PARAMETER: Final = {EmulatedDialect.VIDEO: "request_id", EmulatedDialect.GENERATION: "jobId"}
FILES_PREFIX: Final = "/files/"  # on the API origin
STORAGE_PREFIX: Final = "/videos/"  # on the separate storage origin
METHODS: Final = {"generate": "POST", "status": "GET", "result": "GET", "files": "GET, HEAD"}


NO_BODY: Final = "body: required (got nothing); allowed: a JSON object"


def parse_json(raw: bytes) -> tuple[Any, str | None]:
    """(the body's JSON, None), or (None, the problem): ``NO_BODY`` when there is none."""
    if not raw.strip():
        return None, NO_BODY
    try:
        return json.loads(raw.decode("utf-8")), None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"body: not valid JSON ({exc}); allowed: a JSON object"


def sent_api_key(headers: Message) -> str:
    """The api-key header as sent, stripped ("" without one)."""
    return (headers.get("api-key") or "").strip()


def carried(route: Route, query: str, body: bytes | None) -> str | None:
    """What a scripted fault's ``match`` is compared with: generate's prompt, else the id."""
    if route.endpoint == "files":
        return route.arg.removesuffix(".mp4")
    if route.endpoint != "generate":
        return parse_qs(query).get(ID_PARAMETER[route.dialect], [""])[0].strip()
    try:
        prompt = json.loads(body or b"").get("prompt")
    except (ValueError, AttributeError):  # not JSON, or not an object
        return None
    return prompt if isinstance(prompt, str) else None


@dataclass(frozen=True)
class Route:
    """Where a request goes: endpoint name ("generate", "status", "result", "files" or
    "other"), its dialect, the job kind in its path (generation status/result: None) and an
    argument (a file name, or the path if unknown)."""

    endpoint: str
    dialect: EmulatedDialect = EmulatedDialect.VIDEO
    kind: str | None = None
    arg: str = ""


def route_of(path: str, storage: bool, separate_storage: bool) -> Route:
    """The storage origin serves only ``/videos/``; the API origin ``/files/`` unless separate."""
    files_prefix = STORAGE_PREFIX if storage else None if separate_storage else FILES_PREFIX
    if files_prefix is not None and path.startswith(files_prefix):
        return Route("files", arg=path[len(files_prefix) :])
    if storage:
        return Route("other", arg=path)
    if path.startswith(_API_PREFIX):
        kind, _, action = path[len(_API_PREFIX) :].partition("/")
        if kind in JOB_KINDS and action in ("generate", "status", "result"):
            return Route(action, EmulatedDialect.VIDEO, kind)
    if path.startswith(_GENERATION_PREFIX):
        rest = path[len(_GENERATION_PREFIX) :]
        if rest in ("status", "result"):
            return Route(rest, EmulatedDialect.GENERATION)
        kind, _, action = rest.partition("/")
        if kind in GENERATION_KINDS and action == "generate-async":
            return Route("generate", EmulatedDialect.GENERATION, kind)
    return Route("other", arg=path)
