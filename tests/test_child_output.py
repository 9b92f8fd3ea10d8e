"""The runner's stdout and stderr: logged off the trio thread, bounded, and never in the way of a shutdown.

Against real processes: a runner that floods stderr must not stall the loop,
every line it writes is either a log record or counted as dropped, and the
stderr tail of the crash report that follows the flood holds its last lines.
Leaving ``open_supervisor`` stays within ``Timeouts.shutdown_bound`` (plus the
documented margin) when the log handlers are slow and the hand-off to them is
full, and when the application has saturated trio's default thread limiter;
those two run in a subprocess (tests/scripts/shutdown_under_pressure.py), so
that a shutdown hung in a shielded scope fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_runner import RestartPolicy, RunnerCrashed, Timeouts, open_supervisor
from trio_runner._childlog import last_lines
from trio_runner.testing import monitor_lateness

from .output_runners import ChattyRunner

FAST = RestartPolicy(initial_delay=0.05, max_delay=0.2)
QUICK = Timeouts(heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)
SCRIPT = Path(__file__).parent / "scripts" / "shutdown_under_pressure.py"
FLOOD = 300_000
# The loop_lateness fixture's default: generous, as a healthy loop is late by
# milliseconds here; per-line logging on the trio thread stalled it for 0.5-4 s.
LATENESS_BOUND = 0.25
# Over Timeouts.shutdown_bound: the documented small margin (drain, log flush),
# and then some for a loaded machine. Only a hang breaks it.
SHUTDOWN_MARGIN = 10.0


class _Tally(logging.Handler):
    """Counts records by (stream, level, pid)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[tuple[Any, int, Any]] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen[
            (getattr(record, "runner_stream", None), record.levelno, getattr(record, "runner_pid", None))
        ] += 1


@contextmanager
def _runner_logs_to(name: str, handler: logging.Handler) -> Iterator[None]:
    """Send the runner's lines to ``handler`` alone (not to pytest's capture, which keeps them all)."""
    logger = logging.getLogger(f"trio_runner.runner.{name}")
    saved = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


async def test_a_stderr_flood_does_not_stall_the_loop_and_every_line_is_logged_or_counted() -> None:
    tally = _Tally()
    with _runner_logs_to("chatty", tally):
        async with open_supervisor(ChattyRunner, name="chatty", policy=FAST, timeouts=QUICK) as sup:
            await sup.wait_ready()
            pid = sup.statistics().pid
            async with monitor_lateness() as monitor:
                with pytest.raises(RunnerCrashed):
                    await sup.run(("flood", FLOOD, "die"))
            # The log thread may still be working through the lines it took.
            with trio.fail_after(30):
                while tally.seen.total() + sup.statistics().log_lines_dropped < FLOOD + 1:  # noqa: ASYNC110 - in a thread
                    await trio.sleep(0.05)
            dropped = sup.statistics().log_lines_dropped
    assert monitor.worst < LATENESS_BOUND
    logged = tally.seen
    assert set(logged) <= {("stderr", logging.WARNING, pid), ("stdout", logging.INFO, pid)}
    assert logged.total() + dropped == FLOOD + 1
    assert logged[("stderr", logging.WARNING, pid)] > 0


async def test_the_crash_report_after_a_stderr_flood_holds_its_last_lines() -> None:
    with _runner_logs_to("chatty", _Tally()):
        async with open_supervisor(ChattyRunner, name="chatty", policy=FAST, timeouts=QUICK) as sup:
            with pytest.raises(RunnerCrashed) as info:
                await sup.run(("flood", FLOOD, "die"))
    tail = info.value.exit.stderr_tail
    assert tail
    assert tail == tuple(f"line {i}" for i in range(FLOOD - len(tail), FLOOD))
    assert info.value.exit.exitcode == 3


class _Keep(logging.Handler):
    """Keeps each record's message."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def test_a_line_longer_than_64_kib_becomes_records_of_64_kib_in_the_log_and_the_tail() -> None:
    keep = _Keep()
    length = 150_000
    pieces = [65536, 65536, length - 2 * 65536]
    with _runner_logs_to("chatty", keep):
        async with open_supervisor(ChattyRunner, name="chatty", policy=FAST, timeouts=QUICK) as sup:
            await sup.run(("long_line", length))
            with trio.fail_after(30):
                while "after" not in keep.messages:  # noqa: ASYNC110 - logged from a thread
                    await trio.sleep(0.01)
    assert [len(m) for m in keep.messages] == [*pieces, len("after")]
    assert set("".join(keep.messages[:3])) == {"x"}
    # The crash-report tail cuts it the same way.
    tail = last_lines(b"x" * length + b"\nafter\n", 50)
    assert tail == [*keep.messages[:3], "after"]


async def _leave_open_supervisor(scenario: str) -> dict[str, Any]:
    """Run a scenario of tests/scripts/shutdown_under_pressure.py; its report, or fail if it hung."""
    with trio.move_on_after(90) as scope:
        done = await trio.run_process(
            [sys.executable, str(SCRIPT), scenario], capture_stdout=True, capture_stderr=True, check=False
        )
    if scope.cancelled_caught:
        pytest.fail(f"leaving open_supervisor hung ({scenario}): no report within 90 s")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report: dict[str, Any] = json.loads(done.stdout.decode().splitlines()[-1])
    return report


async def test_leaving_returns_within_the_bound_when_log_handlers_are_slow_and_the_hand_off_is_full() -> None:
    report = await _leave_open_supervisor("slow-handler")
    assert report["dropped"] > 0  # the hand-off was full
    assert report["elapsed"] < report["bound"] + SHUTDOWN_MARGIN


async def test_leaving_returns_within_the_bound_when_trios_default_thread_limiter_is_saturated() -> None:
    report = await _leave_open_supervisor("busy-thread-limiter")
    assert report["elapsed"] < report["bound"] + SHUTDOWN_MARGIN


class _RejectFirst(logging.Filter):
    """An application filter that raises on the first record it sees, and passes the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.raised = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.raised:
            self.raised = True
            raise RuntimeError("a broken filter")
        return True


async def test_a_log_filter_that_raises_drops_its_line_and_later_lines_are_still_logged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    keep = _Keep()
    broken = _RejectFirst()
    logger = logging.getLogger("trio_runner.runner.chatty")
    logger.addFilter(broken)
    try:
        with _runner_logs_to("chatty", keep):
            async with open_supervisor(ChattyRunner, name="chatty", policy=FAST, timeouts=QUICK) as sup:
                await sup.run(("long_line", 10))
                with trio.fail_after(30):
                    while "after" not in keep.messages:  # noqa: ASYNC110 - logged from a thread
                        await trio.sleep(0.01)
                dropped = sup.statistics().log_lines_dropped
    finally:
        logger.removeFilter(broken)
    assert broken.raised
    assert keep.messages == ["after"]  # the line the filter raised on is gone, the next one arrived
    assert dropped == 1
    assert "a broken filter" in capsys.readouterr().err
