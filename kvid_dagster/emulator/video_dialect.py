"""The seed page's "video" dialect: its generate, status and result answers (``request_id``,
uppercase states, 422/409, sizes in kilobytes) with the rough edges a real server adds."""

from __future__ import annotations

import math
import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from kvid_dagster.emulator import render
from kvid_dagster.emulator.jobs import EmulatedJobState, Job, stamp
from kvid_dagster.emulator.responses import Response, envelope, error
from kvid_dagster.emulator.routing import parse_json
from kvid_dagster.emulator.validation import EmulatedDialect, RequestInvalid, validate_body


class VideoResponder:
    """KvidEmulator's answers in the video dialect (a mixin: the state is the emulator's)."""

    def _generate(self, kind: str, raw: bytes) -> tuple[Response, bool]:
        body, problem = parse_json(raw)
        if problem is not None:
            return error(422, problem), False
        try:
            request = validate_body(kind, body, max_image_bytes=self.config.max_image_bytes)
        except RequestInvalid as exc:
            return error(422, str(exc)), False
        params = request.params
        fps, frames = render.timing(request.model, params)
        plan = render.RenderPlan(
            prompt=params["prompt"],
            resolution=params["resolution"],
            aspect_ratio=params["aspect_ratio"],
            fps=fps,
            frames=frames,
            camera_fixed=bool(params.get("camera_fixed")),
            image_bytes=request.image_bytes,
            image_url=params.get("image_url"),
            end_image_url=params.get("end_image_url"),
        )
        job = self._create(
            dialect=EmulatedDialect.VIDEO,
            kind=kind,
            model=request.model,
            body=body,
            params=params,
            plan=plan,
            seed=params["seed"],
        )
        data = {"request_id": job.request_id}
        return envelope(200, True, data, "Video generation request submitted successfully"), True

    def _status_response(self, job: Job, key: str) -> Response:
        status = self._queue.status(job)
        progress: float | None = status.progress
        if status.state is EmulatedJobState.IN_QUEUE and self._edges.null_progress:
            progress = None
        elif status.state is EmulatedJobState.PROCESSING and self._edges.fractional_progress:
            progress = round(status.exact_progress, 1)
        logs, message = list(status.logs), status.message
        if status.state is EmulatedJobState.FAILED:
            echo = self._failure_echo(job, key)
            message += echo
            logs[-1] += echo
        if self.config.echo_api_key:
            logs.insert(0, f"{stamp(time.time())} - Request authenticated with api-key {key}")
        data: dict[str, Any] = {"status": status.state.value, "progress": progress, "logs": logs}
        if self._faults.omit_progress():
            del data["progress"]
        return envelope(200, True, data, message)

    def _result(self, job: Job, key: str) -> Response:
        status = self._queue.status(job)
        if status.state is EmulatedJobState.FAILED:
            reason = f"{job.fail_reason}{self._failure_echo(job, key)}"
            return error(409, f"{job.request_id} FAILED: {reason}; no video to return")
        if status.state is not EmulatedJobState.COMPLETED:
            return error(
                409,
                f"{job.request_id} is not COMPLETED yet (status {status.state.value}, "
                f"progress {status.progress}); poll status until COMPLETED",
            )
        if job.video is None:
            return error(503, "Video not available yet", Retry_After="1")
        try:
            path = job.video.result(timeout=self.config.result_wait)
        except FutureTimeout:
            return error(503, "Video is still being encoded; retry shortly", Retry_After="1")
        except CancelledError:
            return error(503, "Service is shutting down", Retry_After="1")
        except Exception as exc:
            # a shared render that failed: this job fails with it (status agrees from now on)
            self._renders.fail(job, f"Rendering failed: {type(exc).__name__}: {exc}")
            reason = f"{job.fail_reason or 'rendering failed'}{self._failure_echo(job, key)}"
            return error(409, f"{job.request_id} FAILED: {reason}; no video to return")
        name = self._publish(job, path)
        size = path.stat().st_size
        data = {"url": self._file_url(name), "name": name, "size": math.ceil(size / 1024)}
        return envelope(200, True, data, "Video result retrieved successfully")
