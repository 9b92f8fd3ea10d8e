"""One task's error fails that task alone, whatever the exception does; against real children.

A runner's exception is the runner's own object: its ``__str__`` may raise,
its message may be larger than a frame. Either used to crash the runner and
every innocent task in flight with it. Each test runs the hostile task beside
an innocent one (``concurrency = 2``), then a later task, and checks that the
runner was never restarted.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from trio_runner import TaskFailed, open_supervisor
from trio_runner._protocol import MIN_FRAME_SIZE

from .payload_runners import PairRunner
from .runners import EchoRunner


async def _fails_alone(sup: Any, hostile: tuple[Any, ...]) -> TaskFailed:
    """Run ``hostile`` beside an innocent task; both get their own outcome, and the runner serves on."""
    outcomes: dict[str, Any] = {}

    async def innocent() -> None:
        outcomes["innocent"] = await sup.run(("sleep", 0.5))

    async def guilty() -> None:
        await trio.sleep(0.1)  # the innocent task is running by now
        with pytest.raises(TaskFailed) as info:
            await sup.run(hostile)
        outcomes["guilty"] = info.value

    with trio.fail_after(30):
        await sup.wait_ready()
        pid = sup.statistics().pid
        async with trio.open_nursery() as nursery:
            nursery.start_soon(innocent)
            nursery.start_soon(guilty)
        assert outcomes["innocent"] == "slept"
        assert await sup.run(("echo", "later")) == "later"
    stats = sup.statistics()
    assert (stats.pid, stats.incarnation, stats.restarts) == (pid, 1, 0)
    return outcomes["guilty"]


async def test_an_exception_whose_str_raises_fails_only_its_task() -> None:
    async with open_supervisor(PairRunner) as sup:
        error = await _fails_alone(sup, ("raise_hostile_str",))
    assert error.remote_type == "tests.payload_runners.HostileStr"
    assert "str() of this tests.payload_runners.HostileStr raised RuntimeError" in error.remote_message
    assert "raise HostileStr()" in error.remote_traceback


async def test_an_exception_message_larger_than_the_frame_is_truncated_and_fails_only_its_task() -> None:
    async with open_supervisor(PairRunner, max_frame_size=MIN_FRAME_SIZE) as sup:
        error = await _fails_alone(sup, ("raise_huge", 10 * MIN_FRAME_SIZE))
    assert error.remote_type == "ValueError"
    assert error.remote_message.startswith("xxxxxxxx")
    assert "bytes truncated" in error.remote_message
    assert len(error.remote_message) < MIN_FRAME_SIZE
    # The frames above the message survive the cut, not only the message's tail.
    assert 'raise ValueError("x" * args[0])' in error.remote_traceback
    assert "bytes truncated" in error.remote_traceback


async def test_an_exception_message_larger_than_the_default_frame_fails_only_its_task() -> None:
    async with open_supervisor(PairRunner) as sup:
        error = await _fails_alone(sup, ("raise_huge", 70 * 1024 * 1024))
    assert "bytes truncated" in error.remote_message
    assert len(error.remote_message) <= 64 * 1024


async def test_an_exception_type_with_a_huge_name_fails_only_its_task() -> None:
    async with open_supervisor(PairRunner, max_frame_size=MIN_FRAME_SIZE) as sup:
        error = await _fails_alone(sup, ("raise_huge_name", 4 * MIN_FRAME_SIZE))
    assert "bytes truncated" in error.remote_type
    assert error.remote_message == "named hugely"


async def test_a_result_that_fails_to_pickle_with_a_huge_message_fails_only_its_task() -> None:
    async with open_supervisor(PairRunner, max_frame_size=MIN_FRAME_SIZE) as sup:
        error = await _fails_alone(sup, ("unpicklable_huge_error", 10 * MIN_FRAME_SIZE))
    assert error.remote_message.startswith("could not send to the parent: xxxx")
    assert "bytes truncated" in error.remote_message


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
