"""Which errors are a person's to fix, said in one line, rather than bugs of ours, shown with
their stack trace: the command line and the headless runner draw the line in the same place."""

from __future__ import annotations


def user_errors() -> tuple[type[Exception], ...]:
    """The table (unreadable, misspelt columns), the key, the service (unreachable, refusing),
    a path or a permission: the message names what to change."""
    from kvid_dagster.client import KvidError  # imported when needed: the CLI starts fast
    from kvid_dagster.core.sources import PromptTableError

    return (KvidError, PromptTableError, OSError)
