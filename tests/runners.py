"""Runners used by the tests. They live in a module so the child can import them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from trio_runner import Runner, TaskContext, _child
from trio_runner._child import Child


def _running_child() -> Child:
    """The child's state, in a runner process."""
    child = _child.current
    assert child is not None, "not in a runner process"
    return child


class NeedsTwoArguments(Exception):
    """Pickles, but does not unpickle: ``__init__`` needs two arguments."""

    def __init__(self, a: object, b: object) -> None:
        super().__init__(a)


class NotAnException(BaseException):
    """A BaseException of the runner's own, like asyncio.CancelledError."""


class EchoRunner(Runner[Any, Any, Any]):
    """A small runner driven by the request: ``(command, *args)``."""

    def __init__(self, setup_delay: float = 0.0, fail_setup: bool = False) -> None:
        self.setup_delay = setup_delay
        self.fail_setup = fail_setup

    def setup(self) -> None:
        if self.setup_delay:
            time.sleep(self.setup_delay)
        if self.fail_setup:
            raise RuntimeError("setup failed on purpose")

    def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
        command, *args = request
        if command == "echo":
            return args[0]
        if command == "pid":
            return os.getpid()
        if command == "count":
            (n,) = args
            for i in range(n):
                ctx.emit(i)
            return n
        if command == "count_many":
            n, chunk = args
            for start in range(0, n, chunk):
                ctx.emit_many(range(start, min(n, start + chunk)))
            return n
        if command == "emit_forever":
            # Never checks ctx.cancelled: only emit can stop it. Paced, so the
            # consumer's credits never run out.
            i = 0
            while True:
                ctx.emit(i)
                i += 1
                time.sleep(args[0])
        if command == "sleep_then_return":
            # Ignores a cancel that comes while it sleeps, and returns anyway.
            time.sleep(args[0])
            return args[1]
        if command == "raise":
            raise ValueError(args[0])
        if command == "raise_base":
            # A BaseException that is not an Exception: KeyboardInterrupt, say.
            kind = {"KeyboardInterrupt": KeyboardInterrupt, "GeneratorExit": GeneratorExit}
            raise kind.get(args[0], NotAnException)(args[1])
        if command == "sys_exit":
            sys.exit(args[0])
        if command == "sleep":
            time.sleep(args[0])
            return "slept"
        if command == "spin_until_cancelled":
            emitted = 0
            while True:
                ctx.raise_if_cancelled()
                if args and emitted < args[0]:
                    ctx.emit(emitted)
                    emitted += 1
                time.sleep(0.0005)
        if command == "signal":
            # Emit first, so the parent has seen the task start streaming.
            ctx.emit("about to die")
            time.sleep(0.05)
            os.kill(os.getpid(), args[0])
            time.sleep(10)
        if command == "exit":
            ctx.emit("about to exit")
            time.sleep(0.05)
            os._exit(args[0])
        if command == "result_then_die":
            # Hand the result over, then die before the parent has read it.
            return "last words"
        if command == "stall_reader":
            _running_child().reader_stalled.set()
            return "stalled"
        if command == "stop_heartbeat":
            _running_child().outbox.heartbeat_paused = True
            return "quiet"
        if command == "ignore_sigterm_and_hang":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return "ignoring"
        if command == "hang":
            while True:
                time.sleep(0.01)
        if command == "grandchild":
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            return proc.pid
        if command == "unpicklable_event":
            ctx.emit(1)
            ctx.emit(lambda: 0)  # cannot be pickled
            ctx.emit(2)  # with a window of 2 this would wait for credits
            return "done"
        if command == "grandchild_then_die":
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            ctx.emit("x")
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        if command == "unpicklable_result":
            return NeedsTwoArguments(1, 2)
        if command == "print":
            print(args[0], flush=True)
            print(args[1], file=sys.stderr, flush=True)
            return None
        raise ValueError(f"unknown command {command!r}")


class ConcurrentEchoRunner(EchoRunner):
    """EchoRunner serving two tasks at once, in two threads."""

    concurrency = 2


class BadConcurrencyRunner(EchoRunner):
    concurrency = 0


class BadLingerRunner(EchoRunner):
    linger = -1.0


class PacedRunner(Runner[Any, Any, Any]):
    """Emits ``i`` for each delay in the request, after that delay, then returns "done".

    Lingers the longest a runner may (1 s), so the tests' bounds can sit far
    from both 0 and ``linger`` on a loaded machine.
    """

    linger = 1.0

    def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
        for i, delay in enumerate(request):
            time.sleep(delay)
            ctx.emit(i)
        return "done"


class UnpacedRunner(PacedRunner):
    linger = 0.0


class FamilyRunner(EchoRunner):
    """EchoRunner with a family to leave behind, and handlers that hold the GIL (the guardian's tests)."""

    def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
        command, *args = request
        sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
        if command == "family":
            # One grandchild in the runner's process group, one that leaves it.
            in_group = subprocess.Popen(sleeper)
            new_session = subprocess.Popen(sleeper, start_new_session=True)
            return {"in_group": in_group.pid, "new_session": new_session.pid}
        if command == "escapee":
            # A child (in the group) starts a great-grandchild in a session of its
            # own, reports its pid, and exits after ``args[0]`` seconds: the
            # great-grandchild is then reparented away, out of the runner's reach.
            code = (
                "import subprocess, sys, time; "
                f"p = subprocess.Popen({sleeper!r}, start_new_session=True); "
                f"print(p.pid, flush=True); time.sleep({args[0]!r})"
            )
            middle = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
            assert middle.stdout is not None
            escapee = int(middle.stdout.readline())
            middle.stdout.close()
            middle.wait()
            return escapee
        if command == "hold_gil":
            # sum() over a range runs in C and never lets another thread take the
            # GIL: the reader thread (and its orphan check) cannot run.
            ctx.emit("holding the GIL")
            return sum(range(args[0]))
        return super().handle(request, ctx)
