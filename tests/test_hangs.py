"""Fault injection: the runner hangs instead of dying, and the supervisor ends it.

A hung runner is alive but useless: it ignores SIGTERM, is SIGSTOPped, stops
reading its socket, or stops making progress. Each test checks that the
matching timeout notices, that the exit is classified (HUNG, STARTUP_FAILED,
or a shutdown that needed SIGKILL), and that the event loop stays responsive
throughout. Bounds are generous: only a real bug breaks them.
"""

from __future__ import annotations

import contextlib
import os
import signal

import psutil
import pytest
import trio

from trio_runner import (
    Exited,
    ExitReason,
    RestartLimitExceeded,
    RestartPolicy,
    RunnerCrashed,
    StoppedBy,
    TaskCancelled,
    Timeouts,
    open_supervisor,
)

from .runners import EchoRunner
from .test_crashes import LATENESS_BOUND, lateness_ticker

FAST = RestartPolicy(initial_delay=0.05, max_delay=0.2)


def _gone(pid: int) -> bool:
    """True if ``pid`` no longer runs; a zombie that is not our child counts as gone."""
    try:
        proc = psutil.Process(pid)
        return proc.status() == psutil.STATUS_ZOMBIE and proc.ppid() != os.getpid()
    except psutil.NoSuchProcess:
        return True


async def test_leaving_open_supervisor_sigkills_a_runner_that_ignores_sigterm_within_the_bound() -> None:
    timeouts = Timeouts(heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)
    async with lateness_ticker() as ticker:
        async with open_supervisor(EchoRunner, policy=FAST, timeouts=timeouts) as sup:
            assert await sup.run(("ignore_sigterm_and_hang",)) == "ignoring"
            pid = sup.statistics().pid
            async with sup.stream(("hang",)):  # ignores the cancel, the Shutdown and SIGTERM
                await trio.sleep(0.1)
            start = trio.current_time()
        elapsed = trio.current_time() - start
    assert pid is not None
    assert elapsed < timeouts.shutdown_bound + 10
    record = sup.statistics().last_exit
    assert record is not None
    assert (record.reason, record.stopped_by, record.signal) == (
        ExitReason.REQUESTED,
        StoppedBy.SIGKILL,
        signal.SIGKILL,
    )
    assert _gone(pid)
    assert ticker.worst < LATENESS_BOUND


async def test_a_sigstopped_runner_is_killed_as_hung_by_the_heartbeat_timeout_and_restarted() -> None:
    timeouts = Timeouts(heartbeat=1.0, graceful=0.5, terminate=0.5, kill=1)
    async with open_supervisor(EchoRunner, policy=FAST, timeouts=timeouts) as sup:
        pid = await sup.run(("pid",))
        changes = sup.watch()
        os.kill(pid, signal.SIGSTOP)
        try:
            stopped_at = trio.current_time()
            with trio.fail_after(timeouts.heartbeat + 15):
                async for change in changes:
                    if isinstance(change, Exited):
                        break
            noticed = trio.current_time() - stopped_at
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # only matters if the test failed before the kill
        assert await sup.run(("pid",)) != pid
    record = change.exit
    assert (record.reason, record.stopped_by, record.pid) == (ExitReason.HUNG, StoppedBy.SIGKILL, pid)
    assert "heartbeat" in record.detail
    assert noticed < timeouts.heartbeat + 5
    assert _gone(pid)


async def test_a_runner_that_stops_reading_trips_the_cancel_send_timeout_and_is_restarted_as_hung() -> None:
    timeouts = Timeouts(cancel_send=0.5, heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)
    async with lateness_ticker() as ticker:
        async with open_supervisor(EchoRunner, policy=FAST, timeouts=timeouts) as sup:
            pid = await sup.run(("pid",))
            # The reader checks the flag before its next recv; the big request
            # wakes it, it parks for good, and the rest of the request fills the
            # socket buffers, so the task sender blocks holding the send lock.
            assert await sup.run(("stall_reader",)) == "stalled"
            big = b"x" * (32 * 1024 * 1024)
            async with sup.stream(("echo", big)) as task:
                await trio.sleep(0.2)
                await task.cancel()
                cancelled_at = trio.current_time()
                # Cancelled, and the runner killed before confirming: cancelled is its outcome.
                with trio.fail_after(timeouts.cancel_send + 15), pytest.raises(TaskCancelled):
                    await task.wait()
                noticed = trio.current_time() - cancelled_at
            del big
            assert await sup.run(("pid",)) != pid
            record = sup.statistics().last_exit
    assert record is not None
    assert (record.reason, record.stopped_by, record.pid) == (ExitReason.HUNG, StoppedBy.SIGKILL, pid)
    assert "cancel_send" in record.detail
    assert noticed < timeouts.cancel_send + 5
    assert ticker.worst < LATENESS_BOUND


async def test_a_busy_task_that_sends_nothing_for_the_stall_timeout_is_killed_as_hung() -> None:
    timeouts = Timeouts(stall=0.5, heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)
    async with open_supervisor(EchoRunner, policy=FAST, timeouts=timeouts) as sup:
        pid = await sup.run(("pid",))
        start = trio.current_time()
        with trio.fail_after(timeouts.stall + 15), pytest.raises(RunnerCrashed) as info:
            await sup.run(("sleep", 30))
        elapsed = trio.current_time() - start
        assert await sup.run(("pid",)) != pid
    assert info.value.reason is ExitReason.HUNG
    assert "stall" in info.value.exit.detail
    assert elapsed < timeouts.stall + 5  # the task alone would take 30 s


async def test_a_consumer_that_stops_reading_is_not_mistaken_for_a_stalled_runner() -> None:
    timeouts = Timeouts(stall=1.0, heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)
    async with open_supervisor(EchoRunner, policy=FAST, timeouts=timeouts, window=64) as sup:
        pid = await sup.run(("pid",))
        async with sup.stream(("count", 1000)) as task:
            await trio.sleep(3.5)  # over three stall periods with the window full
            stats = sup.statistics()
            assert (stats.pid, stats.restarts, stats.incarnation) == (pid, 0, 1)
            events = [event async for event in task]
        assert events == list(range(1000))
        assert task.result == 1000


async def test_setup_slower_than_the_startup_timeout_is_killed_as_startup_failed() -> None:
    timeouts = Timeouts(startup=0.5, heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)
    policy = RestartPolicy(initial_delay=0.05, max_delay=0.2, max_restarts=0)
    start = trio.current_time()
    with trio.fail_after(timeouts.startup + 15), pytest.raises(RestartLimitExceeded) as info:
        async with open_supervisor(EchoRunner, 30.0, policy=policy, timeouts=timeouts):
            await trio.sleep_forever()
    elapsed = trio.current_time() - start
    record = info.value.last_exit
    assert (record.reason, record.stopped_by) == (ExitReason.STARTUP_FAILED, StoppedBy.SIGKILL)
    assert "startup" in record.detail
    assert elapsed < timeouts.startup + 10  # setup alone would take 30 s
