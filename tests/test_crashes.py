"""Fault injection: the runner dies, and every task still gets exactly one outcome.

Each test kills a real child process in one way (a signal, an exit code, a
broken frame, an import that fails) and checks three things: how the exit is
classified, what the task in flight receives, and whether the restart policy
brings the runner back. Timing bounds are generous on purpose: only a real bug
(a lost wake-up, a blocked event loop) breaks them.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from trio_runner import (
    BackingOff,
    Exited,
    ExitReason,
    GaveUp,
    LifecycleChange,
    Ready,
    RestartLimitExceeded,
    RestartPolicy,
    RunnerCrashed,
    RunnerState,
    RunnerUnavailable,
    Spawned,
    Stopped,
    StoppedBy,
    Supervisor,
    TaskCancelled,
    Timeouts,
    open_supervisor,
)
from trio_runner import _protocol as proto

from .fault_runners import ConcurrentFaultRunner, FaultRunner, MissingModuleRunner
from .runners import EchoRunner

FAST = RestartPolicy(initial_delay=0.05, max_delay=0.2)
QUICK = Timeouts(heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)
SCRIPTS = Path(__file__).parent / "scripts"
# A 1 ms sleep waking this late means the loop was blocked: a blocking join,
# put or send on the trio thread shows up far above it, a loaded machine not.
LATENESS_BOUND = 0.5


class Ticker:
    """Sleeps 1 ms over and over and records the worst lateness: a blocked loop shows up here."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            start = trio.current_time()
            await trio.sleep(0.001)
            self.worst = max(self.worst, trio.current_time() - start - 0.001)


@asynccontextmanager
async def lateness_ticker() -> AsyncIterator[Ticker]:
    ticker = Ticker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        yield ticker
        nursery.cancel_scope.cancel()


async def lifecycle(sup: Supervisor[object, object, object]) -> list[tuple[object, ...]]:
    """The supervisor's whole lifecycle, once it has stopped, as comparable tuples."""
    changes: list[LifecycleChange] = [change async for change in sup.watch(replay=True)]
    summary: list[tuple[object, ...]] = []
    for change in changes:
        if isinstance(change, Exited):
            summary.append((Exited, change.exit.reason))
        elif isinstance(change, Stopped):
            summary.append((Stopped, change.state))
        else:
            summary.append((type(change),))
    return summary


def restarted_once(reason: ExitReason) -> list[tuple[object, ...]]:
    return [
        (Spawned,),
        (Ready,),
        (Exited, reason),
        (BackingOff,),
        (Spawned,),
        (Ready,),
        (Exited, ExitReason.REQUESTED),
        (Stopped, RunnerState.STOPPED),
    ]


def ran_once(reason: ExitReason) -> list[tuple[object, ...]]:
    return [(Spawned,), (Ready,), (Exited, reason), (Stopped, RunnerState.STOPPED)]


# -- signals and exit codes ------------------------------------------------------------


@pytest.mark.parametrize(
    "signum",
    [signal.SIGKILL, signal.SIGSEGV, signal.SIGHUP, signal.SIGTERM, signal.SIGABRT],
    ids=lambda signum: signum.name,
)
async def test_signal_mid_stream_fails_task_with_runner_crashed_naming_the_signal_and_restarts(
    signum: signal.Signals,
) -> None:
    async with lateness_ticker() as ticker:
        async with open_supervisor(FaultRunner, policy=FAST, timeouts=QUICK) as sup:
            first_pid = await sup.run(("pid",))
            events: list[object] = []
            async with sup.stream(("die_by_signal", signum)) as task:
                with pytest.raises(RunnerCrashed) as info:
                    async for event in task:
                        events.append(event)
            noticed = time.monotonic()
            assert await sup.run(("pid",)) not in (first_pid, None)
            stats = sup.statistics()
    assert events == ["about to die"]
    crash = info.value
    assert crash.reason is ExitReason.SIGNALED
    assert (crash.exit.signal, crash.exit.signal_name) == (signum, signum.name)
    assert signum.name in str(crash)
    assert (crash.exit.pid, crash.exit.stopped_by) == (first_pid, StoppedBy.SELF)
    # The child printed the moment it signalled itself (CLOCK_MONOTONIC is system-wide).
    died_at = float(next(line for line in crash.exit.stderr_tail if line.startswith("dying at")).split()[-1])
    assert noticed - died_at < 4.0  # not a liveness poll every 5 s (exo's)
    assert (stats.restarts, stats.incarnation) == (1, 2)
    assert await lifecycle(sup) == restarted_once(ExitReason.SIGNALED)
    assert ticker.worst < LATENESS_BOUND


async def test_os_exit_3_is_an_error_exit_with_code_3_and_permanent_restarts() -> None:
    async with open_supervisor(EchoRunner, policy=FAST, timeouts=QUICK) as sup:
        first_pid = await sup.run(("pid",))
        with pytest.raises(RunnerCrashed) as info:
            await sup.run(("exit", 3))
        assert await sup.run(("pid",)) != first_pid
        assert sup.statistics().restarts == 1
    assert info.value.reason is ExitReason.ERROR_EXIT
    assert (info.value.exit.exitcode, info.value.exit.signal) == (3, None)
    assert "code 3" in str(info.value)
    assert await lifecycle(sup) == restarted_once(ExitReason.ERROR_EXIT)


async def test_unasked_exit_0_is_a_clean_exit_and_permanent_restarts() -> None:
    async with open_supervisor(EchoRunner, policy=FAST, timeouts=QUICK) as sup:
        first_pid = await sup.run(("pid",))
        with pytest.raises(RunnerCrashed) as info:
            await sup.run(("exit", 0))
        assert await sup.run(("pid",)) != first_pid
        assert sup.statistics().restarts == 1
    assert info.value.reason is ExitReason.CLEAN_EXIT
    assert info.value.exit.exitcode == 0
    assert "code 0" in str(info.value)
    assert await lifecycle(sup) == restarted_once(ExitReason.CLEAN_EXIT)


async def test_transient_does_not_restart_after_a_clean_exit_and_stops_quietly() -> None:
    policy = RestartPolicy(mode="transient", initial_delay=0.05, max_delay=0.2)
    async with open_supervisor(EchoRunner, policy=policy, timeouts=QUICK) as sup:
        with pytest.raises(RunnerCrashed) as info:
            await sup.run(("exit", 0))
        with trio.fail_after(5):
            changes = [change async for change in sup.watch(replay=True)]  # ends with Stopped
        assert changes[-1] == Stopped(RunnerState.STOPPED, info.value.exit)
        assert sup.state is RunnerState.STOPPED
        with pytest.raises(RunnerUnavailable):
            await sup.run(("echo", 1))
    # Leaving the block raised nothing.
    assert info.value.reason is ExitReason.CLEAN_EXIT
    assert (sup.statistics().restarts, sup.statistics().incarnation) == (0, 1)
    assert await lifecycle(sup) == ran_once(ExitReason.CLEAN_EXIT)


async def test_transient_restarts_after_an_error_exit() -> None:
    policy = RestartPolicy(mode="transient", initial_delay=0.05, max_delay=0.2)
    async with open_supervisor(EchoRunner, policy=policy, timeouts=QUICK) as sup:
        first_pid = await sup.run(("pid",))
        with pytest.raises(RunnerCrashed):
            await sup.run(("exit", 3))
        assert await sup.run(("pid",)) != first_pid
    assert await lifecycle(sup) == restarted_once(ExitReason.ERROR_EXIT)


async def test_temporary_never_restarts_even_after_an_error_exit() -> None:
    policy = RestartPolicy(mode="temporary", initial_delay=0.05, max_delay=0.2)
    async with open_supervisor(EchoRunner, policy=policy, timeouts=QUICK) as sup:
        with pytest.raises(RunnerCrashed) as info:
            await sup.run(("exit", 3))
        with pytest.raises(RunnerUnavailable):
            await sup.run(("echo", 1))
        assert sup.state is RunnerState.STOPPED
    assert info.value.reason is ExitReason.ERROR_EXIT
    assert (sup.statistics().restarts, sup.statistics().incarnation) == (0, 1)
    assert await lifecycle(sup) == ran_once(ExitReason.ERROR_EXIT)


# -- failures at startup -----------------------------------------------------------------

GIVE_UP_AFTER_ONE = RestartPolicy(initial_delay=0.05, max_delay=0.2, max_restarts=1)


async def test_setup_raising_is_startup_failed_and_the_policy_gives_up_with_restart_limit_exceeded() -> None:
    with trio.fail_after(10), pytest.raises(RestartLimitExceeded) as info:
        async with open_supervisor(
            EchoRunner, kwargs={"fail_setup": True}, policy=GIVE_UP_AFTER_ONE, timeouts=QUICK
        ) as sup:
            await trio.sleep_forever()
    last = info.value.last_exit
    assert info.value.restarts == 1
    assert last.reason is ExitReason.STARTUP_FAILED
    assert last.remote_traceback is not None
    assert "setup failed on purpose" in last.remote_traceback
    assert "in setup" in last.remote_traceback
    assert sup.state is RunnerState.FAILED
    assert sup.statistics().incarnation == 2
    assert await lifecycle(sup) == [
        (Spawned,),
        (Exited, ExitReason.STARTUP_FAILED),
        (BackingOff,),
        (Spawned,),
        (Exited, ExitReason.STARTUP_FAILED),
        (GaveUp,),
        (Stopped, RunnerState.FAILED),
    ]


async def test_a_task_waiting_when_the_policy_gives_up_sees_restart_limit_exceeded_on_its_own() -> None:
    with trio.fail_after(10), pytest.raises(RestartLimitExceeded):
        async with open_supervisor(
            EchoRunner, kwargs={"fail_setup": True}, policy=GIVE_UP_AFTER_ONE, timeouts=QUICK
        ) as sup:
            await sup.run(("echo", "never served"))


@pytest.mark.parametrize(
    ("module", "qualname", "expected"),
    [
        ("tests.fault_runners", "ParentOnlyRunner", "AttributeError"),
        ("tests.scripts.child_import_fails", "ImportFailsInChildRunner", "refuses to load in a child"),
    ],
    ids=["class-missing-in-child", "module-raises-on-import-in-child"],
)
async def test_a_runner_the_child_cannot_load_fails_at_once_without_restarts(
    module: str, qualname: str, expected: str
) -> None:
    runner = getattr(__import__(module, fromlist=[qualname]), qualname)
    with trio.fail_after(10), pytest.raises(RunnerCrashed) as info:
        async with open_supervisor(runner, policy=FAST, timeouts=QUICK) as sup:
            await trio.sleep_forever()
    crash = info.value
    assert crash.reason is ExitReason.STARTUP_FAILED
    assert crash.remote_traceback is not None
    assert expected in crash.remote_traceback
    assert "importable" in crash.exit.detail  # the hint
    stats = sup.statistics()
    assert (stats.incarnation, stats.restarts, stats.state) == (1, 0, RunnerState.FAILED)


@pytest.mark.parametrize(
    ("module", "hide", "hint"),
    [
        ("mlx_lm", True, "pip install 'trio-runner[mlx]'"),
        ("prometheus_client", True, "pip install 'trio-runner[serve]'"),
        ("trio_runner_no_such_module", False, "install it where the runner runs"),
    ],
)
async def test_a_module_missing_in_setup_fails_at_once_with_an_install_hint_and_no_restart(
    module: str, hide: bool, hint: str
) -> None:
    # A restart would wait a minute: only failing at once passes the bound.
    patient = RestartPolicy(initial_delay=60.0)
    with trio.fail_after(30), pytest.raises(RunnerCrashed) as info:
        async with open_supervisor(MissingModuleRunner, module, hide, policy=patient, timeouts=QUICK) as sup:
            await trio.sleep_forever()
    crash = info.value
    assert crash.reason is ExitReason.STARTUP_FAILED
    assert f"setup() raised ModuleNotFoundError: No module named '{module}'" in crash.exit.detail
    assert hint in crash.exit.detail
    assert "\n" not in crash.exit.detail
    stats = sup.statistics()
    assert (stats.incarnation, stats.restarts, stats.state) == (1, 0, RunnerState.FAILED)
    assert [type(change).__name__ async for change in sup.watch(replay=True)] == [
        "Spawned",
        "Exited",
        "GaveUp",
        "Stopped",
    ]


async def test_a_script_without_a_main_guard_fails_fast_naming_the_guard_and_leaves_no_process() -> None:
    marker = f"no-main-guard-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "TRIO_RUNNER_TEST_MARKER": marker}
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, str(SCRIPTS / "no_main_guard.py")],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
        )
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert 'if __name__ == "__main__":' in stderr
    assert "guard" in stderr
    assert b"never reached" not in result.stdout
    # The script's runner (and anything it started) was reparented away from
    # us when the script exited: find them by the marker in their environment.
    for _ in range(60):  # up to 3 s
        if not (left := _marked_live_processes(marker)):
            break
        await trio.sleep(0.05)
    assert left == []


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
async def test_a_script_fed_on_stdin_is_told_to_save_it_to_a_file_not_to_add_a_guard(
    start_method: str,
) -> None:
    # The child would fail with FileNotFoundError: '<stdin>', which read like a missing guard.
    script = (SCRIPTS / "guarded_for_stdin.py").read_bytes()
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-", start_method],
            stdin=script,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=str(SCRIPTS.parents[1]),
        )
    error = result.stderr.decode().strip().splitlines()[-1]
    assert result.returncode == 1
    assert error.startswith("RuntimeError: this program was read from standard input ('python -')"), error
    assert f"the {start_method} start method" in error
    assert "save the script to a file" in error
    assert "guard" not in error
    # Found in the parent, before any runner process started.
    assert b"FileNotFoundError" not in result.stderr
    assert b"never reached" not in result.stdout


def _marked_live_processes(marker: str) -> list[tuple[int, str]]:
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.environ().get("TRIO_RUNNER_TEST_MARKER") == marker and proc.status() != "zombie":
                found.append((proc.pid, proc.name()))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


# -- what the task in flight gets ----------------------------------------------------------


async def test_a_result_sent_just_before_the_runner_dies_is_delivered() -> None:
    async with open_supervisor(FaultRunner, policy=FAST, timeouts=QUICK) as sup:
        for attempt in range(3):
            dying_pid = await sup.run(("pid",))
            last_words = f"last words {attempt} {dying_pid}"  # unique, so only the result matches
            assert await sup.run(("result_then_die", last_words)) == last_words
            # The next task lands on the dying runner or on its successor.
            try:
                assert await sup.run(("pid",)) != dying_pid
            except RunnerCrashed as crash:
                assert crash.reason is ExitReason.ERROR_EXIT
                assert crash.exit.pid == dying_pid
        assert sup.statistics().restarts == 3


@pytest.mark.parametrize("runner", [FaultRunner, ConcurrentFaultRunner], ids=["one-at-a-time", "two-at-once"])
async def test_a_crash_fails_only_the_started_tasks_and_the_backlog_runs_on_the_next_runner(
    runner: type[FaultRunner],
) -> None:
    async with open_supervisor(runner, policy=FAST) as sup:
        first_pid = await sup.run(("pid",))
        outcomes: dict[int, object] = {}

        async def queued(i: int, request: tuple[object, ...] = ("pid",)) -> None:
            try:
                outcomes[i] = await sup.run(request)
            except RunnerCrashed as exc:
                outcomes[i] = exc

        async with trio.open_nursery() as nursery:
            async with sup.stream(("die_by_signal", signal.SIGKILL)) as dying:
                await dying.__anext__()  # handle() runs
                if runner.concurrency > 1:
                    # Started beside the dying task: it fails with it.
                    nursery.start_soon(queued, -1, ("sleep", 30))
                    await trio.sleep(0.05)
                for i in range(10):
                    nursery.start_soon(queued, i)
                with pytest.raises(RunnerCrashed):
                    await dying.wait()
    # Written to the dying runner but never started there: served by the next one.
    assert {i: outcomes[i] for i in range(10)} == {i: outcomes[0] for i in range(10)}
    assert outcomes[0] != first_pid and isinstance(outcomes[0], int)
    if runner.concurrency > 1:
        assert isinstance(outcomes[-1], RunnerCrashed)


async def test_a_retry_task_runs_again_after_a_crash_and_succeeds(tmp_path: Path) -> None:
    marker = tmp_path / "attempted"
    async with open_supervisor(FaultRunner, policy=FAST, timeouts=QUICK) as sup:
        assert await sup.run(("crash_once", str(marker)), retry=True) == "second attempt"
        stats = sup.statistics()
    assert marker.exists()
    assert (stats.restarts, stats.incarnation, stats.in_flight) == (1, 2, 0)
    assert await lifecycle(sup) == restarted_once(ExitReason.ERROR_EXIT)


async def test_runner_crashed_carries_a_bounded_tail_of_stderr() -> None:
    lines = 500
    async with open_supervisor(FaultRunner, policy=FAST, timeouts=QUICK) as sup:
        with pytest.raises(RunnerCrashed) as info:
            await sup.run(("stderr_then_crash", lines))
    tail = info.value.exit.stderr_tail
    assert 0 < len(tail) <= 100
    assert tail == tuple(f"stderr line {i}" for i in range(lines - len(tail), lines))
    assert f"stderr line {lines - 1}" in str(info.value)
    assert info.value.exit.exitcode == 2


@pytest.mark.parametrize(
    ("command", "detail"),
    [("corrupt_frame", "corrupt"), ("oversize_frame", "exceeds")],
)
async def test_a_broken_frame_is_a_protocol_error_the_runner_is_killed_and_restarted(
    command: str, detail: str
) -> None:
    async with open_supervisor(FaultRunner, policy=FAST, timeouts=QUICK) as sup:
        first_pid = await sup.run(("pid",))
        with trio.fail_after(5), pytest.raises(RunnerCrashed) as info:
            await sup.run((command,))
        assert await sup.run(("pid",)) != first_pid
    crash = info.value
    assert crash.reason is ExitReason.PROTOCOL_ERROR
    assert detail in crash.exit.detail
    assert (crash.exit.stopped_by, crash.exit.signal) == (StoppedBy.SIGKILL, signal.SIGKILL)
    assert await lifecycle(sup) == restarted_once(ExitReason.PROTOCOL_ERROR)


async def test_a_corrupt_frame_read_together_with_a_good_one_is_still_a_protocol_error() -> None:
    async with open_supervisor(FaultRunner, policy=FAST, timeouts=QUICK) as sup:
        first_pid = await sup.run(("pid",))
        with trio.fail_after(5), pytest.raises(RunnerCrashed) as info:
            await sup.run(("good_then_corrupt_frame",))
        assert await sup.run(("pid",)) != first_pid
    assert info.value.reason is ExitReason.PROTOCOL_ERROR


def _wire(message: proto.FromChild) -> tuple[Any, ...]:
    """``message`` as it travels in a frame: a plain tuple, its tag first."""
    return pickle.loads(proto.encode([message])[proto.HEADER.size :])[0]


@pytest.mark.parametrize(
    "message",
    [
        _wire(proto.Started(1))[:1],
        _wire(proto.Error(1, "x", "y", "z"))[:3],
        ("events", 1, b""),
        (_wire(proto.Fatal("a", "b", "c", "d"))[0], 1, "b", "c", "d"),
        list(_wire(proto.Started(1))),
    ],
    ids=["too-short", "wrong-arity", "unknown-tag", "wrong-type", "not-a-tuple"],
)
async def test_a_malformed_message_is_a_protocol_error_and_the_runner_is_restarted(message: object) -> None:
    async with open_supervisor(FaultRunner, policy=FAST) as sup:
        first_pid = await sup.run(("pid",))
        with pytest.raises(RunnerCrashed) as info:
            await sup.run(("malformed_message", message))
        assert info.value.reason is ExitReason.PROTOCOL_ERROR
        assert await sup.run(("pid",)) != first_pid


# -- sends that race the runner's death ----------------------------------------------------
#
# Between a runner's death and the death watch waking, the supervisor may still
# write to the runner's socket and get EPIPE. "break_socket" holds that moment
# open: the child shuts its control socket and lives on, so each send path (task,
# cancel, Shutdown) meets a broken pipe every time. The supervisor then kills the
# runner as PROTOCOL_ERROR, a second after the end of file.

DEATH_WATCH = Timeouts(heartbeat=1.0, graceful=0.5, terminate=0.5, kill=1)


async def test_a_task_sent_to_a_dying_runner_is_delivered_again_to_the_next_runner() -> None:
    async with open_supervisor(FaultRunner, policy=FAST, timeouts=DEATH_WATCH) as sup:
        first_pid = await sup.run(("pid",))
        async with sup.stream(("break_socket",)) as breaker:
            await trio.sleep(0.3)  # the child shuts its socket within a few ms of the task starting
            # The runner never saw this task start (no ACK): it runs on the next one.
            with trio.fail_after(DEATH_WATCH.heartbeat + 10):
                second_pid = await sup.run(("pid",))
            with pytest.raises(RunnerCrashed) as info:
                await breaker.wait()
        assert second_pid != first_pid
        assert info.value.reason is ExitReason.PROTOCOL_ERROR


async def test_a_cancel_sent_to_a_dying_runner_ends_the_task_as_cancelled_and_the_runner_restarts() -> None:
    async with open_supervisor(FaultRunner, policy=FAST, timeouts=DEATH_WATCH) as sup:
        first_pid = await sup.run(("pid",))
        async with sup.stream(("break_socket",)) as task:
            await trio.sleep(0.3)
            await task.cancel()
            with trio.fail_after(DEATH_WATCH.heartbeat + 3), pytest.raises(TaskCancelled):
                await task.wait()
        assert await sup.run(("pid",)) != first_pid
    assert await lifecycle(sup) == restarted_once(ExitReason.PROTOCOL_ERROR)


async def test_a_runner_that_shuts_its_control_connection_is_killed_at_once_as_a_protocol_error() -> None:
    # The heartbeat timeout is far away: only the end of file can explain it in time.
    timeouts = Timeouts(heartbeat=60.0, graceful=0.5, terminate=0.5, kill=1)
    async with open_supervisor(FaultRunner, policy=FAST, timeouts=timeouts) as sup:
        first_pid = await sup.run(("pid",))
        with trio.fail_after(15), pytest.raises(RunnerCrashed) as info:
            await sup.run(("shut_control_socket",))
        assert await sup.run(("pid",)) != first_pid
    crash = info.value.exit
    assert (crash.reason, crash.stopped_by, crash.pid) == (
        ExitReason.PROTOCOL_ERROR,
        StoppedBy.SIGKILL,
        first_pid,
    )
    assert "closed its control connection" in crash.detail
    assert "frozen" not in crash.detail


async def test_leaving_open_supervisor_while_the_runner_dies_is_bounded_and_raises_nothing() -> None:
    start = trio.current_time()
    async with open_supervisor(FaultRunner, policy=FAST, timeouts=DEATH_WATCH) as sup:
        async with sup.stream(("break_socket",)):
            await trio.sleep(0.3)
    assert trio.current_time() - start < DEATH_WATCH.shutdown_bound + 10
    exit_record = sup.statistics().last_exit
    assert exit_record is not None
    assert exit_record.reason is ExitReason.REQUESTED


async def test_a_task_submitted_while_a_dead_runner_drains_waits_for_the_restart() -> None:
    async with open_supervisor(EchoRunner, policy=FAST) as sup:
        await sup.wait_ready()
        async with trio.open_nursery() as nursery:
            crashed: list[BaseException] = []

            async def crasher() -> None:
                try:
                    await sup.run(("grandchild_then_die",))
                except RunnerCrashed as exc:
                    crashed.append(exc)

            nursery.start_soon(crasher)
            await trio.sleep(0.3)
            with trio.fail_after(10):
                assert await sup.run(("echo", 1)) == 1
        assert len(crashed) == 1


async def test_giving_up_raises_restart_limit_exceeded_alone_even_with_a_task_waiting() -> None:
    policy = RestartPolicy(initial_delay=0.05, max_delay=0.05, max_restarts=1)
    with pytest.raises(RestartLimitExceeded) as info:
        async with open_supervisor(EchoRunner, kwargs={"fail_setup": True}, policy=policy) as sup:
            await sup.run(("echo", 1))
    assert info.value.last_exit.reason is ExitReason.STARTUP_FAILED
    assert "setup failed on purpose" in (info.value.last_exit.remote_traceback or "")


async def test_crash_exit_is_reported_promptly() -> None:
    async with open_supervisor(EchoRunner, policy=FAST) as sup:
        await sup.wait_ready()
        start = time.monotonic()
        with pytest.raises(RunnerCrashed):
            await sup.run(("exit", 3))
        # Only a hang: the claim "no writer-thread or drain delay of a second on
        # the way" is a timing claim, measured by benchmarks/bench_crash.py
        # (crash detection over the kernel's floor, same run).
        assert time.monotonic() - start < 5.0


async def test_a_retry_task_that_is_never_rerun_ends_with_its_crash() -> None:
    async with open_supervisor(EchoRunner, policy=RestartPolicy(mode="temporary")) as sup:
        with pytest.raises(RunnerCrashed) as info:
            await sup.run(("signal", 9), retry=True)
        assert info.value.exit.signal == 9


async def test_a_retried_stream_counts_its_attempts() -> None:
    async with open_supervisor(EchoRunner, policy=FAST) as sup:
        await sup.wait_ready()
        async with sup.stream(("grandchild_then_die",), retry=True) as task:
            assert task.attempt == 1
            assert await task.__anext__() == "x"
            with trio.fail_after(10):
                assert await task.__anext__() == "x"  # the re-run streams from the start
            assert task.attempt == 2
            await task.cancel()
