"""Exit classification: what the supervisor knew of an incarnation, and how it ended, into an ExitRecord.

Pure and synchronous, with no trio import: :func:`classify_exit` takes the
facts the supervisor gathered while the incarnation ran (:class:`ExitFacts`)
and the operating system's word on the process (:class:`ExitStatus`), and
:func:`never_restarts` says whether the exit is one no restart can fix. The
tests check both as a table, without a process.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import TypeAlias

from . import _protocol as proto
from ._errors import ExitReason, ExitRecord, StoppedBy

#: What the child's FATAL message said: (stage, remote type, message, traceback).
Fatal: TypeAlias = tuple[str, str, str, str]


@dataclass(frozen=True)
class ExitStatus:
    """What the operating system said about a finished process."""

    exitcode: int | None
    signal: int | None
    reaped: bool = True


#: The status of a process whose death was never seen (the wait was abandoned).
UNKNOWN_STATUS = ExitStatus(exitcode=None, signal=None, reaped=False)


@dataclass(frozen=True, kw_only=True)
class ExitFacts:
    """What the supervisor knew of one incarnation when it ended.

    Attributes:
        incarnation: its number, 1 for the first spawn.
        pid: its process id (None if it never started).
        stop_requested: the supervisor asked it to stop.
        kill_reason: why the supervisor killed it, if it did (a timeout, a protocol error).
        kill_detail: the sentence that goes with ``kill_reason``.
        ready: ``setup`` finished (READY arrived).
        hello: the child loaded the runner class (HELLO arrived).
        fatal: the child's FATAL message, if one arrived.
        stopped_by: what finally made the process exit.
        stderr_tail: the last lines the child wrote to stderr.
        kill_timeout: ``Timeouts.kill``, named when the process could not be reaped.
        rank: its rank in a group, None for a lone runner.
    """

    incarnation: int
    pid: int | None = None
    stop_requested: bool = False
    kill_reason: ExitReason | None = None
    kill_detail: str = ""
    ready: bool = False
    hello: bool = False
    fatal: Fatal | None = None
    stopped_by: StoppedBy = StoppedBy.SELF
    stderr_tail: tuple[str, ...] = ()
    kill_timeout: float = 0.0
    rank: int | None = None


#: The top-level modules that come with one of trio-runner's extras (pyproject.toml).
_EXTRA_OF_MODULE = {
    "mlx": "mlx",
    "mlx_lm": "mlx",
    "tokenizers": "mlx",
    "hypercorn": "serve",
    "starlette": "serve",
    "anyio": "serve",
    "prometheus_client": "serve",
}
_NO_MODULE_NAMED = re.compile(r"No module named '([^']+)'")


def classify_exit(facts: ExitFacts, status: ExitStatus) -> ExitRecord:
    """The :class:`ExitRecord` of an incarnation: its reason, and a detail sentence that says what to do."""
    fatal = facts.fatal
    detail = ""
    if facts.stop_requested:
        reason = ExitReason.REQUESTED
    elif facts.kill_reason is not None:
        reason, detail = facts.kill_reason, facts.kill_detail
    elif (
        fatal is not None
        and fatal[0] == proto.STAGE_PROTOCOL
        and status.exitcode == proto.EXIT_PROTOCOL_ERROR
    ):
        reason = ExitReason.PROTOCOL_ERROR
        detail = f"the runner could not read a frame from the supervisor: {fatal[2]}"
    elif not facts.ready:
        reason = ExitReason.STARTUP_FAILED
        if fatal is not None and fatal[0] == proto.STAGE_LOAD:
            detail = (
                f"the child could not load the runner ({fatal[1]}: {fatal[2]}); the runner class "
                "and its arguments must be importable in a fresh interpreter"
            )
        elif fatal is not None:
            detail = f"setup() raised {fatal[1]}: {fatal[2]}"
        elif not facts.hello and status.signal is None and status.exitcode is not None:
            detail = (
                f"the child exited with code {status.exitcode} before the runner was loaded. "
                "If the script that starts the supervisor has no 'if __name__ == \"__main__\":' "
                "guard, the spawn start method re-runs it in the child: add the guard. "
                "Anything the child printed then went to this process's stderr"
            )
        missing = missing_module(fatal)
        if missing is not None:
            detail += f"; {install_hint(missing)}"
    elif status.signal is not None:
        reason = ExitReason.SIGNALED
    elif status.exitcode == 0:
        reason = ExitReason.CLEAN_EXIT
        detail = "the runner exited with code 0 although nobody asked it to"
    else:
        reason = ExitReason.ERROR_EXIT
        if fatal is not None:
            detail = f"{fatal[1]}: {fatal[2]}"
    if not status.reaped:
        detail = (detail + "; " if detail else "") + (
            f"the process could not be reaped within Timeouts(kill={facts.kill_timeout})"
        )
    return ExitRecord(
        reason=reason,
        exitcode=status.exitcode,
        signal=status.signal,
        stopped_by=facts.stopped_by,
        pid=facts.pid,
        incarnation=facts.incarnation,
        detail=detail,
        stderr_tail=facts.stderr_tail,
        remote_traceback=None if fatal is None else fatal[3],
        reaped=status.reaped,
        rank=facts.rank,
    )


def never_restarts(facts: ExitFacts, record: ExitRecord) -> bool:
    """A failure no restart can fix: the runner never got as far as ``setup``, or lacks a module."""
    if record.reason is not ExitReason.STARTUP_FAILED or facts.kill_reason is not None:
        return False
    if missing_module(facts.fatal) is not None:
        return True  # in setup() too: a restart cannot install it
    return not facts.hello and (
        (facts.fatal is not None and facts.fatal[0] == proto.STAGE_LOAD)
        or (record.signal is None and record.reaped and record.exitcode is not None)
    )


def missing_module(fatal: Fatal | None) -> str | None:
    """The module a child's fatal ``ModuleNotFoundError`` names ("" if its message names none)."""
    if fatal is None or fatal[1] != "ModuleNotFoundError":
        return None
    match = _NO_MODULE_NAMED.match(fatal[2])
    return "" if match is None else match[1]


def modules_of_extra(extra: str) -> list[str]:
    """The top-level modules that trio-runner's ``extra`` installs."""
    return [module for module, owner in _EXTRA_OF_MODULE.items() if owner == extra]


def install_command(*extras: str) -> str:
    """The command that installs trio-runner with ``extras``: ``pip install 'trio-runner[mlx]'``."""
    return f"pip install 'trio-runner[{','.join(extras)}]'"


def install_hint(module: str) -> str:
    """What to do about a missing module: no restart can install it."""
    extra = _EXTRA_OF_MODULE.get(module.partition(".")[0])
    if extra is not None:
        return f"no restart can install {module}; it comes with an extra: {install_command(extra)}"
    what = module or "the missing module"
    return f"no restart can install {what}; install it where the runner runs ({sys.executable})"
