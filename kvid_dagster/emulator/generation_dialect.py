"""The current page's "generation" dialect: its generate-async, status and result answers
(``jobId``, lowercase states, coded 400s) and its money: the credit balance (402) and the
concurrency limit (429 CONCURRENT_LIMIT), checked with the job's creation as one step."""

from __future__ import annotations

import math

from kvid_dagster.emulator import render
from kvid_dagster.emulator.generation import (
    DOCUMENTED,
    STATUS_WORDS,
    ErrorCode,
    GenerationInvalid,
    iso_time,
    undocumented_fields,
    validate_generation,
)
from kvid_dagster.emulator.jobs import TERMINAL, EmulatedJobState, Job
from kvid_dagster.emulator.responses import Response, coded, envelope
from kvid_dagster.emulator.routing import NO_BODY, parse_json
from kvid_dagster.emulator.validation import EmulatedDialect


class GenerationResponder:
    """KvidEmulator's answers in the generation dialect (a mixin: the state is the emulator's)."""

    def _generate_generation(self, kind: str, raw: bytes) -> tuple[Response, bool]:
        body, problem = parse_json(raw)
        if problem is not None:
            missing = problem == NO_BODY
            code = ErrorCode.MISSING_PARAMETERS if missing else ErrorCode.INVALID_PARAMETERS
            return coded(400, code, problem), False
        if isinstance(body, dict) and (undocumented := undocumented_fields(kind, body)):
            self._count("undocumented_field", len(undocumented))
        try:
            request = validate_generation(
                kind,
                body,
                models=self.config.generation_models,
                strict=self.config.strict_fields,
                max_image_bytes=self.config.max_image_bytes,
            )
        except GenerationInvalid as exc:
            return coded(400, exc.code, str(exc)), False
        price = request.price(self.config.generation_prices)
        plan = render.RenderPlan(
            prompt=request.prompt,
            resolution=request.resolution,
            aspect_ratio=request.aspect_ratio,
            fps=request.fps,
            frames=request.frames,
            image_bytes=request.image_bytes,
            image_url=request.source_url,
        )
        with self._admission:
            refusal = self._refusal(price)
            if refusal is not None:
                return refusal, False
            job = self._create(
                dialect=EmulatedDialect.GENERATION,
                kind=kind,
                model=request.model,
                body=body,
                params={k: v for k, v in body.items() if k in DOCUMENTED[kind]},
                plan=plan,
                seed=request.seed,
                price=price,
            )
            if self._balance is not None:
                self._balance -= price
        data = {
            "job_id": job.request_id,
            "status": STATUS_WORDS[EmulatedJobState.IN_QUEUE],
            "message": "Video generation job queued.",
            "estimated_time": f"{max(1, math.ceil(job.duration))}s",
            "video_type": kind,
        }
        return envelope(200, True, data, "Video generation job queued."), True

    def _refusal(self, price: int) -> Response | None:
        """402 if the balance cannot pay ``price``, 429 at the concurrency limit; None: admit.
        Called under ``_admission``: nothing is created either way."""
        if self._balance is not None and self._balance < price:
            self._count("insufficient_credit")
            message = f"Insufficient credit: the job costs {price} credits, {self._balance:g} left"
            return coded(402, ErrorCode.INSUFFICIENT_CREDIT, message)
        limit = self.config.concurrent_limit
        if limit is not None and self._running_generation_jobs() >= limit:
            self._count("concurrent_limit")
            message = (
                f"Too many concurrent jobs: {limit} queued or processing; "
                "submit again when one finishes"
            )
            return coded(429, ErrorCode.CONCURRENT_LIMIT, message)
        return None

    def _running_generation_jobs(self) -> int:
        return sum(
            1
            for job in self._queue.all()
            if job.dialect is EmulatedDialect.GENERATION and self._status(job).state not in TERMINAL
        )

    def _generation_status_response(self, job: Job, key: str) -> Response:
        status = self._status(job)
        url = error = None
        if status.state is EmulatedJobState.COMPLETED:
            assert job.video is not None  # done: _status says so
            url = self._file_url(self._publish(job, job.video.result()))
        elif status.state is EmulatedJobState.FAILED:
            error = f"{job.fail_reason}{self._failure_echo(job, key)}"
        data = {
            "job_id": job.request_id,
            "status": STATUS_WORDS[status.state],
            "prompt": job.params["prompt"],
            "result_url": url,
            "error_message": error,
            "video_type": job.kind,
            "created_at": iso_time(job.created_wall),
        }
        return envelope(200, True, data, "Job status retrieved successfully")

    def _generation_result(self, job: Job, key: str) -> Response:
        status = self._status(job)
        word = STATUS_WORDS[status.state]
        if status.state is EmulatedJobState.FAILED:
            reason = f"{job.fail_reason}{self._failure_echo(job, key)}"
            message = f"job {job.request_id} failed: {reason}; see error_message in its status"
            return coded(400, ErrorCode.JOB_FAILED, message)
        if status.state is not EmulatedJobState.COMPLETED:
            message = f"job {job.request_id} is {word}, not completed"
            if status.state not in TERMINAL:
                message += "; poll status until completed"
            return coded(400, ErrorCode.JOB_NOT_COMPLETED, message)
        assert job.video is not None  # done: _status says so
        path = job.video.result()
        name = self._publish(job, path)
        width, height = render.video_size(path)
        size = path.stat().st_size
        data = {
            "job_id": job.request_id,
            "status": word,
            "result_url": self._file_url(name),
            "width": width,
            "height": height,
            "size": size,  # bytes, not the video dialect's kilobytes
            "file_size": size,
            "type": job.kind,
            "used_credit": job.price,
            "created_at": iso_time(job.created_wall),
            "prompt": job.params["prompt"],
        }
        return envelope(200, True, data, "Video result retrieved successfully")
