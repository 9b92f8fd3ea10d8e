"""Loop lateness of a 1 ms ticker while a runner floods its stderr.

The runner writes 300,000 short lines to stderr in large writes (the parent
finds a full pipe at every read). Each line becomes a log record on
``trio_runner.runner.<name>``, built on the supervisor's log thread, or is
dropped and counted when the handler falls behind. A window lasts from the
task's submission until every line is either logged or counted, so the
log thread's work after the task returned is measured too.

The reference is the idle ticker in the same run, for as long as the last
flood window. Rounds interleave (idle, flood, idle, flood ...); the row quotes
the median over rounds of each window's worst and p99 lateness.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import _children
import trio
from _common import MS, Config, percentile, quiet_gc, row, ticking

from trio_runner import open_supervisor

NAME = "bench-flood"


class _Count(logging.Handler):
    """A handler that only counts: what the records cost to build and hand over, not to format."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


async def _idle_window(seconds: float) -> list[float]:
    with quiet_gc():
        async with ticking() as ticker:
            await trio.sleep(seconds)
    return ticker.samples


async def _flood_window(sup: Any, handler: _Count, lines: int) -> tuple[list[float], dict[str, float]]:
    logged_before = handler.count
    dropped_before = sup.statistics().log_lines_dropped
    with quiet_gc():
        async with ticking() as ticker:
            started = time.perf_counter()
            await sup.run(("flood", lines))
            returned = time.perf_counter() - started
            deadline = started + 60
            while time.perf_counter() < deadline:  # the log thread works on after the task returned
                logged = handler.count - logged_before
                dropped = sup.statistics().log_lines_dropped - dropped_before
                if logged + dropped >= lines:
                    break
                await trio.sleep(0.01)
            window = time.perf_counter() - started
    return ticker.samples, {"returned_s": returned, "window_s": window, "logged": logged, "dropped": dropped}


async def run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lines = cfg.n(300_000, 20_000)
    rounds = cfg.n(7, 1)
    logger = logging.getLogger(f"trio_runner.runner.{NAME}")
    handler = _Count()
    saved = logger.level, logger.propagate
    logger.setLevel(logging.INFO)  # run.py quiets the trio_runner loggers
    logger.propagate = False  # the count only, not the root logger's handlers
    logger.addHandler(handler)
    idle: list[list[float]] = []
    flood: list[list[float]] = []
    facts: list[dict[str, float]] = []
    try:
        async with open_supervisor(_children.FloodRunner, name=NAME) as sup:
            await sup.wait_ready()
            window = 1.0
            for _ in range(rounds):
                idle.append(await _idle_window(window))
                samples, fact = await _flood_window(sup, handler, lines)
                flood.append(samples)
                facts.append(fact)
                window = fact["window_s"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]

    def medians(windows: list[list[float]]) -> tuple[float, float]:
        worst = statistics.median(max(w) for w in windows) * MS
        p99 = statistics.median(percentile(w, 99) for w in windows) * MS
        return worst, p99

    flood_worst, flood_p99 = medians(flood)
    idle_worst, idle_p99 = medians(idle)
    added = flood_worst - idle_worst
    dropped_share = statistics.median(f["dropped"] / lines for f in facts)
    window_s = statistics.median(f["window_s"] for f in facts)
    rows = [
        row(
            "lateness_stderr_flood",
            f"1 ms ticker lateness during a {lines:,}-line stderr flood (worst / p99, median of {rounds})",
            f"{flood_worst:.2f} / {flood_p99:.2f} ms",
            f"idle {idle_worst:.2f} / {idle_p99:.2f} ms",
            f"worst {added:+.2f} ms over idle, p99 {flood_p99 - idle_p99:+.2f} ms; "
            f"window {window_s:.2f} s, {dropped_share:.0%} of lines dropped (counted)",
            "worst ≤ idle + 1 ms",
            added <= 1.0,
            rounds=rounds,
            lines=lines,
            flood_worst_ms=[max(w) * MS for w in flood],
            idle_worst_ms=[max(w) * MS for w in idle],
            facts=facts,
        )
    ]
    raw = {
        "flood": {
            "idle": [s for w in idle for s in w],
            "ours: stderr flood": [s for w in flood for s in w],
        }
    }
    return rows, raw
