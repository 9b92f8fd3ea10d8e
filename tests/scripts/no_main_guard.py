"""A script that starts a supervisor WITHOUT an ``if __name__ == "__main__":`` guard.

The spawn start method re-runs this file in the child, which then tries to
start a supervisor of its own. The supervisor must fail at once, saying the
guard is missing, and leave no process behind. Run by tests/test_crashes.py.
"""

from typing import Any

import trio

from trio_runner import Runner, TaskContext, open_supervisor


class GuardlessRunner(Runner[Any, Any, Any]):
    def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
        return request


async def main() -> None:
    async with open_supervisor(GuardlessRunner) as sup:
        print(await sup.run("never reached"))


trio.run(main)  # deliberately unguarded
