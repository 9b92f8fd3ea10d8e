"""Crash detection latency: SIGKILL until the supervisor reports the exit.

Ours: the time from ``os.kill(pid, SIGKILL)`` until a ``sup.watch()`` iterator
yields ``Exited`` (the death is noticed, the socket drained to EOF, the
process reaped and the exit classified). Also recorded: until an in-flight
task raises ``RunnerCrashed``.

BASELINES: ``wait_readable`` on a duplicate of the runner process's own
sentinel, in the same kill (the kernel's floor for this very child: a dying
process's memory and threads are torn down before its files are closed);
the same on a bare multiprocessing child holding the same memory (lighter:
one thread, no library); polling
``is_alive()`` every 10 ms (sampled, kill at a random phase); polling every
5 s, as the original design did (computed analytically: the floor plus a
uniform wait over the 5 s period, since sampling it would take minutes).
"""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import _children
import trio
from _common import MS, RESTART, Config, fmt_ms, next_change, row, start_bare, summary

from trio_runner import Exited, RunnerCrashed, open_supervisor


async def _bare_sentinel(megabytes: int) -> float:
    """BASELINE: kill a bare child and wait for its sentinel; the kernel's floor."""
    child, _ = await start_bare(_children.bare_ready, megabytes)
    sentinel = child.process.sentinel
    started = time.perf_counter()
    os.kill(child.pid, signal.SIGKILL)
    await trio.lowlevel.wait_readable(sentinel)
    elapsed = time.perf_counter() - started
    await child.close()
    return elapsed


async def _bare_poll(megabytes: int, interval: float) -> float:
    """BASELINE: poll ``is_alive()`` every ``interval``; the kill lands at a random phase."""
    child, _ = await start_bare(_children.bare_ready, megabytes)
    process = child.process
    killed_at = 0.0

    async def killer() -> None:
        nonlocal killed_at
        await trio.sleep(random.uniform(0, interval))
        killed_at = time.perf_counter()
        os.kill(child.pid, signal.SIGKILL)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(killer)
        while not killed_at or process.is_alive():  # noqa: ASYNC110 - polling is this baseline
            await trio.sleep(interval)
    elapsed = time.perf_counter() - killed_at
    await child.close()
    return elapsed


def _runner_sentinel(sup: Any) -> int:
    """A duplicate of the supervised runner's sentinel (private attributes: a benchmark's privilege).

    A duplicate, so that this wait never collides with the supervisor's own
    death watch on the original.
    """
    return os.dup(sup._inc.worker._process.sentinel)  # pyright: ignore


async def measure(cfg: Config, megabytes: int) -> dict[str, list[float]]:
    count = cfg.n(30 if not megabytes else 15, 2)
    samples: dict[str, list[float]] = {
        "ours: Exited": [],
        "ours: in-flight task fails": [],
        "runner's own sentinel (floor)": [],
        "bare sentinel": [],
        "poll is_alive 10 ms": [],
    }
    runner = _children.BenchRunner
    async with open_supervisor(runner, megabytes, policy=RESTART, name="bench-crash") as sup:
        changes = sup.watch()
        for _ in range(count):
            await sup.wait_ready()
            pid = sup.statistics().pid
            assert pid is not None
            failed_at = 0.0

            async def in_flight(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                nonlocal failed_at
                async with sup.stream(("hang_ignoring_sigterm",)) as task:
                    try:
                        # Its one event: handle() runs, so the kill fails the
                        # task. A kill before the runner took it would deliver
                        # it again, to hang in the next runner.
                        await anext(aiter(task))
                        task_status.started()
                        async for _event in task:
                            pass
                    except RunnerCrashed:
                        failed_at = time.perf_counter()

            sentinel = _runner_sentinel(sup)
            floor_at = 0.0

            async def floor(fd: int) -> None:
                nonlocal floor_at
                await trio.lowlevel.wait_readable(fd)
                floor_at = time.perf_counter()

            async with trio.open_nursery() as nursery:
                await nursery.start(in_flight)
                nursery.start_soon(floor, sentinel)
                await trio.sleep(0.01)
                started = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                await next_change(changes, Exited)
                samples["ours: Exited"].append(time.perf_counter() - started)
            trio.lowlevel.notify_closing(sentinel)
            os.close(sentinel)
            samples["ours: in-flight task fails"].append(failed_at - started)
            samples["runner's own sentinel (floor)"].append(floor_at - started)
            samples["bare sentinel"].append(await _bare_sentinel(megabytes))
            samples["poll is_alive 10 ms"].append(await _bare_poll(megabytes, 0.010))
    return samples


async def run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    for megabytes, label in ((0, "tiny"), (_children.BIG_MB, f"{_children.BIG_MB} MB")):
        samples = await measure(cfg, megabytes)
        raw[f"crash_{label}"] = samples
        stats = {name: summary(values, MS) for name, values in samples.items()}
        ours, floor = stats["ours: Exited"], stats["runner's own sentinel (floor)"]
        bare = stats["bare sentinel"]
        # Analytical BASELINE: a 5 s poll adds a wait uniform over [0, 5 s) to the floor.
        poll5 = {"median": bare["median"] + 2500.0, "p99": bare["p99"] + 4950.0}
        stats["poll is_alive 5 s (analytical)"] = poll5
        overhead = ours["median"] - floor["median"]
        met = overhead <= 0.5 and (megabytes or ours["median"] <= 2.0)
        goal = "median overhead over floor ≤ 0.5 ms" + ("; median ≤ 2 ms" if not megabytes else "")
        rows.append(
            row(
                f"crash_{label}",
                f"crash detection, {label} runner (median / p99)",
                fmt_ms(ours) + f" (in-flight task fails: {fmt_ms(stats['ours: in-flight task fails'])})",
                f"runner's own sentinel (floor) {fmt_ms(floor)}; bare child's sentinel {fmt_ms(bare)}; "
                f"poll 10 ms {fmt_ms(stats['poll is_alive 10 ms'])}; "
                f"poll 5 s (analytical) {poll5['median']:.0f} / {poll5['p99']:.0f} ms",
                f"{overhead:+.2f} ms over floor "
                f"({ours['median'] - bare['median']:+.2f} ms over a bare child)",
                goal,
                bool(met),
                stats=stats,
            )
        )
    return rows, raw
