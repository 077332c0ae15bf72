"""Every API call has an overall deadline (``call_deadline``), whatever the server's pace.

httpx's ``timeout`` bounds each socket wait, so a server answering one byte every half second
never trips it. These tests face a real server on 127.0.0.1 that does exactly that (with the
status line and headers, or with a body that never ends), with both clients: past the deadline a
generate is uncertain and never re-sent, a status call is a timeout (retried as any), and a
submission's claim ends ``UNCERTAIN`` instead of staying ``SUBMITTING``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_API_KEY
from faultkit import submit, table_rows, write_table
from wirekit import RawRequest, RawServer, Wire, json_head

from kvid_dagster.client import (
    DEFAULT_CALL_DEADLINE_S,
    AsyncKvidClient,
    KvidClient,
    KvidTimeoutError,
    KvidUncertainSubmissionError,
    KvidValidationError,
    TextToVideoV1,
)
from kvid_dagster.core.submit import SubmitAction
from kvid_dagster.ledger import Ledger, VideoStatus
from kvid_dagster.resources import KvidResource

# per-read timeout far above the pace: only the deadline can end these calls. The hang guard
# (pytest-timeout) is there for a regression, which would otherwise wait forever.
DEADLINE_S = 1.5
READ_TIMEOUT_S = 10.0
PACE_S = 0.5
pytestmark = pytest.mark.timeout(120)

REQUEST = TextToVideoV1("A lighthouse in a storm", resolution="480p")


def trickling_head(request: RawRequest, wire: Wire) -> None:
    """A status line and headers that never end, one byte every half second."""
    wire.trickle(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: " + b"a" * 10_000, PACE_S
    )


def endless_body(request: RawRequest, wire: Wire) -> None:
    """Headers at once, then a body that never ends, one byte every half second."""
    if wire.write(json_head("200 OK", length=1_000_000)):
        wire.trickle(b'{"success": true, "data": {"request_id": "' + b"r" * 999_000, PACE_S)


SERVERS = {"trickling status line": trickling_head, "endless body": endless_body}


@pytest.fixture(params=list(SERVERS))
def slow_server(request: pytest.FixtureRequest) -> Iterator[RawServer]:
    with RawServer(SERVERS[request.param]) as server:
        yield server


def sync_call(server: RawServer, call: Callable[[KvidClient], Any], **kwargs: Any) -> Any:
    with KvidClient(
        TEST_API_KEY, server.url, timeout=READ_TIMEOUT_S, call_deadline=DEADLINE_S,
        sleep=lambda seconds: None, **kwargs,
    ) as client:  # fmt: skip
        return call(client)


def async_call(server: RawServer, call: Callable[[AsyncKvidClient], Any], **kwargs: Any) -> Any:
    async def no_wait(seconds: float) -> None:
        pass

    async def go() -> Any:
        async with AsyncKvidClient(
            TEST_API_KEY, server.url, timeout=READ_TIMEOUT_S, call_deadline=DEADLINE_S,
            sleep=no_wait, **kwargs,
        ) as client:  # fmt: skip
            return await call(client)

    return asyncio.run(go())


CLIENTS = {"sync": sync_call, "async": async_call}


@pytest.mark.parametrize("flavour", list(CLIENTS))
def test_a_generate_past_its_deadline_is_uncertain_and_never_sent_again(
    flavour: str, slow_server: RawServer
) -> None:
    with pytest.raises(KvidUncertainSubmissionError) as caught:
        CLIENTS[flavour](slow_server, lambda client: client.generate(REQUEST), max_retries=3)
    assert f"call_deadline={DEADLINE_S:g} s" in str(caught.value)
    assert caught.value.body == REQUEST.to_body()
    assert len(slow_server.requests) == 1  # retries left, but a generate that left is not re-sent


@pytest.mark.parametrize("flavour", list(CLIENTS))
def test_a_status_past_its_deadline_is_a_timeout_retried_as_any(
    flavour: str, slow_server: RawServer
) -> None:
    with pytest.raises(KvidTimeoutError, match="call_deadline"):
        CLIENTS[flavour](
            slow_server, lambda client: client.status("text-to-video", "req_1"), max_retries=1
        )
    assert len(slow_server.requests) == 2  # each attempt has its own deadline


def test_a_submission_past_the_deadline_leaves_its_claim_uncertain_not_submitting(
    database_url: str, tmp_path: Path
) -> None:
    rows = table_rows(write_table(tmp_path / "prompts.csv", ["slow"]))
    ledger = Ledger.for_data_dir(tmp_path / "data", database_url)
    ledger.register(rows)
    with RawServer(trickling_head) as server:
        [outcome] = submit(
            server.url, ledger, rows, timeout=READ_TIMEOUT_S, call_deadline=DEADLINE_S
        )
        assert len(server.requests) == 1
    assert (outcome.action, outcome.status) == (SubmitAction.UNCERTAIN, VideoStatus.UNCERTAIN)
    assert "call_deadline" in outcome.message
    row = ledger.row("slow")
    assert row is not None and row.status is VideoStatus.UNCERTAIN


def test_the_resource_hands_its_deadline_to_the_client() -> None:
    assert KvidResource(api_key=TEST_API_KEY).call_deadline_seconds == DEFAULT_CALL_DEADLINE_S
    with RawServer(trickling_head) as server:
        resource = KvidResource(
            api_key=TEST_API_KEY, base_url=server.url, call_deadline_seconds=DEADLINE_S
        )
        with resource.get_client() as client, pytest.raises(KvidUncertainSubmissionError):
            client.generate(REQUEST)


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "120"])
def test_the_deadline_must_be_a_positive_number(value: Any) -> None:
    with pytest.raises(KvidValidationError, match="call_deadline"):
        KvidClient(TEST_API_KEY, call_deadline=value)
