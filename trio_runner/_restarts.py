"""What an incarnation's READY and its exit mean for the supervisor: the state, the log, the next restart.

:class:`Restarts` applies the :class:`~trio_runner.RestartPolicy` (through the
pure :class:`~trio_runner._policy.RestartTracker`) to each exit and says what
it decided: a log line, the new :class:`RunnerState`, and BackingOff or GaveUp
for the watchers. It only decides; the restart loop in ``_supervisor`` waits
out the backoff and spawns.
"""

from __future__ import annotations

import logging

from ._errors import ExitRecord, RestartLimitExceeded, RunnerCrashed
from ._exits import never_restarts
from ._group import GroupIncarnation
from ._incarnation import Incarnation
from ._lifecycle import Lifecycle
from ._options import Options
from ._policy import RestartTracker
from ._state import BackingOff, GaveUp, Ready, RunnerState

logger = logging.getLogger("trio_runner")


class Restarts:
    """The restart policy's memory, and what READY and each exit change in the lifecycle.

    Attributes:
        tracker: the consecutive failures and restarts so far.
    """

    def __init__(self, name: str, options: Options, lifecycle: Lifecycle) -> None:
        self.tracker = RestartTracker(options.policy)
        self._name = name
        self._mode = options.policy.mode
        self._raise_on_give_up = options.raise_on_give_up
        self._lifecycle = lifecycle

    def on_ready(self, inc: Incarnation | GroupIncarnation, now: float) -> None:
        """The runner (every rank of a group) is READY: tell the policy and the watchers, open the sender."""
        inc.ready = True
        inc.ready_at = inc.last_progress = now
        self.tracker.on_ready(now)
        startup = now - inc.spawned_at
        pids = " ".join(map(str, inc.pids))
        logger.info("runner %r ready (pid %s) after %.3f s", self._name, pids, startup)
        if not inc.stop_requested:
            self._lifecycle.set_state(RunnerState.READY)
        for rank, pid in enumerate(inc.pids):
            self._lifecycle.emit(Ready(inc.number, pid, startup, rank))
        inc.ready_event.set()
        inc.poke_watchdog()

    def decide(
        self, inc: Incarnation | GroupIncarnation, record: ExitRecord, now: float
    ) -> tuple[float | None, BaseException | None]:
        """Apply the policy to an exit: (the backoff before a restart or None to stop, the error to raise)."""
        lifecycle = self._lifecycle
        if never_restarts(inc.facts(), record):
            lifecycle.set_state(RunnerState.FAILED)
            lifecycle.emit(GaveUp(self.tracker.failures, record))
            return None, RunnerCrashed(record)
        decision = self.tracker.on_exit(record.reason, now)
        if decision.action == "stop":
            logger.info(
                "runner %r exited (%s); policy %r does not restart it",
                self._name,
                record.describe(),
                self._mode,
            )
            lifecycle.set_state(RunnerState.STOPPED)
            return None, None
        if decision.action == "give_up":
            logger.error(
                "runner %r exited (%s); giving up after %d restarts in a row",
                self._name,
                record.describe(),
                decision.restarts,
            )
            lifecycle.set_state(RunnerState.FAILED)
            lifecycle.emit(GaveUp(decision.restarts, record))
            failure = RestartLimitExceeded(decision.restarts, record) if self._raise_on_give_up else None
            return None, failure
        logger.warning(
            "runner %r exited (%s); restarting in %.3g s",
            self._name,
            record.describe(),
            decision.delay,
        )
        lifecycle.set_state(RunnerState.BACKING_OFF)
        lifecycle.emit(BackingOff(decision.delay, self.tracker.total_restarts))
        return decision.delay, None
