"""A parent that the test SIGKILLs while its runner and the runner's children live.

Usage: ``parent_for_orphan_test.py [MODE [START_METHOD]]``. Prints one JSON
line of pids, then sleeps until killed. Run by tests/test_orphans.py. Modes:

- ``idle`` (the default): ``{"runner": pid, "grandchild": pid}``, the runner idle;
- ``gil``: ``{"runner", "in_group", "new_session"}``, printed once the runner's
  handler holds the GIL in C (``sum`` over a huge range), so its reader thread
  cannot run;
- ``stopped``: the same pids, printed once the runner has been SIGSTOPped;
- ``group_gil``: ``{"rank0", "rank1"}`` of a 2-rank group, printed once both
  run a task in which rank 1 holds the GIL in C (``sum`` over a huge range).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

# Run as a script, so the repository root (for ``tests.runners``) is not on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio

from tests.group_runners import GroupRunner
from tests.runners import EchoRunner, FamilyRunner
from trio_runner import open_supervisor


def report(**pids: int) -> None:
    print(json.dumps(pids), flush=True)


async def main(mode: str, start_method: str) -> None:
    if mode == "group_gil":
        async with open_supervisor(GroupRunner, ranks=2, start_method=start_method) as sup:
            await sup.wait_ready()
            async with sup.stream(("hold_gil_on", 1)) as task:
                async for _ in task:
                    break  # rank 0 has started it, and so, about now, has rank 1
                await trio.sleep(0.5)
                rank0, rank1 = sup.statistics().pids
                assert rank0 is not None and rank1 is not None
                report(rank0=rank0, rank1=rank1)
                await trio.sleep_forever()
    if mode == "idle":
        async with open_supervisor(EchoRunner, start_method=start_method) as sup:
            grandchild = await sup.run(("grandchild",))
            runner = sup.statistics().pid
            assert runner is not None
            report(runner=runner, grandchild=grandchild)
            await trio.sleep_forever()
    async with open_supervisor(FamilyRunner, start_method=start_method) as sup:
        family = await sup.run(("family",))
        runner = sup.statistics().pid
        assert runner is not None
        if mode == "gil":
            async with sup.stream(("hold_gil", 10**11)) as task:
                async for _ in task:
                    break  # the handler is about to enter sum()
                report(runner=runner, **family)
                await trio.sleep_forever()
        elif mode == "stopped":
            os.kill(runner, signal.SIGSTOP)
            report(runner=runner, **family)
            await trio.sleep_forever()
        raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "idle"
    start_method = sys.argv[2] if len(sys.argv) > 2 else "spawn"
    trio.run(main, mode, start_method)
