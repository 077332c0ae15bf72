"""The render cache: renders run in a thread pool from the moment a job is created; with
``reuse_renders`` one render per geometry (and breakage) is shared by every job that asks for it,
and a shared render that failed is forgotten, so it fails only the jobs that were waiting on it."""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from kvid_dagster.emulator import render
from kvid_dagster.emulator.config import EmulatorConfig
from kvid_dagster.emulator.jobs import Job, JobQueue

logger = logging.getLogger("kvid_dagster.emulator")

_SharedKey = tuple[int, int, int, int, str, str]


def _shared_key(
    geometry: render.Geometry, kind: str, defects: frozenset[render.Defect]
) -> _SharedKey:
    """What a reused render is of: a broken video is shared only with the same breakage."""
    broken = "+".join(sorted(defects))
    return (geometry.width, geometry.height, geometry.fps, geometry.frames, kind, broken)


def _shared_name(key: _SharedKey) -> str:
    width, height, fps, frames, kind, broken = key
    return f"shared-{width}x{height}-{fps}fps-{frames}f-{kind}{'-' + broken if broken else ''}.mp4"


class RenderCache:
    """Renders jobs' videos into ``output_dir``; with ``reuse_renders``, one per geometry."""

    def __init__(self, config: EmulatorConfig, queue: JobQueue, stopping: threading.Event) -> None:
        self.config = config
        self._queue = queue
        self._stopping = stopping  # set: renders stop mid-file, waiters give up
        self._lock = threading.Lock()
        self._shared: dict[_SharedKey, Future[Path]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._http: httpx.Client | None = None
        self._output_dir: Path | None = None

    def start(self, output_dir: Path) -> None:
        """Open the pool and the image fetcher; videos go to ``output_dir``."""
        self._output_dir = output_dir
        self._pool = ThreadPoolExecutor(
            self.config.render_threads, thread_name_prefix="kvid-render"
        )
        self._http = httpx.Client(follow_redirects=True)

    def close(self) -> None:
        """Abort image fetches, then cancel queued renders and wait for the running ones."""
        if self._http is not None:
            self._http.close()  # first: aborts image fetches that renders are waiting on
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def output_dir(self) -> Path:
        """Where the videos are written (set by ``start``)."""
        assert self._output_dir is not None
        return self._output_dir

    def submit(self, job: Job, plan: render.RenderPlan, seed: int) -> Future[Path]:
        """Start (or join) the render of ``job``'s video: its future is ``job.video``."""
        assert self._pool is not None
        if self.config.reuse_renders and plan.aspect_ratio != "auto":
            # the geometry is known now: one task per geometry, its future shared by every job
            key = _shared_key(plan.geometry(), job.kind, plan.defects)
            with self._lock:
                shared = self._shared.get(key)
                if shared is None:
                    shared = self._pool.submit(self._render_job, job, plan, seed, key)
                    self._shared[key] = shared
                    shared.add_done_callback(functools.partial(self._forget_failed, key))
            return shared
        return self._pool.submit(self._render_job, job, plan, seed, None)

    def _forget_failed(self, key: _SharedKey, future: Future[Path]) -> None:
        """A failed shared render (say, a bad input image) must not fail every later job."""
        if future.cancelled() or future.exception() is not None:
            with self._lock:
                if self._shared.get(key) is future:
                    del self._shared[key]

    def _render_job(
        self,
        job: Job,
        plan: render.RenderPlan,
        seed: int,
        shared_key: _SharedKey | None,
    ) -> Path:
        """Fetch/decode the inputs, then render (or reuse) the job's video. Runs in the pool.

        ``shared_key``: this task IS the shared render for that geometry (reuse_renders).
        """
        try:
            image = end_image = None
            if plan.image_bytes is not None:
                image = render.decode_image(plan.image_bytes)
            elif plan.image_url is not None:
                image = render.decode_image(self._fetch(plan.image_url))
            if plan.end_image_url is not None:
                end_image = render.decode_image(self._fetch(plan.end_image_url))
            size = (image.shape[1], image.shape[0]) if image is not None else None
            geometry = plan.geometry(size)
            if shared_key is not None:
                path = self.output_dir / _shared_name(shared_key)
            elif self.config.reuse_renders:
                return self._shared_render(job, plan, geometry, image, end_image, seed)
            else:
                path = self.output_dir / f"{job.request_id}.mp4"
            self._encode(path, plan, geometry, image, end_image, seed)
            return path
        except render.RenderCancelled:
            raise
        except render.ImageError as exc:
            self.fail(job, f"Input image error: {exc}")
            raise
        except Exception as exc:
            logger.exception("render of %s failed", job.request_id)
            self.fail(job, f"Rendering failed: {type(exc).__name__}: {exc}")
            raise

    def fail(self, job: Job, reason: str) -> None:
        """Fail ``job`` for its render, unless it was forgotten (``forget_jobs``) meanwhile."""
        if self._queue.get(job.request_id) is job:
            self._queue.fail(job, reason, force=True)

    def _shared_render(
        self,
        job: Job,
        plan: render.RenderPlan,
        geometry: render.Geometry,
        image: np.ndarray | None,
        end_image: np.ndarray | None,
        seed: int,
    ) -> Path:
        """Reuse the render of this geometry, or be the one that makes it (geometry from 'auto')."""
        key = _shared_key(geometry, job.kind, plan.defects)
        with self._lock:
            shared = self._shared.get(key)
            owner = shared is None
            if shared is None:
                shared = Future()
                self._shared[key] = shared
        if not owner:  # another pool task renders it (or has); it is running, so no deadlock
            while True:
                try:
                    return shared.result(timeout=0.2)
                except FutureTimeout:
                    if self._stopping.is_set():
                        raise render.RenderCancelled from None
        path = self.output_dir / _shared_name(key)
        try:
            self._encode(path, plan, geometry, image, end_image, seed)
        except BaseException as exc:
            shared.set_exception(exc)
            with self._lock:
                self._shared.pop(key, None)
            raise
        shared.set_result(path)
        return path

    def _encode(
        self,
        path: Path,
        plan: render.RenderPlan,
        geometry: render.Geometry,
        image: np.ndarray | None,
        end_image: np.ndarray | None,
        seed: int,
    ) -> None:
        frames: Any
        if image is None:
            frames = render.text_frames(geometry, plan.prompt, seed, camera_fixed=plan.camera_fixed)
        else:
            frames = render.image_frames(
                geometry,
                image,
                end_image=end_image,
                seed=seed,
                prompt=plan.prompt,
                camera_fixed=plan.camera_fixed,
            )
        render.encode(path, geometry, render.with_defects(frames, plan.defects), self._stopping)

    def _fetch(self, url: str) -> bytes:
        assert self._http is not None
        return render.fetch_image(
            self._http,
            url,
            timeout=self.config.image_timeout,
            max_bytes=self.config.max_image_bytes,
        )
