"""The definitions ``kvid-dagster dev`` serves, from whatever folder it was started in: the
table and data folder it was given (``$KVID_PROMPTS``, ``$KVID_DATA_DIR``) and its service
(``$KVID_API_KEY``, ``$KVID_BASE_URL``: the embedded emulator unless they were set)."""

from kvid_dagster.definitions import definitions_from_env

defs = definitions_from_env()
