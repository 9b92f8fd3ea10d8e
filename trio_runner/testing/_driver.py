"""Plays a :class:`RequestSequence` against a supervisor, recording every task in a ledger."""

from __future__ import annotations

from typing import Any

import trio

from .._errors import RunnerUnavailable, TaskError
from ._invariants import OutcomeLedger
from ._sequence import RequestSequence, Submission


async def run_sequence(
    supervisor: Any, sequence: RequestSequence, ledger: OutcomeLedger | None = None
) -> OutcomeLedger:
    """Submit ``sequence`` to ``supervisor``: cancel where it says, shut down where it says.

    Every task goes through ``ledger`` (a new one if None), which is returned for
    :meth:`OutcomeLedger.check`. Task errors are recorded, not raised. Each
    submission's :class:`Submission` is the entry's ``tag``.

    **Cancellation:** if the caller is cancelled (say, the policy gave up and
    :class:`~trio_runner.RestartLimitExceeded` cancels the body), the tasks in
    flight are left to the supervisor, which ends each of them.
    """
    ledger = OutcomeLedger() if ledger is None else ledger
    finished = 0
    shutdown_at = sequence.shutdown_after
    shutdown_due = trio.Event()

    def count_one() -> None:
        nonlocal finished
        finished += 1
        if shutdown_at is not None and finished >= shutdown_at:
            shutdown_due.set()

    async def one(submission: Submission) -> None:
        try:
            async with ledger.stream(
                supervisor, submission.request, retry=submission.retry, tag=submission
            ) as task:
                seen = 0
                if submission.cancel_after == 0:
                    await task.cancel()
                async for _ in task:
                    seen += 1
                    if seen == submission.cancel_after:
                        await task.cancel()
        except (TaskError, RunnerUnavailable):
            pass
        finally:
            count_one()

    if not sequence.concurrent:
        for index, submission in enumerate(sequence.submissions):
            if shutdown_at is not None and index == shutdown_at:
                await supervisor.aclose()
            await one(submission)
        if shutdown_at is not None and shutdown_at >= len(sequence.submissions):
            await supervisor.aclose()
        return ledger

    async def shut_down() -> None:
        await shutdown_due.wait()
        await supervisor.aclose()

    async with trio.open_nursery() as nursery:
        if shutdown_at is not None:
            if shutdown_at == 0:
                shutdown_due.set()
            nursery.start_soon(shut_down)
        async with trio.open_nursery() as submitters:
            for submission in sequence.submissions:
                submitters.start_soon(one, submission)
        if shutdown_at is not None:
            shutdown_due.set()  # fewer tasks than the shutdown point: shut down at the end
    return ledger
