"""Scaling with concurrent tasks (1, 8, 64), and one slow consumer among 8.

The runner serves up to 64 tasks at once (``concurrency = 64``), so every
task has its own thread in the child and its own flow-control window.
"""

from __future__ import annotations

import time
from typing import Any

import _children
import trio
import trio.lowlevel
from _common import US, Config, row, summary

from trio_runner import RestartPolicy, open_supervisor

LEVELS = (1, 8, 64)


async def _stream(sup: Any, count: int, delay_every: int = 0) -> float:
    """Consume one task's events; with ``delay_every``, sleep 1 ms every that many events (slow)."""
    started = time.perf_counter()
    received = 0
    async with sup.stream(("events", count)) as task:
        async for _event in task:
            received += 1
            if delay_every and received % delay_every == 0:
                await trio.sleep(0.001)
    assert received == count
    return time.perf_counter() - started


async def events_at(sup: Any, tasks: int, total: int) -> float:
    per_task = total // tasks
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(_stream, sup, per_task)
    return per_task * tasks / (time.perf_counter() - started)


async def roundtrip_at(sup: Any, tasks: int, calls: int) -> tuple[list[float], float]:
    latencies: list[float] = []

    async def caller() -> None:
        for _ in range(calls):
            begun = time.perf_counter()
            await sup.run(("echo", 1))
            latencies.append(time.perf_counter() - begun)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(caller)
    return latencies, len(latencies) / (time.perf_counter() - started)


async def slow_consumer(sup: Any, per_task: int) -> dict[str, float]:
    """7 fast consumers, alone and beside one slow one: the fast ones' aggregate rate must hold."""
    results: dict[str, float] = {}
    for label, with_slow in (("fast only", False), ("with slow", True), ("fast only (again)", False)):
        fast_times: list[float] = []
        slow_time = 0.0

        async def fast() -> None:
            fast_times.append(await _stream(sup, per_task))  # noqa: B023

        async def slow() -> None:
            nonlocal slow_time
            slow_time = await _stream(sup, per_task // 10, delay_every=16)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(7):
                nursery.start_soon(fast)
            if with_slow:
                nursery.start_soon(slow)
            await trio.lowlevel.checkpoint()
        del started
        results[label] = 7 * per_task / max(fast_times)
        if with_slow:
            results["slow task events/s"] = per_task // 10 / slow_time
    return results


async def run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    total = cfg.n(256_000, 6_400)
    calls = cfg.n(1_000, 20)
    policy = RestartPolicy(max_restarts=0)
    data: dict[str, Any] = {"events_per_s": {}, "roundtrip_us": {}, "calls_per_s": {}}
    async with open_supervisor(_children.WideRunner, policy=policy, name="bench-scale") as sup:
        await sup.wait_ready()
        await events_at(sup, 8, 8_000)  # warm the child's threads
        for tasks in LEVELS:
            rates = [await events_at(sup, tasks, total) for _ in range(cfg.n(2, 1))]
            data["events_per_s"][tasks] = max(rates)
            latencies, rate = await roundtrip_at(sup, tasks, max(calls // tasks, 5))
            data["roundtrip_us"][tasks] = summary(latencies, US)
            data["calls_per_s"][tasks] = rate
        slow = await slow_consumer(sup, cfg.n(40_000, 1_000))
    data["slow_consumer"] = slow
    events = data["events_per_s"]
    rtt = data["roundtrip_us"]
    no_collapse = events[64] >= 0.5 * events[1] and data["calls_per_s"][64] >= 0.5 * data["calls_per_s"][1]
    fast_alone = max(slow["fast only"], slow["fast only (again)"])
    isolation = slow["with slow"] / fast_alone
    rows = [
        row(
            "scaling",
            "scaling 1 / 8 / 64 concurrent tasks: events/s; round trip p50; calls/s",
            " / ".join(f"{events[n] / 1e6:.2f}" for n in LEVELS)
            + " M/s; "
            + " / ".join(f"{rtt[n]['median']:.0f}" for n in LEVELS)
            + " µs; "
            + " / ".join(f"{data['calls_per_s'][n] / 1e3:.1f}" for n in LEVELS)
            + " k/s",
            "—",
            f"64 vs 1: events {events[64] / events[1]:.2f}x, calls/s "
            f"{data['calls_per_s'][64] / data['calls_per_s'][1]:.2f}x",
            "no collapse (64 tasks ≥ 0.5x the 1-task rate)",
            no_collapse,
            **data,
        ),
        row(
            "slow_consumer",
            "one slow consumer among 8 tasks: the 7 fast ones' events/s",
            f"{slow['with slow'] / 1e6:.2f} M/s (slow task: {slow['slow task events/s'] / 1e3:.1f} k/s)",
            f"the 7 fast tasks alone {fast_alone / 1e6:.2f} M/s",
            f"{isolation:.2f}x alone",
            "slows only its own task (fast ones ≥ 0.8x alone)",
            isolation >= 0.8,
            **slow,
        ),
    ]
    return rows, {}
