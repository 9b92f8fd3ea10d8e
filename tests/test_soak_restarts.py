"""Soak: 10,000 crash/restart cycles leak no fds, no threads and at most 5 MB of parent memory.

Not run by default (it takes about 15 minutes): set ``TRIO_RUNNER_SOAK=1``.
``TRIO_RUNNER_SOAK_CYCLES`` changes the number of cycles. Each cycle runs a task
that the runner dies in (``os._exit(1)`` before its first event, in every
incarnation), then waits for the restarted runner to be READY.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from trio_runner import RestartPolicy, RunnerCrashed, open_supervisor
from trio_runner.testing import BeforeEvent, Exit, Fault, FaultPlan, FaultyRunner, monitor_lateness

from .runners import EchoRunner
from .test_property_support import TIMEOUTS

pytestmark = pytest.mark.skipif(
    os.environ.get("TRIO_RUNNER_SOAK") != "1", reason="the soak runs only with TRIO_RUNNER_SOAK=1"
)

CYCLES = int(os.environ.get("TRIO_RUNNER_SOAK_CYCLES", "10000"))
WARM_UP = 100
RSS_GROWTH_BOUND = 5 * 1024 * 1024


def _snapshot() -> tuple[int, int, int]:
    gc.collect()
    proc = psutil.Process()
    return proc.num_fds(), threading.active_count(), proc.memory_info().rss


@pytest.fixture
def quiet_restarts() -> Iterator[None]:
    """Keep the supervisor's per-restart WARNING out of pytest's log capture.

    pytest keeps every captured record of a test in memory (about 1 KB each), so
    10,000 restart warnings alone would grow this process by some 10 MB: the
    soak would measure pytest, not the supervisor.
    """
    log = logging.getLogger("trio_runner")
    level = log.level
    log.setLevel(logging.ERROR)
    yield
    log.setLevel(level)


@pytest.mark.usefixtures("quiet_restarts")
async def test_ten_thousand_crash_restart_cycles_leak_no_fds_threads_or_memory() -> None:
    plan = FaultPlan((Fault(Exit(1), BeforeEvent(task=1, event=0), incarnation=None),))
    policy = RestartPolicy(initial_delay=0, max_delay=0, max_restarts=CYCLES + WARM_UP + 10)
    started = time.monotonic()
    async with monitor_lateness() as monitor:
        async with open_supervisor(FaultyRunner, EchoRunner, plan, policy=policy, timeouts=TIMEOUTS) as sup:

            async def cycle() -> None:
                with pytest.raises(RunnerCrashed):
                    await sup.run(("count", 1))
                await sup.wait_ready()

            for _ in range(WARM_UP):
                await cycle()
            fds0, threads0, rss0 = _snapshot()
            for i in range(CYCLES):
                await cycle()
                if i % 1000 == 999:
                    fds, threads, rss = _snapshot()
                    print(
                        f"cycle {i + 1}: fds {fds - fds0:+d} threads {threads - threads0:+d} "
                        f"rss {(rss - rss0) / 1e6:+.2f} MB, {time.monotonic() - started:.0f} s"
                    )
            fds1, threads1, rss1 = _snapshot()
            assert sup.statistics().restarts == CYCLES + WARM_UP
    print(
        f"soak: {CYCLES} cycles in {time.monotonic() - started:.0f} s; fds {fds1 - fds0:+d}, threads "
        f"{threads1 - threads0:+d}, rss {(rss1 - rss0) / 1e6:+.2f} MB, worst lateness {monitor.worst:.3f} s"
    )
    assert fds1 - fds0 <= 2
    assert threads1 - threads0 <= 2
    assert rss1 - rss0 <= RSS_GROWTH_BOUND
