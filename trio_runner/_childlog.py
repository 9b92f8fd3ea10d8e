"""The child-output log forwarder: the runner's output lines become log records off the trio thread.

The trio thread hands over whole batches of lines (one pipe read's worth, as
bytes) and does only C-speed work per batch: a length check, and on a drop a
byte count of the newlines. One daemon thread splits the batches, builds one
``LogRecord`` per line and hands it to the logger's handlers. A per-line
``makeRecord`` on the trio thread stalled the loop for seconds under a flood
of short lines, and checkpoints between batches alone did not cure it (see
DESIGN.md, "The loop never stalls, whatever the runner sends").

The hand-off is bounded by bytes, not lines: when the handlers fall behind by
more than ``max_bytes``, a batch is dropped whole and its lines are counted.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import traceback

_MAX_BYTES = 1024 * 1024  # child output waiting for slow log handlers
MAX_LINE = 64 * 1024  # a longer line becomes several records (and tail entries) of this size
# Records the thread builds between explicit GIL releases, so that the trio
# thread waiting for the GIL gets it without waiting out a switch interval
# (5 ms by default). Measured with bench_flood: without them the ticker's p99
# was 30 ms over idle during a flood, with them under 1 ms.
_RECORDS_PER_YIELD = 32


def _pieces(line: bytes) -> list[bytes]:
    if len(line) <= MAX_LINE:
        return [line]
    return [line[start : start + MAX_LINE] for start in range(0, len(line), MAX_LINE)]


def _text(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\r")


def last_lines(batch: bytes, count: int) -> list[str]:
    """The last ``count`` lines of a batch of newline-terminated lines, decoded.

    ``rsplit`` with a limit scans from the end, so a large batch costs what
    its tail costs. A line longer than ``MAX_LINE`` counts as its pieces.
    """
    lines = batch.rsplit(b"\n", count + 1)[-(count + 1) : -1]
    return [_text(piece) for line in lines for piece in _pieces(line)][-count:]


class ChildLog:
    """Forwards batches of child output lines to ``logger``, from a thread of its own.

    ``put`` is called on the trio thread and never blocks; ``start`` and
    ``stop`` bracket the thread's life (``stop`` blocks: call it in a thread).
    """

    def __init__(self, logger: logging.Logger, *, max_bytes: int = _MAX_BYTES) -> None:
        self._logger = logger
        self._max_bytes = max_bytes
        # SimpleQueue.put never blocks and never raises Full: the bound is kept
        # by the byte counters below, so stop's sentinel always gets in.
        self._queue: queue.SimpleQueue[tuple[int, int | None, str, bytes] | None] = queue.SimpleQueue()
        # Each counter has one writer (put_bytes and dropped_here: the trio
        # thread; taken_bytes and dropped_there: the log thread), so no lock.
        self._put_bytes = 0
        self._taken_bytes = 0
        self._dropped_here = 0
        self._dropped_there = 0
        self._abandon = False
        self._warned = False
        self._thread: threading.Thread | None = None

    @property
    def dropped(self) -> int:
        """Lines dropped because the handlers fell too far behind, or were still busy at stop."""
        return self._dropped_here + self._dropped_there

    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self._forward, name=name, daemon=True)
        self._thread.start()

    def put(self, level: int, pid: int | None, stream: str, batch: bytes) -> None:
        """Queue ``batch`` (whole lines, each ending in ``b"\\n"``) for logging at ``level``."""
        if not self._logger.isEnabledFor(level):
            return
        behind = self._put_bytes - self._taken_bytes
        if behind and behind + len(batch) > self._max_bytes:
            self._dropped_here += batch.count(b"\n")
            return
        self._put_bytes += len(batch)
        self._queue.put((level, pid, stream, batch))

    def stop(self, bound: float) -> None:
        """Let the thread log what is queued for at most ``bound`` seconds, then abandon the rest.

        Blocking (call it in a thread). The bound is wall-clock, not a trio
        deadline, so a MockClock cannot jump past it. A handler that is still
        busy after it finishes its record on the daemon thread, which then
        exits; the lines it did not reach count as dropped.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(None)
        thread.join(bound)
        self._abandon = True

    def _forward(self) -> None:
        log = self._logger
        built = 0
        while True:
            item = self._queue.get()
            if item is None:
                return
            level, pid, stream, batch = item
            lines = batch.split(b"\n")
            lines.pop()  # the empty string after the last newline
            for done, line in enumerate(lines):
                if self._abandon:
                    self._dropped_there += len(lines) - done
                    break
                # Split here, not on the trio thread: the pipe reader only cuts
                # a line that has not ended yet, so where a long line is cut
                # does not depend on how the reads fell.
                for piece in _pieces(line):
                    record = log.makeRecord(log.name, level, "(runner)", 0, "%s", (_text(piece),), None)
                    record.runner_pid = pid
                    record.runner_stream = stream
                    self._handle(record)
                    built += 1
                    if built % _RECORDS_PER_YIELD == 0:
                        time.sleep(0)
            # Counted once the batch is handled, so that the bound covers the
            # batch in hand as well as the queued ones.
            self._taken_bytes += len(batch)

    def _handle(self, record: logging.LogRecord) -> None:
        """``logger.handle(record)``, surviving an application filter or handler that raises.

        A handler's ``emit`` errors go to its own ``handleError``; a *filter*
        (on the logger or a handler) that raises would otherwise end this
        thread, and with it every later line of every incarnation. The line is
        counted as dropped, and the first such error is printed to stderr, the
        way ``logging`` reports its own errors.
        """
        try:
            self._logger.handle(record)
        except Exception:  # the application's filter code, whatever it raises
            self._dropped_there += 1
            if not self._warned:
                self._warned = True
                print(
                    f"trio-runner: a log filter or handler on {self._logger.name!r} raised; "
                    "runner output lines it rejects this way are counted as dropped "
                    "(statistics().log_lines_dropped). The first error:",
                    file=sys.stderr,
                )
                traceback.print_exc(file=sys.stderr)
