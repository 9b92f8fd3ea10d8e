"""The fault kinds for what a native workload does, each against a real supervised child.

``HoldGil`` for a number of seconds, ``StderrFlood``, ``OversizePayload`` and
``HostileException``: each test checks that the fault does what it says, and
the outcome the contract promises (at most its own task fails). The hostile
exception still crashes the runner until error formatting is guarded (issue
11, finding 4): those tests are expected failures until then.
"""

from __future__ import annotations

import pickle
import threading
import time

import pytest
import trio

from trio_runner import (
    ExitReason,
    RestartLimitExceeded,
    RestartPolicy,
    RunnerCrashed,
    TaskFailed,
    open_supervisor,
)
from trio_runner.testing import (
    AfterEvent,
    BeforeEvent,
    Exit,
    Fault,
    FaultPlan,
    FaultyRunner,
    HoldGil,
    HostileException,
    InSetup,
    OversizePayload,
    StderrFlood,
)
from trio_runner.testing._faulty import _hold_gil, _Padded  # pyright: ignore[reportPrivateUsage]

from .runners import EchoRunner
from .test_property_support import TIMEOUTS

BOUND = 30
SERVE_ON = RestartPolicy(initial_delay=60.0)  # a restart would outlast BOUND


async def _run_plan(plan: FaultPlan, request: object, **options: object) -> tuple[object, object, object]:
    """(the outcome of ``request`` under ``plan``, the pid before, the pid after)."""
    with trio.fail_after(BOUND):
        async with open_supervisor(FaultyRunner, EchoRunner, plan, policy=SERVE_ON, **options) as sup:  # type: ignore[arg-type]
            before = await sup.run(("pid",))
            try:
                outcome: object = await sup.run(request)
            except TaskFailed as exc:
                outcome = exc
            after = await sup.run(("pid",))
    return outcome, before, after


# -- HoldGil for a while ------------------------------------------------------------------


def test_hold_gil_keeps_every_other_thread_of_the_process_waiting() -> None:
    gaps: list[float] = []
    done = threading.Event()

    def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=ticker)
    thread.start()
    time.sleep(0.05)
    began = time.perf_counter()
    _hold_gil(0.5)
    held = time.perf_counter() - began
    done.set()
    thread.join()
    # The ticker could not run for most of the hold: the GIL never left the C loop.
    assert max(gaps) > 0.3
    assert held < 10.0  # it ends; the calibration only needs to be roughly right


async def test_a_gil_held_for_less_than_the_heartbeat_timeout_delays_the_task_but_ends_nothing() -> None:
    plan = FaultPlan((Fault(HoldGil(0.3), BeforeEvent(task=2, event=1)),))
    result, before, after = await _run_plan(plan, ("count", 3))
    assert result == 3
    assert before == after


# -- StderrFlood --------------------------------------------------------------------------


async def test_a_stderr_flood_is_read_to_its_last_line() -> None:
    # A crash right after the flood puts its end in the crash report.
    plan = FaultPlan((Fault(StderrFlood(20_000), BeforeEvent()), Fault(Exit(3), BeforeEvent())))
    policy = RestartPolicy(mode="temporary")
    with trio.fail_after(BOUND), pytest.raises(RunnerCrashed) as info:
        async with open_supervisor(FaultyRunner, EchoRunner, plan, policy=policy) as sup:
            await sup.run(("count", 1))
    assert info.value.exit.exitcode == 3
    assert info.value.exit.stderr_tail[-1] == "flood line 19999"


async def test_a_task_that_floods_stderr_still_returns_its_result_on_the_same_runner() -> None:
    plan = FaultPlan((Fault(StderrFlood(50_000), BeforeEvent(task=2, event=0)),))
    result, before, after = await _run_plan(plan, ("count", 2))
    assert result == 2
    assert before == after


# -- OversizePayload ----------------------------------------------------------------------


def test_a_padded_payload_pickles_bigger_than_its_size_and_unpickles_to_the_same_value() -> None:
    data = pickle.dumps(_Padded({"a": 1}, 1_000_000), protocol=5)
    assert len(data) > 1_000_000
    assert pickle.loads(data) == {"a": 1}


@pytest.mark.parametrize("result", [False, True], ids=["event", "result"])
async def test_an_oversize_payload_under_the_frame_limit_arrives_unchanged(result: bool) -> None:
    plan = FaultPlan((Fault(OversizePayload(2 * 1024 * 1024, result=result), BeforeEvent(task=2, event=1)),))
    with trio.fail_after(BOUND):
        async with open_supervisor(FaultyRunner, EchoRunner, plan, policy=SERVE_ON) as sup:
            await sup.run(("pid",))
            async with sup.stream(("count", 3)) as task:
                events = [event async for event in task]
            assert (events, task.result) == ([0, 1, 2], 3)


@pytest.mark.parametrize("result", [False, True], ids=["event", "result"])
async def test_an_oversize_payload_over_the_frame_limit_fails_only_its_task(result: bool) -> None:
    plan = FaultPlan((Fault(OversizePayload(1024 * 1024, result=result), AfterEvent(task=2, event=0)),))
    outcome, before, after = await _run_plan(plan, ("count", 3), max_frame_size=256 * 1024)
    assert isinstance(outcome, TaskFailed), outcome
    assert "max_frame_size" in outcome.remote_message
    assert before == after


# -- HostileException ---------------------------------------------------------------------


async def test_a_hostile_exception_in_setup_is_a_startup_failure() -> None:
    plan = FaultPlan((Fault(HostileException(), InSetup(), incarnation=None),))
    policy = RestartPolicy(initial_delay=0, max_delay=0, max_restarts=0)
    with trio.fail_after(BOUND), pytest.raises(RestartLimitExceeded) as info:
        async with open_supervisor(FaultyRunner, EchoRunner, plan, policy=policy, timeouts=TIMEOUTS):
            await trio.sleep_forever()
    assert info.value.last_exit.reason is ExitReason.STARTUP_FAILED


@pytest.mark.parametrize(
    "kind",
    [HostileException("str_raises"), HostileException("huge_message", size=80 * 1024 * 1024)],
    ids=["str-raises", "huge-message"],
)
async def test_a_hostile_exception_in_handle_fails_only_its_task(kind: HostileException) -> None:
    plan = FaultPlan((Fault(kind, BeforeEvent(task=2, event=0)),))
    outcome, before, after = await _run_plan(plan, ("count", 1))
    assert isinstance(outcome, TaskFailed), outcome
    assert outcome.remote_type.endswith("HostileFault")
    assert len(outcome.remote_message) < 10 * 1024 * 1024  # truncated, with a note
    assert before == after
