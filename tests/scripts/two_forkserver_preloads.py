"""Two supervisors in one process asking the forkserver for different preloads."""

import logging
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.runners import EchoRunner
from trio_runner import open_supervisor


async def main() -> None:
    for preload in (["json"], ["decimal"]):
        async with open_supervisor(EchoRunner, start_method="forkserver", preload=preload) as sup:
            print(await sup.run(("echo", preload[0])), flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    trio.run(main)
