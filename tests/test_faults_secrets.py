"""The API key never leaves the client: not in logs, metadata, the ledger, the catalog,
exception texts, the Dagster event log or any file under DAGSTER_HOME, even when the server
echoes it back."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import traceback
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from conftest import EmulatorFactory
from faultkit import (
    dagster_home,
    make_defs,
    mp4_video,
    open_instance,
    run_prompts,
    run_submit,
    statuses,
    tick_until_settled,
    write_table,
)

from kvid_dagster import cli
from kvid_dagster.client import (
    AsyncKvidClient,
    JobKind,
    KvidClient,
    KvidError,
    KvidJobFailedError,
    KvidNotFoundError,
    KvidNotReadyError,
    TextToVideoV1,
)
from kvid_dagster.core.project import KvidProject
from kvid_dagster.definitions import CATALOG_JOB
from kvid_dagster.ledger import VideoStatus
from kvid_dagster.resources import KvidResource

# real servers' rough edges in every emulator here (see conftest.REALISTIC_MARK)
pytestmark = pytest.mark.realistic_emulator

SECRET = "kvid-SECRET-7f3a9c1e-do-not-log"
ECHO_HEADER = "X-Echo-Api-Key"
T2V = JobKind.TEXT_TO_VIDEO


def files_containing(folder: Path, needle: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def small_video() -> bytes:
    """A real H.264 clip shaped as the test table's rows ask (480p 16:9, 81 frames at 16 fps),
    so that the pipeline's checks accept it."""
    return mp4_video(854, 480, 81)


class EchoServer:
    """A careless kvid service on 127.0.0.1 that quotes back the api-key it is sent: in a
    response header of every answer, in every envelope message, in status logs, in a FAILED
    job's reason, in the result's URL and name, and in error pages (404, 409, a non-JSON 503).

    Every job's first status is a 503; then it is ``IN_QUEUE`` without progress, and
    ``PROCESSING`` with progress null, 12.5 and "12", before it ends COMPLETED at 100 (FAILED
    with progress null when its prompt says "doomed").
    """

    STEPS: tuple[dict[str, Any], ...] = (
        {"status": "IN_QUEUE"},
        {"status": "PROCESSING", "progress": None},
        {"status": "PROCESSING", "progress": 12.5},
        {"status": "PROCESSING", "progress": "12"},
    )

    def __init__(self) -> None:
        self.video = small_video()
        self.jobs: dict[str, dict[str, Any]] = {}
        self.keys_seen: list[str | None] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.answer(self)

            do_POST = do_GET

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_port}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        key = handler.headers.get("api-key")
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            self.keys_seen.append(key)
            status, content, kind = self._route(handler.command, handler.path, body, key or "")
        handler.send_response(status)
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(content)))
        handler.send_header(ECHO_HEADER, key or "-")
        handler.end_headers()
        handler.wfile.write(content)

    @staticmethod
    def _envelope(status: int, data: Any, message: str) -> tuple[int, bytes, str]:
        payload = {"success": status == 200, "data": data, "message": message}
        return status, json.dumps(payload).encode(), "application/json"

    def _route(self, method: str, target: str, body: bytes, key: str) -> tuple[int, bytes, str]:
        url = urlsplit(target)
        if url.path.startswith("/files/"):
            return 200, self.video, "video/mp4"
        request_id = parse_qs(url.query).get("request_id", [""])[0]
        job = self.jobs.get(request_id)
        if method == "POST" and url.path.endswith("/generate"):
            request_id = f"req_echo_{len(self.jobs) + 1}"
            doomed = "doomed" in json.loads(body).get("prompt", "")
            self.jobs[request_id] = {"doomed": doomed, "polls": 0}
            data = {"request_id": request_id}
            return self._envelope(200, data, f"accepted for api-key {key}")
        if job is None:
            return self._envelope(404, None, f"no job {request_id!r} for api-key {key}")
        finished = job["polls"] > len(self.STEPS)
        if url.path.endswith("/status"):
            job["polls"] += 1
            if job["polls"] == 1:
                return 503, f"<h1>upstream hiccup serving {key}</h1>".encode(), "text/html"
            logs = [f"worker {i} authenticated as {key}" for i in range(job["polls"])]
            if job["polls"] - 2 < len(self.STEPS):
                data = {**self.STEPS[job["polls"] - 2], "logs": logs}
                return self._envelope(200, data, f"working for {key}")
            if job["doomed"]:
                data = {"status": "FAILED", "progress": None, "logs": [*logs, f"rejected {key}"]}
                return self._envelope(200, data, f"quota exhausted for api-key {key}")
            data = {"status": "COMPLETED", "progress": 100, "logs": logs}
            return self._envelope(200, data, f"done for {key}")
        if job["doomed"] or not finished:
            return self._envelope(409, None, f"{request_id} is not ready for {key}")
        data = {
            "url": f"{self.url}/files/{request_id}.mp4?token={key}",
            "name": f"{request_id}-{key}.mp4",
            "size": 1 + len(self.video) // 1024,
        }
        return self._envelope(200, data, f"here you are, {key}")

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def debug_everything(caplog: pytest.LogCaptureFixture) -> None:
    """Every logger at DEBUG into caplog, the HTTP libraries' explicitly (whatever set them)."""
    for name in (None, "httpx", "httpcore", "httpcore.http11", "httpcore.connection"):
        caplog.set_level(logging.DEBUG, logger=name)


def assert_logs_clean(caplog: pytest.LogCaptureFixture, secret: str) -> None:
    messages = [r.getMessage() for r in caplog.records]
    # the echoed header really was logged (by httpcore, at DEBUG), scrubbed
    assert any(ECHO_HEADER in m and "***" in m for m in messages)
    assert any(r.name == "httpx" for r in caplog.records)
    for record in caplog.records:
        assert secret not in record.getMessage() and secret not in repr(record.args)
    assert secret not in caplog.text


def error_texts(error: BaseException) -> list[str]:
    return [
        str(error),
        repr(error),
        *traceback.format_exception(error),
        *(repr(value) for value in vars(error).values()),
    ]


def test_a_full_run_with_faults_never_shows_the_api_key(
    emulator_factory: EmulatorFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    emulator = emulator_factory(api_key=SECRET)
    keys = ["echoed", "fine", "bad", "throttled"]
    prompts = write_table(
        tmp_path / "prompts.csv",
        keys,
        lambda k: f"A doomed shot {k} [[kvid:fail]]" if k == "bad" else f"A calm lake {k}",
    )
    project = KvidProject(prompts, tmp_path / "data")
    home = dagster_home(tmp_path / "home")
    # the key as a plain string, the worst case (EnvVar would keep it out of the config too)
    defs = make_defs(emulator.base_url, prompts, project.data_dir, api_key=SECRET)
    # targeted by prompt, not by arrival order: concurrent generates race for the first fault
    emulator.add_fault("generate", "echo_key", match="echoed")  # UNCERTAIN, the key echoed
    emulator.add_fault("generate", 429, times=2, match="throttled")
    emulator.add_fault("status", "echo_key", times=3)
    emulator.add_fault("result", 500, times=1)
    with open_instance(home) as instance:
        assert run_prompts(defs, instance)
        assert not run_submit(defs, instance, "echoed", "throttled")  # fails: one UNCERTAIN
        tick_until_settled(defs, instance, project.ledger())
        result = defs.resolve_job_def(CATALOG_JOB).execute_in_process(instance=instance)
        assert result.success
        texts = [str(e.message or "") + repr(e.event_specific_data) for e in result.all_events]
    assert statuses(project.ledger()) == {
        "echoed": "UNCERTAIN", "fine": "COMPLETED", "bad": "FAILED", "throttled": "COMPLETED",
    }  # fmt: skip
    assert emulator.pending_faults() == []
    assert emulator.stats[("status", 500)] == 3  # the echoing server really was asked

    needle = SECRET.encode()
    echoed = [r.getMessage() for r in caplog.records if "***" in r.getMessage()]
    assert echoed, "the scrubbed echo should show up in the logs"
    assert SECRET not in caplog.text
    captured = capfd.readouterr()
    assert SECRET not in captured.out and SECRET not in captured.err
    assert all(SECRET not in text for text in texts)
    ledger = project.ledger()
    [uncertain] = ledger.submissions([VideoStatus.UNCERTAIN])
    assert uncertain.error is not None and "***" in uncertain.error  # the echo, scrubbed
    ledger.close()
    written = {p.name for p in project.data_dir.rglob("*") if p.is_file()}
    assert {"kvid.db", "data.parquet"} <= written  # the ledger and the catalogs were searched
    # the ledger (database, WAL, journal), the published catalogs, the videos
    assert files_containing(project.data_dir, needle) == []
    assert files_containing(home, needle) == []  # runs, event logs, compute logs, schedules


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_an_echoing_server_never_gets_the_key_shown(
    echo_server: EchoServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    flavour: str,
) -> None:
    """generate, wait, status, result and download against a server that quotes the key in
    headers, bodies, logs and failure reasons: it shows nowhere, and the texts keep a ``***``."""
    debug_everything(caplog)
    texts: list[str] = []
    seen: list[Any] = []
    options: dict[str, Any] = {"backoff_base": 0.01, "timeout": 5.0}
    with asyncio.Runner() as runner:
        if flavour == "sync":
            client: Any = KvidClient(SECRET, echo_server.url, sleep=lambda _: None, **options)

            def run(outcome: Any) -> Any:
                return outcome

        else:

            async def no_sleep(_: float) -> None:
                pass

            client = AsyncKvidClient(SECRET, echo_server.url, sleep=no_sleep, **options)
            run = runner.run
        request_id = run(client.generate(TextToVideoV1("A calm lake")))
        done = run(client.wait(T2V, request_id, poll_interval=0.01, on_progress=seen.append))
        result = run(client.result(T2V, request_id))
        downloaded = run(client.download(result, tmp_path))
        status = run(client.status(T2V, request_id))
        texts += [repr(client), repr(done), repr(result), repr(downloaded), repr(status)]
        texts += [repr(s) for s in seen]
        doomed = run(client.generate(TextToVideoV1("A doomed shot")))
        failing: list[tuple[type[KvidError], Callable[[], Any]]] = [
            (KvidJobFailedError, lambda: client.wait(T2V, doomed, poll_interval=0.01)),
            (KvidNotReadyError, lambda: client.result(T2V, doomed)),
            (KvidNotFoundError, lambda: client.status(T2V, "req_missing_1")),
        ]
        for kind, call in failing:
            with pytest.raises(kind) as caught:
                run(call())
            assert "***" in str(caught.value)  # the echo was scrubbed, not dropped
            texts += error_texts(caught.value)
        run(client.close())
    assert [s.progress for s in seen] == [None, None, 12.5, 12.0, 100.0]
    assert done.logs[-1] == "worker 5 authenticated as ***" and done.message == "done for ***"
    assert result.url.endswith("token=***") and result.name == f"{request_id}-***.mp4"
    assert downloaded.path.name == result.name and downloaded.size_bytes == len(echo_server.video)
    assert echo_server.keys_seen and set(echo_server.keys_seen) == {SECRET}  # same origin
    assert all(SECRET not in text for text in texts)
    assert_logs_clean(caplog, SECRET)
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err


def test_a_pipeline_against_an_echoing_server_stores_no_key(
    echo_server: EchoServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The echoed key reaches neither the ledger, nor the catalogs, nor Dagster's storage."""
    debug_everything(caplog)
    keys = ["fine", "doomed"]
    prompts = write_table(tmp_path / "prompts.csv", keys, lambda k: f"A {k} shot of a lake")
    project = KvidProject(prompts, tmp_path / "data")
    home = dagster_home(tmp_path / "home")
    defs = make_defs(echo_server.url, prompts, project.data_dir, api_key=SECRET)
    with open_instance(home) as instance:
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "fine", "doomed")
        tick_until_settled(defs, instance, project.ledger())
        result = defs.resolve_job_def(CATALOG_JOB).execute_in_process(instance=instance)
        assert result.success
        texts = [str(e.message or "") + repr(e.event_specific_data) for e in result.all_events]
    ledger = project.ledger()
    assert statuses(ledger) == {"doomed": "FAILED", "fine": "COMPLETED"}
    [failed] = ledger.submissions([VideoStatus.FAILED])
    ledger.close()
    assert failed.error is not None and "quota exhausted for api-key ***" in failed.error
    assert all(SECRET not in text for text in texts)
    assert_logs_clean(caplog, SECRET)
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err
    assert files_containing(project.data_dir, SECRET.encode()) == []
    assert files_containing(home, SECRET.encode()) == []


def test_cli_generate_prints_any_progress_and_never_the_key(
    echo_server: EchoServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``kvid-dagster generate`` used to crash on a null progress, after the job was paid."""
    monkeypatch.setenv("KVID_BASE_URL", echo_server.url)
    monkeypatch.setenv("KVID_API_KEY", SECRET)
    out = tmp_path / "v.mp4"
    argv = ["generate", "--prompt", "A calm lake", "--poll-interval", "0.01", "--out", str(out)]
    assert cli.main(argv) == 0
    fine = capsys.readouterr()
    assert out.read_bytes() == echo_server.video
    lines = [line.rsplit("  ", 1)[0] for line in fine.err.splitlines() if "authenticated" in line]
    assert lines == [
        "IN_QUEUE         -",
        "PROCESSING       -",
        "PROCESSING   12.5%",
        "PROCESSING   12.0%",
        "COMPLETED   100.0%",
    ]
    assert cli.main([*argv[:2], "A doomed lake", *argv[3:]]) == 1
    doomed = capsys.readouterr()
    assert "KvidJobFailedError" in doomed.err and "quota exhausted for api-key ***" in doomed.err
    for text in (fine.out, fine.err, doomed.out, doomed.err):
        assert SECRET not in text


def test_the_resource_and_its_clients_hide_the_key() -> None:
    resource = KvidResource(api_key=SECRET, base_url="https://gw.example.com/kvid")
    with resource.get_client() as client:
        shown = [repr(resource), str(resource), repr(client), str(vars(client))]
    assert all(SECRET not in text for text in shown)
    assert "gw.example.com/kvid" in repr(resource) and "gw.example.com/kvid" in str(resource)
    assert resource.api_key == SECRET  # hidden from reprs, still there for the client


def test_one_log_filter_redacts_every_clients_key_as_sent_and_url_encoded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """However many clients, each logger has the filter once, and it knows all their keys."""
    other = "sk-other/key+with=odd&chars"
    caplog.set_level(logging.DEBUG)
    for key in (SECRET, other, SECRET):
        KvidClient(key, "http://127.0.0.1:9").close()
    for name in ("httpx", "httpcore", "httpcore.http11", "kvid_dagster.client"):
        ours = [f for f in logging.getLogger(name).filters if "kvid_dagster" in type(f).__module__]
        assert len(ours) == 1
    url = httpx.URL(f"http://127.0.0.1:9/files/v.mp4?a={quote(other, safe='')}")
    logging.getLogger("httpx").info("HTTP Request: GET %s %r", url, {"api-key": SECRET})
    logging.getLogger("httpcore.http11").debug(f"headers=[(b'api-key', b'{other}')]")
    try:
        raise RuntimeError(f"the server said {SECRET}")
    except RuntimeError:
        logging.getLogger("kvid_dagster.client").exception("failed")
    assert len(caplog.records) == 3
    assert SECRET not in caplog.text and other not in caplog.text
    assert quote(other, safe="") not in caplog.text
    # each record shows the mask (other tests' keys may add more masks, never fewer)
    assert all("***" in r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert caplog.text.count("***") >= 4
