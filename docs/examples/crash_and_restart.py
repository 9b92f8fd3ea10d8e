"""Crash and restart: a dying runner is classified, reported and restarted with backoff.

The runner class is defined in this script, which works because the script has
a main guard: spawn re-imports it in the child, where the guard keeps it from
starting anything. Run it with ``python docs/examples/crash_and_restart.py``.
"""

from __future__ import annotations

import os
import signal
import time

import trio

import trio_runner
from trio_runner import BackingOff, Exited, LifecycleChange, RestartPolicy, RunnerCrashed


class Fragile(trio_runner.Runner[str, int, int]):
    """``"pid"`` returns the runner's pid; ``"oom"`` dies; ``"count"`` counts slowly."""

    def handle(self, request: str, ctx: trio_runner.TaskContext[int]) -> int:
        if request == "oom":
            # What the kernel's out-of-memory killer does to a runner.
            os.kill(os.getpid(), signal.SIGKILL)
        if request == "count":
            for i in range(20):
                ctx.raise_if_cancelled()
                time.sleep(0.02)
                ctx.emit(i)
        return os.getpid()


def describe(change: LifecycleChange) -> str:
    if isinstance(change, Exited):
        return f"Exited({change.exit.reason.value})"
    if isinstance(change, BackingOff):
        return f"BackingOff({change.delay:g}s)"
    return type(change).__name__


async def main() -> None:
    policy = RestartPolicy(initial_delay=0.1)  # 0.1 s, then 0.2 s, 0.4 s ... instead of 2 s, 4 s ...
    async with trio_runner.open_supervisor(Fragile, policy=policy) as sup:
        lifecycle = sup.watch(replay=True)
        first_pid = await sup.run("pid")

        # A task running when the runner dies fails with RunnerCrashed...
        try:
            await sup.run("oom")
        except RunnerCrashed as exc:
            print("RunnerCrashed:", exc.exit.describe())
        # ...and the supervisor restarts the runner after the backoff.
        await sup.wait_ready()
        second_pid = await sup.run("pid")
        print("restarted in a new process:", second_pid != first_pid)

        # A task submitted with retry=True survives the crash: it runs again on
        # the next incarnation. Here the parent kills the runner mid-task.
        async def kill_runner_soon() -> None:
            await trio.sleep(0.1)
            os.kill(second_pid, signal.SIGKILL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_runner_soon)
            third_pid = await sup.run("count", retry=True)
        print("retry=True task finished in a third process:", third_pid not in (first_pid, second_pid))
        print("restarts:", sup.statistics().restarts)

    # Leaving the block shut the runner down; the watcher saw the whole story.
    print("lifecycle:", " ".join([describe(change) async for change in lifecycle]))


if __name__ == "__main__":
    trio.run(main)
