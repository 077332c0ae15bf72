"""Running the async client's work from Dagster's synchronous asset and sensor functions."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, also where an event loop is already running in this thread (a notebook,
    an in-process daemon iteration): there the coroutine runs on a fresh loop in a worker thread,
    since ``asyncio.run`` refuses to nest."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvid-aio") as pool:
        return pool.submit(asyncio.run, coroutine).result()
