"""The fault-injecting wrapper that runs in the child: :class:`FaultyRunner`.

The child imports this module on every spawn, so it imports neither trio nor
Hypothesis. It reaches the child's internals (the reader and writer threads'
shared state) through the fault hooks ``Child.heartbeat_paused`` and
``Child.reader_stalled``, and by wrapping ``Child._dispatch`` to see the
Shutdown message arrive.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, cast

from .. import _child
from .. import _protocol as proto
from .._runner import Runner, TaskContext
from ._plan import (
    AfterEvent,
    BeforeEvent,
    CorruptFrame,
    Exit,
    Fault,
    FaultPlan,
    Hang,
    HoldGil,
    HostileException,
    HostileFault,
    InjectedFault,
    InSetup,
    InTeardown,
    OnShutdown,
    OversizeFrame,
    OversizePayload,
    Raise,
    Signal,
    SlowStartup,
    SpawnGrandchild,
    StallReader,
    StderrFlood,
    Stop,
    StopHeartbeats,
)

if TYPE_CHECKING:
    from .._child import Child

_CORRUPT_FRAME = proto.HEADER.pack(5) + b"junk!"
_OVERSIZE_FRAME = proto.HEADER.pack(2**32 - 1)


def current_incarnation() -> int:
    """This child's incarnation number (1 outside a runner process)."""
    child = find_child()
    return 1 if child is None else child.incarnation


def find_child() -> Child | None:
    """The child's shared state (None outside a runner process)."""
    return _child.current


def _block_forever() -> None:
    while True:
        time.sleep(3600)


def _hold_gil(seconds: float | None) -> None:
    """Keep the GIL for ``seconds`` (None: for ever) inside one C call, as a native library can.

    ``sum`` over ``itertools.repeat`` runs entirely in C and never reaches the
    eval loop, where a thread gives the GIL up. A short run first measures how
    many items this machine sums per second.
    """
    if seconds is None:
        sum(itertools.repeat(0))
        return
    probe = 1 << 20
    began = time.perf_counter()
    sum(itertools.repeat(0, probe))
    took = max(time.perf_counter() - began, 1e-9)
    sum(itertools.repeat(0, int(probe * seconds / took)))


def _flood_stderr(lines: int) -> None:
    """Write ``lines`` short lines to stderr as fast as the pipe takes them (big writes)."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    chunk = 10_000
    for start in range(0, lines, chunk):
        data = "".join(f"flood line {i}\n" for i in range(start, min(lines, start + chunk))).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(2, view) :]


def _unpad(value: Any, padding: bytes) -> Any:
    """Unpickling a padded payload: the value, without its padding."""
    del padding
    return value


class _Padded:
    """A value that pickles to more than ``size`` bytes and unpickles to itself."""

    __slots__ = ("size", "value")

    def __init__(self, value: Any, size: int) -> None:
        self.value = value
        self.size = size

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpad, (self.value, bytes(self.size)))


class _FaultyContext:
    """Stands in for the task's :class:`TaskContext`; fires event-triggered faults around ``emit``."""

    def __init__(self, owner: FaultyRunner, ctx: TaskContext[Any], faults: list[Fault]) -> None:
        self._owner = owner
        self._ctx = ctx
        self._faults = faults
        self._events = 0
        self._pad_next: int | None = None  # an OversizePayload's size, for the next event
        self.pad_result: int | None = None  # ... or for the task's result

    @property
    def task_id(self) -> int:
        return self._ctx.task_id

    @property
    def cancelled(self) -> bool:
        return self._ctx.cancelled

    def raise_if_cancelled(self) -> None:
        self._ctx.raise_if_cancelled()

    def emit(self, event: Any) -> None:
        index = self._events
        self._events += 1
        for fault in self._faults:
            if isinstance(fault.trigger, BeforeEvent) and fault.trigger.event == index:
                self._fire(fault)
        if self._pad_next is not None:
            event, self._pad_next = _Padded(event, self._pad_next), None
        self._ctx.emit(event)
        after = [f for f in self._faults if isinstance(f.trigger, AfterEvent) and f.trigger.event == index]
        if after:
            self._owner._flush()  # pyright: ignore[reportPrivateUsage]
            for fault in after:
                self._fire(fault)

    def _fire(self, fault: Fault) -> None:
        kind = fault.kind
        if isinstance(kind, OversizePayload):
            # Not a fault of the process: it pads what this task sends next.
            if kind.result:
                self.pad_result = kind.size
            else:
                self._pad_next = kind.size
            return
        self._owner._fire(fault)  # pyright: ignore[reportPrivateUsage]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


class FaultyRunner(Runner[Any, Any, Any]):
    """Wraps any :class:`~trio_runner.Runner` subclass and injects the faults of a plan.

    Supervise it in place of your runner, with your runner class and the plan
    as its first two arguments; the rest go to your runner's constructor::

        open_supervisor(FaultyRunner, MyRunner, plan, *my_args, kwargs=my_kwargs)

    Each fault fires only in the incarnation it names (see
    :class:`~trio_runner.testing.Fault`), so a restarted runner behaves again
    unless the plan says otherwise, and in a group (``ranks=N``) only in the
    rank it names. The wrapped runner gets ``group`` before its ``setup()``.
    Tasks are counted per incarnation, from 1, in the order ``handle`` is
    entered.

    Args:
        runner: the runner class to wrap; it must be importable by module path.
        plan: the :class:`~trio_runner.testing.FaultPlan`.
        *args: positional arguments for ``runner``.
        **kwargs: keyword arguments for ``runner``.
    """

    def __init__(
        self, runner: type[Runner[Any, Any, Any]], plan: FaultPlan, *args: Any, **kwargs: Any
    ) -> None:
        if not isinstance(plan, FaultPlan):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"FaultyRunner(runner, plan, ...) takes a FaultPlan, not {type(plan).__name__}")
        self._inner = runner(*args, **kwargs)
        self.concurrency = self._inner.concurrency
        self.linger = self._inner.linger
        self._faults = list(plan.for_incarnation(current_incarnation()))
        self._task_numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._reader_stalled = False
        self._child: Child | None = None

    def _prepare(self) -> None:
        """Keep this rank's faults, and set the signal dispositions they need.

        In ``setup()``: a group's rank is known only then. Signal dispositions
        can only change in the main thread, which runs ``setup()``.
        """
        rank = 0 if self.group is None else self.group.rank
        self._faults = [fault for fault in self._faults if fault.applies_to_rank(rank)]
        kinds = [fault.kind for fault in self._faults]
        if any(isinstance(kind, Hang) for kind in kinds):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for kind in kinds:
            if isinstance(kind, Signal) and kind.name not in ("SIGKILL", "SIGSTOP"):
                signal.signal(signal.Signals[kind.name], signal.SIG_DFL)
        if any(isinstance(kind, Signal) for kind in kinds):
            with contextlib.suppress(Exception):
                import resource

                # SIGSEGV, SIGABRT and friends dump core by default: not what a test measures.
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    @property
    def runner(self) -> Runner[Any, Any, Any]:
        """The wrapped runner instance."""
        return self._inner

    # -- the runner's life -----------------------------------------------------------------

    def setup(self) -> None:
        self._inner.group = self.group
        self._prepare()
        self._child = find_child()
        child = self._child
        if child is not None:
            original = child.dispatch
            on_shutdown = [f for f in self._faults if isinstance(f.trigger, OnShutdown)]

            def dispatch(message: proto.ToChild) -> None:
                if self._reader_stalled:
                    _block_forever()
                if isinstance(message, proto.Shutdown):
                    for fault in on_shutdown:
                        self._fire(fault)
                original(message)

            child.dispatch = dispatch  # type: ignore[method-assign]
        self._fire_all(InSetup)
        self._inner.setup()

    def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
        with self._lock:
            number = next(self._task_numbers)
        faults = [
            f
            for f in self._faults
            if isinstance(f.trigger, BeforeEvent | AfterEvent) and f.trigger.task == number
        ]
        if not faults:
            return self._inner.handle(request, ctx)
        wrapped = _FaultyContext(self, ctx, faults)
        result = self._inner.handle(request, cast(Any, wrapped))
        if wrapped.pad_result is not None:
            return _Padded(result, wrapped.pad_result)
        return result

    def teardown(self) -> None:
        self._fire_all(InTeardown)
        self._inner.teardown()

    # -- firing ------------------------------------------------------------------------------

    def _fire_all(self, trigger: type[InSetup | InTeardown]) -> None:
        for fault in self._faults:
            if isinstance(fault.trigger, trigger):
                self._fire(fault)

    def _flush(self) -> None:
        """Wait until everything queued has been written to the parent (at most a second)."""
        if self._child is not None:
            self._child.outbox.flush(1.0)

    def _send_raw(self, data: bytes) -> None:
        child = self._child
        if child is None:
            return
        with contextlib.suppress(OSError):
            child.outbox.send_raw(data)

    def _fire(self, fault: Fault) -> None:
        kind = fault.kind
        child = self._child
        # Crashes do not flush what is queued: a real crash would not either.
        if isinstance(kind, Signal):
            os.kill(os.getpid(), signal.Signals[kind.name])
            _block_forever()
        elif isinstance(kind, Exit):
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(kind.code)
        elif isinstance(kind, Raise):
            raise InjectedFault(kind.message)
        elif isinstance(kind, Hang):
            _block_forever()
        elif isinstance(kind, HoldGil):
            _hold_gil(kind.seconds)
        elif isinstance(kind, Stop):
            os.kill(os.getpid(), signal.SIGSTOP)
            _block_forever()
        elif isinstance(kind, StopHeartbeats):
            if child is not None:
                child.outbox.heartbeat_paused = True
            _block_forever()
        elif isinstance(kind, StallReader):
            self._reader_stalled = True
            if child is not None:
                child.reader_stalled.set()
        elif isinstance(kind, CorruptFrame):
            self._send_raw(_CORRUPT_FRAME)
        elif isinstance(kind, OversizeFrame):
            self._send_raw(_OVERSIZE_FRAME)
        elif isinstance(kind, SlowStartup):
            time.sleep(kind.seconds)
        elif isinstance(kind, StderrFlood):
            _flood_stderr(kind.lines)
        elif isinstance(kind, HostileException):
            huge = kind.how == "huge_message"
            raise HostileFault("x" * kind.size if huge else "unprintable", str_raises=not huge)
        elif isinstance(kind, SpawnGrandchild):
            import subprocess

            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        # An OversizePayload is fired by the task's context: it pads what the task sends next.
