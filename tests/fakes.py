"""An in-memory fake of the supervisor's ``Worker`` protocol, for collaboration tests.

Like trio-parallel's ``MockWorker``: the fake child is a trio task that speaks
the real wire protocol (:mod:`trio_runner._protocol`) over in-memory byte
pipes (:class:`trio.testing.MemoryReceiveStream`, one per direction). It uses no
threads, no sockets and no processes, and it waits only with ``trio.sleep``, so
a ``MockClock(autojump_threshold=0)`` drives it and tests can assert exact times.

Each incarnation follows a :class:`Script` (crash right after READY, fail
setup, never become ready, hang, ignore Shutdown or SIGTERM, survive SIGKILL,
...), and serves requests shaped like ``tests.runners.EchoRunner``'s:

- ``("echo", x)``: result ``x`` at once;
- ``("sleep", seconds, x)``: result ``x`` after ``seconds``; a cancel ends it;
- ``("count", n)``: emits ``0 .. n-1``, result ``n``;
- ``("tick", n, x)``: emits ``0 .. n-1``, one a second (``TICK``), then result ``x``; a cancel ends it.
  With ``FakeFactory(honour_window=True)`` it keeps to the task's flow-control
  window, as the real ``ctx.emit`` does: it waits for credits once ``window``
  events are unreturned (the other requests never wait);
- ``("raise", message)``: fails with ``ValueError(message)``;
- ``("busy",)``: acknowledged, then silent forever; ignores cancels (stall);
- ``("corrupt", kind, delay)``: ``delay`` seconds after its ACK (0: in the same
  read as the ACK), sends a broken frame: ``"garbage"`` or ``"oversize"``;
- ``("die", exitcode, signum[, n])``: emits ``0 .. n-1``, then the process
  dies (with ``exitcode``, or killed by ``signum``) while the task runs.

Every fake records what it saw, with ``trio.current_time()`` stamps: spawn,
READY and death times, heartbeats, frames from the parent, and signals.
"""

from __future__ import annotations

import pickle
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Unpack

import trio
import trio.testing

from trio_runner import Runner
from trio_runner import _protocol as proto
from trio_runner._options import Options, SupervisorOptions
from trio_runner._process import ExitStatus, SpawnSpec
from trio_runner._state import LifecycleChange
from trio_runner._supervisor import Supervisor, _open, create_supervisor  # pyright: ignore[reportPrivateUsage]

FAKE_PID_BASE = 40_000
TICK = 1.0
"""Seconds between the events of a ``("tick", n, x)`` request."""
_UNBOUNDED = 1 << 30

_CORRUPT_FRAMES = {
    "garbage": proto.HEADER.pack(7) + b"garbage",  # does not unpickle
    "oversize": proto.HEADER.pack(2**31),  # longer than any max_frame_size
}


class FakeRunner(Runner[Any, Any, Any]):
    """The runner class the supervisor is given. The fake never instantiates it."""


@dataclass(frozen=True)
class Script:
    """What one incarnation of the fake child does. Times are seconds of trio time.

    Attributes:
        load_fails: send FATAL (stage load) and exit with code 97, before HELLO.
        setup_time: how long ``setup`` takes (between HELLO and READY).
        setup_fails: after ``setup_time``, send FATAL (stage setup) and exit 1.
        never_ready: send HELLO and heartbeats, but never READY.
        exit_after_ready: die this way ``exit_delay`` seconds after READY.
        exit_delay: see ``exit_after_ready``.
        hang_after_ready: freeze (as if SIGSTOPped: no heartbeats, no work) this
            many seconds after READY.
        ignore_shutdown: read the Shutdown message and do nothing about it.
        ignore_sigterm: SIGTERM has no effect.
        survive_sigkill: SIGKILL freezes the process but it never exits, as if
            stuck in the kernel: ``wait()`` never returns.
        stderr: lines written to stderr right after the spawn.
    """

    load_fails: bool = False
    setup_time: float = 0.0
    setup_fails: bool = False
    never_ready: bool = False
    exit_after_ready: ExitStatus | None = None
    exit_delay: float = 0.0
    hang_after_ready: float | None = None
    ignore_shutdown: bool = False
    ignore_sigterm: bool = False
    survive_sigkill: bool = False
    stderr: tuple[str, ...] = ()

    def then_crash(self, signum: int = signal.SIGSEGV, after: float = 0.0) -> Script:
        return replace(self, exit_after_ready=killed_by(signum), exit_delay=after)

    def then_exit(self, code: int, after: float = 0.0) -> Script:
        return replace(self, exit_after_ready=exited(code), exit_delay=after)


SERVE = Script()


def killed_by(signum: int) -> ExitStatus:
    return ExitStatus(exitcode=None, signal=signum)


def exited(code: int) -> ExitStatus:
    return ExitStatus(exitcode=code, signal=None)


def crash_after_ready(signum: int = signal.SIGSEGV, after: float = 0.0) -> Script:
    """READY, then killed by ``signum`` ``after`` seconds later."""
    return SERVE.then_crash(signum, after)


def exit_after_ready(code: int, after: float = 0.0) -> Script:
    """READY, then exits with ``code`` ``after`` seconds later, unasked."""
    return SERVE.then_exit(code, after)


@dataclass
class Signal:
    time: float
    signum: int
    alive: bool
    """Whether the process was still running when the signal arrived."""


class FakeWorker:
    """One incarnation: implements ``trio_runner._process.Worker`` in memory."""

    def __init__(self, factory: FakeFactory, spec: SpawnSpec, incarnation: int, script: Script) -> None:
        self.factory = factory
        self.spec = spec
        self.incarnation = incarnation
        self.script = script
        # parent -> child and child -> parent byte pipes
        self._to_child = trio.testing.MemoryReceiveStream()
        self._to_parent = trio.testing.MemoryReceiveStream()
        self._output_send, self._output_recv = trio.open_memory_channel[tuple[str, str]](_UNBOUNDED)
        self._tasks_send, self._tasks_recv = trio.open_memory_channel[tuple[int, bytes] | None](_UNBOUNDED)
        self._scope = trio.CancelScope()
        self._dead = trio.Event()
        self._closed = False
        self._frozen = False
        self._shutdown = False
        self._known: set[int] = set()  # tasks received and not finished
        self._cancelled: set[int] = set()
        self._running: tuple[int, trio.CancelScope | None] | None = None
        self._credits: dict[int, int] = {}  # events each task may still emit
        self._credit_wake = trio.Event()
        self._pid: int | None = None
        # What happened, with trio.current_time() stamps.
        self.spawned_at: float | None = None
        self.ready_at: float | None = None
        self.died_at: float | None = None
        self.exit_status: ExitStatus | None = None
        self.beats: list[float] = []
        self.last_sent_at: float | None = None
        """When the child last wrote a frame (heartbeats included): the parent's watchdog counts from it."""
        self.received: list[tuple[float, Any]] = []
        self.signals: list[Signal] = []
        self.tasks: list[tuple[float, int, Any]] = []
        self.sent_after_death: list[bytes] = []

    # -- the Worker protocol ------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._pid

    async def start(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.factory.start_error is not None:
            raise self.factory.start_error
        self._pid = FAKE_PID_BASE + self.incarnation
        self.spawned_at = trio.current_time()
        trio.lowlevel.spawn_system_task(self._child_main, name=f"fake-runner-{self.incarnation}")

    async def send_all(self, data: bytes) -> None:
        # Like trio's SocketStream: fail fast on a closed or broken connection.
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("the fake worker was closed")
        if self.exit_status is not None:
            # Dropped without an error, as ProcessWorker.send_all does: the death watch reports it.
            self.sent_after_death.append(data)
        else:
            self._to_child.put_data(data)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def send_nowait(self, data: bytes) -> int:
        if self._closed or self.exit_status is not None or self.factory.refuse_nowait:
            return 0  # the supervisor falls back to send_all, which knows how to fail
        self._to_child.put_data(data)
        return len(data)

    async def receive_some(self, *, hand_over: bool = False) -> bytes:
        try:
            return bytes(await self._to_parent.receive_some())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def wait(self, reap_timeout: float) -> ExitStatus:
        await self._dead.wait()
        if self.factory.notice_delay:
            await trio.sleep(self.factory.notice_delay)
        assert self.exit_status is not None
        return self.exit_status

    def signal(self, signum: int) -> None:
        alive = self.exit_status is None
        self.signals.append(Signal(trio.current_time(), signum, alive))
        if not alive or (self._frozen and signum != signal.SIGKILL):
            return
        if signum == signal.SIGKILL:
            if self.script.survive_sigkill:
                self._freeze()
            else:
                self._die(killed_by(signum))
        elif signum == signal.SIGTERM:
            if not self.script.ignore_sigterm:
                self._die(killed_by(signum))
        elif signum == signal.SIGSTOP:
            self._freeze()
        else:
            self._die(killed_by(signum))

    async def pump_output(self, on_lines: Callable[[str, bytes], None]) -> None:
        async for stream, line in self._output_recv:
            on_lines(stream, line.encode() + b"\n")

    async def aclose(self) -> None:
        self._closed = True
        self._to_parent.close()
        self._to_child.put_eof()
        await trio.lowlevel.checkpoint()

    # -- death ----------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.exit_status is None

    def crash(self, status: ExitStatus) -> None:
        """The process dies from outside the supervisor (the OOM killer, a segfault in native code)."""
        self._die(status)

    def signals_while_alive(self) -> list[tuple[float, int]]:
        return [(s.time, s.signum) for s in self.signals if s.alive]

    def frames(self, kind: type[proto.ToChild]) -> list[tuple[float, Any]]:
        """The messages of type ``kind`` the child read from the parent, with their times."""
        return [(when, message) for when, message in self.received if type(message) is kind]

    def _die(self, status: ExitStatus) -> None:
        if self.exit_status is not None:
            return
        self.exit_status = status
        self.died_at = trio.current_time()
        self._scope.cancel()
        # The kernel closes the child's ends: the parent reads what was sent, then EOF.
        self._to_parent.put_eof()
        self._output_send.close()
        self._dead.set()

    def _freeze(self) -> None:
        """Stop doing anything at all, without exiting (SIGSTOP, or stuck in the kernel)."""
        self._frozen = True
        self._scope.cancel()

    # -- the fake child ------------------------------------------------------------

    def _send(self, message: proto.FromChild) -> None:
        if self.exit_status is not None or self._frozen:
            return
        try:
            self._to_parent.put_data(proto.encode([message]))
            self.last_sent_at = trio.current_time()
        except trio.ClosedResourceError:
            self._orphaned()

    def _orphaned(self) -> None:
        # The real child's reader thread: end of file without Shutdown means the parent is gone.
        self._die(exited(1))

    async def _child_main(self) -> None:
        try:
            with self._scope:
                await self._behave()
        except Exception as exc:  # a bug in the fake itself: make the test fail loudly
            self.factory.errors.append(exc)
            self._die(exited(70))

    async def _behave(self) -> None:
        script = self.script
        for line in script.stderr:
            self._output_send.send_nowait(("stderr", line))
        if script.load_fails:
            self._send(
                proto.Fatal(
                    proto.STAGE_LOAD,
                    "ModuleNotFoundError",
                    "No module named 'gone'",
                    "Traceback (most recent call last):\nModuleNotFoundError: No module named 'gone'\n",
                )
            )
            self._output_send.send_nowait(("stderr", "ModuleNotFoundError: No module named 'gone'"))
            self._die(exited(proto.EXIT_LOAD_FAILED))
            return
        self._send(proto.Hello(self._pid))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._read)
            if script.setup_time:
                await trio.sleep(script.setup_time)
            if script.setup_fails:
                self._send(
                    proto.Fatal(
                        proto.STAGE_SETUP,
                        "RuntimeError",
                        "setup failed on purpose",
                        "Traceback (most recent call last):\nRuntimeError: setup failed on purpose\n",
                    )
                )
                self._die(exited(1))
                return
            if script.never_ready:
                await trio.sleep_forever()
            self._send(proto.Ready(self._pid))
            self.ready_at = trio.current_time()
            if script.exit_after_ready is not None:
                if script.exit_delay == 0:
                    self._die(script.exit_after_ready)
                    return
                nursery.start_soon(self._die_later, script.exit_after_ready, script.exit_delay)
            if script.hang_after_ready is not None:
                nursery.start_soon(self._hang_later, script.hang_after_ready)
            await self._serve()
            await trio.lowlevel.checkpoint()  # teardown
            self._die(exited(0))

    async def _die_later(self, status: ExitStatus, delay: float) -> None:
        await trio.sleep(delay)
        self._die(status)

    async def _hang_later(self, delay: float) -> None:
        await trio.sleep(delay)
        self._freeze()

    async def _heartbeat(self) -> None:
        while True:
            await trio.sleep(self.spec.heartbeat_interval)
            if self.exit_status is None and not self._frozen:
                self._send(proto.Heartbeat())
                self.beats.append(trio.current_time())

    async def _read(self) -> None:
        reader = proto.FrameReader(self.spec.max_frame)
        while True:
            data = await self._to_child.receive_some()
            if not data:
                if not self._shutdown:
                    self._orphaned()
                return
            now = trio.current_time()
            for batch in reader.feed(data):
                for wire in batch:
                    message = proto.check_from_parent(wire)
                    self.received.append((now, message))
                    self._dispatch(message)

    def _dispatch(self, message: proto.ToChild) -> None:
        match message:
            case proto.Task(task_id, request, window):
                self._known.add(task_id)
                self._credits[task_id] = window
                self._tasks_send.send_nowait((task_id, request))
            case proto.Cancel(task_id):
                self._cancel(task_id)
            case proto.Credit(task_id, credits):
                if task_id in self._credits:
                    self._credits[task_id] += credits
                    self._credit_wake.set()
            case proto.Shutdown():
                if self.script.ignore_shutdown:
                    return
                self._shutdown = True
                self._cancel(None)
                self._tasks_send.send_nowait(None)

    def _cancel(self, task_id: int | None) -> None:
        # Like the real child: a cancel marks the tasks it has received so far.
        self._cancelled.update(self._known if task_id is None else {task_id} & self._known)
        running = self._running
        if running is not None and running[0] in self._cancelled and running[1] is not None:
            running[1].cancel()

    async def _serve(self) -> None:
        async for item in self._tasks_recv:
            if item is None:
                return
            task_id, request_bytes = item
            request = pickle.loads(request_bytes)
            self.tasks.append((trio.current_time(), task_id, request))
            if task_id in self._cancelled:
                self._send(proto.Cancelled(task_id))
            else:
                self._send(proto.Started(task_id))
                await self._handle(task_id, request)
                self._running = None
            self._known.discard(task_id)
            self._credits.pop(task_id, None)

    async def _handle(self, task_id: int, request: Any) -> None:
        command, *args = request
        if command == "busy":
            self._running = (task_id, None)
            await trio.sleep_forever()
        if command == "corrupt":
            kind, delay = args
            self._running = (task_id, None)
            if delay:
                await trio.sleep(delay)
            if not self._frozen and self.exit_status is None:
                self._to_parent.put_data(_CORRUPT_FRAMES[kind])
            await trio.sleep_forever()
        if command == "die":
            exitcode, signum, *events = args
            for i in range(events[0] if events else 0):
                self._send(_events(task_id, [i]))
            self._die(ExitStatus(exitcode=exitcode, signal=signum))
            await trio.sleep_forever()
        outcome: proto.FromChild | None = None
        with trio.CancelScope() as scope:
            self._running = (task_id, scope)
            if command == "echo":
                outcome = _result(task_id, args[0])
            elif command == "sleep":
                await trio.sleep(args[0])
                outcome = _result(task_id, args[1])
            elif command == "tick":
                n, value = args
                for i in range(n):
                    await trio.sleep(TICK)
                    await self._take_credit(task_id)
                    self._send(_events(task_id, [i]))
                outcome = _result(task_id, value)
            elif command == "count":
                (n,) = args
                for i in range(n):
                    self._send(_events(task_id, [i]))
                outcome = _result(task_id, n)
            elif command == "raise":
                outcome = proto.Error(
                    task_id,
                    "ValueError",
                    args[0],
                    f"Traceback (most recent call last):\nValueError: {args[0]}\n",
                )
            else:
                raise AssertionError(f"the fake child got an unknown command {command!r}")
        if scope.cancelled_caught:
            outcome = proto.Cancelled(task_id)
        assert outcome is not None
        self._send(outcome)

    async def _take_credit(self, task_id: int) -> None:
        if not self.factory.honour_window:
            return
        while self._credits[task_id] <= 0:
            self._credit_wake = trio.Event()
            await self._credit_wake.wait()
        self._credits[task_id] -= 1


def _events(task_id: int, events: list[Any]) -> proto.Events:
    # Payloads travel pickled on their own inside the frame, as the real child sends them.
    return proto.Events(task_id, pickle.dumps(events, protocol=proto.PICKLE_PROTOCOL))


def _result(task_id: int, value: Any) -> proto.Result:
    return proto.Result(task_id, pickle.dumps(value, protocol=proto.PICKLE_PROTOCOL))


@dataclass
class FakeFactory:
    """A ``WorkerFactory`` that makes :class:`FakeWorker`s, incarnation ``n`` following ``scripts[n-1]``.

    Incarnations past the end of ``scripts`` follow ``then``, or the last script
    if ``then`` is None.

    Attributes:
        refuse_nowait: ``send_nowait`` writes nothing, as a full socket does, so
            every task frame takes the sender task's ``send_all`` path.
        notice_delay: the death watch wakes this long after the child died
            (a real kernel takes a while to tear a process down), so the
            supervisor can still send to a child that is already dead.
        start_error: every ``start`` raises this instead of starting.
        honour_window: ``("tick", ...)`` requests keep to their flow-control
            window, waiting for credits like the real ``ctx.emit``.
    """

    scripts: Sequence[Script] = (SERVE,)
    then: Script | None = None
    refuse_nowait: bool = False
    notice_delay: float = 0.0
    start_error: Exception | None = None
    honour_window: bool = False
    workers: list[FakeWorker] = field(default_factory=list[FakeWorker])
    errors: list[Exception] = field(default_factory=list[Exception])
    timeline: list[tuple[float, LifecycleChange]] = field(default_factory=list[tuple[float, LifecycleChange]])
    """Every lifecycle change of the supervisor, with the trio time it happened."""

    def __call__(self, spec: SpawnSpec, incarnation: int) -> FakeWorker:
        assert incarnation == len(self.workers) + 1, "incarnations are numbered 1, 2, 3 ..."
        if incarnation <= len(self.scripts):
            script = self.scripts[incarnation - 1]
        else:
            script = self.then if self.then is not None else self.scripts[-1]
        worker = FakeWorker(self, spec, incarnation, script)
        self.workers.append(worker)
        return worker

    def time_of(self, kind: type[Any], count: int = 1) -> float:
        """When the ``count``-th lifecycle change of type ``kind`` happened."""
        times = [when for when, change in self.timeline if isinstance(change, kind)]
        assert len(times) >= count, f"only {len(times)} {kind.__name__} change(s): {self.timeline!r}"
        return times[count - 1]

    async def record_lifecycle(self, changes: AsyncIterator[LifecycleChange]) -> None:
        async for change in changes:
            self.timeline.append((trio.current_time(), change))

    @property
    def spawn_times(self) -> list[float]:
        return [w.spawned_at for w in self.workers if w.spawned_at is not None]

    def check(self) -> None:
        """Fail if the fake itself broke (an exception inside a fake child)."""
        if self.errors:
            raise AssertionError(f"the fake child raised: {self.errors!r}") from self.errors[0]


@asynccontextmanager
async def open_fake_supervisor(
    fake: FakeFactory, **options: Unpack[SupervisorOptions]
) -> AsyncIterator[Supervisor[Any, Any, Any]]:
    """``open_supervisor`` with the in-memory fake instead of real processes.

    A supervisor of ``FakeRunner`` with ``fake`` as its worker factory, run through the
    same code ``open_supervisor`` uses (``nursery.start(sup._run)``, the body,
    then ``await sup.aclose()``, with a single exception unwrapped from its
    group), so what leaves this block is what would leave ``open_supervisor``.
    ``fake.timeline`` records every lifecycle change with its exact time.
    """
    sup: Supervisor[Any, Any, Any] = create_supervisor(
        FakeRunner, (), None, Options.from_keywords("open_fake_supervisor", options), fake
    )
    # A system task, runnable as soon as a change is pushed, so the times it records are exact.
    trio.lowlevel.spawn_system_task(fake.record_lifecycle, sup.watch(), name="fake-lifecycle-recorder")
    async with _open(sup) as opened:
        yield opened
    fake.check()


async def lifecycle(sup: Supervisor[Any, Any, Any]) -> list[LifecycleChange]:
    """Every lifecycle change so far, ending with ``Stopped``. Only once the supervisor is done."""
    return [change async for change in sup.watch(replay=True)]


async def wait_for_change(sup: Supervisor[Any, Any, Any], kind: type[Any], count: int = 1) -> Any:
    """Wait for the ``count``-th lifecycle change of type ``kind`` (replayed ones included)."""
    seen = 0
    async for change in sup.watch(replay=True):
        if isinstance(change, kind):
            seen += 1
            if seen == count:
                return change
    raise AssertionError(f"the supervisor stopped before {count} {kind.__name__} change(s)")
