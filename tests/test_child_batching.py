"""The child's outgoing batching, driven directly: a ``Child`` on a socketpair in this process.

Deterministic where the process tests cannot be: emits interleave exactly as
written here, and the far end of the socket sees every frame.
"""

from __future__ import annotations

import pickle
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from trio_runner import _protocol as proto
from trio_runner._child import Child
from trio_runner._outbox import TaskSlot
from trio_runner._runner import TaskContext


@contextmanager
def _child(linger: float) -> Iterator[tuple[Child, socket.socket]]:
    ours, theirs = socket.socketpair()
    child = Child(theirs, max_frame=1 << 20, heartbeat_interval=60.0, incarnation=1)
    child.outbox.linger = linger
    child.outbox.writer.start()
    try:
        yield child, ours
    finally:
        child.outbox.close(5.0)
        ours.close()
        theirs.close()


def _context(child: Child, task_id: int, window: int = 10_000) -> TaskContext[int]:
    """A task's context, as the child makes one for ``handle()``."""
    slot = TaskSlot(task_id, None, window)
    child.slots[task_id] = slot
    return TaskContext(slot, child.outbox)


def _events_within(sock: socket.socket, count: int, seconds: float) -> list[tuple[float, int, list[Any]]]:
    """(arrival, task id, events) for each EVENTS message, until ``count`` events or ``seconds`` pass."""
    reader = proto.FrameReader(1 << 20)
    began = time.monotonic()
    seen: list[tuple[float, int, list[Any]]] = []
    total = 0
    sock.settimeout(0.05)
    while total < count and time.monotonic() - began < seconds:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        for batch in reader.feed(data):
            for wire in batch:
                match proto.check_from_child(wire):
                    case proto.Events(task_id, payload):
                        events = pickle.loads(payload)
                        seen.append((time.monotonic() - began, task_id, events))
                        total += len(events)
                    case _:
                        pass
    return seen


def test_interleaved_tasks_that_emit_fast_are_sent_without_waiting_out_the_linger() -> None:
    # Two tasks alternate event by event, so no one task's message grows big:
    # the total queued must hurry the writer, or every batch waits 5 s.
    with _child(linger=5.0) as (child, sock), ThreadPoolExecutor(1) as pool:
        reading = pool.submit(_events_within, sock, 1000, 10.0)
        a = _context(child, 1)
        b = _context(child, 2)
        for i in range(500):
            a.emit(i)
            b.emit(i)
        seen = reading.result()
    assert sum(len(events) for _, _, events in seen) == 1000
    assert seen[-1][0] < 2.5  # far below the 5 s linger
    # In order, per task.
    for task_id in (1, 2):
        assert [e for _, t, events in seen if t == task_id for e in events] == list(range(500))


def test_a_slow_trickle_lingers_and_goes_out_in_batches() -> None:
    with _child(linger=1.0) as (child, sock), ThreadPoolExecutor(1) as pool:
        reading = pool.submit(_events_within, sock, 10, 10.0)
        ctx = _context(child, 1)
        for i in range(10):
            ctx.emit(i)
            time.sleep(0.1)  # 10 events/s: 10 per linger
        seen = reading.result()
    assert [e for _, _, events in seen for e in events] == list(range(10))
    assert len(seen[0][2]) == 1  # the first event goes out alone, at once
    assert seen[0][0] < 0.5  # not held for the 1 s linger
    # 10 events over 1 s with a 1 s linger: a few frames, not 10.
    assert len(seen) <= 5


def test_an_emit_never_waits_for_another_tasks_lock() -> None:
    # A thread mid-emit for task 1 (holding its slot's lock, say descheduled
    # there) must not hold up task 2: emitting threads share no lock.
    with _child(linger=0.0) as (child, sock), ThreadPoolExecutor(1) as pool:
        reading = pool.submit(_events_within, sock, 3, 10.0)
        _context(child, 1)
        other = _context(child, 2)
        emitted = threading.Event()

        def emit_three() -> None:
            for i in range(3):
                other.emit(i)
            emitted.set()

        with child.slots[1].lock:
            thread = threading.Thread(target=emit_three)
            thread.start()
            assert emitted.wait(10.0), "task 2's emit waited for task 1's lock"
        thread.join()
        seen = reading.result()
    assert [e for _, t, events in seen if t == 2 for e in events] == [0, 1, 2]
