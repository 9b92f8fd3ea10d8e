"""A parent of a 2-rank group that the test SIGKILLs while rank 1 holds the GIL in C.

Prints the ranks' pids as one JSON list once rank 0 has started the task
(rank 1 then runs ``sum`` over a huge range), then sleeps until killed. Run by
tests/test_groups.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Run as a script, so the repository root (for ``tests.group_runners``) is not on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio

from tests.group_runners import GroupRunner
from trio_runner import open_supervisor


async def main() -> None:
    async with open_supervisor(GroupRunner, ranks=2) as sup:
        await sup.wait_ready()
        async with sup.stream(("hold_gil_on", 1)) as task:
            async for _ in task:
                break  # rank 0 has started it, and so, about now, has rank 1
            await trio.sleep(0.5)
            print(json.dumps(list(sup.statistics().pids)), flush=True)
            await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
