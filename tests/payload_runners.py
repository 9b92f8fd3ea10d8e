"""Runners for the payload, frame-limit and task-error tests. A module, so the child can import them."""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path
from typing import Any

from trio_runner import Runner, TaskContext, _child


class NeedsTwoArguments(Exception):
    """Pickles, but does not unpickle: ``__init__`` needs two arguments."""

    def __init__(self, a: object, b: object) -> None:
        super().__init__(a)


class Unpicklable:
    """A result whose pickling raises an error with a huge message."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __reduce__(self) -> Any:
        raise ValueError(self.text)


class HostileStr(Exception):
    """An exception whose ``__str__`` raises, as a careless native binding's might."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ of HostileStr raised on purpose")


class InjectedReaderBug(Exception):
    """Raised in the child's reader thread by the ``break_reader`` command."""


def blob(size: int) -> bytes:
    """``size`` bytes that are not all alike, so a payload mangled in transit shows."""
    pattern = bytes(range(256))
    return (pattern * (size // 256 + 1))[:size]


class PayloadRunner(Runner[Any, Any, Any]):
    """Driven by the request: ``(command, *args)``, or a bare int that is echoed."""

    def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
        if isinstance(request, int):
            return request
        command, *args = request
        if command == "echo":
            return args[0]
        if command == "ints":
            return list(range(args[0]))
        if command == "bytes":
            return blob(args[0])
        if command == "emit_blob":
            ctx.emit(blob(args[0]))
            return "emitted"
        if command == "emit_ints":
            ctx.emit(list(range(args[0])))
            return "emitted"
        if command == "emit_then_ints":
            # A big event between small ones, then a big result: order must hold.
            ctx.emit("first")
            ctx.emit(blob(args[0]))
            ctx.emit("last")
            return list(range(args[1]))
        if command == "checksum":
            data = args[0]
            return len(data), zlib.crc32(data)
        if command == "checksum_crash_once":
            # Dies on the first attempt only: the marker file survives the crash.
            marker, data = Path(args[0]), args[1]
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return len(data), zlib.crc32(data)
        if command == "ints_with_unloadable":
            # Unpickles in the child's own pickle, but not in the parent.
            return [*range(args[0]), NeedsTwoArguments(1, 2)]
        if command == "unpicklable_huge_error":
            return Unpicklable("x" * args[0])
        if command == "sleep":
            time.sleep(args[0])
            return "slept"
        if command == "raise_hostile_str":
            raise HostileStr()
        if command == "raise_huge":
            raise ValueError("x" * args[0])
        if command == "raise_huge_name":
            raise type("E" * args[0], (Exception,), {})("named hugely")
        if command == "break_reader":
            child = _child.current
            assert child is not None

            def broken(message: Any) -> None:
                raise InjectedReaderBug("injected reader bug")

            child.dispatch = broken  # type: ignore[method-assign]
            return "broken"
        raise ValueError(f"unknown command {command!r}")


class PairRunner(PayloadRunner):
    """Two tasks at once: an innocent task runs beside a failing one."""

    concurrency = 2
