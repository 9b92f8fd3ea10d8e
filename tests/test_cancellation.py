"""Cancel means stop, against real runner processes.

After ``await task.cancel()`` returns on a task without an outcome, its
consumer gets no further event: events queued in the runner or in the parent
are dropped (and counted in ``statistics().events_dropped``), a handler's next
``ctx.emit`` raises ``TaskCancelled``, a task whose caller left its stream
block gets no more credits, and the outcome is ``TaskCancelled`` unless the
result had already been sent.
"""

from __future__ import annotations

import pytest
import trio

from trio_runner import RestartPolicy, TaskCancelled, open_supervisor

from .runners import EchoRunner

FAST = RestartPolicy(initial_delay=0.05, max_delay=0.2)


async def test_after_cancel_returns_the_consumer_gets_no_more_events() -> None:
    async with open_supervisor(EchoRunner, policy=FAST) as sup:
        # A fast stream: thousands of events are queued in the runner and in
        # this process at any moment.
        async with sup.stream(("count", 10**8)) as task:
            seen = 0
            async for _ in task:
                seen += 1
                if seen == 1000:
                    break
            await task.cancel()
            after = []
            with pytest.raises(TaskCancelled):
                async for event in task:
                    after.append(event)
        assert after == []
        assert sup.statistics().events_dropped > 0
        assert await sup.run(("echo", "next")) == "next"


async def test_a_handler_that_only_emits_is_stopped_once_its_stream_block_is_left() -> None:
    # concurrency = 1: if the emit-only handler were never stopped, every later
    # task would wait behind it for ever.
    async with open_supervisor(EchoRunner, policy=FAST) as sup:
        async with sup.stream(("emit_forever", 0.001)) as task:
            async for event in task:
                if event == 10:
                    break
        with trio.fail_after(10):
            assert await sup.run(("echo", "served")) == "served"
        assert sup.statistics().incarnation == 1  # stopped, not killed


async def test_a_handler_that_returns_after_the_cancel_arrived_ends_cancelled() -> None:
    async with open_supervisor(EchoRunner, policy=FAST) as sup:
        await sup.wait_ready()
        async with sup.stream(("sleep_then_return", 1.0, "too late")) as task:
            await trio.sleep(0.3)  # handle() is running
            await task.cancel()
            with pytest.raises(TaskCancelled):
                await task.wait()
        assert await sup.run(("echo", "next")) == "next"


async def test_a_result_sent_before_the_cancel_is_kept() -> None:
    async with open_supervisor(EchoRunner, policy=FAST) as sup:
        await sup.wait_ready()
        async with sup.stream(("echo", "early")) as task:
            assert await task.wait() == "early"
            await task.cancel()  # too late: the outcome is already here
            assert task.result == "early"


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


async def test_submitting_in_a_cancelled_scope_raises_cancelled_not_unavailable() -> None:
    async with open_supervisor(EchoRunner) as sup:
        await sup.wait_ready()
    with trio.CancelScope() as scope:
        scope.cancel()
        await sup.run(("echo", 1))  # stopped supervisor, but the cancel comes first
    assert scope.cancelled_caught
