"""The supervisor: its API and the restart loop.

The restart loop spawns an incarnation (``_incarnation``), runs it until its
process is gone, reports the exit, settles the tasks in flight on it (in the
task table, ``_tasks``) and lets the restart policy decide what comes next
(``_restarts``). Exit records are made by ``_exits``, lifecycle changes logged
by ``_lifecycle``.

The restart loop runs in a shielded scope. Cancelling the supervisor from
outside turns into a *request* to stop, which is carried out gracefully and
within ``Timeouts.shutdown_bound``: cancellation never leaves a process behind.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, NoReturn, TypeVar, Unpack

import trio

from . import _payloads
from . import _protocol as proto
from ._childlog import ChildLog
from ._describe import check_main_script, check_not_bootstrapping, runner_arguments, runner_path, unpicklable
from ._errors import (
    ExitRecord,
    RunnerUnavailable,
)
from ._group import GroupIncarnation, GroupTable
from ._groups import reraise_unwrapped
from ._incarnation import DRAIN_BOUND, Incarnation
from ._lifecycle import Lifecycle
from ._options import Options, SupervisorOptions
from ._process import (
    SpawnSpec,
    WorkerFactory,
    ensure_forkserver,
    private_limiter,
    process_worker,
)
from ._restarts import Restarts
from ._runner import Runner
from ._state import (
    Exited,
    LifecycleChange,
    RunnerState,
    Spawned,
    Stopped,
    SupervisorStatistics,
)
from ._tasks import Task, TaskHandle, TaskTable

RequestT = TypeVar("RequestT")
EventT = TypeVar("EventT")
ResultT = TypeVar("ResultT")
T = TypeVar("T")


_STOP_MARGIN = 5.0  # slack over Timeouts.shutdown_bound for the whole of a stop
# Wall-clock seconds the log thread gets to hand the child's last lines to their handlers.
_LOG_FLUSH_BOUND = 1.0
# Threads that (un)pickle big payloads, on a limiter of their own: never trio's
# default one, which the application may have saturated.
_PAYLOAD_THREADS = 2
_TERMINAL = (RunnerState.STOPPING, RunnerState.STOPPED, RunnerState.FAILED)


class NoPublicConstructor(type):
    """Metaclass for a class the library makes and users only receive (trio's pattern).

    ``Cls(...)`` raises TypeError; the library calls ``Cls._create(...)``. So
    the constructor's private hooks (a test's fake worker) stay out of the
    public API, and nobody builds a half-started object by hand.
    """

    def __call__(cls, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(
            f"trio_runner.{cls.__qualname__} has no public constructor; get one from "
            "trio_runner.open_supervisor(...) or nursery.start(trio_runner.run_supervisor, ...)"
        )

    def _create(cls: type[T], *args: object, **kwargs: object) -> T:
        return type.__call__(cls, *args, **kwargs)


class Supervisor(Generic[RequestT, EventT, ResultT], metaclass=NoPublicConstructor):
    """Supervises one runner process, or one group of them (``ranks=N``).

    Made by :func:`open_supervisor` or :func:`run_supervisor`.
    """

    def __init__(
        self,
        runner: type[Runner[RequestT, EventT, ResultT]],
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        options: Options,
        worker_factory: WorkerFactory = process_worker,
    ) -> None:
        module, qualname = runner_path(runner)
        args_bytes = runner_arguments(args, kwargs)
        name = runner.__name__ if options.name is None else options.name

        self.name = name
        self._timeouts = options.timeouts
        self._max_frame = options.max_frame_size
        self._payload_limiter = trio.CapacityLimiter(_PAYLOAD_THREADS)
        self._loop_pickler = _payloads.LoopPickler()
        self._worker_factory = worker_factory
        self._spec = SpawnSpec(
            module=module,
            qualname=qualname,
            args_bytes=args_bytes,
            name=name,
            start_method=options.start_method,
            preload=options.preload,
            max_frame=options.max_frame_size,
            heartbeat_interval=options.timeouts.heartbeat_interval,
        )
        self._lifecycle = Lifecycle()
        self._restarts = Restarts(name, options, self._lifecycle)
        self._tasks = (
            TaskTable(options.window, options.max_frame_size)
            if options.ranks == 1
            else GroupTable(options.window, options.max_frame_size, options.ranks)
        )
        self._inc: Incarnation | GroupIncarnation | None = None
        self._incarnations = 0
        self._last_exit: ExitRecord | None = None
        self._stop_requested = False
        self._stop_event = trio.Event()
        self._done = trio.Event()
        self._main_scope: trio.CancelScope | None = None
        self._deferred_failure: Callable[[], RunnerUnavailable] | None = None
        self._child_log = ChildLog(logging.getLogger(f"trio_runner.runner.{name}"))

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
        """A frozen snapshot: pids, incarnation, restarts, tasks in flight, uptime, last exit."""
        inc = self._inc
        uptime = 0.0
        if inc is not None and inc.ready and self._lifecycle.state is RunnerState.READY:
            uptime = trio.current_time() - inc.ready_at
        return SupervisorStatistics(
            state=self._lifecycle.state,
            pid=None if inc is None else inc.pids[0],
            incarnation=self._incarnations,
            restarts=self._restarts.tracker.total_restarts,
            consecutive_failures=self._restarts.tracker.failures,
            in_flight=len(self._tasks.in_flight),
            pending=len(self._tasks.pending),
            uptime=uptime,
            last_exit=self._last_exit,
            tasks_completed=self._tasks.completed,
            log_lines_dropped=self._child_log.dropped,
            events_dropped=self._tasks.events_dropped,
            pids=() if inc is None else inc.pids,
            failed_rank=None if self._last_exit is None else self._last_exit.rank,
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
            RunnerCrashed: the runner died while the task ran (its ``handle()`` had started).
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
            raise unpicklable("the request", exc) from exc
        if data is None:
            return None
        return self._submit_pickled(data, retry)

    def _submit_pickled(self, data: bytes | bytearray | proto.Pieces, retry: bool) -> Task:
        if self._stop_requested or self._lifecycle.state in _TERMINAL:
            raise RunnerUnavailable(self._unavailable_reason())  # again: a thread pickled it meanwhile
        if len(data) > self._max_frame - proto.MESSAGE_OVERHEAD:
            raise ValueError(
                f"the request pickles to {len(data)} bytes, more than max_frame_size="
                f"{self._max_frame}; send a smaller request or raise max_frame_size"
            )
        task = self._tasks.new(data, retry)
        inc = self._inc
        if inc is None or not inc.send_now(task):
            self._tasks.queue(task)
        return task

    async def _pickle_in_thread(self, request: Any) -> bytes | proto.Pieces:
        try:
            return await _payloads.dumps_in_thread(
                request, self._payload_limiter, self._max_frame - proto.MESSAGE_OVERHEAD
            )
        except Exception as exc:  # the request's own classes run there: anything goes
            raise unpicklable("the request", exc) from exc

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
            inc.request_stop()
        self._stop_event.set()
        if self._main_scope is not None:
            bound = trio.current_time() + self._timeouts.shutdown_bound + DRAIN_BOUND + _STOP_MARGIN
            self._main_scope.deadline = min(self._main_scope.deadline, bound)

    async def _stop_on_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._request_stop()

    # -- the restart loop ---------------------------------------------------------

    async def _run(self, task_status: trio.TaskStatus[Supervisor[RequestT, EventT, ResultT]]) -> None:
        check_not_bootstrapping()
        if self._worker_factory is process_worker:
            check_main_script(self._spec.start_method)
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
                await trio.to_thread.run_sync(
                    ensure_forkserver, self.name, self._spec.preload, abandon_on_cancel=True
                )
            while not self._stop_requested:
                self._incarnations += 1
                inc = self._inc = self._new_incarnation(self._incarnations)
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
                        await inc.aclose()
                if delay is None:
                    break
                with trio.move_on_after(delay):
                    await self._stop_event.wait()
        finally:
            if self._spec.guardian is not None:
                self._spec.guardian.close()  # every incarnation is closed: the guardian may go
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

    def _new_incarnation(self, number: int) -> Incarnation | GroupIncarnation:
        """The next spawn: one runner process, or one generation of a group (``_group``)."""
        make = functools.partial(
            Incarnation,
            name=self.name,
            timeouts=self._timeouts,
            max_frame=self._max_frame,
            payload_limiter=self._payload_limiter,
            child_log=self._child_log,
        )
        tasks = self._tasks
        if isinstance(tasks, GroupTable):
            return GroupIncarnation(
                number,
                self._spec,
                self._worker_factory,
                make,
                tasks=tasks,
                on_ready=self._restarts.on_ready,
                on_exit=self._report_exit,
            )
        worker = self._worker_factory(self._spec, number)
        return make(number, worker, tasks=tasks, on_ready=self._restarts.on_ready, on_exit=self._report_exit)

    # -- one incarnation ----------------------------------------------------------

    async def _run_incarnation(self, inc: Incarnation | GroupIncarnation) -> ExitRecord:
        self._lifecycle.set_state(RunnerState.STARTING)
        if self._stop_requested:
            inc.request_stop()
        record = await inc.start()
        if record is not None:
            return record
        for rank, pid in enumerate(inc.pids):
            self._lifecycle.emit(Spawned(inc.number, pid, rank))
        return await inc.run()

    def _report_exit(self, inc: Incarnation | GroupIncarnation, record: ExitRecord) -> None:
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
            inc.decision = self._restarts.decide(inc, record, trio.current_time())


def create_supervisor(
    runner: type[Runner[RequestT, EventT, ResultT]],
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    options: Options,
    worker_factory: WorkerFactory = process_worker,
) -> Supervisor[RequestT, EventT, ResultT]:
    """The one way to make a :class:`Supervisor`; tests pass a fake ``worker_factory``."""
    return Supervisor[RequestT, EventT, ResultT]._create(runner, args, kwargs, options, worker_factory)  # pyright: ignore[reportPrivateUsage]


async def run_supervisor(
    runner: type[Runner[RequestT, EventT, ResultT]],
    *args: Any,
    kwargs: Mapping[str, Any] | None = None,
    task_status: trio.TaskStatus[Supervisor[RequestT, EventT, ResultT]] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[SupervisorOptions],
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
        RuntimeError: the main script was read from standard input
            (``python - < script.py``), which spawn and forkserver cannot re-run
            in the runner process; raised before any process starts.
    """
    supervisor = create_supervisor(runner, args, kwargs, Options.from_keywords("run_supervisor", options))
    await supervisor._run(task_status)  # pyright: ignore[reportPrivateUsage]


def open_supervisor(
    runner: type[Runner[RequestT, EventT, ResultT]],
    *args: Any,
    kwargs: Mapping[str, Any] | None = None,
    **options: Unpack[SupervisorOptions],
) -> AbstractAsyncContextManager[Supervisor[RequestT, EventT, ResultT]]:
    """Run ``runner`` in a supervised child process for the duration of the block.

    Args:
        runner: a :class:`Runner` subclass, importable by its module path.
        *args: positional arguments for the runner's constructor (picklable).
        kwargs: keyword arguments for the runner's constructor (picklable).
        **options: keywords only; each default is in ``trio_runner._options.DEFAULT``.
        policy: the :class:`RestartPolicy`; by default permanent, 2, 4, 8 ... 60 s, 10 restarts.
        timeouts: the :class:`Timeouts`; by default ``Timeouts()``.
        name: names the runner in logs; child output goes to the logger
            ``trio_runner.runner.<name>``. Defaults to the class name.
        start_method: ``"spawn"`` (default) or ``"forkserver"``.
        preload: modules the forkserver imports once, so restarts skip them.
        window: events in flight per task before ``ctx.emit`` blocks (default 8192).
        max_frame_size: the largest frame either side accepts; larger is a
            protocol error. An int from 64 KiB to 2**32 - 1 (default 64 MiB); a
            request, result or batch of events may pickle to at most
            ``max_frame_size - 256`` bytes.
        raise_on_give_up: when the policy gives up, raise
            :class:`RestartLimitExceeded` out of the block (the default, which
            cancels the body), or only move to FAILED.
        ranks: run N processes of the runner as one group (default 1): each
            request goes to every rank, rank 0's events and result come back,
            and any rank's exit restarts the whole group on fresh ports
            (one_for_all). Each runner sees its place as ``self.group``.

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
        TypeError: an option has the wrong type, or is not an option.
        ValueError: an option is out of range. Raised at the call.
        RuntimeError: when the block is entered, if the main script was read
            from standard input (``python - < script.py``): spawn and
            forkserver re-run the main script from its file in the runner.
    """
    supervisor = create_supervisor(runner, args, kwargs, Options.from_keywords("open_supervisor", options))
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
