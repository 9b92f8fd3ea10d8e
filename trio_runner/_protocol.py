"""The wire format between the supervisor and its child: frames and message tags.

Both sides import this module, so it must stay free of trio and of anything
heavy: the child loads it on every spawn.

A frame is a 4-byte big-endian length followed by a pickle (protocol 5) of a
*list* of messages, so one ``send`` carries a whole batch. Each message is a
plain tuple whose first item is one of the tags below; tuples pickle faster than
any class would, and the two ends are always the same version of this code.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator
from typing import Any, Final

PICKLE_PROTOCOL: Final = 5
HEADER: Final = struct.Struct("!I")
DEFAULT_MAX_FRAME: Final = 64 * 1024 * 1024

# Parent -> child.
TASK: Final = 1  # (TASK, task_id, request_bytes, window)
CANCEL: Final = 2  # (CANCEL, task_id)  task_id None means every task
CREDIT: Final = 3  # (CREDIT, task_id, n)
SHUTDOWN: Final = 4  # (SHUTDOWN,)

# Child -> parent.
HELLO: Final = 10  # (HELLO, pid)  the runner class and its args loaded; setup starts
READY: Final = 11  # (READY, pid)  setup returned
ACK: Final = 12  # (ACK, task_id)  handle() was entered
EVENTS: Final = 13  # (EVENTS, task_id, pickle of [event, ...])
RESULT: Final = 14  # (RESULT, task_id, pickle of value)
ERROR: Final = 15  # (ERROR, task_id, remote_type, message, traceback)
CANCELLED: Final = 16  # (CANCELLED, task_id)
HEARTBEAT: Final = 17  # (HEARTBEAT,)
FATAL: Final = 18  # (FATAL, stage, remote_type, message, traceback)  sent before a crash exit

# Stages named by FATAL.
STAGE_LOAD: Final = "load"  # importing the runner class or unpickling its args
STAGE_SETUP: Final = "setup"
STAGE_RUN: Final = "run"
STAGE_TEARDOWN: Final = "teardown"

# Events and results travel pickled on their own inside the frame, like requests
# the other way: a payload that does not pickle (or unpickle) fails its one task
# instead of breaking the whole connection.

# Exit code of a child that could not even load its runner: nothing a restart can fix.
EXIT_LOAD_FAILED: Final = 97


class FrameError(Exception):
    """A frame that is oversize or does not unpickle: the peer is broken."""


def encode(messages: list[Any]) -> bytes:
    """One frame carrying ``messages``."""
    payload = pickle.dumps(messages, protocol=PICKLE_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def frame_length(header: bytes | bytearray | memoryview, max_frame: int) -> int:
    (length,) = HEADER.unpack(header)
    if length > max_frame:
        raise FrameError(f"frame of {length} bytes exceeds the maximum of {max_frame} bytes")
    return length


def decode(payload: bytes | bytearray | memoryview) -> list[Any]:
    try:
        messages = pickle.loads(payload)
    except Exception as exc:
        raise FrameError(f"corrupt frame: {type(exc).__name__}: {exc}") from exc
    if not isinstance(messages, list):
        raise FrameError(f"corrupt frame: expected a list of messages, got {type(messages).__name__}")
    return messages  # pyright: ignore[reportUnknownVariableType]


class FrameReader:
    """Splits a byte stream into message lists. Used by both ends."""

    __slots__ = ("_buffer", "_max_frame")

    def __init__(self, max_frame: int) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[list[Any]]:
        """Yield each whole frame's messages in turn.

        A generator, so the batches before a corrupt frame are handed over
        before the error is raised: a result sent just before is never lost.
        """
        buffer = self._buffer
        buffer += data
        start = 0
        size = len(buffer)
        try:
            while size - start >= HEADER.size:
                length = frame_length(buffer[start : start + HEADER.size], self._max_frame)
                end = start + HEADER.size + length
                if end > size:
                    break
                # Both views are released before the buffer is trimmed, even when
                # decode raises (its traceback would otherwise keep one alive).
                with memoryview(buffer) as view, view[start + HEADER.size : end] as payload:
                    batch = decode(payload)
                start = end
                yield batch
        finally:
            if start:
                del buffer[:start]

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)
