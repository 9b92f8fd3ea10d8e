"""A stateful test: a RuleBasedStateMachine drives a real supervisor, step by step, against a model.

The supervisor lives in a trio loop hosted in a thread (hypothesis-trio is
broken with current Hypothesis); each rule calls into it with
``trio.from_thread.run``. The runner is a :class:`FaultyRunner` whose plan kills
incarnation *k* in its task number *t* for the pairs the machine drew, so the
model knows exactly which task crashes. The model tracks the incarnation, the
restarts, and each task's outcome; invariants compare it with the supervisor
after every step, and teardown checks the lifecycle and leftover processes.

``TRIO_RUNNER_STATEFUL_EXAMPLES`` sets the number of runs (CI default: 25, of up to 20 steps).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
import trio.from_thread
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from trio_runner import RestartPolicy, RunnerCrashed, RunnerState, TaskCancelled, open_supervisor
from trio_runner.testing import (
    BeforeEvent,
    Fault,
    FaultPlan,
    FaultyRunner,
    Signal,
    check_lifecycle,
    lifecycle,
    wait_no_leftover_processes,
)
from trio_runner.testing._invariants import runner_pids

from .runners import EchoRunner
from .test_property_support import TIMEOUTS, examples, real_process_settings

T = TypeVar("T")
POLICY = RestartPolicy(initial_delay=0, max_delay=0, max_restarts=1000)
MAX_INCARNATIONS = 4
MAX_TASKS = 4


class TrioHost:
    """A trio loop in a thread, serving calls from the Hypothesis thread.

    One long-lived task owns the supervisor (a nursery or cancel scope must be
    left by the task that entered it); each ``run`` is a task of its own.
    """

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        self._nursery: trio.Nursery | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._started.wait(10)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._started.set()
            await trio.sleep_forever()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def open_supervisor(self, plan: FaultPlan) -> tuple[Any, trio.Event, trio.Event]:
        """Start a task that owns a supervisor; returns it, the event that closes it, and 'closed'."""

        async def owner(task_status: trio.TaskStatus[tuple[Any, trio.Event, trio.Event]]) -> None:
            close, closed = trio.Event(), trio.Event()
            try:
                async with open_supervisor(
                    FaultyRunner, EchoRunner, plan, policy=POLICY, timeouts=TIMEOUTS
                ) as sup:
                    task_status.started((sup, close, closed))
                    await close.wait()
            finally:
                closed.set()

        async def start() -> tuple[Any, trio.Event, trio.Event]:
            assert self._nursery is not None
            return await self._nursery.start(owner)

        return self.run(start)

    def close(self) -> None:
        assert self._nursery is not None
        trio.from_thread.run_sync(self._nursery.cancel_scope.cancel, trio_token=self._token)
        self._thread.join(20)


class SupervisorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.host = TrioHost()
        self.sup: Any = None
        self.close_supervisor: Any = None
        self.closed: Any = None
        # The model.
        self.incarnation = 1
        self.restarts = 0
        self.tasks_in_incarnation = 0
        self.crash_at: set[tuple[int, int]] = set()
        self.outcomes: list[str] = []

    @initialize(
        crashes=st.sets(st.tuples(st.integers(1, MAX_INCARNATIONS), st.integers(1, MAX_TASKS)), max_size=4)
    )
    def open(self, crashes: set[tuple[int, int]]) -> None:
        self.crash_at = crashes
        plan = FaultPlan(
            tuple(
                Fault(Signal("SIGKILL"), BeforeEvent(task=task, event=0), incarnation=inc)
                for inc, task in sorted(crashes)
            )
        )

        self.sup, self.close_supervisor, self.closed = self.host.open_supervisor(plan)
        self.host.run(self.sup.wait_ready)

    def _next_task_crashes(self) -> bool:
        return (self.incarnation, self.tasks_in_incarnation + 1) in self.crash_at

    @rule(n=st.integers(1, 3))
    def run_task(self, n: int) -> None:
        crashes = self._next_task_crashes()

        async def go() -> str:
            try:
                with trio.fail_after(20):
                    result = await self.sup.run(("count", n))
            except RunnerCrashed:
                await self.sup.wait_ready()
                return "crashed"
            assert result == n
            return "result"

        outcome = self.host.run(go)
        self.outcomes.append(outcome)
        assert outcome == ("crashed" if crashes else "result"), (self.incarnation, self.tasks_in_incarnation)
        self._advance(crashes)

    def _advance(self, crashed: bool) -> None:
        """The model after a task that reached handle(): the next task, or the next incarnation."""
        if crashed:
            self.incarnation += 1
            self.restarts += 1
            self.tasks_in_incarnation = 0
        else:
            self.tasks_in_incarnation += 1

    @rule()
    def cancel_a_running_task(self) -> None:
        # Cancelled once its first event arrives, so it surely reached handle():
        # it counts as a task of this incarnation, and a fault planned for it
        # fires before that first event.
        crashes = self._next_task_crashes()

        async def go() -> str:
            try:
                with trio.fail_after(20):
                    async with self.sup.stream(("spin_until_cancelled", 1)) as task:
                        async for _ in task:
                            await task.cancel()
            except TaskCancelled:
                return "cancelled"
            except RunnerCrashed:
                await self.sup.wait_ready()
                return "crashed"
            return "result"

        outcome = self.host.run(go)
        self.outcomes.append(outcome)
        expected = "crashed" if crashes else "cancelled"
        assert outcome == expected, (self.incarnation, self.tasks_in_incarnation)
        self._advance(crashes)

    @precondition(lambda self: self.sup is not None)
    @invariant()
    def statistics_match_the_model(self) -> None:
        stats = self.host.run(self._stats)
        assert stats.incarnation == self.incarnation
        assert stats.restarts == self.restarts
        assert stats.state is RunnerState.READY
        assert (stats.in_flight, stats.pending) == (0, 0)

    async def _stats(self) -> Any:
        await trio.lowlevel.checkpoint()
        return self.sup.statistics()

    def teardown(self) -> None:
        try:
            if self.sup is not None:

                async def leave() -> None:
                    self.close_supervisor.set()
                    with trio.fail_after(20):
                        await self.closed.wait()
                    changes = await lifecycle(self.sup)
                    check_lifecycle(changes, policy=POLICY, runner_loads=True)
                    assert sum(type(c).__name__ == "BackingOff" for c in changes) == self.restarts
                    await wait_no_leftover_processes(runner_pids(changes))

                self.host.run(leave)
        finally:
            self.host.close()


SupervisorMachine.TestCase.settings = real_process_settings(examples("TRIO_RUNNER_STATEFUL_EXAMPLES", 25))
SupervisorMachine.TestCase.settings = SupervisorMachine.TestCase.settings.__class__(
    SupervisorMachine.TestCase.settings, stateful_step_count=20
)
TestSupervisorMachine = SupervisorMachine.TestCase
