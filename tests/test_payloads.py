"""Payloads and frames: size limits both ways, ``max_frame_size`` validation, big payloads.

Real child processes, except for the encoder's own unit tests. Every frame
either side writes stays within ``max_frame_size``, counting each message's
overhead, however many tiny messages a batch holds; and the smallest allowed
``max_frame_size`` still carries a result that fills it.
"""

from __future__ import annotations

import contextlib
import gc
import math
import pickle
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trio_runner import RestartPolicy, TaskFailed, _payloads, _pieces, open_supervisor
from trio_runner import _protocol as proto
from trio_runner.testing import monitor_lateness

from .payload_runners import PayloadRunner, blob

FAST = RestartPolicy(initial_delay=0.05, max_delay=0.2)


def _frames(data: bytes, max_frame: int) -> list[list[Any]]:
    """Decode ``data`` frame by frame, checking each against ``max_frame``."""
    reader = proto.FrameReader(max_frame)
    batches = list(reader.feed(data))
    _assert_nothing_left(reader)
    return batches


def _assert_nothing_left(reader: proto.FrameReader) -> None:
    """No part of a frame is left over: the next frame, fed alone, comes out whole and alone."""
    after = [
        [proto.check_from_child(wire) for wire in batch]
        for batch in reader.feed(proto.encode([proto.Heartbeat()]))
    ]
    assert after == [[proto.Heartbeat()]]


def _parsed(batches: list[list[Any]]) -> list[tuple[type[Any], Any]]:
    """Each message in ``batches``, parsed, with its type (typed messages of equal fields compare equal)."""
    parsed: list[tuple[type[Any], Any]] = []
    for batch in batches:
        for wire in batch:
            try:
                message: Any = proto.check_from_parent(wire)
            except proto.FrameError:
                message = proto.check_from_child(wire)
            parsed.append((type(message), message))
    return parsed


def _typed(messages: list[Any]) -> list[tuple[type[Any], Any]]:
    return [(type(message), message) for message in messages]


# -- the encoder ---------------------------------------------------------------------


@given(
    messages=st.lists(
        st.one_of(
            st.builds(proto.Cancel, st.integers(0, 2**62)),
            st.builds(proto.Credit, st.integers(0, 2**62), st.integers(0, 2**31)),
            st.builds(proto.Task, st.integers(0, 2**62), st.binary(max_size=3000), st.just(8192)),
            st.builds(
                proto.Error, st.integers(0, 9), st.text(max_size=20), st.text(max_size=2000), st.just("")
            ),
        ),
        max_size=400,
    ),
    max_frame=st.integers(8 * 1024, 64 * 1024),
)
def test_encode_frames_keeps_every_frame_within_the_limit_and_the_messages_in_order(
    messages: list[Any], max_frame: int
) -> None:
    data = proto.encode_frames(messages, max_frame)
    batches = _frames(data, max_frame)
    assert _parsed(batches) == _typed(messages)


def test_encode_frames_splits_a_burst_of_twelve_thousand_cancels() -> None:
    messages = [proto.Cancel(task_id) for task_id in range(12_000)]
    batches = _frames(proto.encode_frames(messages, proto.MIN_FRAME_SIZE), proto.MIN_FRAME_SIZE)
    assert len(batches) > 1
    assert _parsed(batches) == _typed(messages)


def test_encode_frames_is_one_plain_frame_when_the_batch_fits() -> None:
    messages = [proto.Cancel(1), proto.Credit(2, 64)]
    assert proto.encode_frames(messages, proto.MIN_FRAME_SIZE) == proto.encode(messages)


def test_encode_frames_refuses_a_single_message_larger_than_a_frame() -> None:
    with pytest.raises(proto.FrameError, match="more than the frame limit"):
        proto.encode_frames([proto.Task(1, b"x" * proto.MIN_FRAME_SIZE, 8)], proto.MIN_FRAME_SIZE)


@pytest.mark.parametrize("size", [0, 1, 255, 65_535, 65_536, 1 << 20, 3 << 20])
def test_a_payload_within_message_overhead_of_the_limit_fits_a_frame(size: int) -> None:
    max_frame = size + proto.MESSAGE_OVERHEAD
    for message in [
        proto.Task(2**62, b"x" * size, 2**31),
        proto.Result(2**62, b"x" * size),
        proto.Events(2**62, b"x" * size),
    ]:
        _frames(proto.encode_frames([message], max_frame), max_frame)


@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=12),
    cuts=st.lists(st.integers(1, 5000), min_size=1, max_size=50),
)
def test_feed_big_hands_over_big_frames_whole_and_in_order_however_the_bytes_are_cut(
    sizes: list[int], cuts: list[int]
) -> None:
    big = 1000
    messages = [proto.Result(i, b"x" * size) for i, size in enumerate(sizes)]
    stream = b"".join(proto.encode([message]) for message in messages)
    reader = proto.FrameReader(proto.MIN_FRAME_SIZE)
    seen: list[Any] = []
    position, cut = 0, 0
    while position < len(stream):
        step = cuts[cut % len(cuts)]
        cut += 1
        for item in reader.feed_big(stream[position : position + step], big):
            if isinstance(item, proto.BigFrame):
                body = b"".join(bytes(part) for part in item.parts)
                assert len(body) >= big
                seen.extend(pickle.loads(body))
            else:
                seen.extend(item)
        position += step
    assert [proto.check_from_child(wire) for wire in seen] == messages
    _assert_nothing_left(reader)


def test_reads_of_exactly_one_frame_decode_like_any_other_and_keep_the_stream_in_step() -> None:
    # One whole frame per read is the round trip's read (decoded without the
    # buffer); around it come a frame split across reads, a big one and two in one read.
    big = 1000
    frames = [proto.encode([proto.Result(i, b"x" * size)]) for i, size in enumerate([1, 2, 5000, 3, 4, 5])]
    reads = [frames[0], frames[1][:3], frames[1][3:], frames[2], frames[3] + frames[4], frames[5]]
    reader = proto.FrameReader(proto.MIN_FRAME_SIZE)
    seen: list[Any] = []
    for read in reads:
        for item in reader.feed_big(read, big):
            if isinstance(item, proto.BigFrame):
                seen.extend(pickle.loads(b"".join(bytes(part) for part in item.parts)))
            else:
                seen.extend(item)
    assert [proto.check_from_child(wire) for wire in seen] == [
        proto.Result(i, b"x" * size) for i, size in enumerate([1, 2, 5000, 3, 4, 5])
    ]
    _assert_nothing_left(reader)


def test_a_read_shaped_like_a_whole_frame_is_still_the_rest_of_the_frame_before_it() -> None:
    # Pickle ignores bytes after its end, so a frame's body may end with bytes
    # that would be a whole frame alone: read after the frame's start, they are its rest.
    body = pickle.dumps([(proto.HEARTBEAT,)], protocol=proto.PICKLE_PROTOCOL)
    lookalike = proto.encode([proto.Result(1, b"x")])
    reader = proto.FrameReader(proto.MIN_FRAME_SIZE)
    assert list(reader.feed(proto.HEADER.pack(len(body) + len(lookalike)) + body)) == []
    batches = [[proto.check_from_child(wire) for wire in batch] for batch in reader.feed(lookalike)]
    assert batches == [[proto.Heartbeat()]]
    _assert_nothing_left(reader)
    # Likewise the rest of a big frame, kept read by read instead of buffered.
    big_body = pickle.dumps([(proto.RESULT, 2, b"y" * 2000)], protocol=proto.PICKLE_PROTOCOL)
    reader = proto.FrameReader(proto.MIN_FRAME_SIZE)
    assert list(reader.feed_big(proto.HEADER.pack(len(big_body) + len(lookalike)) + big_body, 1000)) == []
    items = list(reader.feed_big(lookalike, 1000))
    assert [type(item) for item in items] == [proto.BigFrame]
    assert not reader.in_big_frame


def test_a_read_of_exactly_one_oversize_or_corrupt_frame_is_a_frame_error() -> None:
    oversize = proto.encode([proto.Result(1, b"x" * proto.MIN_FRAME_SIZE)])
    with pytest.raises(proto.FrameError, match="exceeds the maximum"):
        list(proto.FrameReader(proto.MIN_FRAME_SIZE).feed(oversize))
    with pytest.raises(proto.FrameError, match="corrupt frame"):
        list(proto.FrameReader(proto.MIN_FRAME_SIZE).feed(proto.HEADER.pack(7) + b"garbage"))


def test_messages_built_as_wire_tuples_encode_and_parse_as_their_classes() -> None:
    # The hot path builds Task, Started and Result as wire tuples; the far end
    # must see exactly the typed message the class would have made.
    typed = [proto.Task(3, b"request", 16), proto.Started(3), proto.Result(3, b"result")]
    wire = [(proto.TASK, 3, b"request", 16), (proto.STARTED, 3), (proto.RESULT, 3, b"result")]
    data = proto.encode_wire(wire, proto.MIN_FRAME_SIZE)
    assert data == proto.encode_frames(typed, proto.MIN_FRAME_SIZE)
    assert _parsed(_frames(data, proto.MIN_FRAME_SIZE)) == _typed(typed)


def test_in_big_frame_is_true_exactly_while_a_big_frame_is_partly_received() -> None:
    big = 1000
    stream = proto.encode([proto.Result(1, b"x" * 5000)]) + proto.encode([proto.Heartbeat()])
    reader = proto.FrameReader(proto.MIN_FRAME_SIZE)
    assert not reader.in_big_frame
    assert list(reader.feed_big(stream[:100], big)) == []
    assert reader.in_big_frame
    assert list(reader.feed_big(stream[100:3000], big)) == []
    assert reader.in_big_frame
    items = list(reader.feed_big(stream[3000:], big))
    assert [type(item) for item in items] == [proto.BigFrame, list]
    assert not reader.in_big_frame


# -- max_frame_size validation (issue 11, finding 11) -------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e6, 65536.0, True, "65536", None])
def test_max_frame_size_must_be_an_int(value: Any) -> None:
    with pytest.raises(TypeError, match=r"max_frame_size=.* must be an int number of bytes"):
        open_supervisor(PayloadRunner, max_frame_size=value)


@pytest.mark.parametrize("value", [-1, 0, 1024, proto.MIN_FRAME_SIZE - 1, proto.MAX_FRAME_SIZE + 1])
def test_max_frame_size_must_be_within_the_documented_range(value: int) -> None:
    with pytest.raises(ValueError, match=r"must be between 65536 bytes .* and 4294967295"):
        open_supervisor(PayloadRunner, max_frame_size=value)


async def test_at_the_minimum_frame_size_a_result_that_fills_the_frame_comes_back_intact() -> None:
    largest = proto.MIN_FRAME_SIZE - proto.MESSAGE_OVERHEAD
    # bytes pickle with at most 20 bytes around them (protocol, frame, length, memo, stop)
    async with open_supervisor(PayloadRunner, max_frame_size=proto.MIN_FRAME_SIZE) as sup:
        with trio.fail_after(30):
            assert await sup.run(("bytes", largest - 20)) == blob(largest - 20)
            assert await sup.run(("echo", "small")) == "small"
            request = blob(largest - 40)
            assert len(pickle.dumps(("checksum", request), protocol=5)) <= largest
            assert (await sup.run(("checksum", request)))[0] == len(request)
            with pytest.raises(ValueError, match="raise max_frame_size"):
                await sup.run(("checksum", blob(largest)))
        assert sup.statistics().restarts == 0


# -- frames parent -> child are bounded too (finding 5) ---------------------------------


async def test_ten_thousand_tiny_queued_tasks_at_the_minimum_frame_size_all_succeed() -> None:
    # Queued before the runner is ready, so they go out together. An int below 256
    # pickles to 5 bytes: the per-message overhead is most of each message, and a
    # batch bounded by the requests' size alone came to twice the frame limit.
    results: list[int] = []
    async with open_supervisor(PayloadRunner, policy=FAST, max_frame_size=proto.MIN_FRAME_SIZE) as sup:

        async def one(i: int) -> None:
            results.append(await sup.run(i % 256))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(10_000):
                    nursery.start_soon(one, i)
        stats = sup.statistics()
        assert (stats.incarnation, stats.restarts) == (1, 0)
    assert sorted(results) == sorted(i % 256 for i in range(10_000))


async def test_a_burst_of_twelve_thousand_cancels_at_the_minimum_frame_size_leaves_the_runner_serving() -> (
    None
):
    async with open_supervisor(PayloadRunner, policy=FAST, max_frame_size=proto.MIN_FRAME_SIZE) as sup:
        with trio.fail_after(30):
            await sup.wait_ready()
            inc = sup._inc  # pyright: ignore[reportPrivateUsage]
            assert inc is not None
            control = sup._tasks.control_send  # pyright: ignore[reportPrivateUsage]
            # Cancels for tasks the runner does not know, all queued in one go:
            # the cancel channel sends them as one batch.
            for task_id in range(1_000_000, 1_012_000):
                control.send_nowait((proto.Cancel(task_id), inc.number))
            await trio.sleep(0.5)
            assert await sup.run(("echo", "still serving")) == "still serving"
        stats = sup.statistics()
        assert (stats.incarnation, stats.restarts) == (1, 0)


# -- big payloads do not stall the loop (finding 3) -------------------------------------

#: Generous, as the test rule asks: the fixed code stays under 0.1 s on a quiet
#: machine but reached 0.25 s beside another test suite, and the code before the
#: fix stalled 0.4-1 s for a 5M-int result, 2.8 s for a 5M-int event, 0.26-0.74 s
#: for a 60 MiB request. What proves the work left the trio thread is
#: test_big_payloads_are_unpickled_on_the_supervisors_own_threads; the goal
#: (+1 ms over idle) is held by the benchmark (bench_payload.py).
LATENESS_BOUND = 0.5


async def test_a_5m_int_result_arrives_intact_without_stalling_the_loop() -> None:
    async with open_supervisor(PayloadRunner) as sup:
        await sup.wait_ready()
        with trio.fail_after(60):
            async with monitor_lateness() as ticker:
                result = await sup.run(("ints", 5_000_000))
                worst = ticker.worst
        assert result == list(range(5_000_000))
        assert worst < LATENESS_BOUND


class _LongestStretch:
    """The longest CPU time a thread spent between two GIL releases of the payload code (``Pacer.tick``).

    Thread CPU time, so the machine's load does not inflate it, as it does a
    ticker's lateness. One C call that holds the GIL (a realloc copying a big
    block) shows as one long stretch.
    """

    def __init__(self) -> None:
        self.longest: dict[str, float] = {}
        self._last = threading.local()
        self._tick = _pieces.Pacer.tick

    def tick(self, pacer: _pieces.Pacer) -> None:
        self._tick(pacer)
        now = time.thread_time()
        last = getattr(self._last, "value", None)
        name = threading.current_thread().name
        if last is not None:
            self.longest[name] = max(self.longest.get(name, 0.0), now - last)
        self._last.value = now


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _raise_the_mmap_threshold() -> None:
    # glibc raises its mmap threshold to the size of a freed mapping (up to 32
    # MiB): from then on blocks below it come from the heap, and a list growing
    # past it is copied whole by realloc. An application does this by accident.
    block = bytes(30 << 20)
    del block


async def test_a_5m_int_list_result_is_unpickled_without_one_long_hold_of_the_gil(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The unpickler grew the list by realloc, one copy of up to 32 MiB holding
    # the GIL for 15-18 ms (measured); now the list is allocated once and filled
    # a run at a time (about 1 ms between two releases; 5 ms seen once under a
    # load of 10 on 2 cores). Thread CPU time does not grow with the machine's
    # load as wall time does.
    stretches = _LongestStretch()
    monkeypatch.setattr(_pieces.Pacer, "tick", lambda pacer: stretches.tick(pacer))  # pyright: ignore[reportUnknownLambdaType]
    _raise_the_mmap_threshold()
    async with open_supervisor(PayloadRunner) as sup:
        await sup.wait_ready()
        with trio.fail_after(60), quiet_gc():  # a collection walks the 5M items: the application's cost
            result = await sup.run(("ints", 5_000_000))
    assert type(result) is list
    assert result == list(range(5_000_000))
    main = threading.main_thread().name
    workers = {name: stretch for name, stretch in stretches.longest.items() if name != main}
    assert workers, "the result was not unpickled in a worker thread"
    assert max(workers.values()) < 0.010


def test_a_big_list_crosses_the_wire_in_runs_and_arrives_as_an_equal_list() -> None:
    value = [*range(_pieces.SPLIT_ITEMS - 1), "last"]
    data = pickle.dumps(_pieces.split_list(value), protocol=proto.PICKLE_PROTOCOL)
    assert b"join_list" in data
    loaded = pickle.loads(data)
    assert type(loaded) is list
    assert loaded == value


def test_a_list_below_the_split_size_and_other_values_pickle_as_they_are() -> None:
    for value in [list(range(_pieces.SPLIT_ITEMS - 1)), (1, 2), "text", None]:
        assert _pieces.split_list(value) is value


async def test_a_5m_int_event_arrives_intact_without_stalling_the_loop() -> None:
    async with open_supervisor(PayloadRunner) as sup:
        await sup.wait_ready()
        with trio.fail_after(60):
            async with monitor_lateness() as ticker, sup.stream(("emit_ints", 5_000_000)) as task:
                events = [event async for event in task]
                worst = ticker.worst
        assert events == [list(range(5_000_000))]
        assert worst < LATENESS_BOUND


async def test_a_50_mib_event_between_small_ones_arrives_intact_and_in_order_without_stalling_the_loop() -> (
    None
):
    size = 50 << 20
    async with open_supervisor(PayloadRunner) as sup:
        await sup.wait_ready()
        with trio.fail_after(60):
            async with monitor_lateness() as ticker, sup.stream(("emit_then_ints", size, 1_000_000)) as task:
                events = [event async for event in task]
                worst = ticker.worst
        assert [events[0], len(events[1]), events[2]] == ["first", size, "last"]
        assert events[1] == blob(size)
        assert task.result == list(range(1_000_000))
        assert worst < LATENESS_BOUND


@pytest.fixture
def freed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Each freeing of a payload's pieces: the thread's name and how many pieces."""
    calls: list[tuple[str, int]] = []
    free = _payloads._free  # pyright: ignore[reportPrivateUsage]

    def spy(pieces: list[bytes]) -> None:
        calls.append((threading.current_thread().name, len(pieces)))
        free(pieces)

    monkeypatch.setattr(_payloads, "_free", spy)
    return calls


async def test_a_50_mib_event_comes_in_pieces_freed_one_at_a_time_in_a_worker_thread(
    freed: list[tuple[str, int]],
) -> None:
    # Its pickle came as one 50 MiB bytes object, freed by the worker thread
    # in one call holding the GIL (about 5 ms, measured); the runner now sends
    # a big pickle in 1 MiB pieces, which the thread frees one at a time.
    size = 50 << 20
    async with open_supervisor(PayloadRunner) as sup:
        with trio.fail_after(60):
            async with sup.stream(("emit_blob", size)) as task:
                events = [event async for event in task]
    assert events == [blob(size)]
    assert threading.main_thread().name not in {name for name, _ in freed}
    assert [count for _, count in freed] == [51]  # 50 MiB and pickle's few bytes


async def test_a_60_mib_request_arrives_intact_without_stalling_the_loop() -> None:
    request = blob(60 << 20)
    async with open_supervisor(PayloadRunner) as sup:
        await sup.wait_ready()
        with trio.fail_after(60):
            async with monitor_lateness() as ticker:
                size, checksum = await sup.run(("checksum", request))
                worst = ticker.worst
            assert await sup.run(("echo", "small after big")) == "small after big"
        assert (size, checksum) == (len(request), zlib.crc32(request))
        assert worst < LATENESS_BOUND


class _LongestStep(trio.abc.Instrument):
    """The trio thread's longest task step in its own CPU time (the machine's load does not inflate it)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._started = time.thread_time()  # the step that adds the instrument

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.longest = max(self.longest, time.thread_time() - self._started)


async def test_a_60_mib_request_is_freed_off_the_loop_piece_by_piece(freed: list[tuple[str, int]]) -> None:
    # Its pickle was one 60 MiB bytes object, dropped on the loop when the
    # runner acknowledged the task: one free of 5-8 ms in a single loop step
    # (measured). Now it is held in 1 MiB pieces, freed in a worker thread.
    # The loop's longest step (its own CPU time) was 0.2-0.5 ms after the fix;
    # the bound is looser than the 5 ms before it, so the thread check is what
    # tells them apart on a loaded machine.
    request = blob(60 << 20)
    async with open_supervisor(PayloadRunner) as sup:
        await sup.wait_ready()
        await sup.run(("checksum", blob(2 << 20)))  # the thread path's first use
        steps = _LongestStep()
        trio.lowlevel.add_instrument(steps)
        try:
            with trio.fail_after(60):
                size, checksum = await sup.run(("checksum", request))
                await trio.sleep(0.2)  # the pieces are being freed
        finally:
            trio.lowlevel.remove_instrument(steps)
    assert (size, checksum) == (len(request), zlib.crc32(request))
    assert threading.main_thread().name not in {name for name, _ in freed}
    assert max(count for _, count in freed) == 61  # 60 MiB and pickle's few bytes, in 1 MiB pieces
    assert steps.longest < 0.010


async def test_a_60_mib_retry_request_is_delivered_whole_again_after_a_crash(tmp_path: Path) -> None:
    # Held in pieces until the task settles: the next runner gets the same bytes.
    request = blob(60 << 20)
    marker = str(tmp_path / "tried")
    async with open_supervisor(PayloadRunner, policy=FAST) as sup:
        with trio.fail_after(60):
            size, checksum = await sup.run(("checksum_crash_once", marker, request), retry=True)
        assert sup.statistics().restarts == 1
    assert (size, checksum) == (len(request), zlib.crc32(request))


async def test_a_request_that_pickles_to_the_limit_is_sent_though_pieces_would_not_fit() -> None:
    # In 1 MiB pieces its frame would pass the limit by their overhead (a few
    # hundred bytes at 64 MiB), and the supervisor broke on a FrameError.
    limit = proto.DEFAULT_MAX_FRAME - proto.MESSAGE_OVERHEAD
    around = len(pickle.dumps(("checksum", bytes(1 << 20)), protocol=proto.PICKLE_PROTOCOL)) - (1 << 20)
    data = blob(limit - around)
    assert len(pickle.dumps(("checksum", data), protocol=proto.PICKLE_PROTOCOL)) == limit
    async with open_supervisor(PayloadRunner) as sup:
        with trio.fail_after(60):
            assert await sup.run(("checksum", data)) == (len(data), zlib.crc32(data))
            assert await sup.run(("echo", "serving")) == "serving"


async def test_big_payloads_are_unpickled_on_the_supervisors_own_threads() -> None:
    # Not on the trio thread, and not on trio's default limiter.
    seen: list[str] = []
    original = _payloads._loads_chunked  # pyright: ignore[reportPrivateUsage]

    def spy(data: Any) -> Any:
        seen.append(threading.current_thread().name)
        return original(data)

    default = trio.to_thread.current_default_thread_limiter()
    tokens = default.total_tokens
    gate = threading.Event()
    async with open_supervisor(PayloadRunner) as sup:
        await sup.wait_ready()
        default.total_tokens = 1
        try:
            async with trio.open_nursery() as nursery:
                # Saturate trio's default limiter: big payloads must not wait for it.
                nursery.start_soon(trio.to_thread.run_sync, gate.wait)
                await trio.sleep(0.05)
                _payloads._loads_chunked = spy  # pyright: ignore[reportPrivateUsage]
                with trio.fail_after(30):
                    assert await sup.run(("bytes", 1 << 20)) == blob(1 << 20)
                gate.set()
        finally:
            gate.set()
            _payloads._loads_chunked = original  # pyright: ignore[reportPrivateUsage]
            default.total_tokens = tokens
    assert seen and threading.main_thread().name not in seen


async def test_a_big_result_the_parent_cannot_unpickle_fails_only_its_task() -> None:
    async with open_supervisor(PayloadRunner) as sup:
        with trio.fail_after(30):
            with pytest.raises(TaskFailed, match="could not unpickle the result"):
                await sup.run(("ints_with_unloadable", 100_000))
            assert await sup.run(("echo", "serving")) == "serving"
        assert sup.statistics().restarts == 0


async def test_a_big_request_that_cannot_be_pickled_raises_type_error() -> None:
    async with open_supervisor(PayloadRunner) as sup:
        with pytest.raises(TypeError, match="the request cannot be pickled"):
            await sup.run(("echo", [*range(100_000), threading.Lock()]))
        assert await sup.run(("echo", "serving")) == "serving"


async def test_a_big_result_is_handed_over_and_the_supervisor_keeps_no_reference_to_it() -> None:
    # Whatever the supervisor still holds when the application drops a big
    # value is freed later, on the loop (five million ints: 30-120 ms).
    async with open_supervisor(PayloadRunner) as sup:
        await sup.wait_ready()
        with trio.fail_after(60):
            result = await sup.run(("ints", 400_000))  # over _payloads.LARGE pickled: the thread path
            await trio.sleep(0.1)  # the forwarder is back waiting for the next read
        assert len(result) == 400_000
        assert sys.getrefcount(result) == 2  # ``result`` and getrefcount's argument


async def test_big_payloads_still_arrive_when_no_memory_mapping_can_be_had(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Reads go into anonymous mappings, which a process has a limited number of
    # (vm.max_map_count): without one, into heap memory.
    from trio_runner import _process

    def no_mapping(*args: object) -> object:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(_process.mmap, "mmap", no_mapping)
    async with open_supervisor(PayloadRunner) as sup:
        with trio.fail_after(60):
            assert await sup.run(("bytes", 3 << 20)) == blob(3 << 20)
            assert await sup.run(("echo", "small")) == "small"
