"""Events a consumer receives after ``await task.cancel()`` returns (cancel means stop).

A fast stream (``BenchRunner`` emitting 100-byte events as fast as it can,
with the default 5 ms linger) is read for a while, then cancelled; the
consumer keeps iterating until the outcome and counts what it still gets.
BASELINE, in the same run: what was queued for it at that moment (in the
runner and in this process), that is, what the consumer would have received
had the events been delivered: ``statistics().events_dropped`` per cancel.
The MLX runner's figure (50 ms linger) is in bench_mlx.py.
"""

from __future__ import annotations

import statistics
from typing import Any

import _children
from _common import Config, row

from trio_runner import TaskCancelled, open_supervisor


async def after_cancel(sup: Any, read_first: int) -> tuple[int, int]:
    """(events received after cancel() returned, events dropped instead) for one cancelled stream."""
    dropped_before = sup.statistics().events_dropped
    after = 0
    async with sup.stream(("events", 10**9)) as task:
        seen = 0
        async for _ in task:
            seen += 1
            if seen == read_first:
                break
        await task.cancel()
        try:
            async for _ in task:
                after += 1
        except TaskCancelled:
            pass
    return after, sup.statistics().events_dropped - dropped_before


async def run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rounds = cfg.n(50, 3)
    afters: list[int] = []
    dropped: list[int] = []
    async with open_supervisor(_children.BenchRunner) as sup:
        await sup.wait_ready()
        for i in range(rounds):
            after, lost = await after_cancel(sup, read_first=1000 + 997 * i % 20_000)
            afters.append(after)
            dropped.append(lost)
    worst = max(afters)
    rows = [
        row(
            "cancel_events_after",
            "events received after cancel() returns, fast 100-byte stream (worst / median)",
            f"{worst} / {statistics.median(afters):.0f} over {rounds} cancels",
            f"queued for the consumer at that moment (dropped instead): median "
            f"{statistics.median(dropped):.0f}, max {max(dropped)}",
            "—",
            "≤ 1 event",
            worst <= 1,
            after_cancel=afters,
            dropped=dropped,
        )
    ]
    return rows, {"cancel": {"after_cancel": afters, "dropped": dropped}}
