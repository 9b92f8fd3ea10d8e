"""The runner under test in the fault-injection guide: it streams the words of a text.

A runner module imports nothing heavy: the child imports it on every spawn.
"""

from __future__ import annotations

import trio_runner


class WordRunner(trio_runner.Runner[str, str, int]):
    """Emits each word of the request; the result is how many there were."""

    def handle(self, request: str, ctx: trio_runner.TaskContext[str]) -> int:
        words = request.split()
        for word in words:
            ctx.raise_if_cancelled()
            ctx.emit(word)
        return len(words)
