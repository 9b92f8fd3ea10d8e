"""The frame reader: a corrupt frame read together with a good one."""

from __future__ import annotations

import pytest


def test_a_corrupt_frame_behind_a_good_one_in_one_read_raises_frame_error() -> None:
    from trio_runner import _protocol as proto

    reader = proto.FrameReader(1 << 20)
    data = proto.encode([proto.Heartbeat()]) + proto.HEADER.pack(7) + b"garbage"
    batches = reader.feed(data)
    # Handed over before the error.
    assert [type(proto.check_from_child(wire)) for wire in next(batches)] == [proto.Heartbeat]
    with pytest.raises(proto.FrameError):
        next(batches)
