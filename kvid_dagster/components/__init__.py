"""The ``dg`` Component: a project's videos from one ``defs.yaml``."""

from kvid_dagster.components.kvid_videos_component import KvidVideosComponent

__all__ = ["KvidVideosComponent"]
