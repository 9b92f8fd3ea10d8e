"""The child-side API a user implements: :class:`Runner` and :class:`TaskContext`.

This module is imported inside the child, so it imports neither trio nor
anything heavy: ``from trio_runner import Runner`` in a runner module costs only
the standard library.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from . import _validate as check
from ._errors import TaskCancelled

if TYPE_CHECKING:
    from ._outbox import FollowerEmitter, Outbox, TaskSlot

RequestT = TypeVar("RequestT")
EventT = TypeVar("EventT")
ResultT = TypeVar("ResultT")


class TaskContext(Generic[EventT]):
    """Handed to :meth:`Runner.handle` for one task.

    A thin facade over the child's state for the task: safe to use from any
    thread of the runner.

    Attributes:
        task_id: the supervisor's id of this task, unique within one supervisor.
        cancelled: True once a cancel for this task reached the child. The
            child's reader thread sets it the moment the frame arrives, even
            while ``handle()`` runs.
    """

    __slots__ = ("_outbox", "_slot")

    def __init__(self, slot: TaskSlot, outbox: Outbox | FollowerEmitter) -> None:
        self._slot = slot
        self._outbox = outbox

    @property
    def task_id(self) -> int:
        return self._slot.task_id

    @property
    def cancelled(self) -> bool:
        return self._slot.cancelled

    def emit(self, event: EventT) -> None:
        """Stream one event to the task's consumer in the parent.

        Events are batched on the way out and arrive in order, before the
        task's result. Each task has a window of events the parent has not yet
        consumed; when it is used up, ``emit`` blocks until the consumer catches
        up. Each task has a lock of its own: an emit never waits for another task's.

        Raises:
            TaskCancelled: if the task has been cancelled (also while ``emit``
                waits for the consumer), so a handler that only emits stops
                even if it never checks ``cancelled``.
        """
        self._outbox.emit(self._slot, event)

    def emit_many(self, events: Iterable[EventT]) -> None:
        """Stream several events at once: the same as ``emit`` for each, in order, but
        with one lock round trip per window instead of one per event.

        Raises:
            TaskCancelled: as for ``emit``; the events queued before the cancel
                arrived are dropped, not sent.
        """
        self._outbox.emit_many(self._slot, events)

    def raise_if_cancelled(self) -> None:
        """Raise :class:`TaskCancelled` if a cancel for this task has arrived."""
        if self._slot.cancelled:
            raise TaskCancelled(f"task {self._slot.task_id} was cancelled")


@dataclass(frozen=True)
class GroupInfo:
    """A runner's place in a group of ranks (``open_supervisor(..., ranks=N)``).

    Every rank runs the same runner class; the supervisor gives each its place
    before ``setup()``. ``addresses`` holds one ``"host:port"`` per rank, in rank
    order: the ports are fresh for every generation (every restart of the
    group), so a rank left from an earlier generation can never answer on them.

    Attributes:
        rank: this runner's rank, from 0 to ``size - 1``. Rank 0's events and
            result are what the caller sees.
        size: how many ranks the group has.
        generation: the group's incarnation number, 1 for the first start.
        addresses: one loopback ``"127.0.0.1:port"`` per rank, for the
            distributed engine to connect the ranks (MLX's ``ring`` hostfile).
    """

    rank: int
    size: int
    generation: int
    addresses: tuple[str, ...]


class Runner(Generic[RequestT, EventT, ResultT]):
    """Subclass this to define the work that runs in the child process.

    The child builds the instance with the positional and keyword arguments the
    supervisor was given, so the class must be importable by its module path
    (spawn starts a fresh interpreter and imports it there).

    Lifecycle: ``setup()`` once, then ``handle()`` for each task, then
    ``teardown()`` on a graceful shutdown.

    Attributes:
        concurrency: how many tasks ``handle()`` serves at once. With the
            default of 1, tasks run one at a time in the child's main thread,
            so a task whose consumer stops reading holds the runner until it
            is cancelled. With N > 1, N threads serve tasks and ``handle()``
            must be thread-safe; a stalled consumer then blocks only its own
            task while the others keep flowing.
        linger: how long, in seconds, events may wait to be sent together.
            A task's first event, and any event after a quiet spell this
            long, goes out at once; events that come faster are sent in
            batches about ``linger`` apart (what a stream leaves queued when
            it pauses, 2 ms after ``linger``). The default of 5 ms costs a
            fast stream one frame (and one wake-up of the parent) per 5 ms
            instead of one per event; 0 sends every event at once.
        group: the runner's :class:`GroupInfo` when it is one rank of a
            group, set before ``setup()`` (not yet in ``__init__``); None for a
            runner on its own.
    """

    concurrency: int = 1
    linger: float = 0.005
    group: GroupInfo | None = None

    def setup(self) -> None:
        """Load the model, warm up. Raising here is a startup failure."""

    def handle(self, request: RequestT, ctx: TaskContext[EventT]) -> ResultT:
        """Serve one request. Stream with ``ctx.emit``; the return value is the result.

        Raising fails this one task with :class:`~trio_runner.TaskFailed`; the
        runner keeps serving. Check ``ctx.cancelled`` (or call
        ``ctx.raise_if_cancelled()``) at every step of long work.
        """
        raise NotImplementedError(f"{type(self).__qualname__} must implement handle()")

    def teardown(self) -> None:
        """Release resources on a graceful shutdown."""


def check_serving(owner: str, concurrency: object, linger: object) -> None:
    """Check how a runner serves (``concurrency``, ``linger``); both sides call this, so both raise alike."""
    check.integer(f"{owner}.concurrency", concurrency, minimum=1, fix="it counts the tasks served at once")
    check.seconds(f"{owner}.linger", linger, maximum=1)
