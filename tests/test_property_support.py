"""Shared by the property and stateful suites: timeouts, budgets, and the per-example checks.

It holds no tests (the name only puts it under the property suite); the child never imports it.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Collection, Sequence

import psutil
from hypothesis import HealthCheck, Phase, settings

from trio_runner import ExitReason, RestartPolicy, Timeouts
from trio_runner.testing import (
    AfterEvent,
    BeforeEvent,
    FaultPlan,
    HoldGil,
    HostileException,
    InSetup,
    OversizePayload,
    Raise,
    SlowStartup,
    Submission,
)

# Short, but with slack a loaded CI machine will not exhaust: a false HUNG or
# STARTUP_FAILED fails the "no spurious exit" check, so these must only fire on
# an injected fault.
TIMEOUTS = Timeouts(startup=2.0, heartbeat=1.5, stall=1.2, graceful=0.3, terminate=0.3, kill=2.0)
LATENESS_BOUND = 0.5  # seconds; a blocking call on the trio thread shows up far above this
EXAMPLE_DEADLINE = 30.0  # one example; the slowest plan needs about 4 s


def examples(env: str, default: int) -> int:
    """The example budget: ``default`` in CI, more from the environment (``nox -s faults``)."""
    return int(os.environ.get(env, default))


def real_process_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        print_blob=True,
        # The explain phase re-runs a failure hundreds of times: minutes of real processes.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    )


def open_fds() -> int:
    gc.collect()
    return psutil.Process().num_fds()


def possible_exits(plan: FaultPlan, incarnation: int) -> frozenset[ExitReason]:
    """How incarnation ``incarnation`` may end under ``plan``."""
    reasons = {ExitReason.REQUESTED}
    for fault in plan.for_incarnation(incarnation):
        reasons |= fault.exit_reasons()
    return frozenset(reasons)


def any_crash(plan: FaultPlan) -> frozenset[ExitReason]:
    reasons: set[ExitReason] = set()
    for fault in plan.faults:
        reasons |= fault.exit_reasons()
    return frozenset(reasons)


def fails_tasks(plan: FaultPlan) -> bool:
    return oversize_payloads(plan) or any(
        isinstance(f.kind, Raise | HostileException) and isinstance(f.trigger, BeforeEvent | AfterEvent)
        for f in plan.faults
    )


def oversize_payloads(plan: FaultPlan) -> bool:
    """Whether a task may fail because its event or result is too big to send."""
    return any(isinstance(f.kind, OversizePayload) for f in plan.faults)


def allowed_outcomes(
    plan: FaultPlan, submission: Submission, *, shutdown_early: bool, policy: RestartPolicy
) -> Collection[str]:
    allowed = {"result"}
    if submission.cancel_after is not None:
        allowed.add("cancelled")
    if fails_tasks(plan):
        allowed.add("failed")
    if any_crash(plan):
        allowed |= {"crashed", "unavailable"}
    if shutdown_early:
        allowed.add("unavailable")
    return allowed


def is_prefixes(events: Sequence[object], n: int, *, complete: bool) -> bool:
    """``events`` is runs of 0, 1, 2 ... (one per attempt); the last is all of range(n) if complete."""
    runs: list[list[object]] = []
    for event in events:
        if event == 0 or not runs:
            runs.append([])
        runs[-1].append(event)
    if not all(run == list(range(len(run))) and len(run) <= n for run in runs):
        return False
    if complete:
        return (runs[-1] if runs else []) == list(range(n))
    return True


def setup_fault_must_fire(plan: FaultPlan) -> bool:
    return any(
        isinstance(f.trigger, InSetup)
        and not isinstance(f.kind, SlowStartup)  # fails only past Timeouts.startup
        and not (isinstance(f.kind, HoldGil) and f.kind.seconds is not None)  # likewise
        and f.applies_to(1)
        and f.exit_reasons()
        for f in plan.faults
    )
