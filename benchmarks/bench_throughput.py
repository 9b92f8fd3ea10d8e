"""Events per second from the runner to a trio consumer: 100-byte payloads, distinct per event.

Ours: ``async for event in task`` over a task that emits N payloads, and the
batched API (``ctx.emit_many`` in the child, ``task.batches()`` in the parent). BASELINES,
with the same payloads made the same way in a bare child: a
``multiprocessing.Queue`` read with one ``trio.to_thread.run_sync(q.get)`` per
message (the seed's transport); the same queue drained in a tight loop in one
thread; a raw socketpair of length-prefixed bytes, 64 messages per send, read
by a trio ``SocketStream`` and split into one ``bytes`` per message (the
ceiling). Best of N runs each, timed from "go" to the last message.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
from typing import Any

import _children
import trio
from _common import Config, row, start_bare

from trio_runner import RestartPolicy, open_supervisor


async def ours(sup: Any, count: int) -> float:
    started = time.perf_counter()
    received = 0
    async with sup.stream(("events", count)) as task:
        async for _event in task:
            received += 1
    elapsed = time.perf_counter() - started
    assert received == count, received
    return count / elapsed


async def ours_batched(sup: Any, count: int) -> float:
    """The batched API on both ends: ``ctx.emit_many`` in the child, ``task.batches()`` here."""
    started = time.perf_counter()
    received = 0
    async with sup.stream(("events_many", count)) as task:
        async for batch in task.batches():
            received += len(batch)
    elapsed = time.perf_counter() - started
    assert received == count, received
    return count / elapsed


async def queue_per_message(count: int) -> float:
    """BASELINE: mp.Queue, one ``to_thread.run_sync(q.get)`` per message."""
    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    child, _ = await start_bare(_children.queue_producer, events, count)
    started = time.perf_counter()
    child.conn.send_bytes(b"go")
    for _ in range(count):
        await trio.to_thread.run_sync(events.get)
    elapsed = time.perf_counter() - started
    await child.close()
    return count / elapsed


async def queue_tight(count: int) -> float:
    """BASELINE: the same mp.Queue drained in a tight loop in one worker thread."""
    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    child, _ = await start_bare(_children.queue_producer, events, count)

    def drain() -> None:
        get = events.get
        for _ in range(count):
            get()

    started = time.perf_counter()
    child.conn.send_bytes(b"go")
    await trio.to_thread.run_sync(drain)
    elapsed = time.perf_counter() - started
    await child.close()
    return count / elapsed


async def raw_socketpair(count: int) -> float:
    """BASELINE (the ceiling): length-prefixed payloads, batched 64 per send, one bytes per message."""
    parent_sock, child_sock = socket.socketpair()
    child, _ = await start_bare(_children.raw_producer, child_sock, count, 64)
    child_sock.close()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent_sock))
    unpack = _children.HEADER.unpack_from
    received = 0
    buffer = bytearray()
    started = time.perf_counter()
    child.conn.send_bytes(b"go")
    while True:
        data = await stream.receive_some(65536)
        if not data:
            break
        buffer += data
        start, size = 0, len(buffer)
        messages = []
        while size - start >= 4:
            (length,) = unpack(buffer, start)
            end = start + 4 + length
            if end > size:
                break
            messages.append(bytes(buffer[start + 4 : end]))
            start = end
        received += len(messages)
        del buffer[:start]
    elapsed = time.perf_counter() - started
    assert received == count, received
    await stream.aclose()
    await child.close()
    return count / elapsed


async def run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    repeats = cfg.n(3, 1)
    count = cfg.n(300_000, 5_000)
    rates: dict[str, list[float]] = {
        "ours": [],
        "ours, batched API": [],
        "mp.Queue + to_thread per message": [],
        "mp.Queue tight loop": [],
        "raw socketpair, batched (ceiling)": [],
    }
    policy = RestartPolicy(max_restarts=0)
    async with open_supervisor(_children.BenchRunner, policy=policy, name="bench-events") as sup:
        await sup.wait_ready()
        await ours(sup, 1000)  # warm
        for _ in range(repeats):
            rates["ours"].append(await ours(sup, count))
            rates["ours, batched API"].append(await ours_batched(sup, count))
            rates["mp.Queue + to_thread per message"].append(await queue_per_message(cfg.n(4_000, 200)))
            rates["mp.Queue tight loop"].append(await queue_tight(cfg.n(200_000, 5_000)))
            rates["raw socketpair, batched (ceiling)"].append(await raw_socketpair(count))
    best = {name: max(values) for name, values in rates.items()}
    ceiling = best["raw socketpair, batched (ceiling)"]
    ratio = best["ours"] / ceiling
    batched_ratio = best["ours, batched API"] / ceiling
    rows = [
        row(
            "events",
            f"events/s runner → trio consumer, 100-byte distinct payloads (best of {repeats})",
            f"{best['ours'] / 1e6:.2f} M/s",
            f"raw socketpair batched (ceiling) {ceiling / 1e6:.2f} M/s; mp.Queue tight loop "
            f"{best['mp.Queue tight loop'] / 1e3:.0f} k/s; mp.Queue + to_thread per message "
            f"{best['mp.Queue + to_thread per message'] / 1e3:.1f} k/s",
            f"{ratio:.0%} of ceiling; "
            f"{best['ours'] / best['mp.Queue + to_thread per message']:.0f}x the seed",
            "≥ 60% of the raw batched ceiling",
            ratio >= 0.6,
            rates=rates,
            best=best,
        ),
        row(
            "events_batched",
            f"the same with the batched API: ctx.emit_many + task.batches() (best of {repeats})",
            f"{best['ours, batched API'] / 1e6:.2f} M/s",
            f"raw socketpair batched (ceiling) {ceiling / 1e6:.2f} M/s",
            f"{batched_ratio:.0%} of ceiling",
            "≥ 60% of the raw batched ceiling",
            batched_ratio >= 0.6,
        ),
    ]
    return rows, {"events": rates}
