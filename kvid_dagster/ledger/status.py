"""The status vocabulary of the ledger: what a row or a submission can be, and what that means.

Every status the integration writes is a :class:`VideoStatus`; the service's own running
statuses are mapped onto ``IN_QUEUE`` and ``PROCESSING`` by :meth:`VideoStatus.from_service`. No
other module spells a status as a string.
"""

from __future__ import annotations

from enum import StrEnum


class VideoStatus(StrEnum):
    PENDING = "PENDING"  # a valid row with no job for its current request
    INVALID = "INVALID"  # never sent: the row is not a valid request
    SUBMITTING = "SUBMITTING"  # claimed: its generate is (or was) in flight
    SUBMITTED = "SUBMITTED"  # the service gave a request_id
    IN_QUEUE = "IN_QUEUE"
    PROCESSING = "PROCESSING"
    FETCHING = "FETCHING"  # the service says completed; the result or video is not fetched yet
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"  # the service said the job failed (it was billed)
    UNCERTAIN = "UNCERTAIN"  # a generate that may have created a job whose id we never got
    TIMED_OUT = "TIMED_OUT"  # past the job deadline; polling stopped, the request_id is kept
    LOST = "LOST"  # the service no longer knows the request_id (404s that lasted)
    FETCH_FAILED = "FETCH_FAILED"  # completed, but its video could not be fetched: refetch it
    CANCELED = "CANCELED"  # the service says the job was canceled: no video, never retried

    @classmethod
    def from_service(cls, status: str) -> VideoStatus:
        """A running status as the service spells it (``IN_QUEUE``, ``queued``, ...)."""
        return cls.IN_QUEUE if status.strip().upper() in {"IN_QUEUE", "QUEUED"} else cls.PROCESSING

    @property
    def needs_polling(self) -> bool:
        """A job the service knows by its request_id and has not finished."""
        return self in _POLLED

    @property
    def holds_paid_job(self) -> bool:
        """A job exists, may exist, or finished with a video: never send this request again."""
        return self in _HOLDS_JOB

    @property
    def ended_without_video(self) -> bool:
        """The request was sent (and billed) and ended with no video: only ``force`` or the
        retry policy pays for another attempt."""
        return self in _ENDED_WITHOUT_VIDEO

    @property
    def is_terminal(self) -> bool:
        """Nothing more will happen without a person or a new submission."""
        return self in _TERMINAL

    @property
    def has_job(self) -> bool:
        """A submission exists for the request (whatever became of it)."""
        return self not in {VideoStatus.PENDING, VideoStatus.INVALID}


_POLLED = frozenset(
    {VideoStatus.SUBMITTED, VideoStatus.IN_QUEUE, VideoStatus.PROCESSING, VideoStatus.FETCHING}
)
_ENDED_WITHOUT_VIDEO = frozenset(
    {VideoStatus.FAILED, VideoStatus.TIMED_OUT, VideoStatus.LOST, VideoStatus.CANCELED}
)
# FETCH_FAILED holds a paid job: the video exists at the service, a new job would pay again
_HOLDS_JOB = frozenset(
    {
        VideoStatus.SUBMITTING, VideoStatus.UNCERTAIN, VideoStatus.COMPLETED,
        VideoStatus.FETCH_FAILED, *_POLLED,
    }
)  # fmt: skip
_TERMINAL = frozenset(
    {
        VideoStatus.COMPLETED, VideoStatus.UNCERTAIN, VideoStatus.INVALID,
        VideoStatus.FETCH_FAILED, *_ENDED_WITHOUT_VIDEO,
    }
)  # fmt: skip


class SubmissionEvent(StrEnum):
    """An entry of the submissions history (the published ``submissions`` table).

    ``cost_credits`` is what the event adds to the credits the history counts, so that its sum
    over the history is the sum of the jobs' costs, each job counted once: a job counts from
    the event that settles its claim, ``SUBMITTED`` or ``UNCERTAIN`` (money spent, or possibly
    spent); a ``SUBMITTED`` after ``UNCERTAIN`` (a slow submitter, a replayed journal) or a
    ``RESOLVED`` with the job found adds 0; a ``RESOLVED`` with no job found takes the cost
    back (negative); a ``COMPLETED`` whose service reported what the job used adds the
    difference from the estimate. The events that state money (:attr:`states_cost`) show 0
    when they add nothing; the others show nothing.
    """

    INTENT = "INTENT"  # claimed, immediately before its generate left
    SUBMITTED = "SUBMITTED"
    UNCERTAIN = "UNCERTAIN"
    FAILED_TO_SUBMIT = "FAILED_TO_SUBMIT"  # refused or never sent: nothing billed
    RESOLVED = "RESOLVED"  # a person settled an UNCERTAIN submission
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    LOST = "LOST"
    FETCH_FAILED = "FETCH_FAILED"
    CANCELED = "CANCELED"
    REFETCH = "REFETCH"  # a person asked for a FETCH_FAILED job's video again
    COST = "COST"  # the service's figure for a running job's cost replaced the one counted

    @classmethod
    def ended(cls, status: VideoStatus) -> SubmissionEvent:
        """The event recording that a job ended in ``status`` (a terminal status)."""
        return cls(status.value)

    @property
    def states_cost(self) -> bool:
        """Its ``cost_credits`` is a number even when it adds nothing."""
        return self in _STATES_COST


_STATES_COST = frozenset(
    {
        SubmissionEvent.SUBMITTED, SubmissionEvent.UNCERTAIN, SubmissionEvent.FAILED_TO_SUBMIT,
        SubmissionEvent.RESOLVED, SubmissionEvent.COST,
    }
)  # fmt: skip
