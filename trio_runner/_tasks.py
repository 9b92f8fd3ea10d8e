"""The task table: every task from submission to outcome, and the TaskHandle that consumes one.

:class:`TaskTable` owns the tasks waiting to be sent (``pending``) and those
sent to a runner (``in_flight``), the ids, and the control channel that
carries cancels and flow-control credits to the runner. It knows nothing of
processes: the supervisor tells it when tasks are sent, routes each message
from the runner to it, and settles what is left when a runner dies.

:class:`TaskHandle` is the caller's side of one task: it reads the events the
table queued, returns credits as it goes, and cancels the task when asked.
"""

from __future__ import annotations

import itertools
import math
import pickle
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any, Generic, TypeAlias, TypeVar

import trio

from . import _payloads
from . import _protocol as proto
from ._errors import (
    ExitReason,
    ExitRecord,
    RunnerCrashed,
    RunnerUnavailable,
    TaskCancelled,
    TaskError,
    TaskFailed,
)

EventT = TypeVar("EventT")
ResultT = TypeVar("ResultT")

#: Events a consumer takes from its queue between checkpoints.
CHECKPOINT_EVERY = 128

#: An item of the control channel: a cancel or credits for the runner, and
#: the incarnation it is meant for.
ControlItem: TypeAlias = tuple[proto.Cancel | proto.Credit, int]


class Task:
    """The supervisor's record of one submitted task."""

    __slots__ = (
        "attempt",
        "cancel_sent",
        "crashed",
        "done",
        "error",
        "events",
        "id",
        "incarnation",
        "received",
        "released",
        "request",
        "result",
        "retry",
        "returned",
        "unreturned",
        "waiter",
    )

    def __init__(self, task_id: int, request: bytes | bytearray | proto.Pieces, retry: bool) -> None:
        self.id = task_id
        self.request: bytes | bytearray | proto.Pieces | None = request
        self.retry = retry
        self.events: deque[Any] = deque()
        self.done = False
        self.result: Any = None
        self.error: TaskError | RunnerUnavailable | None = None
        self.waiter: trio.Event | None = None
        self.incarnation = 0
        self.received = 0  # events received in the current incarnation
        self.returned = 0  # credits sent back to the child in the current incarnation
        self.unreturned = 0  # events consumed whose credits are not yet sent back
        self.released = False  # the caller left the stream block
        self.cancel_sent = False
        self.attempt = 1
        self.crashed: ExitRecord | None = None  # the crash a retry=True task is waiting out

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            waiter.set()

    def reset_delivery(self) -> None:
        """Forget what the last incarnation delivered: the task is sent again from the start."""
        self.events.clear()
        self.received = self.returned = self.unreturned = 0


class TaskTable:
    """Every task not yet settled, and the control channel to the runner.

    Attributes:
        pending: tasks waiting to be sent, in submission order.
        in_flight: tasks sent to the current runner and not yet settled.
        window: events in flight per task before the runner's ``emit`` blocks.
        completed: tasks settled so far.
        events_dropped: events that arrived for a cancelled task, or that the
            runner dropped after a cancel.
        control_send: cancels and credits for the runner; ``control_recv``
            is read by the incarnation's control sender.
    """

    __slots__ = (
        "_ids",
        "_pending_wake",
        "completed",
        "control_recv",
        "control_send",
        "credit_batch",
        "events_dropped",
        "in_flight",
        "max_frame",
        "pending",
        "window",
    )

    def __init__(self, window: int, max_frame: int) -> None:
        self.window = window
        # Credits go back in batches of half a window: fewer messages, and the
        # runner never waits on a full window while half of it is consumed.
        self.credit_batch = max(1, window // 2)
        self.max_frame = max_frame
        self._ids = itertools.count(1)
        self.pending: dict[int, Task] = {}
        self.in_flight: dict[int, Task] = {}
        self._pending_wake = trio.Event()
        self.control_send, self.control_recv = trio.open_memory_channel[ControlItem](math.inf)
        self.completed = 0
        self.events_dropped = 0

    # -- submitting and sending ---------------------------------------------------

    def new(self, request: bytes | bytearray | proto.Pieces, retry: bool) -> Task:
        """A task for a pickled request, with the next id; not yet in the table."""
        return Task(next(self._ids), request, retry)

    def queue(self, task: Task) -> None:
        """Put ``task`` at the end of the queue and wake the sender."""
        self.pending[task.id] = task
        self._pending_wake.set()

    def wake_sender(self) -> None:
        self._pending_wake.set()

    async def wait_pending(self) -> None:
        """Wait until a task is queued (or ``wake_sender`` is called)."""
        self._pending_wake = trio.Event()
        await self._pending_wake.wait()

    def next_batch(self, limit: int) -> list[Task]:
        """The first pending tasks, in order, whose requests add up to at most ``limit`` bytes."""
        batch: list[Task] = []
        size = 0
        for task in self.pending.values():
            assert task.request is not None
            if batch and size + len(task.request) > limit:
                break
            batch.append(task)
            size += len(task.request)
        return batch

    def mark_sent(self, batch: list[Task], incarnation: int) -> bytes | list[proto.Buffer]:
        """Move ``batch`` in flight on ``incarnation``; the frames that deliver it.

        Bytes, or with a big request, the parts to write in turn: a big request
        is written from the pickle the thread made, never copied on the loop.
        """
        # Each a Task message, built as its wire tuple: encoded at once, it never
        # needs the class (making and flattening it cost a microsecond a task).
        messages: list[proto.Wire] = []
        big = False
        pending, in_flight, window = self.pending, self.in_flight, self.window
        for task in batch:
            pending.pop(task.id, None)
            in_flight[task.id] = task
            task.incarnation = incarnation
            # The request stays until the runner acknowledges the task: one the
            # runner never started is delivered again if it dies.
            assert task.request is not None
            big = big or len(task.request) >= _payloads.LARGE_REQUEST
            # (Pieces pickle as the bytes they join to: the runner gets bytes.)
            messages.append((proto.TASK, task.id, task.request, window))
        if big:
            return proto.encode_wire_parts(messages, self.max_frame)
        return proto.encode_wire(messages, self.max_frame)

    # -- what the runner says -----------------------------------------------------

    def acknowledged(self, task_id: int) -> None:
        """``handle()`` is about to run: from now on a crash fails the task (unless retry=True)."""
        task = self.in_flight.get(task_id)
        if task is not None and not task.retry:
            task.request = None  # no longer needed: it will not be sent again

    def route_events(self, task_id: int, payload: bytes | _payloads.Loaded) -> None:
        """Queue a batch of events for the task's consumer (or drop them, if it was cancelled)."""
        task = self.in_flight.get(task_id)
        if task is None or task.done:
            return
        events = self.unpack(task, payload, "an event")
        if events is None:
            return
        task.received += len(events)
        if task.cancel_sent:
            self.events_dropped += len(events)  # cancel means stop
        else:
            task.events.extend(events)
            task.wake()

    def route_result(self, task_id: int, payload: bytes | _payloads.Loaded) -> bool:
        """Settle the task with its result; False if there was none to settle (or it did not unpickle)."""
        task = self.in_flight.get(task_id)
        if task is None:
            return False
        result = self.unpack(task, payload, "the result")
        if task.done:
            return False
        self.finish(task, result=result)
        return True

    def settle(self, task_id: int, error: TaskError) -> None:
        """The runner ended the task with ``error`` (failed or cancelled)."""
        task = self.in_flight.get(task_id)
        if task is not None:
            self.finish(task, error=error)

    def wants(self, task_id: int) -> bool:
        """Whether a payload for ``task_id`` will be used (worth unpickling)."""
        task = self.in_flight.get(task_id)
        return task is not None and not task.done

    def unpack(self, task: Task, payload: bytes | _payloads.Loaded, what: str) -> Any:
        """Unpickle one task's payload; if this process cannot, that task alone fails."""
        try:
            if isinstance(payload, _payloads.Loaded):
                return payload.get()  # unpickled in a thread by the forwarder
            return pickle.loads(payload)
        except Exception as exc:
            self.finish(
                task,
                error=TaskFailed(
                    type(exc).__qualname__,
                    f"the parent could not unpickle {what} of task {task.id}: {exc}",
                    "".join(traceback.format_exception(exc)),
                ),
            )
            # The runner may still be working on it: stop it. Without credits its
            # emit then raises TaskCancelled instead of blocking for ever.
            task.cancel_sent = True
            self.control_send.send_nowait((proto.Cancel(task.id), task.incarnation))
            return None

    # -- the consumer's side ------------------------------------------------------

    def consumed(self, task: Task, count: int) -> None:
        """The consumer took ``count`` events: return their credits, half a window at a time."""
        task.unreturned += count
        if task.unreturned >= self.credit_batch and not task.done and not task.cancel_sent:
            self.control_send.send_nowait((proto.Credit(task.id, task.unreturned), task.incarnation))
            task.returned += task.unreturned
            task.unreturned = 0

    async def wait_change(self, task: Task) -> None:
        """Wait for the task's next events or its outcome."""
        waiter = task.waiter
        if waiter is None:
            waiter = task.waiter = trio.Event()
        await waiter.wait()

    def release(self, task: Task) -> None:
        """The caller left the stream block: cancel the task if it runs, and return its credits."""
        task.released = True
        if not task.done:
            self.cancel(task)
        if task.events:
            count = len(task.events)
            task.events.clear()
            self.consumed(task, count)

    # -- ending tasks ---------------------------------------------------------------

    def cancel(self, task: Task) -> None:
        """Cancel one task: at once if it was not sent yet, else through the control channel."""
        if task.done:
            return
        if task.id in self.pending:
            self.finish(task, error=TaskCancelled(f"task {task.id} was cancelled before it started"))
        elif not task.cancel_sent:
            self.drop_events(task)
            self.control_send.send_nowait((proto.Cancel(task.id), task.incarnation))

    def cancel_all(self, incarnation: int | None) -> None:
        """Cancel every task: pending ones at once, those in flight on ``incarnation`` through the runner."""
        for task in list(self.pending.values()):
            self.finish(task, error=TaskCancelled(f"task {task.id} was cancelled before it started"))
        if self.in_flight and incarnation is not None:
            # Tagged with the incarnation, so a cancel-all left over from one that
            # died never reaches the next.
            self.control_send.send_nowait((proto.Cancel(None), incarnation))
            for task in self.in_flight.values():
                self.drop_events(task)

    def drop_events(self, task: Task) -> None:
        """Cancel means stop: the consumer gets no event from now on, and the runner no credits."""
        task.cancel_sent = True
        self.events_dropped += len(task.events)
        task.events.clear()

    def finish(
        self, task: Task, result: Any = None, error: TaskError | RunnerUnavailable | None = None
    ) -> None:
        """Settle ``task`` with its result or error and wake its consumer. Idempotent."""
        if task.done:
            return
        task.done = True
        task.result = result
        if error is not None:
            if isinstance(error, TaskError):
                error.task_id = task.id
            task.error = error
        task.request = None
        self.pending.pop(task.id, None)
        self.in_flight.pop(task.id, None)
        self.completed += 1
        task.wake()

    def fail_all(self, error: Callable[[], TaskError | RunnerUnavailable], *, crashes: bool = False) -> None:
        """End every pending and in-flight task with ``error()``.

        With ``crashes``, a retry=True task waiting out a crash ends with that
        crash instead: the runner will not come back for it.
        """
        for task in [*self.pending.values(), *self.in_flight.values()]:
            if crashes and task.crashed is not None:
                self.finish(task, error=RunnerCrashed(task.crashed))
            else:
                self.finish(task, error=error())

    def settle_exit(self, running: Collection[int], record: ExitRecord) -> None:
        """The runner died: settle each task in flight, or queue it again ahead of the pending ones.

        ``running`` holds the tasks the runner acknowledged (started) and did
        not finish; the socket was read to end-of-file, so the others never started.
        """
        requested = record.reason is ExitReason.REQUESTED
        retried: dict[int, Task] = {}
        for task in list(self.in_flight.values()):
            if task.id not in running and not task.cancel_sent and not requested:
                # Never started: the runner writes a task's ACK before handle() runs,
                # and the socket was read to EOF. Deliver it again, as if it had waited.
                del self.in_flight[task.id]
                task.reset_delivery()
                retried[task.id] = task
            elif task.cancel_sent:
                # Cancelled, and the runner died before confirming: that is its outcome.
                self.finish(task, error=TaskCancelled(f"task {task.id} was cancelled"))
            elif task.retry and not task.released and not requested:
                del self.in_flight[task.id]
                task.reset_delivery()
                task.cancel_sent = False
                task.attempt += 1
                task.crashed = record
                retried[task.id] = task
            else:
                self.finish(task, error=RunnerCrashed(record))
        if retried:
            self.pending = {**dict(sorted(retried.items())), **self.pending}
            self._pending_wake.set()

    def owed(self) -> Collection[Task]:
        """The tasks sent whose outcome the runner still owes: every one in flight."""
        return self.in_flight.values()

    def busy(self, running: Collection[int]) -> bool:
        """Whether the runner should be making progress: a task runs and its consumer keeps up."""
        owed = self.owed()
        if not owed:
            return False
        started = [task for task in owed if task.id in running]
        if not started:
            return True  # tasks sent, none acknowledged yet
        # A task whose window is full waits for its consumer, not for the runner.
        window = self.window
        return any(task.received - task.returned < window for task in started)


class TaskHandle(Generic[EventT, ResultT]):
    """One task in flight, from :meth:`Supervisor.stream`.

    Iterate it for the events the runner emits, in order. A successful task
    ends the ``async for`` normally; a failed, cancelled or crashed task makes
    it raise that exception after every event that arrived before the end.
    Each step is a checkpoint for cancellation (a cancelled consumer stops at
    the next event, however many are queued), and every ``CHECKPOINT_EVERY``
    events it also yields to the scheduler.

    **Cancellation:** cancelling the task that iterates (or awaits ``wait()``)
    cancels the task in the runner, and leaving the ``stream`` block early
    does the same and returns at once.
    """

    __slots__ = ("_since_checkpoint", "_table", "_task")

    def __init__(self, table: TaskTable, task: Task) -> None:
        self._table = table
        self._task = task
        self._since_checkpoint = 0

    @property
    def id(self) -> int:
        """The task's id, unique within its supervisor; ``ctx.task_id`` in the child."""
        return self._task.id

    @property
    def done(self) -> bool:
        """True once the task has its outcome."""
        return self._task.done

    @property
    def attempt(self) -> int:
        """1, then 2, 3 ... each time a ``retry=True`` task is re-run after a crash.

        A re-run streams its events again from the start: a consumer that must
        not see an event twice checks ``attempt`` as it iterates.
        """
        return self._task.attempt

    def __aiter__(self) -> TaskHandle[EventT, ResultT]:
        return self

    async def __anext__(self) -> EventT:
        task = self._task
        while True:
            if task.events:
                self._since_checkpoint += 1
                if self._since_checkpoint >= CHECKPOINT_EVERY:
                    # A full checkpoint every N events, not every one: a
                    # reschedule per event caps delivery far below the
                    # transport's rate.
                    self._since_checkpoint = 0
                    await trio.lowlevel.checkpoint()
                    if not task.events:
                        continue
                else:
                    # The cancel half of trio's checkpoint contract, on every
                    # event: a cancelled consumer stops at the next one, however
                    # many are queued. Cheap: no reschedule unless cancelled.
                    await trio.lowlevel.checkpoint_if_cancelled()
                event = task.events.popleft()
                self._table.consumed(task, 1)
                return event
            if task.done:
                if task.error is None:
                    raise StopAsyncIteration
                raise task.error
            await self._table.wait_change(task)
            # That wait was a checkpoint: a batch that just arrived is not
            # interrupted by another one part-way through.
            self._since_checkpoint = 0

    @property
    def result(self) -> ResultT:
        """The task's result; raises its error. Only once the task is done.

        Raises:
            RuntimeError: the task has not finished yet (use ``await wait()``).
        """
        task = self._task
        if not task.done:
            raise RuntimeError(f"task {task.id} is still running: use 'await task.wait()' for its result")
        if task.error is not None:
            raise task.error
        return task.result

    async def wait(self) -> ResultT:
        """Wait for the outcome and return the result (or raise the error).

        Events not yet read are discarded, so a task whose events nobody wants
        never stalls on its flow-control window.
        """
        task = self._task
        table = self._table
        blocked = False
        while True:
            if task.events:
                count = len(task.events)
                task.events.clear()
                table.consumed(task, count)
            if task.done:
                break
            await table.wait_change(task)
            blocked = True
        if not blocked:
            # Blocking above was already a checkpoint; another costs a whole loop pass.
            await trio.lowlevel.checkpoint()
        return self.result

    def batches(self) -> AsyncIterator[list[EventT]]:
        """Iterate the events in batches: each step yields every event that has arrived.

        The same events, in the same order, and the same ending as iterating
        the handle itself, but one step per batch instead of one per event: use
        it when events come faster than a per-event ``async for`` can take them.
        Do not mix the two on one handle.
        """
        batches: Batches[EventT] = Batches(self._table, self._task)
        return batches

    async def cancel(self) -> None:
        """Ask the runner to cancel this task. Idempotent.

        Returns once the cancel is handed to the cancel channel; it does not
        wait for the runner. The outcome (usually :class:`TaskCancelled`, or the
        result if the task finished first) arrives through this handle.
        """
        self._table.cancel(self._task)
        await trio.lowlevel.checkpoint()


class Batches(Generic[EventT]):
    """The async iterator behind :meth:`TaskHandle.batches`."""

    __slots__ = ("_table", "_task")

    def __init__(self, table: TaskTable, task: Task) -> None:
        self._table = table
        self._task = task

    def __aiter__(self) -> Batches[EventT]:
        return self

    async def __anext__(self) -> list[EventT]:
        task = self._task
        while not task.events:
            if task.done:
                if task.error is None:
                    raise StopAsyncIteration
                raise task.error
            await self._table.wait_change(task)
        await trio.lowlevel.checkpoint()  # more events may arrive meanwhile: they join this batch
        batch: list[EventT] = list(task.events)
        task.events.clear()
        self._table.consumed(task, len(batch))
        return batch
