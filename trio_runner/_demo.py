"""The ``trio-runner demo`` command: its runner and the scripted crash-and-restart story.

The child imports this module to load :class:`DemoRunner`, so trio is imported
only inside :func:`run_demo`: a top-level ``import trio`` would add about 130 ms
to every spawn, and the demo reports the startup time it measures.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from ._runner import Runner, TaskContext

if TYPE_CHECKING:
    from ._state import LifecycleChange

TEXT = "Every request gets exactly one outcome, and a crashed runner comes back without losing it."
KILL_AFTER_WORDS = 4
WORD_DELAY = 0.05
_CHECK_EVERY = 0.005  # how often a word's delay looks at ctx.cancelled

ChangeT = TypeVar("ChangeT")


class Generated(NamedTuple):
    """The demo runner's result: the text it generated, and the pid that generated it."""

    text: str
    words: int
    pid: int


class DemoRunner(Runner[str, str, Generated]):
    """Generates the words of the request one by one, like a tiny language model.

    Each word takes ``delay`` seconds and is streamed with ``ctx.emit``; the
    cancel flag is checked every few milliseconds while it waits.
    """

    def __init__(self, delay: float = WORD_DELAY) -> None:
        self.delay = delay

    def handle(self, request: str, ctx: TaskContext[str]) -> Generated:
        words = request.split()
        for word in words:
            deadline = time.monotonic() + self.delay
            while (left := deadline - time.monotonic()) > 0:
                ctx.raise_if_cancelled()
                time.sleep(min(left, _CHECK_EVERY))
            ctx.raise_if_cancelled()
            ctx.emit(word)
        return Generated(" ".join(words), len(words), os.getpid())


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def _next_change(changes: AsyncIterator[LifecycleChange], kind: type[ChangeT]) -> ChangeT:
    """The next lifecycle change of type ``kind``, skipping the others."""
    async for change in changes:
        if isinstance(change, kind):
            return change
    raise RuntimeError(f"the supervisor stopped before a {kind.__name__} change")


async def run_demo(say: Callable[[str], None], *, bound: float = 60.0) -> None:
    """Supervise :class:`DemoRunner`, SIGKILL it mid-stream, and tell what happens.

    Every number printed is measured. A 1 ms ticker runs throughout, and its
    worst lateness shows whether the event loop ever stalled.

    Raises:
        trio.TooSlowError: the story took longer than ``bound`` seconds.
    """
    import trio

    from ._policy import RestartPolicy
    from ._state import BackingOff, Exited, Ready, Spawned
    from ._supervisor import Supervisor, open_supervisor

    ticks = 0
    worst_lateness = 0.0

    async def ticker() -> None:
        nonlocal ticks, worst_lateness
        while True:
            target = trio.current_time() + 0.001
            await trio.sleep_until(target)
            ticks += 1
            worst_lateness = max(worst_lateness, trio.current_time() - target)

    async def kill_and_watch_recovery(
        sup: Supervisor[str, str, Generated], changes: AsyncIterator[LifecycleChange]
    ) -> None:
        pid = sup.statistics().pid
        assert pid is not None
        killed_at = trio.current_time()
        os.kill(pid, signal.SIGKILL)
        exited = await _next_change(changes, Exited)
        seen_at = trio.current_time()
        say(f"sent SIGKILL to pid {pid}; the supervisor saw it exit {_ms(seen_at - killed_at)} later")
        say(
            f"exit classified as {exited.exit.describe()}; the request was in flight "
            "with retry=True, so it waits for the next runner"
        )
        backoff = await _next_change(changes, BackingOff)
        say(f"backing off {backoff.delay:g} s before restart {backoff.restart}")
        spawned = await _next_change(changes, Spawned)
        ready = await _next_change(changes, Ready)
        say(
            f"restarted: pid {spawned.pid} (incarnation {spawned.incarnation}), setup done "
            f"{_ms(ready.startup_seconds)} after spawn, "
            f"{trio.current_time() - seen_at:.2f} s after the crash was seen"
        )

    async def story() -> None:
        policy = RestartPolicy(initial_delay=0.5)
        say(
            f"supervising DemoRunner (restart policy: {policy.mode}, first backoff "
            f"{policy.initial_delay:g} s); it will be SIGKILLed mid-stream on purpose"
        )
        async with open_supervisor(DemoRunner, policy=policy, name="demo") as sup:
            changes = sup.watch(replay=True)
            ready = await _next_change(changes, Ready)
            say(f"runner ready: pid {ready.pid}, setup done {_ms(ready.startup_seconds)} after spawn")
            async with sup.stream(TEXT, retry=True) as task:
                words: list[str] = []
                killed = False
                async for word in task:
                    words.append(word)
                    if not killed and len(words) == KILL_AFTER_WORDS:
                        killed = True
                        say(f"streamed (retry=True): {' '.join(words)} ...")
                        await kill_and_watch_recovery(sup, changes)
                        # The retry runs the request again from the start.
                        words = []
                result = task.result
            say(f"streamed again from the first word: {' '.join(words)}")
            say(f"result: {result.words} words, generated by pid {result.pid}")
            closing_at = trio.current_time()
        closed_at = trio.current_time()
        final = await _next_change(changes, Exited)
        say(
            f"left open_supervisor: graceful shutdown took {_ms(closed_at - closing_at)} "
            f"({final.exit.describe()}, stopped by {final.exit.stopped_by.value})"
        )

    began = trio.current_time()
    with trio.fail_after(bound):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await story()
            nursery.cancel_scope.cancel()
    say(
        f"event loop: a 1 ms ticker ran {ticks} times over {trio.current_time() - began:.2f} s; "
        f"worst lateness {_ms(worst_lateness)}"
    )
