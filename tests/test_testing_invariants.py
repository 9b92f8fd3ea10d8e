"""The invariant helpers detect what they promise to: each is shown a violation and a clean case."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from trio_runner import (
    BackingOff,
    Exited,
    ExitReason,
    ExitRecord,
    GaveUp,
    Ready,
    RestartPolicy,
    RunnerState,
    RunnerUnavailable,
    Spawned,
    Stopped,
    TaskCancelled,
)
from trio_runner.testing import (
    LifecycleError,
    OutcomeLedger,
    check_lifecycle,
    descendants,
    leftover_processes,
    monitor_lateness,
    wait_no_leftover_processes,
)

# -- lateness -------------------------------------------------------------------------------


async def test_lateness_monitor_reports_a_blocking_call_on_the_loop() -> None:
    async with monitor_lateness() as monitor:
        await trio.sleep(0.02)
        time.sleep(1.0)  # noqa: ASYNC251 -- the blocking call it must detect
        await trio.sleep(0.02)
    assert monitor.worst >= 0.95


async def test_lateness_monitor_stays_low_on_a_loop_that_only_awaits() -> None:
    async with monitor_lateness() as monitor:
        await trio.sleep(0.2)
    assert monitor.samples > 10
    assert monitor.worst < 0.5  # the 1 s block above shows; a loaded machine does not


async def test_lateness_monitor_lets_the_body_exception_out_unwrapped() -> None:
    with pytest.raises(KeyError):
        async with monitor_lateness():
            raise KeyError("mine")


# -- processes ------------------------------------------------------------------------------


async def test_leftover_processes_finds_a_process_in_a_runner_session_and_wait_kills_it() -> None:
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    proc = await trio.lowlevel.open_process(command, start_new_session=True)
    try:
        assert proc.pid in descendants()
        assert proc.pid in leftover_processes([proc.pid])
        assert leftover_processes([proc.pid + 10**6]) == {}
        with pytest.raises(AssertionError, match="still alive"):
            await wait_no_leftover_processes([proc.pid], grace=0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        await proc.wait()
    assert leftover_processes([proc.pid]) == {}


# -- outcomes -------------------------------------------------------------------------------


class _FakeHandle:
    def __init__(self, done: bool, error: BaseException | None = None, value: object = None) -> None:
        self.done = done
        self._error = error
        self._value = value

    @property
    def result(self) -> object:
        if self._error is not None:
            raise self._error
        return self._value

    async def wait(self) -> object:
        await trio.lowlevel.checkpoint()
        return self.result

    def __aiter__(self) -> _FakeHandle:
        return self

    async def __anext__(self) -> object:
        await trio.lowlevel.checkpoint()
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration


class _FakeSupervisor:
    def __init__(self, handle: _FakeHandle | None) -> None:
        self.handle = handle

    @asynccontextmanager
    async def stream(self, request: object, retry: bool = False) -> AsyncIterator[Any]:
        await trio.lowlevel.checkpoint()
        if self.handle is None:
            raise RunnerUnavailable("stopped")
        yield self.handle


async def test_ledger_catches_a_task_left_hanging() -> None:
    ledger = OutcomeLedger()
    async with ledger.stream(_FakeSupervisor(_FakeHandle(done=False)), "x"):
        pass
    with pytest.raises(AssertionError, match="left hanging"):
        ledger.check()


async def test_ledger_catches_two_outcomes_for_one_task() -> None:
    ledger = OutcomeLedger()
    # The caller saw the task cancelled, but the handle says it succeeded.
    handle = _FakeHandle(done=True, error=TaskCancelled("x"))
    with pytest.raises(TaskCancelled):
        await ledger.run(_FakeSupervisor(handle), "x")
    handle._error = None  # pyright: ignore[reportPrivateUsage]
    with pytest.raises(AssertionError, match="two outcomes"):
        ledger.check()


async def test_ledger_checks_outcomes_against_what_is_allowed_and_counts_refusals() -> None:
    ledger = OutcomeLedger()
    assert await ledger.run(_FakeSupervisor(_FakeHandle(done=True, value=5)), "ok") == 5
    with pytest.raises(RunnerUnavailable):
        await ledger.run(_FakeSupervisor(None), "refused")
    ledger.check({"result", "unavailable"})
    assert ledger.counts() == {"result": 1, "unavailable": 1}
    with pytest.raises(AssertionError, match="not one of"):
        ledger.check({"result"})


# -- lifecycle ------------------------------------------------------------------------------


def _exit(reason: ExitReason, incarnation: int, pid: int) -> ExitRecord:
    return ExitRecord(reason, pid=pid, incarnation=incarnation)


POLICY = RestartPolicy(initial_delay=0.1, factor=2.0, max_delay=1.0, max_restarts=1)
CRASH1 = _exit(ExitReason.SIGNALED, 1, 10)
CRASH2 = _exit(ExitReason.SIGNALED, 2, 20)
GOOD = [
    Spawned(1, 10),
    Ready(1, 10, 0.1),
    Exited(CRASH1),
    BackingOff(0.1, 1),
    Spawned(2, 20),
    Ready(2, 20, 0.1),
    Exited(CRASH2),
    GaveUp(1, CRASH2),
    Stopped(RunnerState.FAILED, CRASH2),
]


def test_lifecycle_checker_accepts_a_valid_restart_and_give_up() -> None:
    check_lifecycle(GOOD, policy=POLICY)


@pytest.mark.parametrize(
    ("changes", "policy", "match"),
    [
        ([Ready(1, 10, 0.1), *GOOD[1:]], None, "Ready while start"),
        (GOOD[:-1], None, "does not end with Stopped"),
        ([*GOOD[:3], BackingOff(0.4, 1), *GOOD[4:]], POLICY, "fits no failure count"),
        ([*GOOD[:3], BackingOff(0.1, 2), *GOOD[4:]], None, "expected restart number 1"),
        ([*GOOD[:4], Spawned(3, 20), *GOOD[5:]], None, "expected incarnation 2"),
        ([*GOOD[:7], Stopped(RunnerState.STOPPED, CRASH2)], POLICY, "cannot just stop"),
        (
            [*GOOD[:2], Exited(CRASH1), GaveUp(0, CRASH1), Stopped(RunnerState.FAILED, CRASH1)],
            POLICY,
            "gave up after 0",
        ),
        (
            [GOOD[0], GOOD[1], Exited(_exit(ExitReason.REQUESTED, 1, 10)), BackingOff(0.1, 1)],
            None,
            "requested exit is never restarted",
        ),
        ([*GOOD, Spawned(3, 30)], None, "nothing may follow Stopped"),
        ([*GOOD[:8], Stopped(RunnerState.STOPPED, CRASH2)], None, "expected state failed"),
    ],
)
def test_lifecycle_checker_rejects_what_the_state_machine_cannot_produce(
    changes: list[Any], policy: RestartPolicy | None, match: str
) -> None:
    with pytest.raises(LifecycleError, match=match):
        check_lifecycle(changes, policy=policy)


def test_lifecycle_checker_knows_temporary_stops_and_transient_leaves_a_clean_exit_alone() -> None:
    clean = _exit(ExitReason.CLEAN_EXIT, 1, 10)
    changes = [Spawned(1, 10), Ready(1, 10, 0.1), Exited(clean), Stopped(RunnerState.STOPPED, clean)]
    check_lifecycle(changes, policy=RestartPolicy(mode="transient"))
    check_lifecycle(changes, policy=RestartPolicy(mode="temporary"))
    with pytest.raises(LifecycleError):
        check_lifecycle(changes, policy=RestartPolicy(mode="permanent"))
