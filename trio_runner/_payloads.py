"""Big payloads off the trio thread: the parent (un)pickles them in a worker thread, in chunks.

Parent side only (it imports trio). Events and results up to :data:`LARGE`
bytes, and requests up to :data:`LARGE_REQUEST`, are (un)pickled on the trio
thread as before: a thread hop costs more than they do. Larger ones go to a worker thread, and there the one
design decision matters: a plain ``to_thread(pickle.loads, data)`` holds the
GIL for the whole C-level copy, so the trio thread waits for it anyway
(measured: no better than doing it on the loop). Instead, the (un)pickler
works on a file object whose methods are Python code: the C (un)pickler calls
them at least once per 64 KiB pickle frame, and they hand over views of the
received buffers (or copy at most :data:`_CHUNK` bytes at a time) and release
the GIL (``time.sleep(0)``) every half millisecond of work, so the trio thread
gets in that often. What the thread unpickled from is freed in the thread too
(see :func:`decode_in_thread`), and a big request's pickle is held in pieces
(:class:`RequestPickle`) that are freed in a thread when the task drops it.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable
from typing import Any, Final, cast

import trio

from . import _protocol as proto
from ._pieces import PIECE, Pacer, Pieces, framed_size

#: Frames and payloads (pickled) of this many bytes or more are unpickled in a
#: thread. Below it, a stream's event batches: a full default window of
#: 100-byte events is about 0.9 MB, and a thread hop per batch would halve the
#: event rate. Unpickling 1 MiB of small ints on the loop takes a few ms.
LARGE: Final = 1024 * 1024
#: Requests that pickle to more than this are pickled again in a thread, and
#: written from that pickle without a copy. Pickling is cheaper to abort than
#: unpickling is to predict: the loop pays at most this much pickling work
#: (about 0.6 ms of small ints) for a request that turns out big.
LARGE_REQUEST: Final = 128 * 1024
#: Bytes copied between two releases of the GIL: a fraction of a millisecond
#: even into fresh pages.
_CHUNK: Final = 256 * 1024


class _ChunkedReader:
    """A read-only file over buffers read in turn, for ``pickle.Unpickler`` in a worker thread."""

    def __init__(self, parts: list[proto.Buffer]) -> None:
        self._parts = [memoryview(part).cast("B") for part in parts]
        self._index = 0
        self._offset = 0
        self._pacer = Pacer()

    def take(self, size: int) -> list[memoryview]:
        """Views of the next ``size`` bytes (fewer at the end), one per part they span."""
        pieces: list[memoryview] = []
        parts = self._parts
        while size > 0 and self._index < len(parts):
            part = parts[self._index]
            available = len(part) - self._offset
            if available <= 0:
                self._index += 1
                self._offset = 0
                continue
            step = min(available, size)
            pieces.append(part[self._offset : self._offset + step])
            self._offset += step
            size -= step
        return pieces

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = sum(len(part) for part in self._parts)
        # A pickle frame (64 KiB) at a time; only a big str is read whole. A
        # frame within one part is a view of it, not a copy: the unpickler
        # takes any buffer, and a fresh 64 KiB block per frame would sit in the
        # heap after the list being built, so that each time the list grows
        # its realloc could not extend it in place and would copy it whole.
        pieces = self.take(size)
        # (typeshed says bytes; the C unpickler takes any contiguous buffer.)
        chunk = cast(bytes, pieces[0]) if len(pieces) == 1 else b"".join(pieces)
        self._pacer.tick()
        return chunk

    def readinto(self, buffer: bytearray | memoryview) -> int:
        # How the unpickler fills a big bytes or bytearray: in chunks, letting the loop in.
        done = 0
        with memoryview(buffer) as raw, raw.cast("B") as target:
            while done < len(target):
                pieces = self.take(min(_CHUNK, len(target) - done))
                if not pieces:
                    break
                for piece in pieces:
                    target[done : done + len(piece)] = piece
                    done += len(piece)
                self._pacer.tick()
        return done

    def readline(self) -> bytes:
        # Required by Unpickler; protocol 5 pickles never use it.
        line = bytearray()
        while not line.endswith(b"\n"):
            byte = self.read(1)
            if not byte:
                break
            line += byte
        return bytes(line)


class _ChunkedWriter:
    """A write-only file for ``pickle.Pickler``: keeps what it is given; :meth:`pieces` copies it out once."""

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.size = 0
        self._pacer = Pacer()

    def write(self, data: Any) -> int:
        # The pickler hands over a finished 64 KiB frame, or a big bytes-like
        # payload of the caller's own: kept as it is until ``pieces`` copies it.
        self.parts.append(data)
        size = memoryview(data).nbytes
        self.size += size
        self._pacer.tick()
        return size

    def pieces(self, limit: int) -> bytes | RequestPickle:
        """The pickle: bytes up to :data:`~trio_runner._pieces.PIECE`, else copied into pieces of that size.

        Copies, so that the pickle shares no buffer with the request (the
        caller may change a bytearray it sent) and is made only of pieces
        that are cheap to free; one piece at a time, letting the loop in.
        Whole if the pieces' own overhead would pass ``limit`` (the most a
        frame can carry) where the bytes alone would not: such a request,
        within a few hundred bytes of the limit, is freed on the loop.
        """
        if self.size <= PIECE or self.size <= limit < framed_size(self.size):
            return b"".join(self.parts)
        reader = _ChunkedReader(self.parts)
        self.parts = []
        pieces: list[bytes] = []
        while views := reader.take(PIECE):
            pieces.append(b"".join(views))
            self._pacer.tick()
        return RequestPickle(pieces)


class RequestPickle(Pieces):
    """A big request's pickle, whose pieces are freed in a worker thread, one at a time.

    The task holds it until the runner acknowledges the task (until the
    task settles, with retry=True), and drops it on the loop: freeing 60 MiB
    there took about 5 ms in one go. Being freed, it hands its list of pieces
    to a thread instead. What writes the pieces to the runner holds them only
    while it writes.
    """

    __slots__ = ()

    def __del__(self) -> None:
        pieces = self.pieces
        self.pieces = []
        # At interpreter shutdown no thread can start: then they are freed here.
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.start_thread_soon(lambda: _free(pieces), _ignore)


def _free(pieces: list[bytes]) -> None:
    pacer = Pacer()
    while pieces:
        pieces.pop()
        pacer.tick()


def _ignore(outcome: object) -> None:
    pass


def _dropped(pieces: list[bytes]) -> Loaded:
    # For a task that no longer wants it: nothing reads it, but it is freed here.
    _free(pieces)
    return Loaded()


class _TooBig(Exception):
    """The pickle passed :data:`LARGE_REQUEST` bytes: it is done again in a thread."""


class _BoundedWriter:
    """Collects a small pickle; gives up (raises ``_TooBig``) past :data:`LARGE_REQUEST` bytes."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.size = 0

    def write(self, data: Any) -> int:
        size = len(data)
        self.size += size
        if self.size > LARGE_REQUEST:
            raise _TooBig
        self.parts.append(data)
        return size


class LoopPickler:
    """Pickles requests on the trio thread, as long as they are small.

    One per supervisor, reused: a fresh ``Pickler`` per request would cost a
    microsecond, a tenth of a tiny task's overhead. The size of a pickle is
    not known before pickling; this one gives up after :data:`LARGE_REQUEST` bytes
    (a fraction of a millisecond of work), and the caller pickles again in a
    thread with :func:`dumps_in_thread`. Only the trio thread uses it.
    """

    def __init__(self) -> None:
        self._writer = _BoundedWriter()
        self._pickler = pickle.Pickler(self._writer, protocol=proto.PICKLE_PROTOCOL)

    def dumps(self, obj: Any) -> bytes | None:
        """``obj`` pickled, or None past :data:`LARGE_REQUEST` bytes. Raises what pickling raises."""
        writer = self._writer
        writer.parts = []
        writer.size = 0
        try:
            self._pickler.dump(obj)
        except _TooBig:
            return None
        except BaseException:
            # A pickler that failed half-way is not reused.
            self._pickler = pickle.Pickler(writer, protocol=proto.PICKLE_PROTOCOL)
            raise
        finally:
            self._pickler.clear_memo()  # holds the request's objects otherwise
        parts = writer.parts
        return parts[0] if len(parts) == 1 else b"".join(parts)


def _dumps_chunked(obj: Any, limit: int) -> bytes | RequestPickle:
    writer = _ChunkedWriter()
    pickle.Pickler(writer, protocol=proto.PICKLE_PROTOCOL).dump(obj)
    return writer.pieces(limit)


def _loads_chunked(payload: bytes | bytearray | memoryview | list[bytes]) -> Any:
    parts: list[Any] = payload if isinstance(payload, list) else [payload]
    return pickle.Unpickler(_ChunkedReader(parts)).load()


def _decode_chunked(frame: proto.BigFrame) -> list[Any]:
    try:
        messages = pickle.Unpickler(_ChunkedReader(frame.parts)).load()
    except Exception as exc:  # whatever the bytes make the unpickler do
        raise proto.FrameError(f"corrupt frame: {type(exc).__name__}: {exc}") from exc
    finally:
        # Emptied, not replaced: the reader that made the frame may still hold the
        # list, and tens of MiB of buffers must be freed here, not on the loop;
        # one at a time, letting the loop in (each is a munmap).
        parts = frame.parts
        pacer = Pacer()
        while parts:
            parts.pop()
            pacer.tick()
    if not isinstance(messages, list):
        raise proto.FrameError(f"corrupt frame: expected a list of messages, got {type(messages).__name__}")
    return messages  # pyright: ignore[reportUnknownVariableType]


class Loaded:
    """A payload unpickled in a thread: its value, or the exception unpickling raised."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any = None, error: Exception | None = None) -> None:
        self.value = value
        self.error = error

    def get(self) -> Any:
        """The value (or raise the error), once: it is handed over, not kept.

        Whatever the library still holds when the application drops a big
        value would be freed later, on the trio thread (5M ints: 30-120 ms).
        """
        error, value = self.error, self.value
        self.error = self.value = None
        if error is not None:
            raise error
        return value


def _load_or_error(payload: bytes | list[bytes]) -> Loaded:
    """The payload unpickled; its pieces, if it came in pieces, freed one at a time."""
    try:
        return Loaded(_loads_chunked(payload))
    except Exception as exc:  # the payload's own classes run here: anything goes
        return Loaded(error=exc)
    finally:
        if isinstance(payload, list):
            _free(payload)


async def dumps_in_thread(obj: Any, limiter: trio.CapacityLimiter, limit: int) -> bytes | RequestPickle:
    """Pickle ``obj`` in a worker thread (a big pickle in pieces). Raises what pickling raises.

    ``limit``: the most a frame carries beside the message; pieces only if they fit it.

    **Cancellation:** abandons the thread, which finishes pickling into the void.
    """
    return await trio.to_thread.run_sync(_dumps_chunked, obj, limit, abandon_on_cancel=True, limiter=limiter)


async def decode_in_thread(
    frame: proto.BigFrame, limiter: trio.CapacityLimiter, wants: Callable[[int], bool]
) -> list[Any]:
    """A big frame's messages, checked, with their big payloads unpickled, all in a worker thread.

    An EVENTS or RESULT payload of :data:`LARGE` bytes or more for a task that
    ``wants(task_id)`` comes back as a :class:`Loaded`; any other as it came.
    The frame's buffers and those payloads' bytes are freed in the thread:
    freeing tens of MiB costs milliseconds (pages go back to the system).
    ``wants`` is read from the thread: a task that stops wanting meanwhile
    costs only the unpickling.

    Raises:
        FrameError: the frame does not unpickle to a list, or holds a malformed message.
    """
    return await trio.to_thread.run_sync(
        _decode_and_load, frame, wants, abandon_on_cancel=True, limiter=limiter
    )


def _decode_and_load(frame: proto.BigFrame, wants: Callable[[int], bool]) -> list[proto.FromChild]:
    messages: list[Any] = _decode_chunked(frame)
    for index, wire in enumerate(messages):
        message = messages[index] = proto.check_from_child(wire)
        del wire
        if isinstance(message, proto.Events | proto.Result):
            payload: Any = message.payload
            if isinstance(payload, list):  # pieces: a big pickle, freed here in any case
                pieces = cast("list[bytes]", payload)
                loaded = _load_or_error(pieces) if wants(message.task_id) else _dropped(pieces)
                del pieces
                messages[index] = message._replace(payload=loaded)
            elif len(payload) >= LARGE and wants(message.task_id):
                # The message holding the bytes goes here, and the bytes with it.
                messages[index] = message._replace(payload=_load_or_error(payload))
            del payload
        del message
    return messages
