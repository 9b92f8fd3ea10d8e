"""Quickstart: run, stream and cancel tasks in a supervised runner process.

Run it from the repository root with ``python docs/examples/quickstart.py``.
"""

from __future__ import annotations

import trio
from quickstart_runner import Shouter

import trio_runner


async def main() -> None:
    async with trio_runner.open_supervisor(Shouter, kwargs={"delay": 0.01}, name="shouter") as sup:
        # run(): one request in, one result out. The events are discarded.
        print("run:", await sup.run("hello from the child process"))

        # stream(): the events as they come, in order, then the result.
        async with sup.stream("stream these words") as task:
            async for word in task:
                print("event:", word)
        print("stream result:", task.result)

        # Cancelling the caller's scope cancels the task in the runner...
        with trio.move_on_after(0.1) as scope:
            await sup.run("many words " * 500)
        print("timed out and cancelled:", scope.cancelled_caught)

        # ...and so does task.cancel(). The outcome arrives through the handle.
        seen = 0
        async with sup.stream("more words " * 500) as task:
            try:
                async for _ in task:
                    seen += 1
                    if seen == 3:
                        await task.cancel()
            except trio_runner.TaskCancelled:
                print(f"task.cancel(): TaskCancelled after {seen} events")

        # None of that disturbed the runner: it is still the first process.
        stats = sup.statistics()
        print(f"incarnation {stats.incarnation}, restarts {stats.restarts}, done {stats.tasks_completed}")


# spawn re-imports this script in the child: without the guard, the child would
# start a supervisor of its own.
if __name__ == "__main__":
    trio.run(main)
