"""Core bugs the fault-injection suite found, as shrunk regression tests.

A bug found by the property suite gets its shrunk example here, once fixed,
so it never comes back.
"""

from __future__ import annotations

import pytest
import trio

from trio_runner import RestartLimitExceeded, RestartPolicy, open_supervisor
from trio_runner.testing import Exit, Fault, FaultPlan, FaultyRunner, InSetup

from .runners import EchoRunner
from .test_property_support import TIMEOUTS


async def test_a_setup_that_exits_at_once_is_restarted_by_the_policy_not_failed_as_never_startable() -> None:
    # Shrunk by Hypothesis: FaultPlan((Fault(Exit(code=0), InSetup()),)) with max_restarts=0.
    # Five tries, so the race (the writer thread sending HELLO first) cannot hide it.
    policy = RestartPolicy(initial_delay=0, max_delay=0, max_restarts=1)
    for code in (0, 3, 0, 3, 0):
        plan = FaultPlan((Fault(Exit(code), InSetup(), incarnation=None),))
        with trio.fail_after(20), pytest.raises(RestartLimitExceeded) as info:
            async with open_supervisor(FaultyRunner, EchoRunner, plan, policy=policy, timeouts=TIMEOUTS):
                await trio.sleep_forever()
        assert info.value.restarts == 1
