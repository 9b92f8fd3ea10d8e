"""The wire format between the supervisor and its child: frames and typed messages.

Both sides import this module, so it must stay free of trio and of anything
heavy: the child loads it on every spawn.

Each message is a NamedTuple (:class:`Task`, :class:`Events` ...), read by
field name and dispatched with ``match``. A frame is a 4-byte big-endian
length followed by a pickle (protocol 5) of a *list* of messages, so one
``send`` carries a whole batch; in it each message is a plain tuple of its tag
and its fields, which pickles several times faster than the class would.
Only the parse (:func:`check_from_child`, :func:`check_from_parent`) turns a
wire tuple back into a message, and only it raises :class:`FrameError` for one.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, NamedTuple, TypeAlias, cast

from ._pieces import Pieces

#: What a frame is written from: bytes, or a bytearray or memoryview of a payload.
Buffer: TypeAlias = "bytes | bytearray | memoryview"

PICKLE_PROTOCOL: Final = 5
HEADER: Final = struct.Struct("!I")
DEFAULT_MAX_FRAME: Final = 64 * 1024 * 1024
#: The smallest ``max_frame_size``: a frame this size still holds a small
#: request or result, a whole error report (``_child`` bounds its text to a
#: fraction of the frame) and any number of control messages (split across
#: frames). Below it, tasks would fail for reasons that have nothing to do with them.
MIN_FRAME_SIZE: Final = 64 * 1024
#: The largest: the header holds the length in 32 bits.
MAX_FRAME_SIZE: Final = 2**32 - 1
#: An upper bound on what a frame carrying one message costs beyond the bytes
#: and strings inside the message (measured: 21-46 bytes; pickle's opcodes,
#: tuple, ints and memo). A payload of at most ``max_frame - MESSAGE_OVERHEAD``
#: bytes always fits in a frame of its own.
MESSAGE_OVERHEAD: Final = 256

# The messages. Each is a NamedTuple, so code on both sides reads fields by
# name and dispatches with ``match``. On the wire each travels as a plain tuple
# of its tag and its fields: pickle writes a NamedTuple as a reference to its
# class plus a call to its ``__new__``, which made dumps about 8x and loads
# about 3x slower per message than a plain tuple (measured with ``timeit``,
# 10-message batches). :func:`encode_frames` flattens, the parse
# (:func:`check_from_child`, :func:`check_from_parent`) builds them back.


class Task(NamedTuple):
    """Parent -> child: run ``request`` (pickled on its own) with ``window`` events of credit."""

    task_id: int
    request: bytes | bytearray
    window: int


class Cancel(NamedTuple):
    """Parent -> child: cancel one task, or every task if ``task_id`` is None."""

    task_id: int | None


class Credit(NamedTuple):
    """Parent -> child: the consumer took ``credits`` more of the task's events."""

    task_id: int
    credits: int


class Shutdown(NamedTuple):
    """Parent -> child: finish, tear down and exit."""


class Hello(NamedTuple):
    """Child -> parent: the runner class and its args loaded; setup starts."""

    pid: int


class Ready(NamedTuple):
    """Child -> parent: setup returned."""

    pid: int


class Started(NamedTuple):
    """Child -> parent (the ACK): ``handle()`` is about to run; a crash now fails the task."""

    task_id: int


class Events(NamedTuple):
    """Child -> parent: a batch of events; a list in the child's outbox, its pickle on the wire.

    On the wire the pickle is bytes, or a list of bytes pieces if it is big
    (``_pieces.cut``); likewise a Result's.
    """

    task_id: int
    payload: Any


class Result(NamedTuple):
    """Child -> parent: the task's return value; the value in the outbox, its pickle on the wire."""

    task_id: int
    payload: Any


class Error(NamedTuple):
    """Child -> parent: ``handle()`` raised."""

    task_id: int
    remote_type: str
    message: str
    traceback: str


class Cancelled(NamedTuple):
    """Child -> parent: the task ended cancelled, with ``dropped`` queued events never sent."""

    task_id: int
    dropped: int = 0


class Heartbeat(NamedTuple):
    """Child -> parent: alive, with nothing else to say."""


class Fatal(NamedTuple):
    """Child -> parent, before a crash exit: what killed the runner, and at which stage."""

    stage: str
    remote_type: str
    message: str
    traceback: str


ToChild: TypeAlias = "Task | Cancel | Credit | Shutdown"
FromChild: TypeAlias = "Hello | Ready | Started | Events | Result | Error | Cancelled | Heartbeat | Fatal"
Message: TypeAlias = "ToChild | FromChild"

# Each message's tag on the wire. The numbers are the protocol; both ends are
# always the same version of this code. The hot path builds its messages as
# wire tuples with these, ``(RESULT, task_id, payload)``, where they are encoded
# at once: making the class first and flattening it cost about a microsecond a message.
TASK: Final = 1
CANCEL: Final = 2
CREDIT: Final = 3
SHUTDOWN: Final = 4
HELLO: Final = 10
READY: Final = 11
STARTED: Final = 12
EVENTS: Final = 13
RESULT: Final = 14
ERROR: Final = 15
CANCELLED: Final = 16
HEARTBEAT: Final = 17
FATAL: Final = 18

#: Each message class's tag.
TAGS: Final[dict[type[Any], int]] = {
    Task: TASK,
    Cancel: CANCEL,
    Credit: CREDIT,
    Shutdown: SHUTDOWN,
    Hello: HELLO,
    Ready: READY,
    Started: STARTED,
    Events: EVENTS,
    Result: RESULT,
    Error: ERROR,
    Cancelled: CANCELLED,
    Heartbeat: HEARTBEAT,
    Fatal: FATAL,
}

#: A message as it travels: a plain tuple of its tag and its fields.
Wire: TypeAlias = "tuple[Any, ...]"

# Stages named by FATAL.
STAGE_LOAD: Final = "load"  # importing the runner class or unpickling its args
STAGE_SETUP: Final = "setup"
STAGE_RUN: Final = "run"
STAGE_TEARDOWN: Final = "teardown"
STAGE_READER: Final = "reader"  # the child's reader thread failed: nothing reads the parent any more
STAGE_PROTOCOL: Final = "protocol"  # the child got a frame it cannot read

# Events and results travel pickled on their own inside the frame, like requests
# the other way: a payload that does not pickle (or unpickle) fails its one task
# instead of breaking the whole connection.

# Exit code of a child that could not even load its runner: nothing a restart can fix.
EXIT_LOAD_FAILED: Final = 97
# Exit code of a child that got a corrupt or oversize frame from the parent (with a
# FATAL of stage "protocol" before it): the parent reports PROTOCOL_ERROR, not a signal.
EXIT_PROTOCOL_ERROR: Final = 96


class FrameError(Exception):
    """A frame that is oversize or does not unpickle: the peer is broken."""


_NAMES: Final = {tag: kind.__name__ for kind, tag in TAGS.items()}
#: How each message is checked, by tag: its class, the least and most fields
#: it may have on the wire (fields with a default may be left off), and the
#: type of each field checked here, by position on the wire (a payload is
#: checked where it is used).
_Shape: TypeAlias = "tuple[type[Any], int, int, tuple[tuple[int, type], ...]]"


def _shape(kind: type[Any], *types: type | None) -> _Shape:
    checks = tuple((position, expected) for position, expected in enumerate(types, 1) if expected is not None)
    return (kind, len(types) - len(kind._field_defaults), len(types), checks)


_FROM_CHILD: Final[dict[int, _Shape]] = {
    TAGS[Hello]: _shape(Hello, int),
    TAGS[Ready]: _shape(Ready, int),
    TAGS[Started]: _shape(Started, int),
    TAGS[Events]: _shape(Events, int, None),
    TAGS[Result]: _shape(Result, int, None),
    TAGS[Error]: _shape(Error, int, str, str, str),
    TAGS[Cancelled]: _shape(Cancelled, int, int),
    TAGS[Heartbeat]: _shape(Heartbeat),
    TAGS[Fatal]: _shape(Fatal, str, str, str, str),
}
_TO_CHILD: Final[dict[int, _Shape]] = {
    TAGS[Task]: _shape(Task, int, None, int),
    TAGS[Cancel]: _shape(Cancel, None),
    TAGS[Credit]: _shape(Credit, int, int),
    TAGS[Shutdown]: _shape(Shutdown),
}
#: ``tuple.__new__``: makes a message of its fields in C, without the call of
#: the class's Python-level ``__new__``.
_tuple_new: Final[Callable[[type[Any], tuple[Any, ...]], Any]] = cast(Any, tuple).__new__


def _parser(shapes: dict[int, _Shape]) -> Callable[[object], Any]:
    """The parse of one direction's messages, by ``shapes``: a closure, so each message
    costs one Python call (this runs for every message, twice per round trip)."""

    def parse(wire: object) -> Any:
        if type(wire) is not tuple or not wire:
            raise FrameError(f"malformed message {wire!r:.200}: not a non-empty tuple")
        fields: tuple[Any, ...] = wire  # pyright: ignore[reportUnknownVariableType]
        tag = fields[0]
        shape = shapes.get(tag) if type(tag) is int else None
        if shape is None:
            raise FrameError(f"unknown message tag {tag!r:.100}")
        kind, least, most, checks = shape
        count = len(fields) - 1
        if not least <= count <= most:
            raise FrameError(f"malformed message {fields!r:.200}: {len(fields)} fields")
        for position, expected in checks:
            if position <= count and type(fields[position]) is not expected:
                found, name = fields[position], expected.__name__
                raise FrameError(f"malformed message {fields!r:.200}: {found!r:.50} is not a {name}")
        if count < most:
            return kind(*fields[1:])
        return _tuple_new(kind, fields[1:])

    return parse


#: The message a wire tuple from the child carries, if it is well formed; FrameError if
#: not. The parent routes only checked messages, so a malformed one is a protocol error
#: while a bug in routing raises as the bug it is.
check_from_child: Final[Callable[[object], FromChild]] = _parser(_FROM_CHILD)
#: The message a wire tuple from the parent carries, if it is well formed; FrameError if not.
check_from_parent: Final[Callable[[object], ToChild]] = _parser(_TO_CHILD)


def _flatten(messages: Iterable[Message]) -> list[Wire]:
    """Each message as its wire tuple: its tag, then its fields."""
    tags = TAGS
    flat: list[Wire] = []
    for message in messages:
        # Concatenation runs in C: about a fifth faster than unpacking into a tuple.
        # A loop, not a comprehension: a batch is mostly one or two messages, and
        # a comprehension is one more Python call (before Python 3.12).
        flat.append((tags[type(message)],) + message)  # noqa: RUF005
    return flat


def encode(messages: Iterable[Message]) -> bytes:
    """One frame carrying ``messages``, whatever its size (see :func:`encode_frames`)."""
    payload = pickle.dumps(_flatten(messages), protocol=PICKLE_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def encode_frames(messages: Iterable[Message], max_frame: int) -> bytes:
    """Frames carrying ``messages`` in order, none longer than ``max_frame`` (the header aside).

    Raises:
        FrameError: a single message does not fit in a frame (see :func:`encode_wire`).
    """
    return encode_wire(_flatten(messages), max_frame)


def encode_wire(messages: list[Wire], max_frame: int) -> bytes:
    """Like :func:`encode_frames`, for messages already built as wire tuples (the hot path).

    Both ends send through this. The size is measured, not guessed: the
    common case is one pickle of the whole batch, exactly as :func:`encode`.
    Only a batch that comes out too long is grouped by an estimate, and a
    group that still comes out too long (pickle's framing and memo, or text
    that is not ASCII, escaped the estimate) is halved and pickled again.

    Raises:
        FrameError: a single message does not fit in a frame; the callers
            bound their payloads to ``max_frame - MESSAGE_OVERHEAD`` first.
    """
    payload = pickle.dumps(messages, protocol=PICKLE_PROTOCOL)
    if len(payload) <= max_frame:
        return HEADER.pack(len(payload)) + payload
    parts: list[Buffer] = []
    for group in _groups(messages, max_frame):
        _encode_group(group, max_frame, parts, _dumps)
    return b"".join(parts)


def encode_wire_parts(messages: list[Wire], max_frame: int) -> list[Buffer]:
    """Like :func:`encode_wire`, as a list of buffers to write in turn, without copying big payloads.

    A bytes or bytearray of 64 KiB or more inside a message (pickle writes
    those straight to its file) is one of the parts, by reference: the
    parent sends a big request without a copy on its event loop.
    """
    parts: list[Buffer] = []
    for group in _groups(messages, max_frame):
        _encode_group(group, max_frame, parts, _dump_parts)
    return parts


class _Parts:
    """pickle's file: keeps what it is given (its own 64 KiB frames, or big payloads as they are)."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[Buffer] = []
        self.size = 0

    def write(self, data: Buffer) -> int:
        self.parts.append(data)
        size = memoryview(data).nbytes
        self.size += size
        return size


def _dumps(group: list[Any]) -> tuple[list[Buffer], int]:
    payload = pickle.dumps(group, protocol=PICKLE_PROTOCOL)
    return [payload], len(payload)


def _dump_parts(group: list[Any]) -> tuple[list[Buffer], int]:
    file = _Parts()
    pickle.Pickler(file, protocol=PICKLE_PROTOCOL).dump(group)
    return file.parts, file.size


def _groups(messages: list[Any], max_frame: int) -> Iterator[list[Any]]:
    """``messages`` in runs whose estimated frames fit ``max_frame``."""
    group: list[Any] = []
    size = 0
    for message in messages:
        estimate = _estimate(message)
        if group and size + estimate > max_frame:
            yield group
            group, size = [], 0
        group.append(message)
        size += estimate
    if group:
        yield group


def _estimate(message: tuple[Any, ...]) -> int:
    """About what ``message`` adds to a frame: its bytes and strings, and a little for the rest."""
    size = 16
    for item in message:
        if isinstance(item, (bytes, bytearray, str, Pieces)):
            size += len(item) + 9
        else:
            size += 10
    return size


def _encode_group(
    group: list[Any],
    max_frame: int,
    out: list[Buffer],
    dump: Callable[[list[Any]], tuple[list[Buffer], int]],
) -> None:
    parts, size = dump(group)
    if size <= max_frame:
        out.append(HEADER.pack(size))
        out.extend(parts)
    elif len(group) == 1:
        raise FrameError(
            f"a {_NAMES[group[0][0]]} message pickles to {size} bytes, more than the "
            f"frame limit of {max_frame} bytes"
        )
    else:
        half = len(group) // 2
        _encode_group(group[:half], max_frame, out, dump)
        _encode_group(group[half:], max_frame, out, dump)


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


class BigFrame:
    """A big frame's bytes, in the pieces they arrived in: never joined on the reader's thread."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[Buffer]) -> None:
        self.parts = parts


class FrameReader:
    """Splits a byte stream into message lists. Used by both ends."""

    __slots__ = ("_big_missing", "_big_parts", "_buffer", "_max_frame", "in_big_frame")

    def __init__(self, max_frame: int) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame
        self._big_parts: list[Buffer] | None = None
        self._big_missing = 0
        #: A big frame has begun and its reads are being kept as they come. An
        #: attribute, not a property: the parent reads it before every receive.
        self.in_big_frame = False

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[list[Any]]:
        """Yield each whole frame's messages in turn.

        A generator, so the batches before a corrupt frame are handed over
        before the error is raised: a result sent just before is never lost.
        """
        return cast("Iterator[list[Any]]", self.feed_big(data, None))

    def feed_big(
        self, data: bytes | bytearray | memoryview, big: int | None
    ) -> Iterator[list[Any] | BigFrame]:
        """Like :meth:`feed`, but a frame of ``big`` bytes or more is not decoded here.

        It is yielded as a :class:`BigFrame`, for the caller to decode off its
        event loop. Its bytes are not copied on the way (a growing buffer would
        copy them over and over): the reads it arrives in are kept as they are,
        so ``data`` must not change afterwards.
        """
        if not self._buffer and self._big_parts is None and len(data) > HEADER.size:
            # The commonest read by far, each message of a round trip: one whole
            # frame and nothing more. Decoded from a slice of the read (a copy, as
            # the buffer would make; cheaper than a view, for a small frame) without
            # the generator and the buffer: about a microsecond less a frame.
            (length,) = HEADER.unpack_from(data)
            whole = length == len(data) - HEADER.size and length <= self._max_frame
            if whole and (big is None or length < big):
                return iter((decode(data[HEADER.size :]),))
        return self._feed(data, big)

    def _feed(self, data: bytes | bytearray | memoryview, big: int | None) -> Iterator[list[Any] | BigFrame]:
        parts = self._big_parts
        if parts is not None:
            # The rest of a big frame: kept as it comes.
            missing = self._big_missing
            if len(data) < missing:
                parts.append(data)
                self._big_missing = missing - len(data)
                return
            view = memoryview(data)
            parts.append(view[:missing])
            self._big_parts = None
            self.in_big_frame = False
            data = view[missing:]
            yield BigFrame(parts)
        buffer = self._buffer
        buffer += data
        start = 0
        size = len(buffer)
        try:
            while size - start >= HEADER.size:
                length = frame_length(buffer[start : start + HEADER.size], self._max_frame)
                end = start + HEADER.size + length
                if big is not None and length >= big:
                    body = start + HEADER.size
                    if end > size:
                        # What has come of it (less than one read) is copied out;
                        # the rest is kept read by read.
                        self._big_parts = [bytes(buffer[body:size])]
                        self.in_big_frame = True
                        self._big_missing = end - size
                        start = size
                        break
                    # Whole already: the reader moves to a new buffer holding only
                    # what follows (less than one read), and the frame keeps the old one.
                    frame = BigFrame([memoryview(buffer)[body:end]])
                    self._buffer = buffer = buffer[end:]
                    start, size = 0, len(buffer)
                    yield frame
                    continue
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
