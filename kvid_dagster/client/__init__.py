"""The kvid API client: ``KvidClient`` (blocking) and ``AsyncKvidClient`` (asyncio).

It knows nothing of Dagster and must not import it: the client is useful on its own and is
imported by processes (the emulator, the CLI) that should not pay for Dagster.
"""

from __future__ import annotations

from ._download import DEFAULT_MAX_BYTES, PartialDownload
from ._engine import (
    API_KEY_ENV,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    DEFAULT_CALL_DEADLINE_S,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT_S,
    MAX_ANSWER_BYTES,
)
from .aio import AsyncKvidClient
from .errors import (
    KvidAuthenticationError,
    KvidConcurrentLimitError,
    KvidConnectionError,
    KvidDownloadBusyError,
    KvidDownloadTooLargeError,
    KvidError,
    KvidInsufficientCreditError,
    KvidJobFailedError,
    KvidNotFoundError,
    KvidNotReadyError,
    KvidProtocolError,
    KvidRateLimitedError,
    KvidResponseTooLargeError,
    KvidServerError,
    KvidTimeoutError,
    KvidUncertainSubmissionError,
    KvidValidationError,
)
from .generation_requests import (
    GENERATION_MODELS,
    CreditPool,
    CreditPoolField,
    GenerationImageToVideo,
    GenerationReferenceToVideo,
    GenerationRequest,
    GenerationTextToVideo,
)
from .protocol import (
    DEFAULT_DIALECT,
    GENERATION_DIALECT,
    KVID_DIALECT,
    ErrorCode,
    GenerationDialect,
    HttpCall,
    KvidDialect,
    WireDialect,
    dialect_for,
)
from .results import DownloadedFile, JobResult, JobState, JobStatus
from .retry import RetryPolicy
from .sync import KvidClient
from .video_requests import (
    MAX_IMAGE_BYTES,
    MAX_PROMPT_CHARS,
    V2_IMAGE_TO_VIDEO_MODEL,
    V2_TEXT_TO_VIDEO_MODEL,
    ApiDialect,
    ImageToVideoV1,
    ImageToVideoV2,
    JobKind,
    KvidRequest,
    LocalImage,
    TextToVideoV1,
    TextToVideoV2,
    build_request,
)

#: ``WireDialect``'s former name, kept importable (``ApiDialect`` and the emulator's
#: ``Dialect`` are other things)
Dialect = WireDialect

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "DEFAULT_CALL_DEADLINE_S",
    "DEFAULT_DIALECT",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_RETRY",
    "DEFAULT_TIMEOUT_S",
    "GENERATION_DIALECT",
    "GENERATION_MODELS",
    "KVID_DIALECT",
    "MAX_ANSWER_BYTES",
    "MAX_IMAGE_BYTES",
    "MAX_PROMPT_CHARS",
    "V2_IMAGE_TO_VIDEO_MODEL",
    "V2_TEXT_TO_VIDEO_MODEL",
    "ApiDialect",
    "AsyncKvidClient",
    "CreditPool",
    "CreditPoolField",
    "Dialect",
    "DownloadedFile",
    "ErrorCode",
    "GenerationDialect",
    "GenerationImageToVideo",
    "GenerationReferenceToVideo",
    "GenerationRequest",
    "GenerationTextToVideo",
    "HttpCall",
    "ImageToVideoV1",
    "ImageToVideoV2",
    "JobKind",
    "JobResult",
    "JobState",
    "JobStatus",
    "KvidAuthenticationError",
    "KvidClient",
    "KvidConcurrentLimitError",
    "KvidConnectionError",
    "KvidDialect",
    "KvidDownloadBusyError",
    "KvidDownloadTooLargeError",
    "KvidError",
    "KvidInsufficientCreditError",
    "KvidJobFailedError",
    "KvidNotFoundError",
    "KvidNotReadyError",
    "KvidProtocolError",
    "KvidRateLimitedError",
    "KvidRequest",
    "KvidResponseTooLargeError",
    "KvidServerError",
    "KvidTimeoutError",
    "KvidUncertainSubmissionError",
    "KvidValidationError",
    "LocalImage",
    "PartialDownload",
    "RetryPolicy",
    "TextToVideoV1",
    "TextToVideoV2",
    "WireDialect",
    "build_request",
    "dialect_for",
]
