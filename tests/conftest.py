"""Shared fixtures: real kvid emulators on loopback, a tiny server for the sample images,
fresh databases (SQLite, PostgreSQL) for the job ledger, an S3 API (moto) on loopback with a
bucket per test, and a real ``dagster-daemon`` on given definitions."""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from moto.server import ThreadedMotoServer

from kvid_dagster.emulator import EmulatorConfig, KvidEmulator
from kvid_dagster.media.storage import STORAGE_URL_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGES_DIR = REPO_ROOT / "data" / "images"
TEST_API_KEY = "test-key"
DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def fast_config(**overrides: Any) -> EmulatorConfig:
    """A quick emulator: 0.3 s jobs, 8 workers, the test api-key."""
    settings: dict[str, Any] = {"api_key": TEST_API_KEY, "workers": 8, "job_duration": 0.3}
    settings.update(overrides)
    return EmulatorConfig(**settings)


EmulatorFactory = Callable[..., KvidEmulator]

REALISTIC_MARK = "realistic_emulator"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{REALISTIC_MARK}: the test's emulators default to realistic mode (real servers' rough "
        "edges, see EmulatorConfig.realistic); a test turns one edge off by passing that field",
    )


@pytest.fixture
def emulator_factory(request: pytest.FixtureRequest) -> Iterator[EmulatorFactory]:
    """``make(config=None, **kw)``: a started emulator (``fast_config()`` unless a config is
    given; ``kw`` overrides config fields or sets host/port/output_dir). All stop at teardown.
    Under the ``realistic_emulator`` mark (the fault-test files) ``fast_config`` is realistic:
    the fault tests face real servers' rough edges, at the same fast job timing."""
    made: list[KvidEmulator] = []
    realistic = request.node.get_closest_marker(REALISTIC_MARK) is not None

    def make(config: EmulatorConfig | None = None, **kwargs: Any) -> KvidEmulator:
        emulator = KvidEmulator(config or fast_config(realistic=realistic), **kwargs)
        made.append(emulator)
        return emulator.start()

    yield make
    for emulator in made:
        emulator.stop()


@pytest.fixture
def emulator(emulator_factory: EmulatorFactory) -> KvidEmulator:
    """A started emulator with ``fast_config()`` (api-key ``TEST_API_KEY``)."""
    return emulator_factory()


@pytest.fixture
def api_key() -> str:
    return TEST_API_KEY


class _ImageHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else ~40 ms per keep-alive request

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def image_server() -> Iterator[str]:
    """Base URL of an HTTP server for ``data/images/`` (e.g. ``f"{image_server}/tiger.jpg"``)."""
    handler = functools.partial(_ImageHandler, directory=str(IMAGES_DIR))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """SQLAlchemy URL of a new, empty PostgreSQL database, dropped on exit: tests never see each
    other's tables. The server is ``KVID_TEST_DATABASE_URL`` (an admin URL); unreachable, it
    fails the test under CI (``CI`` set), where PostgreSQL must be tested, and skips it
    elsewhere."""
    admin_url = sa.make_url(os.environ.get("KVID_TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL))
    admin_url = admin_url.set(drivername="postgresql+psycopg")  # the driver we ship with
    name = f"kvid_test_{secrets.token_hex(6)}"
    admin = sa.create_engine(
        admin_url,
        isolation_level="AUTOCOMMIT",  # CREATE/DROP DATABASE cannot run in a transaction
        poolclass=sa.NullPool,
        connect_args={"connect_timeout": 5},
    )
    try:
        try:
            with admin.connect() as connection:
                connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        except sa.exc.OperationalError as error:
            message = (
                f"PostgreSQL unreachable at {admin_url.render_as_string(hide_password=True)}"
                f" ({error.orig}); start it with `pg_ctlcluster --skip-systemctl-redirect"
                " $(ls /etc/postgresql) main start` or set KVID_TEST_DATABASE_URL"
            )
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        try:
            yield admin_url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:  # FORCE: a leaked connection must not keep it
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database per test, see ``fresh_postgres_database``."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test against both ledger backends: SQLite (the default) in ``tmp_path``, and a
    fresh PostgreSQL database (production). ``postgres_url`` is requested only for the
    PostgreSQL case, so ``-k sqlite`` runs need no server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kvid.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, for the whole session."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """boto3's client of the emulated S3, with the environment every S3 user reads pointed at
    it (dummy credentials, no config files of the machine's own)."""
    import boto3
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv(STORAGE_URL_ENV, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance keeps an earlier endpoint
    return boto3.client("s3")


@pytest.fixture
def bucket(s3: Any) -> str:
    """A fresh bucket of the emulated S3 (its name)."""
    name = f"kvid-{secrets.token_hex(4)}"
    s3.create_bucket(Bucket=name)
    return name


DAEMON_WORKSPACE = """\
load_from:
  - python_file:
      relative_path: daemon_definitions.py
      working_directory: .
      location_name: kvid_daemon_test
"""


@pytest.fixture
def dagster_daemon(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``start(home, definitions, prompts=, data_dir=, base_url=, database_url=None)``:
    ``dagster-daemon run`` on the module source ``definitions`` (its ``defs``, which reads the
    table, data dir, service and ledger from ``KVID_PROMPTS``, ``KVID_DATA_DIR``,
    ``KVID_BASE_URL``, ``KVID_API_KEY`` and ``KVID_DATABASE_URL``), in its own session; stopped
    with SIGTERM (SIGKILL to its process group after 60 s). Its output is
    ``daemon_log(tmp_path)``."""
    started: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as logs:

        def start(
            home: Path,
            definitions: str,
            *,
            prompts: Path,
            data_dir: Path,
            base_url: str,
            database_url: str | None = None,
        ) -> subprocess.Popen[bytes]:
            folder = tmp_path / "daemon"
            folder.mkdir()
            (folder / "daemon_definitions.py").write_text(definitions)
            (folder / "workspace.yaml").write_text(DAEMON_WORKSPACE)
            daemon = Path(sys.executable).with_name("dagster-daemon")
            base = {k: v for k, v in os.environ.items() if not k.startswith(("KVID_", "DAGSTER_"))}
            kvid = {
                "KVID_PROMPTS": str(prompts),
                "KVID_DATA_DIR": str(data_dir),
                "KVID_BASE_URL": base_url,
                "KVID_API_KEY": TEST_API_KEY,
                **({"KVID_DATABASE_URL": database_url} if database_url else {}),
            }
            process = subprocess.Popen(
                [str(daemon), "run", "-w", "workspace.yaml"],
                cwd=folder,
                env={**base, **kvid, "DAGSTER_HOME": str(home)},
                stdout=logs.enter_context((tmp_path / "daemon.log").open("wb")),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            started.append(process)
            return process

        yield start
        for process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):  # its code server, if it outlived it
                os.killpg(process.pid, signal.SIGKILL)


def daemon_log(tmp_path: Path) -> str:
    return (tmp_path / "daemon.log").read_text(errors="replace")[-4000:]
