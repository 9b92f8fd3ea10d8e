"""No process outlives its owner: not the runner, not its children, not a zombie.

The autouse fixture in conftest.py already fails any test that leaves a
descendant of the test process behind. These tests add what it cannot see:
grandchildren that were reparented away from us, and the runner of a parent
that was SIGKILLed. A zombie whose parent is not us (init, which may never reap
it in a container) counts as gone: it holds no memory and runs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import trio

from trio_runner import RestartPolicy, RunnerState, Supervisor, Timeouts, open_supervisor

from .runners import EchoRunner

FAST = RestartPolicy(initial_delay=0.05, max_delay=0.2)
QUICK = Timeouts(heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)
SCRIPTS = Path(__file__).parent / "scripts"


def _running(pid: int) -> bool:
    """False once ``pid`` is gone, or is a zombie that is not ours to reap."""
    try:
        proc = psutil.Process(pid)
        return not (proc.status() == psutil.STATUS_ZOMBIE and proc.ppid() != os.getpid())
    except psutil.NoSuchProcess:
        return False


def _our_processes() -> list[int]:
    """Our descendants, leaving out multiprocessing's shared helpers that outlive supervisors."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            cmdline = " ".join(proc.cmdline())
            if "resource_tracker" not in cmdline and "forkserver" not in cmdline:
                found.append(proc.pid)
    return found


async def _until_gone(pids: list[int], within: float) -> list[int]:
    """Poll until none of ``pids`` runs, for at most ``within`` seconds; return those still running.

    Polling, because the death of a process that is not our child has no event to wait on.
    """
    left = pids
    for _ in range(round(within / 0.02) + 1):
        left = [pid for pid in pids if _running(pid)]
        if not left:
            break
        await trio.sleep(0.02)
    return left


@pytest.mark.parametrize("delay", [0, 0.001, 0.005, 0.02, 0.05], ids=lambda delay: f"{delay * 1000:g}ms")
async def test_cancelling_open_supervisor_while_the_runner_spawns_leaves_no_process(delay: float) -> None:
    entered: list[Supervisor[object, object, object]] = []
    start = trio.current_time()
    with trio.move_on_after(delay):
        async with open_supervisor(EchoRunner, policy=FAST, timeouts=QUICK) as sup:
            entered.append(sup)
            await trio.sleep_forever()
    assert trio.current_time() - start < QUICK.shutdown_bound + 10
    for sup in entered:
        assert sup.state is RunnerState.STOPPED
        assert sup.statistics().pid is None
    # The autouse fixture checks that no child or zombie is left.


async def test_leaving_open_supervisor_leaves_no_runner_grandchild_or_zombie() -> None:
    async with open_supervisor(EchoRunner, policy=FAST, timeouts=QUICK) as sup:
        grandchild = await sup.run(("grandchild",))
        runner = sup.statistics().pid
        assert runner is not None
        assert _running(grandchild)
    assert not psutil.pid_exists(runner)  # reaped by the supervisor, not left a zombie
    assert await _until_gone([grandchild], within=2) == []
    # At once, not after a grace period (the autouse fixture polls for 5 s).
    assert _our_processes() == []


async def test_runner_and_grandchild_die_when_the_parent_is_sigkilled() -> None:
    script = SCRIPTS / "parent_for_orphan_test.py"
    proc = await trio.lowlevel.open_process([sys.executable, str(script)], stdout=subprocess.PIPE)
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, "the parent script exited before printing its pids"
                line += chunk
        reported = json.loads(line)
        pids = [reported["runner"], reported["grandchild"]]
        assert all(_running(pid) for pid in pids)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert await _until_gone(pids, within=2) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()
        for pid in pids:  # not our descendants any more: the autouse fixture cannot see them
            if _running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
