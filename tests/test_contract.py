"""Contract tests: the public API against real child processes.

Each test states one behaviour. Timing bounds here are generous on purpose:
only a real bug (a hang, a lost wake-up) breaks them; the figures themselves
belong to the benchmarks.
"""

from __future__ import annotations

import functools
import os
import pickle
import threading

import pytest
import trio

import trio_runner
from trio_runner import (
    RestartPolicy,
    RunnerState,
    RunnerUnavailable,
    TaskCancelled,
    TaskFailed,
    Timeouts,
    open_supervisor,
    run_supervisor,
)

from .runners import EchoRunner

FAST = RestartPolicy(initial_delay=0.05, max_delay=0.2)


async def test_streams_ten_thousand_events_in_order_and_returns_the_result() -> None:
    async with open_supervisor(EchoRunner) as sup, sup.stream(("count", 10_000)) as task:
        seen = [event async for event in task]
        assert seen == list(range(10_000))
        assert task.result == 10_000


async def test_run_returns_the_result() -> None:
    async with open_supervisor(EchoRunner) as sup:
        assert await sup.run(("echo", {"a": [1, 2, 3]})) == {"a": [1, 2, 3]}


async def test_handle_raising_fails_the_task_with_the_remote_traceback_and_the_runner_serves_on() -> None:
    async with open_supervisor(EchoRunner) as sup:
        pid = await sup.run(("pid",))
        with pytest.raises(TaskFailed) as info:
            await sup.run(("raise", "boom"))
        assert info.value.remote_type == "ValueError"
        assert info.value.remote_message == "boom"
        assert "raise ValueError(args[0])" in info.value.remote_traceback
        assert await sup.run(("pid",)) == pid


@pytest.mark.parametrize("kind", ["KeyboardInterrupt", "GeneratorExit", "NotAnException"])
async def test_handle_raising_a_base_exception_fails_only_that_task_and_the_runner_serves_on(
    kind: str,
) -> None:
    async with open_supervisor(EchoRunner) as sup:
        pid = await sup.run(("pid",))
        with pytest.raises(TaskFailed) as info:
            await sup.run(("raise_base", kind, "interrupted"))
        assert info.value.remote_type.endswith(kind)
        assert info.value.remote_message == "interrupted"
        assert await sup.run(("pid",)) == pid
    assert sup.statistics().restarts == 0


async def test_sys_exit_in_handle_ends_the_runner_process_with_its_code() -> None:
    policy = RestartPolicy(mode="temporary")
    async with open_supervisor(EchoRunner, policy=policy) as sup:
        with pytest.raises(trio_runner.RunnerCrashed) as info:
            await sup.run(("sys_exit", 3))
    assert info.value.exit.reason is trio_runner.ExitReason.ERROR_EXIT
    assert info.value.exit.exitcode == 3


async def test_iterating_a_failed_task_raises_after_its_events() -> None:
    async with open_supervisor(EchoRunner) as sup, sup.stream(("raise", "late")) as task:
        with pytest.raises(TaskFailed):
            async for _ in task:
                pass
        with pytest.raises(TaskFailed):
            task.result  # noqa: B018 - the property raises


async def test_result_before_the_end_is_a_runtime_error() -> None:
    async with open_supervisor(EchoRunner) as sup, sup.stream(("sleep", 0.2)) as task:
        with pytest.raises(RuntimeError, match="still running"):
            task.result  # noqa: B018
        assert await task.wait() == "slept"


async def test_task_cancel_ends_the_task_with_task_cancelled_and_the_runner_serves_on() -> None:
    async with open_supervisor(EchoRunner) as sup:
        pid = await sup.run(("pid",))
        async with sup.stream(("spin_until_cancelled", 5)) as task:
            first = await task.__anext__()
            assert first == 0
            await task.cancel()
            with pytest.raises(TaskCancelled):
                await task.wait()
        assert await sup.run(("pid",)) == pid


async def test_cancelling_the_callers_scope_cancels_the_task_in_the_runner() -> None:
    async with open_supervisor(EchoRunner) as sup:
        with trio.move_on_after(0.3) as scope:
            await sup.run(("spin_until_cancelled",))
        assert scope.cancelled_caught
        # The runner is free again: a cancelled task no longer occupies it.
        with trio.fail_after(10):
            assert await sup.run(("echo", 1)) == 1
        assert sup.statistics().in_flight == 0


async def test_cancel_all_cancels_running_and_queued_tasks() -> None:
    outcomes: list[BaseException | object] = []
    async with open_supervisor(EchoRunner) as sup:
        await sup.wait_ready()

        async def submit(request: object) -> None:
            try:
                outcomes.append(await sup.run(request))
            except TaskCancelled as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(submit, ("spin_until_cancelled",))
            await trio.sleep(0.3)
            await sup.cancel_all()
        assert len(outcomes) == 3
        assert all(isinstance(outcome, TaskCancelled) for outcome in outcomes)
        assert await sup.run(("echo", "still here")) == "still here"


async def test_leaving_a_stream_block_early_returns_at_once() -> None:
    async with open_supervisor(EchoRunner) as sup:
        await sup.wait_ready()
        async with sup.stream(("hang",)) as task:  # a runner that ignores cancels
            await trio.sleep(0.1)
            start = trio.current_time()
        assert trio.current_time() - start < 5.0  # the runner never ends the task by itself
        assert not task.done


async def test_a_task_submitted_before_ready_waits_for_the_runner() -> None:
    async with open_supervisor(EchoRunner, 0.3) as sup:
        assert sup.state is RunnerState.STARTING
        assert await sup.run(("echo", "patient")) == "patient"
        assert sup.state is RunnerState.READY


async def test_unpicklable_request_raises_type_error_at_the_call_and_the_runner_is_untouched() -> None:
    async with open_supervisor(EchoRunner) as sup:
        pid = await sup.run(("pid",))
        with pytest.raises(TypeError, match="cannot be pickled"):
            await sup.run(("echo", threading.Lock()))
        assert await sup.run(("pid",)) == pid


async def test_request_larger_than_max_frame_raises_value_error() -> None:
    async with open_supervisor(EchoRunner, max_frame_size=64 * 1024) as sup:
        with pytest.raises(ValueError, match="max_frame_size"):
            await sup.run(("echo", b"x" * 100_000))


class _LocalRunner(trio_runner.Runner[object, object, object]):
    pass


def test_runner_defined_in_a_function_is_rejected_with_a_hint() -> None:
    class Inner(trio_runner.Runner[object, object, object]):
        pass

    with pytest.raises(TypeError, match="module level"):
        open_supervisor(Inner)  # the check runs at the call, before any await


def test_a_class_that_is_not_a_runner_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"subclass of trio_runner\.Runner"):
        open_supervisor(dict)  # type: ignore[arg-type]


def test_unpicklable_runner_arguments_are_rejected() -> None:
    with pytest.raises(TypeError, match="arguments cannot be pickled"):
        open_supervisor(EchoRunner, threading.Lock())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"startup": 0},
        {"cancel_send": -1},
        {"heartbeat": float("nan")},
        {"graceful": float("inf")},
        {"stall": 0.0},
    ],
)
def test_bad_timeouts_raise_value_error_naming_the_argument(kwargs: dict[str, float]) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        Timeouts(**kwargs)


def test_timeouts_of_the_wrong_type_raise_type_error() -> None:
    with pytest.raises(TypeError, match="kill"):
        Timeouts(kill="2")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "sometimes"}, "mode"),
        ({"initial_delay": -1}, "initial_delay"),
        ({"factor": 0.5}, "factor"),
        ({"max_restarts": -1}, "max_restarts"),
        ({"jitter": 2}, "jitter"),
        ({"initial_delay": 10, "max_delay": 5}, "max_delay"),
        ({"reset_after": 0}, "reset_after"),
    ],
)
def test_bad_policy_numbers_raise_value_error_naming_the_argument(
    kwargs: dict[str, object], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        RestartPolicy(**kwargs)  # type: ignore[arg-type]


def test_unsupported_start_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="start_method"):
        open_supervisor(EchoRunner, start_method="fork")


async def test_leaving_open_supervisor_fails_outside_tasks_with_runner_unavailable() -> None:
    outcome: list[BaseException] = []

    async def outsider(sup: trio_runner.Supervisor[object, object, object]) -> None:
        try:
            await sup.run(("hang",))
        except RunnerUnavailable as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        async with open_supervisor(EchoRunner, timeouts=Timeouts(graceful=0.5, terminate=1)) as sup:
            await sup.wait_ready()
            nursery.start_soon(outsider, sup)
            await trio.sleep(0.2)
    assert len(outcome) == 1
    assert sup.state is RunnerState.STOPPED
    with pytest.raises(RunnerUnavailable):
        await sup.run(("echo", 1))


async def test_the_bodys_own_exception_group_comes_out_unchanged() -> None:
    group = ExceptionGroup("mine", [ValueError("inner")])
    with pytest.raises(ExceptionGroup) as info:
        async with open_supervisor(EchoRunner):
            raise group
    # trio's cancel scopes re-derive groups that pass through them, so compare
    # the shape: the same message and the very same inner exception, one level.
    assert info.value.message == "mine"
    assert info.value.exceptions == group.exceptions


async def test_run_supervisor_under_nursery_start_and_cancellation_shuts_down() -> None:
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(functools.partial(run_supervisor, EchoRunner, policy=FAST))
        assert await sup.run(("echo", "ok")) == "ok"
        pid = sup.statistics().pid
        nursery.cancel_scope.cancel()
    assert sup.state is RunnerState.STOPPED
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_child_output_goes_to_logging_line_by_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="trio_runner.runner")
    async with open_supervisor(EchoRunner, name="printer") as sup:
        await sup.run(("print", "hello stdout", "hello stderr"))
    records = [
        (r.name, r.levelname, r.getMessage())
        for r in caplog.records
        if r.name.startswith("trio_runner.runner")
    ]
    assert ("trio_runner.runner.printer", "INFO", "hello stdout") in records
    assert ("trio_runner.runner.printer", "WARNING", "hello stderr") in records


async def test_statistics_is_a_frozen_snapshot() -> None:
    async with open_supervisor(EchoRunner) as sup:
        await sup.wait_ready()
        stats = sup.statistics()
        assert stats.state is RunnerState.READY
        assert stats.incarnation == 1
        assert stats.restarts == 0
        assert stats.pid == await sup.run(("pid",))
        with pytest.raises(AttributeError):
            stats.restarts = 3  # type: ignore[misc]


async def test_importing_the_child_side_api_does_not_import_trio() -> None:
    code = (
        "import sys, trio_runner; from trio_runner import Runner, TaskContext; print('trio' in sys.modules)"
    )
    result = await trio.run_process([os.sys.executable, "-c", code], capture_stdout=True)
    assert result.stdout.strip() == b"False"


def test_errors_pickle_round_trip() -> None:
    error = TaskFailed("ValueError", "boom", "Traceback...")
    assert pickle.loads(pickle.dumps(error)).remote_message == "boom"


def test_crash_and_give_up_errors_pickle_round_trip() -> None:
    record = trio_runner.ExitRecord(trio_runner.ExitReason.SIGNALED, signal=9, pid=123)
    crashed = pickle.loads(pickle.dumps(trio_runner.RunnerCrashed(record)))
    assert crashed.exit == record
    gave_up = pickle.loads(pickle.dumps(trio_runner.RestartLimitExceeded(10, record)))
    assert (gave_up.restarts, gave_up.last_exit) == (10, record)


async def test_a_consumer_that_stops_reading_stalls_only_its_own_task_and_memory_stays_bounded() -> None:
    from .runners import ConcurrentEchoRunner

    window = 64
    async with open_supervisor(ConcurrentEchoRunner, window=window) as sup:
        async with sup.stream(("count", 100_000)) as stalled:
            first = await stalled.__anext__()  # then never read again
            assert first == 0
            with trio.fail_after(20):
                assert await sup.run(("count", 20_000)) == 20_000
            # The parent holds no more than one window of the stalled task's events.
            assert len(stalled._task.events) <= window  # pyright: ignore[reportPrivateUsage]
        # Leaving the block cancelled the stalled task; the runner is free.
        with trio.fail_after(10):
            assert await sup.run(("echo", "free")) == "free"


def test_runner_concurrency_must_be_a_positive_int() -> None:
    from .runners import BadConcurrencyRunner

    with pytest.raises(ValueError, match="concurrency"):
        open_supervisor(BadConcurrencyRunner)


async def test_forkserver_with_preload_serves_and_restarts() -> None:
    async with open_supervisor(EchoRunner, start_method="forkserver", preload=["json"], policy=FAST) as sup:
        pid = await sup.run(("pid",))
        with pytest.raises(trio_runner.RunnerCrashed):
            await sup.run(("signal", 9))
        assert await sup.run(("pid",)) != pid


async def test_preload_without_forkserver_is_rejected() -> None:
    with pytest.raises(ValueError, match="forkserver"):
        open_supervisor(EchoRunner, preload=["json"])


async def test_watch_reports_the_lifecycle_in_order() -> None:
    async with open_supervisor(EchoRunner, policy=FAST) as sup:
        with pytest.raises(trio_runner.RunnerCrashed):
            await sup.run(("signal", 9))
        await sup.wait_ready()
    kinds = [type(change).__name__ async for change in sup.watch(replay=True)]
    assert kinds == ["Spawned", "Ready", "Exited", "BackingOff", "Spawned", "Ready", "Exited", "Stopped"]


async def test_watch_called_after_the_supervisor_stopped_ends_at_once() -> None:
    async with open_supervisor(EchoRunner) as sup:
        await sup.wait_ready()
    with trio.fail_after(2):
        changes = [change async for change in sup.watch()]
    assert [type(change).__name__ for change in changes] == ["Stopped"]


async def test_a_cancel_reaches_a_busy_runner_promptly() -> None:
    async with open_supervisor(EchoRunner) as sup, sup.stream(("spin_until_cancelled", 1)) as task:
        await task.__anext__()
        start = trio.current_time()
        await task.cancel()
        with pytest.raises(TaskCancelled):
            await task.wait()
        assert trio.current_time() - start < 5.0  # the runner spins until cancelled


async def test_a_second_preload_list_for_a_running_forkserver_is_reported_not_ignored() -> None:
    script = os.path.join(os.path.dirname(__file__), "scripts", "two_forkserver_preloads.py")
    with trio.fail_after(60):
        result = await trio.run_process(
            [os.sys.executable, script], capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.split() == [b"json", b"decimal"]
    assert b"already running without them" in result.stderr
    assert b"decimal" in result.stderr


async def test_emit_many_and_batches_deliver_every_event_in_order() -> None:
    async with open_supervisor(EchoRunner, window=64) as sup:
        async with sup.stream(("count_many", 20_000, 1000)) as task:
            seen: list[int] = []
            async for batch in task.batches():
                assert batch  # never an empty batch
                seen.extend(batch)
            assert seen == list(range(20_000))
            assert task.result == 20_000


async def test_batches_raises_the_tasks_error_after_its_events() -> None:
    async with open_supervisor(EchoRunner) as sup, sup.stream(("raise", "late")) as task:
        with pytest.raises(TaskFailed):
            async for _ in task.batches():
                pass


def test_the_forkserver_always_preloads_the_child_module() -> None:
    from trio_runner._process import forkserver_preload

    # Every runner child imports it first: preloaded, a restart skips ~20 ms of imports.
    assert forkserver_preload(["json"]) == ["trio_runner._child", "json"]
    # With no preload of its own, multiprocessing's default (__main__) is kept.
    assert forkserver_preload([]) == ["__main__", "trio_runner._child"]
