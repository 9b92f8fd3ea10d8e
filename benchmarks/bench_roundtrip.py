"""Round trip of a tiny request, warm, in alternating blocks within one run.

Ours: ``await sup.run(("echo", 1))``. BASELINES: a bare trio echo through a
child over a socketpair (the floor), ``trio_parallel.run_sync`` on a warm
worker, and ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import multiprocessing
import pickle
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import _children
import trio
import trio_parallel
from _common import US, Config, fmt_us, row, summary

from trio_runner import RestartPolicy, open_supervisor

Call = Callable[[], Awaitable[Any]]


async def _block(call: Call, count: int, into: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(count):
        started = clock()
        await call()
        into.append(clock() - started)


class BareEcho:
    """BASELINE (the floor): a pickled tiny request echoed by a child over a socketpair, trio side."""

    def __init__(self) -> None:
        parent, child = socket.socketpair()
        ctx = multiprocessing.get_context("spawn")
        self.process = ctx.Process(target=_children.bare_echo, args=(child,), daemon=True)
        self._child_sock = child
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent))

    async def start(self) -> None:
        await trio.to_thread.run_sync(self.process.start)
        self._child_sock.close()

    async def call(self) -> Any:
        data = pickle.dumps(("echo", 1), protocol=5)
        frame = _children.HEADER.pack(len(data)) + data
        await self.stream.send_all(frame)
        received = b""
        while len(received) < len(frame):
            received += await self.stream.receive_some(65536)
        return pickle.loads(received[4:])

    async def aclose(self) -> None:
        await self.stream.aclose()
        await trio.to_thread.run_sync(self.process.join, 5)


async def measure(cfg: Config, *, runner: Any = _children.BenchRunner) -> dict[str, list[float]]:
    """Latency samples (seconds) for ours and each baseline, in alternating blocks."""
    blocks = cfg.n(20, 2)
    per_block = cfg.n(150, 20)
    names = ("ours", "bare echo (floor)", "trio_parallel", "to_thread")
    samples: dict[str, list[float]] = {name: [] for name in names}
    echo = BareEcho()
    await echo.start()
    policy = RestartPolicy(max_restarts=0)
    try:
        async with open_supervisor(runner, policy=policy, name="bench-rt") as sup:
            await sup.wait_ready()

            async def ours() -> Any:
                return await sup.run(("echo", 1))

            async def parallel() -> Any:
                return await trio_parallel.run_sync(_children.noop, 1)

            async def thread() -> Any:
                return await trio.to_thread.run_sync(_children.noop, 1)

            calls: dict[str, Call] = {
                "ours": ours,
                "bare echo (floor)": echo.call,
                "trio_parallel": parallel,
                "to_thread": thread,
            }
            for call in calls.values():  # warm every path: worker started, caches filled
                await _block(call, 20, [])
            for block in range(blocks):
                order = list(calls.items())
                if block % 2:
                    order.reverse()
                for name, call in order:
                    await _block(call, per_block, samples[name])
    finally:
        await echo.aclose()
    return samples


async def run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    samples = await measure(cfg)
    stats = {name: summary(values, US) for name, values in samples.items()}
    ours, floor, parallel = stats["ours"], stats["bare echo (floor)"], stats["trio_parallel"]
    ratio = ours["median"] / floor["median"]
    met = ratio <= 1.5 and ours["median"] < parallel["median"]
    rows = [
        row(
            "roundtrip",
            "tiny request round trip, warm (p50 / p99)",
            fmt_us(ours),
            f"floor (bare trio echo via child) {fmt_us(floor)}; trio_parallel {fmt_us(parallel)}; "
            f"to_thread {fmt_us(stats['to_thread'])}",
            f"{ratio:.2f}x floor; {ours['median'] / parallel['median']:.2f}x trio_parallel",
            "p50 ≤ 1.5x floor and < trio_parallel",
            met,
            stats=stats,
        )
    ]
    return rows, {"roundtrip": samples}
