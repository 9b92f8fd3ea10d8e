"""The quickstart's runner. It lives in its own module so the child process can import it.

This module is what the child imports, so it imports only the standard library
and ``trio_runner`` (whose child-side names do not pull in trio).
"""

from __future__ import annotations

import time

from trio_runner import Runner, TaskContext


class Shouter(Runner[str, str, int]):
    """Streams each word of the request in upper case; the result is the number of words."""

    def __init__(self, delay: float = 0.01) -> None:
        # Built in the child from the arguments given to open_supervisor.
        self.delay = delay

    def setup(self) -> None:
        # Load the model and warm it up here: it runs once per runner process.
        pass

    def handle(self, request: str, ctx: TaskContext[str]) -> int:
        words = request.split()
        for word in words:
            ctx.raise_if_cancelled()  # check at every step of long work
            time.sleep(self.delay)  # stands for blocking work, e.g. one token of inference
            ctx.emit(word.upper())
        return len(words)
