"""A correct script, main guard and all, that tests/test_crashes.py feeds to ``python -`` on stdin.

Usage: ``python - START_METHOD < guarded_for_stdin.py``, from the repository
root (``python -`` puts the current directory on ``sys.path``).
"""

import sys

import trio

from tests.runners import EchoRunner
from trio_runner import open_supervisor


async def main(start_method: str) -> None:
    async with open_supervisor(EchoRunner, start_method=start_method) as sup:
        print(await sup.run(("echo", "never reached")))


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
