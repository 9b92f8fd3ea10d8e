"""Groups (``ranks=N``): one supervisor over N processes of the same runner, one_for_all.

Contract tests against real child processes (pure-Python ranks from
``tests/group_runners.py``): each rank's place, the fan-out of a request and
the outcome rank 0 brings back, and one_for_all: whichever rank dies or hangs,
the whole group is stopped, reaped, and started again on fresh ports. Timing
bounds are generous: only a hang breaks them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from trio_runner import (
    Exited,
    ExitReason,
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

from .group_runners import GroupRunner

FAST = RestartPolicy(initial_delay=0.05, max_delay=0.2, max_restarts=100)
QUICK = Timeouts(heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)
SCRIPTS = Path(__file__).parent / "scripts"
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


async def test_a_rank_that_fails_setup_is_a_startup_failure_naming_it_with_its_stderr() -> None:
    policy = RestartPolicy(mode="temporary")
    async with open_supervisor(
        GroupRunner, kwargs={"fail_setup_rank": 1}, ranks=2, policy=policy, timeouts=QUICK
    ) as sup:
        await _until_stopped(sup)
        last = sup.statistics().last_exit
    assert last is not None
    assert last.reason is ExitReason.STARTUP_FAILED
    assert last.rank == 1
    assert any("rank 1 failed its setup on purpose" in line for line in last.stderr_tail)


async def test_a_rank_that_never_gets_ready_is_a_startup_failure_within_the_startup_timeout() -> None:
    policy = RestartPolicy(mode="temporary")
    timeouts = Timeouts(startup=2, heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)
    async with open_supervisor(
        GroupRunner, kwargs={"hang_setup_rank": 1}, ranks=2, policy=policy, timeouts=timeouts
    ) as sup:
        await _until_stopped(sup)
        last = sup.statistics().last_exit
    assert last is not None
    assert last.reason is ExitReason.STARTUP_FAILED
    assert last.rank == 1
    assert "Timeouts(startup=2" in last.detail


@pytest.mark.parametrize("ranks", [0, -1])
def test_ranks_below_one_are_refused_at_the_call(ranks: int) -> None:
    with pytest.raises(ValueError, match="ranks"):
        open_supervisor(GroupRunner, ranks=ranks)


@contextlib.asynccontextmanager
async def _group_parent() -> AsyncIterator[tuple[trio.Process, list[int]]]:
    """Run tests/scripts/group_parent_for_orphan_test.py; yield it and its ranks' pids.

    On the way out, kills whatever is left: once the parent is dead the ranks
    are no longer our descendants, so the autouse fixture cannot see them.
    """
    script = SCRIPTS / "group_parent_for_orphan_test.py"
    proc = await trio.lowlevel.open_process([sys.executable, str(script)], stdout=subprocess.PIPE)
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(BOUND):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, "the parent script exited before printing its pids"
                line += chunk
        pids.extend(json.loads(line))
        yield proc, pids
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return not (proc.status() == psutil.STATUS_ZOMBIE and proc.ppid() != os.getpid())
    except psutil.NoSuchProcess:
        return False


async def test_parent_sigkill_with_one_rank_holding_the_gil_leaves_no_rank() -> None:
    async with _group_parent() as (proc, pids):
        assert len(pids) == 2 and all(_running(pid) for pid in pids)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert proc.stdout is not None
        with trio.fail_after(10):
            while await proc.stdout.receive_some(4096):  # held open by whatever outlives the parent
                pass
        # Polling: the death of a process that is not our child has no event to wait on.
        for _ in range(500):
            if not any(_running(pid) for pid in pids):
                break
            await trio.sleep(0.02)
        assert [pid for pid in pids if _running(pid)] == []
