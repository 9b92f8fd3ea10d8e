"""Groups: one supervisor over N ranks of the same runner class, one_for_all.

A :class:`GroupIncarnation` is one generation of the group: one
:class:`~trio_runner._incarnation.Incarnation` per rank, started together,
READY once every rank is, and stopped together as soon as any rank is gone
(one_for_all). It gives the supervisor's restart loop the same small interface
an ``Incarnation`` does, so the loop reads the same for one process or N.

The design decision: tasks stay in the supervisor's one table, a
:class:`GroupTable`, which is rank 0's view (its events reach the caller).
Every other rank gets a :class:`FollowerTable` for the generation, which
mirrors what is queued and cancelled and reports each outcome back. A task
settles once every rank has reported: with the first failure, else with rank
0's result. Each rank receives the tasks in submission order, as the ranks of
a collective must.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Callable, Collection
from typing import Any, Protocol

import trio

from . import _protocol as proto
from ._errors import ExitReason, ExitRecord, RunnerUnavailable, TaskError
from ._exits import ExitFacts
from ._incarnation import Incarnation
from ._process import SpawnSpec, Worker, WorkerFactory
from ._runner import GroupInfo
from ._tasks import Task, TaskTable

logger = logging.getLogger("trio_runner")

_LOOPBACK = "127.0.0.1"


class _Reports:
    """What the ranks said so far about one task."""

    __slots__ = ("error", "ranks", "result")

    def __init__(self) -> None:
        self.ranks: set[int] = set()
        self.result: Any = None
        self.error: TaskError | RunnerUnavailable | None = None


class GroupTable(TaskTable):
    """The supervisor's task table for a group: rank 0's view, with every rank's outcome awaited.

    Attributes:
        size: how many ranks the group has.
        followers: the tables of ranks 1 .. size-1 for the current generation
            (empty between generations).
        ports: the ports the last generation used; the next one never reuses them.
    """

    __slots__ = ("_reports", "followers", "ports", "size")

    def __init__(self, window: int, max_frame: int, size: int) -> None:
        super().__init__(window, max_frame)
        self.size = size
        self.followers: list[FollowerTable] = []
        self.ports: tuple[int, ...] = ()
        self._reports: dict[int, _Reports] = {}

    def queue(self, task: Task) -> None:
        super().queue(task)
        for follower in self.followers:
            follower.queue(follower.mirror(task))

    def cancel(self, task: Task) -> None:
        super().cancel(task)
        for follower in self.followers:
            follower.cancel_id(task.id)

    def cancel_all(self, incarnation: int | None) -> None:
        super().cancel_all(incarnation)
        for follower in self.followers:
            follower.cancel_all(incarnation)

    # -- rank 0's outcomes, and the others' --------------------------------------

    def route_result(self, task_id: int, payload: Any) -> bool:
        task = self.in_flight.get(task_id)
        if task is None or task.done:
            return False
        result = self.unpack(task, payload, "the result")
        if task.done:
            return False
        self.report(task_id, 0, result=result)
        return True

    def settle(self, task_id: int, error: TaskError) -> None:
        self.report(task_id, 0, error=error)

    def report(
        self,
        task_id: int,
        rank: int,
        *,
        result: Any = None,
        error: TaskError | RunnerUnavailable | None = None,
    ) -> None:
        """Rank ``rank`` ended task ``task_id``; the task settles once every rank has."""
        task = self.in_flight.get(task_id)
        if task is None or task.done:
            return  # settled already (a crash, a cancel before it was sent, an unpicklable result)
        reports = self._reports.get(task_id)
        if reports is None:
            reports = self._reports[task_id] = _Reports()
        if rank in reports.ranks:
            return
        reports.ranks.add(rank)
        if rank == 0:
            reports.result = result
        if error is not None and reports.error is None:
            reports.error = error
            # The others cannot finish it meaningfully (their peer left the
            # collective): ask them to stop. A rank blocked in a collective
            # does not see the cancel; Timeouts.stall is for that.
            if 0 not in reports.ranks:
                self.control_send.send_nowait((proto.Cancel(task_id), task.incarnation))
            for follower in self.followers:
                if follower.rank not in reports.ranks:
                    follower.cancel_id(task_id)
            if task.done:
                return  # a follower's cancel just completed it
        if len(reports.ranks) == self.size:
            if reports.error is None:
                self.finish(task, result=reports.result)
            else:
                self.finish(task, error=reports.error)

    def finish(
        self, task: Task, result: Any = None, error: TaskError | RunnerUnavailable | None = None
    ) -> None:
        self._reports.pop(task.id, None)
        super().finish(task, result, error)

    def owed(self) -> list[Task]:
        """The tasks rank 0 has not ended yet (the others' are the followers' to owe)."""
        return [
            task
            for task in self.in_flight.values()
            if (reports := self._reports.get(task.id)) is None or 0 not in reports.ranks
        ]

    def settle_exit(self, running: Collection[int], record: ExitRecord) -> None:
        """The group is gone: a task a rank failed ends with that failure, the others as for a lone runner.

        A task any rank started or ended counts as started (``running`` holds
        every rank's), so it is not delivered again unless it is ``retry=True``.
        """
        started = {*running, *self._reports}
        for task_id, reports in list(self._reports.items()):
            task = self.in_flight.get(task_id)
            if task is not None and reports.error is not None:
                self.finish(task, error=reports.error)
        self._reports.clear()
        self.followers = []
        super().settle_exit(started, record)


class FollowerTable(TaskTable):
    """The tasks as rank ``rank`` (not 0) of one generation sees them; outcomes go to the group's table."""

    __slots__ = ("_group", "rank")

    def __init__(self, group: GroupTable, rank: int) -> None:
        super().__init__(group.window, group.max_frame)
        self._group = group
        self.rank = rank

    @staticmethod
    def mirror(task: Task) -> Task:
        """This rank's copy of ``task``: the same id and request."""
        assert task.request is not None
        return Task(task.id, task.request, task.retry)

    def cancel_id(self, task_id: int) -> None:
        task = self.pending.get(task_id) or self.in_flight.get(task_id)
        if task is not None:
            self.cancel(task)

    def route_result(self, task_id: int, payload: Any) -> bool:
        # A marker (see _outbox.FOLLOWER_RESULT): the caller gets rank 0's result.
        task = self.in_flight.get(task_id)
        if task is None or task.done:
            return False
        self.finish(task)
        return True

    def finish(
        self, task: Task, result: Any = None, error: TaskError | RunnerUnavailable | None = None
    ) -> None:
        if task.done:
            return
        super().finish(task, result, error)
        self._group.report(task.id, self.rank, error=error)


class RankFactory(Protocol):
    """Makes one rank's :class:`Incarnation` (the supervisor binds the options they share)."""

    def __call__(
        self,
        number: int,
        worker: Worker,
        *,
        tasks: TaskTable,
        on_ready: Callable[[Incarnation, float], None],
        on_exit: Callable[[Incarnation, ExitRecord], None],
        rank: int | None = None,
    ) -> Incarnation: ...


def fresh_ports(count: int, avoid: Collection[int]) -> tuple[int, ...]:
    """``count`` distinct free loopback ports, none of them in ``avoid``.

    The kernel picks each (bind to port 0); the sockets stay open until all
    are picked, so no port comes twice. A rank of an older generation may
    still listen on ``avoid``: a new rank must never reach it.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind((_LOOPBACK, 0))
            port: int = sock.getsockname()[1]
            if port not in avoid:
                ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return tuple(ports)


class GroupIncarnation:
    """One generation of a group: an :class:`Incarnation` per rank, run and stopped together.

    The supervisor uses it as it uses an ``Incarnation``: :meth:`start`, then
    :meth:`run`, which returns once every rank's process is gone. ``on_ready``
    is called once every rank is READY; ``on_exit`` as soon as the first rank
    is gone, with that rank's exit record (its ``rank`` says which), while
    the others are being stopped.
    """

    def __init__(
        self,
        number: int,
        spec: SpawnSpec,
        worker_factory: WorkerFactory,
        make_rank: RankFactory,
        *,
        tasks: GroupTable,
        on_ready: Callable[[GroupIncarnation, float], None],
        on_exit: Callable[[GroupIncarnation, ExitRecord], None],
    ) -> None:
        self.number = number
        self._tasks = tasks
        self._on_ready = on_ready
        self._on_exit = on_exit
        size = tasks.size
        self.ports = tasks.ports = fresh_ports(size, avoid=tasks.ports)
        addresses = tuple(f"{_LOOPBACK}:{port}" for port in self.ports)
        followers = [FollowerTable(tasks, rank) for rank in range(1, size)]
        for follower in followers:
            for task in tasks.pending.values():
                follower.queue(follower.mirror(task))
        tasks.followers = followers
        self.ranks: list[Incarnation] = []
        for rank in range(size):
            place = GroupInfo(rank=rank, size=size, generation=number, addresses=addresses)
            worker = worker_factory(dataclasses.replace(spec, group=place), number)
            self.ranks.append(
                make_rank(
                    number,
                    worker,
                    tasks=tasks if rank == 0 else followers[rank - 1],
                    on_ready=self._rank_ready,
                    on_exit=self._rank_exit,
                    rank=rank,
                )
            )
        self.spawned_at = 0.0
        self.ready = False
        self.ready_at = 0.0
        self.last_progress = 0.0
        self.ready_event = trio.Event()
        self.stop_requested = False
        self.reported = False  # its exit has been reported and its tasks settled
        self.decision: tuple[float | None, BaseException | None] = (None, None)
        self._first: Incarnation | None = None  # the rank that went first
        self._record: ExitRecord | None = None

    @property
    def pids(self) -> tuple[int | None, ...]:
        return tuple(inc.worker.pid for inc in self.ranks)

    @property
    def running(self) -> set[int]:
        """The tasks any rank acknowledged and has not finished."""
        running: set[int] = set()
        for inc in self.ranks:
            running |= inc.running
        return running

    def facts(self) -> ExitFacts:
        """What is known of the rank that went first (rank 0 while none has)."""
        return (self._first or self.ranks[0]).facts()

    def poke_watchdog(self) -> None:
        for inc in self.ranks:
            inc.poke_watchdog()

    def request_stop(self) -> None:
        self.stop_requested = True
        for inc in self.ranks:
            inc.request_stop()

    def send_now(self, task: Task) -> bool:
        """Write ``task`` to every rank now if rank 0 can take it; False, having done nothing, if not."""
        if not self.ranks[0].send_now(task):
            return False
        for inc, follower in zip(self.ranks[1:], self._tasks.followers, strict=True):
            mirror = follower.mirror(task)
            if not inc.send_now(mirror):
                follower.queue(mirror)
        return True

    async def start(self) -> ExitRecord | None:
        """Start every rank's process: None, or the record of a rank that could not be started."""
        records: list[ExitRecord | None] = [None] * len(self.ranks)

        async def start_rank(rank: int) -> None:
            records[rank] = await self.ranks[rank].start()

        async with trio.open_nursery() as nursery:
            for rank in range(len(self.ranks)):
                nursery.start_soon(start_rank, rank)
        self.spawned_at = self.last_progress = trio.current_time()
        for inc, record in zip(self.ranks, records, strict=True):
            if record is not None:
                # Those that did start go first, with the usual escalation, and are reaped.
                self._first, self._record = inc, record
                started = [other for other, rec in zip(self.ranks, records, strict=True) if rec is None]
                for other in started:
                    other.request_stop()
                async with trio.open_nursery() as nursery:
                    for other in started:
                        nursery.start_soon(other.run)
                return record
        return None

    async def run(self) -> ExitRecord:
        """Serve the group until every rank's process is gone; the exit record of the first to go."""
        async with trio.open_nursery() as nursery:
            for inc in self.ranks:
                nursery.start_soon(inc.run)
        assert self._record is not None
        return self._record

    async def aclose(self) -> None:
        for inc in self.ranks:
            await inc.aclose()

    def _rank_ready(self, inc: Incarnation, now: float) -> None:
        inc.ready = True
        inc.ready_at = inc.last_progress = now
        inc.poke_watchdog()
        logger.info(
            "runner %r rank %s ready (pid %s) after %.3f s",
            inc.name,
            inc.rank,
            inc.worker.pid,
            now - inc.spawned_at,
        )
        if self.ready or self._record is not None or not all(rank.ready for rank in self.ranks):
            return
        self._on_ready(self, now)
        for rank in self.ranks:  # only now: every rank gets its tasks in the same order
            rank.ready_event.set()

    def _rank_exit(self, inc: Incarnation, record: ExitRecord) -> None:
        if self._record is not None:
            logger.info(
                "runner %r rank %s (pid %s) stopped with its group: %s",
                inc.name,
                inc.rank,
                inc.worker.pid,
                record.describe(),
            )
            return
        if record.reason is ExitReason.STARTUP_FAILED:
            record = dataclasses.replace(record, stderr_tail=self._every_tail(inc, record))
        # one_for_all: the first rank to go takes the group with it.
        self._first, self._record = inc, record
        for other in self.ranks:
            if other is not inc:
                other.request_stop()
        self._on_exit(self, record)

    def _every_tail(self, first: Incarnation, record: ExitRecord) -> tuple[str, ...]:
        """Every rank's stderr tail, each line marked with its rank, the rank that went first's first.

        A group that cannot start often fails on one rank because of another
        (a rank that never connects): the others' last lines say why.
        """
        lines = [f"[rank {first.rank}] {line}" for line in record.stderr_tail]
        for other in self.ranks:
            if other is not first:
                lines.extend(f"[rank {other.rank}] {line}" for line in other.stderr_tail)
        return tuple(lines)
