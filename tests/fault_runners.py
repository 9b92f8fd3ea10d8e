"""Fault-injecting runners for the crash, hang, orphan and resource tests.

The child imports this module by its path, so it imports neither trio nor
anything heavy, and every class lives at module level.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import pickle
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

from trio_runner import Runner, TaskContext, _child
from trio_runner import _protocol as proto
from trio_runner._child import Child

from .runners import EchoRunner

CORRUPT_FRAME = b"\x00\x00\x00\x05garbage"


def _without_core_dump() -> None:
    # SIGSEGV and SIGABRT dump core by default; a core file (or a slow core
    # handler) is no part of what these tests measure.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _current_child() -> Child:
    child = _child.current
    assert child is not None, "not in a runner process"
    return child


def _send_raw(data: bytes) -> None:
    """Write bytes straight onto the control socket, bypassing the writer thread.

    Waits until what is queued (the task's Ack) has gone out and the parent has
    had time to read it, so ``data`` arrives in a read of its own; then writes
    under the child's send lock, so no batch of the writer's can interleave.
    """
    outbox = _current_child().outbox
    outbox.flush(1.0)
    time.sleep(0.05)
    outbox.send_raw(data)


class _ExitAfterSending:
    """Wraps the child's socket: exits the process right after a send that carries ``marker``.

    Whatever writes the task's result (the writer thread, or the handler's own
    flush), the process dies the instant the bytes are on the socket, before
    the parent can have read them.
    """

    def __init__(self, sock: socket.socket, marker: bytes) -> None:
        self._sock = sock
        self._marker = marker

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)
        if self._marker in data:
            os._exit(1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class FaultRunner(EchoRunner):
    """EchoRunner's commands, plus one command per injected fault."""

    def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
        command, *args = request
        if command == "child_bookkeeping":
            # What the child still holds for tasks, counting this one.
            child = _current_child()
            slots = list(child.slots.values())
            return {"contexts": len(slots), "requests": sum(slot.request is not None for slot in slots)}
        if command == "die_by_signal":
            # The stderr line carries the moment of death, so the parent can
            # measure how long it took to notice.
            (signum,) = args
            _without_core_dump()
            ctx.emit("about to die")
            time.sleep(0.05)  # let the event reach the parent first
            print(f"dying at {time.monotonic()!r}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signum)
            time.sleep(10)
        if command == "crash":
            os._exit(1)
        if command == "result_then_die":
            # The process dies the moment its result is on the socket, with no
            # time for the parent to read it first.
            (result,) = args
            outbox = _current_child().outbox
            outbox.sock = _ExitAfterSending(outbox.sock, result.encode())  # type: ignore[assignment]
            return result
        if command == "crash_once":
            # Dies on the first attempt only: the marker file survives the crash.
            marker = Path(args[0])
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return "second attempt"
        if command == "stderr_then_crash":
            (lines,) = args
            for i in range(lines):
                print(f"stderr line {i}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(2)
        if command == "corrupt_frame":
            # The length prefix says 5 bytes; they do not unpickle.
            _send_raw(CORRUPT_FRAME)
            time.sleep(30)
        if command == "good_then_corrupt_frame":
            # One write, so the parent reads both frames at once.
            _send_raw(proto.encode([proto.Heartbeat()]) + CORRUPT_FRAME)
            time.sleep(30)
        if command == "malformed_message":
            # A frame that unpickles, holding a message of the wrong shape.
            (message,) = args
            body = pickle.dumps([message], protocol=proto.PICKLE_PROTOCOL)
            _send_raw(proto.HEADER.pack(len(body)) + body)
            time.sleep(30)
        if command == "oversize_frame":
            _send_raw(proto.HEADER.pack(2**31))
            time.sleep(30)
        if command == "break_socket":
            # What the parent sees in the moment between a runner's death and
            # the death watch waking, made to last: the control socket is shut
            # (a send gets EPIPE) while the process lives on. The orphan guard
            # is disarmed, or the reader thread would take its own EOF for the
            # parent's death and kill the process at once.
            child = _current_child()
            child._orphaned = lambda: None  # type: ignore[method-assign]  # pyright: ignore[reportPrivateUsage]
            child.sock.shutdown(socket.SHUT_RDWR)
            time.sleep(60)
        if command == "shut_control_socket":
            # Runner code that ends its side of the control connection and lives
            # on (the orphan guard armed: the reader thread still reads).
            _current_child().sock.shutdown(socket.SHUT_WR)
            time.sleep(60)
        return super().handle(request, ctx)


class _Hide:
    """A meta path finder that makes ``module`` missing, as the import system reports it."""

    def __init__(self, module: str) -> None:
        self.module = module

    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name.partition(".")[0] == self.module:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


class MissingModuleRunner(EchoRunner):
    """Its ``setup()`` imports ``module``, which this child cannot find (``hide``: made missing)."""

    def __init__(self, module: str, hide: bool = False) -> None:
        super().__init__()
        self.module = module
        self.hide = hide

    def setup(self) -> None:
        if self.hide:
            sys.modules.pop(self.module, None)
            sys.meta_path.insert(0, _Hide(self.module))  # type: ignore[arg-type]
        importlib.import_module(self.module)


class ConcurrentFaultRunner(FaultRunner):
    """Serves two tasks at once, so one task's stalled consumer cannot hold up another."""

    concurrency = 2


if multiprocessing.parent_process() is None:
    # Defined in the parent only: the child imports this module fine but cannot
    # find the class, so loading the runner fails before setup.

    class ParentOnlyRunner(Runner[Any, Any, Any]):
        def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
            return request
