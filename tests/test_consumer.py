"""How a per-event ``async for`` over a TaskHandle yields to the scheduler.

The handle is driven by a stub in place of the task table: it hands the task
prepared batches of events, one per wait. Each resumption of the consumer
task after the first is one yield, counted by a trio instrument.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

from trio_runner._tasks import CHECKPOINT_EVERY, Task, TaskHandle


class _Batches:
    """Stands in for the task table: each wait delivers the next batch, then the end."""

    def __init__(self, task: Task, batches: list[int]) -> None:
        self.task = task
        self.batches = deque(batches)
        self.waits = 0

    def consumed(self, task: Task, count: int) -> None:
        pass

    async def wait_change(self, task: Task) -> None:
        self.waits += 1
        await trio.lowlevel.checkpoint()
        if self.batches:
            task.events.extend(range(self.batches.popleft()))
        else:
            task.done = True


class _Steps(trio.abc.Instrument):
    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def _yields_while_consuming(first: int, later: list[int]) -> tuple[int, int, int]:
    """(events read, yields, waits) for a task holding ``first`` events, then ``later`` batches."""
    task = Task(1, b"", retry=False)
    task.events.extend(range(first))
    stub = _Batches(task, later)
    handle: TaskHandle[Any, Any] = TaskHandle(stub, task)  # pyright: ignore[reportArgumentType]
    steps = _Steps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        count = 0
        async for _ in handle:
            count += 1
    finally:
        trio.lowlevel.remove_instrument(steps)
    return count, steps.steps, stub.waits


async def test_a_consumer_of_a_long_backlog_yields_every_n_events_not_every_one() -> None:
    count, yields, waits = await _yields_while_consuming(1000, [])
    assert count == 1000
    assert waits == 1  # only to see the end
    # A checkpoint every CHECKPOINT_EVERY events, plus the final wait: other
    # tasks run during a long drain, but not once per event.
    assert yields == 1000 // CHECKPOINT_EVERY + waits


async def test_a_batch_that_arrives_while_waiting_is_read_without_an_extra_checkpoint() -> None:
    batch = CHECKPOINT_EVERY * 3 // 4
    count, yields, waits = await _yields_while_consuming(batch, [batch, batch])
    assert count == 3 * batch  # more than CHECKPOINT_EVERY in all
    assert waits == 3
    assert yields == waits  # each wait was the checkpoint; none in between


async def test_a_cancelled_consumer_stops_at_the_next_event_however_many_are_queued() -> None:
    task = Task(1, b"", retry=False)
    task.events.extend(range(CHECKPOINT_EVERY // 2))  # fewer than one full checkpoint's worth
    handle: TaskHandle[Any, Any] = TaskHandle(_Batches(task, []), task)  # pyright: ignore[reportArgumentType]
    read: list[int] = []
    with trio.CancelScope() as scope:
        async for event in handle:
            read.append(event)
            scope.cancel()
    assert scope.cancelled_caught
    assert read == [0]
    assert len(task.events) == CHECKPOINT_EVERY // 2 - 1  # the rest stay queued, unread
