"""Shared fixtures: real kvid emulators on loopback, and a tiny server for the sample images."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kvid_dagster.emulator import EmulatorConfig, KvidEmulator

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGES_DIR = REPO_ROOT / "data" / "images"
TEST_API_KEY = "test-key"


def fast_config(**overrides: Any) -> EmulatorConfig:
    """A quick emulator: 0.3 s jobs, 8 workers, the test api-key."""
    settings: dict[str, Any] = {"api_key": TEST_API_KEY, "workers": 8, "job_duration": 0.3}
    settings.update(overrides)
    return EmulatorConfig(**settings)


EmulatorFactory = Callable[..., KvidEmulator]


@pytest.fixture
def emulator_factory() -> Iterator[EmulatorFactory]:
    """``make(config=None, **kw)``: a started emulator (``fast_config()`` unless a config is
    given; ``kw`` overrides config fields or sets host/port/output_dir). All stop at teardown."""
    made: list[KvidEmulator] = []

    def make(config: EmulatorConfig | None = None, **kwargs: Any) -> KvidEmulator:
        emulator = KvidEmulator(config or fast_config(), **kwargs)
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
