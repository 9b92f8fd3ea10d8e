"""Fault-inject your own runner: a test module to run with pytest.

    pytest docs/examples/fault_injection_test.py

It needs pytest-trio and Hypothesis; the ``no_descendants`` and ``loop_lateness``
fixtures come from trio-runner's pytest plugin.
"""

from __future__ import annotations

import pytest
from fault_injection_runner import WordRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_runner import (
    ExitReason,
    RestartLimitExceeded,
    RestartPolicy,
    RunnerCrashed,
    Timeouts,
    open_supervisor,
)
from trio_runner.testing import (
    BeforeEvent,
    CorruptFrame,
    Exit,
    Fault,
    FaultPlan,
    FaultyRunner,
    LatenessMonitor,
    RequestSequence,
    Signal,
    check_lifecycle,
    fault_plans,
    lifecycle,
    request_sequences,
    restart_policies,
    run_sequence,
)

# Short timeouts keep each example fast; a Hang or StallReader fault needs `stall`.
TIMEOUTS = Timeouts(startup=2.0, heartbeat=0.8, stall=0.6, graceful=0.3, terminate=0.3, kill=2.0)


# One fault, by hand: the runner is SIGKILLed just before the third word of its first task.
@pytest.mark.trio
async def test_sigkill_mid_stream_fails_that_task_and_the_runner_comes_back(
    no_descendants: None, loop_lateness: LatenessMonitor
) -> None:
    plan = FaultPlan((Fault(Signal("SIGKILL"), BeforeEvent(task=1, event=2)),))
    policy = RestartPolicy(initial_delay=0.01)
    async with open_supervisor(FaultyRunner, WordRunner, plan, policy=policy, timeouts=TIMEOUTS) as sup:
        with pytest.raises(RunnerCrashed) as crash:
            await sup.run("one two three four")
        assert crash.value.reason is ExitReason.SIGNALED
        assert await sup.run("the second incarnation has no fault") == 6
    check_lifecycle(await lifecycle(sup), policy=policy)


# Many faults, drawn by Hypothesis: every request must still end exactly once.
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plan=fault_plans(kinds=[Signal, Exit, CorruptFrame], max_faults=1),
    policy=restart_policies(),
    sequence=request_sequences(st.sampled_from(["", "a b", "c d e f"]), max_size=3),
)
@pytest.mark.trio
async def test_every_request_ends_exactly_once_whatever_the_faults(
    no_descendants: None, plan: FaultPlan, policy: RestartPolicy, sequence: RequestSequence
) -> None:
    try:
        async with open_supervisor(FaultyRunner, WordRunner, plan, policy=policy, timeouts=TIMEOUTS) as sup:
            ledger = await run_sequence(sup, sequence)
    except RestartLimitExceeded:
        return  # the policy gave up: a valid ending, and the body was cancelled
    except RunnerCrashed:
        # Exit() in setup can race the child's first message (a core bug being fixed).
        return
    ledger.check()  # exactly one outcome each, whatever it is
    for entry in ledger.entries:
        if entry.outcome == "result":
            assert entry.value == len(entry.request.split())
    check_lifecycle(await lifecycle(sup), policy=policy)
