"""The orphan guard that works while the runner holds the GIL or is stopped: a guardian process.

The runner's own orphan check is a thread, so it cannot run while the
runner's main thread holds the GIL in native code, nor while the runner is
SIGSTOPped. The guardian is a tiny process, one per supervisor, with one job:
when the supervisor is gone, its runners and everything they started go too.

The supervisor starts it once, with its first runner (off the trio thread),
and it lives as long as the supervisor. It blocks on two pipes:

- the **lifeline**, whose only write end the supervisor holds and never
  writes to: end-of-file means the supervisor is gone (SIGKILLed, or done);
- the **notes** pipe, one line per note: ``+PID`` from each runner first
  thing after ``setsid`` (this runner exists; its process group is PID), and
  ``-PID`` from the supervisor once it has reaped that runner.

End-of-file on the lifeline makes it read the notes still in the pipe, sweep
(see :func:`sweep`) every runner it knows of: stop the runner's process group
and every descendant that left it (``start_new_session=True``), read the
process tree again while it cannot change, SIGKILL them all; and exit.
Between wake-ups it scans the process table every ``_SCAN_INTERVAL`` and
records each runner's descendants outside its group with their start times:
one that is reparented away later (its parent died) is still known, and a pid
reused by a stranger is never signalled. The scan reads ``/proc`` on Linux and
runs ``ps`` elsewhere (macOS). A ``-PID`` note sweeps the descendants it
recorded for that runner (the supervisor kills the group itself) and forgets it.

The window between a runner's start and its note is closed by the runner, not
by a wait: it writes ``+PID`` before any code but ours runs, then looks at the
lifeline. End-of-file there: the supervisor is gone, and the runner exits at
once. Not at end-of-file: the supervisor lived after the note was in the pipe,
so the guardian, which reads every note left before it sweeps, will know it.

The guardian is a fresh interpreter (``python -I -S``, running this file),
not a fork of the supervisor: a fork would share a large process's pages and
hold whatever it held. It forks once and exits, so the guardian is reparented
away at once, leads a session of its own (a terminal's Ctrl-C is not for it),
and runs at the lowest CPU priority.

Child side: the standard library only, and at import only ``os``, ``sys``,
``select`` and ``time`` (every import here costs the guardian's start).
"""

from __future__ import annotations

import os
import select
import sys
import time

#: How often the guardian records the runners' descendants that left their groups.
#: A /proc scan of a hundred processes costs about a millisecond.
_SCAN_INTERVAL = 1.0
#: Rounds of "stop what is new, read the tree again" in a sweep; a tree that
#: still grows after this many is swept as far as it was read.
_FREEZE_ROUNDS = 4
_PS_TIMEOUT = 10.0
#: The same on every POSIX system; importing ``signal`` would cost the guardian
#: 6 ms (it imports ``enum``), so it is imported only in :func:`sweep`.
_SIGKILL = 9
_NICEST = 19
#: The fds the guardian finds its pipes at (0-2 are /dev/null).
_LIFELINE_FD = 3
_NOTES_FD = 4


class Proc:
    """One row of the process table: what the sweep needs to know about a process."""

    __slots__ = ("dead", "pgid", "ppid", "start")

    def __init__(self, ppid: int, pgid: int, start: str, dead: bool) -> None:
        self.ppid = ppid
        self.pgid = pgid
        #: When it started, in the platform's own terms: with the pid, its identity.
        self.start = start
        #: A zombie: it runs nothing and cannot be signalled.
        self.dead = dead


# -- the supervisor's side ----------------------------------------------------


def launch(lifeline: int, notes: int) -> int | None:
    """Start a guardian that reads ``lifeline`` and ``notes`` (read ends); the launcher's pid.

    The launcher forks the guardian and exits at once; the caller reaps it.
    None if no process could be started. Blocks for a fork and an exec:
    call it off the trio thread.
    """
    if not sys.executable:
        return None
    code = (
        f"import sys; sys.path.append({os.path.dirname(os.path.abspath(__file__))!r}); "
        "import _guardian; _guardian.main()"
    )
    # Exactly these two fds, at known numbers, and /dev/null as stdio: whatever
    # the guardian held would stay open as long as it lives (the application's
    # pipes and sockets, the resource tracker's pipe).
    actions: list[tuple[object, ...]] = [
        (os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)
    ]
    # Through copies above the target numbers: a dup2 of an fd onto itself would
    # keep it close-on-exec, and one onto the other's number would clobber it.
    import fcntl  # the supervisor's side only: the guardian never needs it

    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _NOTES_FD + 1) for fd in (lifeline, notes)]
    try:
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd not in high]
        actions += [
            (os.POSIX_SPAWN_DUP2, high[0], _LIFELINE_FD),
            (os.POSIX_SPAWN_DUP2, high[1], _NOTES_FD),
        ]
        # The supervisor's pid, unused: for ps, and for tests, to tell whose guardian it is.
        argv = [sys.executable, "-I", "-S", "-c", code, str(os.getpid())]
        try:
            # A group of its own at once: a terminal's Ctrl-C is not for it.
            return os.posix_spawn(sys.executable, argv, os.environ, file_actions=actions, setpgroup=0)
        except OSError:  # out of processes or memory, or no interpreter to run
            return None
    finally:
        for fd in high:
            os.close(fd)


def _inheritable_fds() -> list[int]:
    """This process's fds that a spawned program would inherit, 0-2 aside."""
    try:
        names = os.listdir("/dev/fd")
    except OSError:
        return []
    fds: list[int] = []
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    fds.append(fd)
            except OSError:  # the directory listdir read, closed by now
                continue
    return fds


def reaped_note(pid: int) -> bytes:
    """The supervisor's note that runner ``pid`` is reaped."""
    return b"-%d\n" % pid


# -- the runner's side --------------------------------------------------------


def register(notes: int, lifeline: int) -> bool:
    """Tell the guardian about this runner, which must lead its own process group.

    Closes both fds (inherited from the supervisor). Exits at once if the
    supervisor is already gone. False (no guardian) if this process does not
    lead its group, whose id the guardian kills by, or if the guardian is gone
    or cannot take the note.
    """
    pid = os.getpid()
    try:
        told = False
        if os.getpgid(0) == pid:
            try:
                told = os.write(notes, b"+%d\n" % pid) > 0
            except OSError:  # no guardian reads the pipe (EPIPE), or it is full (EAGAIN)
                told = False
        # After the note: if the supervisor still lives now, the guardian reads
        # the note before it sweeps, whenever the supervisor dies.
        if _readable((lifeline,), 0):
            os._exit(1)  # the supervisor is gone: nothing of the runner's has run yet
    finally:
        os.close(notes)
        os.close(lifeline)
    return told


def kill_escaped_descendants() -> None:
    """SIGKILL this process's descendants that left its process group.

    The supervisor kills the group once the runner is reaped; those that left
    it are found only through their parent links, which break when this
    process exits, so the runner calls this on its way out.
    """
    sweep(os.getpid(), os.getpgid(0), {}, kill_group=False, spare=None)


# -- the guardian -------------------------------------------------------------


def main() -> None:
    """The launcher's entry point (``python -I -S -c ...``): fork the guardian, and exit."""
    if os.fork() != 0:
        os._exit(0)  # reaped by the supervisor; the guardian is reparented away
    try:
        os.setsid()
        try:  # noqa: SIM105 (contextlib: one import less for the guardian)
            os.setpriority(os.PRIO_PROCESS, 0, _NICEST)
        except OSError:
            pass
        Guardian(_LIFELINE_FD, _NOTES_FD).run()
    finally:
        os._exit(0)


class Known:
    """What the guardian knows of one runner."""

    __slots__ = ("dead", "escaped", "start")

    def __init__(self, start: str | None) -> None:
        #: Its start time (its identity with the pid), once read.
        self.start = start
        #: Its descendants outside its group, with their start times.
        self.escaped: dict[int, str] = {}
        #: Seen dead or replaced in a scan: its pid leads nowhere.
        self.dead = False


class Guardian:
    """The guardian's whole life: follow the notes, record escapees, sweep at the lifeline's end."""

    def __init__(self, lifeline: int, notes: int) -> None:
        self.lifeline = lifeline
        self.notes = notes
        self.runners: dict[int, Known] = {}
        self.pending = b""
        self.notes_open = True
        self.me = os.getpid()

    def run(self) -> None:
        os.set_blocking(self.notes, False)
        next_scan = time.monotonic() + _SCAN_INTERVAL
        while True:
            fds = (self.lifeline, self.notes) if self.notes_open else (self.lifeline,)
            # Scans keep their pace however often notes come (a crash loop).
            timeout = max(0.0, next_scan - time.monotonic()) if self.runners else None
            if _readable(fds, timeout):
                self.read_notes()
                if _readable((self.lifeline,), 0):
                    break  # the supervisor is gone
            if self.runners and time.monotonic() >= next_scan:
                self.scan()
                next_scan = time.monotonic() + _SCAN_INTERVAL
            elif not self.runners:
                next_scan = time.monotonic() + _SCAN_INTERVAL
        # Every note written while the supervisor lived is in the pipe by now.
        self.read_notes()
        for pid, runner in self.runners.items():
            self.sweep_runner(pid, runner)

    def read_notes(self) -> None:
        while True:
            try:
                data = os.read(self.notes, 65536)
            except BlockingIOError:
                return
            if not data:  # no writer left: nothing more will come
                self.notes_open = False
                return
            lines = (self.pending + data).split(b"\n")
            self.pending = lines.pop()
            for line in lines:
                self.note(line)

    def note(self, line: bytes) -> None:
        try:
            pid = int(line[1:])
        except ValueError:
            return
        if line.startswith(b"+"):
            self.runners[pid] = Known(_proc_start(pid))
            return
        runner = self.runners.pop(pid, None)
        if runner is not None and runner.escaped:
            # Reaped and its group killed by the supervisor; what left the group is ours.
            sweep(pid, pid, runner.escaped, kill_group=False, spare=self.me, from_root=False)

    def scan(self) -> None:
        table = process_table()
        if table is None:
            return
        for pid, runner in self.runners.items():
            proc = table.get(pid)
            if runner.start is None and proc is not None:
                runner.start = proc.start
            if proc is None or proc.dead or proc.start != runner.start:
                runner.dead = True  # told by the supervisor soon, or swept at the end
            runner.escaped = escaped(
                table,
                set() if runner.dead else {pid},
                pid,
                runner.escaped,
                exclude=self.me,
            )

    def sweep_runner(self, pid: int, runner: Known) -> None:
        proc = None
        if runner.start is not None:
            table = process_table()
            proc = None if table is None else table.get(pid)
        if proc is not None and proc.start != runner.start:
            # Its pid belongs to a stranger, so its group is empty (a group id in
            # use is never given to a new process): only what left it is left.
            sweep(pid, pid, runner.escaped, kill_group=False, spare=self.me, from_root=False)
            return
        sweep(pid, pid, runner.escaped, kill_group=True, spare=self.me, from_root=not runner.dead)


def _readable(fds: tuple[int, ...], timeout: float | None) -> bool:
    """Wait up to ``timeout`` seconds (None: for ever) for any of ``fds`` to be readable."""
    if hasattr(select, "poll"):
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else timeout * 1000))
    readable, _, _ = select.select(fds, [], [], timeout)
    return bool(readable)


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` from /proc (None without /proc, or if it is gone)."""
    data = _read_stat(pid)
    return None if data is None else _parse_stat(data).start


def _read_stat(pid: int | str) -> bytes | None:
    """``/proc/<pid>/stat``, or None if it cannot be read (no /proc, or the process is gone)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def _parse_stat(data: bytes) -> Proc:
    # "pid (comm) state ppid pgrp session ... starttime(22nd)"; comm may hold spaces and parentheses.
    fields = data[data.rindex(b")") + 2 :].split()
    return Proc(int(fields[1]), int(fields[2]), fields[19].decode(), fields[0] in (b"Z", b"X"))


# -- the process table and the sweep ----------------------------------------


def process_table() -> dict[int, Proc] | None:
    """Every process's parent, group, start time and liveness; None if they cannot be read."""
    if os.path.exists("/proc/self/stat"):
        return _proc_table()
    return ps_table()


def _proc_table() -> dict[int, Proc] | None:
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    table: dict[int, Proc] = {}
    for name in names:
        if not name.isdigit():
            continue
        data = _read_stat(name)
        if data is not None:  # else gone meanwhile
            table[int(name)] = _parse_stat(data)
    return table


def ps_table() -> dict[int, Proc] | None:
    """The table from ``ps`` (macOS, or a Linux without /proc)."""
    import subprocess  # only here: most runners never need it, and it costs a spawn 10 ms

    command = ["ps", "-A", "-o", "pid=", "-o", "ppid=", "-o", "pgid=", "-o", "stat=", "-o", "lstart="]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            env={**os.environ, "LC_ALL": "C"},
            timeout=_PS_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    table: dict[int, Proc] = {}
    for line in done.stdout.decode("ascii", "replace").splitlines():
        parts = line.split(None, 4)
        if len(parts) < 5:
            continue
        try:
            pid, ppid, pgid = int(parts[0]), int(parts[1]), int(parts[2])
        except ValueError:
            continue
        table[pid] = Proc(ppid, pgid, " ".join(parts[4].split()), parts[3].startswith("Z"))
    return table


def escaped(
    table: dict[int, Proc], roots: set[int], group: int, known: dict[int, str], *, exclude: int | None
) -> dict[int, str]:
    """The live descendants of ``roots`` outside process group ``group``, with their start times.

    ``exclude`` and its descendants are not searched.

    ``known`` escapees still alive with the same start time are kept (and
    searched from), whether or not a parent link still leads to them.
    """
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        children.setdefault(proc.ppid, []).append(pid)
    found: dict[int, str] = {}
    for pid, start in known.items():
        proc = table.get(pid)
        if proc is not None and proc.start == start and not proc.dead:
            found[pid] = start
    stack = [pid for pid in roots if pid in table and (pid not in known or pid in found)]
    seen = set(stack)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child in seen or child == exclude:
                continue
            seen.add(child)
            stack.append(child)
            proc = table[child]
            if proc.pgid != group and not proc.dead:
                found[child] = proc.start
    return found


def sweep(
    root: int,
    group: int,
    known: dict[int, str],
    *,
    kill_group: bool,
    spare: int | None,
    from_root: bool = True,
) -> None:
    """SIGKILL the descendants of ``root`` outside ``group`` (and the group, if ``kill_group``).

    ``known`` are such descendants recorded earlier, with their start times.
    Without ``from_root`` (``root`` is gone, or its pid is someone else's now)
    only ``known`` and their descendants are searched.

    Everything is stopped first and the tree read again until nothing new
    turns up: a stopped process neither forks nor exits, so no parent link
    breaks and no pid is freed for reuse between reading and killing.
    ``spare`` and its descendants are left alone.
    """
    from signal import SIGSTOP

    if kill_group:
        _signal_group(group, SIGSTOP)
    stopped: dict[int, str] = {}
    leaders: set[int] = set()
    for _ in range(_FREEZE_ROUNDS):
        table = process_table()
        if table is None:
            break
        roots = {*known, *stopped, *([root] if from_root else [])}
        found = escaped(table, roots, group, {**known, **stopped}, exclude=spare)
        new = [pid for pid in found if pid not in stopped]
        for pid in new:
            _signal(pid, SIGSTOP)
            stopped[pid] = found[pid]
            if table[pid].pgid == pid:
                leaders.add(pid)
        if not new:
            break
    if kill_group:
        _signal_group(group, _SIGKILL)
    for pid in stopped:
        if pid in leaders:
            # Its group may hold processes that no parent link leads to any more.
            _signal_group(pid, _SIGKILL)
        else:
            _signal(pid, _SIGKILL)


# try/except rather than contextlib.suppress: one import less for the guardian.
def _signal(pid: int, signum: int) -> None:
    try:  # noqa: SIM105
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, signum: int) -> None:
    try:  # noqa: SIM105
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
