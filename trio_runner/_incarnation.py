"""One incarnation: a spawn of the runner process, served until it is gone.

:class:`Incarnation` owns what happens between the spawn and the exit record:
one nursery of tasks that forward the runner's messages (to the task table, or
to the lifecycle), send it tasks, cancels and credits (its :class:`Sender`,
``_sender``), enforce the timeouts (the watchdog) and carry out a stop
(Shutdown, SIGTERM, SIGKILL). When the
process is gone and its socket and pipes are drained, :func:`classify_exit`
turns what was seen into the :class:`ExitRecord` that :meth:`Incarnation.run`
returns. Restarting is the supervisor's business, not this module's.
"""

from __future__ import annotations

import logging
import signal
from collections import deque
from collections.abc import Callable

import trio

from . import _payloads
from . import _protocol as proto
from ._childlog import ChildLog, last_lines
from ._errors import ExitReason, ExitRecord, StoppedBy, TaskCancelled, TaskError, TaskFailed
from ._exits import UNKNOWN_STATUS, ExitFacts, ExitStatus, Fatal, classify_exit
from ._process import Worker
from ._sender import Sender
from ._tasks import TaskTable
from ._timeouts import Timeouts

logger = logging.getLogger("trio_runner")

DRAIN_BOUND = 1.0  # after death: read the socket to EOF and stdio to the end, at most this long
# EOF on the control socket from a process still alive this long after it: the
# runner closed its connection. A dying process closes it too, a moment before
# its death is seen.
_EOF_GRACE = 1.0
_STDERR_TAIL = 50


class Incarnation:
    """One spawn of the runner process, its tasks, and what the supervisor knows of it.

    The supervisor makes one per spawn, calls :meth:`start`, then :meth:`run`,
    which returns once the process is gone. ``on_ready`` is called when the
    runner reports READY; ``on_exit`` with the exit record as soon as it is
    known, before the incarnation's tasks have wound down.
    """

    def __init__(
        self,
        number: int,
        worker: Worker,
        *,
        name: str,
        tasks: TaskTable,
        timeouts: Timeouts,
        max_frame: int,
        payload_limiter: trio.CapacityLimiter,
        child_log: ChildLog,
        on_ready: Callable[[Incarnation, float], None],
        on_exit: Callable[[Incarnation, ExitRecord], None],
        rank: int | None = None,
    ) -> None:
        self.number = number
        self.worker = worker
        self.rank = rank  # its rank in a group (``_group``), None alone
        self.name = name
        self._tasks = tasks
        self._timeouts = timeouts
        self._max_frame = max_frame
        self._payload_limiter = payload_limiter
        self._child_log = child_log
        self._on_ready = on_ready
        self._on_exit = on_exit
        self.spawned_at = 0.0
        self.hello = False
        self.ready = False
        self.ready_at = 0.0
        self.last_frame: float | None = None
        self.last_progress = 0.0
        self.running: set[int] = set()  # tasks the child acknowledged and has not finished
        self.fatal: Fatal | None = None
        self.kill_reason: ExitReason | None = None
        self.kill_detail = ""
        self.stop_requested = False
        self.stopped_by = StoppedBy.SELF
        self.exited = trio.Event()
        self.eof = trio.Event()
        self.output_done = trio.Event()
        self.escalate = trio.Event()
        self.ready_event = trio.Event()
        self.watch_wake = trio.Event()
        self.reported = False  # its exit has been reported and its tasks settled
        # What the policy made of the exit: (backoff or None to stop, error to raise).
        self.decision: tuple[float | None, BaseException | None] = (None, None)
        self.death_scope = trio.CancelScope()
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL)
        self.sender = Sender(self, tasks, timeouts, max_frame)
        # An attribute, not a method: it is on every small task's round trip.
        self.send_now = self.sender.send_now

    @property
    def pids(self) -> tuple[int | None]:
        """Its process id, as a group gives one per rank."""
        return (self.worker.pid,)

    def poke_watchdog(self) -> None:
        self.watch_wake.set()

    def request_stop(self) -> None:
        """Stop gracefully: Shutdown, then SIGTERM, then SIGKILL (see ``_escalation``)."""
        self.stop_requested = True
        self.escalate.set()

    def facts(self) -> ExitFacts:
        """What is known of this incarnation, for ``classify_exit``."""
        return ExitFacts(
            incarnation=self.number,
            pid=self.worker.pid,
            stop_requested=self.stop_requested,
            kill_reason=self.kill_reason,
            kill_detail=self.kill_detail,
            ready=self.ready,
            hello=self.hello,
            fatal=self.fatal,
            stopped_by=self.stopped_by,
            stderr_tail=tuple(self.stderr_tail),
            kill_timeout=self._timeouts.kill,
            rank=self.rank,
        )

    # -- start, run, stop ---------------------------------------------------------

    async def start(self) -> ExitRecord | None:
        """Start the process: None, or the exit record of a process that could not be started."""
        try:
            await self.worker.start()
        except (OSError, EOFError) as exc:
            # What starting a process can meet: fork or exec failing, too many
            # open files, a forkserver that died (EOFError). Anything else is a
            # bug, and raises as one rather than pass for a runner that failed.
            return ExitRecord(
                ExitReason.STARTUP_FAILED,
                incarnation=self.number,
                rank=self.rank,
                detail=f"could not start the runner process: {type(exc).__name__}: {exc}",
            )
        self.spawned_at = self.last_progress = trio.current_time()
        logger.info("runner %r spawned (pid %s, incarnation %d)", self.name, self.worker.pid, self.number)
        return None

    async def run(self) -> ExitRecord:
        """Serve the runner until its process is gone and drained; its exit record."""
        worker = self.worker
        status: ExitStatus | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward)
                nursery.start_soon(self._pump_output)
                nursery.start_soon(self.sender.send_tasks)
                nursery.start_soon(self.sender.send_control)
                nursery.start_soon(self._watchdog)
                nursery.start_soon(self._escalation)
                with self.death_scope:
                    status = await worker.wait(self._timeouts.kill)
                self.exited.set()
                # Grandchildren go with it, gracefully or not; they would also
                # hold the stdio pipes open and delay the drain below.
                worker.signal(signal.SIGKILL)
                # Drain to EOF first, or a result sent just before the crash is lost.
                with trio.move_on_after(DRAIN_BOUND):
                    await self.eof.wait()
                    await self.output_done.wait()
                # Report now, not after the incarnation's tasks have wound down
                # (a loop pass or two): nothing can be put in flight on it any
                # more (see ``Sender.send_tasks`` and ``send_now``).
                nursery.cancel_scope.cancel()
                record = classify_exit(self.facts(), status or UNKNOWN_STATUS)
                self._on_exit(self, record)
                return record
        finally:
            # Grandchildren survive a graceful exit: the whole group goes.
            worker.signal(signal.SIGKILL)

    async def aclose(self) -> None:
        """Release the transport and the process object, once the exit is decided on."""
        await self.worker.aclose()

    def kill(self, reason: ExitReason, detail: str) -> None:
        """SIGKILL the runner for ``reason`` (a timeout, a protocol error, a stuck cancel); first wins."""
        if self.kill_reason is not None or self.exited.is_set():
            return
        logger.warning("runner %r (pid %s): %s; killing it", self.name, self.worker.pid, detail)
        self.kill_reason = reason
        self.kill_detail = detail
        self.stopped_by = StoppedBy.SIGKILL
        self.worker.signal(signal.SIGKILL)
        self.escalate.set()

    async def _escalation(self) -> None:
        """Shutdown, then SIGTERM, then SIGKILL, each after its timeout; then stop waiting."""
        timeouts = self._timeouts
        worker = self.worker
        await self.escalate.wait()
        if self.kill_reason is None:
            self.stopped_by = StoppedBy.SHUTDOWN
            with trio.move_on_after(timeouts.graceful):
                await self.sender.send_locked(proto.encode([proto.Shutdown()]))
                await self.exited.wait()
            if self.exited.is_set():
                return
            logger.warning(
                "runner %r (pid %s) did not exit within Timeouts(graceful=%s) of Shutdown; "
                "sending SIGTERM to its process group",
                self.name,
                worker.pid,
                timeouts.graceful,
            )
            self.stopped_by = StoppedBy.SIGTERM
            worker.signal(signal.SIGTERM)
            with trio.move_on_after(timeouts.terminate):
                await self.exited.wait()
            if self.exited.is_set():
                return
            logger.warning(
                "runner %r (pid %s) ignored SIGTERM for Timeouts(terminate=%s); sending SIGKILL",
                self.name,
                worker.pid,
                timeouts.terminate,
            )
            self.stopped_by = StoppedBy.SIGKILL
            worker.signal(signal.SIGKILL)
        with trio.move_on_after(timeouts.kill):
            await self.exited.wait()
        if not self.exited.is_set():
            logger.error(
                "runner %r (pid %s) survived SIGKILL for Timeouts(kill=%s); no longer waiting for it",
                self.name,
                worker.pid,
                timeouts.kill,
            )
            self.death_scope.cancel()

    async def _watchdog(self) -> None:
        """Enforces the startup, heartbeat and stall timeouts, and a control connection closed early."""
        timeouts = self._timeouts
        eof_at: float | None = None
        while not (self.stop_requested or self.exited.is_set()):
            checks: list[tuple[float, ExitReason, str]] = []
            if not self.ready:
                checks.append(
                    (
                        self.spawned_at + timeouts.startup,
                        ExitReason.STARTUP_FAILED,
                        f"setup did not finish within Timeouts(startup={timeouts.startup})",
                    )
                )
            if self.eof.is_set():
                # The runner can no longer report anything, and no heartbeat will
                # come: say what happened instead of waiting to call it frozen.
                eof_at = trio.current_time() if eof_at is None else eof_at
                checks.append(
                    (
                        eof_at + _EOF_GRACE,
                        ExitReason.PROTOCOL_ERROR,
                        "the runner closed its control connection (end of file from a process still "
                        "alive), so it can no longer report results",
                    )
                )
            elif self.last_frame is not None:
                checks.append(
                    (
                        self.last_frame + timeouts.heartbeat,
                        ExitReason.HUNG,
                        f"no heartbeat for Timeouts(heartbeat={timeouts.heartbeat}) seconds: the runner is "
                        "frozen (stopped, or stuck holding the GIL), or cannot write to its control socket",
                    )
                )
            if timeouts.stall is not None and self.ready and self._tasks.busy(self.running):
                checks.append(
                    (
                        self.last_progress + timeouts.stall,
                        ExitReason.HUNG,
                        f"a task made no progress for Timeouts(stall={timeouts.stall}) seconds",
                    )
                )
            if not checks:
                await self.watch_wake.wait()
                self.watch_wake = trio.Event()
                continue
            deadline, reason, detail = min(checks, key=lambda check: check[0])
            if trio.current_time() >= deadline:
                self.kill(reason, detail)
                return
            with trio.move_on_at(deadline):
                await self.watch_wake.wait()
            self.watch_wake = trio.Event()

    # -- from the runner -----------------------------------------------------------

    async def _forward(self) -> None:
        """Read frames to EOF and route each message to its task or to the lifecycle."""
        reader = proto.FrameReader(self._max_frame)
        limiter = self._payload_limiter
        big = _payloads.LARGE
        try:
            while True:
                data = await self.worker.receive_some(hand_over=reader.in_big_frame)
                if not data:
                    break
                now = trio.current_time()
                if self.last_frame is None:
                    self.poke_watchdog()
                self.last_frame = now
                # A big frame, and a big payload in it, are unpickled in a thread.
                # Awaited here, in turn: no message overtakes another, so a task's
                # events stay in order and before its outcome.
                for batch in reader.feed_big(data, big):
                    if isinstance(batch, list):
                        for message in batch:
                            self._route(proto.check_from_child(message), now)
                        continue
                    # Only a big frame can hold a big payload: checked, and its big
                    # payloads unpickled, in the same thread (which frees their bytes).
                    messages = await _payloads.decode_in_thread(batch, limiter, self._tasks.wants)
                    now = self.last_frame = trio.current_time()
                    for message in messages:
                        self._route(message, now)
        except proto.FrameError as exc:
            self.kill(ExitReason.PROTOCOL_ERROR, str(exc))
        finally:
            self.eof.set()
            self.poke_watchdog()

    def _route(self, message: proto.FromChild, now: float) -> None:
        """Route one message that ``proto.check_from_child`` passed: only that check
        raises a protocol error, so a bug here raises as itself."""
        # Class patterns without captures, the commonest first: a capture costs
        # an attribute lookup through __match_args__, on every message.
        match message:
            case proto.Events():
                self.last_progress = now
                self._tasks.route_events(message.task_id, message.payload)
            case proto.Result():
                if self._tasks.route_result(message.task_id, message.payload):
                    self.last_progress = now
                    self.running.discard(message.task_id)
            case proto.Started():
                # handle() is about to run: from now on, a crash fails this task
                # (unless retry=True), so the request is no longer needed.
                self.running.add(message.task_id)
                self._tasks.acknowledged(message.task_id)
            case proto.Heartbeat():
                pass
            case proto.Error():
                error = TaskFailed(message.remote_type, message.message, message.traceback)
                self._task_outcome(message.task_id, now, error)
            case proto.Cancelled():
                self._tasks.events_dropped += message.dropped
                cancelled = TaskCancelled(f"task {message.task_id} was cancelled")
                self._task_outcome(message.task_id, now, cancelled)
            case proto.Hello():
                self.hello = True
            case proto.Ready():
                self._on_ready(self, now)
            case proto.Fatal():
                self.fatal = message

    def _task_outcome(self, task_id: int, now: float, error: TaskError) -> None:
        self.last_progress = now
        self.running.discard(task_id)
        self._tasks.settle(task_id, error)

    async def _pump_output(self) -> None:
        try:
            await self.worker.pump_output(self._on_output)
        finally:
            self.output_done.set()

    def _on_output(self, stream: str, batch: bytes) -> None:
        """A batch of whole lines from the child: keep the stderr tail here, log them from the log thread."""
        level = logging.INFO
        if stream == "stderr":
            # Here, not in the log thread: the tail is complete once the pipe
            # is drained, however far behind (or dropped) the logging is.
            self.stderr_tail.extend(last_lines(batch, _STDERR_TAIL))
            level = logging.WARNING
        self._child_log.put(level, self.worker.pid, stream, batch)
