"""The child's reader thread: whatever ends it, the runner does not live on without it.

The reader thread carries cancels, credits and the parent's end-of-file (the
orphan check). A bug that killed it used to leave a runner that never saw
another task, cancel or credit, and outlived its parent; a frame it could not
read made the runner SIGKILL its own group, reported as a signal nobody sent.
Real child processes throughout.
"""

from __future__ import annotations

import pickle

import trio

from trio_runner import Exited, ExitReason, ExitRecord, RestartPolicy, open_supervisor
from trio_runner import _protocol as proto

from .payload_runners import PayloadRunner

FAST = RestartPolicy(initial_delay=0.05, max_delay=0.2)


async def _next_exit(changes: object) -> Exited:
    async for change in changes:  # type: ignore[attr-defined]
        if isinstance(change, Exited):
            return change
    raise AssertionError("the supervisor stopped without an exit")


async def test_a_bug_in_the_reader_thread_ends_the_runner_with_its_traceback_and_it_restarts() -> None:
    async with open_supervisor(PayloadRunner, policy=FAST) as sup:
        changes = sup.watch()
        with trio.fail_after(30):
            assert await sup.run(("break_reader",)) == "broken"
            # The next message the reader gets raises in it: this task's. The
            # runner never started the task, so the next runner serves it.
            assert await sup.run(("echo", "delivered again")) == "delivered again"
            record = (await _next_exit(changes)).exit
            assert record.reason is ExitReason.ERROR_EXIT
            assert record.signal is None
            assert "InjectedReaderBug: injected reader bug" in record.describe()
            assert record.remote_traceback is not None
            assert "injected reader bug" in record.remote_traceback
            assert await sup.run(("echo", "restarted")) == "restarted"
        assert sup.statistics().incarnation == 2


async def _exit_after_sending(data: bytes) -> ExitRecord:
    """Write ``data`` to a ready runner's control socket, as a parent bug would: the exit
    it causes (and the runner is restarted)."""
    async with open_supervisor(PayloadRunner, policy=FAST) as sup:
        changes = sup.watch()
        with trio.fail_after(30):
            await sup.wait_ready()
            inc = sup._inc  # pyright: ignore[reportPrivateUsage]
            assert inc is not None
            await inc.worker.send_all(data)
            record = (await _next_exit(changes)).exit
            assert await sup.run(("echo", "restarted")) == "restarted"
    return record


async def test_a_frame_the_child_cannot_read_is_a_protocol_error_not_a_signal() -> None:
    # A header longer than the child's max_frame_size.
    record = await _exit_after_sending(proto.HEADER.pack(proto.DEFAULT_MAX_FRAME + 1))
    assert record.reason is ExitReason.PROTOCOL_ERROR
    assert record.signal is None
    assert record.exitcode == proto.EXIT_PROTOCOL_ERROR
    assert "could not read a frame from the supervisor" in record.detail
    assert "exceeds the maximum" in record.detail


async def test_a_malformed_message_from_the_parent_is_a_protocol_error_not_a_reader_bug() -> None:
    # A frame that unpickles, holding a Credit without its count.
    credit = pickle.loads(proto.encode([proto.Credit(1, 64)])[proto.HEADER.size :])[0]
    body = pickle.dumps([credit[:2]], protocol=proto.PICKLE_PROTOCOL)
    record = await _exit_after_sending(proto.HEADER.pack(len(body)) + body)
    assert record.reason is ExitReason.PROTOCOL_ERROR
    assert record.exitcode == proto.EXIT_PROTOCOL_ERROR
    assert "malformed message" in record.detail
