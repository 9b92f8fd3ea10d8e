"""The orphan guard that works while the runner holds the GIL or is stopped: a guardian process.

The runner's own orphan check is a thread, so it cannot run while the
runner's main thread holds the GIL in native code, nor while the runner is
SIGSTOPped. The guardian is a tiny process the runner starts first thing,
with one job: when the supervisor is gone, the runner and everything it
started go too.

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

The one design decision: the guardian is a fresh interpreter
(``python -I -S``, running this file), started with ``posix_spawn``, not a
fork of the runner. A forked guardian shares the runner's pages, so every
page the runner writes afterwards is copied: measured, that added 5-10 ms of
the runner's CPU to each restart, against the couple of milliseconds allowed.
``posix_spawn`` costs the runner a fraction of a millisecond; the guardian's
own start (10-15 ms of CPU, with nothing imported but ``os``, ``sys`` and
``select``) runs beside it, at the lowest CPU priority. The spawned process
forks once and exits, so the guardian is reparented away at once and the
runner never has a child of ours to trip over in ``os.wait()``. The guardian stays in the runner's session but
leads a process group of its own: the supervisor's signals to the runner's
group (SIGTERM on escalation, SIGKILL at reap) are not meant for it, and it
outlives the runner by one sweep. While it lives in the runner's session, the
runner's pid (the session id) cannot be given to another process, so
signalling the runner's group by that number is safe even after the runner
has been reaped.

Child side: the standard library only, and at import only ``os``, ``sys``
and ``select`` (every import here costs the guardian's start).
"""

from __future__ import annotations

import os
import select
import sys

#: How often the guardian records the runner's descendants that left its group.
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

#: The pid of the short-lived process between the runner and its guardian,
#: until the runner has reaped it (None in any other process, or once reaped).
#: While it lives, the guardian is its child, so a descendant of the runner's.
_launcher: int | None = None


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


# -- the runner's side ------------------------------------------------------


def start(lifeline: int) -> bool:
    """Start the guardian of this process, which must lead its own process group.

    Takes over ``lifeline`` (the read end of the supervisor's pipe): this
    process closes its copy. Returns False (with no guardian) if this process
    does not lead its group, whose id the guardian kills by, or if the
    guardian cannot be started. The process in between is reaped by a thread,
    so the runner's start never waits for it.
    """
    global _launcher
    runner = os.getpid()
    # The write end stays open, unused, as long as this process lives; it is
    # close-on-exec, so a program the runner runs does not hold it.
    runner_r, runner_w = os.pipe()
    pid: int | None = None
    try:
        if os.getpgid(0) == runner and sys.executable:
            # Exactly these fds, at their own numbers, and /dev/null as stdio:
            # whatever the guardian held would stay open as long as it lives (the
            # supervisor's stdio pipes and control socket, the resource tracker's pipe).
            actions: list[tuple[object, ...]] = [
                (os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)
            ]
            actions += [
                (os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd not in (lifeline, runner_r)
            ]
            os.set_inheritable(lifeline, True)
            os.set_inheritable(runner_r, True)
            code = (
                f"import sys; sys.path.append({os.path.dirname(os.path.abspath(__file__))!r}); "
                "import _guardian; _guardian.main(sys.argv[1:])"
            )
            argv = [sys.executable, "-I", "-S", "-c", code, str(lifeline), str(runner_r), str(runner)]
            try:
                pid = os.posix_spawn(sys.executable, argv, os.environ, file_actions=actions)
            except OSError:  # out of processes or memory, or no interpreter to run
                pid = None
            else:
                _lower_priority(pid)
    finally:
        os.close(runner_r)
        os.close(lifeline)
        if pid is None:
            os.close(runner_w)
    if pid is None:
        return False
    _launcher = pid
    import threading  # loaded in the runner already; here it would cost the guardian

    threading.Thread(
        target=_reap_launcher, args=(pid,), name="trio-runner-guardian-reaper", daemon=True
    ).start()
    return True


def _lower_priority(pid: int) -> None:
    """Give the guardian the lowest CPU priority, for good.

    Its start (an interpreter's, about 10 ms of CPU) would otherwise compete
    with the start of the runner and the supervisor's work on it, which is all
    a restart waits for. What it does later is small enough (a millisecond a
    second, and the sweep) to get done at any priority.
    """
    try:  # noqa: SIM105 (contextlib: one import less for the guardian)
        os.setpriority(os.PRIO_PROCESS, pid, _NICEST)
    except OSError:  # gone already (it failed), or a platform that forbids it
        pass


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


def _reap_launcher(pid: int) -> None:
    """Reap the launcher (gone within a moment of :func:`start`); say so if it failed."""
    global _launcher
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # runner code reaped it already (os.wait(), or SIGCHLD ignored)
        status = 0
    _launcher = None
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
    launcher = _launcher  # the guardian is its child until it exits: not to be swept
    sweep(os.getpid(), os.getpgid(0), {}, kill_group=False, spare=launcher)


# -- the guardian -----------------------------------------------------------


def main(argv: list[str]) -> None:
    """The launcher's entry point (``python -I -S -c ...``): fork the guardian, and exit."""
    lifeline, runner_pipe, runner = (int(arg) for arg in argv)
    if os.fork() != 0:
        os._exit(0)  # reaped by the runner; the guardian is reparented away
    try:
        os.setpgid(0, 0)
        _guard(lifeline, runner_pipe, runner)
    finally:
        os._exit(0)


def _guard(lifeline: int, runner_pipe: int, runner: int) -> None:
    """The guardian's whole life: wait for either end-of-file, recording escapees meanwhile; then sweep."""
    recorded: dict[int, str] = {}
    me = os.getpid()
    runner_died = False
    while not runner_died:
        if _readable((lifeline, runner_pipe), _SCAN_INTERVAL):
            runner_died = _readable((runner_pipe,), 0)
            if not runner_died:
                break  # the supervisor is gone
            continue
        table = process_table()
        if table is None:
            continue
        # Dead with its pipe still open: a process it forked holds a copy.
        runner_died = not _alive(table, runner)
        if not runner_died:
            recorded = escaped(table, {runner, *recorded}, runner, recorded, exclude=me)
    if runner_died and not recorded:
        # Nothing is known outside the group, and the dead runner's parent links
        # lead nowhere: no tree to read. Its group goes (the supervisor kills it
        # too, if it lives), without a scan that would compete with the start
        # of the runner's successor.
        _signal_group(runner, _SIGKILL)
        return
    sweep(runner, runner, recorded, kill_group=True, spare=me)


def _readable(fds: tuple[int, ...], timeout: float) -> bool:
    """Wait up to ``timeout`` for any of ``fds``; nobody writes to them, so readable means end-of-file."""
    if hasattr(select, "poll"):
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    readable, _, _ = select.select(fds, [], [], timeout)
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


def sweep(root: int, group: int, known: dict[int, str], *, kill_group: bool, spare: int | None) -> None:
    """SIGKILL the descendants of ``root`` outside ``group`` (and the group, if ``kill_group``).

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
        found = escaped(table, {root, *known, *stopped}, group, {**known, **stopped}, exclude=spare)
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
