"""A parent that the test SIGKILLs while its runner and the runner's child live.

Prints one JSON line, ``{"runner": pid, "grandchild": pid}``, then sleeps until
killed. Run by tests/test_orphans.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Run as a script, so the repository root (for ``tests.runners``) is not on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio

from tests.runners import EchoRunner
from trio_runner import open_supervisor


async def main() -> None:
    async with open_supervisor(EchoRunner) as sup:
        grandchild = await sup.run(("grandchild",))
        print(json.dumps({"runner": sup.statistics().pid, "grandchild": grandchild}), flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main)
