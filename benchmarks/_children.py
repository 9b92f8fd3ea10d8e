"""Everything that runs inside a benchmark's child processes: runners and bare baseline children.

This module is imported in every child (spawn imports it by module path), so
it imports neither trio nor anything heavy, exactly like a runner module
should. The bare children are the BASELINES: the same kind of process,
doing the same job, without the library.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import time
from typing import Any

from trio_runner import Runner, TaskContext, _child

HEADER = struct.Struct("!I")
PAYLOAD_SIZE = 100
BIG_MB = 200


def payload(i: int) -> bytes:
    """A distinct 100-byte payload: a repeated object would be flattered by pickle's memo."""
    return b"%099d\n" % i


def hold_memory(megabytes: int) -> bytearray:
    """Allocate and touch ``megabytes``: untouched pages cost the kernel nothing at exit."""
    block = bytearray(megabytes * 1024 * 1024)
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))
    return block


# -- runners (ours) -------------------------------------------------------------------------


class BenchRunner(Runner[Any, Any, Any]):
    """A tiny runner with no heavy imports, driven by ``(command, *args)`` requests."""

    def __init__(self, megabytes: int = 0) -> None:
        self.megabytes = megabytes
        self.memory: bytearray | None = None

    def setup(self) -> None:
        if self.megabytes:
            self.memory = hold_memory(self.megabytes)

    def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
        command = request[0]
        if command == "echo":
            return request[1]
        if command == "events":
            emit = ctx.emit
            for i in range(request[1]):
                emit(payload(i))
            return request[1]
        if command == "events_many":
            count, chunk = request[1], 256
            for start in range(0, count, chunk):
                ctx.emit_many([payload(i) for i in range(start, min(count, start + chunk))])
            return count
        if command == "blob":
            return len(request[1])
        if command == "stall_reader":
            # Fault injection (as in the test suite): the reader thread stops reading the control socket.
            child = _child.current
            assert child is not None, "not in a runner process"
            child.reader_stalled.set()
            return "stalled"
        if command == "until_cancelled":
            # Every rank of a group runs it: one event, then a wait that a cancel (or Shutdown) ends.
            ctx.emit("running")
            while not ctx.cancelled:
                time.sleep(0.001)
            ctx.raise_if_cancelled()
        if command == "hang_ignoring_sigterm":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            ctx.emit("ignoring SIGTERM")
            while True:  # ignores the cancel and the Shutdown message too
                time.sleep(0.01)
        raise ValueError(f"unknown command {command!r}")


class WideRunner(BenchRunner):
    """Serves up to 64 tasks at once, so a stalled consumer blocks only its own task."""

    concurrency = 64


class FloodRunner(Runner[Any, Any, Any]):
    """``("flood", lines)``: write ``lines`` short lines to stderr in large writes, return the count."""

    def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
        _, lines = request
        for start in range(0, lines, 10_000):
            sys.stderr.write("".join(f"line {i}\n" for i in range(start, min(lines, start + 10_000))))
        sys.stderr.flush()
        return lines


# -- bare children (BASELINES) ----------------------------------------------------------------


def bare_ready(conn: Any, megabytes: int = 0, ignore_sigterm: bool = False) -> None:
    """BASELINE child: optionally hold memory, say "ready" over a Pipe, then wait to be killed."""
    memory = hold_memory(megabytes) if megabytes else None
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _ready_until_eof(conn)
    del memory


def _ready_until_eof(conn: Any) -> None:
    """Say "ready" over the Pipe, then read (and drop) until the parent closes it."""
    conn.send_bytes(b"ready")
    try:
        while True:
            conn.recv_bytes()
    except EOFError:
        pass


def bare_echo(sock: socket.socket) -> None:
    """BASELINE child for the round-trip floor: echo whatever arrives, as it arrives."""
    sock.setblocking(True)
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)


def queue_producer(conn: Any, queue: Any, count: int) -> None:
    """BASELINE child: put ``count`` distinct payloads on a multiprocessing.Queue after "go"."""
    conn.send_bytes(b"ready")
    conn.recv_bytes()
    put = queue.put
    for i in range(count):
        put(payload(i))
    queue.close()
    queue.join_thread()


def raw_producer(conn: Any, sock: socket.socket, count: int, batch: int) -> None:
    """BASELINE child (the ceiling): length-prefixed payloads over a socketpair, ``batch`` per send."""
    sock.setblocking(True)
    conn.send_bytes(b"ready")
    conn.recv_bytes()
    pack = HEADER.pack
    frames: list[bytes] = []
    for i in range(count):
        data = payload(i)
        frames.append(pack(len(data)))
        frames.append(data)
        if len(frames) >= 2 * batch:
            sock.sendall(b"".join(frames))
            frames = []
    if frames:
        sock.sendall(b"".join(frames))
    sock.close()


def orig_runner(conn: Any, tasks: Any) -> None:
    """BASELINE child for the original design: a runner fed by a multiprocessing.Queue.

    It says "ready", then never reads its queue (a runner stuck in native code),
    so a bounded queue fills and ``Queue.put`` blocks.
    """
    _ready_until_eof(conn)


def noop(x: Any) -> Any:
    """The tiny job for trio_parallel and to_thread round trips."""
    return x


def pid() -> int:
    return os.getpid()
