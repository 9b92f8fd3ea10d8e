"""The supervisor's state and its lifecycle log: what happened to the runner, for whoever watches.

:class:`Lifecycle` holds the current :class:`RunnerState` (with an event for
those who wait for it to change) and the last changes (:class:`Spawned`,
:class:`Ready`, :class:`Exited` ...), which it hands to every
:class:`Watcher` from :meth:`Supervisor.watch`.
"""

from __future__ import annotations

import weakref
from collections import deque

import trio

from ._state import LifecycleChange, RunnerState, Stopped

#: Changes kept for ``watch(replay=True)``, and the most a watcher falls behind before it loses the oldest.
WATCH_BUFFER = 1024


class Watcher:
    """An async iterator over lifecycle changes, from :meth:`Supervisor.watch`."""

    def __init__(self) -> None:
        self._changes: deque[LifecycleChange] = deque(maxlen=WATCH_BUFFER)
        self._wake = trio.Event()
        self._finished = False

    def push(self, change: LifecycleChange) -> None:
        self._changes.append(change)
        self._wake.set()

    def __aiter__(self) -> Watcher:
        return self

    async def __anext__(self) -> LifecycleChange:
        while not self._changes:
            if self._finished:
                raise StopAsyncIteration
            await self._wake.wait()
            self._wake = trio.Event()
        change = self._changes.popleft()
        if isinstance(change, Stopped):
            self._finished = True
        await trio.lowlevel.checkpoint()
        return change


class Lifecycle:
    """The state, the event that marks its changes, and the log of lifecycle changes with its watchers.

    Attributes:
        state: the current :class:`RunnerState`; change it with :meth:`set_state`.
    """

    __slots__ = ("_changed", "_history", "_watchers", "state")

    def __init__(self) -> None:
        self.state = RunnerState.STARTING
        self._changed = trio.Event()
        self._history: deque[LifecycleChange] = deque(maxlen=WATCH_BUFFER)
        self._watchers: weakref.WeakSet[Watcher] = weakref.WeakSet()

    def set_state(self, state: RunnerState) -> None:
        if self.state is not state:
            self.state = state
            self._changed.set()
            self._changed = trio.Event()

    async def wait_state_change(self) -> None:
        await self._changed.wait()

    def emit(self, change: LifecycleChange) -> None:
        """Log ``change`` and hand it to every watcher; after :class:`Stopped`, the watchers are done."""
        self._history.append(change)
        for watcher in list(self._watchers):
            watcher.push(change)
        if isinstance(change, Stopped):
            self._watchers.clear()

    def watch(self, *, replay: bool) -> Watcher:
        """A new watcher: of the changes from now on, after those retained so far if ``replay``."""
        watcher = Watcher()
        history = self._history
        if replay:
            for change in history:
                watcher.push(change)
        if history and isinstance(history[-1], Stopped):
            if not replay:
                watcher.push(history[-1])  # nothing more will happen: end at once
        else:
            self._watchers.add(watcher)
        return watcher
