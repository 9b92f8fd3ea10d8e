"""Loop lateness of a 1 ms ticker while big payloads cross between the supervisor and its runner.

Scenarios, each against the idle ticker measured in the same run:

- **5M-int result**: ``list(range(5_000_000))`` returned by ``handle`` (a 25 MB
  pickle of small objects: unpickling is the cost);
- **50 MiB event**: one ``bytes`` event of 50 MiB (copying is the cost);
- **60 MiB request**: a ``bytes`` request of 60 MiB (pickling and writing it).

Above ``trio_runner._payloads.LARGE`` (128 KiB) the parent (un)pickles in a
worker thread that hands the GIL back between chunks; the goal is that none
of these adds more than 1 ms to the idle ticker's worst lateness. The runner
is warmed up first and ``gc`` is quiet (frozen and disabled) throughout, as in
bench_lateness.py.
"""

from __future__ import annotations

from typing import Any

import _payload_runner
import trio
from _common import MS, Config, quiet_gc, row, summary, ticking

from trio_runner import open_supervisor


async def idle(cfg: Config) -> list[float]:
    with quiet_gc():
        async with ticking() as ticker:
            await trio.sleep(cfg.n(2.0, 0.2))
    return ticker.samples


# Each job returns what it received: the caller drops it after the ticker
# stops, since freeing 5M ints on the loop is the application's cost, not ours.


async def _result(sup: Any, cfg: Config) -> Any:
    n = cfg.n(5_000_000, 200_000)
    result = await sup.run(("ints", n))
    assert len(result) == n
    return result


async def _event(sup: Any, cfg: Config) -> Any:
    n = cfg.n(50 << 20, 1 << 20)
    events: list[bytes] = []
    async with sup.stream(("event", n)) as task:
        async for event in task:
            assert len(event) == n
            events.append(event)
    return events


async def _request(sup: Any, cfg: Config, blob: bytes) -> Any:
    assert await sup.run(("size", blob)) == len(blob)
    return blob


SCENARIOS = [
    ("5M-int result", "result", _result),
    ("50 MiB event", "event", _event),
    ("60 MiB request", "request", _request),
]


async def scenario(cfg: Config, job: Any) -> list[float]:
    samples: list[float] = []
    async with open_supervisor(_payload_runner.PayloadBenchRunner, name="bench-payload") as sup:
        await sup.wait_ready()
        await sup.run(("size", b""))  # warm
        for _ in range(cfg.n(3, 1)):
            # Made before the ticker starts: filling 60 MiB is the application's cost.
            args = (b"\x5a" * cfg.n(60 << 20, 1 << 20),) if job is _request else ()
            with quiet_gc():
                async with ticking() as ticker:
                    received = await job(sup, cfg, *args)
                    await trio.sleep(0.02)  # the tail of the work, and the ticker's last ticks
                del received
            samples += ticker.samples
    return samples


async def run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    raw: dict[str, list[float]] = {"idle": await idle(cfg)}
    for name, _, job in SCENARIOS:
        raw[f"payload: {name}"] = await scenario(cfg, job)
    raw["idle (again)"] = await idle(cfg)
    idle_stats = summary(raw["idle"] + raw["idle (again)"], MS)
    rows: list[dict[str, Any]] = []
    for name, key, _ in SCENARIOS:
        stats = summary(raw[f"payload: {name}"], MS)
        added = stats["max"] - idle_stats["max"]
        p99_delta = stats["p99"] - idle_stats["p99"]
        rows.append(
            row(
                f"payload_{key}",
                f"1 ms ticker lateness during a {name} (worst / p99)",
                f"{stats['max']:.2f} / {stats['p99']:.2f} ms",
                f"idle {idle_stats['max']:.2f} / {idle_stats['p99']:.2f} ms",
                f"worst {added:+.2f} ms over idle, p99 {p99_delta:+.2f} ms",
                "worst ≤ idle + 1 ms",
                added <= 1.0,
                ours_stats=stats,
                idle_stats=idle_stats,
            )
        )
    return rows, {"payload_lateness": raw}
