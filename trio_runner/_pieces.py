"""Big values in pieces, so that no single C call on the parent holds the GIL for long.

Both sides import this module (the child pickles references to it), so it
stays free of trio. The one design decision: the parent's worker thread lets
the trio thread in only between calls into Python code, so any step the C
unpickler or the allocator takes in one call must be small.

- A big list is pickled by the child as runs of 1000 items (pickle's own
  ``APPENDS`` batches, fed to :class:`_Runs`) and joined by :func:`join_list`
  into a list allocated once at its final size. The unpickler would otherwise
  grow it with ``realloc``, and once glibc has raised its mmap threshold
  (after any big free) one growth copies the whole pointer array, tens of
  MiB, in one call (measured: 15-18 ms for 5M items).
- A big request pickle is held by the parent as :class:`Pieces` of at most
  :data:`PIECE` bytes, which pickle as the bytes they join to, so the child
  gets plain bytes. Freeing one piece is a fraction of a millisecond; freeing
  a 60 MiB bytes object was about 5 ms in one call.
- The other way, the child sends a result's or an event batch's pickle of
  more than :data:`PIECE` bytes as a list of pieces (:func:`cut`), which the
  parent's worker thread unpickles across and frees one at a time.
"""

from __future__ import annotations

import itertools
import pickle
import time
from collections.abc import Iterator
from typing import Any, Final

#: Lists of this many items or more are pickled in runs: below it, growing one
#: copies at most its 2 MiB pointer array (about half a millisecond).
SPLIT_ITEMS: Final = 1 << 18
#: Items per run of a big list on the reading side.
_RUN: Final = 1 << 16
#: The size of the pieces a big pickle is held in, either way.
PIECE: Final = 1 << 20
#: What a piece adds to a frame beyond its bytes: pickle's ``BINBYTES8`` header
#: (9 bytes), its memo entry, and its share of the list's opcodes.
PIECE_OVERHEAD: Final = 16
#: What pickling pieces as ``join_bytes(pieces)`` adds beyond them: the
#: function's name, the list and the call.
_JOIN_OVERHEAD: Final = 64
#: Work between two releases of the GIL. Each release lets a waiting trio
#: thread in at once, instead of after the interpreter's 5 ms switch interval;
#: releasing more often only costs this thread time when the loop is busy.
_YIELD_EVERY: Final = 0.0005


class Pacer:
    """Releases the GIL (``time.sleep(0)``) once per ``_YIELD_EVERY`` of work."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        if now - self._last >= _YIELD_EVERY:
            time.sleep(0)
            self._last = time.perf_counter()


# -- lists ------------------------------------------------------------------------


def split_list(value: Any) -> Any:
    """``value``, or a stand-in that pickles it in runs if it is a big list (an O(1) check).

    Only the value itself: the pickler gives no hook for the lists inside
    other containers (``reducer_override`` is not called for exact lists).
    Exact lists only: a subclass may pickle state of its own.
    """
    if value.__class__ is list and len(value) >= SPLIT_ITEMS:
        return _SplitList(value)
    return value


class _SplitList:
    """Pickles as ``join_list(<runs of the list's items>)``: the reader gets the list itself."""

    __slots__ = ("items",)

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __reduce__(self) -> tuple[Any, ...]:
        return (join_list, (_RunsOf(self.items),))


class _RunsOf:
    """Pickles as a :class:`_Runs` that the unpickler fills with the items, without a copy here."""

    __slots__ = ("items",)

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __reduce__(self) -> tuple[Any, ...]:
        # The fourth item: pickle writes the items as runs of 1000 (APPENDS),
        # and the unpickler hands each run to the object's ``extend``.
        return (_Runs, (len(self.items),), None, iter(self.items))


class _Runs:
    """The unpickler's target for a big list: collects the items it is given in runs of :data:`_RUN`."""

    __slots__ = ("runs", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.runs: list[list[Any]] = [[]]

    def extend(self, items: list[Any]) -> None:
        # At most 1000 items at a time. Copied into runs that grow to _RUN items
        # (a realloc copies at most 512 KiB) rather than kept: thousands of
        # live 1000-item lists would make the garbage collector's young
        # generation fill up, and each of its passes walk all their items.
        run = self.runs[-1]
        if len(run) >= _RUN:
            run: list[Any] = []
            self.runs.append(run)
        run.extend(items)


def join_list(runs: _Runs) -> list[Any]:
    """The list the runs make, allocated once at its final size and filled a run at a time.

    ``list()`` sizes the list from ``len()`` of its argument, then pulls the
    items through a C iterator; between two runs the generator (Python code)
    releases the GIL now and then.
    """
    parts, runs.runs = runs.runs, []
    parts.reverse()
    return list(_Joining(runs.size, parts))


class _Joining:
    __slots__ = ("_parts", "_size")

    def __init__(self, size: int, parts: list[list[Any]]) -> None:
        self._size = size  # the child's count: only a hint, a wrong one just costs a realloc
        self._parts = parts

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Any]:
        return itertools.chain.from_iterable(self._drain())

    def _drain(self) -> Iterator[list[Any]]:
        pacer = Pacer()
        parts = self._parts
        while parts:
            yield parts.pop()  # each run is freed once the list holds its items
            pacer.tick()


# -- bytes ------------------------------------------------------------------------


class Pieces:
    """Bytes held as pieces of at most :data:`PIECE` bytes; pickles as the bytes they join to.

    The parent holds a big request pickle this way: each piece is written to
    the runner by reference, the runner gets plain bytes (it joins them), and
    freeing the pickle is one short free per piece. ``size`` is the size in
    bytes; ``len()`` is what it adds to a frame at most (:func:`framed_size`),
    which the frame limit is checked against.
    """

    __slots__ = ("pieces", "size")

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces: list[bytes] = pieces
        self.size = sum(map(len, pieces))

    def __len__(self) -> int:
        return framed_size(self.size)

    def __reduce__(self) -> tuple[Any, ...]:
        return (join_bytes, (self.pieces,))


def framed_size(size: int) -> int:
    """What ``size`` bytes held as :class:`Pieces` add to a frame at most.

    Measured: about 100 bytes and 6 per piece; the message's own overhead
    (``MESSAGE_OVERHEAD``) is counted apart.
    """
    return size + PIECE_OVERHEAD * -(-size // PIECE) + _JOIN_OVERHEAD


def join_bytes(pieces: list[bytes]) -> bytes:
    """The bytes ``pieces`` make (``bytes.join`` copies 1 MiB or more without the GIL)."""
    return b"".join(pieces)


def cut(data: bytes) -> bytes | list[pickle.PickleBuffer]:
    """``data`` as it is up to :data:`PIECE` bytes, else as views of it of that size.

    The views pickle (protocol 5) as the bytes they show, without a copy
    here; the reader gets a list of bytes.
    """
    if len(data) <= PIECE:
        return data
    view = memoryview(data)
    return [pickle.PickleBuffer(view[start : start + PIECE]) for start in range(0, len(data), PIECE)]


def wire_size(payload: bytes | list[pickle.PickleBuffer]) -> int:
    """What a payload from :func:`cut` adds to a frame, at most, beyond one message's overhead."""
    if isinstance(payload, list):
        return sum(piece.raw().nbytes + PIECE_OVERHEAD for piece in payload)
    return len(payload)
