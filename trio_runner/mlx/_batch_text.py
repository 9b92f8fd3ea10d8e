"""What one choice of a generation turns into: :class:`Token` events, cut at stop strings.

Shared by the single-stream path and the batched one, so a token is built,
given its log-probabilities and held back for stop strings the same way in
both. No mlx import at module level: the arrays it reads come from the caller.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ._types import Choice, FinishReason, Token, TopLogprob


class StopScanner:
    """Holds back tokens that might begin a stop string, and cuts the text where one appears.

    Without stop strings every token passes straight through. Linear in the
    length of the generation: it keeps only the end of the text a match can
    still use (the held tokens, and the ``longest - 1`` characters before the
    newest token, where a stop string that ends in it may begin).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # the end of everything generated so far: see ``_trim``
        self.base = 0  # where ``text`` starts in the whole generation
        self.released = 0  # characters of the whole generation already released
        self.held: deque[Token] = deque()

    def push(self, text: str, token_id: int, token: Token | None = None) -> tuple[list[Token], bool]:
        """The tokens now safe to emit, and whether a stop string ended generation.

        ``token`` is the event to hold for this text (with its log-probabilities);
        by default a plain ``Token(text, token_id)``.
        """
        token = Token(text, token_id) if token is None else token
        if not self.stops:
            return [token], False
        # A new match must end in the new text, so it starts no earlier than this.
        start = max(0, self.base + len(self.text) - self.longest + 1)
        self.text += text
        self.held.append(token)
        hits = [i for i in (self.text.find(stop, start - self.base) for stop in self.stops) if i >= 0]
        if hits:
            return self._release(self.base + min(hits), cut=True), True
        ready = self._release(self.base + len(self.text) - self._partial_match())
        self._trim()
        return ready, False

    def flush(self) -> list[Token]:
        return self._release(self.base + len(self.text))

    def _partial_match(self) -> int:
        """The length of the longest end of ``text`` that begins some stop string."""
        tail = self.text[-self.longest :]
        for size in range(min(len(tail), self.longest - 1), 0, -1):
            suffix = tail[-size:]
            if any(stop.startswith(suffix) for stop in self.stops):
                return size
        return 0

    def _trim(self) -> None:
        """Drop the text no later match or release needs, so each push costs what it keeps."""
        end = self.base + len(self.text)
        keep_from = min(self.released, end - self.longest + 1)
        if keep_from > self.base:
            self.text = self.text[keep_from - self.base :]
            self.base = keep_from

    def _release(self, end: int, cut: bool = False) -> list[Token]:
        out: list[Token] = []
        while self.held and self.released + len(self.held[0].text) <= end:
            token = self.held.popleft()
            self.released += len(token.text)
            out.append(token)
        if cut and self.held and self.released < end:
            # The token that runs into the stop string keeps only the text before it.
            token = self.held.popleft()
            out.append(
                Token(
                    token.text[: end - self.released],
                    token.token_id,
                    token.logprob,
                    token.top_logprobs,
                    token.index,
                )
            )
            self.released = end
        return out


class ChoiceText:
    """One choice of one request: its stop scanner, its log-probabilities, what it has emitted.

    Args:
        index: the choice's number (:attr:`Token.index`).
        stops: the request's stop strings.
        top_n: the request's ``logprobs`` (``None``: none reported).
        piece: decodes one token id on its own, for the top alternatives.
    """

    def __init__(
        self, index: int, stops: Sequence[str], top_n: int | None, piece: Callable[[int], str]
    ) -> None:
        self.index = index
        self.scanner = StopScanner(stops)
        self.top_n = top_n
        self.piece = piece
        self.pieces: list[str] = []
        self.finish: FinishReason = "length"
        self.ended = False

    def push(self, text: str, token_id: int, logprobs: Any) -> tuple[list[Token], bool]:
        """The tokens of ``text`` now safe to emit, and whether a stop string ended the choice.

        ``logprobs`` is the step's vector of log-probabilities over the
        vocabulary (an ``mx.array``), read only if the request asked for them.
        """
        logprob: float | None = None
        top: tuple[TopLogprob, ...] = ()
        if self.top_n is not None:
            logprob, top = self._logprobs(token_id, logprobs)
        token = Token(text, token_id, logprob, top, self.index)
        ready, cut = self.scanner.push(text, token_id, token)
        self.pieces.extend(t.text for t in ready)
        if cut:
            self.finish = "stop"
            self.ended = True
        return ready, cut

    def flush(self) -> list[Token]:
        """The held tokens, when the choice ends without a stop string."""
        ready = self.scanner.flush()
        self.pieces.extend(t.text for t in ready)
        self.ended = True
        return ready

    def choice(self) -> Choice:
        return Choice(self.index, "".join(self.pieces), self.finish, len(self.pieces))

    def _logprobs(self, token_id: int, logprobs: Any) -> tuple[float, tuple[TopLogprob, ...]]:
        import mlx.core as mx

        chosen = float(logprobs[token_id].item())
        top_n = self.top_n or 0
        if top_n <= 0:
            return chosen, ()
        top_n = min(top_n, int(logprobs.shape[-1]))
        ids: list[int] = mx.argpartition(-logprobs, kth=top_n - 1)[:top_n].tolist()  # pyright: ignore[reportAssignmentType]
        values: list[float] = logprobs[mx.array(ids)].tolist()  # pyright: ignore[reportAssignmentType]
        ranked = sorted(zip(ids, values, strict=True), key=lambda pair: -pair[1])
        return chosen, tuple((i, self.piece(i), v) for i, v in ranked)
