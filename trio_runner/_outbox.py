"""The child's outgoing side: each task's slot, the batching, and the writer thread.

No trio and nothing heavy is imported here; the child loads it on every spawn.

Every task has a :class:`TaskSlot` with a lock of its own: the thread running
the task queues its events there, waits there for credits, and the reader
thread grants credits and cancels there. Emitting threads never share a lock,
so one task blocked on a slow consumer, or a thread descheduled mid-emit, holds
up no other task. A slot with events, and every other message, is put on one
shared queue (a ``deque``, whose appends are atomic); whoever sends, the
writer thread or an emitting thread, takes everything queued, each slot's
events as one message, and writes it as one batch. A task's outcome is queued
after its slot, so it never overtakes the task's events.

Events are batched by time. A task's first event, and any event that comes
``Runner.linger`` or more after the last frame, goes out at once from the
thread that emits it, with whatever is queued. Events that come faster are
queued without a wake-up; while they keep coming, the emitting thread sends
the queue itself once ``linger`` has passed, and the writer thread, polling,
sends what a stream left queued when it paused (or at once, when 256 events
are queued or a task is out of credits). A fast token stream then costs the
parent one wake-up per ``linger`` instead of one per token, and the emitting
thread never waits for the writer to hand the GIL back.
"""

from __future__ import annotations

import itertools
import pickle
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias, cast

from . import _protocol as proto
from ._errors import TaskCancelled
from ._pieces import cut, split_list, wire_size

#: Bounds on an error report's message and traceback (each) and its type name,
#: in bytes of UTF-8; ``_fit_error`` lowers them for a smaller ``max_frame_size``.
MAX_TEXT = 64 * 1024
_MAX_NAME = 1024
_MAX_PART = 4 * 1024  # each entry of a traceback (one frame, or the "Type: message" line)
#: This many queued events go out at once, lingering or not: a stream this
#: fast is batched by its own speed. Above the roughly 70 tokens a fast MLX
#: model queues in ``MlxLmRunner.linger``: a hurried batch is sent by the
#: writer, which costs a generating thread more than sending it itself.
_HURRY_EVENTS = 256
#: How much later than ``linger`` the writer sends what a stream left queued.
_BACKSTOP_SLACK = 0.002

_Report: TypeAlias = "proto.Error | proto.Fatal"
#: What the outbox queues and sends: a message, or one built as its wire tuple
#: where it is made (the round trip's Started and Result: a message class
#: costs more to make, and to flatten, than the rest of its way out).
_Outgoing: TypeAlias = "proto.FromChild | proto.Wire"
#: A pickled payload: bytes, or views of it in pieces if it is big (``_pieces.cut``).
_Pickled: TypeAlias = "bytes | list[pickle.PickleBuffer]"

#: What a rank other than 0 of a group sends for a result: only that it finished.
#: The caller gets rank 0's result; the others' are never pickled.
FOLLOWER_RESULT = pickle.dumps(None, protocol=proto.PICKLE_PROTOCOL)
#: How often a rank other than 0 tells the parent that a task still emits
#: (an empty batch of events), so that ``Timeouts.stall`` sees its progress.
_FOLLOWER_PROGRESS = 0.1


class TaskSlot:
    """One task's state in the child; its lock guards every field but ``task_id`` and ``request``
    (which only the reader thread sets, before the slot is queued, and the task's thread takes).

    The thread that runs the task emits into it, the reader thread grants
    credits and cancels, and whoever sends takes its queued events.
    """

    __slots__ = (
        "cancelled",
        "credits",
        "credits_changed",
        "dropped",
        "events",
        "lock",
        "queued",
        "request",
        "sent_any",
        "task_id",
    )

    def __init__(self, task_id: int, request: bytes | bytearray | None, window: int) -> None:
        self.task_id = task_id
        self.request = request  # the pickled request, until the task starts
        self.credits = window
        #: True once a cancel for this task reached the child, or its events could not be sent.
        self.cancelled = False
        self.dropped = 0  # events still queued here when the cancel came, never sent
        self.sent_any = False  # the first event goes out at once
        self.events: list[Any] = []  # emitted, not yet taken to send
        self.queued = False  # on the outbox's queue; true whenever ``events`` is not empty
        self.lock = threading.Lock()
        # Made by the first emit that must wait: most tasks never do, and a
        # Condition costs more to make than the rest of the slot.
        self.credits_changed: threading.Condition | None = None

    def grant(self, credits: int) -> None:
        """The consumer took ``credits`` more events (the reader thread)."""
        with self.lock:
            self.credits += credits
            self._notify()

    def cancel(self) -> None:
        """Mark the task cancelled and drop its queued events: cancel means stop.

        Its consumer gets nothing more (what a send already took, the parent
        drops), and an emit waiting for credits raises TaskCancelled.
        """
        with self.lock:
            self.cancelled = True
            self.dropped += len(self.events)
            self.events = []
            self._notify()

    def fail(self) -> None:
        """Its events could not be sent: its later emits raise TaskCancelled (its outcome is
        the error the sender reports), and one waiting for credits wakes to see it."""
        with self.lock:
            self.cancelled = True
            self._notify()

    def _notify(self) -> None:
        """With the lock held: wake an emit waiting for credits, if there is one."""
        if self.credits_changed is not None:
            self.credits_changed.notify_all()


def truncate(text: str, limit: int = MAX_TEXT, *, keep_end: bool = True) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, with a note saying so.

    Tracebacks keep their end (a recursion error's is huge; the parent needs
    the last frames); messages keep their start.
    """
    if len(text) * 4 <= limit:  # no character takes more than 4 bytes: fits as it is
        return text
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    note = f"[... {len(data) - limit} bytes truncated ...]"
    keep = max(0, limit - len(note) - 1)
    # "ignore" drops a character cut in half at the edge.
    if keep_end:
        return note + "\n" + data[len(data) - keep :].decode("utf-8", "ignore")
    return data[:keep].decode("utf-8", "ignore") + "\n" + note


def format_exception(exc: BaseException) -> tuple[str, str, str]:
    """(type name, message, traceback) of ``exc``, each bounded; never raises.

    The exception is the runner's own object: its ``__str__`` (or a property
    the traceback machinery reads) may raise, or return megabytes. Either
    would crash the runner and every task in flight with it, so each part
    falls back to a plain description and is cut to ``MAX_TEXT``.
    """
    kind = type(exc)
    try:
        name = (
            kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        )
        name = truncate(str(name), _MAX_NAME, keep_end=False)
    except Exception:  # a metaclass with hostile attributes: anything goes
        name = "<an exception type whose name cannot be read>"
    try:
        text = truncate(str(exc), MAX_TEXT, keep_end=False)
    except Exception as error:  # the runner's own __str__: anything goes
        text = f"<str() of this {name} raised {type(error).__name__}>"
    try:
        # Each part is cut first, so a huge message (in full in ``text``) leaves room
        # for the stack above it.
        parts = [truncate(part, _MAX_PART, keep_end=False) for part in traceback.format_exception(exc)]
        tb = truncate("".join(parts), MAX_TEXT)
    except Exception as error:  # the traceback module reads the runner's objects too
        tb = f"<the traceback of this {name} could not be formatted: {type(error).__name__}>"
    return name, text, tb


class Outbox:
    """Everything the child sends: queued from any thread, written in batches.

    Attributes:
        linger: ``Runner.linger``, once the runner is loaded.
        heartbeat_paused: a fault hook for ``trio_runner.testing``: stop beating.
    """

    def __init__(
        self,
        sock: socket.socket,
        max_frame: int,
        heartbeat_interval: float,
        find_slot: Callable[[int], TaskSlot | None],
    ) -> None:
        self.sock = sock
        self._find_slot = find_slot  # a task's slot, to cancel a task whose payload cannot be sent
        self.max_frame = max_frame
        self.heartbeat_interval = heartbeat_interval
        self.linger = 0.0
        self.heartbeat_paused = False
        # Slots with events, and other messages, in the order they were queued.
        self._queue: deque[TaskSlot | _Outgoing] = deque()
        # Held by whoever writes to the socket, while it takes the queue, so
        # batches go out in the order they were taken.
        self._send_lock = threading.Lock()
        self._last_sent = time.monotonic()
        # Events emitted so far (``next`` is atomic), and the count when the queue was
        # last taken: their difference is about how many are queued, without a shared lock.
        self._emitted = itertools.count()
        self._taken_at = 0
        # Guards the writer's wake-up state below; taken only to wake it.
        self._wake_lock = threading.Lock()
        self._wake = threading.Event()
        self._wake_pending = False
        # The writer holds a lingering batch until then, or until ``_hurry`` is set.
        self._flush_at = 0.0
        self._hurry = threading.Event()
        self._streaming = False  # the writer polls every ``linger`` for queued events
        self._closing = False
        self.writer = threading.Thread(target=self._write_loop, name="trio-runner-writer", daemon=True)

    # -- queueing -----------------------------------------------------------------

    def send(self, message: proto.FromChild) -> None:
        """Queue ``message`` and wake the writer."""
        self._queue.append(message)
        self._wake_writer()

    def send_now(self, message: _Outgoing) -> None:
        """Write ``message``, after everything queued, from this thread; waits out a send in progress."""
        with self._send_lock:
            batch = self._take()
            batch.append(message)
            self._send_batch(batch)

    def send_raw(self, data: bytes) -> None:
        """Write ``data`` between frames, after what is queued (for ``trio_runner.testing``)."""
        with self._send_lock:
            batch = self._take()
            if batch:
                self._send_batch(batch)
            self.sock.sendall(data)

    def finish(self, slot: TaskSlot, outcome: _Outgoing) -> None:
        """Send a task's outcome, after its events; Cancelled if a cancel came first."""
        with slot.lock:
            if slot.cancelled:
                # The cancel came before the outcome went out: cancel means stop,
                # whatever handle() did after it.
                outcome = proto.Cancelled(slot.task_id, slot.dropped)
            # Behind the slot on the queue if it holds events: never overtakes them.
            self._queue.append(outcome)
        # Sent from this thread. Waking the writer too would only make it fight
        # this thread for the GIL (about 10 us); it is woken if it is mid-send.
        if not self.flush_nowait():
            self._wake_writer()

    def emit(self, slot: TaskSlot, event: Any) -> None:
        with slot.lock:
            if slot.cancelled:
                raise TaskCancelled(f"task {slot.task_id} was cancelled")
            if slot.credits <= 0:
                self._await_credit(slot)
            slot.credits -= 1
            slot.events.append(event)
            if not slot.queued:
                slot.queued = True
                self._queue.append(slot)
            first = not slot.sent_any
            slot.sent_any = True
        queued = next(self._emitted) - self._taken_at
        if queued >= _HURRY_EVENTS:
            if queued == _HURRY_EVENTS:
                self._wake_writer()  # then it is on its way: no need to repeat
            return
        if not first:
            if self._wake_pending:
                return  # the writer is on its way
            if time.monotonic() - self._last_sent < self.linger:
                if not self._streaming:
                    self._wake_writer(self._last_sent + self.linger)
                return  # within ``linger`` of the last frame: it waits
            # ``linger`` has passed: this thread sends what is queued. The
            # writer would have to take the GIL from this thread to do it,
            # which stalls a generating thread several times longer than
            # the send itself takes.
        if not self.flush_nowait():
            self._wake_writer()

    def emit_many(self, slot: TaskSlot, events: Iterable[Any]) -> None:
        pending = list(events)
        start = 0
        while start < len(pending):
            with slot.lock:
                if slot.cancelled:
                    raise TaskCancelled(f"task {slot.task_id} was cancelled")
                if slot.credits <= 0:
                    self._await_credit(slot)
                end = min(len(pending), start + slot.credits)
                slot.credits -= end - start
                slot.events.extend(pending[start:end])
                slot.sent_any = True
                if not slot.queued:
                    slot.queued = True
                    self._queue.append(slot)
            self._wake_writer()  # already a batch: no lingering
            start = end

    def _await_credit(self, slot: TaskSlot) -> None:
        """With the slot's lock held: wait until the task's consumer returns credits.

        Raises TaskCancelled if the task is cancelled meanwhile, so a cancelled
        task never stays blocked on a consumer that stopped reading.
        """
        if slot.events:
            self._wake_writer()  # the consumer cannot return credits for events not yet sent
        waiter = slot.credits_changed
        if waiter is None:
            waiter = slot.credits_changed = threading.Condition(slot.lock)
        while slot.credits <= 0:
            if slot.cancelled:  # a task that failed to send is cancelled too
                raise TaskCancelled(f"task {slot.task_id} was cancelled while its consumer lagged")
            waiter.wait()

    def _wake_writer(self, linger_until: float = 0.0) -> None:
        with self._wake_lock:
            # The writer clears ``_wake`` before it resets ``_wake_pending`` (under
            # this lock), and takes the queue after: a wake-up is never lost.
            if not linger_until:
                self._flush_at = 0.0
                self._hurry.set()
            elif not self._wake_pending:
                self._flush_at = linger_until
            if not self._wake_pending:
                self._wake_pending = True
                self._wake.set()

    # -- sending --------------------------------------------------------------------

    def _take(self) -> list[_Outgoing]:
        """With the send lock held: everything queued, each slot's events as one message."""
        self._taken_at = next(self._emitted)
        queue = self._queue
        batch: list[_Outgoing] = []
        while queue:
            item = queue.popleft()
            if not isinstance(item, TaskSlot):
                batch.append(item)
                continue
            with item.lock:
                events = item.events
                item.events = []
                item.queued = False
            if events:  # none if a cancel dropped them
                batch.append(proto.Events(item.task_id, events))
        return batch

    def flush_nowait(self) -> bool:
        """Send what is queued from the calling thread if no one else is sending.

        A task's outcome goes out at once instead of waiting for the writer
        thread to be scheduled: a thread hand-off per task is most of a round
        trip. Returns False, having sent nothing, if another thread is sending:
        the caller must then wake the writer.
        """
        if not self._send_lock.acquire(blocking=False):
            return False
        try:
            batch = self._take()
            if batch:
                self._send_batch(batch)
        finally:
            self._send_lock.release()
        return True

    def flush(self, timeout: float) -> None:
        """Wait until everything queued has been written to the socket (at most ``timeout``).

        For ``trio_runner.testing``, which writes raw bytes between frames.
        """
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            if not self.flush_nowait():
                time.sleep(0.001)
        # The writer may have taken the batch and still be sending it.
        with self._send_lock:
            pass

    def close(self, timeout: float) -> None:
        """Flush what is queued, then stop the writer thread."""
        with self._wake_lock:
            self._closing = True
        self._wake_writer()
        self.writer.join(timeout)

    def _write_loop(self) -> None:
        timeout = self.heartbeat_interval
        while True:
            woken = self._wake.wait(timeout)
            self._wake.clear()
            timeout = self.heartbeat_interval
            if not woken and self._streaming:
                # A poll for events queued during a stream. While they keep
                # coming, the emitting thread sends them itself once ``linger``
                # has passed; the writer sends only what a stream that stopped
                # left behind, a moment later.
                due = self._last_sent + self.linger + _BACKSTOP_SLACK - time.monotonic()
                if due > 0:
                    timeout = due
                    continue
            delay = self._flush_at - time.monotonic()
            if delay > 0:
                self._hurry.wait(delay)
            self._hurry.clear()
            with self._send_lock:
                with self._wake_lock:
                    self._wake_pending = False
                    self._flush_at = 0.0
                    closing = self._closing
                batch = self._take()
                # Keep polling while events flow; an emit seeing this queues without a wake-up.
                self._streaming = self.linger > 0 and any(type(item) is proto.Events for item in batch)
                if self._streaming:
                    timeout = self.linger + _BACKSTOP_SLACK
                if not batch:
                    if closing:
                        return
                    if self.heartbeat_paused or time.monotonic() - self._last_sent < self.heartbeat_interval:
                        continue
                    batch = [cast(_Outgoing, proto.Heartbeat())]
                if not self._send_batch(batch):
                    return  # the parent is gone; the reader thread handles that
                if closing:
                    return

    def _send_batch(self, batch: list[_Outgoing]) -> bool:
        """Write one batch; called with the send lock held. False if the socket is gone.

        Events are pickled here one message at a time (an Error instead if they
        cannot be sent), error reports cut to fit, each message flattened to its
        wire tuple, and the frames kept under the size limit. One method, not
        two: it runs twice per round trip.
        """
        tags = proto.TAGS
        messages: list[proto.Wire] = []
        for message in batch:
            kind = type(message)
            if kind is tuple:  # built as its wire tuple (Started, Result): as it is
                messages.append(message)
                continue
            if kind is proto.Events:
                message = self._pack_events(cast(proto.Events, message))
                kind = type(message)  # an Error if they cannot be sent
            if kind is proto.Error or kind is proto.Fatal:
                message = self._fit_error(cast(_Report, message))
            # Concatenation runs in C: the cheapest way to prepend the tag.
            messages.append((tags[kind],) + message)  # noqa: RUF005
        try:
            self.sock.sendall(proto.encode_wire(messages, self.max_frame))
        except OSError:
            return False
        self._last_sent = time.monotonic()
        return True

    def _fit_error(self, message: _Report) -> _Report:
        """An Error or Fatal message with its texts cut so that it fits a frame of its own.

        Name, message and traceback together stay under half the frame, so an
        error report never fails for its size, at any allowed ``max_frame_size``.
        """
        limit = min(MAX_TEXT, self.max_frame // 8)
        return message._replace(
            remote_type=truncate(message.remote_type, min(_MAX_NAME, limit), keep_end=False),
            message=truncate(message.message, limit, keep_end=False),
            traceback=truncate(message.traceback, 2 * limit),
        )

    def _pack_events(self, message: proto.Events) -> proto.Events | proto.Error:
        """Events with their payload pickled; events that cannot be sent fail their task instead."""
        task_id = message.task_id
        batch = message.payload
        # An event emitted alone may be a big list (checking each of many would cost events/s).
        if len(batch) == 1 and (alone := split_list(batch[0])) is not batch[0]:
            batch = [alone]
        data = self._pickle(task_id, batch, "events")
        if isinstance(data, proto.Error):
            slot = self._find_slot(task_id)
            if slot is not None:
                slot.fail()
            return data
        return proto.Events(task_id, data)

    def pack_result(self, task_id: int, value: Any) -> proto.Wire | proto.Error:
        """A task's Result as its wire tuple, its value pickled (by the task's own thread);
        an Error if it cannot be sent."""
        data = self._pickle(task_id, split_list(value), "the result")
        return data if isinstance(data, proto.Error) else (proto.RESULT, task_id, data)

    def _pickle(self, task_id: int, payload: Any, what: str) -> _Pickled | proto.Error:
        """``payload`` pickled (a big one in pieces), or the Error that fails its task if it cannot go."""
        limit = self.max_frame - proto.MESSAGE_OVERHEAD
        try:
            data = pickle.dumps(payload, protocol=proto.PICKLE_PROTOCOL)
            if len(data) > limit:
                raise ValueError(
                    f"{what} pickled to {len(data)} bytes, "
                    f"more than the {limit} that max_frame_size={self.max_frame} allows"
                )
        except Exception as exc:
            name, text, tb = format_exception(exc)
            return proto.Error(task_id, name, f"could not send to the parent: {text}", tb)
        # In pieces, which the parent frees one at a time (one free of tens of
        # MiB holds its GIL for milliseconds); whole if the pieces' own
        # overhead would not fit the frame.
        pieces = cut(data)
        return pieces if pieces is data or wire_size(pieces) <= limit else data


class FollowerEmitter:
    """``ctx.emit`` on a rank other than 0 of a group: its events go nowhere.

    Only rank 0's events reach the caller, so the others' are neither pickled
    nor sent, and an emit never waits for credits. A cancelled task still
    raises TaskCancelled, as on rank 0, and an empty batch goes out every
    ``_FOLLOWER_PROGRESS`` seconds at most, as a sign of progress for the
    parent's stall check.
    """

    __slots__ = ("_outbox", "_progress_at")

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._progress_at = 0.0

    def emit(self, slot: TaskSlot, event: Any) -> None:
        if slot.cancelled:
            raise TaskCancelled(f"task {slot.task_id} was cancelled")
        now = time.monotonic()
        if now >= self._progress_at:
            self._progress_at = now + _FOLLOWER_PROGRESS
            self._outbox.send(proto.Events(slot.task_id, []))

    def emit_many(self, slot: TaskSlot, events: Iterable[Any]) -> None:
        self.emit(slot, None)
