"""The vendor's own loop, as its documentation page writes it: ``requests``, one job at a time.

``POST .../generate``; ``GET .../status`` then ``time.sleep(5)`` until ``COMPLETED``; ``GET
.../result``; and the download a user then needs (the page stops at the URL). No session, no
concurrency, exactly like the page. Measured on a few jobs and reported as throughput, so the
comparison with a 200-job backfill does not have to wait 200 x 5 s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import requests

from bench.common import API_KEY, RESOLUTION, Emulator, phase_args, scratch, write_result

VENDOR_POLL_S = 5.0  # "time.sleep(5) # 5초 대기" on the vendor page


def vendor_job(
    base_url: str, prompt: str, dest: Path, poll_s: float = VENDOR_POLL_S
) -> dict[str, Any]:
    """One job the vendor's way; returns its timings."""
    t0 = time.monotonic()
    url = f"{base_url}/ai/video/text-to-video/generate"
    payload = json.dumps(
        {
            "prompt": prompt,
            "negative_prompt": "",
            "num_frames": 81,
            "frames_per_second": 16,
            "seed": None,
            "resolution": RESOLUTION,
            "aspect_ratio": "16:9",
            "num_inference_steps": 30,
            "enable_safety_checker": True,
            "enable_prompt_expansion": True,
        }
    )
    headers = {"api-key": API_KEY, "Content-Type": "application/json"}
    response = requests.request("POST", url, headers=headers, data=payload, timeout=60)
    request_id = response.json()["data"]["request_id"]
    status_url = f"{base_url}/ai/video/text-to-video/status?request_id={request_id}"
    polls = 0
    while True:
        result = requests.get(status_url, headers={"api-key": API_KEY}, timeout=60).json()
        polls += 1
        status = result["data"]["status"]
        if status == "COMPLETED":
            break
        if status == "FAILED":
            raise RuntimeError(f"vendor loop: job {request_id} failed")
        time.sleep(poll_s)
    result_url = f"{base_url}/ai/video/text-to-video/result?request_id={request_id}"
    result = requests.get(result_url, headers={"api-key": API_KEY}, timeout=60).json()
    video = requests.get(result["data"]["url"], timeout=60)
    dest.write_bytes(video.content)
    return {"seconds": time.monotonic() - t0, "status_polls": polls, "bytes": len(video.content)}


def main() -> int:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--jobs", type=int, default=None, help="jobs (default 3; quick 1)")
        parser.add_argument("--job-duration", type=float, default=2.0)
        parser.add_argument("--workers", type=int, default=16)

    args = phase_args(__doc__.splitlines()[0], add)
    jobs = args.jobs or (1 if args.quick else 3)
    with (
        scratch(args.workdir, "kvid-bench-vendor-") as tmp,
        Emulator(
            workers=args.workers, job_duration=args.job_duration, output_dir=tmp / "emulator"
        ) as emulator,
    ):
        t0 = time.monotonic()
        runs = [
            vendor_job(
                emulator.base_url, f"A calm lake at dawn, vendor loop {i}", tmp / f"v{i}.mp4"
            )
            for i in range(jobs)
        ]
        elapsed = time.monotonic() - t0
    write_result(
        args.out,
        {
            "jobs": jobs,
            "job_duration_s": args.job_duration,
            "poll_interval_s": VENDOR_POLL_S,
            "elapsed_s": elapsed,
            "per_job_s": [r["seconds"] for r in runs],
            "throughput_jobs_per_s": jobs / elapsed,
            "status_polls": sum(r["status_polls"] for r in runs),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
