"""``KvidResource``: configuration only; the clients it hands out are the client's own."""

from __future__ import annotations

import asyncio
import inspect

from kvid_dagster.client import AsyncKvidClient, KvidClient
from kvid_dagster.resources import KvidResource

# resource field -> the client's constructor argument it sets
_CLIENT_ARGUMENTS = {
    "request_timeout_seconds": "timeout",
    "max_retries": "max_retries",
    "backoff_base_seconds": "backoff_base",
    "backoff_max_seconds": "backoff_max",
    "max_in_flight": "max_in_flight",
}


def test_the_resource_defaults_are_the_clients_own() -> None:
    """Each default is defined once, in the client: a resource left at its defaults builds
    exactly the client ``KvidClient(key, url)`` builds."""
    client_defaults = {
        name: p.default for name, p in inspect.signature(KvidClient.__init__).parameters.items()
    }
    fields = KvidResource.model_fields
    for field, argument in _CLIENT_ARGUMENTS.items():
        assert fields[field].default == client_defaults[argument], field
    resource = KvidResource(api_key="k", base_url="http://127.0.0.1:9")
    with resource.get_client() as made, KvidClient("k", "http://127.0.0.1:9") as plain:
        assert repr(made) == repr(plain)
        assert made.max_in_flight == plain.max_in_flight == 32


def test_the_key_is_in_neither_the_resource_nor_its_clients_repr() -> None:
    resource = KvidResource(api_key="sk-secret-1234", base_url="http://127.0.0.1:9")
    client = resource.get_async_client()
    assert isinstance(client, AsyncKvidClient)
    try:
        for shown in (repr(resource), str(resource), repr(client)):
            assert "sk-secret-1234" not in shown
    finally:
        asyncio.run(client.close())
