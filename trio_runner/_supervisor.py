"""The supervisor: its API, incarnations and the restart loop.

The tasks themselves live in the task table (``_tasks``), exit records are
made by ``_exits`` and lifecycle changes are logged by ``_lifecycle``. One
trio nursery per incarnation owns the runner process (death watch and stdio
pumps), the cancel channel, the task sender, the event forwarder, the
watchdog and the shutdown escalation. When the process is gone and reaped
(and its socket read to end-of-file, so a last result is never lost) the
restart policy decides what comes next.

The restart loop runs in a shielded scope. Cancelling the supervisor from
outside turns into a *request* to stop, which is carried out gracefully and
within ``Timeouts.shutdown_bound``: cancellation never leaves a process behind.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.process
import pickle
import signal
import sys
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, TypeVar, cast

import trio

from . import _payloads
from . import _protocol as proto
from ._childlog import ChildLog, last_lines
from ._errors import (
    ExitReason,
    ExitRecord,
    RestartLimitExceeded,
    RunnerCrashed,
    RunnerUnavailable,
    StoppedBy,
    TaskCancelled,
    TaskError,
    TaskFailed,
)
from ._exits import UNKNOWN_STATUS, ExitFacts, ExitStatus, Fatal, classify_exit, never_restarts
from ._groups import reraise_unwrapped
from ._lifecycle import Lifecycle
from ._policy import RestartPolicy, RestartTracker
from ._process import (
    SpawnSpec,
    Worker,
    WorkerFactory,
    forkserver_preload,
    private_limiter,
    process_worker,
)
from ._runner import Runner, check_linger
from ._state import (
    BackingOff,
    Exited,
    GaveUp,
    LifecycleChange,
    Ready,
    RunnerState,
    Spawned,
    Stopped,
    SupervisorStatistics,
)
from ._tasks import Task, TaskHandle, TaskTable
from ._timeouts import Timeouts

RequestT = TypeVar("RequestT")
EventT = TypeVar("EventT")
ResultT = TypeVar("ResultT")

logger = logging.getLogger("trio_runner")

_DRAIN_BOUND = 1.0  # after death: read the socket to EOF and stdio to the end, at most this long
# EOF on the control socket from a process still alive this long after it: the
# runner closed its connection. A dying process closes it too, a moment before
# its death is seen.
_EOF_GRACE = 1.0
_STOP_MARGIN = 5.0  # slack over Timeouts.shutdown_bound for the whole of a stop
_STDERR_TAIL = 50
_SEND_SLICE = 256 * 1024  # the most of a big request written to the socket in one call
_LOG_FLUSH_BOUND = 1.0
# Threads that (un)pickle big payloads, on a limiter of their own: never trio's
# default one, which the application may have saturated.
_PAYLOAD_THREADS = 2
# The tasks the sender writes in one go add up to at most this share of
# max_frame_size: a batch is pickled on the loop, so its size bounds the time
# that takes, and it fits in one frame or two.
_SEND_BATCH_SHARE = 0.5
_TERMINAL = (RunnerState.STOPPING, RunnerState.STOPPED, RunnerState.FAILED)


class _Incarnation:
    """One spawn of the runner process and what the supervisor knows of it."""

    def __init__(self, number: int, worker: Worker) -> None:
        self.number = number
        self.worker = worker
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
        self.send_lock = trio.StrictFIFOLock()
        # The unsent end of a task frame that ``_submit`` wrote without waiting;
        # whoever takes ``send_lock`` next sends it first.
        self.backlog = b""
        self.reported = False  # its exit has been reported and its tasks settled
        # What the policy made of the exit: (backoff or None to stop, error to raise).
        self.decision: tuple[float | None, BaseException | None] = (None, None)
        self.death_scope = trio.CancelScope()
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL)

    def poke_watchdog(self) -> None:
        self.watch_wake.set()

    def facts(self, kill_timeout: float) -> ExitFacts:
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
            kill_timeout=kill_timeout,
        )


def _describe_runner(cls: object) -> tuple[str, str]:
    """(module, qualname) of a runner class the child can import, or a TypeError that says why not."""
    if not (isinstance(cls, type) and issubclass(cls, Runner)):
        raise TypeError(
            f"the runner must be a subclass of trio_runner.Runner, not {cls!r}: "
            "define 'class MyRunner(trio_runner.Runner)' in a module and pass the class"
        )
    module, qualname = cls.__module__, cls.__qualname__
    if "<locals>" in qualname:
        raise TypeError(
            f"runner class {qualname} is defined inside a function; the child imports the "
            "class by its module path, so define it at module level"
        )
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not cls:
        raise TypeError(
            f"runner class {qualname} is not importable as {module}.{qualname}; the child "
            "imports it by that path, so define it at module level under its own name"
        )
    concurrency: object = getattr(cast(Any, cls), "concurrency", 1)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"{qualname}.concurrency={concurrency!r} must be an int >= 1 (tasks served at once)")
    check_linger(qualname, getattr(cast(Any, cls), "linger", 0.0))
    if module == "__main__" and not getattr(sys.modules["__main__"], "__file__", None):
        raise TypeError(
            f"runner class {qualname} is defined in an interactive session, which the child "
            "cannot import; move it into a module (a .py file) and import it from there"
        )
    return module, qualname


def _is_big_payload(message: Any) -> bool:
    """An EVENTS or RESULT message whose payload is worth a thread to unpickle."""
    if type(message) is not tuple:
        return False  # malformed: _route says so
    fields = cast("tuple[Any, ...]", message)
    return (
        len(fields) == 3
        and (fields[0] == proto.EVENTS or fields[0] == proto.RESULT)
        and type(fields[2]) is bytes
        and len(fields[2]) >= _payloads.LARGE
    )


def _request_type_error(exc: Exception) -> TypeError:
    return TypeError(
        f"the request cannot be pickled for the child process ({type(exc).__name__}: {exc}); "
        "pass plain data, or instances of classes defined at module level"
    )


def _pickle_or_type_error(obj: object, what: str) -> bytes:
    try:
        return pickle.dumps(obj, protocol=proto.PICKLE_PROTOCOL)
    except Exception as exc:
        raise TypeError(
            f"{what} cannot be pickled for the child process ({type(exc).__name__}: {exc}); "
            "pass plain data, or instances of classes defined at module level"
        ) from exc


def _check_not_bootstrapping() -> None:
    if getattr(multiprocessing.process.current_process(), "_inheriting", False):
        raise RuntimeError(
            "trio-runner was started while a child process was still bootstrapping: the "
            "script that starts the supervisor has no 'if __name__ == \"__main__\":' guard, "
            "so the spawn start method re-ran it in the child. Add the guard."
        )


class Supervisor(Generic[RequestT, EventT, ResultT]):
    """Supervises one runner process. Made by :func:`open_supervisor` or :func:`run_supervisor`."""

    def __init__(
        self,
        runner: type[Runner[RequestT, EventT, ResultT]],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        policy: RestartPolicy | None = None,
        timeouts: Timeouts | None = None,
        name: str | None = None,
        start_method: str = "spawn",
        preload: Sequence[str] = (),
        window: int = 8192,
        max_frame_size: int = proto.DEFAULT_MAX_FRAME,
        raise_on_give_up: bool = True,
        worker_factory: WorkerFactory = process_worker,
    ) -> None:
        module, qualname = _describe_runner(runner)
        policy = RestartPolicy() if policy is None else policy
        timeouts = Timeouts() if timeouts is None else timeouts
        if not isinstance(policy, RestartPolicy):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"policy must be a trio_runner.RestartPolicy, not {type(policy).__name__}")
        if not isinstance(timeouts, Timeouts):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"timeouts must be a trio_runner.Timeouts, not {type(timeouts).__name__}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(
                f"start_method={start_method!r} is not supported: use 'spawn' (the default) or "
                "'forkserver'; 'fork' is unsafe in a process that runs threads"
            )
        if preload and start_method != "forkserver":
            raise ValueError("preload only applies to start_method='forkserver'; drop it or switch method")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"window={window!r} must be an int >= 2 (events in flight per task)")
        max_frame_size = proto.check_max_frame(max_frame_size)
        name = runner.__name__ if name is None else name
        if not isinstance(name, str) or not name:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"name={name!r} must be a non-empty string")
        args_bytes = _pickle_or_type_error((tuple(args), dict(kwargs or {})), "the runner's arguments")

        self.name = name
        self._policy = policy
        self._timeouts = timeouts
        self._max_frame = max_frame_size
        self._payload_limiter = trio.CapacityLimiter(_PAYLOAD_THREADS)
        self._loop_pickler = _payloads.LoopPickler()
        self._raise_on_give_up = raise_on_give_up
        self._worker_factory = worker_factory
        self._spec = SpawnSpec(
            module=module,
            qualname=qualname,
            args_bytes=args_bytes,
            name=name,
            start_method=start_method,
            preload=tuple(preload),
            max_frame=max_frame_size,
            heartbeat_interval=timeouts.heartbeat_interval,
        )
        self._tracker = RestartTracker(policy)
        self._lifecycle = Lifecycle()
        self._tasks = TaskTable(window, max_frame_size)
        self._inc: _Incarnation | None = None
        self._incarnations = 0
        self._last_exit: ExitRecord | None = None
        self._stop_requested = False
        self._stop_event = trio.Event()
        self._done = trio.Event()
        self._main_scope: trio.CancelScope | None = None
        self._deferred_failure: Callable[[], RunnerUnavailable] | None = None
        self._child_logger = logging.getLogger(f"trio_runner.runner.{name}")
        self._child_log = ChildLog(self._child_logger)

    # -- public API ---------------------------------------------------------

    @property
    def state(self) -> RunnerState:
        """The current :class:`RunnerState`."""
        return self._lifecycle.state

    @property
    def start_method(self) -> str:
        """How runner processes start: ``"spawn"`` or ``"forkserver"``."""
        return self._spec.start_method

    def statistics(self) -> SupervisorStatistics:
        """A frozen snapshot: pid, incarnation, restarts, tasks in flight, uptime, last exit."""
        inc = self._inc
        uptime = 0.0
        if inc is not None and inc.ready and self._lifecycle.state is RunnerState.READY:
            uptime = trio.current_time() - inc.ready_at
        return SupervisorStatistics(
            state=self._lifecycle.state,
            pid=None if inc is None else inc.worker.pid,
            incarnation=self._incarnations,
            restarts=self._tracker.total_restarts,
            consecutive_failures=self._tracker.failures,
            in_flight=len(self._tasks.in_flight),
            pending=len(self._tasks.pending),
            uptime=uptime,
            last_exit=self._last_exit,
            tasks_completed=self._tasks.completed,
            log_lines_dropped=self._child_log.dropped,
            events_dropped=self._tasks.events_dropped,
        )

    def watch(self, *, replay: bool = False) -> AsyncIterator[LifecycleChange]:
        """Lifecycle changes as they happen: Spawned, Ready, Exited, BackingOff, GaveUp, Stopped.

        The iteration ends after :class:`Stopped`. A watcher that falls more
        than 1024 changes behind loses the oldest.

        Args:
            replay: first yield the changes retained so far (up to 1024), so a
                watcher started late still sees the whole story.
        """
        return self._lifecycle.watch(replay=replay)

    async def wait_ready(self) -> None:
        """Wait until the runner is READY.

        Raises:
            RunnerUnavailable: the supervisor is stopping, stopped or failed.
        """
        while self._lifecycle.state is not RunnerState.READY:
            if self._lifecycle.state in _TERMINAL:
                raise RunnerUnavailable(self._unavailable_reason())
            await self._lifecycle.wait_state_change()
        await trio.lowlevel.checkpoint()

    async def run(self, request: RequestT, *, retry: bool = False) -> ResultT:
        """Run one task and return its result, discarding its events.

        Args:
            request: anything picklable; ``handle(request, ctx)`` gets a copy.
            retry: the task is idempotent: if the runner dies while it runs, it
                runs again on the next incarnation instead of failing.

        Raises:
            TaskFailed: ``handle`` raised; the remote traceback is kept.
            TaskCancelled: the task was cancelled (e.g. by :meth:`cancel_all`).
            RunnerCrashed: the runner died while the task was in flight.
            RunnerUnavailable: the supervisor is stopping, stopped or failed.
            TypeError: the request cannot be pickled.
            ValueError: the request is larger than ``max_frame_size``.

        **Cancellation:** cancelling the caller cancels the task in the runner.
        """
        # ``stream()`` without its context manager, which costs a few
        # microseconds a call: a tenth of a tiny task's round trip.
        await trio.lowlevel.checkpoint_if_cancelled()
        task = self._submit(request, retry)
        if task is None:  # too big to pickle on the loop
            task = self._submit_pickled(await self._pickle_in_thread(request), retry)
        try:
            handle: TaskHandle[EventT, ResultT] = TaskHandle(self._tasks, task)
            return await handle.wait()
        finally:
            self._tasks.release(task)

    @asynccontextmanager
    async def stream(
        self, request: RequestT, *, retry: bool = False
    ) -> AsyncGenerator[TaskHandle[EventT, ResultT]]:
        """Submit a task and stream its events: ``async with sup.stream(req) as task``.

        See :meth:`run` for the arguments and errors. Leaving the block before
        the task ends cancels it in the runner and returns at once; it never
        waits for a runner that ignores the cancel.
        """
        # If the caller is already cancelled (say, the policy just gave up and
        # cancelled the body), that wins over RunnerUnavailable.
        await trio.lowlevel.checkpoint_if_cancelled()
        task = self._submit(request, retry)
        if task is None:  # too big to pickle on the loop
            task = self._submit_pickled(await self._pickle_in_thread(request), retry)
        try:
            yield TaskHandle(self._tasks, task)
        finally:
            self._tasks.release(task)

    async def cancel_all(self) -> None:
        """Cancel every task, queued or running. Returns once the cancel is handed over."""
        inc = self._inc
        self._tasks.cancel_all(None if inc is None else inc.number)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Shut the runner down gracefully and wait until it is gone. Idempotent.

        Tasks still pending or in flight end with :class:`RunnerUnavailable`.
        The runner gets a Shutdown message, then SIGTERM, then SIGKILL, each
        after its timeout, so this returns within ``Timeouts.shutdown_bound``
        plus a small margin.
        """
        self._request_stop()
        await self._done.wait()

    # -- tasks ----------------------------------------------------------------

    def _unavailable_reason(self) -> str:
        if self._lifecycle.state is RunnerState.FAILED:
            last = "" if self._last_exit is None else f" (last exit: {self._last_exit.describe()})"
            return f"runner {self.name!r} has failed and will not be restarted{last}"
        return f"runner {self.name!r} is {self._lifecycle.state.value}: no new tasks are accepted"

    def _submit(self, request: Any, retry: bool) -> Task | None:
        """The task for ``request``, submitted; None if it must be pickled in a thread first.

        The size of a pickle is unknown until it is made. The request is pickled
        here, on the loop, until it passes ``_payloads.LARGE_REQUEST`` bytes (a fraction of a
        millisecond); then this returns None, and the caller pickles it again in a
        thread (``_pickle_in_thread``) and submits that with ``_submit_pickled``.
        Nothing of the aborted pickle is kept.
        """
        if self._stop_requested or self._lifecycle.state in _TERMINAL:
            raise RunnerUnavailable(self._unavailable_reason())
        try:
            data = self._loop_pickler.dumps(request)
        except Exception as exc:  # the request's own classes run here: anything goes
            raise _request_type_error(exc) from exc
        if data is None:
            return None
        return self._submit_pickled(data, retry)

    def _submit_pickled(self, data: bytes | bytearray, retry: bool) -> Task:
        if self._stop_requested or self._lifecycle.state in _TERMINAL:
            raise RunnerUnavailable(self._unavailable_reason())  # again: a thread pickled it meanwhile
        if len(data) > self._max_frame - proto.MESSAGE_OVERHEAD:
            raise ValueError(
                f"the request pickles to {len(data)} bytes, more than max_frame_size="
                f"{self._max_frame}; send a smaller request or raise max_frame_size"
            )
        task = self._tasks.new(data, retry)
        if not self._send_now(task):
            self._tasks.queue(task)
        return task

    async def _pickle_in_thread(self, request: Any) -> bytearray:
        try:
            return await _payloads.dumps_in_thread(request, self._payload_limiter)
        except Exception as exc:  # the request's own classes run there: anything goes
            raise _request_type_error(exc) from exc

    def _send_now(self, task: Task) -> bool:
        """Write the task straight to a ready runner's socket if nothing is ahead of it.

        Handing it to the sender task instead costs a loop pass: a third of a
        small task's round trip. False, having done nothing, if the task must
        queue (not ready, tasks or bytes ahead of it, a send in progress).
        """
        inc = self._inc
        if (
            inc is None
            or self._tasks.pending
            or inc.backlog
            or not inc.ready_event.is_set()
            or inc.stop_requested
            or inc.exited.is_set()
            or inc.send_lock.locked()
            or task.request is None
            or len(task.request) >= _payloads.LARGE_REQUEST  # sent in parts by _send_tasks, not copied
        ):
            return False
        data = self._tasks.mark_sent([task], inc.number)
        assert isinstance(data, bytes)
        inc.last_progress = trio.current_time()
        if self._timeouts.stall is not None:
            inc.poke_watchdog()  # only the stall check depends on what was sent
        sent = inc.worker.send_nowait(data)
        if sent < len(data):
            inc.backlog = data[sent:]
            self._tasks.wake_sender()  # the sender task writes the rest
        return True

    # -- lifecycle reporting ----------------------------------------------------

    def _on_output(self, inc: _Incarnation, stream: str, batch: bytes) -> None:
        """A batch of whole lines from the child: keep the stderr tail here, log them from the log thread."""
        level = logging.INFO
        if stream == "stderr":
            # Here, not in the log thread: the tail is complete once the pipe
            # is drained, however far behind (or dropped) the logging is.
            inc.stderr_tail.extend(last_lines(batch, _STDERR_TAIL))
            level = logging.WARNING
        self._child_log.put(level, inc.worker.pid, stream, batch)

    # -- shutdown ---------------------------------------------------------------

    def _request_stop(self) -> None:
        if self._stop_requested:
            return
        self._stop_requested = True
        if self._lifecycle.state not in (RunnerState.STOPPED, RunnerState.FAILED):
            self._lifecycle.set_state(RunnerState.STOPPING)
            self._tasks.fail_all(lambda: RunnerUnavailable(f"runner {self.name!r} is shutting down"))
        inc = self._inc
        if inc is not None:
            inc.stop_requested = True
            inc.escalate.set()
        self._stop_event.set()
        if self._main_scope is not None:
            bound = trio.current_time() + self._timeouts.shutdown_bound + _DRAIN_BOUND + _STOP_MARGIN
            self._main_scope.deadline = min(self._main_scope.deadline, bound)

    async def _stop_on_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._request_stop()

    # -- the restart loop ---------------------------------------------------------

    async def _run(self, task_status: trio.TaskStatus[Supervisor[RequestT, EventT, ResultT]]) -> None:
        _check_not_bootstrapping()
        self._child_log.start(f"trio-runner-log:{self.name}")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_cancel)
                with trio.CancelScope(shield=True) as self._main_scope:
                    try:
                        await self._main_loop(task_status)
                    finally:
                        nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            reraise_unwrapped(group)
        finally:
            try:
                # Bounded by wall clock inside the thread (see ChildLog.stop),
                # on a limiter of its own: trio's default may be saturated by
                # the application, and this wait is shielded.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(
                        self._child_log.stop, _LOG_FLUSH_BOUND, limiter=private_limiter()
                    )
            finally:
                # On every path: aclose() waits for it, shielded.
                self._done.set()
            if self._deferred_failure is not None:
                # No await after this: the failure leaves this task first and
                # cancels the caller's body; the tasks still waiting fail after,
                # so the body sees one clear error rather than a group of
                # RunnerUnavailable beside it.
                trio.lowlevel.current_trio_token().run_sync_soon(
                    functools.partial(self._tasks.fail_all, self._deferred_failure, crashes=True)
                )

    async def _main_loop(self, task_status: trio.TaskStatus[Supervisor[RequestT, EventT, ResultT]]) -> None:
        started = False
        failure: BaseException | None = None
        try:
            if self._spec.start_method == "forkserver":
                await trio.to_thread.run_sync(self._ensure_forkserver, abandon_on_cancel=True)
            while not self._stop_requested:
                self._incarnations += 1
                worker = self._worker_factory(self._spec, self._incarnations)
                inc = self._inc = _Incarnation(self._incarnations, worker)
                if not started:
                    task_status.started(self)
                    started = True
                delay: float | None = None
                try:
                    record = await self._run_incarnation(inc)
                    self._report_exit(inc, record)  # if _run_incarnation has not already
                    delay, failure = inc.decision
                finally:
                    # After the exit is reported and decided on: closing the
                    # transport and the process object is bookkeeping, not part
                    # of detecting a crash.
                    with trio.CancelScope(shield=True):
                        await worker.aclose()
                if delay is None:
                    break
                with trio.move_on_after(delay):
                    await self._stop_event.wait()
        finally:
            if self._lifecycle.state is not RunnerState.FAILED:
                self._lifecycle.set_state(RunnerState.STOPPED)
            self._lifecycle.emit(Stopped(self._lifecycle.state, self._last_exit))
            error = lambda: RunnerUnavailable(self._unavailable_reason())  # noqa: E731
            if failure is None:
                self._tasks.fail_all(error, crashes=not self._stop_requested)
            else:
                self._deferred_failure = error
        if failure is not None:
            raise failure

    def _decide(self, inc: _Incarnation, record: ExitRecord) -> tuple[float | None, BaseException | None]:
        """Apply the policy to an exit: (the backoff before a restart or None to stop, the error to raise)."""
        if never_restarts(inc.facts(self._timeouts.kill), record):
            self._lifecycle.set_state(RunnerState.FAILED)
            self._lifecycle.emit(GaveUp(self._tracker.failures, record))
            return None, RunnerCrashed(record)
        decision = self._tracker.on_exit(record.reason, trio.current_time())
        if decision.action == "stop":
            logger.info(
                "runner %r exited (%s); policy %r does not restart it",
                self.name,
                record.describe(),
                self._policy.mode,
            )
            self._lifecycle.set_state(RunnerState.STOPPED)
            return None, None
        if decision.action == "give_up":
            logger.error(
                "runner %r exited (%s); giving up after %d restarts in a row",
                self.name,
                record.describe(),
                decision.restarts,
            )
            self._lifecycle.set_state(RunnerState.FAILED)
            self._lifecycle.emit(GaveUp(decision.restarts, record))
            failure = RestartLimitExceeded(decision.restarts, record) if self._raise_on_give_up else None
            return None, failure
        logger.warning(
            "runner %r exited (%s); restarting in %.3g s",
            self.name,
            record.describe(),
            decision.delay,
        )
        self._lifecycle.set_state(RunnerState.BACKING_OFF)
        self._lifecycle.emit(BackingOff(decision.delay, self._tracker.total_restarts))
        return decision.delay, None

    def _ensure_forkserver(self) -> None:
        from multiprocessing import forkserver

        server: Any = getattr(forkserver, "_forkserver", None)
        running = server is not None and getattr(server, "_forkserver_pid", None) is not None
        preloaded = set(getattr(server, "_preload_modules", ()) or ())
        missing = set(self._spec.preload) - preloaded
        if running and missing:
            # The forkserver is one per process and its preload list is fixed
            # when it starts: say so rather than silently restart slowly.
            logger.warning(
                "runner %r asked the forkserver to preload %s, but it is already running without "
                "them; every restart imports them again. Start supervisors that need different "
                "preloads in separate processes, or give them all the same preload list",
                self.name,
                ", ".join(sorted(missing)),
            )
        elif not running:
            multiprocessing.get_context("forkserver").set_forkserver_preload(
                forkserver_preload(self._spec.preload)
            )
        forkserver.ensure_running()

    # -- one incarnation ----------------------------------------------------------

    async def _run_incarnation(self, inc: _Incarnation) -> ExitRecord:
        worker = inc.worker
        self._lifecycle.set_state(RunnerState.STARTING)
        if self._stop_requested:
            inc.stop_requested = True
            inc.escalate.set()
        try:
            await worker.start()
        except (OSError, EOFError) as exc:
            # What starting a process can meet: fork or exec failing, too many
            # open files, a forkserver that died (EOFError). Anything else is a
            # bug, and raises as one rather than pass for a runner that failed.
            return ExitRecord(
                ExitReason.STARTUP_FAILED,
                incarnation=inc.number,
                detail=f"could not start the runner process: {type(exc).__name__}: {exc}",
            )
        inc.spawned_at = inc.last_progress = trio.current_time()
        logger.info("runner %r spawned (pid %s, incarnation %d)", self.name, worker.pid, inc.number)
        self._lifecycle.emit(Spawned(inc.number, worker.pid))
        status: ExitStatus | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward, inc)
                nursery.start_soon(self._pump_output, inc)
                nursery.start_soon(self._send_tasks, inc)
                nursery.start_soon(self._send_control, inc)
                nursery.start_soon(self._watchdog, inc)
                nursery.start_soon(self._escalation, inc)
                with inc.death_scope:
                    status = await worker.wait(self._timeouts.kill)
                inc.exited.set()
                # Grandchildren go with it, gracefully or not; they would also
                # hold the stdio pipes open and delay the drain below.
                worker.signal(signal.SIGKILL)
                # Drain to EOF first, or a result sent just before the crash is lost.
                with trio.move_on_after(_DRAIN_BOUND):
                    await inc.eof.wait()
                    await inc.output_done.wait()
                # Report now, not after the incarnation's tasks have wound down
                # (a loop pass or two): nothing can be put in flight on it any
                # more (see _send_tasks and _send_now).
                nursery.cancel_scope.cancel()
                record = classify_exit(inc.facts(self._timeouts.kill), status or UNKNOWN_STATUS)
                self._report_exit(inc, record)
                return record
        finally:
            # Grandchildren survive a graceful exit: the whole group goes.
            worker.signal(signal.SIGKILL)

    def _report_exit(self, inc: _Incarnation, record: ExitRecord) -> None:
        """Once per incarnation: report the exit, settle the tasks in flight on it, apply the policy.

        The state leaves READY here, so nobody who saw ``Exited`` finds the
        supervisor still READY. The decision waits in ``inc.decision``.
        """
        if inc.reported:
            return
        inc.reported = True
        self._inc = None
        self._last_exit = record
        self._lifecycle.emit(Exited(record))
        self._tasks.settle_exit(inc.running, record)
        if not self._stop_requested:
            inc.decision = self._decide(inc, record)

    def _kill(self, inc: _Incarnation, reason: ExitReason, detail: str) -> None:
        if inc.kill_reason is not None or inc.exited.is_set():
            return
        logger.warning("runner %r (pid %s): %s; killing it", self.name, inc.worker.pid, detail)
        inc.kill_reason = reason
        inc.kill_detail = detail
        inc.stopped_by = StoppedBy.SIGKILL
        inc.worker.signal(signal.SIGKILL)
        inc.escalate.set()

    async def _escalation(self, inc: _Incarnation) -> None:
        """Shutdown, then SIGTERM, then SIGKILL, each after its timeout; then stop waiting."""
        timeouts = self._timeouts
        worker = inc.worker
        await inc.escalate.wait()
        if inc.kill_reason is None:
            inc.stopped_by = StoppedBy.SHUTDOWN
            with trio.move_on_after(timeouts.graceful):
                await _send_locked(inc, proto.encode([(proto.SHUTDOWN,)]))
                await inc.exited.wait()
            if inc.exited.is_set():
                return
            logger.warning(
                "runner %r (pid %s) did not exit within Timeouts(graceful=%s) of Shutdown; "
                "sending SIGTERM to its process group",
                self.name,
                worker.pid,
                timeouts.graceful,
            )
            inc.stopped_by = StoppedBy.SIGTERM
            worker.signal(signal.SIGTERM)
            with trio.move_on_after(timeouts.terminate):
                await inc.exited.wait()
            if inc.exited.is_set():
                return
            logger.warning(
                "runner %r (pid %s) ignored SIGTERM for Timeouts(terminate=%s); sending SIGKILL",
                self.name,
                worker.pid,
                timeouts.terminate,
            )
            inc.stopped_by = StoppedBy.SIGKILL
            worker.signal(signal.SIGKILL)
        with trio.move_on_after(timeouts.kill):
            await inc.exited.wait()
        if not inc.exited.is_set():
            logger.error(
                "runner %r (pid %s) survived SIGKILL for Timeouts(kill=%s); no longer waiting for it",
                self.name,
                worker.pid,
                timeouts.kill,
            )
            inc.death_scope.cancel()

    async def _watchdog(self, inc: _Incarnation) -> None:
        """Enforces the startup, heartbeat and stall timeouts, and a control connection closed early."""
        timeouts = self._timeouts
        eof_at: float | None = None
        while not (inc.stop_requested or inc.exited.is_set()):
            checks: list[tuple[float, ExitReason, str]] = []
            if not inc.ready:
                checks.append(
                    (
                        inc.spawned_at + timeouts.startup,
                        ExitReason.STARTUP_FAILED,
                        f"setup did not finish within Timeouts(startup={timeouts.startup})",
                    )
                )
            if inc.eof.is_set():
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
            elif inc.last_frame is not None:
                checks.append(
                    (
                        inc.last_frame + timeouts.heartbeat,
                        ExitReason.HUNG,
                        f"no heartbeat for Timeouts(heartbeat={timeouts.heartbeat}) seconds: the runner is "
                        "frozen (stopped, or stuck holding the GIL), or cannot write to its control socket",
                    )
                )
            if timeouts.stall is not None and inc.ready and self._tasks.busy(inc.running):
                checks.append(
                    (
                        inc.last_progress + timeouts.stall,
                        ExitReason.HUNG,
                        f"a task made no progress for Timeouts(stall={timeouts.stall}) seconds",
                    )
                )
            if not checks:
                await inc.watch_wake.wait()
                inc.watch_wake = trio.Event()
                continue
            deadline, reason, detail = min(checks, key=lambda check: check[0])
            if trio.current_time() >= deadline:
                self._kill(inc, reason, detail)
                return
            with trio.move_on_at(deadline):
                await inc.watch_wake.wait()
            inc.watch_wake = trio.Event()

    # -- the incarnation's tasks ------------------------------------------------------

    async def _forward(self, inc: _Incarnation) -> None:
        """Read frames to EOF and route each message to its task or to the lifecycle."""
        reader = proto.FrameReader(self._max_frame)
        limiter = self._payload_limiter
        big = _payloads.LARGE
        try:
            while True:
                data = await inc.worker.receive_some()
                if not data:
                    break
                now = trio.current_time()
                if inc.last_frame is None:
                    inc.poke_watchdog()
                inc.last_frame = now
                # A big frame, and a big payload in it, are unpickled in a thread.
                # Awaited here, in turn: no message overtakes another, so a task's
                # events stay in order and before its outcome.
                for batch in reader.feed_big(data, big):
                    if isinstance(batch, list):
                        for message in batch:
                            self._route(inc, message, now)
                        continue
                    # Only a big frame can hold a big payload.
                    messages = await _payloads.decode_in_thread(batch, limiter)
                    now = inc.last_frame = trio.current_time()
                    for message in messages:
                        message = proto.check_from_child(message)
                        if _is_big_payload(message):
                            message = await self._load_payload(message)
                            now = inc.last_frame = trio.current_time()
                        self._route(inc, message, now)
        except proto.FrameError as exc:
            self._kill(inc, ExitReason.PROTOCOL_ERROR, str(exc))
        finally:
            inc.eof.set()
            inc.poke_watchdog()

    def _route(self, inc: _Incarnation, message: Any, now: float) -> None:
        # Only the check can raise a protocol error: a bug below raises as itself.
        message = proto.check_from_child(message)
        tag = message[0]
        if tag == proto.EVENTS:
            inc.last_progress = now
            self._tasks.route_events(message[1], message[2])
        elif tag == proto.HEARTBEAT:
            pass
        elif tag == proto.RESULT:
            if self._tasks.route_result(message[1], message[2]):
                inc.last_progress = now
                inc.running.discard(message[1])
        elif tag == proto.ERROR:
            _, task_id, remote_type, text, tb = message
            self._task_outcome(inc, task_id, now, error=TaskFailed(remote_type, text, tb))
        elif tag == proto.CANCELLED:
            # (CANCELLED, task_id[, events the runner dropped])
            self._tasks.events_dropped += message[2] if len(message) > 2 else 0
            self._task_outcome(inc, message[1], now, error=TaskCancelled(f"task {message[1]} was cancelled"))
        elif tag == proto.ACK:
            # handle() is about to run: from now on, a crash fails this task
            # (unless retry=True), so the request is no longer needed.
            inc.running.add(message[1])
            self._tasks.acknowledged(message[1])
        elif tag == proto.HELLO:
            inc.hello = True
        elif tag == proto.READY:
            self._on_ready(inc, now)
        elif tag == proto.FATAL:
            _, stage, remote_type, text, tb = message
            inc.fatal = (stage, remote_type, text, tb)

    async def _load_payload(self, message: tuple[Any, ...]) -> tuple[Any, ...]:
        """An EVENTS or RESULT message whose big payload is unpickled in a thread for ``TaskTable.unpack``."""
        tag, task_id, payload = message
        if not self._tasks.wants(task_id):
            return message  # nobody wants it: _route drops it unread
        return (tag, task_id, await _payloads.load_in_thread(payload, self._payload_limiter))

    def _task_outcome(self, inc: _Incarnation, task_id: int, now: float, error: TaskError) -> None:
        inc.last_progress = now
        inc.running.discard(task_id)
        self._tasks.settle(task_id, error)

    def _on_ready(self, inc: _Incarnation, now: float) -> None:
        inc.ready = True
        inc.ready_at = inc.last_progress = now
        self._tracker.on_ready(now)
        startup = now - inc.spawned_at
        logger.info("runner %r ready (pid %s) after %.3f s", self.name, inc.worker.pid, startup)
        if not inc.stop_requested:
            self._lifecycle.set_state(RunnerState.READY)
        self._lifecycle.emit(Ready(inc.number, inc.worker.pid, startup))
        inc.ready_event.set()
        inc.poke_watchdog()

    async def _pump_output(self, inc: _Incarnation) -> None:
        try:
            await inc.worker.pump_output(lambda stream, batch: self._on_output(inc, stream, batch))
        finally:
            inc.output_done.set()

    async def _send_tasks(self, inc: _Incarnation) -> None:
        """Deliver pending tasks once the runner is READY, in submission order."""
        await inc.ready_event.wait()
        limit = int(self._max_frame * _SEND_BATCH_SHARE)
        tasks = self._tasks
        while not inc.stop_requested:
            if not tasks.pending:
                if inc.backlog:
                    await _send_locked(inc, b"")
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
            await _send_locked(inc, data)

    async def _send_control(self, inc: _Incarnation) -> None:
        """The cancel channel: cancels and credits, each write bounded by ``cancel_send``."""
        timeout = self._timeouts.cancel_send
        tasks = self._tasks
        control = tasks.control_recv
        while True:
            items = [await control.receive()]
            while True:
                try:
                    items.append(control.receive_nowait())
                except trio.WouldBlock:
                    break
            messages: list[Any] = []
            for tag, task_id, count, incarnation in items:
                # Items are tagged with the incarnation they were meant for at the
                # moment they were queued: one left over from a runner that died
                # never reaches the next (a stale credit would over-grant a window).
                if incarnation != inc.number:
                    continue
                if tag == proto.CREDIT and task_id not in tasks.in_flight:
                    continue  # finished meanwhile
                # A cancel still goes out for a task the parent already ended (say,
                # its event did not unpickle): the runner must stop working on it.
                if tag == proto.CANCEL:
                    messages.append((proto.CANCEL, task_id))
                else:
                    messages.append((proto.CREDIT, task_id, count))
                    if task_id in inc.running:
                        inc.last_progress = trio.current_time()
            if not messages:
                continue
            with trio.move_on_after(timeout) as scope:
                # A burst of cancels or credits is split like any other batch.
                await _send_locked(inc, proto.encode_frames(messages, self._max_frame))
            if scope.cancelled_caught:
                self._kill(
                    inc,
                    ExitReason.HUNG,
                    f"a cancel could not be written within Timeouts(cancel_send={timeout}): "
                    "the runner has stopped reading its control socket",
                )
                return


async def _send_locked(inc: _Incarnation, data: bytes | list[proto.Buffer]) -> None:
    """``send_all`` under the incarnation's send lock, without a schedule point when the lock is free.

    ``async with lock`` yields once even uncontended: a whole loop pass per task sent.
    The backlog a fast-path send left goes first. ``data`` may be a list of
    parts (a big request), written in turn, never joined.
    """
    try:
        inc.send_lock.acquire_nowait()
    except trio.WouldBlock:
        await inc.send_lock.acquire()
    try:
        if isinstance(data, list):
            if inc.backlog:
                backlog, inc.backlog = inc.backlog, b""
                await inc.worker.send_all(backlog)
            for part in data:
                with memoryview(part) as view:
                    # In slices: one send of a whole big payload to a peer that
                    # keeps reading can copy for tens of milliseconds in one call.
                    for offset in range(0, len(view), _SEND_SLICE):
                        # Any bytes-like will do: trio's send_all writes from a memoryview of it.
                        await inc.worker.send_all(cast(bytes, view[offset : offset + _SEND_SLICE]))
            return
        if inc.backlog:
            data, inc.backlog = inc.backlog + data, b""
        await inc.worker.send_all(data)
    finally:
        inc.send_lock.release()


async def run_supervisor(
    runner: type[Runner[RequestT, EventT, ResultT]],
    *args: Any,
    kwargs: Mapping[str, Any] | None = None,
    policy: RestartPolicy | None = None,
    timeouts: Timeouts | None = None,
    name: str | None = None,
    start_method: str = "spawn",
    preload: Sequence[str] = (),
    window: int = 8192,
    max_frame_size: int = proto.DEFAULT_MAX_FRAME,
    raise_on_give_up: bool = True,
    task_status: trio.TaskStatus[Supervisor[RequestT, EventT, ResultT]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Supervise ``runner`` in a nursery you already have: ``sup = await nursery.start(...)``.

    Takes the same arguments as :func:`open_supervisor` (use
    ``functools.partial`` for the keyword ones). ``nursery.start`` returns the
    :class:`Supervisor` as soon as the first runner process is being spawned.

    **Cancellation:** cancelling this task shuts the runner down gracefully;
    the task returns within ``Timeouts.shutdown_bound`` plus a small margin,
    and no process is left behind. ``await sup.aclose()`` does the same.

    Raises:
        RestartLimitExceeded: the policy gave up (unless ``raise_on_give_up`` is False).
        RunnerCrashed: the runner can never start (it could not be imported,
            or the script lacks a main guard); raised at once, without restarts.
    """
    supervisor = Supervisor(
        runner,
        args,
        kwargs,
        policy=policy,
        timeouts=timeouts,
        name=name,
        start_method=start_method,
        preload=preload,
        window=window,
        max_frame_size=max_frame_size,
        raise_on_give_up=raise_on_give_up,
    )
    await supervisor._run(task_status)  # pyright: ignore[reportPrivateUsage]


def open_supervisor(
    runner: type[Runner[RequestT, EventT, ResultT]],
    *args: Any,
    kwargs: Mapping[str, Any] | None = None,
    policy: RestartPolicy | None = None,
    timeouts: Timeouts | None = None,
    name: str | None = None,
    start_method: str = "spawn",
    preload: Sequence[str] = (),
    window: int = 8192,
    max_frame_size: int = proto.DEFAULT_MAX_FRAME,
    raise_on_give_up: bool = True,
) -> AbstractAsyncContextManager[Supervisor[RequestT, EventT, ResultT]]:
    """Run ``runner`` in a supervised child process for the duration of the block.

    Args:
        runner: a :class:`Runner` subclass, importable by its module path.
        *args: positional arguments for the runner's constructor (picklable).
        kwargs: keyword arguments for the runner's constructor (picklable).
        policy: the :class:`RestartPolicy`; by default permanent, 2, 4, 8 ... 60 s, 10 restarts.
        timeouts: the :class:`Timeouts`.
        name: names the runner in logs; child output goes to the logger
            ``trio_runner.runner.<name>``. Defaults to the class name.
        start_method: ``"spawn"`` (default) or ``"forkserver"``.
        preload: modules the forkserver imports once, so restarts skip them.
        window: events in flight per task before ``ctx.emit`` blocks.
        max_frame_size: the largest frame either side accepts; larger is a
            protocol error. An int from 64 KiB to 2**32 - 1; a request, result
            or batch of events may pickle to at most ``max_frame_size - 256`` bytes.
        raise_on_give_up: when the policy gives up, raise
            :class:`RestartLimitExceeded` out of the block (the default, which
            cancels the body), or only move to FAILED.

    The block is entered as soon as the first runner process is being spawned;
    tasks submitted before it is READY wait for it (``await sup.wait_ready()``
    waits explicitly). Leaving the block is a graceful shutdown, bounded by
    ``Timeouts.shutdown_bound`` plus a small margin.

    **Exceptions:** an exception from the body propagates unchanged. When the
    policy gives up, the body is cancelled and :class:`RestartLimitExceeded` is
    raised on its own, not inside an ExceptionGroup; likewise the
    :class:`RunnerCrashed` of a runner that can never start. Only when the body
    and the supervisor fail at the same time do you get an ExceptionGroup
    holding both.

    Raises:
        TypeError: the runner is not an importable Runner subclass, or its
            arguments cannot be pickled. Raised at the call, before any await.
        ValueError: an option is out of range. Raised at the call.
    """
    supervisor = Supervisor(
        runner,
        args,
        kwargs,
        policy=policy,
        timeouts=timeouts,
        name=name,
        start_method=start_method,
        preload=preload,
        window=window,
        max_frame_size=max_frame_size,
        raise_on_give_up=raise_on_give_up,
    )
    return _open(supervisor)


@asynccontextmanager
async def _open(
    supervisor: Supervisor[RequestT, EventT, ResultT],
) -> AsyncGenerator[Supervisor[RequestT, EventT, ResultT]]:
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor._run)  # pyright: ignore[reportPrivateUsage]
            try:
                yield supervisor
            finally:
                with trio.CancelScope(shield=True):
                    await supervisor.aclose()
    except BaseExceptionGroup as group:
        reraise_unwrapped(group)
