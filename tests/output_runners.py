"""Runners that write to their stdout and stderr, for tests/test_child_output.py.

They live in a module of their own so the child imports nothing but them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from typing import Any

from trio_runner import Runner, TaskContext


class ChattyRunner(Runner[Any, Any, Any]):
    """``("flood", lines, then)``: write ``lines`` short lines to stderr, one to stdout, then
    return the count (``then == "return"``) or exit with code 3 at once (``then == "die"``).
    ``("long_line", length)``: see below."""

    def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
        command, *args = request
        if command == "long_line":
            # ("long_line", length): one line of ``length`` x's in small writes, then "after".
            (length,) = args
            for start in range(0, length, 4096):
                sys.stderr.write("x" * min(4096, length - start))
                sys.stderr.flush()
            sys.stderr.write("\nafter\n")
            sys.stderr.flush()
            return length
        if command != "flood":
            raise ValueError(f"unknown command {command!r}")
        lines, then = args
        print("the only stdout line", flush=True)
        set_pipe_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
        if set_pipe_size is not None:
            # A 1 MiB pipe, as a runner may set: the parent finds a full read's
            # worth of lines (256 KiB) at every read.
            with contextlib.suppress(OSError):
                fcntl.fcntl(sys.stderr.fileno(), set_pipe_size, 1024 * 1024)
        # In large writes, as a native library's buffered stderr does: the
        # parent finds a full pipe (thousands of lines) at every read.
        for start in range(0, lines, 10_000):
            sys.stderr.write("".join(f"line {i}\n" for i in range(start, min(lines, start + 10_000))))
        sys.stderr.flush()
        if then == "die":
            os._exit(3)
        return lines
