"""``kvid-dagster``: the command line, its live progress display and its Dagster-run driver."""

from kvid_dagster.cli.main import main

__all__ = ["main"]
