"""Read what a video file really is (size, fps, frames, duration) with PyAV."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av


@dataclass(frozen=True)
class VideoProbe:
    width: int
    height: int
    fps: float
    num_frames: int
    duration_s: float
    codec: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_video(path: str | Path) -> VideoProbe:
    """Probe the first video stream; frames are counted by demuxing packets (cheap, exact)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(0)
        frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif rate:
            duration = frames / float(rate)
        else:
            duration = float(container.duration or 0) / av.time_base
        return VideoProbe(
            width=int(stream.codec_context.width),
            height=int(stream.codec_context.height),
            fps=round(float(rate), 3),
            num_frames=int(frames),
            duration_s=round(duration, 3),
            codec=str(stream.codec_context.name),
        )
