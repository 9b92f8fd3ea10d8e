"""What the parent writes to one incarnation's runner: tasks, cancels, credits and Shutdown.

:class:`Sender` owns the write side of an incarnation's socket. Every write
goes through one lock (:meth:`Sender.send_locked`), so frames never
interleave; the one exception is :meth:`Sender.send_now`, the fast path that
writes a small task without waiting when nothing is ahead of it, and leaves
what the socket did not take as a backlog that the next locked write sends
first. The state it reads (READY, stopping, exited, tasks running) and the
progress it records belong to the :class:`~trio_runner._incarnation.Incarnation`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import trio

from . import _payloads
from . import _protocol as proto
from ._errors import ExitReason
from ._tasks import Task, TaskTable
from ._timeouts import Timeouts

if TYPE_CHECKING:
    from ._incarnation import Incarnation

_SEND_SLICE = 256 * 1024  # the most of a big request written to the socket in one call
# The tasks the sender writes in one go add up to at most this share of
# max_frame_size: a batch is pickled on the loop, so its size bounds the time
# that takes, and it fits in one frame or two.
_SEND_BATCH_SHARE = 0.5


class Sender:
    """The write side of one incarnation: :meth:`send_now`, and the sender tasks its nursery runs."""

    def __init__(self, inc: Incarnation, tasks: TaskTable, timeouts: Timeouts, max_frame: int) -> None:
        self._inc = inc
        self._worker = inc.worker
        self._tasks = tasks
        self._timeouts = timeouts
        self._max_frame = max_frame
        self._lock = trio.StrictFIFOLock()
        # The unsent end of a task frame that ``send_now`` wrote without waiting;
        # whoever takes the lock next sends it first.
        self._backlog = b""

    def send_now(self, task: Task) -> bool:
        """Write the task straight to a ready runner's socket if nothing is ahead of it.

        Handing it to the sender task instead costs a loop pass: a third of a
        small task's round trip. False, having done nothing, if the task must
        queue (not ready, tasks or bytes ahead of it, a send in progress).
        """
        tasks = self._tasks
        inc = self._inc
        if (
            tasks.pending
            or self._backlog
            or not inc.ready_event.is_set()
            or inc.stop_requested
            or inc.exited.is_set()
            or self._lock.locked()
            or task.request is None
            or len(task.request) >= _payloads.LARGE_REQUEST  # sent in parts by _send_tasks, not copied
        ):
            return False
        data = tasks.mark_sent([task], inc.number)
        assert isinstance(data, bytes)
        inc.last_progress = trio.current_time()
        if self._timeouts.stall is not None:
            inc.poke_watchdog()  # only the stall check depends on what was sent
        sent = self._worker.send_nowait(data)
        if sent < len(data):
            self._backlog = data[sent:]
            tasks.wake_sender()  # the sender task writes the rest
        return True

    async def send_tasks(self) -> None:
        """Deliver pending tasks once the runner is READY, in submission order."""
        inc = self._inc
        await inc.ready_event.wait()
        limit = int(self._max_frame * _SEND_BATCH_SHARE)
        tasks = self._tasks
        while not inc.stop_requested:
            if not tasks.pending:
                if self._backlog:
                    await self.send_locked(b"")
                    continue
                await tasks.wait_pending()
                continue
            batch = tasks.next_batch(limit)
            if inc.exited.is_set():
                return  # the exit is being reported: these wait for the next incarnation
            data = tasks.mark_sent(batch, inc.number)
            inc.last_progress = trio.current_time()
            if self._timeouts.stall is not None:
                inc.poke_watchdog()  # only the stall check depends on what was sent
            await self.send_locked(data)
            del data  # a big request's pieces: held by the task alone now, freed with it off the loop

    async def send_control(self) -> None:
        """The cancel channel: cancels and credits, each write bounded by ``cancel_send``."""
        timeout = self._timeouts.cancel_send
        tasks = self._tasks
        inc = self._inc
        control = tasks.control_recv
        while True:
            items = [await control.receive()]
            while True:
                try:
                    items.append(control.receive_nowait())
                except trio.WouldBlock:
                    break
            messages: list[proto.Cancel | proto.Credit] = []
            for message, incarnation in items:
                # Items are tagged with the incarnation they were meant for at the
                # moment they were queued: one left over from a runner that died
                # never reaches the next (a stale credit would over-grant a window).
                if incarnation != inc.number:
                    continue
                match message:
                    case proto.Cancel():
                        # Sent even for a task the parent already ended (say, its
                        # event did not unpickle): the runner must stop working on it.
                        messages.append(message)
                    case proto.Credit(task_id) if task_id in tasks.in_flight:
                        messages.append(message)
                        if task_id in inc.running:
                            inc.last_progress = trio.current_time()
                    case proto.Credit():
                        pass  # finished meanwhile
            if not messages:
                continue
            with trio.move_on_after(timeout) as scope:
                # A burst of cancels or credits is split like any other batch.
                await self.send_locked(proto.encode_frames(messages, self._max_frame))
            if scope.cancelled_caught:
                inc.kill(
                    ExitReason.HUNG,
                    f"a cancel could not be written within Timeouts(cancel_send={timeout}): "
                    "the runner has stopped reading its control socket",
                )
                return

    async def send_locked(self, data: bytes | list[proto.Buffer]) -> None:
        """``send_all`` under the send lock, without a schedule point when the lock is free.

        ``async with lock`` yields once even uncontended: a whole loop pass per task sent.
        The backlog a fast-path send left goes first. ``data`` may be a list of
        parts (a big request), written in turn, never joined.
        """
        lock = self._lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if isinstance(data, list):
                if self._backlog:
                    backlog, self._backlog = self._backlog, b""
                    await self._worker.send_all(backlog)
                for part in data:
                    with memoryview(part) as view:
                        # In slices: one send of a whole big payload to a peer that
                        # keeps reading can copy for tens of milliseconds in one call.
                        for offset in range(0, len(view), _SEND_SLICE):
                            # Any bytes-like will do: trio's send_all writes from a memoryview of it.
                            await self._worker.send_all(cast(bytes, view[offset : offset + _SEND_SLICE]))
                return
            if self._backlog:
                data, self._backlog = self._backlog + data, b""
            await self._worker.send_all(data)
        finally:
            lock.release()
