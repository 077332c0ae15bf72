"""``KvidResource``: the kvid client as a Dagster resource (configuration only, no HTTP here)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from kvid_dagster.client import (
    DEFAULT_BASE_URL,
    DEFAULT_CALL_DEADLINE_S,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT_S,
    ApiDialect,
    AsyncKvidClient,
    CreditPool,
    CreditPoolField,
    KvidAuthenticationError,
    KvidClient,
)
from kvid_dagster.core.submit import DEFAULT_GENERATE_CONCURRENCY, DEFAULT_LIMIT_WAIT_S


class KvidResource(ConfigurableResource):
    """Connection settings for kvid; hands out sync and async clients.

    Wire the key as a secret so that it never shows in the UI or the event log::

        KvidResource(api_key_env="KVID_API_KEY")  # read when a client is made
        KvidResource(api_key=dg.EnvVar("KVID_API_KEY"), base_url=dg.EnvVar("KVID_BASE_URL"))

    ``api_key_env`` names the variable, read when a client is made: unset, it is one line
    naming it where the client is needed (a run's step, a sensor's tick). ``local_emulator_dir``
    is the local mode (no key, no cost, made-up videos: see :mod:`kvid_dagster.emulator.local`).
    """

    # repr=False: the key stays out of repr()/str() of the resource, which Dagster and
    # tracebacks print
    api_key: str | None = Field(
        default=None,
        repr=False,
        description="The kvid API key (use EnvVar('KVID_API_KEY'), or api_key_env).",
    )
    api_key_env: str | None = Field(
        default=None,
        description="The environment variable holding the kvid API key, read when a client is "
        "made (used when api_key is unset); unset or empty there, the client is refused with a "
        "message naming it.",
    )
    local_emulator_dir: str | None = Field(
        default=None,
        description="The local mode: talk to a kvid emulator shared by every process, its "
        "state in this folder, instead of the service (no key, no cost, made-up videos).",
    )
    base_url: str = Field(default=DEFAULT_BASE_URL, description="The kvid API base URL.")
    dialect: ApiDialect = Field(
        default=ApiDialect.VIDEO,
        description="The API dialect: 'video' (/ai/video/..., request_id) or 'generation' "
        "(/ai/generation/..., jobId). It must be the project's (KVID_API_DIALECT).",
    )
    credit_pool_field: CreditPoolField | None = Field(
        default=None,
        description="Generation dialect: the body field naming the credit pool to charge "
        "(product_id, product_code or email), sent only when set.",
    )
    credit_pool: str | None = Field(
        default=None,
        repr=False,
        description="Its value (use an EnvVar); held like the key, never shown or logged.",
    )
    # the client's defaults, defined there once
    request_timeout_seconds: float = Field(
        default=DEFAULT_TIMEOUT_S,
        description="Timeout of each wait of one HTTP request (connect, each read, each write).",
    )
    call_deadline_seconds: float = Field(
        default=DEFAULT_CALL_DEADLINE_S,
        description="Longest one API call (generate, status, result) may take, first byte sent "
        "to last byte read, however slowly the server answers; past it a generate is "
        "UNCERTAIN, a status or result call a timeout (retried).",
    )
    max_retries: int = Field(
        default=DEFAULT_RETRY.max_retries, description="Retries of a retryable request (bounded)."
    )
    backoff_base_seconds: float = Field(
        default=DEFAULT_RETRY.backoff_base,
        description="First retry delay (exponential with jitter) without Retry-After.",
    )
    backoff_max_seconds: float = Field(
        default=DEFAULT_RETRY.backoff_max,
        description="Longest wait between retries; caps a server's Retry-After.",
    )
    max_in_flight: int = Field(
        default=DEFAULT_MAX_IN_FLIGHT, description="Requests in flight at once, per client."
    )
    generate_concurrency: int = Field(
        default=DEFAULT_GENERATE_CONCURRENCY,
        ge=1,
        description="Generates in flight at once per submitting run (each claimed in the "
        "ledger just before it leaves): gentle on the service, and after a crash at most this "
        "many rows can be UNCERTAIN. Status polling has its own, larger bound.",
    )
    concurrent_limit_wait_seconds: float = Field(
        default=DEFAULT_LIMIT_WAIT_S,
        gt=0,
        description="After the service refuses a generate for its limit on running jobs "
        "(CONCURRENT_LIMIT), how long new generates wait before going on (doubling while "
        "refused, at most 60 s; a Retry-After wins).",
    )
    allowed_download_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts on private or loopback addresses videos may be downloaded from, "
        "besides the API's own (a result URL or redirect to any other non-public address, the "
        "cloud metadata service's say, is refused).",
    )

    def _client_settings(self) -> dict[str, Any]:
        return {
            "timeout": self.request_timeout_seconds,
            "call_deadline": self.call_deadline_seconds,
            "max_retries": self.max_retries,
            "backoff_base": self.backoff_base_seconds,
            "backoff_max": self.backoff_max_seconds,
            "max_in_flight": self.max_in_flight,
            "allowed_download_hosts": tuple(self.allowed_download_hosts),
            "dialect": self.dialect,
            "credit_pool": (
                CreditPool.of(self.credit_pool_field, self.credit_pool)
                if self.credit_pool_field is not None and self.credit_pool
                else None
            ),
        }

    def _endpoint(self) -> tuple[str, str]:
        """(api key, base URL) of the service to talk to now."""
        if self.local_emulator_dir is not None:
            from kvid_dagster.emulator.local import LOCAL_API_KEY, shared_emulator

            return LOCAL_API_KEY, shared_emulator(Path(self.local_emulator_dir)).base_url
        if self.api_key:
            return self.api_key, self.base_url
        name = self.api_key_env
        key = os.environ.get(name, "").strip() if name else ""
        if not key:
            what = f"{name} is not set" if name else "no kvid API key is configured"
            raise KvidAuthenticationError(
                f"{what}: set it to your kvid API key (nothing was sent; for made-up videos "
                "with no key, the local emulator: `emulator: true` in the Component's "
                "defs.yaml, or `kvid-dagster dev`)"
            )
        return key, self.base_url

    def get_client(self) -> KvidClient:
        return KvidClient(*self._endpoint(), **self._client_settings())

    def get_async_client(self) -> AsyncKvidClient:
        return AsyncKvidClient(*self._endpoint(), **self._client_settings())
