"""Leave ``open_supervisor`` under pressure and print how long that took, as one JSON line.

``python shutdown_under_pressure.py SCENARIO`` with SCENARIO one of:

- ``slow-handler``: the runner's log handler takes seconds per record (a
  network handler waiting on its timeout) and the runner has written far more
  lines than it can take, so the hand-off to the log thread is full when the
  block is left.
- ``busy-thread-limiter``: the application has lowered trio's default thread
  limiter and holds all its tokens in blocked threads when the block is left.

Prints ``{"elapsed": seconds, "bound": Timeouts.shutdown_bound, ...}``. Run by
tests/test_child_output.py in a subprocess, so that a shutdown that hangs
(in a shielded scope, which no test deadline can cancel) fails the test
instead of hanging the test session.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path

# Run as a script, so the repository root (for ``tests.output_runners``) is not on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio

from tests.output_runners import ChattyRunner
from trio_runner import Timeouts, open_supervisor

QUICK = Timeouts(heartbeat=1.5, graceful=0.5, terminate=0.5, kill=1)


class SlowHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.unstuck = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.unstuck.wait(5.0)


async def slow_handler() -> dict[str, object]:
    logger = logging.getLogger("trio_runner.runner.chatty")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = SlowHandler()
    logger.addHandler(handler)
    async with open_supervisor(ChattyRunner, name="chatty", timeouts=QUICK) as sup:
        await sup.run(("flood", 200_000, "return"))
        # Lines are being dropped: the handler is far behind and the hand-off is full.
        with trio.fail_after(30):
            while sup.statistics().log_lines_dropped == 0:  # noqa: ASYNC110 - statistics have no event
                await trio.sleep(0.01)
        dropped = sup.statistics().log_lines_dropped
        start = time.monotonic()
    elapsed = time.monotonic() - start
    handler.unstuck.set()  # so that the interpreter's exit does not wait for it
    return {"elapsed": elapsed, "bound": QUICK.shutdown_bound, "dropped": dropped}


async def busy_thread_limiter() -> dict[str, object]:
    limiter = trio.to_thread.current_default_thread_limiter()
    release = threading.Event()
    async with trio.open_nursery() as nursery:
        async with open_supervisor(ChattyRunner, name="quiet", timeouts=QUICK) as sup:
            await sup.wait_ready()
            limiter.total_tokens = 2
            for _ in range(2):
                # Released after the block; the timeout only ends the threads of a hung run.
                nursery.start_soon(trio.to_thread.run_sync, release.wait, 120.0)
            with trio.fail_after(30):
                while limiter.borrowed_tokens < 2:  # noqa: ASYNC110 - a limiter has no event for this
                    await trio.sleep(0.01)
            start = time.monotonic()
        elapsed = time.monotonic() - start
        release.set()
    return {"elapsed": elapsed, "bound": QUICK.shutdown_bound}


SCENARIOS = {"slow-handler": slow_handler, "busy-thread-limiter": busy_thread_limiter}


if __name__ == "__main__":
    print(json.dumps(trio.run(SCENARIOS[sys.argv[1]])), flush=True)
