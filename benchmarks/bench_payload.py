"""Loop lateness of a 1 ms ticker while big payloads cross between the supervisor and its runner.

Scenarios, each against the idle ticker measured in the same run:

- **5M-int result**: ``list(range(5_000_000))`` returned by ``handle`` (a 25 MB
  pickle of small objects: unpickling is the cost);
- **50 MiB event**: one ``bytes`` event of 50 MiB (copying is the cost);
- **60 MiB request**: a ``bytes`` request of 60 MiB (pickling and writing it).

Above ``trio_runner._payloads.LARGE`` (1 MiB; requests above 128 KiB) the
parent (un)pickles in a worker thread that hands the GIL back between chunks;
the goal is that none of these adds more than 1 ms to the idle ticker's worst
lateness. The runner
is warmed up first and ``gc`` is quiet (frozen and disabled) throughout, as in
bench_lateness.py.

On a shared, loaded machine the idle ticker's own worst is milliseconds, so a
second figure is kept for each scenario that preemption does not inflate: the
trio thread's longest task step in its own CPU time (``time.thread_time``),
the work the library did on the loop in one go. It does not see the loop
waiting for the GIL while a worker thread holds it in one C call; a third
figure does: the longest CPU time a payload thread spent between two of its
releases of the GIL (the pacer's ticks), which is how long it can keep the
loop waiting, load aside. And on Linux each tick's lateness is also taken
without the time the trio thread spent runnable but waiting for a CPU (its
run-queue delay, from ``/proc/thread-self/schedstat``): on two cores a
5M-int result keeps the runner and the worker thread busy, so the kernel
preempts the loop for milliseconds, which is neither the GIL nor the loop's
work. What is left is the loop's own work and its waits for the GIL, and a
wait for the GIL is long when the thread holding it is itself preempted
(which its CPU time, the row above, does not show): a diagnostic, no verdict.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import _payload_runner
import trio
import trio.abc
from _common import MS, Config, Ticker, quiet_gc, row, summary, ticking

from trio_runner import _pieces, open_supervisor

_SCHEDSTAT = "/proc/thread-self/schedstat"


def _run_queue_delay() -> float | None:
    """Seconds this thread has spent runnable, waiting for a CPU (Linux); None elsewhere."""
    try:
        with open(_SCHEDSTAT, "rb") as file:
            return int(file.read().split()[1]) / 1e9
    except OSError:
        return None


class OffCpuTicker(Ticker):
    """The 1 ms ticker; ``off_cpu`` also has each tick's lateness less its run-queue delay (Linux)."""

    def __init__(self) -> None:
        super().__init__()
        self.off_cpu: list[float] = []

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            target = trio.current_time() + self.period
            queued = _run_queue_delay()
            await trio.sleep_until(target)
            if self.recording:
                late = trio.current_time() - target
                self.samples.append(late)
                now = _run_queue_delay()
                if queued is not None and now is not None:
                    self.off_cpu.append(max(0.0, late - (now - queued)))


async def idle(cfg: Config) -> tuple[list[float], list[float]]:
    ticker = OffCpuTicker()
    with quiet_gc():
        async with ticking(ticker):
            await trio.sleep(cfg.n(2.0, 0.2))
    return ticker.samples, ticker.off_cpu


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


class LongestStep(trio.abc.Instrument):
    """The trio thread's longest task step, in its own CPU time, while ``recording``."""

    def __init__(self) -> None:
        self.recording = False
        self.longest = 0.0
        self._started = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.recording:
            self.longest = max(self.longest, time.thread_time() - self._started)


class LongestHold:
    """The longest CPU time a thread other than the trio thread ran between two pacer ticks.

    Patches ``Pacer.tick``, through which every payload thread releases the
    GIL; the time between two ticks of one thread bounds how long it held the
    GIL in one go (it may release it inside, e.g. in ``bytes.join``).
    """

    def __init__(self) -> None:
        self.longest = 0.0
        self._last = threading.local()  # each thread's last tick while this is entered
        self._tick = _pieces.Pacer.tick

    def __enter__(self) -> LongestHold:
        hold = self

        def tick(pacer: _pieces.Pacer) -> None:
            hold._tick(pacer)
            hold.mark()

        _pieces.Pacer.tick = tick  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        _pieces.Pacer.tick = self._tick  # type: ignore[method-assign]

    def mark(self) -> None:
        now = time.thread_time()
        last: float | None = getattr(self._last, "value", None)
        if last is not None and threading.current_thread() is not threading.main_thread():
            self.longest = max(self.longest, now - last)
        self._last.value = now


async def scenario(cfg: Config, job: Any) -> tuple[list[float], list[float], float, float]:
    samples: list[float] = []
    off_cpu: list[float] = []
    steps = LongestStep()
    trio.lowlevel.add_instrument(steps)
    try:
        with LongestHold() as hold:
            await _scenario(cfg, job, samples, off_cpu, steps)
    finally:
        trio.lowlevel.remove_instrument(steps)
    return samples, off_cpu, steps.longest, hold.longest


async def _scenario(
    cfg: Config, job: Any, samples: list[float], off_cpu: list[float], steps: LongestStep
) -> None:
    async with open_supervisor(_payload_runner.PayloadBenchRunner, name="bench-payload") as sup:
        await sup.wait_ready()
        await sup.run(("size", b""))  # warm
        for _ in range(cfg.n(3, 1)):
            # Made before the ticker starts: filling 60 MiB is the application's cost.
            args = (b"\x5a" * cfg.n(60 << 20, 1 << 20),) if job is _request else ()
            ticker = OffCpuTicker()
            with quiet_gc():
                async with ticking(ticker):
                    steps.recording = True
                    received = await job(sup, cfg, *args)
                    await trio.sleep(0.02)  # the tail of the work, and the ticker's last ticks
                    steps.recording = False
                del received
            samples += ticker.samples
            off_cpu += ticker.off_cpu


async def run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    raw: dict[str, list[float]] = {}
    off_cpu: dict[str, list[float]] = {}
    raw["idle"], off_cpu["idle"] = await idle(cfg)
    longest_step: dict[str, float] = {}
    longest_hold: dict[str, float] = {}
    for name, _, job in SCENARIOS:
        key = f"payload: {name}"
        raw[key], off_cpu[key], longest_step[name], longest_hold[name] = await scenario(cfg, job)
    raw["idle (again)"], off_cpu["idle (again)"] = await idle(cfg)
    idle_stats = summary(raw["idle"] + raw["idle (again)"], MS)
    idle_off_cpu = off_cpu["idle"] + off_cpu["idle (again)"]
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
        ours_off_cpu = off_cpu[f"payload: {name}"]
        if ours_off_cpu and idle_off_cpu:  # Linux: the run-queue delay is known
            worst, idle_worst = max(ours_off_cpu) * MS, max(idle_off_cpu) * MS
            rows.append(
                row(
                    f"payload_{key}_off_cpu",
                    f"1 ms ticker lateness during a {name}, less its wait for a CPU (worst)",
                    f"{worst:.2f} ms",
                    f"idle {idle_worst:.2f} ms",
                    f"worst {worst - idle_worst:+.2f} ms over idle",
                    "—",
                    None,
                    ours_worst_ms=worst,
                    idle_worst_ms=idle_worst,
                )
            )
        rows.append(
            row(
                f"payload_{key}_step",
                f"longest loop step during a {name} (trio thread's CPU time)",
                f"{longest_step[name] * MS:.2f} ms",
                "—",
                "—",
                "—",
                None,
                longest_step_ms=longest_step[name] * MS,
            )
        )
        rows.append(
            row(
                f"payload_{key}_hold",
                f"longest GIL hold by a payload thread during a {name} (its CPU time between two releases)",
                f"{longest_hold[name] * MS:.2f} ms",
                "—",
                "—",
                "—",
                None,
                longest_hold_ms=longest_hold[name] * MS,
            )
        )
    return rows, {
        "payload_lateness": raw,
        "payload_longest_step_ms": {k: v * MS for k, v in longest_step.items()},
        "payload_longest_hold_ms": {k: v * MS for k, v in longest_hold.items()},
        "payload_lateness_off_cpu": off_cpu,
    }
