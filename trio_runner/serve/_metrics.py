"""What the server knows about its runner beyond ``statistics()``: crashes, backoff, tokens, loop lateness.

One :class:`ServeMetrics` per server. Its two tasks follow the supervisor's
lifecycle stream and time the event loop; everything else is plain counters
the request handlers bump. The Prometheus text is rendered at scrape time from
these counters and a fresh ``statistics()`` snapshot, so nothing can drift.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .._errors import ExitReason, ExitRecord
from .._state import BackingOff, Exited, GaveUp, RunnerState
from .._supervisor import Supervisor

LATENESS_INTERVAL = 0.005


class ServeMetrics:
    """Counters for one server over one supervisor.

    Attributes:
        tokens_generated: tokens received from the runner, for any request.
        requests: finished requests by ``(endpoint, outcome)``.
        crashes: runner exits that nobody asked for, by exit reason.
        worst_lateness: the event loop's worst lateness so far, in seconds.
        backoff_until: when the current backoff ends (``trio.current_time()``), if backing off.
        gave_up: the exit that made the policy give up, once it has.
    """

    def __init__(self, supervisor: Supervisor[Any, Any, Any]) -> None:
        self.supervisor = supervisor
        self.tokens_generated = 0
        self.requests: Counter[tuple[str, str]] = Counter()
        self.crashes: Counter[str] = Counter()
        self.worst_lateness = 0.0
        self.backoff_until: float | None = None
        self.gave_up: ExitRecord | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self))

    async def follow_lifecycle(self) -> None:
        """Count crashes and track the backoff from ``sup.watch()``; runs until the supervisor stops."""
        async for change in self.supervisor.watch(replay=True):
            if isinstance(change, Exited):
                self.backoff_until = None
                if change.exit.reason is not ExitReason.REQUESTED:
                    self.crashes[change.exit.reason.value] += 1
            elif isinstance(change, BackingOff):
                self.backoff_until = trio.current_time() + change.delay
            elif isinstance(change, GaveUp):
                self.backoff_until = None
                self.gave_up = change.exit

    async def measure_lateness(self, interval: float = LATENESS_INTERVAL) -> None:
        """Sleep ``interval`` over and over and keep the worst lateness; runs until cancelled."""
        while True:
            start = time.perf_counter()
            await trio.sleep(interval)
            late = time.perf_counter() - start - interval
            self.worst_lateness = max(self.worst_lateness, late)

    def retry_after(self) -> int:
        """Whole seconds a client should wait: what is left of the backoff, at least 1."""
        if self.backoff_until is None:
            return 1
        return max(1, math.ceil(self.backoff_until - trio.current_time()))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self._registry)


class _Collector(Collector):
    def __init__(self, metrics: ServeMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        m = self.metrics
        stats = m.supervisor.statistics()
        yield GaugeMetricFamily(
            "trio_runner_up",
            "1 if the runner is READY and serving, else 0",
            value=stats.state is RunnerState.READY,
        )
        state = GaugeMetricFamily(
            "trio_runner_state", "the supervisor's state (1 for the current one)", labels=["state"]
        )
        for member in RunnerState:
            state.add_metric([member.value], float(member is stats.state))
        yield state
        yield GaugeMetricFamily(
            "trio_runner_incarnation", "runner processes spawned so far", value=stats.incarnation
        )
        yield CounterMetricFamily("trio_runner_restarts", "runner restarts made", value=stats.restarts)
        crashes = CounterMetricFamily(
            "trio_runner_crashes", "runner exits nobody asked for, by exit reason", labels=["reason"]
        )
        for reason in ExitReason:
            if reason is not ExitReason.REQUESTED:
                crashes.add_metric([reason.value], m.crashes[reason.value])
        yield crashes
        yield GaugeMetricFamily(
            "trio_runner_in_flight_tasks",
            "tasks delivered to the runner and not finished",
            value=stats.in_flight,
        )
        yield GaugeMetricFamily(
            "trio_runner_pending_tasks", "tasks waiting to be delivered to the runner", value=stats.pending
        )
        yield CounterMetricFamily(
            "trio_runner_tokens_generated", "tokens received from the runner", value=m.tokens_generated
        )
        yield GaugeMetricFamily(
            "trio_runner_loop_lateness_max_seconds",
            "the event loop's worst lateness since the server started",
            value=m.worst_lateness,
        )
        requests = CounterMetricFamily(
            "trio_runner_requests",
            "finished API requests by endpoint and outcome",
            labels=["endpoint", "outcome"],
        )
        for (endpoint, outcome), count in sorted(m.requests.items()):
            requests.add_metric([endpoint, outcome], count)
        yield requests
