"""Groups (``ranks=N``): one supervisor over N processes of the same runner, one_for_all.

Contract tests against real child processes (pure-Python ranks from
``tests/group_runners.py``): each rank's place, the fan-out of a request and
the outcome rank 0 brings back, and one_for_all: whichever rank dies or hangs,
the whole group is stopped, reaped, and started again on fresh ports. Timing
bounds are generous: only a hang breaks them.

At the end, a collaboration test of the one_for_all decision: the in-memory
fake per rank (``tests/fakes.py``) under a MockClock, with exact times.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import psutil
import pytest
import trio
from hypothesis import given

from trio_runner import (
    Exited,
    ExitReason,
    ExitRecord,
    LifecycleChange,
    Ready,
    RestartPolicy,
    RunnerCrashed,
    RunnerState,
    Spawned,
    Stopped,
    StoppedBy,
    Supervisor,
    TaskFailed,
    Timeouts,
    open_supervisor,
)
from trio_runner import _protocol as proto
from trio_runner._options import Options
from trio_runner._process import SpawnSpec
from trio_runner._supervisor import _open, create_supervisor
from trio_runner.testing import (
    AfterEvent,
    BeforeEvent,
    Exit,
    Fault,
    FaultPlan,
    FaultyRunner,
    Raise,
    Signal,
    faults,
    wait_no_leftover_processes,
)  # pyright: ignore[reportPrivateUsage]

from .fakes import SERVE, FakeFactory, FakeRunner, FakeWorker, crash_after_ready, lifecycle, wait_for_change
from .group_runners import GroupRunner
from .test_property_support import examples, real_process_settings

FAST = RestartPolicy(initial_delay=0.05, max_delay=0.2, max_restarts=100)
QUICK = Timeouts(heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)
BOUND = 60

GroupSupervisor = Supervisor[Any, Any, Any]


async def _pids(sup: GroupSupervisor) -> tuple[int, ...]:
    """Every rank's pid, once the group is READY."""
    await sup.wait_ready()
    pids = sup.statistics().pids
    assert all(pid is not None for pid in pids)
    return tuple(pid for pid in pids if pid is not None)


async def _until_restarted(sup: GroupSupervisor, old: tuple[int, ...]) -> tuple[int, ...]:
    """Wait until the group is READY again with new processes; their pids."""
    with trio.fail_after(BOUND):
        while True:
            await sup.wait_ready()
            pids = sup.statistics().pids
            if pids and not set(pids) & set(old):
                return await _pids(sup)
            await trio.sleep(0.01)


async def _until_stopped(sup: GroupSupervisor) -> None:
    with trio.fail_after(BOUND):
        async for change in sup.watch(replay=True):
            if isinstance(change, Stopped):
                break
    assert sup.state is RunnerState.STOPPED


@pytest.mark.parametrize("ranks", [2, 3])
async def test_each_rank_sees_its_rank_size_generation_and_addresses_before_setup(ranks: int) -> None:
    async with open_supervisor(GroupRunner, ranks=ranks, policy=FAST, timeouts=QUICK) as sup:
        places = await sup.run(("places",))
        pids = await _pids(sup)
    assert [place["rank"] for place in places] == list(range(ranks))
    assert {place["size"] for place in places} == {ranks}
    assert {place["generation"] for place in places} == {1}
    addresses = places[0]["addresses"]
    assert len(addresses) == ranks
    assert len(set(addresses)) == ranks
    assert all(address.startswith("127.0.0.1:") for address in addresses)
    assert all(place["addresses"] == addresses for place in places)
    assert tuple(place["pid"] for place in places) == pids  # statistics().pids is in rank order
    assert all(place["place_in_init"] is None for place in places)  # set after __init__, before setup


async def test_a_request_reaches_every_rank_and_rank_0s_events_and_result_come_back() -> None:
    async with open_supervisor(GroupRunner, ranks=3, policy=FAST, timeouts=QUICK) as sup:
        async with sup.stream(("count", 5)) as task:
            events = [event async for event in task]
            result = task.result
        places = await sup.run(("places",))
    assert events == [(0, i) for i in range(5)]  # rank 0's only
    assert result == ("rank", 0, 5)
    assert all(task.id in place["handled"] for place in places)


async def test_a_handler_failure_on_rank_1_fails_the_task_and_the_group_keeps_serving() -> None:
    async with open_supervisor(GroupRunner, ranks=2, policy=FAST, timeouts=QUICK) as sup:
        pids = await _pids(sup)
        with pytest.raises(TaskFailed, match="rank 1 failed on purpose"):
            await sup.run(("fail_on", 1))
        assert await sup.run(("fail_on", 5)) == 0
        assert await _pids(sup) == pids
        assert sup.statistics().incarnation == 1


@pytest.mark.parametrize("rank", [0, 1])
async def test_sigkill_of_either_rank_mid_task_fails_it_with_runner_crashed_naming_that_rank(
    rank: int,
) -> None:
    async with open_supervisor(GroupRunner, ranks=2, policy=FAST, timeouts=QUICK) as sup:
        before = await sup.run(("places",))
        pids = await _pids(sup)
        with pytest.raises(RunnerCrashed) as caught:
            async with sup.stream(("wait",)) as task:
                async for _ in task:
                    os.kill(pids[rank], signal.SIGKILL)
        record = caught.value.exit
        assert record.rank == rank
        assert record.reason is ExitReason.SIGNALED
        assert record.signal == signal.SIGKILL
        assert f"rank {rank}" in str(caught.value)
        new_pids = await _until_restarted(sup, pids)
        after = await sup.run(("places",))
        stats = sup.statistics()
    assert not set(new_pids) & set(pids)  # every rank replaced, not only the one that died
    assert stats.failed_rank == rank
    assert stats.last_exit is not None and stats.last_exit.rank == rank
    assert {place["generation"] for place in after} == {2}
    assert not set(after[0]["addresses"]) & set(before[0]["addresses"])  # fresh ports


async def test_a_retry_task_in_flight_when_a_rank_dies_runs_again_on_the_next_generation() -> None:
    async with open_supervisor(GroupRunner, ranks=2, policy=FAST, timeouts=QUICK) as sup:
        pids = await _pids(sup)
        async with sup.stream(("wait_in_generation_1",), retry=True) as task:
            async for _ in task:
                if task.attempt == 1:
                    os.kill(pids[1], signal.SIGKILL)
            assert task.attempt == 2
            assert task.result == 2


async def test_ranks_other_than_0_that_emit_count_as_progress_for_the_stall_timeout() -> None:
    # Their events are not sent, but a sign of progress is: a long task that
    # emits on every rank is not taken for a stalled one.
    timeouts = Timeouts(stall=0.5, heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)
    async with open_supervisor(GroupRunner, ranks=2, policy=FAST, timeouts=timeouts) as sup:
        await sup.wait_ready()
        assert await sup.run(("slow_count", 40, 0.05)) == 40
        assert sup.statistics().incarnation == 1


async def test_the_surviving_ranks_are_stopped_by_the_supervisor_and_watch_names_each_rank() -> None:
    changes: list[LifecycleChange] = []
    async with open_supervisor(GroupRunner, ranks=2, policy=FAST, timeouts=QUICK) as sup:
        pids = await _pids(sup)
        os.kill(pids[1], signal.SIGKILL)
        await _until_restarted(sup, pids)
        async for change in sup.watch(replay=True):
            changes.append(change)
            if len([c for c in changes if isinstance(c, Ready)]) == 4:
                break
    spawned = [(c.incarnation, c.rank) for c in changes if isinstance(c, Spawned)]
    assert spawned == [(1, 0), (1, 1), (2, 0), (2, 1)]
    ready = [(c.incarnation, c.rank) for c in changes if isinstance(c, Ready)]
    assert ready == [(1, 0), (1, 1), (2, 0), (2, 1)]
    exited = [c.exit for c in changes if isinstance(c, Exited)]
    assert len(exited) == 1  # one record for the group: the rank that went first
    assert exited[0].rank == 1 and exited[0].stopped_by is StoppedBy.SELF


async def test_a_sigstopped_rank_is_killed_as_hung_and_the_group_restarts() -> None:
    async with open_supervisor(GroupRunner, ranks=2, policy=FAST, timeouts=QUICK) as sup:
        pids = await _pids(sup)
        os.kill(pids[1], signal.SIGSTOP)
        await _until_restarted(sup, pids)
        last = sup.statistics().last_exit
        assert await sup.run(("count", 2)) == ("rank", 0, 2)
    assert last is not None
    assert last.reason is ExitReason.HUNG
    assert last.rank == 1
    assert "heartbeat" in last.detail


async def test_twenty_kill_restart_cycles_leave_no_process_behind() -> None:
    me = psutil.Process()
    async with open_supervisor(GroupRunner, ranks=2, policy=FAST, timeouts=QUICK) as sup:
        pids = await _pids(sup)
        for cycle in range(20):
            os.kill(pids[cycle % 2], signal.SIGKILL)
            pids = await _until_restarted(sup, pids)
            # The group's two ranks and the guardian: nothing of earlier generations.
            alive = {p.pid for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
            assert set(pids) <= alive
            assert len([p for p in me.children() if "rank" in " ".join(p.cmdline())]) <= 2
        assert await sup.run(("count", 1)) == ("rank", 0, 1)
        assert sup.statistics().incarnation == 21
    # The autouse fixture checks that no child or zombie is left.


async def _startup_failure(kwargs: dict[str, Any], timeouts: Timeouts) -> ExitRecord:
    """The exit record of a group that cannot start, under a policy that does not restart."""
    policy = RestartPolicy(mode="temporary")
    async with open_supervisor(GroupRunner, kwargs=kwargs, ranks=2, policy=policy, timeouts=timeouts) as sup:
        await _until_stopped(sup)
        last = sup.statistics().last_exit
    assert last is not None
    assert last.reason is ExitReason.STARTUP_FAILED
    return last


async def test_a_rank_that_fails_setup_is_a_startup_failure_naming_it_with_its_stderr() -> None:
    last = await _startup_failure({"fail_setup_rank": 1}, QUICK)
    assert last.rank == 1
    assert any("rank 1 failed its setup on purpose" in line for line in last.stderr_tail)


async def test_a_rank_that_never_gets_ready_is_a_startup_failure_within_the_startup_timeout() -> None:
    timeouts = Timeouts(startup=2, heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)
    last = await _startup_failure({"hang_setup_rank": 1}, timeouts)
    assert last.rank == 1
    assert "Timeouts(startup=2" in last.detail
    # Every rank's last lines, marked with its rank, the rank that went first's first.
    assert last.stderr_tail[0] == "[rank 1] rank 1 of 2 in setup"
    assert "[rank 0] rank 0 of 2 in setup" in last.stderr_tail


@pytest.mark.parametrize("rank", [0, 1])
async def test_a_fault_plan_can_target_one_rank_of_a_group(rank: int) -> None:
    plan = FaultPlan((Fault(Signal("SIGKILL"), BeforeEvent(task=1, event=1), rank=rank),))
    async with open_supervisor(FaultyRunner, GroupRunner, plan, ranks=2, policy=FAST, timeouts=QUICK) as sup:
        with pytest.raises(RunnerCrashed) as caught:
            await sup.run(("count", 3))
        assert caught.value.exit.rank == rank
        assert caught.value.exit.signal == signal.SIGKILL
        places = await sup.run(("places",))  # the wrapped runner got its place too
        assert [place["generation"] for place in places] == [2, 2]


@real_process_settings(examples("TRIO_RUNNER_GROUP_FAULT_EXAMPLES", 6))
@given(
    fault=faults(
        kinds=(Signal, Exit, Raise),
        trigger_kinds=(BeforeEvent, AfterEvent),
        max_task=1,
        max_event=2,
        native_faults=False,
        ranks=(0, 1, None),
    )
)
async def test_a_drawn_fault_on_any_rank_ends_the_task_once_and_the_group_serves_again(fault: Fault) -> None:
    plan = FaultPlan((fault,))
    async with open_supervisor(FaultyRunner, GroupRunner, plan, ranks=2, policy=FAST, timeouts=QUICK) as sup:
        try:
            await sup.run(("count", 3))  # emits events 0, 1, 2 on every rank: the fault fires
        except TaskFailed:
            assert isinstance(fault.kind, Raise)
            assert sup.statistics().incarnation == 1  # a handler's failure is not the group's
        except RunnerCrashed as crashed:
            assert not isinstance(fault.kind, Raise)
            record = crashed.exit
            assert record.rank in ((0, 1) if fault.rank is None else (fault.rank,))
            assert record.reason in fault.exit_reasons()
        else:
            raise AssertionError(f"{fault!r} fired and the task succeeded")
        assert await sup.run(("count", 1)) == ("rank", 0, 1)  # served again (a new generation after a crash)
    spawned = [change.pid for change in await lifecycle(sup) if isinstance(change, Spawned)]
    await wait_no_leftover_processes([pid for pid in spawned if pid is not None])


@pytest.mark.parametrize(("rank", "error"), [(-1, ValueError), (True, TypeError), (1.0, TypeError)])
def test_a_fault_rank_must_be_an_int_from_0(rank: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"Fault\.rank"):
        Fault(Signal("SIGKILL"), BeforeEvent(), rank=rank)  # type: ignore[arg-type]


@pytest.mark.parametrize("ranks", [0, -1])
def test_ranks_below_one_are_refused_at_the_call(ranks: int) -> None:
    with pytest.raises(ValueError, match="ranks"):
        open_supervisor(GroupRunner, ranks=ranks)


# -- collaboration: one_for_all under a MockClock, with the in-memory fake per rank ---------------


class _RankFakes:
    """A worker factory for a group: rank r's workers come from ``fakes[r]``, a FakeFactory of its own."""

    def __init__(self, *fakes: FakeFactory) -> None:
        self.fakes = fakes

    def __call__(self, spec: SpawnSpec, incarnation: int) -> FakeWorker:
        assert spec.group is not None
        return self.fakes[spec.group.rank](spec, incarnation)


async def test_one_for_all_a_crash_fails_the_task_at_once_stops_the_others_and_restarts_all_after_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    survivor, crasher = (
        FakeFactory([SERVE]),
        FakeFactory([crash_after_ready(signal.SIGSEGV, after=5.0), SERVE]),
    )
    options = Options.from_keywords("test", {"ranks": 2})
    sup: GroupSupervisor = create_supervisor(FakeRunner, (), None, options, _RankFakes(survivor, crasher))
    async with _open(sup):
        await sup.wait_ready()
        with pytest.raises(RunnerCrashed) as caught:
            await sup.run(("sleep", 100.0, "never"))
        assert trio.current_time() == 5.0
        assert caught.value.exit.rank == 1
        assert caught.value.exit.signal == signal.SIGSEGV
        await wait_for_change(sup, Ready, count=4)  # both ranks of generation 2
        assert trio.current_time() == 5.0 + 2.0  # the policy's first backoff, then both spawn at once
        assert await sup.run(("echo", "served")) == "served"
    # The survivor was asked to stop the moment the crash was seen, and went.
    first = survivor.workers[0]
    assert [when for when, _ in first.frames(proto.Shutdown)] == [5.0]
    assert first.died_at == 5.0
    assert survivor.spawn_times == crasher.spawn_times == [0.0, 7.0]
    changes = await lifecycle(sup)
    exits = [change.exit for change in changes if isinstance(change, Exited)]
    assert [record.reason for record in exits] == [ExitReason.SIGNALED, ExitReason.REQUESTED]
    assert exits[0].rank == 1
    assert exits[1].rank in (0, 1)  # leaving the block: every rank was asked; whichever went first
    survivor.check()
    crasher.check()
