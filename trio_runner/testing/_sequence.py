"""Request sequences: what a test submits, when it cancels, when it shuts the supervisor down.

Plain frozen data with reprs that are valid Python, like the fault plans; no trio
here. :func:`trio_runner.testing.run_sequence` plays one against a supervisor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import _validate as check


@dataclass(frozen=True)
class Submission:
    """One task to submit.

    Args:
        request: the request, handed to ``sup.stream``.
        cancel_after: cancel the task (``await task.cancel()``) once this many of
            its events have arrived; 0 cancels it as soon as it is submitted.
            None never cancels.
        retry: submit with ``retry=True``.
    """

    request: Any
    cancel_after: int | None = None
    retry: bool = False

    def __post_init__(self) -> None:
        if self.cancel_after is not None:
            check.integer("Submission.cancel_after", self.cancel_after, minimum=0, fix="None never cancels")
        check.boolean("Submission.retry", self.retry)


@dataclass(frozen=True)
class RequestSequence:
    """Tasks to submit, one after another or all at once, and when to shut down.

    Args:
        submissions: the tasks, in order.
        concurrent: submit them all at once (each from its own trio task) instead of
            one after the other.
        shutdown_after: shut the supervisor down (``await sup.aclose()``) once this
            many tasks have their outcome; tasks still in flight then end with
            ``RunnerUnavailable``, and those not yet submitted are refused with it.
            None waits for every task.
    """

    submissions: tuple[Submission, ...] = ()
    concurrent: bool = False
    shutdown_after: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.submissions, tuple):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError("RequestSequence(submissions=...) takes a tuple of Submission")
        check.boolean("RequestSequence.concurrent", self.concurrent)
        if self.shutdown_after is not None:
            check.integer(
                "RequestSequence.shutdown_after",
                self.shutdown_after,
                minimum=0,
                fix="None waits for every task",
            )
