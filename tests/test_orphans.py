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
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import trio

from trio_runner import (
    RestartPolicy,
    RunnerCrashed,
    RunnerState,
    Spawned,
    Stopped,
    Supervisor,
    Timeouts,
    open_supervisor,
)

from .runners import EchoRunner, FamilyRunner

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


@contextlib.asynccontextmanager
async def _parent(*argv: str) -> AsyncIterator[tuple[trio.Process, dict[str, int]]]:
    """Run tests/scripts/parent_for_orphan_test.py; yield it and the pids it reported.

    On the way out, kills whatever is left: the runner's family is no longer
    our descendants once the parent is dead, so the autouse fixture cannot see it.
    """
    script = SCRIPTS / "parent_for_orphan_test.py"
    proc = await trio.lowlevel.open_process([sys.executable, str(script), *argv], stdout=subprocess.PIPE)
    pids: dict[str, int] = {}
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, "the parent script exited before printing its pids"
                line += chunk
        pids.update(json.loads(line))
        yield proc, pids
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()
        for pid in pids.values():
            if _running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


async def _sigkill_and_communicate(proc: trio.Process) -> None:
    """SIGKILL the parent, then read its stdout to the end, as ``communicate()`` would.

    Whatever still holds the dead parent's stdout keeps that read waiting:
    multiprocessing's resource tracker does, for as long as a runner lives.
    """
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert proc.stdout is not None
    with trio.fail_after(10):
        while await proc.stdout.receive_some(4096):
            pass


async def test_runner_and_grandchild_die_when_the_parent_is_sigkilled() -> None:
    async with _parent("idle") as (proc, pids):
        assert set(pids) == {"runner", "grandchild"}
        assert all(_running(pid) for pid in pids.values())
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert await _until_gone(list(pids.values()), within=2) == []


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
async def test_a_runner_holding_the_gil_and_its_whole_family_die_when_the_parent_is_sigkilled(
    start_method: str,
) -> None:
    # The reader thread's orphan check cannot run while the handler holds the
    # GIL in C: the guardian process has to do it.
    async with _parent("gil", start_method) as (proc, pids):
        assert set(pids) == {"runner", "in_group", "new_session"}
        assert all(_running(pid) for pid in pids.values())
        await _sigkill_and_communicate(proc)
        assert await _until_gone(list(pids.values()), within=10) == []


async def test_every_rank_of_a_group_dies_when_the_parent_is_sigkilled_while_one_holds_the_gil() -> None:
    # Each rank registers with the supervisor's one guardian, as a lone runner does.
    async with _parent("group_gil") as (proc, pids):
        assert set(pids) == {"rank0", "rank1"}
        assert all(_running(pid) for pid in pids.values())
        await _sigkill_and_communicate(proc)
        assert await _until_gone(list(pids.values()), within=10) == []


async def test_a_stopped_runner_and_its_whole_family_die_when_the_parent_is_sigkilled() -> None:
    async with _parent("stopped") as (proc, pids):
        runner = psutil.Process(pids["runner"])
        for _ in range(1000):  # SIGSTOP is delivered asynchronously: poll, for at most 10 s
            if runner.status() == psutil.STATUS_STOPPED:
                break
            await trio.sleep(0.01)
        assert runner.status() == psutil.STATUS_STOPPED
        await _sigkill_and_communicate(proc)
        assert await _until_gone(list(pids.values()), within=10) == []


async def test_leaving_open_supervisor_kills_a_grandchild_that_left_the_process_group() -> None:
    async with open_supervisor(FamilyRunner, policy=FAST, timeouts=QUICK) as sup:
        family = await sup.run(("family",))
        assert os.getpgid(family["new_session"]) != sup.statistics().pid
        assert all(_running(pid) for pid in family.values())
    # Not our descendant once the runner is gone: the autouse fixture cannot see it.
    assert await _until_gone(list(family.values()), within=10) == []


async def test_a_grandchild_that_left_the_group_and_was_reparented_away_is_killed_at_shutdown() -> None:
    # Its parent lives long enough (3.5 s) for the guardian's scan (every
    # second) to record it; no parent link leads to it after that.
    async with open_supervisor(FamilyRunner, policy=FAST, timeouts=QUICK) as sup:
        escapee = await sup.run(("escapee", 3.5))
        runner = sup.statistics().pid
        assert _running(escapee)
        assert runner not in {proc.pid for proc in psutil.Process(escapee).parents()}
    assert await _until_gone([escapee], within=10) == []


async def test_a_grandchild_that_left_the_group_is_killed_when_its_runner_is_sigkilled() -> None:
    # The runner cannot kill it on its way out (SIGKILL), the supervisor's kill
    # of the group misses it, and no parent link leads to it: only the guardian's
    # record does, swept when the supervisor says the runner is reaped.
    async with open_supervisor(FamilyRunner, policy=FAST, timeouts=QUICK) as sup:
        escapee = await sup.run(("escapee", 3.5))
        runner = sup.statistics().pid
        assert runner is not None and _running(escapee)
        os.kill(runner, signal.SIGKILL)
        assert await _until_gone([escapee], within=10) == []
        assert sup.state is not RunnerState.STOPPED  # while the supervisor lives


async def test_a_runner_busy_in_c_with_a_live_parent_is_never_killed() -> None:
    # Seconds in C without a heartbeat; the heartbeat timeout is out of the way,
    # so only a spurious kill by the guardian could fail the task.
    n = 10**8  # 2-4 s here: several of the guardian's scans
    async with open_supervisor(FamilyRunner, policy=FAST, timeouts=Timeouts(heartbeat=300)) as sup:
        assert await sup.run(("hold_gil", n)) == n * (n - 1) // 2
        assert sup.statistics().restarts == 0


def _guardians() -> set[int]:
    """The guardians of this process's supervisors: a bare interpreter running ``_guardian.main()``.

    Its last argument is the supervisor's pid (other test runs on the machine
    have guardians of their own). Reparented away at once, so the autouse fixture cannot see them: every
    test here checks them explicitly. The launcher looks the same until it has
    forked the guardian and exited, so only session leaders count (the
    guardian calls ``setsid``; the launcher only leads a group).
    """
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(OSError, psutil.Error):  # gone meanwhile
            argv = proc.info["cmdline"] or []
            ours = argv[-1:] == [str(os.getpid())] and "_guardian.main()" in " ".join(argv)
            if ours and os.getsid(proc.pid) == proc.pid and _running(proc.pid):
                found.add(proc.pid)
    return found


async def _new_guardians(before: set[int], count: int) -> set[int]:
    """The guardians not in ``before``, once there are ``count`` of them (polled, at most 10 s)."""
    new: set[int] = set()
    for _ in range(500):
        new = _guardians() - before
        if len(new) >= count:
            break
        await trio.sleep(0.02)
    return new


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
async def test_one_guardian_serves_every_restart_of_a_supervisor_and_exits_with_it(start_method: str) -> None:
    before = _guardians()
    async with open_supervisor(EchoRunner, policy=FAST, timeouts=QUICK, start_method=start_method) as sup:
        await sup.wait_ready()
        guardians = await _new_guardians(before, 1)
        assert len(guardians) == 1
        runner = sup.statistics().pid
        assert runner is not None
        os.kill(runner, signal.SIGKILL)
        # Never started on the killed runner, so served by the next one.
        assert await sup.run(("pid",)) != runner
        with pytest.raises(RunnerCrashed):
            await sup.run(("exit", 3))
        await sup.wait_ready()
        assert sup.statistics().restarts == 2
        # No guardian per restart: the same one, still there.
        assert _guardians() - before == guardians
    assert await _until_gone(list(guardians), within=10) == []


async def test_each_supervisor_has_its_own_guardian() -> None:
    before = _guardians()
    async with (
        open_supervisor(EchoRunner, policy=FAST, timeouts=QUICK) as first,
        open_supervisor(EchoRunner, policy=FAST, timeouts=QUICK) as second,
    ):
        await first.wait_ready()
        await second.wait_ready()
        guardians = await _new_guardians(before, 2)
        assert len(guardians) == 2
        async with open_supervisor(EchoRunner, policy=FAST, timeouts=QUICK) as third:
            await third.wait_ready()
            third_guardian = await _new_guardians(before | guardians, 1)
            assert len(third_guardian) == 1
        # Closing one supervisor ends its guardian only, and kills no other runner.
        assert await _until_gone(list(third_guardian), within=10) == []
        assert all(_running(pid) for pid in guardians)
        assert await first.run(("pid",)) == first.statistics().pid
        assert first.statistics().restarts == second.statistics().restarts == 0
    assert await _until_gone(list(guardians), within=10) == []


async def test_no_guardian_outlives_a_supervisor_whose_runner_fails_setup() -> None:
    before = _guardians()
    policy = RestartPolicy(mode="temporary")
    found: set[int] = set()
    async with open_supervisor(EchoRunner, 1.0, True, policy=policy, timeouts=QUICK) as sup:
        async for change in sup.watch():
            if isinstance(change, Spawned):
                # setup() sleeps for a second before it raises
                found = await _new_guardians(before, 1)
            if isinstance(change, Stopped):
                break
    assert len(found) == 1
    assert await _until_gone(list(found), within=10) == []


def _register_in_a_child(lifeline_open: bool) -> tuple[int, bytes]:
    """Run ``_guardian.register`` in a fresh process group leader: (its exit code, the notes it wrote)."""
    notes_r, notes_w = os.pipe()
    lifeline_r, lifeline_w = os.pipe()
    if not lifeline_open:
        os.close(lifeline_w)
    code = (
        "import os, sys; from trio_runner import _guardian; "
        "told = _guardian.register(int(sys.argv[1]), int(sys.argv[2])); "
        "sys.exit(0 if told else 2)"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(notes_w), str(lifeline_r)],
            pass_fds=(notes_w, lifeline_r),
            process_group=0,
            timeout=60,
            check=False,
        )
        os.close(notes_w)
        notes_w = -1
        with os.fdopen(notes_r, "rb") as reader:
            notes_r = -1
            written = reader.read()
        return done.returncode, written
    finally:
        for fd in (notes_r, notes_w, lifeline_r, *([lifeline_w] if lifeline_open else [])):
            if fd != -1:
                os.close(fd)


def test_a_runner_registers_with_the_guardian_before_anything_else_runs() -> None:
    code, written = _register_in_a_child(lifeline_open=True)
    assert code == 0
    assert written.startswith(b"+") and written.endswith(b"\n")
    assert int(written[1:]) > 0


def test_a_runner_whose_supervisor_died_before_it_registered_exits_at_once() -> None:
    # The window between spawn and the note: the note is written, then the
    # lifeline is read. At end-of-file the supervisor is gone, and the guardian
    # may have swept already without this runner: it exits by itself.
    code, written = _register_in_a_child(lifeline_open=False)
    assert code == 1
    assert written.startswith(b"+")


_LAUNCH_FROM_LOW_FDS = """
import os, subprocess, sys, time
from trio_runner import _guardian

def moved(fd):
    new = os.dup2(fd, fd + 20, inheritable=False)
    os.close(fd)
    return new

lifeline_r, lifeline_w = (moved(fd) for fd in os.pipe())
notes_r, notes_w = (moved(fd) for fd in os.pipe())
# Now the numbers the guardian expects its pipes at (3 and 4) are free here.
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], process_group=0)
os.waitpid(_guardian.launch(lifeline_r, notes_r), 0)
os.write(notes_w, b"+%d\\n" % sleeper.pid)
time.sleep(1.5)  # a guardian without its lifeline would have swept by now
print(sleeper.poll() is None, sleeper.pid, flush=True)
os._exit(0)  # the lifeline's only write end goes with this process
"""


async def test_a_guardian_gets_its_pipes_whatever_fds_are_free_and_sweeps_only_when_the_lifeline_ends() -> (
    None
):
    done = await trio.run_process(
        [sys.executable, "-c", _LAUNCH_FROM_LOW_FDS], capture_stdout=True, cwd=Path(__file__).parents[1]
    )
    alive, sleeper = done.stdout.split()
    try:
        assert alive == b"True"  # not swept while the lifeline lived
        assert await _until_gone([int(sleeper)], within=10) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(sleeper), signal.SIGKILL)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="compares ps with /proc")
def test_the_guardians_ps_scan_agrees_with_proc() -> None:
    # macOS has no /proc: the guardian reads the tree from ps there. Checked
    # here against /proc, for a family whose shape is known.
    from trio_runner import _guardian

    with (
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as in_group,
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True
        ) as away,
    ):
        try:
            from_ps, from_proc = _guardian.ps_table(), _guardian.process_table()
            assert from_ps is not None and from_proc is not None
            me = os.getpid()
            for table in (from_ps, from_proc):
                assert table[in_group.pid].ppid == table[away.pid].ppid == me
                assert table[away.pid].pgid == away.pid != table[in_group.pid].pgid
                assert not table[me].dead
                found = _guardian.escaped(table, {me}, os.getpgid(0), {}, exclude=None)
                assert away.pid in found and in_group.pid not in found
        finally:
            in_group.kill()
            away.kill()


async def test_a_guardian_that_cannot_be_started_is_logged_and_the_runner_still_serves(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from trio_runner import _guardian

    monkeypatch.setattr(_guardian, "launch", lambda lifeline, notes: None)
    before = _guardians()
    async with open_supervisor(EchoRunner, policy=FAST, timeouts=QUICK) as sup:
        assert await sup.run(("pid",)) == sup.statistics().pid
    assert "the guardian process could not be started" in caplog.text
    assert _guardians() == before
