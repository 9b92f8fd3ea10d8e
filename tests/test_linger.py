"""Runner.linger: the first event is never held, fast events are held at most ``linger``, outcomes never."""

from __future__ import annotations

import pytest
import trio

from trio_runner import open_supervisor

from .runners import BadLingerRunner, PacedRunner, UnpacedRunner

# PacedRunner.linger is 1 s: every bound below is at least 0.5 s away from what it
# tells apart (0, the 1 s linger, the next event 3 s later), so only the bug it is
# about breaks it, not a loaded machine.


async def _arrivals(runner: type[PacedRunner], delays: list[float]) -> tuple[list[float], float]:
    """When each event and the result arrived, in seconds after the submit."""
    async with open_supervisor(runner) as sup:
        await sup.wait_ready()
        await sup.run([])  # the child is warm
        began = trio.current_time()
        arrivals: list[float] = []
        async with sup.stream(delays) as task:
            async for _ in task:
                arrivals.append(trio.current_time() - began)
        assert task.result == "done"
        return arrivals, trio.current_time() - began


async def test_the_first_event_goes_out_at_once_and_a_fast_second_one_waits_at_most_linger() -> None:
    with trio.fail_after(30):
        arrivals, done = await _arrivals(PacedRunner, [0.0, 0.01, 3.0])
    first, second, third = arrivals
    assert first < 0.5  # not held for linger
    # Held until about 1 s after the first went out: not sent at once, not
    # kept until the next event or the result (3 s later).
    assert 0.5 < second - first < 2.5
    assert third > 2.9 and done - third < 0.5


async def test_a_zero_linger_sends_every_event_at_once() -> None:
    with trio.fail_after(30):
        arrivals, _ = await _arrivals(UnpacedRunner, [0.0, 0.01, 3.0])
    first, second, _third = arrivals
    assert first < 0.5
    assert second - first < 0.5  # not held until the next event, 3 s later


async def test_an_outcome_is_never_held_behind_lingering_events() -> None:
    with trio.fail_after(30):
        arrivals, done = await _arrivals(PacedRunner, [0.0, 0.01, 0.01, 0.01])
    assert len(arrivals) == 4
    assert done < 0.5  # the three lingering events came out with the result, not 1 s later


def test_linger_must_be_a_number_of_seconds_from_0_to_1() -> None:
    with pytest.raises(ValueError, match="linger"):
        open_supervisor(BadLingerRunner)


async def test_faulty_runner_lingers_like_the_runner_it_wraps() -> None:
    from trio_runner.testing import FaultPlan, FaultyRunner

    with trio.fail_after(30):
        async with open_supervisor(FaultyRunner, PacedRunner, FaultPlan(())) as sup:
            await sup.wait_ready()
            began = trio.current_time()
            arrivals: list[float] = []
            async with sup.stream([0.0, 0.01, 3.0]) as task:
                async for _ in task:
                    arrivals.append(trio.current_time() - began)
    # PacedRunner's 1 s, not FaultyRunner's own default of 5 ms.
    assert 0.5 < arrivals[1] - arrivals[0] < 2.5
