"""What a hostile or broken server cannot make the client do, against real servers on 127.0.0.1:

- read an API answer of any size into memory: answers are capped (``MAX_ANSWER_BYTES``) while
  they stream; past it a generate is uncertain, a status or result a protocol error;
- fetch from a private address by answering the check and the connection differently (DNS
  rebinding): the address checked is the address connected to;
- re-send a generate because a 5xx mentions ``CONCURRENT_LIMIT``: only a 4xx is a refusal.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_API_KEY
from wirekit import RawRequest, RawServer, Wire, json_head

from kvid_dagster.client import (
    MAX_ANSWER_BYTES,
    AsyncKvidClient,
    GenerationTextToVideo,
    KvidClient,
    KvidError,
    KvidProtocolError,
    KvidResponseTooLargeError,
    KvidUncertainSubmissionError,
    TextToVideoV1,
)
from kvid_dagster.core.prompts import load_prompt_table
from kvid_dagster.core.submit import SubmitAction, SubmitOutcome, register_table, submit_rows
from kvid_dagster.ledger import Ledger, VideoStatus

pytestmark = pytest.mark.timeout(120)

REQUEST = TextToVideoV1("A lighthouse in a storm", resolution="480p")
# what the server would send, all of it to a client that reads on: far more than the cap plus
# what loopback's socket buffers can hold (up to 4 MiB sent, 32 MiB received, autotuned)
HUGE = 24 * MAX_ANSWER_BYTES


def no_wait(seconds: float) -> None:
    pass


async def no_wait_async(seconds: float) -> None:
    pass


def run(flavour: str, base_url: str, call: str, *args: Any, **kwargs: Any) -> Any:
    """``client.<call>(*args)`` with a fresh client of ``flavour`` (sync or async)."""
    if flavour == "sync":
        with KvidClient(TEST_API_KEY, base_url, sleep=no_wait, **kwargs) as client:
            return getattr(client, call)(*args)

    async def go() -> Any:
        async with AsyncKvidClient(TEST_API_KEY, base_url, sleep=no_wait_async, **kwargs) as client:
            return await getattr(client, call)(*args)

    return asyncio.run(go())


# ---- answers are capped ----------------------------------------------------------------------


def huge_json(request: RawRequest, wire: Wire) -> None:
    """A valid envelope whose answer goes on for ``HUGE`` bytes (no Content-Length)."""
    pad = b"x" * 65536
    if not wire.write(json_head("200 OK") + b'{"success": true, "message": "'):
        return
    for _ in range(HUGE // len(pad)):
        if not wire.write(pad):
            return
    data = {"request_id": "req_big", "status": "PROCESSING", "url": "https://x.example/v.mp4"}
    wire.write(b'", "data": ' + json.dumps(data).encode() + b"}")


def announced_huge(request: RawRequest, wire: Wire) -> None:
    wire.write(json_head("200 OK", length=HUGE))


@pytest.fixture(params=["streamed", "announced"])
def huge_server(request: pytest.FixtureRequest) -> Iterator[RawServer]:
    with RawServer(huge_json if request.param == "streamed" else announced_huge) as server:
        yield server


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_huge_answer_to_a_generate_is_uncertain_and_not_read_whole(
    flavour: str, huge_server: RawServer
) -> None:
    with pytest.raises(KvidUncertainSubmissionError, match="MAX_ANSWER_BYTES"):
        run(flavour, huge_server.url, "generate", REQUEST, max_retries=3)
    assert len(huge_server.requests) == 1  # never re-sent
    assert huge_server.bytes_sent < HUGE / 2  # the client stopped reading near the cap


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("call", ["status", "result"])
def test_a_huge_answer_to_a_status_or_result_is_a_protocol_error(
    flavour: str, call: str, huge_server: RawServer
) -> None:
    with pytest.raises(KvidResponseTooLargeError, match="MAX_ANSWER_BYTES"):
        run(flavour, huge_server.url, call, "text-to-video", "req_1", max_retries=3)
    assert len(huge_server.requests) == 1  # a protocol error: not retried within the call
    assert huge_server.bytes_sent < HUGE / 2


def huge_error_page(request: RawRequest, wire: Wire) -> None:
    """A 500 whose HTML error page goes on for ``HUGE`` bytes: what a broken storage sends."""
    if not wire.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/html\r\n\r\n"):
        return
    pad = b"<p>error</p>" * 5000
    for _ in range(HUGE // len(pad)):
        if not wire.write(pad):
            return


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_huge_error_page_for_a_download_is_not_read_whole(flavour: str, tmp_path: Path) -> None:
    with RawServer(huge_error_page) as server, pytest.raises(KvidResponseTooLargeError):
        run(
            flavour,
            server.url,
            "download",
            f"{server.url}/videos/v.mp4",
            tmp_path / "v.mp4",
            max_retries=0,
        )
    assert server.bytes_sent < HUGE / 2  # the client stopped reading near the cap
    assert not list(tmp_path.iterdir())  # nothing written


# ---- DNS rebinding ---------------------------------------------------------------------------

REBINDING_HOST = "rebind.test"
# global by ipaddress's rules (multicast, MCAST-TEST-NET), yet a TCP connect to it fails at once
# on this host: the lookup's first answer passes any check and reaches nothing
PUBLIC_ANSWER = "233.252.0.1"


class RebindingResolver:
    """``socket.getaddrinfo`` for the test: ``rebind.test`` is a public address the first time
    it is looked up and 127.0.0.1 after (a TTL-0 rebinding name); any other name is looked up
    for real."""

    def __init__(self) -> None:
        self.real = socket.getaddrinfo
        self.lookups = 0
        self._lock = threading.Lock()

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name != REBINDING_HOST:
            return self.real(host, port, *args, **kwargs)
        with self._lock:
            self.lookups += 1
            first = self.lookups == 1
        return self.real(PUBLIC_ANSWER if first else "127.0.0.1", port, *args, **kwargs)


VIDEO = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 1000


def serve_video(request: RawRequest, wire: Wire) -> None:
    wire.write(
        f"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: {len(VIDEO)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + VIDEO
    )


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_host_that_rebinds_to_loopback_after_the_check_is_never_fetched_from(
    flavour: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    resolver = RebindingResolver()
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    with RawServer(serve_video) as storage:
        port = storage.url.rsplit(":", 1)[1]
        url = f"http://{REBINDING_HOST}:{port}/v.mp4"
        with pytest.raises(KvidError) as caught:
            run(flavour, "https://api.kvid.test", "download", url, tmp_path / "v.mp4", timeout=2.0)
        assert storage.requests == []  # the loopback server was never reached
    # the connect to the public answer failed; its retry looked the name up again, got
    # loopback and refused it: each connection checked the address it was about to use
    assert resolver.lookups == 2
    assert isinstance(caught.value, KvidProtocolError), caught.value
    assert "127.0.0.1, a non-public address" in str(caught.value)
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_trusted_host_on_loopback_is_fetched_and_an_untrusted_one_refused_by_address(
    flavour: str, tmp_path: Path
) -> None:
    """``localhost`` resolves to loopback: refused unless allowed, whatever the check saw."""
    with RawServer(serve_video) as storage:
        url = storage.url.replace("127.0.0.1", "localhost") + "/v.mp4"
        with pytest.raises(KvidProtocolError, match="non-public address"):
            run(flavour, "https://api.kvid.test", "download", url, tmp_path / "a.mp4")
        assert storage.requests == []
        got = run(
            flavour,
            "https://api.kvid.test",
            "download",
            url,
            tmp_path / "b.mp4",
            allowed_download_hosts=("localhost",),
        )
        assert got.path.read_bytes() == VIDEO and len(storage.requests) == 1


# ---- a 5xx that mentions CONCURRENT_LIMIT ----------------------------------------------------


def concurrent_limit_500(request: RawRequest, wire: Wire) -> None:
    """A 500 whose body names the 429's code (a proxy relaying it, a buggy gateway)."""
    body = json.dumps(
        {"success": False, "code": "CONCURRENT_LIMIT", "message": "CONCURRENT_LIMIT upstream"}
    ).encode()
    wire.write(json_head("500 Internal Server Error", length=len(body)) + body)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_5xx_naming_concurrent_limit_after_a_generate_is_uncertain(flavour: str) -> None:
    with RawServer(concurrent_limit_500) as server:
        request = GenerationTextToVideo("A lighthouse in a storm")
        with pytest.raises(KvidUncertainSubmissionError) as caught:
            run(flavour, server.url, "generate", request, dialect="generation", max_retries=3)
        assert caught.value.status_code == 500
        assert len(server.requests) == 1


def test_a_submission_meeting_a_5xx_naming_concurrent_limit_is_uncertain_not_held(
    database_url: str, tmp_path: Path
) -> None:
    """A refusal would release the claim, hold the queue and send the row again."""
    table = tmp_path / "prompts.csv"
    table.write_text("prompt_id,prompt,resolution\na,A lighthouse in a storm,480p\n")
    prompts = load_prompt_table(table, dialect="generation")
    ledger = Ledger.for_data_dir(tmp_path / "data", database_url)
    register_table(ledger, prompts)

    async def go(base_url: str) -> list[SubmitOutcome]:
        async with AsyncKvidClient(TEST_API_KEY, base_url, dialect="generation") as client:
            return await submit_rows(
                client, ledger, prompts.rows, limit_wait_s=0.01, limit_hold_s=1.0
            )

    with RawServer(concurrent_limit_500) as server:
        [outcome] = asyncio.run(go(server.url))
        assert len(server.requests) == 1
    assert (outcome.action, outcome.status) == (SubmitAction.UNCERTAIN, VideoStatus.UNCERTAIN)
    row = ledger.row("a")
    assert row is not None and row.status is VideoStatus.UNCERTAIN
