"""The orphan guard that works while the runner holds the GIL or is stopped: a guardian process.

The runner's own orphan check is a thread, so it cannot run while the
runner's main thread holds the GIL in native code, nor while the runner is
SIGSTOPped. The guardian is a tiny process that the runner forks first thing
(before any thread exists, which is when a fork is safe), with one job: when
the supervisor is gone, the runner and everything it started go too.

It blocks on two pipes that nobody ever writes to:

- the **lifeline**, whose only write end the supervisor holds until it has
  reaped this incarnation: end-of-file means the supervisor is gone (or done
  with the runner, which is then dead or being killed);
- the **runner pipe**, whose only write end the runner holds: end-of-file
  means the runner has died.

Either way it sweeps (see :func:`sweep`): it stops the runner's process group
and every descendant that left it (``start_new_session=True``), reads the
process tree again while it cannot change, SIGKILLs them all, and exits.
Between wake-ups it scans the process table every ``_SCAN_INTERVAL`` and
records the runner's descendants outside its group with their start times:
one that is reparented away later (its parent died) is still known, and a pid
reused by a stranger is never signalled. The scan reads ``/proc`` on Linux and
runs ``ps`` elsewhere (macOS).

The one design decision: a double fork. The guardian is the runner's
grandchild and is reparented away at once, so the runner never has a child of
ours to reap, nor one to trip over in ``os.wait()``. It stays in the runner's
session but leads a process group of its own: the supervisor's signals to the
runner's group (SIGTERM on escalation, SIGKILL at reap) are not meant for it,
and it outlives the runner by one sweep. While the guardian lives in the
runner's session, the runner's pid (the session id) cannot be given to another
process, so signalling the runner's group by that number is safe even after
the runner has been reaped.

Child side: the standard library only, nothing heavy (every spawn pays for
each import).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
from typing import NamedTuple

#: How often the guardian records the runner's descendants that left its group.
#: A /proc scan of a hundred processes costs about a millisecond.
_SCAN_INTERVAL = 1.0
#: Rounds of "stop what is new, read the tree again" in a sweep; a tree that
#: still grows after this many is swept as far as it was read.
_FREEZE_ROUNDS = 4
_PS_TIMEOUT = 10.0

#: The pid of the short-lived process between the runner and its guardian,
#: until the runner has reaped it (None in any other process, or once reaped).
_launcher: int | None = None


class Proc(NamedTuple):
    """One row of the process table: what the sweep needs to know about a process."""

    ppid: int
    pgid: int
    #: When it started, in the platform's own terms: with the pid, its identity.
    start: str
    #: A zombie: it runs nothing and cannot be signalled.
    dead: bool


# -- the runner's side ------------------------------------------------------


def start(lifeline: int) -> bool:
    """Fork the guardian of this process, which must lead its own process group.

    Call it before any thread starts. Takes over ``lifeline`` (the read end of
    the supervisor's pipe): this process closes its copy. Returns False (with
    no guardian) if this process does not lead its group, whose id the
    guardian kills by, or if it cannot fork.
    """
    global _launcher
    runner = os.getpid()
    if os.getpgid(0) != runner:
        os.close(lifeline)
        return False
    runner_r, runner_w = os.pipe()  # close-on-exec: a program the runner execs does not hold it
    try:
        pid = os.fork()
    except OSError:
        for fd in (lifeline, runner_r, runner_w):
            os.close(fd)
        return False
    if pid == 0:
        # The launcher: forks the guardian and exits, so the guardian is reparented away.
        code = 1
        try:
            if os.fork() == 0:
                try:
                    os.close(runner_w)
                    _guard(lifeline, runner_r, runner)
                finally:
                    os._exit(0)
            code = 0
        finally:
            os._exit(code)
    _launcher = pid
    os.close(runner_r)
    os.close(lifeline)
    return True


def reap_launcher() -> None:
    """Reap the launcher (gone within a moment of :func:`start`); say so if it failed."""
    global _launcher
    pid, _launcher = _launcher, None
    if pid is None:
        return
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # runner code reaped it already (os.wait(), or SIGCHLD ignored)
        return
    if status != 0:
        print(
            "trio-runner: the guardian process could not be started; if the supervisor dies "
            "while this runner holds the GIL, the runner will not follow it",
            file=sys.stderr,
            flush=True,
        )


def kill_escaped_descendants() -> None:
    """SIGKILL this process's descendants that left its process group.

    The supervisor kills the group once the runner is reaped; those that left
    it are found only through their parent links, which break when this
    process exits, so the runner calls this on its way out.
    """
    reap_launcher()  # so that the guardian is no descendant of ours
    sweep(os.getpid(), os.getpgid(0), {}, kill_group=False)


# -- the guardian -----------------------------------------------------------


def _guard(lifeline: int, runner_pipe: int, runner: int) -> None:
    """The guardian's whole life: wait for either end-of-file, recording escapees meanwhile; then sweep."""
    os.setpgid(0, 0)
    _keep_only_fds(lifeline, runner_pipe)
    recorded: dict[int, str] = {}
    me = os.getpid()
    while not _readable(lifeline, runner_pipe, _SCAN_INTERVAL):
        table = process_table()
        if table is None:
            continue
        if not _alive(table, runner):
            # Its pipe is still open only because a process it forked holds a copy.
            break
        recorded = escaped(table, {runner, *recorded}, runner, recorded, exclude=me)
    sweep(runner, runner, recorded, kill_group=True)


def _readable(a: int, b: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for either fd; nobody writes to them, so readable means end-of-file."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(a, select.POLLIN)
        poller.register(b, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    readable, _, _ = select.select([a, b], [], [], timeout)
    return bool(readable)


def _alive(table: dict[int, Proc], pid: int) -> bool:
    proc = table.get(pid)
    if proc is not None:
        return not proc.dead
    # Missing from a table read a moment ago: ask the kernel rather than trust the read.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _keep_only_fds(*keep: int) -> None:
    """Close every fd but ``keep``, with /dev/null as stdio.

    Whatever the guardian holds stays open as long as it lives: the
    supervisor's stdio pipes (the drain would wait), the parent's stdout (a
    ``communicate()`` on the parent would wait), multiprocessing's resource
    tracker pipe (the tracker would live on).
    """
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != null:
            os.dup2(null, fd)
    wanted = {0, 1, 2, *keep}
    try:
        open_fds = [int(name) for name in os.listdir("/dev/fd")]
    except OSError:  # no /dev/fd: every fd up to the limit
        first = 3
        for fd in sorted(wanted - {0, 1, 2}):
            os.closerange(first, fd)
            first = fd + 1
        os.closerange(first, os.sysconf("SC_OPEN_MAX"))
        return
    for fd in open_fds:
        if fd not in wanted:
            with contextlib.suppress(OSError):  # the fd listdir used, closed by now
                os.close(fd)


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
        try:
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY)
            try:
                data = os.read(fd, 4096)
            finally:
                os.close(fd)
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid pgrp session ... starttime(22nd)"; comm may hold spaces and parentheses.
        fields = data[data.rindex(b")") + 2 :].split()
        dead = fields[0] in (b"Z", b"X")
        table[int(name)] = Proc(int(fields[1]), int(fields[2]), fields[19].decode(), dead)
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
    table: dict[int, Proc], roots: set[int], group: int, known: dict[int, str], *, exclude: int
) -> dict[int, str]:
    """The live descendants of ``roots`` outside process group ``group``, with their start times.

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


def sweep(root: int, group: int, known: dict[int, str], *, kill_group: bool) -> None:
    """SIGKILL the descendants of ``root`` outside ``group`` (and the group, if ``kill_group``).

    Everything is stopped first and the tree read again until nothing new
    turns up: a stopped process neither forks nor exits, so no parent link
    breaks and no pid is freed for reuse between reading and killing.
    """
    me = os.getpid()
    if kill_group:
        _signal_group(group, signal.SIGSTOP)
    stopped: dict[int, str] = {}
    leaders: set[int] = set()
    for _ in range(_FREEZE_ROUNDS):
        table = process_table()
        if table is None:
            break
        found = escaped(table, {root, *known, *stopped}, group, {**known, **stopped}, exclude=me)
        new = [pid for pid in found if pid not in stopped]
        for pid in new:
            _signal(pid, signal.SIGSTOP)
            stopped[pid] = found[pid]
            if table[pid].pgid == pid:
                leaders.add(pid)
        if not new:
            break
    if kill_group:
        _signal_group(group, signal.SIGKILL)
    for pid in stopped:
        if pid in leaders:
            # Its group may hold processes that no parent link leads to any more.
            _signal_group(pid, signal.SIGKILL)
        else:
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
