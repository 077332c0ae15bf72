"""What Dagster knows about a claim's owner: a claim whose run has ended is abandoned.

The ledger tells a live owner by its process on this host and by a heartbeat lease elsewhere;
Dagster's run storage adds a third signal that works across hosts at once.
"""

from __future__ import annotations

from collections.abc import Callable

from dagster import DagsterInstance

from kvid_dagster.ledger import Submission


def run_liveness(instance: DagsterInstance) -> Callable[[Submission], bool | None]:
    """``is_alive`` for :meth:`Ledger.recover`: False when the owning run has finished, None
    (ask the ledger) otherwise, e.g. for a run killed -9 that Dagster still shows as started."""

    def alive(submission: Submission) -> bool | None:
        owner = submission.owner
        if owner is None or not owner.run_id:
            return None
        run = instance.get_run_by_id(owner.run_id)
        if run is not None and run.is_finished:
            return False
        return None

    return alive
