"""Shared helpers for the benchmarks: statistics, the 1 ms ticker, GC control, bare children, rows."""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing
import os
import platform
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import _children
import trio

from trio_runner import Exited, Ready, RestartPolicy

T = TypeVar("T")

MS = 1e3
US = 1e6


@dataclass
class Config:
    """Iteration counts; ``smoke`` shrinks every one of them so the suite runs in seconds."""

    smoke: bool = False

    def n(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``samples``."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(samples: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """Median, p99, min, max and count, scaled (e.g. by ``MS``)."""
    return {
        "n": len(samples),
        "median": percentile(samples, 50) * scale,
        "p99": percentile(samples, 99) * scale,
        "min": (min(samples) if samples else math.nan) * scale,
        "max": (max(samples) if samples else math.nan) * scale,
    }


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """gc.freeze() + gc.disable() around a lateness measurement, applied to ours and the baselines alike."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


class Ticker:
    """A 1 ms ticker; each tick records how late it woke (``trio.sleep_until`` lateness)."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.samples: list[float] = []
        self.recording = False

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        samples = self.samples
        while True:
            target = trio.current_time() + self.period
            await trio.sleep_until(target)
            if self.recording:
                samples.append(trio.current_time() - target)


@contextlib.asynccontextmanager
async def ticking(ticker: Ticker | None = None) -> AsyncIterator[Ticker]:
    """Run a :class:`Ticker` (or ``ticker``), recording, for the duration of the block."""
    ticker = Ticker() if ticker is None else ticker
    async with trio.open_nursery() as nursery:
        await nursery.start(ticker.run)
        ticker.recording = True
        try:
            yield ticker
        finally:
            ticker.recording = False
            nursery.cancel_scope.cancel()


@dataclass
class BareChild:
    """A BASELINE child started by plain multiprocessing, with a ready handshake over a Pipe."""

    process: Any
    conn: Any
    extra: list[Any] = field(default_factory=lambda: [])

    @property
    def pid(self) -> int:
        return self.process.pid

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        process = self.process
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, 9)
        await trio.to_thread.run_sync(process.join)
        process.close()


#: Restart at once, for ever: benchmarks that kill runners on purpose, over and over.
RESTART = RestartPolicy(initial_delay=0, max_delay=0, max_restarts=1_000_000)


async def next_change(changes: AsyncIterator[Any], kind: type[T]) -> T:
    """The next lifecycle change of type ``kind`` from a ``sup.watch()`` iterator."""
    async for change in changes:
        if isinstance(change, kind):
            return change
    raise RuntimeError(f"the supervisor stopped before a {kind.__name__} change")


async def restart_once(sup: Any, changes: AsyncIterator[Any]) -> float:
    """SIGKILL the ready runner; seconds from its exit being seen to the next ``Ready``."""
    pid = sup.statistics().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await next_change(changes, Exited)
    exited_at = time.perf_counter()
    await next_change(changes, Ready)
    return time.perf_counter() - exited_at


async def start_bare(
    target: Any, *args: Any, method: str = "spawn", blocking: bool = False
) -> tuple[BareChild, float]:
    """Start ``target(conn, *args)``; return the child and the seconds from start() to its "ready".

    ``blocking=True`` calls ``Process.start`` on the trio thread, as the original design did.
    """
    ctx = multiprocessing.get_context(method)
    parent_conn, child_conn = ctx.Pipe()
    process = ctx.Process(target=target, args=(child_conn, *args), daemon=True)
    started = time.perf_counter()
    if blocking:
        process.start()
    else:
        await trio.to_thread.run_sync(process.start)
    child_conn.close()
    await trio.lowlevel.wait_readable(parent_conn.fileno())
    message = parent_conn.recv_bytes()
    elapsed = time.perf_counter() - started
    assert message == b"ready", message
    return BareChild(process, parent_conn), elapsed


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    import trio_runner

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "trio": trio.__version__,
        "trio_parallel": version("trio-parallel"),
        "trio_runner": trio_runner.__version__,
    }
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    return info


def row(
    key: str,
    metric: str,
    ours: str,
    baselines: str,
    ratio: str,
    goal: str,
    met: bool | None,
    **data: Any,
) -> dict[str, Any]:
    """One line of the RESULTS.md table, with the numbers behind it for results.json."""
    return {
        "key": key,
        "metric": metric,
        "ours": ours,
        "baselines": baselines,
        "ratio": ratio,
        "goal": goal,
        "met": met,
        "data": data,
    }


def fmt_ms(stats: dict[str, float]) -> str:
    return f"{stats['median']:.2f} / {stats['p99']:.2f} ms"


def fmt_us(stats: dict[str, float]) -> str:
    return f"{stats['median']:.0f} / {stats['p99']:.0f} µs"


def ensure_child_import_path() -> None:
    """Spawned children import ``_children`` by name: keep benchmarks/ on their sys.path."""
    here = os.path.dirname(os.path.abspath(_children.__file__))
    pythonpath = os.environ.get("PYTHONPATH", "")
    if here not in pythonpath.split(os.pathsep):
        # The forkserver's sys.path is fixed when it launches; the environment reaches it.
        os.environ["PYTHONPATH"] = here + (os.pathsep + pythonpath if pythonpath else "")
