"""Resources stay bounded: file descriptors over restarts, bookkeeping over tasks, memory per task.

These are the slow leaks a long-lived supervisor would die of: one fd per
restart, one dict entry per task, or an unbounded event queue behind a consumer
that stopped reading.
"""

from __future__ import annotations

import gc
import os

import psutil
import pytest
import trio

from trio_runner import RestartPolicy, RunnerCrashed, TaskCancelled, TaskFailed, Timeouts, open_supervisor

from .fault_runners import ConcurrentFaultRunner, FaultRunner
from .runners import EchoRunner

QUICK = Timeouts(heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)


def _open_fds() -> int:
    gc.collect()  # a dropped socket object closes its fd when collected
    if os.path.isdir("/proc/self/fd"):
        return len(os.listdir("/proc/self/fd"))
    return psutil.Process().num_fds()


async def test_fifty_restarts_leak_no_file_descriptors() -> None:
    # No backoff, and never give up: the test is about what each restart leaves behind.
    policy = RestartPolicy(initial_delay=0, max_delay=0, max_restarts=10_000)
    async with open_supervisor(FaultRunner, policy=policy, timeouts=QUICK) as sup:

        async def crash_and_recover() -> None:
            with pytest.raises(RunnerCrashed):
                await sup.run(("crash",))
            await sup.run(("pid",))  # measured with a runner READY each time

        for _ in range(5):  # warm up: trio's thread cache, multiprocessing's resource tracker
            await crash_and_recover()
        before = _open_fds()
        for _ in range(50):
            await crash_and_recover()
        after = _open_fds()
        assert sup.statistics().restarts == 55
    # Two fds of slack: an fd held for a moment by a worker thread that has not
    # finished closing could show up in either count. A per-restart leak shows +50.
    assert after - before <= 2, f"{after - before} more fds after 50 restarts"


async def test_bookkeeping_is_empty_after_two_thousand_tasks_of_every_outcome() -> None:
    submitters, per_submitter = 20, 100  # 2,000 tasks

    async with open_supervisor(FaultRunner, timeouts=QUICK) as sup:

        async def submit(first: int) -> None:
            for i in range(first, first + per_submitter):
                kind = i % 4
                if kind == 0:
                    assert await sup.run(("echo", i)) == i
                elif kind == 1:
                    with pytest.raises(TaskFailed):
                        await sup.run(("raise", "boom"))
                elif kind == 2:
                    async with sup.stream(("count", 10)) as task:
                        assert [event async for event in task] == list(range(10))
                else:
                    async with sup.stream(("spin_until_cancelled",)) as task:
                        await task.cancel()
                        with pytest.raises(TaskCancelled):
                            await task.wait()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n in range(submitters):
                    nursery.start_soon(submit, n * per_submitter)
        child = await sup.run(("child_bookkeeping",))
        await trio.sleep(0.05)  # let the cancel channel drain what it has
        stats = sup.statistics()
        assert (stats.in_flight, stats.pending, stats.tasks_completed) == (0, 0, 2_001)
        table = sup._tasks  # pyright: ignore[reportPrivateUsage]
        assert table.pending == {}
        assert table.in_flight == {}
        assert table.control_recv.statistics().current_buffer_used == 0
        assert child == {"contexts": 1, "requests": 0}  # only the task that asked


async def test_a_consumer_that_stops_reading_holds_at_most_a_window_of_events_in_the_parent() -> None:
    window = 64
    async with open_supervisor(EchoRunner, timeouts=QUICK, window=window) as sup:
        async with sup.stream(("count", 10_000)) as task:
            assert await task.__anext__() == 0
            await trio.sleep(0.5)  # the runner would emit all 10,000 in far less
            queued = len(task._task.events)  # pyright: ignore[reportPrivateUsage]
            assert 0 < queued <= window
            rest = [event async for event in task]
        assert rest == list(range(1, 10_000))
        assert task.result == 10_000


async def test_with_concurrency_a_consumer_that_stops_reading_does_not_hold_up_other_tasks() -> None:
    async with open_supervisor(ConcurrentFaultRunner, timeouts=QUICK, window=64) as sup:
        async with sup.stream(("count", 10_000)) as stalled:
            assert await stalled.__anext__() == 0
            with trio.fail_after(5):
                for i in range(20):
                    assert await sup.run(("echo", i)) == i
            assert not stalled.done


async def test_without_concurrency_a_stalled_consumer_holds_the_runner_until_its_task_is_cancelled() -> None:
    # The documented cost of concurrency = 1: tasks run one at a time, and the
    # stalled task is blocked in emit() until its consumer reads or cancels.
    async with open_supervisor(EchoRunner, timeouts=QUICK, window=64) as sup:
        async with trio.open_nursery() as nursery:
            async with sup.stream(("count", 10_000)) as stalled:
                assert await stalled.__anext__() == 0
                other_done = trio.Event()

                async def other() -> None:
                    assert await sup.run(("echo", "other")) == "other"
                    other_done.set()

                nursery.start_soon(other)
                await trio.sleep(0.5)
                assert not other_done.is_set()
            # Leaving the stream block cancelled the stalled task.
            with trio.fail_after(5):
                await other_done.wait()
