"""What the supervisor reports about itself: its state, lifecycle changes and statistics."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._errors import ExitRecord


class RunnerState(enum.Enum):
    """The supervisor's state. See the state diagram in the docs."""

    STARTING = "starting"
    """A runner process is being spawned or is running ``setup``."""
    READY = "ready"
    """The runner serves tasks."""
    BACKING_OFF = "backing_off"
    """The runner exited; the supervisor waits out the backoff before restarting it."""
    STOPPING = "stopping"
    """A graceful shutdown is under way."""
    STOPPED = "stopped"
    """Shut down, or the policy chose not to restart. Calls raise ``RunnerUnavailable``."""
    FAILED = "failed"
    """The policy gave up, or the runner can never start. Calls raise ``RunnerUnavailable``."""


@dataclass(frozen=True)
class Spawned:
    """A runner process was started (in a group, one per rank)."""

    incarnation: int
    pid: int | None
    #: Its rank in a group (``ranks=N``); 0 for a lone runner.
    rank: int = 0


@dataclass(frozen=True)
class Ready:
    """The runner's ``setup`` returned; it serves tasks.

    A group reports one per rank, in rank order, once every rank is ready.
    """

    incarnation: int
    pid: int | None
    startup_seconds: float
    #: Its rank in a group (``ranks=N``); 0 for a lone runner.
    rank: int = 0


@dataclass(frozen=True)
class Exited:
    """An incarnation ended; ``exit.reason`` says why."""

    exit: ExitRecord


@dataclass(frozen=True)
class BackingOff:
    """The supervisor waits ``delay`` seconds before restart number ``restart``."""

    delay: float
    restart: int


@dataclass(frozen=True)
class GaveUp:
    """The restart policy gave up (or the runner can never start); the state is FAILED."""

    restarts: int
    exit: ExitRecord


@dataclass(frozen=True)
class Stopped:
    """The supervisor is done; no process of its is left. This is always the last change."""

    state: RunnerState
    exit: ExitRecord | None


LifecycleChange = Spawned | Ready | Exited | BackingOff | GaveUp | Stopped


@dataclass(frozen=True)
class SupervisorStatistics:
    """A snapshot of the supervisor, from :meth:`Supervisor.statistics`.

    Attributes:
        state: the current :class:`RunnerState`.
        pid: the current runner's pid, or None between incarnations.
        incarnation: how many processes have been spawned so far.
        restarts: restarts made in total.
        consecutive_failures: failures since the runner was last healthy.
        in_flight: tasks delivered to the runner and not yet finished.
        pending: tasks waiting to be delivered.
        uptime: seconds since the current runner became READY (0 if not ready).
        last_exit: how the previous incarnation ended, if any did.
        tasks_completed: tasks that ended, in any outcome.
        log_lines_dropped: lines of child output dropped because the log
            handlers fell more than 1 MiB of output behind.
        events_dropped: events of cancelled tasks dropped instead of delivered
            (cancel means stop), in the runner or in this process.
        pids: every rank's pid, in rank order (one for a lone runner; empty
            between incarnations). ``pid`` is the first of them.
        failed_rank: in a group, the rank that went first in the last exit
            (``last_exit.rank``); None for a lone runner or before any exit.
    """

    state: RunnerState
    pid: int | None
    incarnation: int
    restarts: int
    consecutive_failures: int
    in_flight: int
    pending: int
    uptime: float
    last_exit: ExitRecord | None
    tasks_completed: int
    log_lines_dropped: int = 0
    events_dropped: int = 0
    pids: tuple[int | None, ...] = ()
    failed_rank: int | None = None
