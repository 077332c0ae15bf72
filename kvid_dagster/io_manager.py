"""``KvidVideoIOManager``: ``kvid_videos`` as an input of downstream assets.

An IO manager because it is how Dagster hands an upstream asset's value to a downstream one:
the downstream names ``kvid_videos`` as an ordinary input (``def poster(kvid_videos:
KvidVideo)``), Dagster maps the downstream's partitions onto the videos' (identity for the
project's partitions, all of them for an unpartitioned asset) and asks the asset's IO manager
to load exactly those. ``kvid_videos`` is never a run's output (the status sensor records it
with runless events), so there is nothing to store: this manager only loads, from the ledger,
and reports the partitions that have no video as a user's error, not a stack trace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, get_origin

import pandas as pd
from dagster import AssetKey, Failure, InputContext, IOManager, OutputContext

from kvid_dagster.core.project import KvidProject
from kvid_dagster.media.videos import (
    KvidVideo,
    VideoUnavailable,
    completed_videos,
    load_video,
    videos_table,
)


def video_io_manager_key(videos_key: AssetKey) -> str:
    """The resource key of a project's video IO manager, from its ``kvid_videos`` key: an
    asset key is unique in a code location, so two projects' managers never collide."""
    return f"{videos_key.to_python_identifier()}_io_manager"


def _takes_several(annotation: Any) -> bool:
    """An input annotated as a DataFrame or a mapping takes its videos all at once, even if it
    maps to a single partition (a daily downstream of a one-row table)."""
    kind = get_origin(annotation) or annotation
    return isinstance(kind, type) and issubclass(kind, pd.DataFrame | Mapping)


class KvidVideoIOManager(IOManager):
    """Loads a project's videos for downstream assets; stores nothing.

    A run for one partition whose input maps to that one video gets a :class:`KvidVideo`
    (its job not COMPLETED is a ``Failure`` naming the partition, its status and why). Any
    other input (an unpartitioned downstream: every partition), and any annotated ``dict``
    or ``pd.DataFrame`` whatever it maps to, gets every COMPLETED video among the mapped
    partitions, in partition order: a ``dict`` by partition key, or a pandas DataFrame (one
    row per video) when the input is annotated ``pd.DataFrame``. An input annotated
    ``KvidVideo`` must map to one partition.
    """

    def __init__(self, project: KvidProject) -> None:
        self.project = project

    def handle_output(self, context: OutputContext, obj: object) -> None:
        raise Failure(
            description=f"{context.asset_key.to_user_string()}: the kvid video IO manager only "
            "loads kvid_videos (the status sensor records them); give this output another "
            "io_manager_key"
        )

    def load_input(self, context: InputContext) -> KvidVideo | dict[str, KvidVideo] | pd.DataFrame:
        wanted = context.asset_partition_keys
        asked = context.dagster_type.typing_type
        try:
            if asked is KvidVideo or (
                not _takes_several(asked) and context.has_partition_key and len(wanted) == 1
            ):
                return load_video(self.project.ledger(), self._one(context, wanted))
            videos = completed_videos(self.project.ledger(), self._in_order(context, wanted))
        except VideoUnavailable as exc:
            raise Failure(
                description=f"{context.asset_key.to_user_string()}: {exc}",
                metadata={
                    "partition_key": exc.partition_key,
                    "status": exc.status.value if exc.status else "",
                    "reason": exc.reason,
                },
            ) from None
        context.log.info(f"{len(videos)} COMPLETED kvid videos of {len(wanted)} partitions")
        return videos_table(videos.values()) if asked is pd.DataFrame else videos

    def _one(self, context: InputContext, wanted: Sequence[str]) -> str:
        if len(wanted) != 1:
            raise Failure(
                description=f"input {context.name!r} is annotated KvidVideo but maps to "
                f"{len(wanted)} partitions of {context.asset_key.to_user_string()}: annotate it "
                "dict[str, KvidVideo] (or pd.DataFrame) to take several"
            )
        return wanted[0]

    def _in_order(self, context: InputContext, wanted: Sequence[str]) -> list[str]:
        """``wanted`` in the partitions' (the table's) order: Dagster hands a range's keys as a
        set (all of them, it happens, in order)."""
        keys = set(wanted)
        order = context.instance.get_dynamic_partitions(self.project.partitions_name)
        return [k for k in order if k in keys]
