"""The supervisor's deadlines, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, fields

from . import _validate as check

#: The child beats this many times per ``heartbeat`` period (so one or two late
#: beats never look like a frozen runner), and at least every
#: ``MAX_BEAT_INTERVAL`` seconds, as the ``Timeouts`` docs promise.
BEATS_PER_PERIOD = 4
MAX_BEAT_INTERVAL = 1.0


@dataclass(frozen=True)
class Timeouts:
    """Every deadline the supervisor enforces, in seconds.

    Args:
        startup: spawn until READY (``setup`` returned). Past it the runner is
            killed and the exit is ``STARTUP_FAILED``.
        cancel_send: a cancel (or a flow-control credit) not written to the
            child in this time means the runner has stopped reading: it is
            killed as ``HUNG``.
        heartbeat: no frame at all for this long means the runner is frozen
            (SIGSTOPped, GIL deadlock): killed as ``HUNG``. The child beats four
            times per period, and at least once a second.
        stall: a busy runner (a task started and its consumer keeping up) that
            sends nothing for this long is killed as ``HUNG``. None disables it.
        graceful: the Shutdown message until exit.
        terminate: SIGTERM to the process group until exit; then SIGKILL.
        kill: SIGKILL until reaped. Past it the supervisor reports the process
            as not reaped and stops waiting; it never loops forever.
    """

    startup: float = 400.0
    cancel_send: float = 2.0
    heartbeat: float = 10.0
    stall: float | None = None
    graceful: float = 3.0
    terminate: float = 5.0
    kill: float = 2.0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name != "stall" or value is not None:  # None: no stall limit
                check.seconds(f"Timeouts.{item.name}", value, above_zero=True)

    @property
    def heartbeat_interval(self) -> float:
        """How often the child beats."""
        return min(MAX_BEAT_INTERVAL, self.heartbeat / BEATS_PER_PERIOD)

    @property
    def shutdown_bound(self) -> float:
        """The longest a shutdown can take: graceful, then terminate, then kill."""
        return self.graceful + self.terminate + self.kill
