"""The runner bench_payload.py measures against: tiny, no heavy imports (the child imports it)."""

from __future__ import annotations

from typing import Any

from trio_runner import Runner, TaskContext


class PayloadBenchRunner(Runner[Any, Any, Any]):
    """``("ints", n)``: list(range(n)); ``("event", n)``: emits n bytes; ``("size", blob)``: len(blob)."""

    def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
        command, arg = request
        if command == "ints":
            return list(range(arg))
        if command == "event":
            ctx.emit(b"\x5a" * arg)
            return arg
        if command == "size":
            return len(arg)
        raise ValueError(f"unknown command {command!r}")
