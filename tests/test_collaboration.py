"""Collaboration tests: the supervisor with an in-memory fake runner, under a MockClock.

The fake (``tests/fakes.py``) implements the ``Worker`` protocol with trio
tasks and in-memory byte pipes, speaking the real wire protocol. Nothing here
touches a real process or socket, so ``autojump_clock`` is safe and every time
is asserted exactly. Each test states one behaviour.

One thread remains: the supervisor stops its child-output log thread from a thread,
bounded by a deadline, as the very last step of ``_run``. Under autojump the
clock may jump to that deadline while the thread runs, so times after the
``async with`` block are read from ``fake.timeline`` (when each lifecycle
change happened), never from ``trio.current_time()``.
"""

from __future__ import annotations

import itertools
import signal
from typing import Any

import pytest
import trio
import trio.testing

from trio_runner import (
    ExitReason,
    RestartLimitExceeded,
    RestartPolicy,
    RunnerCrashed,
    RunnerState,
    RunnerUnavailable,
    TaskCancelled,
    TaskFailed,
    Timeouts,
)
from trio_runner import _protocol as proto
from trio_runner._errors import StoppedBy
from trio_runner._incarnation import DRAIN_BOUND
from trio_runner._restarts import Restarts
from trio_runner._state import BackingOff, Exited, GaveUp, Ready, Spawned, Stopped

from .fakes import (
    SERVE,
    FakeFactory,
    Script,
    crash_after_ready,
    exit_after_ready,
    lifecycle,
    open_fake_supervisor,
    wait_for_change,
)

DEFAULT_SCHEDULE = [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0, 60.0]

Clock = trio.testing.MockClock


def backoffs(changes: list[Any]) -> list[float]:
    return [change.delay for change in changes if isinstance(change, BackingOff)]


def exits(changes: list[Any]) -> list[Any]:
    return [change.exit for change in changes if isinstance(change, Exited)]


# -- backoff and giving up --------------------------------------------------------------------------


async def test_backoff_delays_are_exactly_2_4_8_16_32_then_60_and_spawns_follow_them(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([crash_after_ready()])
    with pytest.raises(RestartLimitExceeded):
        async with open_fake_supervisor(fake) as sup:
            await trio.sleep_forever()
    assert backoffs(await lifecycle(sup)) == DEFAULT_SCHEDULE
    spawns = fake.spawn_times
    assert spawns[0] == 0.0
    assert [later - earlier for earlier, later in itertools.pairwise(spawns)] == DEFAULT_SCHEDULE


async def test_giving_up_raises_restart_limit_exceeded_bare_out_of_the_block(autojump_clock: Clock) -> None:
    fake = FakeFactory([crash_after_ready(signal.SIGBUS)])
    with pytest.raises(RestartLimitExceeded) as info:
        async with open_fake_supervisor(fake) as sup:
            await trio.sleep_forever()
    assert type(info.value) is RestartLimitExceeded  # not inside an ExceptionGroup
    assert fake.time_of(GaveUp) == sum(DEFAULT_SCHEDULE)  # the 11th failure, at once
    assert len(fake.workers) == 11
    assert info.value.restarts == 10
    assert info.value.last_exit.signal == signal.SIGBUS
    assert info.value.last_exit.incarnation == 11
    assert sup.state is RunnerState.FAILED


async def test_a_process_that_cannot_be_started_is_startup_failed_and_restarted(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory(start_error=OSError(24, "Too many open files"))
    with pytest.raises(RestartLimitExceeded) as info:
        async with open_fake_supervisor(fake):
            await trio.sleep_forever()
    assert info.value.last_exit.reason is ExitReason.STARTUP_FAILED
    assert "Too many open files" in info.value.last_exit.detail
    assert len(fake.workers) == 11


async def test_a_bug_in_starting_the_worker_raises_as_itself_without_restarts(autojump_clock: Clock) -> None:
    fake = FakeFactory(start_error=RuntimeError("a bug in the library"))
    with pytest.raises(RuntimeError, match="a bug in the library") as info:
        async with open_fake_supervisor(fake):
            await trio.sleep_forever()
    assert type(info.value) is RuntimeError  # not RestartLimitExceeded, a RuntimeError too
    assert len(fake.workers) == 1


async def test_a_bug_in_routing_a_message_raises_as_itself_not_as_a_protocol_error(
    autojump_clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug in the supervisor")

    monkeypatch.setattr(Restarts, "on_ready", broken)
    fake = FakeFactory([SERVE])
    # The bug leaves the block (inside the group of the nursery it broke), not
    # caught and turned into a killed runner and ten restarts.
    with pytest.RaisesGroup(
        pytest.RaisesExc(KeyError, match="a bug in the supervisor"), flatten_subgroups=True
    ):
        async with open_fake_supervisor(fake):
            await trio.sleep_forever()
    assert len(fake.workers) == 1


async def test_after_giving_up_the_lifecycle_ends_with_gave_up_then_stopped(autojump_clock: Clock) -> None:
    fake = FakeFactory([crash_after_ready()])
    with pytest.raises(RestartLimitExceeded):
        async with open_fake_supervisor(fake) as sup:
            await trio.sleep_forever()
    changes = await lifecycle(sup)
    *_, exited, gave_up, stopped = changes
    assert isinstance(exited, Exited)
    assert gave_up == GaveUp(10, exited.exit)
    assert stopped == Stopped(RunnerState.FAILED, exited.exit)
    assert sup.statistics().restarts == 10


async def test_giving_up_cancels_the_body_and_tasks_still_waiting_get_runner_unavailable(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([Script(never_ready=True)])
    outcomes: list[tuple[float, BaseException]] = []
    body_cancelled = False

    async def submit(sup: Any) -> None:
        try:
            await sup.run(("echo", 1))
        except RunnerUnavailable as exc:
            outcomes.append((trio.current_time(), exc))

    policy = RestartPolicy(max_restarts=1)
    async with trio.open_nursery() as outside:
        with pytest.raises(RestartLimitExceeded):
            async with open_fake_supervisor(fake, policy=policy, timeouts=Timeouts(startup=1.0)) as sup:
                # Submitted from outside the block; never delivered, since no runner gets READY.
                outside.start_soon(submit, sup)
                try:
                    await trio.sleep_forever()
                except trio.Cancelled:
                    body_cancelled = True
                    raise
    assert body_cancelled
    assert fake.spawn_times == [0.0, 3.0]
    assert len(outcomes) == 1
    assert outcomes[0][0] >= fake.time_of(GaveUp) == 4.0


async def test_without_raise_on_give_up_the_supervisor_only_moves_to_failed(autojump_clock: Clock) -> None:
    fake = FakeFactory([crash_after_ready()])
    async with open_fake_supervisor(fake, raise_on_give_up=False) as sup:
        await wait_for_change(sup, GaveUp)
        assert trio.current_time() == sum(DEFAULT_SCHEDULE)
        assert sup.state is RunnerState.FAILED
        with pytest.raises(RunnerUnavailable, match="failed"):
            await sup.run(("echo", 1))
        await trio.sleep(100)  # the body is not cancelled
    assert sup.state is RunnerState.FAILED
    assert len(fake.workers) == 11
    assert isinstance((await lifecycle(sup))[-1], Stopped)


async def test_a_custom_max_restarts_gives_up_on_the_failure_after_the_last_restart(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([exit_after_ready(3)])
    with pytest.raises(RestartLimitExceeded) as info:
        async with open_fake_supervisor(fake, policy=RestartPolicy(max_restarts=2)) as sup:
            await trio.sleep_forever()
    assert info.value.restarts == 2
    assert info.value.last_exit.exitcode == 3
    assert fake.spawn_times == [0.0, 2.0, 6.0]
    assert backoffs(await lifecycle(sup)) == [2.0, 4.0]


# -- reset_after ------------------------------------------------------------------------------------


async def test_a_runner_ready_for_reset_after_before_crashing_gets_the_first_delay_again(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory(
        [crash_after_ready(), crash_after_ready(), crash_after_ready(after=60.0), crash_after_ready()],
        then=SERVE,
    )
    async with open_fake_supervisor(fake) as sup:
        await wait_for_change(sup, Ready, count=5)
    assert fake.spawn_times == [0.0, 2.0, 6.0, 68.0, 72.0]
    assert backoffs(await lifecycle(sup)) == [2.0, 4.0, 2.0, 4.0]


async def test_a_runner_ready_just_short_of_reset_after_keeps_backing_off(autojump_clock: Clock) -> None:
    fake = FakeFactory(
        [crash_after_ready(), crash_after_ready(), crash_after_ready(after=59.5)],
        then=SERVE,
    )
    async with open_fake_supervisor(fake) as sup:
        await wait_for_change(sup, Ready, count=4)
    assert backoffs(await lifecycle(sup)) == [2.0, 4.0, 8.0]
    assert fake.spawn_times == [0.0, 2.0, 6.0, 73.5]


async def test_a_healthy_period_resets_the_consecutive_failure_count(autojump_clock: Clock) -> None:
    fake = FakeFactory([crash_after_ready(), crash_after_ready(after=61.0)], then=SERVE)
    async with open_fake_supervisor(fake, policy=RestartPolicy(max_restarts=1)) as sup:
        # Without the reset, the second failure would give up (max_restarts=1).
        await wait_for_change(sup, Ready, count=3)
        assert sup.statistics().consecutive_failures == 1
        assert sup.statistics().restarts == 2


# -- modes ------------------------------------------------------------------------------------------


async def test_transient_leaves_an_unasked_exit_0_stopped_and_later_calls_raise_unavailable(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([exit_after_ready(0, after=1.0)])
    async with open_fake_supervisor(fake, policy=RestartPolicy(mode="transient")) as sup:
        await wait_for_change(sup, Stopped)
        assert trio.current_time() == 1.0
        assert sup.state is RunnerState.STOPPED
        with pytest.raises(RunnerUnavailable):
            await sup.run(("echo", 1))
    changes = await lifecycle(sup)
    assert [type(change) for change in changes] == [Spawned, Ready, Exited, Stopped]
    assert exits(changes)[0].reason is ExitReason.CLEAN_EXIT
    assert len(fake.workers) == 1


async def test_permanent_restarts_after_an_unasked_exit_0(autojump_clock: Clock) -> None:
    fake = FakeFactory([exit_after_ready(0, after=1.0)], then=SERVE)
    async with open_fake_supervisor(fake, policy=RestartPolicy(mode="permanent")) as sup:
        await wait_for_change(sup, Ready, count=2)
        assert trio.current_time() == 3.0
    changes = await lifecycle(sup)
    assert exits(changes)[0].reason is ExitReason.CLEAN_EXIT
    assert backoffs(changes) == [2.0]


async def test_transient_restarts_after_a_crash(autojump_clock: Clock) -> None:
    fake = FakeFactory([crash_after_ready(after=1.0)], then=SERVE)
    async with open_fake_supervisor(fake, policy=RestartPolicy(mode="transient")) as sup:
        await wait_for_change(sup, Ready, count=2)
        assert trio.current_time() == 3.0


async def test_temporary_leaves_a_crashed_runner_stopped(autojump_clock: Clock) -> None:
    fake = FakeFactory([crash_after_ready(after=1.0)])
    async with open_fake_supervisor(fake, policy=RestartPolicy(mode="temporary")) as sup:
        await wait_for_change(sup, Stopped)
        assert sup.state is RunnerState.STOPPED
        with pytest.raises(RunnerUnavailable):
            await sup.run(("echo", 1))
    assert exits(await lifecycle(sup))[0].reason is ExitReason.SIGNALED
    assert len(fake.workers) == 1


# -- startup ----------------------------------------------------------------------------------------


async def test_a_runner_that_never_becomes_ready_is_killed_at_exactly_the_startup_timeout(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([Script(never_ready=True)], then=SERVE)
    async with open_fake_supervisor(fake, timeouts=Timeouts(startup=30.0)) as sup:
        await sup.wait_ready()
        assert trio.current_time() == 32.0  # killed at 30, restarted after the first 2 s backoff
    first = fake.workers[0]
    assert first.signals_while_alive() == [(30.0, signal.SIGKILL)]
    assert first.died_at == 30.0
    (record, _) = exits(await lifecycle(sup))
    assert record.reason is ExitReason.STARTUP_FAILED
    assert record.stopped_by is StoppedBy.SIGKILL
    assert "startup=30.0" in record.detail


async def test_a_runner_whose_setup_raises_is_startup_failed_and_restarted(autojump_clock: Clock) -> None:
    fake = FakeFactory([Script(setup_time=3.0, setup_fails=True)], then=SERVE)
    async with open_fake_supervisor(fake) as sup:
        await sup.wait_ready()
        assert trio.current_time() == 5.0
    (record, _) = exits(await lifecycle(sup))
    assert record.reason is ExitReason.STARTUP_FAILED
    assert record.exitcode == 1
    assert "setup failed on purpose" in record.detail
    assert record.remote_traceback is not None


async def test_a_failure_before_setup_raises_runner_crashed_at_once_without_restart(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([Script(load_fails=True)], then=SERVE)
    with pytest.raises(RunnerCrashed) as info:
        async with open_fake_supervisor(fake) as sup:
            await trio.sleep_forever()
    assert type(info.value) is RunnerCrashed
    assert fake.time_of(GaveUp) == 0.0
    assert len(fake.workers) == 1
    assert info.value.reason is ExitReason.STARTUP_FAILED
    assert info.value.exit.exitcode == proto.EXIT_LOAD_FAILED
    assert "ModuleNotFoundError" in info.value.exit.detail
    assert "ModuleNotFoundError: No module named 'gone'" in info.value.exit.stderr_tail
    assert sup.state is RunnerState.FAILED
    assert [type(change) for change in await lifecycle(sup)] == [Spawned, Exited, GaveUp, Stopped]


# -- liveness: heartbeat and stall ------------------------------------------------------------------


async def test_a_runner_that_stops_beating_is_hung_at_exactly_its_last_beat_plus_the_heartbeat_timeout(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([Script(hang_after_ready=5.5)], then=SERVE)
    async with open_fake_supervisor(fake) as sup:
        record = (await wait_for_change(sup, Exited)).exit
        hung = fake.workers[0]
        assert hung.beats == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert hung.signals_while_alive() == [(15.0, signal.SIGKILL)]
        assert record.reason is ExitReason.HUNG
        assert "heartbeat" in record.detail
        await sup.wait_ready()
        assert trio.current_time() == 17.0


async def test_a_busy_task_that_emits_nothing_is_hung_at_exactly_the_stall_timeout(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([SERVE])
    async with open_fake_supervisor(fake, timeouts=Timeouts(stall=5.0)) as sup:
        await sup.wait_ready()
        await trio.sleep(1.0)
        with pytest.raises(RunnerCrashed) as info:
            await sup.run(("busy",))
        assert trio.current_time() == 6.0
        assert info.value.reason is ExitReason.HUNG
        assert "stall" in info.value.exit.detail
        assert fake.workers[0].beats[-1] >= 5.0  # it kept beating: only the task was stuck


async def test_an_idle_runner_is_never_stalled(autojump_clock: Clock) -> None:
    fake = FakeFactory([SERVE])
    async with open_fake_supervisor(fake, timeouts=Timeouts(stall=5.0)) as sup:
        await trio.sleep(100.0)
        assert await sup.run(("echo", "still here")) == "still here"
    assert len(fake.workers) == 1


# -- graceful shutdown and escalation ---------------------------------------------------------------


async def test_leaving_the_block_sends_shutdown_and_a_runner_that_obeys_exits_at_once(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([SERVE])
    async with open_fake_supervisor(fake) as sup:
        await trio.sleep(1.0)
    assert fake.time_of(Stopped) == 1.0
    worker = fake.workers[0]
    assert [when for when, _ in worker.frames(proto.Shutdown)] == [1.0]
    assert worker.signals_while_alive() == []
    record = sup.statistics().last_exit
    assert record is not None
    assert (record.reason, record.stopped_by, record.exitcode) == (
        ExitReason.REQUESTED,
        StoppedBy.SHUTDOWN,
        0,
    )


async def test_a_runner_that_ignores_shutdown_gets_sigterm_after_exactly_graceful(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([Script(ignore_shutdown=True)])
    async with open_fake_supervisor(fake) as sup:
        await trio.sleep(1.0)
    worker = fake.workers[0]
    assert [when for when, _ in worker.frames(proto.Shutdown)] == [1.0]
    assert worker.signals_while_alive() == [(4.0, signal.SIGTERM)]
    assert fake.time_of(Stopped) == 4.0
    record = sup.statistics().last_exit
    assert record is not None
    assert (record.stopped_by, record.signal) == (StoppedBy.SIGTERM, signal.SIGTERM)


async def test_a_runner_that_ignores_shutdown_and_sigterm_gets_sigkill_after_exactly_terminate(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([Script(ignore_shutdown=True, ignore_sigterm=True)])
    timeouts = Timeouts(graceful=3.0, terminate=5.0, kill=2.0)
    async with open_fake_supervisor(fake, timeouts=timeouts) as sup:
        await trio.sleep(1.0)
    worker = fake.workers[0]
    assert [when for when, _ in worker.frames(proto.Shutdown)] == [1.0]
    assert worker.signals_while_alive() == [(4.0, signal.SIGTERM), (9.0, signal.SIGKILL)]
    assert worker.died_at == 9.0
    assert fake.time_of(Stopped) == 9.0
    record = sup.statistics().last_exit
    assert record is not None
    assert (record.stopped_by, record.signal, record.reaped) == (StoppedBy.SIGKILL, signal.SIGKILL, True)


async def test_a_runner_that_survives_sigkill_is_reported_unreaped_and_no_longer_waited_for(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([Script(ignore_shutdown=True, ignore_sigterm=True, survive_sigkill=True)])
    timeouts = Timeouts(graceful=3.0, terminate=5.0, kill=2.0)
    async with open_fake_supervisor(fake, timeouts=timeouts) as sup:
        await trio.sleep(1.0)
    worker = fake.workers[0]
    assert worker.signals_while_alive()[:2] == [(4.0, signal.SIGTERM), (9.0, signal.SIGKILL)]
    assert worker.alive
    # kill=2 s after SIGKILL it stops waiting; the socket drain then waits its own bound for EOF.
    assert fake.time_of(Stopped) == 1.0 + timeouts.shutdown_bound + DRAIN_BOUND
    record = sup.statistics().last_exit
    assert record is not None
    assert (record.reaped, record.exitcode, record.signal) == (False, None, None)
    assert "could not be reaped" in record.detail
    assert isinstance((await lifecycle(sup))[-1], Stopped)


async def test_a_task_in_flight_when_the_block_is_left_ends_with_runner_unavailable(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([SERVE])
    outcomes: list[BaseException] = []

    async def submit(sup: Any, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            await sup.run(("sleep", 100.0, "too late"))
        except RunnerUnavailable as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as outside:
        async with open_fake_supervisor(fake) as sup:
            await outside.start(submit, sup)
            await trio.sleep(1.0)
    assert fake.time_of(Stopped) == 1.0
    assert len(outcomes) == 1


# -- tasks across crashes ---------------------------------------------------------------------------


async def test_a_task_in_flight_gets_runner_crashed_when_its_runner_dies(autojump_clock: Clock) -> None:
    fake = FakeFactory(
        [Script(stderr=("fatal: out of memory",)).then_crash(signal.SIGSEGV, after=5.0)], then=SERVE
    )
    async with open_fake_supervisor(fake) as sup:
        with pytest.raises(RunnerCrashed) as info:
            await sup.run(("sleep", 10.0, "never"))
        assert trio.current_time() == 5.0
        record = info.value.exit
        assert (record.reason, record.signal_name, record.incarnation) == (ExitReason.SIGNALED, "SIGSEGV", 1)
        assert record.stderr_tail == ("fatal: out of memory",)
        assert await sup.run(("echo", "next")) == "next"
        assert trio.current_time() == 7.0


async def test_a_task_whose_runner_exits_mid_task_reports_the_exit_code(autojump_clock: Clock) -> None:
    fake = FakeFactory([SERVE])
    async with open_fake_supervisor(fake) as sup:
        with pytest.raises(RunnerCrashed) as info:
            await sup.run(("die", 3, None))
        assert (info.value.reason, info.value.exit.exitcode) == (ExitReason.ERROR_EXIT, 3)


async def test_a_retry_task_is_rerun_on_the_next_incarnation_and_succeeds(autojump_clock: Clock) -> None:
    fake = FakeFactory([crash_after_ready(after=5.0)], then=SERVE)
    async with open_fake_supervisor(fake) as sup:
        assert await sup.run(("sleep", 10.0, "done"), retry=True) == "done"
        assert trio.current_time() == 17.0  # crashed at 5, respawned at 7, ran 10 s
    first, second = fake.workers
    assert [task_id for _, task_id, _ in first.tasks] == [task_id for _, task_id, _ in second.tasks]
    assert second.tasks[0][0] == 7.0


async def test_a_task_submitted_while_backing_off_is_served_by_the_next_incarnation(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([crash_after_ready()], then=SERVE)
    async with open_fake_supervisor(fake) as sup:
        await wait_for_change(sup, BackingOff)
        assert sup.state is RunnerState.BACKING_OFF
        assert await sup.run(("echo", "late")) == "late"
        assert trio.current_time() == 2.0
    assert fake.workers[0].tasks == []
    assert [request for _, _, request in fake.workers[1].tasks] == [("echo", "late")]


@pytest.mark.parametrize("refuse_nowait", [False, True], ids=["written-at-submit", "socket-full"])
async def test_every_task_gets_exactly_one_outcome_across_a_crash(
    autojump_clock: Clock, refuse_nowait: bool
) -> None:
    # socket-full: a task written at submit finds the socket full, so its frame
    # waits in the backlog while the tasks behind it queue: the order holds.
    fake = FakeFactory([crash_after_ready(after=5.5)], then=SERVE, refuse_nowait=refuse_nowait)
    outcomes: dict[int, list[tuple[float, object]]] = {i: [] for i in range(20)}

    async def submit(sup: Any, i: int) -> None:
        try:
            outcome: object = await sup.run(("sleep", 1.0, i), retry=i % 2 == 0)
        except (RunnerCrashed, TaskFailed, TaskCancelled, RunnerUnavailable) as exc:
            outcome = type(exc)
        outcomes[i].append((trio.current_time(), outcome))

    async with open_fake_supervisor(fake) as sup:
        await sup.wait_ready()
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(submit, sup, i)
                await trio.lowlevel.checkpoint()  # submit in order
        stats = sup.statistics()
        assert (stats.in_flight, stats.pending, stats.tasks_completed) == (0, 0, 20)

    # Tasks 0-4 finished before the crash at 5.5; task 5 was running (not
    # retry=True), so it alone crashed. Tasks 6-19 had been delivered but never
    # started: they run in order on the runner respawned at 7.5, retry or not.
    expected: dict[int, list[tuple[float, object]]] = {i: [(i + 1.0, i)] for i in range(5)}
    expected[5] = [(5.5, RunnerCrashed)]
    expected.update({i: [(7.5 + (i - 5), i)] for i in range(6, 20)})
    assert outcomes == expected
    rerun = [request[2] for _, _, request in fake.workers[1].tasks]
    assert rerun == list(range(6, 20))


async def test_a_cancelled_task_reports_task_cancelled_and_the_runner_serves_on(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([SERVE])
    async with open_fake_supervisor(fake) as sup:
        async with sup.stream(("sleep", 10.0, "never")) as task:
            await trio.sleep(1.0)
            await task.cancel()
            with pytest.raises(TaskCancelled):
                await task.wait()
        assert trio.current_time() == 1.0
        assert [when for when, _ in fake.workers[0].frames(proto.Cancel)] == [1.0]
        assert await sup.run(("echo", 2)) == 2
    assert len(fake.workers) == 1


# -- sends racing a death ---------------------------------------------------------------------------
#
# The fake drops what is sent to a dead child, as ProcessWorker.send_all does with the
# EPIPE of a socket whose peer has exited: the death watch reports the death.


async def test_a_task_sent_to_a_runner_that_died_right_after_ready_is_crashed_or_rerun(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([crash_after_ready()], then=SERVE, notice_delay=0.5)
    async with open_fake_supervisor(fake) as sup:
        # Submitted before READY: sent at READY, to a runner already dead
        # whose death is noticed 0.5 s later.
        try:
            outcome: object = await sup.run(("echo", 1))
        except RunnerCrashed as exc:
            outcome = exc.reason
        assert outcome in (1, ExitReason.SIGNALED)
        await sup.wait_ready()
        assert trio.current_time() == 2.5
    assert fake.workers[0].sent_after_death != []


async def test_leaving_the_block_as_the_runner_exits_records_its_exit_and_stops(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([exit_after_ready(3, after=5.0)])
    async with open_fake_supervisor(fake) as sup:
        await trio.sleep(5.0)  # Shutdown may reach a runner that is already dead
    assert fake.time_of(Stopped) == 5.0
    assert [type(change) for change in await lifecycle(sup)] == [Spawned, Ready, Exited, Stopped]
    assert len(fake.workers) == 1


async def test_credits_returned_after_the_runner_died_are_dropped(autojump_clock: Clock) -> None:
    fake = FakeFactory([SERVE])
    seen: list[int] = []
    async with open_fake_supervisor(fake, window=2) as sup:
        with pytest.raises(RunnerCrashed):
            async with sup.stream(("die", None, signal.SIGKILL, 10)) as task:
                # Consuming the events sent before the death returns credits to the dead runner.
                async for event in task:
                    seen.append(event)
        await sup.wait_ready()
        assert trio.current_time() == 2.0
    assert seen == list(range(10))
    assert fake.workers[0].sent_after_death != []


# -- more lifecycle and cancellation ----------------------------------------------------------------


async def test_each_incarnation_that_never_becomes_ready_is_killed_startup_seconds_after_its_spawn(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([Script(never_ready=True), Script(never_ready=True)], then=SERVE)
    async with open_fake_supervisor(fake, timeouts=Timeouts(startup=30.0)) as sup:
        await sup.wait_ready()
    assert fake.spawn_times == [0.0, 32.0, 66.0]
    assert [w.died_at for w in fake.workers[:2]] == [30.0, 62.0]


async def test_leaving_the_block_while_backing_off_stops_at_once_without_a_restart(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([crash_after_ready()], then=SERVE)
    async with open_fake_supervisor(fake) as sup:
        await wait_for_change(sup, BackingOff)
        await trio.sleep(1.0)
    assert fake.time_of(Stopped) == 1.0
    assert len(fake.workers) == 1
    assert sup.state is RunnerState.STOPPED


async def test_cancel_all_while_backing_off_cancels_the_waiting_tasks(autojump_clock: Clock) -> None:
    fake = FakeFactory([crash_after_ready()], then=SERVE)
    async with open_fake_supervisor(fake) as sup:
        await wait_for_change(sup, BackingOff)
        async with sup.stream(("echo", 1)) as task:
            await sup.cancel_all()
            with pytest.raises(TaskCancelled):
                await task.wait()
        assert trio.current_time() == 0.0
        assert await sup.run(("echo", 2)) == 2
    assert [request for _, _, request in fake.workers[1].tasks] == [("echo", 2)]


async def test_cancelling_the_callers_scope_cancels_the_task_in_the_runner(autojump_clock: Clock) -> None:
    fake = FakeFactory([SERVE])
    async with open_fake_supervisor(fake) as sup:
        with trio.move_on_after(2.0):
            await sup.run(("sleep", 10.0, "never"))
        assert await sup.run(("echo", "next")) == "next"
        assert trio.current_time() == 2.0
        assert [when for when, _ in fake.workers[0].frames(proto.Cancel)] == [2.0]
        assert sup.statistics().in_flight == 0


async def test_leaving_a_stream_block_early_returns_at_once_even_if_the_runner_ignores_the_cancel(
    autojump_clock: Clock,
) -> None:
    fake = FakeFactory([SERVE])
    async with open_fake_supervisor(fake) as sup:
        async with sup.stream(("busy",)):
            await trio.sleep(1.0)
        assert trio.current_time() == 1.0
        await trio.sleep(1.0)
        assert [when for when, _ in fake.workers[0].frames(proto.Cancel)] == [1.0]


async def check_protocol_error(fake: FakeFactory, request: tuple[Any, ...]) -> None:
    async with open_fake_supervisor(fake) as sup:
        await trio.sleep(1.0)
        with pytest.raises(RunnerCrashed) as info:
            await sup.run(request)
        when = trio.current_time()
        assert info.value.reason is ExitReason.PROTOCOL_ERROR
        assert info.value.exit.stopped_by is StoppedBy.SIGKILL
        assert fake.workers[0].signals_while_alive() == [(when, signal.SIGKILL)]
        assert await sup.run(("echo", "again")) == "again"
        assert trio.current_time() == when + 2.0


async def test_an_oversize_frame_kills_the_runner_as_a_protocol_error_and_it_restarts(
    autojump_clock: Clock,
) -> None:
    await check_protocol_error(FakeFactory([SERVE]), ("corrupt", "oversize", 0.0))


async def test_a_frame_that_does_not_unpickle_kills_the_runner_as_a_protocol_error_and_it_restarts(
    autojump_clock: Clock,
) -> None:
    # Alone in its read: sent half a second after the task's ACK.
    await check_protocol_error(FakeFactory([SERVE]), ("corrupt", "garbage", 0.5))


async def test_a_corrupt_frame_read_together_with_a_good_one_is_a_protocol_error(
    autojump_clock: Clock,
) -> None:
    # Garbage right behind the task's ACK frame, so one read returns both.
    await check_protocol_error(FakeFactory([SERVE]), ("corrupt", "garbage", 0.0))


async def test_statistics_follow_the_restarts(autojump_clock: Clock) -> None:
    fake = FakeFactory([crash_after_ready(), crash_after_ready()], then=SERVE)
    async with open_fake_supervisor(fake) as sup:
        await wait_for_change(sup, BackingOff, count=2)
        stats = sup.statistics()
        assert (stats.state, stats.pid, stats.incarnation) == (RunnerState.BACKING_OFF, None, 2)
        assert (stats.restarts, stats.consecutive_failures) == (2, 2)
        await sup.wait_ready()
        await trio.sleep(5.0)
        stats = sup.statistics()
        assert (stats.state, stats.pid, stats.incarnation, stats.uptime) == (RunnerState.READY, 40003, 3, 5.0)
        assert stats.last_exit is not None and stats.last_exit.incarnation == 2
