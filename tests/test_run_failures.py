"""How ``kvid-dagster run`` reports a failed step: a user's mistake in one line (the cause's own
words), a bug of ours with its stack trace; on real Dagster runs."""

from __future__ import annotations

import pytest
from dagster import Failure, asset, materialize

from kvid_dagster.cli.runner import StepFailure
from kvid_dagster.client import KvidAuthenticationError


@asset
def refused() -> None:
    raise Failure(description="prompt table p.csv: column 'seeds' looks like 'seed'")


@asset
def keyless() -> None:
    raise KvidAuthenticationError("KVID_API_KEY is not set: set it to your kvid API key")


@asset
def buggy() -> None:
    {}["oops"]  # our own bug, as a KeyError


def failure_of(step: object) -> StepFailure:
    result = materialize([step], raise_on_error=False)  # type: ignore[list-item]
    (event,) = [e for e in result.all_events if e.is_step_failure]
    return StepFailure.of(result.run_id, event)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (refused, "prompt table p.csv: column 'seeds' looks like 'seed'"),
        (keyless, "KvidAuthenticationError: KVID_API_KEY is not set: set it to your kvid API key"),
    ],
)
def test_a_users_mistake_is_one_line_in_its_own_words(step: object, message: str) -> None:
    failure = failure_of(step)
    assert failure.user_error
    shown = failure.describe()
    assert shown == f"run {failure.run_id[:8]} failed in {failure.step}: {message}"
    assert "\n" not in shown
    assert "File " in failure.describe(verbose=True)  # the stack, on request


def test_a_bug_of_ours_keeps_its_stack_trace() -> None:
    failure = failure_of(buggy)
    assert not failure.user_error
    shown = failure.describe()
    assert shown.splitlines()[0].endswith("KeyError: 'oops'")
    assert "test_run_failures.py" in shown  # where it happened
