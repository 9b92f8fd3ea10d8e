"""The child process: its main loop, its task slots, the reader thread and the orphan guard.

No trio and nothing heavy is imported here; every spawn pays for each import.

Three kinds of thread share the work, so that a ``handle()`` stuck in native
code can neither delay a cancel nor hide the parent's death:

- the **main thread** runs ``setup``, then one task at a time (or N worker
  threads run N at once), then ``teardown``;
- the **reader thread** reads the control socket. A cancel sets the task's flag
  the instant its frame arrives. End-of-file without a Shutdown message means
  the parent is gone (even SIGKILLed): it kills the whole process group and
  calls ``os._exit``. A guardian process (``_guardian``) does the same from
  outside, for when this thread cannot run (the GIL held in native code, the
  process stopped);
- the **writer thread** (``_outbox``) batches outgoing messages into frames
  and sends a heartbeat whenever it has been idle for an interval.

Each task's state lives in a :class:`~trio_runner._outbox.TaskSlot` in
:attr:`Child.slots`; the :class:`~trio_runner.TaskContext` handed to
``handle()`` is a thin facade over it.
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
import traceback
from typing import Any, NoReturn

from . import _guardian
from . import _protocol as proto
from ._errors import TaskCancelled
from ._outbox import FOLLOWER_RESULT, FollowerEmitter, Outbox, TaskSlot, format_exception
from ._runner import GroupInfo, Runner, TaskContext, check_serving


class Child:
    """The child's task slots and reader thread, and the outbox every thread sends through.

    Attributes:
        slots: each task the parent sent and that has not ended, by id. No lock: each
            use is one dict operation, atomic in CPython (a lock taken and released
            twice per task cost about half a microsecond of the round trip).
        outbox: what the child sends, and the writer thread.
        reader_stalled: a fault hook for ``trio_runner.testing``: set, the reader stops reading.
    """

    def __init__(
        self, sock: socket.socket, max_frame: int, heartbeat_interval: float, incarnation: int
    ) -> None:
        self.sock = sock
        self.incarnation = incarnation
        self.max_frame = max_frame
        self.slots: dict[int, TaskSlot] = {}
        self.outbox = Outbox(sock, max_frame, heartbeat_interval, self.slots.get)
        # What ``ctx.emit`` goes through: a rank other than 0 of a group sends no events.
        self.emitter: Outbox | FollowerEmitter = self.outbox
        self.tasks: queue.SimpleQueue[TaskSlot | None] = queue.SimpleQueue()
        self.shutdown_requested = False
        self.reader_stalled = threading.Event()
        self.reader = threading.Thread(target=self._read_loop, name="trio-runner-reader", daemon=True)

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
                    self.dispatch(proto.check_from_parent(message))

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
            self.outbox.send(proto.Fatal(stage, *format_exception(exc)))
        _guardian.kill_escaped_descendants()
        self.outbox.close(2.0)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    def dispatch(self, message: proto.ToChild) -> None:
        """Act on one message from the parent (``trio_runner.testing`` wraps this to inject faults)."""
        match message:  # the commonest first; no captures (each costs a lookup)
            case proto.Task():
                slot = TaskSlot(message.task_id, message.request, message.window)
                self.slots[slot.task_id] = slot
                self.tasks.put(slot)
            case proto.Credit():
                slot = self.slots.get(message.task_id)
                if slot is not None:
                    slot.grant(message.credits)
            case proto.Cancel():
                self._cancel(message.task_id)
            case proto.Shutdown():
                self.shutdown_requested = True
                self._cancel(None)
                self.tasks.put(None)

    def _cancel(self, task_id: int | None) -> None:
        if task_id is None:
            targets = list(self.slots.values())  # one C call: atomic, like every use of ``slots``
        else:
            slot = self.slots.get(task_id)
            targets = [] if slot is None else [slot]
        for slot in targets:
            slot.cancel()

    def _orphaned(self) -> None:
        """The parent is gone. Take the whole process group down, grandchildren too."""
        _guardian.kill_escaped_descendants()  # the group kill below misses those that left it
        with contextlib.suppress(OSError):
            os.killpg(os.getpgid(0), signal.SIGKILL)
        os._exit(1)

    # -- tasks --------------------------------------------------------------

    def run_task(self, runner: Runner[Any, Any, Any], slot: TaskSlot) -> None:
        task_id = slot.task_id
        # No lock: only the reader thread (before it queues the slot) and this
        # thread touch the request.
        request_bytes = slot.request
        slot.request = None
        outcome: proto.FromChild | proto.Wire
        if slot.cancelled or request_bytes is None:
            outcome = proto.Cancelled(task_id)
        else:
            # On the wire before handle() runs: if the runner dies, the parent
            # fails the tasks it saw start and delivers the others again.
            self.outbox.send_now((proto.STARTED, task_id))  # a Started message, as its wire tuple
            ctx: TaskContext[Any] = TaskContext(slot, self.emitter)
            try:
                request = pickle.loads(request_bytes)
                del request_bytes
                result = runner.handle(request, ctx)
            except TaskCancelled:
                outcome = proto.Cancelled(task_id)
            except SystemExit:
                raise  # sys.exit() in runner code ends the process, as in any Python program
            except BaseException as exc:  # KeyboardInterrupt too: this task's failure, not the runner's
                if slot.cancelled and isinstance(exc, TaskCancelled):
                    outcome = proto.Cancelled(task_id)
                else:
                    outcome = proto.Error(task_id, *format_exception(exc))
            else:
                if self.emitter is self.outbox:
                    outcome = self.outbox.pack_result(task_id, result)
                else:  # a rank other than 0: the caller gets rank 0's result
                    outcome = proto.Result(task_id, FOLLOWER_RESULT)
                del result
        # Forgotten before its outcome goes out: once the parent has it, the
        # child holds nothing more for this task.
        del self.slots[task_id]
        self.outbox.finish(slot, outcome)


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
    runner: Runner[Any, Any, Any] = obj(*args, **kwargs)  # pyright: ignore[reportUnknownVariableType]
    check_serving(f"{module}.{qualname}", runner.concurrency, runner.linger)
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
    # Told to the supervisor's guardian (which acts when a runner that holds
    # the GIL or is stopped cannot) before any runner code runs.
    guardian: tuple[int, int] | None = config.get("guardian")
    guarded = guardian is not None and _guardian.register(*guardian)
    _redirect_stdio(stdout_fd, stderr_fd)
    if guardian is not None and not guarded:
        print("trio-runner: no guardian process: the runner may outlive a dead supervisor", file=sys.stderr)
    # The default 5 ms switch interval cannot meet "cancelled within a
    # millisecond" while handle() runs pure Python.
    sys.setswitchinterval(0.001)
    sock.setblocking(True)

    global current
    child = current = Child(sock, config["max_frame"], config["heartbeat_interval"], config["incarnation"])
    outbox = child.outbox
    outbox.writer.start()
    child.reader.start()

    try:
        runner = _load_runner(module, qualname, args_bytes)
    except BaseException as exc:
        child.die(proto.STAGE_LOAD, exc, proto.EXIT_LOAD_FAILED)
    group: GroupInfo | None = config.get("group")
    if group is not None:
        runner.group = group  # its place, before setup() (which may connect the ranks)
        if group.rank > 0:
            child.emitter = FollowerEmitter(outbox)
    # Sent synchronously, before setup runs: a setup that dies at once must still
    # be seen as loaded, or it would pass for a runner that can never start.
    outbox.send_now(proto.Hello(os.getpid()))
    outbox.linger = runner.linger
    try:
        runner.setup()
    except BaseException as exc:
        child.die(proto.STAGE_SETUP, exc, 1)
    outbox.send(proto.Ready(os.getpid()))

    def serve() -> None:
        try:
            while True:
                slot = child.tasks.get()
                if slot is None:
                    child.tasks.put(None)  # for the next worker
                    return
                child.run_task(runner, slot)
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
    outbox.close(5.0)
