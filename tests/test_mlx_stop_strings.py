"""The MLX runner's stop strings, as a unit: ``StopScanner`` alone, with no model and no mlx.

The scanner keeps only the end of the generation that a match can still use.
These tests hold it to the obvious version that keeps the whole text (and is
quadratic over a long generation), token by token, on crafted and on drawn
inputs; and check that a long generation with stop strings stays fast.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_runner.mlx import Token
from trio_runner.mlx._batch_text import StopScanner


class _WholeTextScanner:
    """The scanner as it was: the whole generation in one string, grown by ``+=``."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.released = 0
        self.held: deque[Token] = deque()

    def push(self, text: str, token_id: int) -> tuple[list[Token], bool]:
        if not self.stops:
            return [Token(text, token_id)], False
        start = max(0, len(self.text) - self.longest + 1)
        self.text += text
        self.held.append(Token(text, token_id))
        hits = [i for i in (self.text.find(stop, start) for stop in self.stops) if i >= 0]
        if hits:
            return self._release(min(hits), cut=True), True
        return self._release(len(self.text) - self._partial_match()), False

    def flush(self) -> list[Token]:
        return self._release(len(self.text))

    def _partial_match(self) -> int:
        tail = self.text[-self.longest :]
        for size in range(min(len(tail), self.longest - 1), 0, -1):
            if any(stop.startswith(tail[-size:]) for stop in self.stops):
                return size
        return 0

    def _release(self, end: int, cut: bool = False) -> list[Token]:
        out: list[Token] = []
        while self.held and self.released + len(self.held[0].text) <= end:
            token = self.held.popleft()
            self.released += len(token.text)
            out.append(token)
        if cut and self.held and self.released < end:
            token = self.held.popleft()
            out.append(Token(token.text[: end - self.released], token.token_id))
            self.released = end
        return out


def _steps(scanner: StopScanner | _WholeTextScanner, pieces: Sequence[str]) -> list[object]:
    """What the runner does with ``pieces``: each push's output, then the flush unless a stop cut it."""
    steps: list[object] = []
    for token_id, piece in enumerate(pieces):
        ready, cut = scanner.push(piece, token_id)
        steps.append((ready, cut))
        if cut:
            return steps
    steps.append(scanner.flush())
    return steps


def _same_as_whole_text(stops: Sequence[str], pieces: Sequence[str]) -> None:
    assert _steps(StopScanner(stops), pieces) == _steps(_WholeTextScanner(stops), pieces)


@pytest.mark.parametrize(
    ("stops", "pieces"),
    [
        pytest.param(["lo Wo"], ["Hel", "lo W", "orld"], id="split-across-tokens"),
        pytest.param(["Hello"], ["Hello", " world"], id="at-the-start"),
        pytest.param(["ll"], ["Hello"], id="inside-one-token"),
        pytest.param(["ab", "b"], ["xa", "b", "c"], id="overlapping-stops"),
        pytest.param(["ab"], ["a", "a", "a", "b"], id="partial-match-restarts"),
        pytest.param(["<|end|>", "\n\n"], ["x" * 50, "<|", "en", "d", "|>", "y"], id="long-then-stop"),
        pytest.param(["<|end|>"], ["<|", "e", "x", "<|en", "d|>"], id="false-start-then-stop"),
        pytest.param(["abc"], ["", "a", "", "b", "", "c"], id="empty-tokens"),
        pytest.param(["abc"], ["ab"], id="held-at-the-end-then-flushed"),
        pytest.param(["xyz"], ["a" * 1000 + "xy", "z"], id="long-token-then-stop"),
        pytest.param(["abcd", "d"], ["ab", "c", "zd"], id="shorter-stop-wins-later"),
        pytest.param([], ["a", "b"], id="no-stops"),
    ],
)
def test_stops_cut_exactly_where_the_whole_text_scanner_does(stops: list[str], pieces: list[str]) -> None:
    _same_as_whole_text(stops, pieces)


def test_a_stop_after_a_long_generation_is_found_and_cut_before_it() -> None:
    pieces = ["ab"] * 5000 + ["<|e", "nd|>tail"]
    steps = _steps(StopScanner(["<|end|>"]), pieces)
    emitted = "".join(token.text for ready, _ in steps[:-1] for token in ready)  # type: ignore[misc]
    last_ready, cut = steps[-1]  # type: ignore[misc]
    assert cut is True
    assert emitted + "".join(token.text for token in last_ready) == "ab" * 5000
    _same_as_whole_text(["<|end|>"], pieces)


@given(
    stops=st.lists(st.text("ab<", min_size=1, max_size=4), max_size=3),
    pieces=st.lists(st.text("ab<", max_size=5), max_size=30),
)
def test_drawn_generations_cut_exactly_where_the_whole_text_scanner_does(
    stops: list[str], pieces: list[str]
) -> None:
    _same_as_whole_text(stops, pieces)


def test_a_long_generation_with_stop_strings_is_linear() -> None:
    # 5 MB of text in 50,000 tokens, each ending in the first character of a
    # stop string (so it is held, then released): the whole-text scanner copies
    # the text on every token (about a minute here), this one a few hundred
    # characters. The bound only catches the quadratic version.
    scanner = StopScanner(["<|end|>", "\n\nUser:"])
    piece = "x" * 99 + "<"
    began = time.perf_counter()
    released = 0
    for token_id in range(50_000):
        ready, cut = scanner.push(piece, token_id)
        assert not cut
        released += len(ready)
    released += len(scanner.flush())
    assert time.perf_counter() - began < 10.0
    assert released == 50_000
    assert len(scanner.text) < 1000
