"""Fault plans, request sequences and policies: valid-Python reprs, validation, a light child-side import."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import trio_runner
import trio_runner.testing
from trio_runner import ExitReason
from trio_runner.testing import (
    NATIVE_FAULT_KINDS,
    AfterEvent,
    BeforeEvent,
    Exit,
    Fault,
    FaultPlan,
    Hang,
    HoldGil,
    HostileException,
    InSetup,
    InTeardown,
    OnShutdown,
    OversizePayload,
    Raise,
    RequestSequence,
    Signal,
    SlowStartup,
    StderrFlood,
    Submission,
    exit_reasons,
    fault_kinds,
    fault_plans,
    request_sequences,
    restart_policies,
)

NAMESPACE = {**vars(trio_runner.testing), "RestartPolicy": trio_runner.RestartPolicy}


@given(plan=fault_plans(max_faults=4, incarnations=(1, 2, 3, None)))
def test_a_fault_plan_repr_is_python_that_rebuilds_it(plan: FaultPlan) -> None:
    assert eval(repr(plan), NAMESPACE) == plan


@given(
    sequence=request_sequences(st.tuples(st.just("count"), st.integers(0, 9))),
    policy=restart_policies(),
)
def test_request_sequence_and_policy_reprs_are_python_that_rebuild_them(
    sequence: object, policy: object
) -> None:
    assert eval(repr(sequence), NAMESPACE) == sequence
    assert eval(repr(policy), NAMESPACE) == policy


@pytest.mark.parametrize(
    "build",
    [
        lambda: Fault(SlowStartup(0.1), BeforeEvent()),
        lambda: Fault(Raise(), OnShutdown()),
        lambda: Signal("SIGSTOP"),
        lambda: Signal("SIGCHLD"),
        lambda: Signal("NOT_A_SIGNAL"),
        lambda: Exit(256),
        lambda: Exit(-1),
        lambda: BeforeEvent(task=0),
        lambda: AfterEvent(event=-1),
        lambda: Fault(Hang(), BeforeEvent(), incarnation=0),
        lambda: SlowStartup(-1),
        lambda: Submission("x", cancel_after=-1),
        lambda: HoldGil(-1),
        lambda: HoldGil(float("inf")),
        lambda: StderrFlood(-1),
        lambda: OversizePayload(-1),
        lambda: Fault(OversizePayload(), InSetup()),
        lambda: Fault(OversizePayload(), InTeardown()),
        lambda: Fault(HostileException(), OnShutdown()),
        lambda: HostileException("politely"),
        lambda: HostileException(size=-1),
    ],
)
def test_a_fault_that_cannot_fire_is_refused_with_value_error(build: object) -> None:
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("build", "argument"),
    [
        (lambda: BeforeEvent(task=1.0), "BeforeEvent.task"),
        (lambda: AfterEvent(event="0"), "AfterEvent.event"),
        (lambda: Signal(9), "Signal.name"),
        (lambda: Exit("1"), "Exit.code"),
        (lambda: HoldGil("1"), "HoldGil.seconds"),
        (lambda: SlowStartup(None), "SlowStartup.seconds"),
        (lambda: StderrFlood(1.5), "StderrFlood.lines"),
        (lambda: OversizePayload(result=1), "OversizePayload.result"),
        (lambda: HostileException(size="9"), "HostileException.size"),
        (lambda: Fault(Hang(), BeforeEvent(), incarnation=1.0), "Fault.incarnation"),
        (lambda: Submission("x", cancel_after=1.5), "Submission.cancel_after"),
        (lambda: Submission("x", retry="yes"), "Submission.retry"),
        (lambda: RequestSequence(concurrent=1), "RequestSequence.concurrent"),
        (lambda: RequestSequence(shutdown_after="2"), "RequestSequence.shutdown_after"),
    ],
)
def test_a_fault_or_sequence_field_of_the_wrong_type_raises_type_error_naming_it(
    build: object, argument: str
) -> None:
    with pytest.raises(TypeError, match=rf"^{re.escape(argument)}="):
        build()  # type: ignore[operator]


@pytest.mark.parametrize(
    "kind",
    [
        HoldGil(),
        HoldGil(0.25),
        StderrFlood(300_000),
        OversizePayload(8 * 1024 * 1024, result=True),
        HostileException("huge_message", size=1024),
        HostileException("str_raises"),
    ],
)
def test_each_native_fault_kind_has_a_repr_that_rebuilds_it(kind: object) -> None:
    fault = Fault(kind, BeforeEvent(task=2, event=1), incarnation=None)  # type: ignore[arg-type]
    assert eval(repr(fault), NAMESPACE) == fault


def test_native_faults_fail_at_most_their_task_while_serving_and_setup_while_starting() -> None:
    serving = BeforeEvent()
    for kind in (OversizePayload(), HostileException()):
        assert exit_reasons(kind, serving) == frozenset(), kind
    # A flood emits nothing: one that outlasts Timeouts.stall is a stalled task.
    assert exit_reasons(StderrFlood(), serving) == {ExitReason.HUNG}
    assert exit_reasons(StderrFlood(), InSetup()) == frozenset()
    assert exit_reasons(HostileException(), InSetup()) == {ExitReason.STARTUP_FAILED}
    # A hold may outlast the heartbeat timeout; the table cannot know the timeouts.
    assert exit_reasons(HoldGil(0.1), serving) == {ExitReason.HUNG}


@given(kind=fault_kinds(native_faults=False))
def test_without_native_faults_the_strategy_draws_only_the_older_kinds(kind: object) -> None:
    assert not isinstance(kind, NATIVE_FAULT_KINDS)
    assert not (isinstance(kind, HoldGil) and kind.seconds is not None)


def test_a_plan_only_takes_faults() -> None:
    with pytest.raises(TypeError):
        FaultPlan([Fault(Hang(), BeforeEvent())])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Fault("hang", BeforeEvent())  # type: ignore[arg-type]


def test_a_fault_applies_to_its_incarnation_or_to_all() -> None:
    once, every = (
        Fault(Exit(3), BeforeEvent(), incarnation=2),
        Fault(Exit(3), BeforeEvent(), incarnation=None),
    )
    plan = FaultPlan((once, every))
    assert plan.for_incarnation(1) == (every,)
    assert plan.for_incarnation(2) == (once, every)


def test_the_child_side_of_the_toolkit_imports_neither_trio_nor_hypothesis() -> None:
    code = (
        "import sys, trio_runner.testing as t; t.FaultyRunner; t.FaultPlan; "
        "bad = [m for m in ('trio', 'hypothesis', 'psutil') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parent_side_names_load_on_first_use() -> None:
    assert callable(trio_runner.testing.monitor_lateness)
    assert callable(trio_runner.testing.fault_plans)
    with pytest.raises(AttributeError):
        trio_runner.testing.no_such_name  # noqa: B018
