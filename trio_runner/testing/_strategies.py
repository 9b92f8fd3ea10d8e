"""Hypothesis strategies for fault plans, request sequences and restart policies.

Parent side only: imports Hypothesis. Every value drawn has a repr that is valid
Python, so a failing example prints a program you can paste into a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from .._policy import Mode, RestartPolicy
from ._plan import (
    FAULT_KINDS,
    HOSTILE_WAYS,
    NATIVE_FAULT_KINDS,
    TRIGGERS,
    AfterEvent,
    BeforeEvent,
    CorruptFrame,
    Exit,
    Fault,
    FaultKind,
    FaultPlan,
    Hang,
    HoldGil,
    HostileException,
    InSetup,
    InTeardown,
    OnShutdown,
    OversizeFrame,
    OversizePayload,
    Raise,
    Signal,
    SlowStartup,
    SpawnGrandchild,
    StallReader,
    StderrFlood,
    Stop,
    StopHeartbeats,
    Trigger,
    fatal_signals,
    fault_not_allowed,
)
from ._sequence import RequestSequence, Submission

#: The sizes an :class:`OversizePayload` or a huge :class:`HostileException` message is
#: drawn from: above the 1 MiB at which payloads leave the trio thread, and above the
#: default ``max_frame_size`` (64 MiB).
_BIG_SIZES = (2 * 1024 * 1024, 80 * 1024 * 1024)


def fault_kinds(
    kinds: Sequence[type[FaultKind]] = FAULT_KINDS,
    *,
    max_slow_startup: float = 0.2,
    native_faults: bool = True,
    max_gil_hold: float = 0.5,
    max_flood_lines: int = 300_000,
) -> st.SearchStrategy[FaultKind]:
    """Fault kinds, from the classes in ``kinds``.

    Args:
        kinds: which kinds to draw (default: all of them).
        max_slow_startup: the longest :class:`SlowStartup` drawn, in seconds.
        native_faults: also draw the faults a native workload produces
            (:data:`NATIVE_FAULT_KINDS`, and :class:`HoldGil` for a number of
            seconds besides for ever); False keeps to the kinds a plan could
            hold before them.
        max_gil_hold: the longest :class:`HoldGil` drawn with ``seconds``.
        max_flood_lines: the most lines a :class:`StderrFlood` drawn writes.
    """
    hold_gil = st.just(HoldGil())
    if native_faults:
        hold_gil |= st.builds(HoldGil, st.floats(0.0, max_gil_hold))
    else:
        kinds = [kind for kind in kinds if kind not in NATIVE_FAULT_KINDS]
    options: dict[type[FaultKind], st.SearchStrategy[Any]] = {
        Signal: st.builds(Signal, st.sampled_from(fatal_signals())),
        Exit: st.builds(Exit, st.integers(0, 255)),
        Raise: st.builds(Raise, st.text(max_size=20)),
        Hang: st.just(Hang()),
        HoldGil: hold_gil,
        Stop: st.just(Stop()),
        StopHeartbeats: st.just(StopHeartbeats()),
        StallReader: st.just(StallReader()),
        CorruptFrame: st.just(CorruptFrame()),
        OversizeFrame: st.just(OversizeFrame()),
        SlowStartup: st.builds(SlowStartup, st.floats(0, max_slow_startup)),
        SpawnGrandchild: st.just(SpawnGrandchild()),
        StderrFlood: st.builds(StderrFlood, st.integers(0, max_flood_lines)),
        OversizePayload: st.builds(OversizePayload, st.sampled_from(_BIG_SIZES), st.booleans()),
        HostileException: st.builds(
            HostileException, st.sampled_from(HOSTILE_WAYS), st.sampled_from(_BIG_SIZES)
        ),
    }
    unknown = [kind for kind in kinds if kind not in options]
    if unknown or not kinds:
        raise ValueError(
            f"kinds={kinds!r} must be a non-empty sequence of fault kinds from trio_runner.testing"
        )
    return st.one_of([options[kind] for kind in kinds])


def triggers(
    kinds: Sequence[type[Trigger]] = TRIGGERS, *, max_task: int = 3, max_event: int = 3
) -> st.SearchStrategy[Trigger]:
    """Fault triggers: task numbers up to ``max_task``, event indexes up to ``max_event``."""
    options: dict[type[Trigger], st.SearchStrategy[Any]] = {
        InSetup: st.just(InSetup()),
        BeforeEvent: st.builds(BeforeEvent, task=st.integers(1, max_task), event=st.integers(0, max_event)),
        AfterEvent: st.builds(AfterEvent, task=st.integers(1, max_task), event=st.integers(0, max_event)),
        InTeardown: st.just(InTeardown()),
        OnShutdown: st.just(OnShutdown()),
    }
    if not kinds or any(kind not in options for kind in kinds):
        raise ValueError(f"kinds={kinds!r} must be a non-empty sequence of triggers from trio_runner.testing")
    return st.one_of([options[kind] for kind in kinds])


def faults(
    *,
    kinds: Sequence[type[FaultKind]] = FAULT_KINDS,
    trigger_kinds: Sequence[type[Trigger]] = TRIGGERS,
    incarnations: Sequence[int | None] = (1,),
    max_task: int = 3,
    max_event: int = 3,
    max_slow_startup: float = 0.2,
    native_faults: bool = True,
    ranks: Sequence[int | None] = (None,),
) -> st.SearchStrategy[Fault]:
    """Single faults: a kind, a trigger it can fire at, an incarnation from ``incarnations``
    and a rank from ``ranks`` (for a group; None, the default, is every rank).

    ``native_faults``: see :func:`fault_kinds`.
    """

    @st.composite
    def build(draw: st.DrawFn) -> Fault:
        kind = draw(fault_kinds(kinds, max_slow_startup=max_slow_startup, native_faults=native_faults))
        usable = [t for t in trigger_kinds if fault_not_allowed(kind, _example(t)) is None]
        if not usable:
            from hypothesis import reject

            reject()
        trigger = draw(triggers(usable, max_task=max_task, max_event=max_event))
        incarnation = draw(st.sampled_from(list(incarnations)))
        return Fault(kind, trigger, incarnation, draw(st.sampled_from(list(ranks))))

    return build()


def _example(trigger: type[Trigger]) -> Trigger:
    return trigger()


def fault_plans(
    *,
    max_faults: int = 2,
    kinds: Sequence[type[FaultKind]] = FAULT_KINDS,
    trigger_kinds: Sequence[type[Trigger]] = TRIGGERS,
    incarnations: Sequence[int | None] = (1, 2),
    max_task: int = 3,
    max_event: int = 3,
    max_slow_startup: float = 0.2,
    native_faults: bool = True,
    ranks: Sequence[int | None] = (None,),
) -> st.SearchStrategy[FaultPlan]:
    """Fault plans of 0 to ``max_faults`` faults; see :func:`faults` for the rest.

    An empty plan (no fault at all) is drawn too, and shrinks first: the runner
    must then behave perfectly.
    """
    return st.builds(
        FaultPlan,
        st.lists(
            faults(
                kinds=kinds,
                trigger_kinds=trigger_kinds,
                incarnations=incarnations,
                max_task=max_task,
                max_event=max_event,
                max_slow_startup=max_slow_startup,
                native_faults=native_faults,
                ranks=ranks,
            ),
            max_size=max_faults,
        ).map(tuple),
    )


def restart_policies(
    *,
    modes: Sequence[Mode] = ("permanent", "transient", "temporary"),
    max_initial_delay: float = 0.02,
    max_delay: float = 0.05,
    max_restarts: int = 3,
    reset_after: float = 60.0,
) -> st.SearchStrategy[RestartPolicy]:
    """Restart policies with short delays, fit for tests against real processes.

    The defaults keep each backoff under 50 ms and ``reset_after`` long, so the
    failure count is never reset by accident in a short test.
    """
    return st.builds(
        RestartPolicy,
        mode=st.sampled_from(list(modes)),
        initial_delay=st.sampled_from(sorted({0.0, max_initial_delay})),
        factor=st.sampled_from([1.0, 2.0]),
        max_delay=st.just(max(max_delay, max_initial_delay)),
        max_restarts=st.integers(0, max_restarts),
        reset_after=st.just(reset_after),
    )


def request_sequences(
    requests: st.SearchStrategy[Any],
    *,
    min_size: int = 0,
    max_size: int = 6,
    max_cancel_after: int = 4,
    cancels: bool = True,
    retries: bool = True,
    concurrent: bool | None = None,
    shutdowns: bool = True,
) -> st.SearchStrategy[RequestSequence]:
    """Request sequences: requests from ``requests``, with cancel and shutdown points.

    Args:
        requests: the strategy for one request to your runner.
        min_size: the fewest submissions.
        max_size: the most submissions.
        max_cancel_after: the latest cancel point drawn, in events received.
        cancels: draw cancel points (else none).
        retries: draw ``retry=True`` submissions (else none).
        concurrent: submit concurrently (True), one after another (False), or
            draw which (None).
        shutdowns: draw early shutdown points (else wait for every task).
    """
    submission = st.builds(
        Submission,
        requests,
        cancel_after=st.none() | st.integers(0, max_cancel_after) if cancels else st.none(),
        retry=st.booleans() if retries else st.just(False),
    )
    return st.builds(
        RequestSequence,
        st.lists(submission, min_size=min_size, max_size=max_size).map(tuple),
        concurrent=st.booleans() if concurrent is None else st.just(concurrent),
        shutdown_after=st.none() | st.integers(0, max_size) if shutdowns else st.none(),
    )
