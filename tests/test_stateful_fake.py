"""The supervisor's state machine against a model, over the in-memory fake worker under a MockClock.

The collaboration layer's stateful test. Hypothesis draws a restart policy and
a list of commands (submit several tasks at once, some ``retry=True``; let time
pass; crash the runner from outside, READY or still starting; freeze it until
the heartbeat watchdog kills it; cancel one task, by its caller's scope or
through its handle; ``cancel_all``); a driver applies each command to a real
:class:`Supervisor` whose runner is the fake of ``tests/fakes.py``, and to a
small model of the supervisor and of the fake child (which serves its tasks one
at a time, in the order it got them). After every command, once every task is
blocked, the two must agree: each consumer's outcome, the statistics (state,
incarnation, restarts, consecutive failures, in flight, pending, completed),
every backoff with its exact time, and every spawn time. The fake's options are
drawn too: a late death watch (sends race an unnoticed death), a full socket
(every task frame takes the sender task's path), a small flow-control window
that the fake keeps to, a setup time, a stall limit (a task that outlasts it
gets its runner killed as HUNG). The example ends by leaving the
supervisor's block with tasks still in flight.

Consumers come in four kinds: ``run`` (``sup.run``), ``stream`` (reads every
event), ``stop`` (leaves its ``stream`` block after ``k`` events) and ``idle``
(never reads). Each records what it saw; every task gets exactly one outcome.

Nothing here touches a real process, so thousands of examples are affordable:
``TRIO_RUNNER_FAKE_STATEFUL_EXAMPLES`` sets how many (default 1,000: 6 to 30 s
on a shared 2-core machine under a load of 2 to 4; 20,000 took under 6 minutes). Trio's
Hypothesis plugin makes the scheduler deterministic, so a failure replays.
Each example runs in a ``trio.run`` of its own with a fresh
``MockClock(autojump_threshold=0)``, so every example starts at time 0.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any, Literal

import trio
import trio.testing
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from trio_runner import (
    RestartLimitExceeded,
    RestartPolicy,
    RunnerCrashed,
    RunnerState,
    RunnerUnavailable,
    TaskCancelled,
    TaskFailed,
    Timeouts,
)
from trio_runner._state import BackingOff, GaveUp, Stopped
from trio_runner._tasks import TaskHandle

from .fakes import FAKE_PID_BASE, TICK, FakeFactory, Script, exited, killed_by, open_fake_supervisor

HEARTBEAT = Timeouts().heartbeat
# Every other time here is a multiple of 1/16 s; a 1/64 makes a stall never tie with a task's end.
STALL = 2.5 + 1 / 64
SHUTDOWN_ESCALATION = Timeouts().graceful + Timeouts().terminate
EXAMPLES = int(os.environ.get("TRIO_RUNNER_FAKE_STATEFUL_EXAMPLES", "1000"))

Kind = Literal["run", "stream", "stop", "idle"]

# -- commands: frozen, with reprs that are valid Python, so a failure prints a program ----------------


@dataclass(frozen=True)
class Job:
    """One task to submit. ``length``: seconds of sleep (``run``) or events, one per TICK (the others)."""

    kind: Kind
    length: int
    retry: bool = False
    k: int = 0
    """``stop`` only: leave the block after this many events (fewer than ``length``)."""

    def request(self, index: int) -> tuple[Any, ...]:
        if self.kind == "run":
            return ("sleep", float(self.length), index) if self.length else ("echo", index)
        return ("tick", self.length, index)

    def duration(self, window: int) -> float:
        """How long the fake child runs it; for ever if its consumer never reads and its window fills."""
        if self.kind == "idle" and self.length > window:
            return float("inf")
        return self.length * (1.0 if self.kind == "run" else TICK)


@dataclass(frozen=True)
class Submit:
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class Advance:
    seconds: float


@dataclass(frozen=True)
class Crash:
    """The runner dies from outside (if one is READY): killed by ``signum``, or exits with ``code``."""

    signum: int | None = signal.SIGKILL
    code: int | None = None


@dataclass(frozen=True)
class Freeze:
    """The runner freezes (SIGSTOP from outside): no heartbeat, no work, until the watchdog kills it."""


@dataclass(frozen=True)
class Cancel:
    """Cancel the ``which``-th consumer still running (modulo their number)."""

    which: int
    how: Literal["scope", "handle"] = "scope"


@dataclass(frozen=True)
class CancelAll:
    pass


Command = Submit | Advance | Crash | Freeze | Cancel | CancelAll

jobs = st.one_of(
    st.builds(Job, kind=st.just("run"), length=st.integers(0, 4), retry=st.booleans()),
    st.builds(Job, kind=st.sampled_from(["stream", "idle"]), length=st.integers(0, 4), retry=st.booleans()),
    st.integers(2, 4).flatmap(
        lambda n: st.builds(
            Job, kind=st.just("stop"), length=st.just(n), retry=st.booleans(), k=st.integers(1, n - 1)
        )
    ),
)
commands: st.SearchStrategy[Command] = st.one_of(
    st.builds(Submit, st.lists(jobs, min_size=1, max_size=4).map(tuple)),
    st.builds(Advance, st.sampled_from([0.5, 1.0, 2.0, 3.0, 7.0, 12.0])),
    st.one_of(
        st.builds(Crash, signum=st.sampled_from([signal.SIGKILL, signal.SIGSEGV])),
        st.builds(Crash, signum=st.none(), code=st.sampled_from([0, 3])),
    ),
    st.builds(Cancel, st.integers(0, 7), st.sampled_from(["scope", "handle"])),
    st.just(CancelAll()),
    st.just(Freeze()),
)


@st.composite
def policies(draw: st.DrawFn) -> RestartPolicy:
    initial = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
    return RestartPolicy(
        mode=draw(st.sampled_from(["permanent", "permanent", "transient", "temporary"])),
        initial_delay=initial,
        factor=draw(st.sampled_from([1.0, 1.5, 2.0, 3.0])),
        max_delay=draw(st.sampled_from([initial, initial * 2, max(initial, 8.0)])),
        max_restarts=draw(st.integers(0, 4)),
        reset_after=draw(st.sampled_from([2.0, 5.0, 60.0])),
    )


# -- the model ------------------------------------------------------------------------------------------


@dataclass
class ModelTask:
    index: int  # the consumer's index; also the result value
    id: int  # the supervisor's task id
    job: Job
    outcome: str | None = None  # the task's own outcome, as its handle would say
    cancel_sent: bool = False
    released: bool = False  # the consumer left its block before the outcome
    crashed: bool = False  # a retry=True task waiting out a crash
    read: int = 0  # events a ``stop`` consumer read in earlier attempts


@dataclass
class Model:
    policy: RestartPolicy
    raise_on_give_up: bool
    notice_delay: float = 0.0  # the death watch wakes this long after the child died
    window: int = 8192  # events in flight per task
    stall: float | None = None  # Timeouts.stall
    progress: float = 0.0  # the supervisor's last sign of progress: a task sent, an event, an outcome
    now: float = 0.0
    state: RunnerState = RunnerState.READY
    incarnation: int = 1
    restarts: int = 0
    failures: int = 0
    ready_at: float | None = 0.0  # when the current runner became READY
    setup_time: float = 0.0  # spawn -> READY
    ready_due: float = 0.0  # when a STARTING runner becomes READY
    next_spawn: float = 0.0
    completed: int = 0
    gave_up_raising: bool = False
    gave_up_at: float | None = None
    stopped_at: float | None = None  # when the lifecycle says Stopped
    tasks: dict[int, ModelTask] = field(default_factory=dict[int, ModelTask])
    pending: list[int] = field(default_factory=list[int])  # task ids, in the order they will be sent
    child: list[int] = field(default_factory=list[int])  # delivered to the child; the first one runs
    head_start: float = 0.0
    seen: dict[int, str | None] = field(default_factory=dict[int, str | None])  # consumer -> what it saw
    backoffs: list[tuple[float, float]] = field(default_factory=list[tuple[float, float]])
    spawns: list[float] = field(default_factory=lambda: [0.0])
    # The child died and the supervisor has not noticed yet: (when, an exit 0, the task it ran, its events).
    dead: tuple[float, bool, int | None, int] | None = None
    # The child froze: (when the watchdog kills it, the task it ran, its events).
    frozen: tuple[float, int | None, int, float] | None = None

    # -- tasks ------------------------------------------------------------

    def submit(self, index: int, job: Job) -> None:
        if self.state in (RunnerState.STOPPED, RunnerState.FAILED):
            self.seen[index] = "RunnerUnavailable"
            return
        self.seen[index] = None
        task = ModelTask(index, len(self.tasks) + 1, job)
        self.tasks[task.id] = task
        if self.state is RunnerState.READY:
            self.deliver([task.id])
        else:
            self.pending.append(task.id)

    def deliver(self, ids: list[int]) -> None:
        self.progress = self.now
        if not self.child:
            self.head_start = self.now
        self.child.extend(ids)
        self.settle()

    def finish(self, task: ModelTask, outcome: str) -> None:
        assert task.outcome is None
        task.outcome = outcome
        self.completed += 1
        if not task.released and task.job.kind != "idle":
            self.seen[task.index] = outcome

    def task_of(self, index: int) -> ModelTask | None:
        return next((t for t in self.tasks.values() if t.index == index), None)

    def cancel(self, index: int, how: str) -> None:
        task = self.task_of(index)
        if how == "scope" or task is None or task.job.kind == "run":
            self.seen[index] = "cancelled"
            if task is None or task.outcome is not None:
                return
            task.released = True
        if task is None or task.outcome is not None or task.cancel_sent:
            return
        if task.id in self.pending:
            self.pending.remove(task.id)
            self.finish(task, "TaskCancelled")
        else:
            task.cancel_sent = True
            self.settle()

    def cancel_all(self) -> None:
        for task_id in self.pending:
            self.finish(self.tasks[task_id], "TaskCancelled")
        self.pending.clear()
        for task_id in self.child:
            self.tasks[task_id].cancel_sent = True
        self.settle()

    def live_consumers(self) -> list[int]:
        return sorted(index for index, seen in self.seen.items() if seen is None)

    # -- the fake child and the clock ----------------------------------------------

    def settle(self) -> None:
        """Run the fake child and the restart loop up to ``now``."""
        while True:
            if self.frozen is not None:
                hung_at, running, delivered, _ = self.frozen
                kill_at = min(hung_at, self.stall_at())
                if self.now < kill_at:
                    return
                self.frozen = None
                self.dead = (kill_at, False, running, delivered)  # HUNG: killed
                event("the watchdog killed a frozen runner")
                continue
            if self.dead is not None:  # a dead child does nothing; the supervisor notices in time
                if self.now < self.dead[0] + self.notice_delay:
                    return
                self.exit_noticed()
                continue
            if self.state is RunnerState.BACKING_OFF:
                if self.next_spawn > self.now:
                    return
                self.spawn()
                continue
            if self.state is RunnerState.STARTING:
                if self.ready_due > self.now:
                    return
                self.state = RunnerState.READY
                self.ready_at = self.progress = self.ready_due
                ids, self.pending = self.pending, []
                if ids:
                    self.deliver(ids)
                continue
            if self.state is not RunnerState.READY or not self.child:
                return
            head = self.tasks[self.child[0]]
            if head.cancel_sent:  # the child cancels it at once, or never starts it
                self.child.pop(0)
                self.head_start = self.progress = self.now  # the next one starts now
                self.finish(head, "TaskCancelled")
                continue
            end = self.head_start + head.job.duration(self.window)
            leave = None
            if head.job.kind == "stop" and not head.released:
                leave = self.head_start + (head.job.k - head.read) * TICK
            when = end if leave is None else min(end, leave)
            stall_at = self.stall_at()
            if stall_at < when and stall_at <= self.now:
                # No progress for Timeouts.stall: the watchdog kills the runner (HUNG).
                self.dead = (stall_at, False, head.id, int((stall_at - self.head_start) / TICK))
                event("the watchdog killed a stalled runner")
                continue
            if when > self.now:
                return
            self.child.pop(0)
            self.head_start = self.progress = when
            if leave is not None and leave < end:
                self.seen[head.index] = "left"
                head.released = True
                self.finish(head, "TaskCancelled")
            else:
                self.finish(head, "result")

    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        # Step through spawns and task ends in order.
        while True:
            self.now = min(target, self.next_event())
            self.settle()
            if self.now >= target:
                return

    def stall_at(self) -> float:
        """When the watchdog kills a runner that makes no progress (inf: never, or not busy)."""
        if (
            self.stall is None
            or self.state is not RunnerState.READY
            or not self.child
            or self.dead is not None
        ):
            return float("inf")
        if self.frozen is None:
            running, cutoff = self.child[0], self.now
        else:
            _, running, _, cutoff = self.frozen  # it emitted nothing since it froze
        last = self.progress
        if running is not None and self.tasks[running].job.kind != "run":
            job = self.tasks[running].job
            emitted = min(job.length, int((cutoff - self.head_start) / TICK))
            if job.kind == "idle" and emitted >= self.window:
                return float("inf")  # its window is full: it waits for its consumer, not for the runner
            if emitted:
                last = max(last, self.head_start + emitted * TICK)
        return last + self.stall

    def next_event(self) -> float:
        if self.frozen is not None:
            return min(self.frozen[0], self.stall_at())
        if self.dead is not None:
            return self.dead[0] + self.notice_delay
        if self.state is RunnerState.BACKING_OFF:
            return self.next_spawn
        if self.state is RunnerState.STARTING:
            return self.ready_due
        if self.state is RunnerState.READY and self.child:
            head = self.tasks[self.child[0]]
            end = self.head_start + head.job.duration(self.window)
            if head.job.kind == "stop" and not head.released:
                end = min(end, self.head_start + (head.job.k - head.read) * TICK)
            return max(min(end, self.stall_at()), self.now)
        return float("inf")

    def spawn(self) -> None:
        self.now = max(self.now, self.next_spawn)
        self.incarnation += 1
        self.spawns.append(self.next_spawn)
        self.state = RunnerState.STARTING
        self.ready_due = self.next_spawn + self.setup_time
        self.child = []

    def crash(self, clean: bool) -> None:
        """The child dies now; the supervisor notices ``notice_delay`` later."""
        assert self.state in (RunnerState.READY, RunnerState.STARTING) and self.dead is None
        ready = self.state is RunnerState.READY
        running = self.child[0] if self.child else None
        # An exit before READY is a startup failure, whatever its code.
        self.dead = (self.now, clean and ready, running, int((self.now - self.head_start) / TICK))
        self.settle()

    def alive(self) -> bool:
        """Whether a runner process runs and works (so it can crash or freeze)."""
        running = self.state in (RunnerState.READY, RunnerState.STARTING)
        return running and self.dead is None and self.frozen is None

    def freeze(self, last_frame: float) -> None:
        """The child stops doing anything; the watchdog kills it ``heartbeat`` after its last frame."""
        assert self.state in (RunnerState.READY, RunnerState.STARTING) and self.dead is None
        running = self.child[0] if self.child else None
        delivered = int((self.now - self.head_start) / TICK)
        self.frozen = (last_frame + HEARTBEAT, running, delivered, self.now)
        self.settle()

    def exit_noticed(self) -> None:
        assert self.dead is not None
        _, clean, running, delivered = self.dead
        self.dead = None
        requeued: list[int] = []
        for task_id in self.child:
            task = self.tasks[task_id]
            if task.cancel_sent:
                self.finish(task, "TaskCancelled")
            elif task_id != running:  # delivered, never started: delivered again
                requeued.append(task_id)
            elif task.job.retry:
                if task.job.kind == "stop":
                    task.read += delivered
                task.crashed = True
                requeued.append(task_id)
            else:
                self.finish(task, "RunnerCrashed")
        self.child = []
        self.pending = sorted(requeued) + self.pending
        if self.ready_at is not None and self.now - self.ready_at >= self.policy.reset_after:
            self.failures = 0
        self.ready_at = None
        mode = self.policy.mode
        if mode == "temporary" or (mode == "transient" and clean):
            self.state = RunnerState.STOPPED
            self.stopped_at = self.now
            self.fail_waiting()
        elif self.failures >= self.policy.max_restarts:
            self.state = RunnerState.FAILED
            self.gave_up_raising = self.raise_on_give_up
            self.gave_up_at = self.stopped_at = self.now
            self.fail_waiting()
        else:
            self.failures += 1
            self.restarts += 1
            p = self.policy
            delay = min(p.initial_delay * p.factor ** (self.failures - 1), p.max_delay)
            self.backoffs.append((self.now, delay))
            self.state = RunnerState.BACKING_OFF
            self.next_spawn = self.now + delay

    def fail_waiting(self) -> None:
        """The runner will not come back: a retry=True task waiting out a crash ends with that crash."""
        for task_id in self.pending:
            task = self.tasks[task_id]
            self.finish(task, "RunnerCrashed" if task.crashed else "RunnerUnavailable")
        self.pending.clear()

    def close(self) -> None:
        """Leave the block now: every task still waiting ends with RunnerUnavailable, and the runner stops."""
        if self.state not in (RunnerState.READY, RunnerState.STARTING, RunnerState.BACKING_OFF):
            return
        for task in self.tasks.values():
            if task.outcome is None:
                self.finish(task, "RunnerUnavailable")
        self.pending.clear()
        self.child.clear()
        if self.frozen is not None:
            # Shutdown and SIGTERM go unheeded; SIGKILL follows graceful + terminate.
            self.stopped_at = self.now + SHUTDOWN_ESCALATION + self.notice_delay
        elif self.dead is not None:
            self.stopped_at = max(self.now, self.dead[0] + self.notice_delay)
        elif self.state is RunnerState.STARTING:
            self.stopped_at = self.ready_due + self.notice_delay  # the fake finishes setup, then obeys
        elif self.state is RunnerState.READY:
            self.stopped_at = self.now + self.notice_delay  # it obeys Shutdown at once
        else:
            self.stopped_at = self.now
        self.state = RunnerState.STOPPED

    @property
    def in_flight(self) -> int:
        return len(self.child)


# -- the system -----------------------------------------------------------------------------------------


@dataclass
class Consumer:
    index: int
    job: Job
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    handle: TaskHandle[int, int] | None = None
    seen: list[str] = field(default_factory=list[str])
    events: int = 0

    async def consume(self, sup: Any, task_status: trio.TaskStatus[None]) -> None:
        job = self.job
        request = job.request(self.index)
        with self.scope:
            # Started first: the submit below runs before the driver resumes, with no checkpoint between.
            task_status.started()
            try:
                if job.kind == "run":
                    value = await sup.run(request, retry=job.retry)
                    assert value == self.index
                    self.seen.append("result")
                    return
                async with sup.stream(request, retry=job.retry) as handle:
                    self.handle = handle
                    if job.kind == "idle":
                        await trio.sleep_forever()
                    attempt, expected = handle.attempt, 0
                    async for event in handle:
                        if handle.attempt != attempt:  # a retry streams its events again from the start
                            attempt, expected = handle.attempt, 0
                        assert event == expected, (event, expected)
                        expected += 1
                        self.events += 1
                        if job.kind == "stop" and self.events >= job.k:
                            self.seen.append("left")
                            return
                    assert handle.result == self.index
                    assert expected == job.length  # the successful attempt streamed every event
                    self.seen.append("result")
            except (TaskCancelled, RunnerCrashed, RunnerUnavailable, TaskFailed) as exc:
                self.seen.append(type(exc).__name__)
        if self.scope.cancelled_caught:
            self.seen.append("cancelled")


class Driver:
    def __init__(
        self,
        policy: RestartPolicy,
        raise_on_give_up: bool,
        fake: FakeFactory,
        window: int,
        stall: float | None,
    ) -> None:
        setup = fake.scripts[0].setup_time
        # The driver starts once the first runner is READY.
        self.model = Model(
            policy,
            raise_on_give_up,
            fake.notice_delay,
            window,
            stall,
            progress=setup,
            now=setup,
            ready_at=setup,
            setup_time=setup,
            ready_due=setup,
        )
        self.fake = fake
        self.consumers: list[Consumer] = []
        self.sup: Any = None
        self.close = trio.Event()
        self.closed = trio.Event()
        self.raised: BaseException | None = None

    async def owner(self, task_status: trio.TaskStatus[None]) -> None:
        try:
            async with open_fake_supervisor(
                self.fake,
                policy=self.model.policy,
                raise_on_give_up=self.model.raise_on_give_up,
                window=self.model.window,
                timeouts=Timeouts(stall=self.model.stall),
            ) as sup:
                self.sup = sup
                await sup.wait_ready()
                task_status.started()
                await self.close.wait()
        except RestartLimitExceeded as exc:
            self.raised = exc
        finally:
            self.closed.set()

    async def main(self, cmds: list[Command]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.owner)
            self.check()
            for cmd in cmds:
                await self.apply(nursery, cmd)
                await trio.testing.wait_all_tasks_blocked()
                if self.model.gave_up_raising and not self.closed.is_set():
                    # Tasks still waiting fail after RestartLimitExceeded has left the
                    # block, behind the child-log thread's flush: wait for both.
                    await self.closed.wait()
                    await trio.testing.wait_all_tasks_blocked()
                self.check()
            # Leave the block mid-flight: every task still waiting gets RunnerUnavailable.
            self.close.set()
            await self.closed.wait()
            await trio.testing.wait_all_tasks_blocked()
            self.model.close()
            self.check_outcomes()
            for consumer in self.consumers:  # idle consumers (they never read) are cancelled
                consumer.scope.cancel()
                if self.model.seen[consumer.index] is None:
                    self.model.seen[consumer.index] = "cancelled"
        self.check_end()
        # What the examples covered: shown by pytest --hypothesis-show-statistics.
        for consumer in self.consumers:
            retry = " (retry=True)" if consumer.job.retry else ""
            event(f"a {consumer.job.kind} consumer saw {consumer.seen[0]}{retry}")
        event(f"the supervisor ended {self.model.state.value}")

    async def apply(self, nursery: trio.Nursery, cmd: Command) -> None:
        model = self.model
        unnoticed = " (a death unnoticed)" if model.dead is not None else ""
        unnoticed = " (frozen)" if model.frozen is not None else unnoticed
        event(f"{type(cmd).__name__} while {model.state.value}{unnoticed}")
        match cmd:
            case Submit(jobs):
                for job in jobs:
                    consumer = Consumer(len(self.consumers), job)
                    self.consumers.append(consumer)
                    model.submit(consumer.index, job)
                    await nursery.start(consumer.consume, self.sup)
            case Advance(seconds):
                await trio.sleep(seconds)
                model.advance(seconds)
            case Crash(signum, code):
                if model.alive():
                    worker = self.fake.workers[-1]
                    assert worker.alive
                    worker.crash(killed_by(signum) if signum is not None else exited(code or 0))
                    model.crash(clean=code == 0)
            case Freeze():
                if model.alive():
                    worker = self.fake.workers[-1]
                    assert worker.alive and worker.last_sent_at is not None
                    worker.signal(signal.SIGSTOP)
                    model.freeze(worker.last_sent_at)
            case Cancel(which, how):
                live = model.live_consumers()
                if not live:
                    return
                consumer = self.consumers[live[which % len(live)]]
                if how == "handle" and consumer.handle is not None:
                    await consumer.handle.cancel()
                else:
                    consumer.scope.cancel()
                model.cancel(consumer.index, how if consumer.handle is not None else "scope")
            case CancelAll():
                await self.sup.cancel_all()
                model.cancel_all()

    # -- agreement -----------------------------------------------------------------------------

    def check_outcomes(self) -> None:
        for consumer in self.consumers:
            assert len(consumer.seen) <= 1, (consumer.index, consumer.seen)  # at most one outcome
            expected = self.model.seen[consumer.index]
            actual = consumer.seen[0] if consumer.seen else None
            assert actual == expected, (consumer.index, consumer.job, actual, expected)

    def check(self) -> None:
        model = self.model
        assert trio.current_time() == model.now
        self.check_outcomes()
        stats = self.sup.statistics()
        assert stats.state is model.state, (stats.state, model.state)
        assert (stats.incarnation, stats.restarts, stats.consecutive_failures) == (
            model.incarnation,
            model.restarts,
            model.failures,
        )
        assert (stats.in_flight, stats.pending) == (model.in_flight, len(model.pending))
        assert stats.tasks_completed == model.completed
        if model.state in (RunnerState.READY, RunnerState.STARTING):
            assert stats.pid == FAKE_PID_BASE + model.incarnation
        else:
            assert stats.pid is None  # between incarnations, or done
        if model.state is RunnerState.READY:
            assert model.ready_at is not None
            assert stats.uptime == model.now - model.ready_at
        backoffs = [
            (when, change.delay) for when, change in self.fake.timeline if isinstance(change, BackingOff)
        ]
        assert backoffs == model.backoffs
        assert self.fake.spawn_times == model.spawns
        if model.state is RunnerState.READY:
            # Bounded bookkeeping: the control channel is drained, and the table holds only live tasks.
            assert self.sup._tasks.control_send.statistics().current_buffer_used == 0  # pyright: ignore[reportPrivateUsage]
        table = self.sup._tasks  # pyright: ignore[reportPrivateUsage]
        live = {t.id for t in model.tasks.values() if t.outcome is None}
        assert set(table.pending) | set(table.in_flight) == live

    def check_end(self) -> None:
        self.fake.check()
        for consumer in self.consumers:
            assert len(consumer.seen) == 1, (consumer.index, consumer.seen)  # exactly one outcome
        self.check_outcomes()
        assert all(task.outcome is not None for task in self.model.tasks.values())
        stats = self.sup.statistics()
        assert (stats.in_flight, stats.pending, stats.tasks_completed) == (0, 0, len(self.model.tasks))
        when, last = self.fake.timeline[-1]
        assert isinstance(last, Stopped)
        assert when == self.model.stopped_at  # a shutdown mid-flight takes exactly as long as it must
        gave_up = [
            (when, change.restarts) for when, change in self.fake.timeline if isinstance(change, GaveUp)
        ]
        model = self.model
        if model.gave_up_at is None:
            assert gave_up == []
        else:
            # Exactly max_restarts restarts in a row, then the failure after the last one gives up.
            assert gave_up == [(model.gave_up_at, model.failures)]
            assert model.failures == model.policy.max_restarts
        assert (self.raised is not None) == model.gave_up_raising
        if isinstance(self.raised, RestartLimitExceeded):
            assert self.raised.restarts == model.failures
            assert self.raised.last_exit.incarnation == model.incarnation


def always(cmds: list[Command], **options: Any) -> Any:
    """An ``@example`` of ``cmds``: the default policy and fake, but for ``options``."""
    defaults: dict[str, Any] = {
        "policy": RestartPolicy(),
        "raise_on_give_up": True,
        "notice_and_stall": (0.0, None),
        "refuse_nowait": False,
        "window": 8192,
        "setup_time": 0.0,
    }
    return example(**{**defaults, **options}, cmds=cmds)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    policy=policies(),
    raise_on_give_up=st.booleans(),
    # A late death watch with a stall limit would let the limit fire on a dead runner: one at a time.
    notice_and_stall=st.sampled_from([(0.0, None), (0.5, None), (0.0, STALL), (0.0, STALL)]),
    refuse_nowait=st.booleans(),
    window=st.sampled_from([2, 3, 8192]),
    setup_time=st.sampled_from([0.0, 1.0, 2.5]),
    cmds=st.lists(commands, max_size=25),
)
# Sequences worth running every time, whatever Hypothesis draws.
@always(  # giving up while a task submitted after an unnoticed death waits: it gets RunnerUnavailable
    [Crash(), Submit((Job("run", 0),)), Advance(0.5)],
    policy=RestartPolicy(max_restarts=0),
    notice_and_stall=(0.5, None),
)
@always(  # the running task cancelled: the one queued behind it starts at once, in the runner
    [Submit((Job("idle", 0), Job("run", 2), Job("run", 1))), Advance(1.0), Cancel(1), Advance(1.0)],
)
@always(  # a retry=True stream on a runner that freezes: killed as HUNG, re-run from its first event
    [
        Submit((Job("stream", 3, retry=True), Job("idle", 4))),
        Advance(1.0),
        Freeze(),
        Advance(12.0),
        Advance(7.0),
    ],
    policy=RestartPolicy(initial_delay=0.5),
    notice_and_stall=(0.5, None),
    refuse_nowait=True,
    window=2,
    setup_time=1.0,
)
@always(  # a task that runs longer than Timeouts.stall without a sign of life: the runner is killed as HUNG
    [Submit((Job("run", 3), Job("run", 1, retry=True))), Advance(3.0), Advance(3.0)],
    notice_and_stall=(0.0, STALL),
)
def test_the_supervisor_agrees_with_its_model_after_every_command(
    policy: RestartPolicy,
    raise_on_give_up: bool,
    notice_and_stall: tuple[float, float | None],
    refuse_nowait: bool,
    window: int,
    setup_time: float,
    cmds: list[Command],
) -> None:
    notice_delay, stall = notice_and_stall
    # notice_delay: sends race a death the supervisor has not seen yet.
    # refuse_nowait: every task frame takes the sender task's path, not the fast one.
    # window: a consumer that never reads stalls its task (and the fake child,
    # which serves one task at a time) until it is cancelled.
    # setup_time: tasks submitted, cancelled or crashed while the runner is STARTING.
    fake = FakeFactory(
        [Script(setup_time=setup_time)],
        notice_delay=notice_delay,
        refuse_nowait=refuse_nowait,
        honour_window=True,
    )
    driver = Driver(policy, raise_on_give_up, fake, window, stall)
    trio.run(driver.main, cmds, clock=trio.testing.MockClock(autojump_threshold=0))
