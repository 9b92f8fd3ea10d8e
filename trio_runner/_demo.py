"""The ``trio-runner demo`` command: the MLX demo model, SIGKILLed mid-generation, and what happens next.

Every number the demo prints is measured on the run. trio and mlx are
imported inside the functions: the child process imports the runner's module
path, and nothing here belongs in it.
"""

from __future__ import annotations

import os
import signal
import unicodedata
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from ._state import LifecycleChange
    from ._supervisor import Supervisor
    from .mlx import Completion, Generate, Token

PROMPT = "Every request gets exactly one outcome, and"
MAX_TOKENS = 600
SEED = 7
TEMPERATURE = 0.8
KILL_AFTER_TOKENS = 16
_SHOWN_CHARS = 48
_MODEL_KIND = "a tiny Llama trained for seconds on the Zen of Python, so it writes Zen-like text"

ChangeT = TypeVar("ChangeT")


def visible(text: str, *, one_line: bool = True) -> str:
    """``text`` safe for a terminal: control characters (a random model emits them) become U+FFFD."""

    def clean(char: str) -> str:
        if char == "\n":
            return "\\n" if one_line else char
        if char == "\t":
            return char
        return "\ufffd" if unicodedata.category(char) in ("Cc", "Cs") else char

    return "".join(map(clean, text))


_C0_AND_DEL = {code: repr(chr(code))[1:-1] for code in (*range(0x20), 0x7F) if chr(code) not in "\n\t"}


def escaped(text: str) -> str:
    """``text`` for a pipe or a file: ASCII control characters but newline and tab as ``repr`` escapes.

    A sampled generation can contain any byte; escaped, it stays one readable
    text whatever reads it (``\\x07``, ``\\r``, ``\\x1b``).
    """
    return text.translate(_C0_AND_DEL)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def _next_change(changes: AsyncIterator[LifecycleChange], kind: type[ChangeT]) -> ChangeT:
    """The next lifecycle change of type ``kind``, skipping the others.

    Raises:
        RunnerUnavailable: the supervisor stopped first (its own error, such as
            a runner that can never start, comes out of ``open_supervisor``).
    """
    from ._errors import RunnerUnavailable

    async for change in changes:
        if isinstance(change, kind):
            return change
    raise RunnerUnavailable(f"the supervisor stopped before a {kind.__name__} change")


async def show_progress(say: Callable[[str], None], what: str, every: float = 2.0) -> None:
    """Say ``what`` now, then how long it has been taking every ``every`` seconds, until cancelled."""
    import trio

    began = trio.current_time()
    say(f"{what} ...")
    while True:
        await trio.sleep(every)
        say(f"  ... still {what.split(' (')[0]} ({trio.current_time() - began:.0f} s)")


async def run_demo(say: Callable[[str], None], *, bound: float = 120.0, start_method: str = "auto") -> None:
    """Supervise the MLX demo model, SIGKILL the runner mid-generation, and tell what happens.

    A 1 ms ticker runs throughout, and its worst lateness shows whether the
    event loop ever stalled (building the model, spawning, a crash, a restart).

    Raises:
        trio.TooSlowError: the story took longer than ``bound`` seconds.
        RunnerCrashed: the runner can never start (say, mlx-lm is missing).
    """
    import trio

    from ._policy import RestartPolicy
    from ._state import BackingOff, Exited, Ready, Spawned
    from .mlx import Generate, demo_model_location, open_mlx_supervisor, prepare_demo_model
    from .mlx._model import verify_demo_model
    from .mlx._supervise import kernel_cache_cold, warm_kernel_cache

    ticks = 0
    worst_lateness = 0.0

    async def ticker() -> None:
        nonlocal ticks, worst_lateness
        while True:
            target = trio.current_time() + 0.001
            await trio.sleep_until(target)
            ticks += 1
            worst_lateness = max(worst_lateness, trio.current_time() - target)

    async def with_progress(what: str, work: Callable[[], object]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(show_progress, say, what)
            await work()  # type: ignore[misc]
            nursery.cancel_scope.cancel()

    async def kill_and_watch_recovery(
        sup: Supervisor[Generate, Token, Completion], changes: AsyncIterator[LifecycleChange]
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
            f"restarted: pid {spawned.pid} (incarnation {spawned.incarnation}), model loaded and warm "
            f"{_ms(ready.startup_seconds)} after spawn, "
            f"{trio.current_time() - seen_at:.2f} s after the crash was seen"
        )

    async def story() -> None:
        location = demo_model_location()
        if await trio.to_thread.run_sync(verify_demo_model, location) is None:
            say(f"demo model: {location} (cached; {_MODEL_KIND})")
        else:
            began = trio.current_time()
            await with_progress(
                "building the demo model (first run only)", lambda: prepare_demo_model(progress=True)
            )
            say(f"demo model: built {location} in {trio.current_time() - began:.1f} s ({_MODEL_KIND})")
        if await trio.to_thread.run_sync(kernel_cache_cold):
            began = trio.current_time()
            await with_progress(
                "compiling MLX's CPU kernels in a throwaway process (first run only)",
                lambda: warm_kernel_cache(location),
            )
            say(f"MLX kernels compiled and cached in {trio.current_time() - began:.1f} s")
        policy = RestartPolicy(initial_delay=0.5)
        request = Generate(prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=TEMPERATURE, seed=SEED)
        async with open_mlx_supervisor(
            location, start_method=start_method, policy=policy, name="demo"
        ) as sup:
            changes = sup.watch(replay=True)
            method = sup.start_method
            say(
                f"supervising MlxLmRunner on the demo model (start method {method}, restart policy "
                f"{policy.mode}, first backoff {policy.initial_delay:g} s); it will be SIGKILLed "
                "mid-generation on purpose"
            )
            ready: Ready | None = None

            async def wait_ready() -> None:
                nonlocal ready
                ready = await _next_change(changes, Ready)

            await with_progress("starting the runner (loading the model, warming up)", wait_ready)
            assert ready is not None
            warm = _ms(ready.startup_seconds)
            say(f"runner ready: pid {ready.pid}, model loaded and warm {warm} after spawn")
            before_crash = ""
            async with sup.stream(request, retry=True) as task:
                pieces: list[str] = []
                killed = False
                attempt = task.attempt
                async for token in task:
                    if task.attempt != attempt:
                        # The retry streams the request again from the start:
                        # a token read after the attempt changed is the new one's.
                        attempt = task.attempt
                        pieces = []
                    pieces.append(token.text)
                    if not killed and len(pieces) == KILL_AFTER_TOKENS:
                        killed = True
                        before_crash = "".join(pieces)
                        shown = visible(before_crash)
                        say(f"streamed {len(pieces)} tokens (retry=True, seed {SEED}): {shown}")
                        await kill_and_watch_recovery(sup, changes)
                completion = task.result
            text = "".join(pieces)
            say(
                f"streamed again from the first token: {visible(text[:_SHOWN_CHARS])} ... "
                f"(same seed, same start: {text.startswith(before_crash)})"
            )
            say(
                f"result: {completion.generation_tokens} tokens ({completion.finish_reason}), generated by "
                f"pid {sup.statistics().pid} at {completion.generation_tps:.0f} tokens/s, first token "
                f"{_ms(completion.time_to_first_token)}"
            )
            closing_at = trio.current_time()
        closed_at = trio.current_time()
        final = await _next_change(changes, Exited)
        say(
            f"left open_supervisor: graceful shutdown took {_ms(closed_at - closing_at)} "
            f"({final.exit.describe()}, stopped by {final.exit.stopped_by.value})"
        )

    began = trio.current_time()
    try:
        with trio.fail_after(bound):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                await story()
                nursery.cancel_scope.cancel()
    except trio.TooSlowError:
        raise trio.TooSlowError(f"the demo did not finish within {bound:g} s") from None
    say(
        f"event loop: a 1 ms ticker ran {ticks} times over {trio.current_time() - began:.2f} s; "
        f"worst lateness {_ms(worst_lateness)}"
    )
    say(
        "  (lateness: how long past its deadline the ticker woke, at worst; a few ms on idle cores, "
        "tens or hundreds when other processes keep them busy; a blocked loop would show the whole stall)"
    )
