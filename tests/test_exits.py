"""classify_exit and never_restarts as a table: what the supervisor knew, how the process ended.

No process and no trio: each row is the facts of one incarnation, its exit
status, and the reason and detail the supervisor reports.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, replace

import pytest

from trio_runner import _protocol as proto
from trio_runner._errors import ExitReason, ExitRecord, StoppedBy
from trio_runner._exits import UNKNOWN_STATUS, ExitFacts, ExitStatus, classify_exit, never_restarts

KILL = 2.5
BASE = ExitFacts(incarnation=3, pid=4242, ready=True, hello=True, kill_timeout=KILL)
LOADED = replace(BASE, ready=False)  # the class loaded, setup() has not finished
NOTHING = replace(BASE, ready=False, hello=False)  # the runner was never loaded

SIGKILLED = ExitStatus(exitcode=None, signal=signal.SIGKILL)
TB = "Traceback (most recent call last): ..."

MAIN_GUARD = (
    "the child exited with code 1 before the runner was loaded. "
    "If the script that starts the supervisor has no 'if __name__ == \"__main__\":' "
    "guard, the spawn start method re-runs it in the child: add the guard. "
    "Anything the child printed then went to this process's stderr"
)
EOF_DETAIL = (
    "the runner closed its control connection (end of file from a process still "
    "alive), so it can no longer report results"
)


def code(exitcode: int) -> ExitStatus:
    return ExitStatus(exitcode=exitcode, signal=None)


@dataclass(frozen=True)
class Row:
    facts: ExitFacts
    status: ExitStatus
    reason: ExitReason
    detail: str
    never_restarts: bool = False


ROWS = {
    "requested": Row(replace(BASE, stop_requested=True), code(0), ExitReason.REQUESTED, ""),
    "requested wins over a kill": Row(
        replace(BASE, stop_requested=True, kill_reason=ExitReason.HUNG, kill_detail="no heartbeat"),
        SIGKILLED,
        ExitReason.REQUESTED,
        "",
    ),
    "killed as hung": Row(
        replace(BASE, kill_reason=ExitReason.HUNG, kill_detail="no heartbeat", stopped_by=StoppedBy.SIGKILL),
        SIGKILLED,
        ExitReason.HUNG,
        "no heartbeat",
    ),
    "killed at startup": Row(
        replace(NOTHING, kill_reason=ExitReason.STARTUP_FAILED, kill_detail="setup did not finish"),
        SIGKILLED,
        ExitReason.STARTUP_FAILED,
        "setup did not finish",
    ),
    "closed control connection": Row(
        replace(BASE, kill_reason=ExitReason.PROTOCOL_ERROR, kill_detail=EOF_DETAIL),
        SIGKILLED,
        ExitReason.PROTOCOL_ERROR,
        EOF_DETAIL,
    ),
    "child could not read a frame": Row(
        replace(BASE, fatal=(proto.STAGE_PROTOCOL, "FrameError", "frame exceeds the maximum", TB)),
        code(proto.EXIT_PROTOCOL_ERROR),
        ExitReason.PROTOCOL_ERROR,
        "the runner could not read a frame from the supervisor: frame exceeds the maximum",
    ),
    "protocol stage with another exit code": Row(
        replace(BASE, fatal=(proto.STAGE_PROTOCOL, "FrameError", "bad frame", TB)),
        code(1),
        ExitReason.ERROR_EXIT,
        "FrameError: bad frame",
    ),
    "load failure": Row(
        replace(NOTHING, fatal=(proto.STAGE_LOAD, "AttributeError", "no Runner here", TB)),
        code(1),
        ExitReason.STARTUP_FAILED,
        "the child could not load the runner (AttributeError: no Runner here); the runner class "
        "and its arguments must be importable in a fresh interpreter",
        never_restarts=True,
    ),
    "setup raised": Row(
        replace(LOADED, fatal=(proto.STAGE_SETUP, "ValueError", "bad weights", TB)),
        code(1),
        ExitReason.STARTUP_FAILED,
        "setup() raised ValueError: bad weights",
    ),
    "no main guard": Row(NOTHING, code(1), ExitReason.STARTUP_FAILED, MAIN_GUARD, never_restarts=True),
    "signalled before loading": Row(NOTHING, SIGKILLED, ExitReason.STARTUP_FAILED, ""),
    "signalled in setup": Row(LOADED, SIGKILLED, ExitReason.STARTUP_FAILED, ""),
    "exited in setup without a word": Row(LOADED, code(1), ExitReason.STARTUP_FAILED, ""),
    "missing module with an extra": Row(
        replace(
            LOADED, fatal=(proto.STAGE_SETUP, "ModuleNotFoundError", "No module named 'mlx_lm.models'", TB)
        ),
        code(1),
        ExitReason.STARTUP_FAILED,
        "setup() raised ModuleNotFoundError: No module named 'mlx_lm.models'; no restart can install "
        "mlx_lm.models; it comes with an extra: pip install 'trio-runner[mlx]'",
        never_restarts=True,
    ),
    "missing module without an extra": Row(
        replace(NOTHING, fatal=(proto.STAGE_LOAD, "ModuleNotFoundError", "No module named 'nowhere'", TB)),
        code(1),
        ExitReason.STARTUP_FAILED,
        "the child could not load the runner (ModuleNotFoundError: No module named 'nowhere'); the "
        "runner class and its arguments must be importable in a fresh interpreter; no restart can "
        f"install nowhere; install it where the runner runs ({sys.executable})",
        never_restarts=True,
    ),
    "missing module not named": Row(
        replace(LOADED, fatal=(proto.STAGE_SETUP, "ModuleNotFoundError", "import failed", TB)),
        code(1),
        ExitReason.STARTUP_FAILED,
        "setup() raised ModuleNotFoundError: import failed; no restart can install the missing "
        f"module; install it where the runner runs ({sys.executable})",
        never_restarts=True,
    ),
    "signalled": Row(BASE, SIGKILLED, ExitReason.SIGNALED, ""),
    "clean exit": Row(
        BASE, code(0), ExitReason.CLEAN_EXIT, "the runner exited with code 0 although nobody asked it to"
    ),
    "error exit": Row(BASE, code(3), ExitReason.ERROR_EXIT, ""),
    "error exit with a traceback": Row(
        replace(BASE, fatal=(proto.STAGE_RUN, "RuntimeError", "boom", TB)),
        code(1),
        ExitReason.ERROR_EXIT,
        "RuntimeError: boom",
    ),
    "not reaped": Row(
        BASE,
        UNKNOWN_STATUS,
        ExitReason.ERROR_EXIT,
        f"the process could not be reaped within Timeouts(kill={KILL})",
    ),
    "killed and not reaped": Row(
        replace(BASE, kill_reason=ExitReason.HUNG, kill_detail="a task made no progress"),
        UNKNOWN_STATUS,
        ExitReason.HUNG,
        f"a task made no progress; the process could not be reaped within Timeouts(kill={KILL})",
    ),
    "no main guard, not reaped": Row(
        NOTHING,
        ExitStatus(exitcode=1, signal=None, reaped=False),
        ExitReason.STARTUP_FAILED,
        f"{MAIN_GUARD}; the process could not be reaped within Timeouts(kill={KILL})",
    ),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_classify_exit(row: Row) -> None:
    record = classify_exit(row.facts, row.status)
    assert (record.reason, record.detail) == (row.reason, row.detail)
    # The rest comes straight from the facts and the status.
    assert record.exitcode == row.status.exitcode
    assert record.signal == row.status.signal
    assert record.reaped == row.status.reaped
    assert record.stopped_by is row.facts.stopped_by
    assert (record.pid, record.incarnation) == (4242, 3)
    assert record.remote_traceback == (None if row.facts.fatal is None else TB)


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_never_restarts(row: Row) -> None:
    assert never_restarts(row.facts, classify_exit(row.facts, row.status)) is row.never_restarts


def test_the_table_covers_every_exit_reason() -> None:
    assert {row.reason for row in ROWS.values()} == set(ExitReason)


def test_the_record_keeps_the_stderr_tail() -> None:
    record = classify_exit(replace(BASE, stderr_tail=("a", "b")), SIGKILLED)
    assert record.stderr_tail == ("a", "b")


def test_a_process_that_could_not_start_is_restarted() -> None:
    # What the supervisor records when spawning itself fails (an OSError): no
    # status at all, and nothing says a restart cannot help.
    record = ExitRecord(ExitReason.STARTUP_FAILED, incarnation=1, detail="could not start the runner process")
    assert not never_restarts(ExitFacts(incarnation=1), record)
