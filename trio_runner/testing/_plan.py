"""Fault plans: which fault fires where, as plain frozen data with reprs that are valid Python.

The child imports this module (a plan travels to it pickled, as an argument of
:class:`~trio_runner.testing.FaultyRunner`), so it imports neither trio nor
Hypothesis. Every class is a frozen dataclass whose ``repr`` evaluates back to
an equal object once ``from trio_runner.testing import *`` has run, so a
Hypothesis failure prints a plan you can paste into a regression test.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass

from .._errors import ExitReason

# -- triggers: where in the runner's life a fault fires ---------------------------------------


@dataclass(frozen=True)
class InSetup:
    """Fires in ``setup()``, before the wrapped runner's own ``setup``."""


@dataclass(frozen=True)
class BeforeEvent:
    """Fires in the ``task``-th task (1-based, counted per incarnation) just before its
    ``event``-th ``ctx.emit`` (0-based). A task that emits fewer events never fires it."""

    task: int = 1
    event: int = 0

    def __post_init__(self) -> None:
        _check_position(self)


@dataclass(frozen=True)
class AfterEvent:
    """Fires in the ``task``-th task just after its ``event``-th event has been written to
    the parent, so the parent is sure to see that event before the fault."""

    task: int = 1
    event: int = 0

    def __post_init__(self) -> None:
        _check_position(self)


@dataclass(frozen=True)
class InTeardown:
    """Fires in ``teardown()`` (reached only on a graceful shutdown), before the wrapped
    runner's own ``teardown``."""


@dataclass(frozen=True)
class OnShutdown:
    """Fires in the child's reader thread the moment the Shutdown message arrives,
    before the child acts on it, even while a task is running."""


Trigger = InSetup | BeforeEvent | AfterEvent | InTeardown | OnShutdown


def _check_position(trigger: BeforeEvent | AfterEvent) -> None:
    name = type(trigger).__name__
    if isinstance(trigger.task, bool) or not isinstance(trigger.task, int) or trigger.task < 1:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(f"{name}(task={trigger.task!r}) counts tasks from 1: pass an int >= 1")
    if isinstance(trigger.event, bool) or not isinstance(trigger.event, int) or trigger.event < 0:  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(f"{name}(event={trigger.event!r}) counts events from 0: pass an int >= 0")


# -- kinds: what the fault does ---------------------------------------------------------------

# Signals whose default action stops or ignores rather than terminates: not a crash.
_NOT_FATAL = frozenset(
    {"SIGSTOP", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGCONT", "SIGCHLD", "SIGURG", "SIGWINCH"}
)


def fatal_signals() -> tuple[str, ...]:
    """The names of the signals :class:`Signal` accepts on this platform: those that kill."""
    return tuple(sorted(s.name for s in signal.Signals if s.name not in _NOT_FATAL and s.name.isupper()))


@dataclass(frozen=True)
class Signal:
    """The runner kills itself with the signal ``name`` (e.g. ``"SIGSEGV"``), with its
    default action restored first (the child ignores SIGINT, Python ignores SIGPIPE) and
    core dumps off."""

    name: str = "SIGKILL"

    def __post_init__(self) -> None:
        if self.name not in fatal_signals():
            raise ValueError(
                f"Signal({self.name!r}) is not a signal that kills on this platform; pass one of "
                f"{', '.join(fatal_signals())} (for SIGSTOP use Stop())"
            )


@dataclass(frozen=True)
class Exit:
    """The runner calls ``os._exit(code)``: no cleanup, no traceback."""

    code: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.code, bool) or not isinstance(self.code, int) or not 0 <= self.code <= 255:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"Exit(code={self.code!r}) must be an int in [0, 255]")


@dataclass(frozen=True)
class Raise:
    """Raises :class:`InjectedFault` with ``message``: in ``handle`` that fails the task,
    in ``setup`` it is a startup failure, in ``teardown`` an error after a requested stop."""

    message: str = "injected fault"


@dataclass(frozen=True)
class Hang:
    """The runner ignores SIGTERM and blocks for ever (heartbeats go on): only a stall
    timeout, the startup timeout or SIGKILL ends it."""


@dataclass(frozen=True)
class HoldGil:
    """A busy loop in C that keeps the GIL for ``seconds`` (None: for ever), as a native
    call that never releases it does: every other thread of the child, heartbeat writer
    and reader included, freezes meanwhile. Then the runner goes on."""

    seconds: float | None = None

    def __post_init__(self) -> None:
        seconds = self.seconds
        if seconds is not None and (
            isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < math.inf  # pyright: ignore[reportUnnecessaryIsInstance]
        ):
            raise ValueError(f"HoldGil(seconds={self.seconds!r}) must be a finite number >= 0, or None")


@dataclass(frozen=True)
class Stop:
    """The runner sends itself SIGSTOP."""


@dataclass(frozen=True)
class StopHeartbeats:
    """Heartbeats stop and the runner goes quiet (the firing thread blocks for ever)."""


@dataclass(frozen=True)
class StallReader:
    """The child's reader thread stops reading: no cancel, credit, task or Shutdown
    reaches the runner any more. The runner itself goes on."""


@dataclass(frozen=True)
class CorruptFrame:
    """The runner writes a frame whose payload does not unpickle, then goes on."""


@dataclass(frozen=True)
class OversizeFrame:
    """The runner writes a frame header announcing 4 GiB, then goes on."""


@dataclass(frozen=True)
class SlowStartup:
    """``setup`` sleeps ``seconds`` first. Only with the :class:`InSetup` trigger."""

    seconds: float = 1.0

    def __post_init__(self) -> None:
        seconds: object = self.seconds
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"SlowStartup(seconds={self.seconds!r}) must be a number >= 0")


@dataclass(frozen=True)
class StderrFlood:
    """The runner writes ``lines`` short lines to stderr as fast as it can, then goes on."""

    lines: int = 100_000

    def __post_init__(self) -> None:
        if isinstance(self.lines, bool) or not isinstance(self.lines, int) or self.lines < 0:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"StderrFlood(lines={self.lines!r}) must be an int >= 0")


@dataclass(frozen=True)
class OversizePayload:
    """The task's next event (or, with ``result=True``, its result) travels padded to more
    than ``size`` bytes; the parent unpickles the very same value. Above the supervisor's
    ``max_frame_size`` it cannot be sent, and the task fails with ``TaskFailed``. Only with
    the :class:`BeforeEvent` and :class:`AfterEvent` triggers."""

    size: int = 2 * 1024 * 1024
    result: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"OversizePayload(size={self.size!r}) must be an int >= 0 (bytes)")
        if not isinstance(self.result, bool):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"OversizePayload(result={self.result!r}) must be a bool")


@dataclass(frozen=True)
class HostileException:
    """Raises a :class:`HostileFault` that is hard to report: ``how="str_raises"``, its
    ``__str__`` raises; ``how="huge_message"``, its message is ``size`` characters long
    (make it larger than ``max_frame_size``). Like :class:`Raise`, it should fail only
    its task."""

    how: str = "str_raises"
    size: int = 80 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.how not in HOSTILE_WAYS:
            raise ValueError(f"HostileException(how={self.how!r}) must be one of {', '.join(HOSTILE_WAYS)}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"HostileException(size={self.size!r}) must be an int >= 0 (characters)")


HOSTILE_WAYS = ("str_raises", "huge_message")


@dataclass(frozen=True)
class SpawnGrandchild:
    """The runner starts a grandchild process that sleeps for an hour, then goes on.
    The supervisor must take it down with the runner's process group."""


FaultKind = (
    Signal
    | Exit
    | Raise
    | Hang
    | HoldGil
    | Stop
    | StopHeartbeats
    | StallReader
    | CorruptFrame
    | OversizeFrame
    | SlowStartup
    | SpawnGrandchild
    | StderrFlood
    | OversizePayload
    | HostileException
)

FAULT_KINDS: tuple[type[FaultKind], ...] = (
    Signal,
    Exit,
    Raise,
    Hang,
    HoldGil,
    Stop,
    StopHeartbeats,
    StallReader,
    CorruptFrame,
    OversizeFrame,
    SlowStartup,
    SpawnGrandchild,
    StderrFlood,
    OversizePayload,
    HostileException,
)
#: Kinds for the faults a native workload produces (December 2026), beside ``HoldGil``
#: with a number of ``seconds``: an stderr flood, an oversize payload, a hostile
#: exception. The strategies draw them unless told ``native_faults=False``.
NATIVE_FAULT_KINDS: tuple[type[FaultKind], ...] = (StderrFlood, OversizePayload, HostileException)
TRIGGERS: tuple[type[Trigger], ...] = (InSetup, BeforeEvent, AfterEvent, InTeardown, OnShutdown)


class InjectedFault(Exception):
    """The exception a :class:`Raise` fault raises."""


class HostileFault(InjectedFault):
    """The exception a :class:`HostileException` fault raises: hard to turn into text."""

    def __init__(self, message: str, str_raises: bool) -> None:
        super().__init__(message)
        self.str_raises = str_raises

    def __str__(self) -> str:
        if self.str_raises:
            raise RuntimeError("HostileFault.__str__ raises on purpose")
        return super().__str__()

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.args[0] if self.args else "", self.str_raises))


def fault_not_allowed(kind: FaultKind, trigger: Trigger) -> str | None:
    """Why ``kind`` cannot fire at ``trigger``, or None if it can."""
    if isinstance(kind, SlowStartup) and not isinstance(trigger, InSetup):
        return "SlowStartup only fires InSetup()"
    if isinstance(kind, Raise | HostileException) and isinstance(trigger, OnShutdown):
        return (
            f"{type(kind).__name__} cannot fire OnShutdown(): it would only kill the child's reader thread; "
            "use InTeardown()"
        )
    if isinstance(kind, OversizePayload) and not isinstance(trigger, BeforeEvent | AfterEvent):
        return "OversizePayload pads a task's event or result: it fires only BeforeEvent() or AfterEvent()"
    return None


@dataclass(frozen=True)
class Fault:
    """One fault: what happens (``kind``), where (``trigger``), and in which incarnation.

    Args:
        kind: what the fault does, e.g. ``Signal("SIGSEGV")`` or ``Exit(3)``.
        trigger: where it fires, e.g. ``BeforeEvent(task=2, event=0)``.
        incarnation: the incarnation (1 = the first process, 2 = the first restart ...)
            in which the fault fires, or None for every incarnation.
        rank: in a group (``ranks=N``), the rank in which the fault fires, or None
            for every rank. A lone runner is rank 0.
    """

    kind: FaultKind
    trigger: Trigger
    incarnation: int | None = 1
    rank: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, FAULT_KINDS):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(
                f"Fault(kind={self.kind!r}) must be one of {', '.join(k.__name__ for k in FAULT_KINDS)}"
            )
        if not isinstance(self.trigger, TRIGGERS):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(
                f"Fault(trigger={self.trigger!r}) must be one of {', '.join(t.__name__ for t in TRIGGERS)}"
            )
        why = fault_not_allowed(self.kind, self.trigger)
        if why is not None:
            raise ValueError(f"{self!r} cannot fire: {why}")
        inc = self.incarnation
        if inc is not None and (isinstance(inc, bool) or not isinstance(inc, int) or inc < 1):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"Fault(incarnation={inc!r}) counts from 1; pass None for every incarnation")
        rank = self.rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"Fault(rank={rank!r}) counts from 0; pass None for every rank")

    def applies_to(self, incarnation: int) -> bool:
        return self.incarnation is None or self.incarnation == incarnation

    def applies_to_rank(self, rank: int) -> bool:
        return self.rank is None or self.rank == rank

    def exit_reasons(self) -> frozenset[ExitReason]:
        """How an incarnation this fault fires in may end (besides REQUESTED, always possible)."""
        return exit_reasons(self.kind, self.trigger)


@dataclass(frozen=True)
class FaultPlan:
    """The faults to inject, in order. Pass it to :class:`FaultyRunner`.

    Several faults with the same trigger fire in the order given; a fault that
    ends the process stops those after it.
    """

    faults: tuple[Fault, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.faults, tuple) or not all(isinstance(f, Fault) for f in self.faults):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError("FaultPlan(faults=...) takes a tuple of Fault")

    def for_incarnation(self, incarnation: int) -> tuple[Fault, ...]:
        return tuple(f for f in self.faults if f.applies_to(incarnation))


_FATAL_WHILE_SERVING: dict[type[FaultKind], frozenset[ExitReason]] = {
    Signal: frozenset({ExitReason.SIGNALED}),
    Exit: frozenset({ExitReason.ERROR_EXIT, ExitReason.CLEAN_EXIT}),
    Raise: frozenset(),
    Hang: frozenset({ExitReason.HUNG}),
    HoldGil: frozenset({ExitReason.HUNG}),
    Stop: frozenset({ExitReason.HUNG}),
    StopHeartbeats: frozenset({ExitReason.HUNG}),
    StallReader: frozenset({ExitReason.HUNG}),
    CorruptFrame: frozenset({ExitReason.PROTOCOL_ERROR}),
    OversizeFrame: frozenset({ExitReason.PROTOCOL_ERROR}),
    SlowStartup: frozenset(),
    SpawnGrandchild: frozenset(),
    # The contract (issue 11): each fails at most its own task, never the runner. A flood
    # is no progress, though: one that outlasts Timeouts.stall is a stalled task.
    StderrFlood: frozenset({ExitReason.HUNG}),
    OversizePayload: frozenset(),
    HostileException: frozenset(),
}


def exit_reasons(kind: FaultKind, trigger: Trigger) -> frozenset[ExitReason]:
    """How an incarnation in which ``kind`` fires at ``trigger`` may end, besides REQUESTED.

    Assumes a finite ``Timeouts.stall`` (a :class:`Hang` or :class:`StallReader` in a
    task is only detected by it) and a startup timeout shorter than any
    :class:`SlowStartup` you expect to fail. A :class:`HoldGil` for a number of seconds
    is given the exits of one held for ever: it ends the incarnation only if it outlasts
    the heartbeat (or startup) timeout, which this table cannot know; likewise a
    :class:`StderrFlood` in a task, which emits nothing, and so is HUNG if writing it
    outlasts a finite ``Timeouts.stall``.
    """
    if isinstance(trigger, InTeardown | OnShutdown):
        return frozenset()  # a stop was requested: any exit is REQUESTED
    if isinstance(trigger, InSetup):
        if isinstance(kind, SpawnGrandchild | StderrFlood):
            return frozenset()
        if isinstance(kind, StallReader):
            return frozenset({ExitReason.HUNG})  # READY, but tasks are never read
        if isinstance(kind, CorruptFrame | OversizeFrame):
            return frozenset({ExitReason.PROTOCOL_ERROR})
        if isinstance(kind, HoldGil | Stop | StopHeartbeats):
            # Frozen before or after the parent saw a first frame.
            return frozenset({ExitReason.HUNG, ExitReason.STARTUP_FAILED})
        return frozenset({ExitReason.STARTUP_FAILED})
    return _FATAL_WHILE_SERVING[type(kind)]
