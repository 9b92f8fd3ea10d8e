"""The restart policy and its backoff/intensity decision: pure and synchronous.

Nothing here reads a clock or sleeps: every method takes ``now``, so the
supervisor decides with ``trio.current_time()`` and tests assert exact numbers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from . import _validate as check
from ._errors import ExitReason

Mode = Literal["permanent", "transient", "temporary"]
_MODES: tuple[Mode, ...] = ("permanent", "transient", "temporary")


@dataclass(frozen=True)
class RestartPolicy:
    """When and how fast a crashed runner is restarted.

    Args:
        mode: ``"permanent"`` restarts after every exit but a requested one;
            ``"transient"`` also leaves a clean, unasked exit 0 alone;
            ``"temporary"`` never restarts.
        initial_delay: the first backoff, in seconds.
        factor: each consecutive failure multiplies the delay by this.
        max_delay: the delay never exceeds this (before jitter).
        max_restarts: at most this many restarts in a row; the failure after the
            last one gives up with :class:`~trio_runner.RestartLimitExceeded`.
        reset_after: a runner READY for this long counts as healthy: the
            failure count and the delay start over.
        jitter: a fraction in ``[0, 1]``; each delay is multiplied by a random
            factor in ``[1 - jitter, 1 + jitter]``.

    The default schedule is 2, 4, 8, 16, 32, 60, 60, ... seconds, giving up
    after the 10th restart in a row fails.
    """

    mode: Mode = "permanent"
    initial_delay: float = 2.0
    factor: float = 2.0
    max_delay: float = 60.0
    max_restarts: int = 10
    reset_after: float = 60.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        check.one_of("RestartPolicy.mode", self.mode, _MODES)
        check.seconds("RestartPolicy.initial_delay", self.initial_delay)
        check.number("RestartPolicy.factor", self.factor, minimum=1)
        check.seconds("RestartPolicy.max_delay", self.max_delay)
        check.seconds("RestartPolicy.reset_after", self.reset_after, above_zero=True)
        check.number("RestartPolicy.jitter", self.jitter, maximum=1, what="a fraction")
        check.integer("RestartPolicy.max_restarts", self.max_restarts, minimum=0)
        if self.max_delay < self.initial_delay:
            raise ValueError(
                f"RestartPolicy.max_delay={self.max_delay!r} is below initial_delay="
                f"{self.initial_delay!r}: raise max_delay or lower initial_delay"
            )

    def restarts_after(self, reason: ExitReason) -> bool:
        """Whether this mode restarts after an exit for ``reason``."""
        if reason is ExitReason.REQUESTED or self.mode == "temporary":
            return False
        return not (self.mode == "transient" and reason is ExitReason.CLEAN_EXIT)

    def delay(self, failures: int) -> float:
        """The backoff before restart number ``failures`` in a row (1-based), before jitter."""
        try:
            return min(self.initial_delay * self.factor ** (failures - 1), self.max_delay)
        except OverflowError:  # a long crash loop with max_restarts set very high
            return self.max_delay


@dataclass(frozen=True)
class Decision:
    """What to do after an exit: stop, restart after ``delay``, or give up."""

    action: Literal["stop", "restart", "give_up"]
    delay: float = 0.0
    restarts: int = 0
    """The restarts made in a row before this exit."""


@dataclass
class RestartTracker:
    """The policy's memory: consecutive failures and when the runner became healthy."""

    policy: RestartPolicy
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0
    total_restarts: int = 0
    _ready_at: float | None = None

    def on_ready(self, now: float) -> None:
        self._ready_at = now

    def on_exit(self, reason: ExitReason, now: float) -> Decision:
        policy = self.policy
        ready_at, self._ready_at = self._ready_at, None
        if ready_at is not None and now - ready_at >= policy.reset_after:
            self.failures = 0
        restarts_in_a_row = self.failures
        if not policy.restarts_after(reason):
            return Decision("stop", restarts=restarts_in_a_row)
        if self.failures >= policy.max_restarts:
            return Decision("give_up", restarts=restarts_in_a_row)
        self.failures += 1
        self.total_restarts += 1
        delay = policy.delay(self.failures)
        if policy.jitter:
            delay *= self.rng.uniform(1 - policy.jitter, 1 + policy.jitter)
        return Decision("restart", delay=delay, restarts=restarts_in_a_row)
