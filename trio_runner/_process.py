"""One runner process: spawn, transport endpoints, death watch, signals and reaping.

The supervisor talks to an incarnation only through the :class:`Worker`
protocol, so collaboration tests can plug in an in-memory fake and drive the
supervisor under a ``MockClock``. :class:`ProcessWorker` is the real one.

Every blocking ``multiprocessing`` call (``start``, ``join``, ``close``) runs in
``trio.to_thread.run_sync(..., abandon_on_cancel=True)`` on a private limiter
(never trio's default, which the application may have saturated); the death watch is
``wait_readable(process.sentinel)`` with no polling.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import trio

from . import _child, _guardian
from ._childlog import MAX_LINE
from ._exits import ExitStatus as ExitStatus
from ._runner import GroupInfo

_RECEIVE_SIZE = 256 * 1024
_READS_PER_YIELD = 8
#: Bytes read between two checkpoints, whatever the count of reads: a 256 KiB
#: read into a fresh buffer costs 0.1-0.4 ms (page faults), so eight in a row
#: held the loop 2-9 ms while a big payload streamed in.
_BYTES_PER_YIELD = _RECEIVE_SIZE
#: Reads of this many bytes or more, of a big frame, are handed over in their
#: own mapping; the others are copied out of the one the next read reuses.
_HANDOVER = 64 * 1024
_SOCKET_BUFFER = 1024 * 1024


@dataclass(frozen=True)
class SpawnSpec:
    """Everything needed to start one incarnation; the same for every restart."""

    module: str
    qualname: str
    args_bytes: bytes
    name: str
    start_method: str
    preload: tuple[str, ...]
    max_frame: int
    heartbeat_interval: float
    #: The supervisor's guardian process (see ``_guardian``), shared by all its
    #: runners. None only in benchmarks that measure what the guardian costs.
    guardian: GuardianLink | None = field(default_factory=lambda: GuardianLink())
    #: The rank's place, for one rank of a group (set per rank and generation); None alone.
    group: GroupInfo | None = None


class GuardianLink:
    """One supervisor's guardian process: started with its first runner, told of each one, closed with it.

    The supervisor holds the lifeline's only write end (never written) and
    a write end of the notes pipe (for ``-PID`` once a runner is reaped); each
    runner gets a read end of the lifeline and a write end of the notes pipe,
    to register itself (``_guardian.register``). Thread-safe: a start runs in
    a worker thread, and may be abandoned while the supervisor closes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._lifeline_r: int | None = None
        self._lifeline_w: int | None = None
        self._notes_w: int | None = None

    def for_child(self) -> tuple[int, int] | None:
        """Copies of (notes write end, lifeline read end) for a runner about to start; the caller closes them.

        Starts the guardian the first time (a fork and an exec: off the trio
        thread). None if there is no guardian (it could not be started, or
        the supervisor is closing).
        """
        with self._lock:
            if not self._started and not self._closed:
                self._started = True
                self._launch()
            if self._closed or self._notes_w is None or self._lifeline_r is None:
                return None
            return os.dup(self._notes_w), os.dup(self._lifeline_r)

    def _launch(self) -> None:
        # os.pipe fds are not inherited: the write ends stay in this process,
        # and reach a runner only as the copies for_child() passes explicitly.
        lifeline_r, lifeline_w = os.pipe()
        notes_r, notes_w = os.pipe()
        try:
            launcher = _guardian.launch(lifeline_r, notes_r)
        finally:
            os.close(notes_r)
        if launcher is None:
            for fd in (lifeline_r, lifeline_w, notes_w):
                os.close(fd)
            _guardian_missing("could not be started (no interpreter, or out of processes or memory)")
            return
        # A full pipe (a guardian that does not read) must never block a runner
        # or the trio thread: a note that does not fit is dropped, and said so.
        os.set_blocking(notes_w, False)
        self._lifeline_r, self._lifeline_w, self._notes_w = lifeline_r, lifeline_w, notes_w
        threading.Thread(
            target=_reap_launcher, args=(launcher,), name="trio-runner-guardian-reaper", daemon=True
        ).start()

    def reaped(self, pid: int) -> None:
        """Tell the guardian that runner ``pid`` is reaped: it sweeps what left the runner's group."""
        with self._lock:
            if self._notes_w is None:
                return
            with contextlib.suppress(OSError):  # full, or the guardian is gone: it sweeps at the end
                os.write(self._notes_w, _guardian.reaped_note(pid))

    def close(self) -> None:
        """The supervisor is done with its runners: the guardian sweeps what is left and exits."""
        with self._lock:
            self._closed = True
            # The lifeline first: the guardian must not see the notes end first.
            for fd in (self._lifeline_w, self._notes_w, self._lifeline_r):
                if fd is not None:
                    os.close(fd)
            self._lifeline_r = self._lifeline_w = self._notes_w = None


def _reap_launcher(pid: int) -> None:
    """Reap the guardian's launcher (gone within a moment of its start); say so if it failed."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # application code reaped it already (os.wait(), or SIGCHLD ignored)
        status = 0
    if status != 0:
        _guardian_missing(f"could not be started (launcher status {status:#x})")


def _guardian_missing(why: str) -> None:
    logging.getLogger("trio_runner").warning(
        "the guardian process %s; a runner that holds the GIL or is stopped will not follow "
        "a supervisor that dies",
        why,
    )


class Worker(Protocol):
    """One incarnation of the runner, as the supervisor sees it."""

    @property
    def pid(self) -> int | None: ...

    async def start(self) -> None:
        """Start the process. Cancellation leaves no process behind."""
        ...

    async def send_all(self, data: bytes) -> None:
        """Write ``data`` to the child. A send to a child that is gone returns quietly:
        the death watch reports the death, not the send."""
        ...

    def send_nowait(self, data: bytes) -> int:
        """Write what the connection takes at once, without blocking: the count
        written, 0 if none (the connection is full, or the child is gone).
        The caller sends the rest with :meth:`send_all`."""
        ...

    async def receive_some(self, *, hand_over: bool = False) -> bytes:
        """The next bytes from the child, or ``b""`` at end of file.

        ``hand_over``: the caller keeps what it gets (the rest of a big frame),
        so a big read may come in a buffer of its own rather than as a copy.
        """
        ...

    async def wait(self, reap_timeout: float) -> ExitStatus:
        """Return once the process is dead, reaped if possible within ``reap_timeout``."""
        ...

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the runner's whole process group."""
        ...

    async def pump_output(self, on_lines: Callable[[str, bytes], None]) -> None:
        """Call ``on_lines(stream, batch)`` with the lines of stdout/stderr until both end.

        A batch is one or more whole lines as bytes, each ending in ``b"\\n"``
        (a last line without one gets one); ``stream`` is ``"stdout"`` or
        ``"stderr"``. Batching keeps the per-line work off the trio thread.
        """
        ...

    async def aclose(self) -> None:
        """Release the transport and the process object. Never blocks the loop."""
        ...


WorkerFactory = Callable[[SpawnSpec, int], Worker]


def signal_group(pid: int, signum: int) -> None:
    """Signal the process group led by ``pid``; fall back to the pid alone.

    The child calls ``setsid`` first thing, so its group id is its pid. Before
    it has done so (or if the group is already gone) only the pid is signalled.
    """
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    except PermissionError:
        # The group id belongs to someone else: the child has not run setsid yet.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


#: Imported by every runner child before anything else: preloaded in the
#: forkserver, it costs each forked child nothing (about 20 ms otherwise).
CHILD_MODULE = _child.__name__


def forkserver_preload(preload: Sequence[str]) -> list[str]:
    """The forkserver's preload list for a supervisor that asked for ``preload``.

    The child's own module always, then ``preload``; with no ``preload``, the
    child's module after multiprocessing's default (``__main__``).
    """
    return [CHILD_MODULE, *preload] if preload else ["__main__", CHILD_MODULE]


def ensure_forkserver(name: str, preload: tuple[str, ...]) -> None:
    """Start the forkserver with ``preload`` imported, or warn that it runs without them."""
    from multiprocessing import forkserver

    server: Any = getattr(forkserver, "_forkserver", None)
    running = server is not None and getattr(server, "_forkserver_pid", None) is not None
    preloaded = set(getattr(server, "_preload_modules", ()) or ())
    missing = set(preload) - preloaded
    if running and missing:
        # The forkserver is one per process and its preload list is fixed
        # when it starts: say so rather than silently restart slowly.
        logging.getLogger("trio_runner").warning(
            "runner %r asked the forkserver to preload %s, but it is already running without "
            "them; every restart imports them again. Start supervisors that need different "
            "preloads in separate processes, or give them all the same preload list",
            name,
            ", ".join(sorted(missing)),
        )
    elif not running:
        multiprocessing.get_context("forkserver").set_forkserver_preload(forkserver_preload(preload))
    forkserver.ensure_running()


class ProcessWorker:
    """A real runner process started through ``multiprocessing``."""

    def __init__(self, spec: SpawnSpec, incarnation: int) -> None:
        self._spec = spec
        self._incarnation = incarnation
        self._lock = threading.Lock()
        self._started = False
        self._abandoned = False
        self._process: Any = None
        self._pid: int | None = None
        self._reaped = False
        self._stream: trio.SocketStream | None = None
        self._sock: socket.socket | None = None
        self._pidfd: int | None = None
        self._reads_in_a_row = 0
        self._read_since_yield = 0
        self._read_buffer: mmap.mmap | bytearray | None = None
        self._out_fds: list[int] = []
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._pid

    async def start(self) -> None:
        spec = self._spec
        # The forkserver's preload list is not set here: it is process-wide,
        # fixed when the forkserver launches (ensure_forkserver, above).
        ctx = multiprocessing.get_context(spec.start_method)
        parent_sock, child_sock = socket.socketpair()
        for sock in (parent_sock, child_sock):
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        config: dict[str, Any] = {
            "max_frame": spec.max_frame,
            "heartbeat_interval": spec.heartbeat_interval,
            "incarnation": self._incarnation,
        }
        if spec.group is not None:
            config["group"] = spec.group
        process = ctx.Process(  # type: ignore[attr-defined]
            target=_child.main,
            args=(
                child_sock,
                _child.InheritedFd(out_w),
                _child.InheritedFd(err_w),
                spec.module,
                spec.qualname,
                spec.args_bytes,
                config,
            ),
            name=f"trio-runner:{spec.name}:{self._incarnation}"
            + ("" if spec.group is None else f":rank{spec.group.rank}"),
            daemon=True,
        )
        self._process = process
        self._out_fds = [out_r, err_r]
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent_sock))
        self._sock = parent_sock  # non-blocking: trio made it so

        def start_in_thread() -> None:
            pidfd = None
            # The runner registers with the supervisor's guardian first thing;
            # the fds go with the process (also through the forkserver).
            guardian_fds = None if spec.guardian is None else spec.guardian.for_child()
            if guardian_fds is not None:
                config["guardian"] = tuple(_child.InheritedFd(fd) for fd in guardian_fds)
            try:
                process.start()  # pyright: ignore[reportUnknownMemberType]
                pid = cast(int, process.pid)  # pyright: ignore[reportUnknownMemberType]
                self._pid = pid
                if spec.start_method == "spawn":  # a forkserver's children are not ours to wait for
                    pidfd = _open_pidfd(pid)
            finally:
                child_sock.close()
                os.close(out_w)
                os.close(err_w)
                for fd in guardian_fds or ():
                    os.close(fd)
            with self._lock:
                self._started = True
                abandoned = self._abandoned
                if not abandoned:
                    self._pidfd = pidfd
            if abandoned:
                if pidfd is not None:
                    os.close(pidfd)
                self._kill_abandoned()

        try:
            await trio.to_thread.run_sync(start_in_thread, abandon_on_cancel=True, limiter=private_limiter())
        except BaseException:
            # A start abandoned on cancel may still start a process: whichever of
            # this task and the thread sees the other's flag kills it.
            with self._lock:
                self._abandoned = True
                started = self._started
            if started:
                self._kill_abandoned()
            raise

    def _kill_abandoned(self) -> None:
        pid = self._pid
        if pid is not None:
            signal_group(pid, signal.SIGKILL)
            # Reaped by whoever calls wait(); the abandoned thread also reaps so
            # that nothing is left even if nobody does.
            threading.Thread(target=self._process.join, daemon=True).start()

    async def send_all(self, data: bytes) -> None:
        assert self._stream is not None
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The child is gone. Its death watch reports that; a send racing it
            # must not turn a crash into an error of the supervisor's own.
            await trio.lowlevel.checkpoint()

    def send_nowait(self, data: bytes) -> int:
        if self._sock is None:
            return 0
        try:
            return self._sock.send(data)
        except OSError:  # full (BlockingIOError), or the child is gone
            return 0

    async def receive_some(self, *, hand_over: bool = False) -> bytes:
        # Straight on the non-blocking socket: SocketStream.receive_some adds a
        # schedule point after a read that succeeded at once, a whole loop pass
        # before each frame is routed. Reads that find data at once still
        # yield every _READS_PER_YIELD calls or _BYTES_PER_YIELD bytes, so a
        # chatty child cannot starve the loop, and cancellation is seen.
        sock = self._sock
        assert sock is not None
        self._reads_in_a_row += 1
        if self._reads_in_a_row >= _READS_PER_YIELD or self._read_since_yield >= _BYTES_PER_YIELD:
            self._reads_in_a_row = self._read_since_yield = 0
            await trio.lowlevel.checkpoint()
        while True:
            buffer = self._read_buffer
            if buffer is None:
                buffer = self._read_buffer = _new_read_buffer()
            try:
                count = sock.recv_into(buffer)
            except BlockingIOError:
                pass
            except OSError:  # closed by aclose(), or reset
                return b""
            else:
                self._read_since_yield += count
                if count < _HANDOVER or not hand_over:
                    return bytes(buffer[:count])
                # A big read of a big frame is handed over, not copied: a big
                # frame keeps its reads as they are. Its own mapping, not the
                # heap: glibc would put thousands of such reads on the heap top
                # and give the pages back (milliseconds for tens of MiB) at a
                # later free of ours, on the loop, wherever the trim happened to
                # fall. Only then: a mapping per read cost a stream of small
                # events (frames under 1 MiB) a quarter of its events/s.
                self._read_buffer = None
                return cast(bytes, memoryview(buffer)[:count])
            self._reads_in_a_row = self._read_since_yield = 0
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:
                return b""

    async def wait(self, reap_timeout: float) -> ExitStatus:
        process = self._process
        if self._pidfd is not None:
            # Linux, our own child: the pidfd turns readable the moment the
            # child can be reaped, so the exit code is there at once.
            await trio.lowlevel.wait_readable(self._pidfd)
        else:
            await trio.lowlevel.wait_readable(process.sentinel)
        # The kernel closes the sentinel during teardown, a moment before the
        # process can be reaped (and multiprocessing may reap it first); poll
        # once, then join from a thread.
        code = process.exitcode
        if code is None:
            with trio.move_on_after(reap_timeout):
                while code is None:
                    await trio.to_thread.run_sync(
                        process.join, 0.05, abandon_on_cancel=True, limiter=private_limiter()
                    )
                    code = process.exitcode
        if code is None:
            return ExitStatus(exitcode=None, signal=None, reaped=False)
        self._reaped = True
        if code < 0:
            return ExitStatus(exitcode=None, signal=-code)
        return ExitStatus(exitcode=code, signal=None)

    def signal(self, signum: int) -> None:
        pid = self.pid
        if pid is None:
            return
        if self._reaped:
            # The pid may already belong to someone else; only the group that
            # the runner led (its grandchildren) may still need the signal.
            with contextlib.suppress(OSError):
                os.killpg(pid, signum)
        else:
            signal_group(pid, signum)

    async def pump_output(self, on_lines: Callable[[str, bytes], None]) -> None:
        fds, self._out_fds = self._out_fds, []
        async with trio.open_nursery() as nursery:
            for stream_name, fd in zip(("stdout", "stderr"), fds, strict=True):
                nursery.start_soon(_pump_lines, trio.lowlevel.FdStream(fd), stream_name, on_lines)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in self._out_fds:
            os.close(fd)
        self._out_fds = []
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)
        if self._pidfd is not None:
            pidfd, self._pidfd = self._pidfd, None
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
        if self._spec.guardian is not None and self._pid is not None:
            # Reaped (or given up on after SIGKILL): the guardian sweeps what
            # left the runner's group, and forgets its pid before it is reused.
            self._spec.guardian.reaped(self._pid)
        process = self._process
        if process is not None and process.exitcode is not None:
            trio.lowlevel.notify_closing(process.sentinel)
            await trio.to_thread.run_sync(process.close, abandon_on_cancel=True, limiter=private_limiter())


async def _pump_lines(
    stream: trio.lowlevel.FdStream, name: str, on_lines: Callable[[str, bytes], None]
) -> None:
    """Hand ``on_lines`` the whole lines of each read, as one batch of bytes.

    Only C-speed work runs here per read (find the last newline, join the
    line it completes): splitting lines and building records is the log
    thread's (``_childlog``). Each read is a checkpoint, so a flood of output
    costs the loop one short step per read, not one per line. A line that
    has not ended yet goes out in pieces of ``MAX_LINE`` once it is longer
    than that (memory stays bounded); the log thread cuts the ended ones.
    """
    async with stream:
        pending = b""
        while True:
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                break
            end = data.rfind(b"\n") + 1
            if end:
                on_lines(name, pending + data[:end])
                pending = data[end:]
            else:
                pending += data
            while len(pending) > MAX_LINE:
                on_lines(name, pending[:MAX_LINE] + b"\n")
                pending = pending[MAX_LINE:]
        if pending:
            on_lines(name, pending + b"\n")


def _new_read_buffer() -> mmap.mmap | bytearray:
    """A buffer for one read: an anonymous mapping, or heap memory if no mapping can be had.

    (Mappings per process are limited, ``vm.max_map_count`` on Linux; a big frame
    in flight holds one per 256 KiB read.)
    """
    try:
        return mmap.mmap(-1, _RECEIVE_SIZE)
    except OSError:
        return bytearray(_RECEIVE_SIZE)


def private_limiter() -> trio.CapacityLimiter:
    """A thread limiter for one blocking call of our own, shared with nobody.

    Trio's default limiter belongs to the application: one that is using all
    of its tokens would otherwise hold a start, a reap or a shielded close
    (and with it a shutdown) past every deadline. Our calls are few (a
    handful per incarnation), so they need no limit of their own.
    """
    return trio.CapacityLimiter(1)


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` where the platform has them (Linux 5.3+), else None (use the sentinel)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        return pidfd_open(pid)
    except OSError:  # an older kernel, a sandbox that forbids it, or already reaped
        return None


def process_worker(spec: SpawnSpec, incarnation: int) -> Worker:
    return ProcessWorker(spec, incarnation)
