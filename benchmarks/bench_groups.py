"""Groups (``ranks=2``, pure-Python ranks): restart after a rank's SIGKILL, and crash detection.

Group restart to ready (ours): with a zero backoff, the time from the
supervisor reporting ``Exited`` for the group (one rank SIGKILLed, the ranks
alternating) to the last rank's ``Ready`` of the next generation: the
survivor's graceful stop, reaping both, fresh ports, two spawns. BASELINE: a
bare start of the same two ranks (two plain ``multiprocessing`` children
started at once, each ``Process.start`` in a thread, with a ready handshake),
until both are ready. Interleaved sample by sample.

Crash detection (ours): from ``os.kill(rank_pid, SIGKILL)`` to the in-flight
task (running on both ranks) raising ``RunnerCrashed``. BASELINE: the killed
rank's own death-watch floor, ``wait_readable`` on a duplicate of that rank's
process sentinel, in the same kill; and a lone runner's in-flight task in
the same kind of kill, for comparison.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import _children
import trio
from _common import MS, RESTART, Config, fmt_ms, next_change, row, start_bare, summary

from trio_runner import Exited, Ready, RunnerCrashed, open_supervisor

RANKS = 2


async def _bare_group() -> float:
    """BASELINE: start ``RANKS`` bare children at once; seconds until every one is ready."""
    children: list[Any] = []

    async def one() -> None:
        child, _ = await start_bare(_children.bare_ready)
        children.append(child)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(RANKS):
            nursery.start_soon(one)
    elapsed = time.perf_counter() - started
    for child in children:
        await child.close()
    return elapsed


async def _last_ready(changes: Any) -> None:
    """Wait for the last rank's ``Ready`` (the group's are reported together, in rank order)."""
    while (await next_change(changes, Ready)).rank != RANKS - 1:
        pass


async def restart_to_ready(cfg: Config) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"ours": [], "bare start of the same ranks": []}
    async with open_supervisor(_children.BenchRunner, ranks=RANKS, policy=RESTART, name="bench-group") as sup:
        changes = sup.watch()
        await sup.wait_ready()
        for i in range(cfg.n(25, 2)):
            pid = sup.statistics().pids[i % RANKS]
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await next_change(changes, Exited)
            exited_at = time.perf_counter()
            await _last_ready(changes)
            samples["ours"].append(time.perf_counter() - exited_at)
            samples["bare start of the same ranks"].append(await _bare_group())
    return samples


def _sentinel(sup: Any, rank: int | None) -> int:
    """A duplicate of a runner's (or a rank's) sentinel; private attributes, a benchmark's privilege."""
    inc = sup._inc  # pyright: ignore
    worker = inc.worker if rank is None else inc.ranks[rank].worker  # pyright: ignore
    return os.dup(worker._process.sentinel)  # pyright: ignore


async def _detect_once(sup: Any, changes: Any, rank: int | None) -> tuple[float, float]:
    """Kill one rank (or the lone runner) mid-task: (seconds to RunnerCrashed, seconds to its sentinel)."""
    await sup.wait_ready()
    pid = sup.statistics().pids[rank or 0]
    assert pid is not None
    failed_at = floor_at = 0.0

    async def in_flight(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal failed_at
        async with sup.stream(("until_cancelled",)) as task:
            try:
                async for _event in task:
                    # Rank 0 has started it: killed before that, the task would
                    # not fail but run again on the next generation.
                    task_status.started()
            except RunnerCrashed:
                failed_at = time.perf_counter()

    async def floor(fd: int) -> None:
        nonlocal floor_at
        await trio.lowlevel.wait_readable(fd)
        floor_at = time.perf_counter()

    sentinel = _sentinel(sup, rank)
    async with trio.open_nursery() as nursery:
        await nursery.start(in_flight)
        nursery.start_soon(floor, sentinel)
        await trio.sleep(0.01)  # and, about now, every other rank
        started = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        await next_change(changes, Exited)
    trio.lowlevel.notify_closing(sentinel)
    os.close(sentinel)
    return failed_at - started, floor_at - started


async def detection(cfg: Config) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {
        "ours: in-flight task fails": [],
        "killed rank's own sentinel (floor)": [],
        "lone runner: in-flight task fails": [],
        "lone runner's own sentinel": [],
    }
    count = cfg.n(30, 2)
    async with open_supervisor(_children.BenchRunner, ranks=RANKS, policy=RESTART, name="bench-group") as sup:
        changes = sup.watch()
        for i in range(count):
            failed, floor = await _detect_once(sup, changes, i % RANKS)
            samples["ours: in-flight task fails"].append(failed)
            samples["killed rank's own sentinel (floor)"].append(floor)
    async with open_supervisor(_children.BenchRunner, policy=RESTART, name="bench-lone") as sup:
        changes = sup.watch()
        for _ in range(count):
            failed, floor = await _detect_once(sup, changes, None)
            samples["lone runner: in-flight task fails"].append(failed)
            samples["lone runner's own sentinel"].append(floor)
    return samples


async def run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    samples = await restart_to_ready(cfg)
    raw["group_restart"] = samples
    stats = {name: summary(values, MS) for name, values in samples.items()}
    ratio = stats["ours"]["median"] / stats["bare start of the same ranks"]["median"]
    rows.append(
        row(
            "group_restart",
            f"group of {RANKS} restart to ready after a rank's SIGKILL (median / p99)",
            fmt_ms(stats["ours"]),
            f"bare start of {RANKS} children + ready handshake "
            f"{fmt_ms(stats['bare start of the same ranks'])}",
            f"{ratio:.2f}x bare",
            "reported (no goal: includes the survivor's graceful stop)",
            None,
            stats=stats,
        )
    )
    samples = await detection(cfg)
    raw["group_detection"] = samples
    stats = {name: summary(values, MS) for name, values in samples.items()}
    ours, floor = stats["ours: in-flight task fails"], stats["killed rank's own sentinel (floor)"]
    lone, lone_floor = stats["lone runner: in-flight task fails"], stats["lone runner's own sentinel"]
    overhead = ours["median"] - floor["median"]
    rows.append(
        row(
            "group_detection",
            f"group of {RANKS}: a rank's SIGKILL to the in-flight task's RunnerCrashed (median / p99)",
            fmt_ms(ours),
            f"killed rank's own sentinel (floor) {fmt_ms(floor)}; lone runner's task {fmt_ms(lone)} "
            f"(its sentinel {fmt_ms(lone_floor)})",
            f"{overhead:+.2f} ms over floor",
            "median ≤ 5 ms over the floor",
            overhead <= 5.0,
            stats=stats,
        )
    )
    return rows, raw
