"""The child process: its main loop, reader and writer threads, and orphan guard.

No trio and nothing heavy is imported here; every spawn pays for each import.

Three threads share the work, so that a ``handle()`` stuck in native code can
neither delay a cancel nor hide the parent's death:

- the **main thread** runs ``setup``, then one task at a time, then ``teardown``;
- the **reader thread** reads the control socket. A cancel sets the task's flag
  the instant its frame arrives. End-of-file without a Shutdown message means
  the parent is gone (even SIGKILLed): it kills the whole process group and
  calls ``os._exit``. A guardian process (``_guardian``) does the same from
  outside, for when this thread cannot run (the GIL held in native code, the
  process stopped);
- the **writer thread** batches outgoing messages into frames and sends a
  heartbeat whenever it has been idle for an interval.

Events are batched by time. A task's first event, and any event that comes
``Runner.linger`` or more after the last frame, goes out at once from the
thread that emits it, with whatever is queued. Events that come faster are
queued without a wake-up; while they keep coming, the emitting thread sends
the queue itself once ``linger`` has passed, and the writer thread, polling,
sends what a stream left queued when it paused (or at once, when 256 events
are queued or a task is out of credits). A fast token stream then costs the
parent one wake-up per ``linger`` instead of one per token, and the emitting
thread never waits for the writer to hand the GIL back. A task's outcome
always goes out at once, after its events.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing.reduction
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from typing import Any, NoReturn, TypeAlias, cast

from . import _guardian
from . import _protocol as proto
from ._errors import TaskCancelled
from ._runner import Runner, TaskContext, check_linger

#: Bounds on an error report's message and traceback (each) and its type name,
#: in bytes of UTF-8; ``_encode`` lowers them for a smaller ``max_frame_size``.
_MAX_TEXT = 64 * 1024
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


def _truncate(text: str, limit: int = _MAX_TEXT, *, keep_end: bool = True) -> str:
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


def _format_exception(exc: BaseException) -> tuple[str, str, str]:
    """(type name, message, traceback) of ``exc``, each bounded; never raises.

    The exception is the runner's own object: its ``__str__`` (or a property
    the traceback machinery reads) may raise, or return megabytes. Either
    would crash the runner and every task in flight with it, so each part
    falls back to a plain description and is cut to ``_MAX_TEXT``.
    """
    kind = type(exc)
    try:
        name = (
            kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        )
        name = _truncate(str(name), _MAX_NAME, keep_end=False)
    except Exception:  # a metaclass with hostile attributes: anything goes
        name = "<an exception type whose name cannot be read>"
    try:
        text = _truncate(str(exc), _MAX_TEXT, keep_end=False)
    except Exception as error:  # the runner's own __str__: anything goes
        text = f"<str() of this {name} raised {type(error).__name__}>"
    try:
        # Each part is cut first, so a huge message (in full in ``text``) leaves room
        # for the stack above it.
        parts = [_truncate(part, _MAX_PART, keep_end=False) for part in traceback.format_exception(exc)]
        tb = _truncate("".join(parts), _MAX_TEXT)
    except Exception as error:  # the traceback module reads the runner's objects too
        tb = f"<the traceback of this {name} could not be formatted: {type(error).__name__}>"
    return name, text, tb


class Child:
    """State shared by the child's three threads."""

    def __init__(
        self, sock: socket.socket, max_frame: int, heartbeat_interval: float, incarnation: int
    ) -> None:
        self.sock = sock
        self.incarnation = incarnation
        self.max_frame = max_frame
        self.heartbeat_interval = heartbeat_interval
        self.lock = threading.Lock()
        # Held by whoever writes to the socket, taken *before* the outbox, so
        # batches go out in the order they were taken.
        self.send_lock = threading.Lock()
        self.last_sent = time.monotonic()
        self.credit_available = threading.Condition(self.lock)
        self.outbox: list[proto.FromChild] = []
        self.wake = threading.Event()
        self.wake_pending = False
        # The writer holds a lingering batch until then, or until ``hurry`` is set.
        self.flush_at = 0.0
        self.hurry = threading.Event()
        # Runner.linger, once the runner is loaded; True while the writer polls
        # every ``linger`` for queued events.
        self.linger = 0.0
        self.streaming = False
        self.queued = 0  # events in the outbox
        self.closing = False
        self.tasks: queue.SimpleQueue[TaskContext[Any] | None] = queue.SimpleQueue()
        self.contexts: dict[int, TaskContext[Any]] = {}
        self.shutdown_requested = False
        self.requests: dict[int, bytes | bytearray] = {}
        # Fault hooks for trio_runner.testing: stop beating, or stop reading.
        self.heartbeat_paused = False
        self.reader_stalled = threading.Event()
        self.writer = threading.Thread(target=self._write_loop, name="trio-runner-writer", daemon=True)
        self.reader = threading.Thread(target=self._read_loop, name="trio-runner-reader", daemon=True)

    # -- outgoing ---------------------------------------------------------

    def send(self, message: proto.FromChild, *, wake: bool = True) -> None:
        with self.lock:
            self.outbox.append(message)
            if wake:
                self._wake_writer()

    def send_now(self, message: proto.FromChild) -> None:
        """Write ``message``, after everything queued, from this thread; waits out a send in progress."""
        with self.send_lock:
            with self.lock:
                batch = self._take_outbox()
            batch.append(message)
            self._send_batch(batch)

    def _take_outbox(self) -> list[proto.FromChild]:
        """With the lock held: everything queued to send, leaving the outbox empty."""
        batch = self.outbox
        self.outbox = []
        self.queued = 0
        return batch

    def _wake_writer(self, linger_until: float = 0.0) -> None:
        # Called with the lock held. The writer clears ``wake`` before it resets
        # ``wake_pending`` (under the lock), so a wake-up is never lost.
        if not linger_until:
            self.flush_at = 0.0
            self.hurry.set()
        elif not self.wake_pending:
            self.flush_at = linger_until
        if not self.wake_pending:
            self.wake_pending = True
            self.wake.set()

    def _await_credit(self, ctx: TaskContext[Any]) -> None:
        """With the lock held: wait until the task's consumer returns credits (or it failed).

        Raises TaskCancelled if the task is cancelled meanwhile, so a cancelled
        task never stays blocked on a consumer that stopped reading.
        """
        if self.outbox:
            self._wake_writer()  # the consumer cannot return credits for events not yet sent
        while ctx._credits <= 0:  # pyright: ignore[reportPrivateUsage]
            if ctx.cancelled:  # a task that failed to send is cancelled too
                raise TaskCancelled(f"task {ctx.task_id} was cancelled while its consumer lagged")
            self.credit_available.wait()

    def emit(self, ctx: TaskContext[Any], event: Any) -> None:
        with self.lock:
            if ctx.cancelled:
                raise TaskCancelled(f"task {ctx.task_id} was cancelled")
            if ctx._credits <= 0:  # pyright: ignore[reportPrivateUsage]
                self._await_credit(ctx)
            ctx._credits -= 1  # pyright: ignore[reportPrivateUsage]
            outbox = self.outbox
            last = outbox[-1] if outbox else None
            if type(last) is proto.Events and last.task_id == ctx.task_id:
                last.payload.append(event)
            else:
                outbox.append(proto.Events(ctx.task_id, [event]))
            self.queued += 1
            if self.queued >= _HURRY_EVENTS:
                if self.queued == _HURRY_EVENTS:
                    self._wake_writer()  # then it is on its way: no need to repeat
                return
            if ctx._sent_any:  # pyright: ignore[reportPrivateUsage]
                if self.wake_pending:
                    return  # the writer is on its way
                if time.monotonic() - self.last_sent < self.linger:
                    if not self.streaming:
                        self._wake_writer(self.last_sent + self.linger)
                    return  # within ``linger`` of the last frame: it waits
                # ``linger`` has passed: this thread sends what is queued. The
                # writer would have to take the GIL from this thread to do it,
                # which stalls a generating thread several times longer than
                # the send itself takes.
            else:
                ctx._sent_any = True  # pyright: ignore[reportPrivateUsage]
        if not self.flush_nowait():
            with self.lock:
                self._wake_writer()

    def emit_many(self, ctx: TaskContext[Any], events: Iterable[Any]) -> None:
        pending = list(events)
        start = 0
        while start < len(pending):
            with self.lock:
                if ctx.cancelled:
                    raise TaskCancelled(f"task {ctx.task_id} was cancelled")
                if ctx._credits <= 0:  # pyright: ignore[reportPrivateUsage]
                    self._await_credit(ctx)
                end = min(len(pending), start + ctx._credits)  # pyright: ignore[reportPrivateUsage]
                ctx._credits -= end - start  # pyright: ignore[reportPrivateUsage]
                outbox = self.outbox
                last = outbox[-1] if outbox else None
                if type(last) is proto.Events and last.task_id == ctx.task_id:
                    last.payload.extend(pending[start:end])
                else:
                    outbox.append(proto.Events(ctx.task_id, pending[start:end]))
                self.queued += end - start
                self._wake_writer()  # already a batch: no lingering
                start = end

    def _write_loop(self) -> None:
        timeout = self.heartbeat_interval
        while True:
            woken = self.wake.wait(timeout)
            self.wake.clear()
            timeout = self.heartbeat_interval
            if not woken and self.streaming:
                # A poll for events queued during a stream. While they keep
                # coming, the emitting thread sends them itself once ``linger``
                # has passed; the writer sends only what a stream that stopped
                # left behind, a moment later.
                due = self.last_sent + self.linger + _BACKSTOP_SLACK - time.monotonic()
                if due > 0:
                    timeout = due
                    continue
            delay = self.flush_at - time.monotonic()
            if delay > 0:
                self.hurry.wait(delay)
            self.hurry.clear()
            with self.send_lock:
                with self.lock:
                    self.wake_pending = False
                    self.flush_at = 0.0
                    batch = self._take_outbox()
                    closing = self.closing
                    # Keep polling while events flow; an emit seeing this queues without a wake-up.
                    self.streaming = self.linger > 0 and any(type(item) is proto.Events for item in batch)
                if self.streaming:
                    timeout = self.linger + _BACKSTOP_SLACK
                if not batch:
                    if closing:
                        return
                    if self.heartbeat_paused or time.monotonic() - self.last_sent < self.heartbeat_interval:
                        continue
                    batch = [cast(proto.FromChild, proto.Heartbeat())]
                if not self._send_batch(batch):
                    return  # the parent is gone; the reader thread handles that
                if closing:
                    return

    def _send_batch(self, batch: list[proto.FromChild]) -> bool:
        """Write one batch; called with ``send_lock`` held. False if the socket is gone."""
        try:
            self.sock.sendall(self._encode(batch))
        except OSError:
            return False
        self.last_sent = time.monotonic()
        return True

    def flush_nowait(self) -> bool:
        """Send the outbox from the calling thread if no one else is sending.

        A task's outcome goes out at once instead of waiting for the writer
        thread to be scheduled: a thread hand-off per task is most of a round
        trip. Returns False, having sent nothing, if another thread is sending:
        the caller must then wake the writer.
        """
        if not self.send_lock.acquire(blocking=False):
            return False
        try:
            with self.lock:
                batch = self._take_outbox()
            if batch:
                self._send_batch(batch)
        finally:
            self.send_lock.release()
        return True

    def flush(self, timeout: float) -> None:
        """Wait until everything queued has been written to the socket (at most ``timeout``).

        For ``trio_runner.testing``, which writes raw bytes between frames.
        """
        self.flush_nowait()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not self.outbox:
                    break
            time.sleep(0.001)
        # The writer may have taken the batch and still be sending it.
        with self.send_lock:
            pass

    def _encode(self, batch: list[proto.FromChild]) -> bytes:
        """Frames for ``batch``: payloads pickled one by one, frames kept under the size limit."""
        messages: list[proto.FromChild] = []
        for message in batch:
            match message:
                case proto.Events(task_id, payload):
                    data = self._pack_payload(task_id, payload, "events")
                    message = data if isinstance(data, proto.Error) else proto.Events(task_id, data)
                case proto.Result(task_id, payload):
                    data = self._pack_payload(task_id, payload, "the result")
                    message = data if isinstance(data, proto.Error) else proto.Result(task_id, data)
                case _:
                    pass
            if isinstance(message, (proto.Error, proto.Fatal)):  # an Error also if a payload cannot be sent
                message = self._fit_error(message)
            messages.append(message)
        return proto.encode_frames(messages, self.max_frame)

    def _fit_error(self, message: _Report) -> _Report:
        """An Error or Fatal message with its texts cut so that it fits a frame of its own.

        Name, message and traceback together stay under half the frame, so an
        error report never fails for its size, at any allowed ``max_frame_size``.
        """
        limit = min(_MAX_TEXT, self.max_frame // 8)
        return message._replace(
            remote_type=_truncate(message.remote_type, min(_MAX_NAME, limit), keep_end=False),
            message=_truncate(message.message, limit, keep_end=False),
            traceback=_truncate(message.traceback, 2 * limit),
        )

    def _pack_payload(self, task_id: int, payload: Any, what: str) -> bytes | proto.Error:
        """An Events or Result payload, pickled; one that cannot be sent fails its task instead."""
        try:
            data = pickle.dumps(payload, protocol=proto.PICKLE_PROTOCOL)
            if len(data) > self.max_frame - proto.MESSAGE_OVERHEAD:
                raise ValueError(
                    f"{what} pickled to {len(data)} bytes, "
                    f"more than the {self.max_frame - proto.MESSAGE_OVERHEAD} that "
                    f"max_frame_size={self.max_frame} allows"
                )
        except Exception as exc:
            with self.lock:
                ctx = self.contexts.get(task_id)
                if ctx is not None:
                    # Its later emits raise TaskCancelled; its outcome here is this error.
                    ctx.cancelled = True
                    self.credit_available.notify_all()  # an emit waiting for credits must see it
            name, text, tb = _format_exception(exc)
            return proto.Error(task_id, name, f"could not send to the parent: {text}", tb)
        return data

    def close_writer(self, timeout: float) -> None:
        """Flush what is queued, then stop the writer thread."""
        with self.lock:
            self.closing = True
            self._wake_writer()
        self.writer.join(timeout)

    # -- incoming ---------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            try:
                self._read_frames()
            except OSError:
                pass  # a reset: the parent is gone, as at end-of-file
            except proto.FrameError as exc:
                # Not a signal: the parent must see a protocol error, not a runner
                # killed by someone else.
                self.die(proto.STAGE_PROTOCOL, exc, proto.EXIT_PROTOCOL_ERROR)
            except BaseException as exc:  # a bug in dispatching a message: anything
                self.die(proto.STAGE_READER, exc, 1)
        finally:
            # Whatever ended this thread, nothing reads cancels, credits or the
            # parent's end-of-file any more: this process must not outlive it.
            # The parent closes its end only after this process has been reaped,
            # so end-of-file means the parent is gone, even after a Shutdown message.
            self._orphaned()

    def _read_frames(self) -> None:
        reader = proto.FrameReader(self.max_frame)
        while True:
            if self.reader_stalled.is_set():
                threading.Event().wait()  # a fault injected by a test: never read again
            data = self.sock.recv(65536)
            if not data:
                return
            for batch in reader.feed(data):
                for message in batch:
                    self._dispatch(proto.check_from_parent(message))

    def die(self, stage: str, exc: BaseException, code: int) -> NoReturn:
        """Report ``exc`` to the parent (FATAL, and stderr), then exit with ``code``.

        From any thread: the writer gets a bounded time to send what is queued
        and the report; the process exits either way. ``sys.exit()`` in runner
        code is honoured like in any Python program: its code, no report.
        """
        if isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                with contextlib.suppress(Exception):
                    print(exc.code, file=sys.stderr)
        else:
            with contextlib.suppress(Exception):  # stderr may be gone with the parent
                traceback.print_exception(exc)
            self.send(proto.Fatal(stage, *_format_exception(exc)))
        _guardian.kill_escaped_descendants()
        self.close_writer(2.0)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    def _dispatch(self, message: proto.ToChild) -> None:
        match message:
            case proto.Cancel(task_id):
                self._cancel(task_id)
            case proto.Credit(task_id, credits):
                with self.lock:
                    target = self.contexts.get(task_id)
                    if target is not None:
                        target._credits += credits  # pyright: ignore[reportPrivateUsage]
                        self.credit_available.notify_all()
            case proto.Task(task_id, request, window):
                ctx: TaskContext[Any] = TaskContext(self, task_id, window)
                with self.lock:
                    self.contexts[task_id] = ctx
                    self.requests[task_id] = request
                self.tasks.put(ctx)
            case proto.Shutdown():
                self.shutdown_requested = True
                self._cancel(None)
                self.tasks.put(None)

    def _cancel(self, task_id: int | None) -> None:
        with self.lock:
            if task_id is None:
                targets = list(self.contexts.values())
            else:
                ctx = self.contexts.get(task_id)
                targets = [] if ctx is None else [ctx]
            for ctx in targets:
                ctx.cancelled = True
            if targets and self.queued:
                self._drop_events({ctx.task_id: ctx for ctx in targets})
            self.credit_available.notify_all()

    def _drop_events(self, cancelled: dict[int, TaskContext[Any]]) -> None:
        """With the lock held: drop the queued events of cancelled tasks. Cancel means stop:
        their consumers get nothing more (what a send already took, the parent drops)."""
        kept: list[proto.FromChild] = []
        for message in self.outbox:
            ctx = cancelled.get(message.task_id) if isinstance(message, proto.Events) else None
            if ctx is None or not isinstance(message, proto.Events):
                kept.append(message)
            else:
                count = len(message.payload)
                ctx._dropped += count  # pyright: ignore[reportPrivateUsage]
                self.queued -= count
        self.outbox = kept

    def _orphaned(self) -> None:
        """The parent is gone. Take the whole process group down, grandchildren too."""
        _guardian.kill_escaped_descendants()  # the group kill below misses those that left it
        with contextlib.suppress(OSError):
            os.killpg(os.getpgid(0), signal.SIGKILL)
        os._exit(1)

    # -- tasks --------------------------------------------------------------

    def run_task(self, runner: Runner[Any, Any, Any], ctx: TaskContext[Any]) -> None:
        task_id = ctx.task_id
        with self.lock:
            request_bytes = self.requests.pop(task_id)
        outcome: proto.FromChild
        if ctx.cancelled:
            outcome = proto.Cancelled(task_id)
        else:
            # On the wire before handle() runs: if the runner dies, the parent
            # fails the tasks it saw start and delivers the others again.
            self.send_now(proto.Started(task_id))
            try:
                request = pickle.loads(request_bytes)
                del request_bytes
                result = runner.handle(request, ctx)
            except TaskCancelled:
                outcome = proto.Cancelled(task_id)
            except SystemExit:
                raise  # sys.exit() in runner code ends the process, as in any Python program
            except BaseException as exc:  # KeyboardInterrupt too: this task's failure, not the runner's
                if ctx.cancelled and isinstance(exc, TaskCancelled):
                    outcome = proto.Cancelled(task_id)
                else:
                    outcome = proto.Error(task_id, *_format_exception(exc))
            else:
                outcome = proto.Result(task_id, result)
        with self.lock:
            if ctx.cancelled:
                # The cancel came before the outcome went out: cancel means stop,
                # whatever handle() did after it.
                outcome = proto.Cancelled(task_id, ctx._dropped)  # pyright: ignore[reportPrivateUsage]
            # Queued after this task's events, under the same lock: the result never
            # overtakes them.
            del self.contexts[task_id]
            self.outbox.append(outcome)
        # Sent from this thread. Waking the writer too would only make it fight
        # this thread for the GIL (about 10 us); it is woken if it is mid-send.
        if not self.flush_nowait():
            with self.lock:
                self._wake_writer()


#: The child's shared state, once ``main`` runs; None in any other process.
#: For trio_runner.testing, whose fault injection reaches into it.
current: Child | None = None


class InheritedFd:
    """An fd of the parent's that the child inherits through ``multiprocessing``.

    ``DupFd`` must be created while the process is being spawned (it asks the
    spawning Popen to pass the fd along), so it is made at pickling time.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_detach_fd, (multiprocessing.reduction.DupFd(self.fd),))


def _detach_fd(dup: Any) -> int:
    return dup.detach()


def _load_runner(module: str, qualname: str, args_bytes: bytes) -> Runner[Any, Any, Any]:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    args, kwargs = pickle.loads(args_bytes)
    if not (isinstance(obj, type) and issubclass(obj, Runner)):
        raise TypeError(f"{module}.{qualname} is not a subclass of trio_runner.Runner")
    concurrency: object = getattr(cast(Any, obj), "concurrency", 1)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise TypeError(f"{module}.{qualname}.concurrency must be an int >= 1, not {concurrency!r}")
    runner: Runner[Any, Any, Any] = obj(*args, **kwargs)  # pyright: ignore[reportUnknownVariableType]
    check_linger(f"{module}.{qualname}", runner.linger)
    return runner


def _redirect_stdio(stdout_fd: int, stderr_fd: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    os.close(stdout_fd)
    os.close(stderr_fd)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(Exception):
                reconfigure(line_buffering=True)


def main(
    sock: socket.socket,
    stdout_fd: int,
    stderr_fd: int,
    module: str,
    qualname: str,
    args_bytes: bytes,
    config: dict[str, Any],
) -> None:
    """The child's entry point, the target of the ``multiprocessing.Process``."""
    # Our own session: terminal signals reach only the parent, and the
    # supervisor can signal this whole group, grandchildren included.
    with contextlib.suppress(OSError):
        os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The guardian, which acts when a runner that holds the GIL or is stopped
    # cannot, starts first thing. A supervisor that dies before the guardian
    # runs is still seen: the lifeline is at end-of-file by then.
    lifeline: int | None = config.get("lifeline")
    guarded = lifeline is not None and _guardian.start(lifeline)
    _redirect_stdio(stdout_fd, stderr_fd)
    if lifeline is not None and not guarded:
        print("trio-runner: no guardian process: the runner may outlive a dead supervisor", file=sys.stderr)
    # The default 5 ms switch interval cannot meet "cancelled within a
    # millisecond" while handle() runs pure Python.
    sys.setswitchinterval(0.001)
    sock.setblocking(True)

    global current
    child = current = Child(sock, config["max_frame"], config["heartbeat_interval"], config["incarnation"])
    child.writer.start()
    child.reader.start()

    try:
        runner = _load_runner(module, qualname, args_bytes)
    except BaseException as exc:
        child.die(proto.STAGE_LOAD, exc, proto.EXIT_LOAD_FAILED)
    # Sent synchronously, before setup runs: a setup that dies at once must still
    # be seen as loaded, or it would pass for a runner that can never start.
    with child.send_lock:
        child._send_batch([proto.Hello(os.getpid())])  # pyright: ignore[reportPrivateUsage]
    child.linger = runner.linger
    try:
        runner.setup()
    except BaseException as exc:
        child.die(proto.STAGE_SETUP, exc, 1)
    child.send(proto.Ready(os.getpid()))

    def serve() -> None:
        try:
            while True:
                ctx = child.tasks.get()
                if ctx is None:
                    child.tasks.put(None)  # for the next worker
                    return
                child.run_task(runner, ctx)
        except BaseException as exc:
            child.die(proto.STAGE_RUN, exc, 1)

    concurrency = runner.concurrency
    if concurrency == 1:
        serve()  # in the main thread, where native libraries expect to run
    else:
        workers = [
            threading.Thread(target=serve, name=f"trio-runner-task-{i}", daemon=True)
            for i in range(concurrency)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    try:
        runner.teardown()
    except BaseException as exc:
        child.die(proto.STAGE_TEARDOWN, exc, 1)
    # Grandchildren that left the process group survive the supervisor's kill
    # of the group; their parent links, which find them, break when we exit.
    _guardian.kill_escaped_descendants()
    child.close_writer(5.0)
