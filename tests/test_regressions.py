"""Regression tests for bugs found in review, one per bug, against real processes."""

from __future__ import annotations

import time

import pytest
import trio

from trio_runner import (
    RestartLimitExceeded,
    RestartPolicy,
    RunnerCrashed,
    TaskCancelled,
    TaskFailed,
    open_supervisor,
)
from trio_runner._errors import ExitReason
from trio_runner._policy import RestartTracker

from .runners import EchoRunner

FAST = RestartPolicy(initial_delay=0.05, max_delay=0.1)


async def test_a_task_submitted_while_a_dead_runner_drains_waits_for_the_restart() -> None:
    async with open_supervisor(EchoRunner, policy=FAST) as sup:
        await sup.wait_ready()
        async with trio.open_nursery() as nursery:
            crashed: list[BaseException] = []

            async def crasher() -> None:
                try:
                    await sup.run(("grandchild_then_die",))
                except RunnerCrashed as exc:
                    crashed.append(exc)

            nursery.start_soon(crasher)
            await trio.sleep(0.3)
            with trio.fail_after(10):
                assert await sup.run(("echo", 1)) == 1
        assert len(crashed) == 1


async def test_an_event_that_cannot_be_pickled_fails_its_task_and_frees_the_runner() -> None:
    async with open_supervisor(EchoRunner, window=2) as sup:
        with pytest.raises(TaskFailed, match="could not send"):
            await sup.run(("unpicklable_event",))
        with trio.fail_after(10):
            assert await sup.run(("echo", "next")) == "next"


async def test_a_result_the_parent_cannot_unpickle_fails_that_task_only() -> None:
    async with open_supervisor(EchoRunner) as sup:
        pid = await sup.run(("pid",))
        with pytest.raises(TaskFailed, match="could not unpickle"):
            await sup.run(("unpicklable_result",))
        assert await sup.run(("pid",)) == pid


async def test_giving_up_raises_restart_limit_exceeded_alone_even_with_a_task_waiting() -> None:
    policy = RestartPolicy(initial_delay=0.05, max_delay=0.05, max_restarts=1)
    with pytest.raises(RestartLimitExceeded) as info:
        async with open_supervisor(EchoRunner, kwargs={"fail_setup": True}, policy=policy) as sup:
            await sup.run(("echo", 1))
    assert info.value.last_exit.reason is ExitReason.STARTUP_FAILED
    assert "setup failed on purpose" in (info.value.last_exit.remote_traceback or "")


async def test_watch_called_after_the_supervisor_stopped_ends_at_once() -> None:
    async with open_supervisor(EchoRunner) as sup:
        await sup.wait_ready()
    with trio.fail_after(2):
        changes = [change async for change in sup.watch()]
    assert [type(change).__name__ for change in changes] == ["Stopped"]


async def test_a_cancelled_retry_task_is_not_rerun_after_a_crash() -> None:
    async with open_supervisor(EchoRunner, policy=FAST) as sup:
        async with sup.stream(("hang",), retry=True) as task:
            await sup.wait_ready()
            await trio.sleep(0.2)
            await task.cancel()  # the runner ignores it ...
            pid = sup.statistics().pid
            assert pid is not None
            import os
            import signal

            os.kill(pid, signal.SIGKILL)  # ... and dies before confirming
            with trio.fail_after(10), pytest.raises(TaskCancelled):
                await task.wait()
        assert sup.statistics().in_flight == 0


async def test_the_bodys_own_exception_group_comes_out_unchanged() -> None:
    group = ExceptionGroup("mine", [ValueError("inner")])
    with pytest.raises(ExceptionGroup) as info:
        async with open_supervisor(EchoRunner):
            raise group
    # trio's cancel scopes re-derive groups that pass through them, so compare
    # the shape: the same message and the very same inner exception, one level.
    assert info.value.message == "mine"
    assert info.value.exceptions == group.exceptions


def test_backoff_delay_does_not_overflow_in_a_long_crash_loop() -> None:
    tracker = RestartTracker(RestartPolicy(max_restarts=5000))
    decisions = [tracker.on_exit(ExitReason.SIGNALED, now=float(i)) for i in range(3000)]
    assert decisions[-1].delay == 60.0


async def test_crash_exit_is_reported_promptly() -> None:
    async with open_supervisor(EchoRunner, policy=FAST) as sup:
        await sup.wait_ready()
        start = time.monotonic()
        with pytest.raises(RunnerCrashed):
            await sup.run(("exit", 3))
        # Only a hang: the claim "no writer-thread or drain delay of a second on
        # the way" is a timing claim, measured by benchmarks/bench_crash.py
        # (crash detection over the kernel's floor, same run).
        assert time.monotonic() - start < 5.0


async def test_a_retry_task_that_is_never_rerun_ends_with_its_crash() -> None:
    async with open_supervisor(EchoRunner, policy=RestartPolicy(mode="temporary")) as sup:
        with pytest.raises(RunnerCrashed) as info:
            await sup.run(("signal", 9), retry=True)
        assert info.value.exit.signal == 9


async def test_a_retried_stream_counts_its_attempts() -> None:
    async with open_supervisor(EchoRunner, policy=FAST) as sup:
        await sup.wait_ready()
        async with sup.stream(("grandchild_then_die",), retry=True) as task:
            assert task.attempt == 1
            assert await task.__anext__() == "x"
            with trio.fail_after(10):
                assert await task.__anext__() == "x"  # the re-run streams from the start
            assert task.attempt == 2
            await task.cancel()


async def test_submitting_in_a_cancelled_scope_raises_cancelled_not_unavailable() -> None:
    async with open_supervisor(EchoRunner) as sup:
        await sup.wait_ready()
    with trio.CancelScope() as scope:
        scope.cancel()
        await sup.run(("echo", 1))  # stopped supervisor, but the cancel comes first
    assert scope.cancelled_caught


def test_a_corrupt_frame_behind_a_good_one_in_one_read_raises_frame_error() -> None:
    from trio_runner import _protocol as proto

    reader = proto.FrameReader(1 << 20)
    data = proto.encode([proto.Heartbeat()]) + proto.HEADER.pack(7) + b"garbage"
    batches = reader.feed(data)
    # Handed over before the error.
    assert [type(proto.check_from_child(wire)) for wire in next(batches)] == [proto.Heartbeat]
    with pytest.raises(proto.FrameError):
        next(batches)
