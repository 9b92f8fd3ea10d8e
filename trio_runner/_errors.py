"""The error tree and the exit record that crash errors carry.

No trio here: the child raises :class:`TaskCancelled` inside ``handle()``.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, field


class ExitReason(enum.Enum):
    """Why an incarnation of the runner ended."""

    REQUESTED = "requested"
    """Shutdown was asked for. ``ExitRecord.stopped_by`` says whether the runner
    exited by itself within grace (SHUTDOWN) or had to be signalled (SIGTERM, SIGKILL)."""
    CLEAN_EXIT = "clean_exit"
    """Exit code 0 that nobody asked for."""
    ERROR_EXIT = "error_exit"
    """A nonzero exit code, with the remote traceback if the runner raised."""
    SIGNALED = "signaled"
    """Killed by a signal that the supervisor did not send."""
    STARTUP_FAILED = "startup_failed"
    """``setup`` raised, the runner could not be loaded, or the startup timeout passed."""
    HUNG = "hung"
    """Heartbeat, stall or cancel-send timeout: the supervisor killed it."""
    PROTOCOL_ERROR = "protocol_error"
    """A corrupt or oversize frame: the supervisor killed it."""


class StoppedBy(enum.Enum):
    """What finally made the process exit."""

    SELF = "self"
    SHUTDOWN = "shutdown"
    SIGTERM = "sigterm"
    SIGKILL = "sigkill"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class ExitRecord:
    """How one incarnation ended.

    Attributes:
        reason: the classification, see :class:`ExitReason`.
        exitcode: the exit code, or None if a signal killed the process
            (or it could not be reaped, see ``reaped``).
        signal: the signal number that killed it, or None.
        stopped_by: whether the process went by itself, after Shutdown,
            after SIGTERM or after SIGKILL.
        pid: the process id of that incarnation.
        incarnation: 1 for the first spawn, then counting up.
        detail: one sentence on what happened, including hints for fixing it.
        stderr_tail: the last lines the child wrote to stderr. For a group that
            could not start, every rank's, each line marked ``[rank N]``.
        remote_traceback: the traceback the child sent before dying, if any.
        reaped: False if the process could not be reaped within the kill timeout.
        rank: in a group (``ranks=N``), the rank whose exit this is: for the
            group's record, the rank that went first. None for a lone runner.
    """

    reason: ExitReason
    exitcode: int | None = None
    signal: int | None = None
    stopped_by: StoppedBy = StoppedBy.SELF
    pid: int | None = None
    incarnation: int = 0
    detail: str = ""
    stderr_tail: tuple[str, ...] = field(default=(), repr=False)
    remote_traceback: str | None = field(default=None, repr=False)
    reaped: bool = True
    rank: int | None = None

    @property
    def signal_name(self) -> str | None:
        return None if self.signal is None else signal_name(self.signal)

    def describe(self) -> str:
        """A short human description, e.g. ``signaled (SIGKILL)`` or ``error_exit (code 3)``."""
        if self.signal is not None:
            how = self.signal_name
        elif self.exitcode is not None:
            how = f"code {self.exitcode}"
        else:
            how = "not reaped" if not self.reaped else "no exit status"
        text = f"{self.reason.value} ({how})"
        if self.rank is not None:
            text = f"rank {self.rank} {text}"
        if self.detail:
            text += f": {self.detail}"
        return text


class TrioRunnerError(Exception):
    """Base class of every error this library raises on purpose."""


class TaskError(TrioRunnerError):
    """A task did not produce a result."""

    task_id: int | None = None


class TaskFailed(TaskError):
    """The runner's ``handle()`` raised. The remote traceback is kept.

    Attributes:
        remote_type: the qualified name of the exception type raised in the child.
        remote_message: ``str()`` of that exception.
        remote_traceback: the formatted traceback from the child.
    """

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str) -> None:
        super().__init__(f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.remote_type, self.remote_message, self.remote_traceback), self.__dict__)

    def __str__(self) -> str:
        return f"{self.remote_type}: {self.remote_message}\n\nRemote traceback:\n{self.remote_traceback}"


class TaskCancelled(TaskError):
    """The task was cancelled. Inside ``handle()``, raised by ``raise_if_cancelled()``."""


class RunnerCrashed(TaskError):
    """The runner process died while the task ran (its ``handle()`` had started), or could not start.

    Attributes:
        exit: the :class:`ExitRecord` of the incarnation that died.
    """

    def __init__(self, exit: ExitRecord) -> None:
        super().__init__(exit.describe())
        self.exit = exit

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.exit,), self.__dict__)

    @property
    def reason(self) -> ExitReason:
        return self.exit.reason

    @property
    def remote_traceback(self) -> str | None:
        return self.exit.remote_traceback

    def __str__(self) -> str:
        parts = [f"runner {self.exit.describe()}"]
        if self.exit.remote_traceback:
            parts.append(f"Remote traceback:\n{self.exit.remote_traceback.rstrip()}")
        if self.exit.stderr_tail:
            parts.append("Last lines of stderr:\n" + "\n".join(self.exit.stderr_tail))
        return "\n\n".join(parts)


class RunnerUnavailable(TrioRunnerError):
    """The supervisor is stopping, stopped, or has given up."""


class RestartLimitExceeded(TrioRunnerError):
    """The restart policy gave up after too many failures in a row.

    Attributes:
        restarts: how many restarts were made in a row before giving up.
        last_exit: the exit record of the failure that ended it.
    """

    def __init__(self, restarts: int, last_exit: ExitRecord) -> None:
        super().__init__(
            f"the runner failed {restarts + 1} times in a row; giving up after {restarts} "
            f"restarts (last exit: {last_exit.describe()})"
        )
        self.restarts = restarts
        self.last_exit = last_exit

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.restarts, self.last_exit), self.__dict__)
