"""Invariant checks for tests of a supervised runner: loop lateness, leftover processes,
task outcomes, and the lifecycle that ``Supervisor.watch()`` reports.

Parent side only (imports trio). Each check is usable on its own in a user's test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncGenerator, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from .. import _validate as check
from .._errors import ExitReason, RunnerCrashed, RunnerUnavailable, TaskCancelled, TaskFailed
from .._groups import reraise_unwrapped
from .._policy import RestartPolicy
from .._state import BackingOff, Exited, GaveUp, LifecycleChange, Ready, RunnerState, Spawned, Stopped

# -- loop lateness ------------------------------------------------------------------------------


class LatenessMonitor:
    """Sleeps ``interval`` over and over and records how late each wake-up was.

    Lateness is measured on the wall clock (``time.perf_counter``), so it shows a
    blocked loop even under a ``MockClock``.

    Attributes:
        worst: the worst lateness seen, in seconds.
        samples: how many wake-ups were measured.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = check.seconds("interval", interval, above_zero=True)
        self.worst = 0.0
        self.samples = 0

    async def run(self) -> None:
        """Measure until cancelled."""
        while True:
            start = time.perf_counter()
            await trio.sleep(self.interval)
            late = time.perf_counter() - start - self.interval
            self.samples += 1
            if late > self.worst:
                self.worst = late


@asynccontextmanager
async def monitor_lateness(interval: float = 0.001) -> AsyncGenerator[LatenessMonitor]:
    """Measure the event loop's worst lateness for the duration of the block.

    ``monitor.worst`` is up to date inside the block and final after it::

        async with monitor_lateness() as monitor:
            ...
        assert monitor.worst < 0.5

    A loop blocked for N seconds (a blocking call on the trio thread) shows a
    lateness of about N seconds. An exception from the body comes out as it was
    raised, not wrapped in an ExceptionGroup.
    """
    monitor = LatenessMonitor(interval)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.run)
            try:
                yield monitor
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The monitor never raises: an error is the body's, so it comes out as raised.
        reraise_unwrapped(group)


# -- processes -------------------------------------------------------------------------------

# Shared helpers of multiprocessing that outlive a supervisor by design.
_HELPERS = ("forkserver", "resource_tracker")


def _all_processes() -> dict[int, tuple[int, str, bool]]:
    """pid -> (parent pid, command line, zombie) for every process we can see."""
    found: dict[int, tuple[int, str, bool]] = {}
    try:
        import psutil
    except ImportError:
        # Portable fallback: POSIX ps, on Linux and macOS alike; no /proc assumption.
        output = subprocess.run(
            ["ps", "-A", "-o", "pid=,ppid=,stat=,command="], capture_output=True, text=True, check=True
        ).stdout
        for line in output.splitlines():
            parts = line.split(None, 3)
            if len(parts) >= 3:
                found[int(parts[0])] = (
                    int(parts[1]),
                    parts[3] if len(parts) > 3 else "",
                    parts[2].startswith("Z"),
                )
        return found
    for proc in psutil.process_iter(["ppid", "cmdline", "status", "name"]):
        info: dict[str, Any] = proc.info  # type: ignore[attr-defined]
        cmdline = " ".join(info.get("cmdline") or []) or str(info.get("name") or "")
        found[proc.pid] = (int(info.get("ppid") or 0), cmdline, info.get("status") == psutil.STATUS_ZOMBIE)
    return found


def descendants(*, include_helpers: bool = False) -> dict[int, str]:
    """Every live descendant of this process, zombies included, as pid -> command line.

    Uses psutil where it is installed, else ``ps``. multiprocessing's forkserver and
    resource tracker are left out unless ``include_helpers``.
    """
    table = _all_processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, str] = {}
    stack = list(children.get(os.getpid(), []))
    while stack:
        pid = stack.pop()
        cmdline = table[pid][1]
        if include_helpers or not any(helper in cmdline for helper in _HELPERS):
            found[pid] = cmdline
        stack.extend(children.get(pid, []))
    return found


def leftover_processes(runner_pids: Iterable[int]) -> dict[int, str]:
    """Processes still alive that a supervisor started, as pid -> command line.

    ``runner_pids`` are the runner pids (the ``pid`` of each :class:`~trio_runner.Spawned`
    change). A runner leads its own session and process group, so a process counts
    if its pid is a runner pid or its session or process group is one: that
    finds grandchildren even after they were re-parented to init. A zombie of
    ours (a child nobody reaped) counts; a zombie waiting for init does not.
    """
    pids = {pid for pid in runner_pids if pid is not None}  # pyright: ignore[reportUnnecessaryComparison]
    if not pids:
        return {}
    found: dict[int, str] = {}
    me = os.getpid()
    for pid, (ppid, cmdline, zombie) in _all_processes().items():
        if zombie and ppid != me:
            continue  # dead, and waiting for init (not us) to reap it
        if pid in pids:
            found[pid] = cmdline  # alive, or a zombie of ours nobody reaped
            continue
        with contextlib.suppress(OSError):
            if os.getsid(pid) in pids or os.getpgid(pid) in pids:
                found[pid] = cmdline
    return found


def runner_pids(changes: Iterable[LifecycleChange]) -> list[int]:
    """The runner pids in a lifecycle, from its :class:`~trio_runner.Spawned` changes."""
    return [change.pid for change in changes if isinstance(change, Spawned) and change.pid is not None]


async def wait_no_leftover_processes(runner_pids: Iterable[int], *, grace: float = 5.0) -> None:
    """Wait up to ``grace`` seconds for every process a supervisor started to be gone.

    Raises:
        AssertionError: some are still alive after ``grace``; they are SIGKILLed
            first, so one failing test does not spill into the next.
    """
    pids = list(runner_pids)
    deadline = time.monotonic() + grace
    while True:
        left = await trio.to_thread.run_sync(leftover_processes, pids)
        if not left or time.monotonic() >= deadline:
            break
        await trio.sleep(0.05)
    if left:
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"processes the supervisor started are still alive: {left}")


# -- outcomes ----------------------------------------------------------------------------------

Outcome = Literal["result", "failed", "cancelled", "crashed", "unavailable"]
OUTCOMES: tuple[Outcome, ...] = ("result", "failed", "cancelled", "crashed", "unavailable")


def _classify(error: BaseException | None) -> Outcome | None:
    if error is None:
        return "result"
    if isinstance(error, TaskFailed):
        return "failed"
    if isinstance(error, TaskCancelled):
        return "cancelled"
    if isinstance(error, RunnerCrashed):
        return "crashed"
    if isinstance(error, RunnerUnavailable):
        return "unavailable"
    return None


@dataclass
class LedgerEntry:
    """One submission and what became of it.

    Attributes:
        index: the order of submission, from 0.
        request: what was submitted.
        tag: anything the test attached (e.g. the Submission).
        events: the events the caller read, in order.
        outcome: the final outcome, once :meth:`OutcomeLedger.check` has run.
        value: the result, if the outcome is ``"result"``.
        error: the error, for any other outcome.
        observed: outcomes the caller saw raised or returned, in order.
    """

    index: int
    request: Any
    tag: Any = None
    handle: Any = field(default=None, repr=False)
    events: list[Any] = field(default_factory=list[Any])
    outcome: Outcome | None = None
    value: Any = None
    error: BaseException | None = None
    observed: list[Outcome] = field(default_factory=list[Outcome])


class OutcomeLedger:
    """Records every task submitted through it, then checks each ended exactly once.

    Submit through the ledger instead of the supervisor::

        ledger = OutcomeLedger()
        async with open_supervisor(...) as sup:
            await ledger.run(sup, request)
            async with ledger.stream(sup, request) as task:
                async for event in task: ...
        ledger.check(allowed={"result", "crashed"})

    A submission refused with ``RunnerUnavailable`` counts as one, with that
    outcome. :meth:`check` runs once the supervisor has stopped: then every task
    must be done, what the caller saw must agree with the handle's final
    outcome, and the outcome must be allowed.
    """

    def __init__(self) -> None:
        self.entries: list[LedgerEntry] = []

    def _new(self, request: Any, tag: Any) -> LedgerEntry:
        entry = LedgerEntry(len(self.entries), request, tag)
        self.entries.append(entry)
        return entry

    @asynccontextmanager
    async def stream(
        self, supervisor: Any, request: Any, *, retry: bool = False, tag: Any = None
    ) -> AsyncGenerator[Any]:
        """``supervisor.stream(request)``, recorded. Yields the :class:`~trio_runner.TaskHandle`."""
        entry = self._new(request, tag)
        try:
            async with supervisor.stream(request, retry=retry) as handle:
                entry.handle = handle
                yield _RecordingHandle(handle, entry)
        except BaseException as exc:
            kind = _classify(exc)
            if kind is not None:
                entry.observed.append(kind)
                if entry.handle is None:
                    entry.error = exc
            raise

    async def run(self, supervisor: Any, request: Any, *, retry: bool = False, tag: Any = None) -> Any:
        """``supervisor.run(request)``, recorded."""
        async with self.stream(supervisor, request, retry=retry, tag=tag) as handle:
            value = await handle.wait()
        return value

    def check(
        self, allowed: Collection[Outcome] | Callable[[LedgerEntry], Collection[Outcome]] = OUTCOMES
    ) -> None:
        """Check that every task ended exactly once, in an allowed outcome.

        Args:
            allowed: the outcomes allowed for every task, or a function of the
                entry that returns those allowed for it.

        Raises:
            AssertionError: naming the first task that broke the rule.
        """
        for entry in self.entries:
            handle = entry.handle
            if handle is None:
                if not isinstance(entry.error, RunnerUnavailable):
                    raise AssertionError(f"task {entry.index} was neither submitted nor refused: {entry}")
                entry.outcome = "unavailable"
            else:
                if not handle.done:
                    raise AssertionError(
                        f"task {entry.index} ({entry.request!r}) never ended: it was left hanging"
                    )
                try:
                    entry.value = handle.result
                    entry.outcome = "result"
                except BaseException as exc:
                    entry.error = exc
                    entry.outcome = _classify(exc)
                    if entry.outcome is None:
                        raise AssertionError(f"task {entry.index} ended with an unexpected {exc!r}") from exc
            for seen in entry.observed:
                if seen != entry.outcome:
                    raise AssertionError(
                        f"task {entry.index} ({entry.request!r}) had two outcomes: the caller saw {seen!r}, "
                        f"the handle says {entry.outcome!r}"
                    )
            ok = allowed(entry) if callable(allowed) else allowed
            if entry.outcome not in ok:
                raise AssertionError(
                    f"task {entry.index} ({entry.request!r}) ended {entry.outcome!r} ({entry.error!r}), "
                    f"not one of {sorted(ok)}"
                )

    def counts(self) -> dict[Outcome, int]:
        """How many tasks ended in each outcome (after :meth:`check`)."""
        counts: dict[Outcome, int] = {}
        for entry in self.entries:
            if entry.outcome is not None:
                counts[entry.outcome] = counts.get(entry.outcome, 0) + 1
        return counts


class _RecordingHandle:
    """A TaskHandle that records what its caller reads and sees raised."""

    def __init__(self, handle: Any, entry: LedgerEntry) -> None:
        self._handle = handle
        self._entry = entry

    def __aiter__(self) -> _RecordingHandle:
        return self

    async def __anext__(self) -> Any:
        try:
            event = await self._handle.__anext__()
        except StopAsyncIteration:
            self._entry.observed.append("result")
            raise
        except BaseException as exc:
            kind = _classify(exc)
            if kind is not None:
                self._entry.observed.append(kind)
            raise
        self._entry.events.append(event)
        return event

    async def wait(self) -> Any:
        try:
            value = await self._handle.wait()
        except BaseException as exc:
            kind = _classify(exc)
            if kind is not None:
                self._entry.observed.append(kind)
            raise
        self._entry.observed.append("result")
        return value

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


# -- lifecycle ---------------------------------------------------------------------------------


class LifecycleError(AssertionError):
    """A lifecycle that the supervisor's state machine cannot produce."""


def _delay_fits(policy: RestartPolicy, failures: int, delay: float) -> bool:
    """Whether ``delay`` is a backoff ``policy`` can choose after ``failures`` failures (jitter included)."""
    base = policy.delay(failures)
    return base * (1 - policy.jitter) - 1e-9 <= delay <= base * (1 + policy.jitter) + 1e-9


def check_lifecycle(
    changes: Sequence[LifecycleChange],
    *,
    policy: RestartPolicy | None = None,
    complete: bool = True,
    runner_loads: bool = False,
) -> None:
    """Check a ``watch(replay=True)`` sequence against the supervisor's state machine.

    The grammar, per incarnation *k* (counting from 1)::

        Spawned(k) [Ready(k)] Exited(k)  then  BackingOff -> incarnation k+1
                                               | GaveUp Stopped(FAILED) | Stopped(STOPPED)

    (a process that could not even be spawned goes straight to ``Exited``). pids,
    incarnation numbers and the last exit must agree; a requested exit is never
    restarted. With ``policy``, each decision after an exit must be the
    policy's: restart or not by its mode, the backoff delay for the failure
    count, and giving up exactly after ``max_restarts`` failures in a row (a
    ``Ready`` in between may have reset the count after ``reset_after``).

    Args:
        changes: the lifecycle changes, in order, from the first.
        policy: the supervisor's restart policy, to check its decisions too.
        complete: the supervisor has stopped, so the sequence must end with
            ``Stopped``.
        runner_loads: the runner class is known to load in the child, so a
            failure in ``setup`` must follow the policy too. Otherwise a
            ``STARTUP_FAILED`` runner that never became READY may give up at
            once (the "can never start" case).

    Raises:
        LifecycleError: saying which change broke which rule.
    """

    def fail(index: int, why: str) -> LifecycleError:
        shown = ", ".join(type(c).__name__ for c in changes[max(0, index - 4) : index + 1])
        return LifecycleError(f"change {index} ({changes[index]!r}) is invalid: {why} (…{shown})")

    state = "start"  # start, spawned, ready, exited, gave_up, stopped
    incarnation = 1
    pid: int | None = None
    last_exit: Exited | None = None
    ready_seen = False
    restarts = 0
    counts: set[int] = {0}  # possible consecutive failures, per the policy's memory
    gave_up = False
    for index, change in enumerate(changes):
        if state == "stopped":
            raise fail(index, "nothing may follow Stopped")
        if isinstance(change, Spawned):
            if state != "start":
                raise fail(index, f"Spawned while {state}")
            if change.incarnation != incarnation:
                raise fail(index, f"expected incarnation {incarnation}")
            pid, ready_seen, state = change.pid, False, "spawned"
        elif isinstance(change, Ready):
            if state != "spawned":
                raise fail(index, f"Ready while {state}")
            if (change.incarnation, change.pid) != (incarnation, pid):
                raise fail(index, f"expected incarnation {incarnation} with pid {pid}")
            ready_seen, state = True, "ready"
        elif isinstance(change, Exited):
            exit = change.exit
            if state == "start":
                if exit.reason is not ExitReason.STARTUP_FAILED or exit.pid is not None:
                    raise fail(index, "only a runner that could not be spawned exits without Spawned")
            elif state not in ("spawned", "ready"):
                raise fail(index, f"Exited while {state}")
            elif exit.pid != pid:
                raise fail(index, f"the exit is of pid {exit.pid}, the runner was {pid}")
            if exit.incarnation != incarnation:
                raise fail(index, f"expected incarnation {incarnation}")
            if ready_seen and exit.reason is ExitReason.STARTUP_FAILED:
                raise fail(index, "a runner that was READY cannot fail to start")
            last_exit, state = change, "exited"
        elif isinstance(change, BackingOff):
            if state != "exited" or last_exit is None:
                raise fail(index, f"BackingOff while {state}")
            reason = last_exit.exit.reason
            if reason is ExitReason.REQUESTED:
                raise fail(index, "a requested exit is never restarted")
            restarts += 1
            if change.restart != restarts:
                raise fail(index, f"expected restart number {restarts}")
            if policy is not None:
                if not policy.restarts_after(reason):
                    raise fail(index, f"mode {policy.mode!r} does not restart after {reason.value}")
                if ready_seen:
                    counts = counts | {0}
                matching = {
                    c for c in counts if c < policy.max_restarts and _delay_fits(policy, c + 1, change.delay)
                }
                if not matching:
                    raise fail(
                        index,
                        f"delay {change.delay} fits no failure count in {sorted(counts)} under {policy!r}",
                    )
                counts = {c + 1 for c in matching}
            incarnation += 1
            pid, state = None, "start"
        elif isinstance(change, GaveUp):
            if state != "exited" or last_exit is None:
                raise fail(index, f"GaveUp while {state}")
            reason = last_exit.exit.reason
            if reason is ExitReason.REQUESTED:
                raise fail(index, "a requested exit never gives up")
            never_started = reason is ExitReason.STARTUP_FAILED and not ready_seen and not runner_loads
            if policy is not None and not never_started:
                if not policy.restarts_after(reason):
                    raise fail(index, f"mode {policy.mode!r} stops after {reason.value}, it does not give up")
                if ready_seen:
                    counts = counts | {0}
                if change.restarts not in counts or change.restarts < policy.max_restarts:
                    raise fail(
                        index,
                        f"gave up after {change.restarts} restarts; policy allows {policy.max_restarts}",
                    )
            if change.exit != last_exit.exit:
                raise fail(index, "GaveUp must carry the last exit")
            gave_up, state = True, "gave_up"
        elif isinstance(change, Stopped):  # pyright: ignore[reportUnnecessaryIsInstance]
            if state in ("spawned", "ready"):
                raise fail(index, "Stopped while a runner is still alive")
            expected = RunnerState.FAILED if gave_up else RunnerState.STOPPED
            if change.state is not expected:
                raise fail(index, f"expected state {expected.value}")
            if change.exit != (None if last_exit is None else last_exit.exit):
                raise fail(index, "Stopped must carry the last exit")
            if policy is not None and state == "exited" and last_exit is not None:
                reason = last_exit.exit.reason
                if reason is not ExitReason.REQUESTED and policy.restarts_after(reason):
                    raise fail(
                        index, f"mode {policy.mode!r} restarts after {reason.value}; it cannot just stop"
                    )
            state = "stopped"
        else:
            raise fail(index, f"unknown change {change!r}")
    if complete and state != "stopped":
        raise LifecycleError(f"the lifecycle does not end with Stopped: {list(changes)!r}")


async def lifecycle(supervisor: Any) -> list[LifecycleChange]:
    """The whole lifecycle of a supervisor that has stopped (``watch(replay=True)``)."""
    return [change async for change in supervisor.watch(replay=True)]
