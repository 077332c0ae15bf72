"""kvid-dagster: the kvid video-generation API as Dagster assets, sensors and Parquet catalogs.

Names are resolved lazily so that ``from kvid_dagster import KvidClient`` stays free of Dagster:
the client and the emulator are useful on their own, and importing Dagster costs most of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # the client (no Dagster)
    "KvidClient": "kvid_dagster.client",
    "AsyncKvidClient": "kvid_dagster.client",
    "JobKind": "kvid_dagster.client",
    "TextToVideoV1": "kvid_dagster.client",
    "ImageToVideoV1": "kvid_dagster.client",
    "TextToVideoV2": "kvid_dagster.client",
    "ImageToVideoV2": "kvid_dagster.client",
    "ApiDialect": "kvid_dagster.client",
    "GenerationTextToVideo": "kvid_dagster.client",
    "GenerationImageToVideo": "kvid_dagster.client",
    "GenerationReferenceToVideo": "kvid_dagster.client",
    "CreditPool": "kvid_dagster.client",
    "KvidRequest": "kvid_dagster.client",
    "build_request": "kvid_dagster.client",
    "JobStatus": "kvid_dagster.client",
    "JobResult": "kvid_dagster.client",
    "DownloadedFile": "kvid_dagster.client",
    "KvidError": "kvid_dagster.client",
    # the emulator (no Dagster)
    "KvidEmulator": "kvid_dagster.emulator",
    "EmulatorConfig": "kvid_dagster.emulator",
    # the ledger (no Dagster)
    "Ledger": "kvid_dagster.ledger",
    "VideoStatus": "kvid_dagster.ledger",
    # a finished video as downstream code takes it (no Dagster)
    "KvidVideo": "kvid_dagster.media.videos",
    # the Dagster layer
    "KvidResource": "kvid_dagster.resources",
    "KvidTranslator": "kvid_dagster.translator",
    "KvidAsset": "kvid_dagster.translator",
    "KvidAssetProps": "kvid_dagster.translator",
    "KvidProject": "kvid_dagster.core.project",
    "StatusSensorOptions": "kvid_dagster.options",
    "PromptsSensorOptions": "kvid_dagster.options",
    "ScheduleOptions": "kvid_dagster.options",
    "build_kvid_assets": "kvid_dagster.assets",
    "build_kvid_status_sensor": "kvid_dagster.sensor_builder",
    "build_kvid_prompts_sensor": "kvid_dagster.sensor_builder",
    "build_kvid_schedule": "kvid_dagster.schedule_builder",
    "build_kvid_definitions": "kvid_dagster.definitions",
    "CreditBudget": "kvid_dagster.core.budget",
    "KvidVideosComponent": "kvid_dagster.components.kvid_videos_component",
    "KvidVideoIOManager": "kvid_dagster.io_manager",
}

# what editors and type checkers resolve; at run time __getattr__ imports each on first use
if TYPE_CHECKING:
    from kvid_dagster.assets import (
        build_kvid_assets,
    )
    from kvid_dagster.client import (
        ApiDialect,
        AsyncKvidClient,
        CreditPool,
        DownloadedFile,
        GenerationImageToVideo,
        GenerationReferenceToVideo,
        GenerationTextToVideo,
        ImageToVideoV1,
        ImageToVideoV2,
        JobKind,
        JobResult,
        JobStatus,
        KvidClient,
        KvidError,
        KvidRequest,
        TextToVideoV1,
        TextToVideoV2,
        build_request,
    )
    from kvid_dagster.components.kvid_videos_component import (
        KvidVideosComponent,
    )
    from kvid_dagster.core.budget import (
        CreditBudget,
    )
    from kvid_dagster.core.project import (
        KvidProject,
    )
    from kvid_dagster.definitions import (
        build_kvid_definitions,
    )
    from kvid_dagster.emulator import (
        EmulatorConfig,
        KvidEmulator,
    )
    from kvid_dagster.io_manager import (
        KvidVideoIOManager,
    )
    from kvid_dagster.ledger import (
        Ledger,
        VideoStatus,
    )
    from kvid_dagster.media.videos import (
        KvidVideo,
    )
    from kvid_dagster.options import (
        PromptsSensorOptions,
        ScheduleOptions,
        StatusSensorOptions,
    )
    from kvid_dagster.resources import (
        KvidResource,
    )
    from kvid_dagster.schedule_builder import (
        build_kvid_schedule,
    )
    from kvid_dagster.sensor_builder import (
        build_kvid_prompts_sensor,
        build_kvid_status_sensor,
    )
    from kvid_dagster.translator import (
        KvidAsset,
        KvidAssetProps,
        KvidTranslator,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvid_dagster' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
