"""Restart to ready, graceful shutdown of an idle runner, and resources after many crash/restart cycles.

Restart to ready (ours): with a zero backoff, the time from the supervisor
reporting ``Exited`` to it reporting ``Ready`` for the next incarnation. The
BASELINE is a bare ``multiprocessing`` spawn of a child in a light module with
a ready handshake over a Pipe (``Process.start`` in a thread, as ours does),
for both ``spawn`` and ``forkserver``. Interleaved sample by sample.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from typing import Any

import _children
import psutil
from _common import MS, RESTART, Config, fmt_ms, next_change, restart_once, row, start_bare, summary

from trio_runner import Exited, open_supervisor


async def restart_to_ready(cfg: Config, method: str) -> dict[str, list[float]]:
    # The supervisor launches the forkserver as it opens (with its own module
    # preloaded); the bare baseline then forks from the same server.
    samples: dict[str, list[float]] = {"ours": [], "bare multiprocessing": []}
    async with open_supervisor(
        _children.BenchRunner, policy=RESTART, start_method=method, name=f"bench-{method}"
    ) as sup:
        changes = sup.watch()
        await sup.wait_ready()
        for _ in range(cfg.n(25, 2)):
            samples["ours"].append(await restart_once(sup, changes))
            child, elapsed = await start_bare(_children.bare_ready, method=method)
            samples["bare multiprocessing"].append(elapsed)
            await child.close()
    return samples


async def shutdown(cfg: Config) -> list[float]:
    samples: list[float] = []
    for _ in range(cfg.n(15, 2)):
        async with open_supervisor(_children.BenchRunner, name="bench-shutdown") as sup:
            await sup.wait_ready()
            await sup.run(("echo", 1))
            started = time.perf_counter()
        samples.append(time.perf_counter() - started)
    return samples


def _resources() -> dict[str, float]:
    gc.collect()
    me = psutil.Process()
    return {
        "fds": me.num_fds(),
        "threads (OS)": me.num_threads(),
        "threads (python)": threading.active_count(),
        "rss_mb": me.memory_info().rss / 2**20,
    }


async def cycles(cfg: Config) -> dict[str, Any]:
    count = cfg.n(1000, 5)
    async with open_supervisor(_children.BenchRunner, policy=RESTART, name="bench-cycles") as sup:
        changes = sup.watch()

        async def cycle() -> None:
            await sup.wait_ready()
            await sup.run(("echo", 1))
            pid = sup.statistics().pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await next_change(changes, Exited)

        for _ in range(cfg.n(30, 2)):  # warm: thread cache, lazy imports, allocator
            await cycle()
        await sup.wait_ready()
        before = _resources()
        started = time.perf_counter()
        for _ in range(count):
            await cycle()
        await sup.wait_ready()
        elapsed = time.perf_counter() - started
        after = _resources()
    return {"cycles": count, "seconds": elapsed, "before": before, "after": after}


async def run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    # Same-run ratios: absolute times drift about 2x between hosts of the same kind.
    for method in ("spawn", "forkserver"):
        goal = f"≤ 1.2x bare {method}"
        samples = await restart_to_ready(cfg, method)
        raw[f"restart_{method}"] = samples
        stats = {name: summary(values, MS) for name, values in samples.items()}
        ratio = stats["ours"]["median"] / stats["bare multiprocessing"]["median"]
        met = ratio <= 1.2
        rows.append(
            row(
                f"restart_{method}",
                f"restart to ready, {method} (median / p99)",
                fmt_ms(stats["ours"]),
                f"bare {method} + ready handshake {fmt_ms(stats['bare multiprocessing'])}",
                f"{ratio:.2f}x bare",
                goal,
                met,
                stats=stats,
            )
        )
    stop = summary(await shutdown(cfg), MS)
    rows.append(
        row(
            "shutdown",
            "graceful shutdown of an idle runner (median / p99)",
            fmt_ms(stop),
            "—",
            "—",
            "≤ 50 ms",
            stop["median"] <= 50,
            stats=stop,
        )
    )
    leak = await cycles(cfg)
    before, after = leak["before"], leak["after"]
    delta = {key: after[key] - before[key] for key in before}
    rows.append(
        row(
            "resources",
            f"parent after {leak['cycles']} crash/restart cycles",
            f"fds {delta['fds']:+.0f}, threads {delta['threads (OS)']:+.0f}, RSS {delta['rss_mb']:+.1f} MB",
            f"before: {before['fds']:.0f} fds, {before['threads (OS)']:.0f} threads, "
            f"{before['rss_mb']:.0f} MB RSS",
            f"{leak['seconds'] / leak['cycles'] * MS:.0f} ms per cycle",
            "+0 fds, +0 threads, ≤ 5 MB",
            delta["fds"] <= 0 and delta["threads (OS)"] <= 0 and delta["rss_mb"] <= 5,
            **leak,
        )
    )
    return rows, raw
