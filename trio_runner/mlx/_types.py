"""The MLX runner's messages: the :class:`Generate` request, :class:`Token` events, the :class:`Completion`.

Plain frozen dataclasses with no third-party imports: the parent builds and
validates them without importing mlx, and the child unpickles them cheaply.
Validation happens at construction, so a bad request raises ``ValueError``
where it is written, before anything reaches the runner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

FinishReason = Literal["stop", "length"]
_ROLES = frozenset({"system", "user", "assistant", "tool"})


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return float(value)


@dataclass(frozen=True, slots=True)
class Generate:
    """A request for :class:`MlxLmRunner`: generate text from a prompt or chat messages.

    Args:
        prompt: plain text, tokenized as is. Give exactly one of ``prompt`` and ``messages``.
        messages: chat messages, ``{"role": ..., "content": ...}`` mappings, rendered
            through the tokenizer's chat template with a generation prompt.
        max_tokens: the most tokens to generate (>= 1). Generation also stops at
            the model's context length, with ``finish_reason="length"``.
        temperature: 0 (the default) picks the most likely token; higher samples.
        top_p: nucleus sampling, in (0, 1]; 1 disables it. Used only when sampling.
        stop: strings that end generation with ``finish_reason="stop"``; the stop
            string itself is not part of the text. A single string is accepted.
        seed: makes sampling reproducible: the same request with the same seed
            gives the same text. ``None`` draws from the runner's random state.

    Raises:
        ValueError: an invalid field, with a sentence that says how to fix it.
    """

    prompt: str | None = None
    messages: Sequence[Mapping[str, str]] | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = field(default=())
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt= (a string) and messages= (chat messages)")
        if self.prompt is not None and not isinstance(self.prompt, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"prompt must be a string, not {type(self.prompt).__name__}")
        if self.messages is not None:
            object.__setattr__(self, "messages", _check_messages(self.messages))
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an int >= 1")
        temperature = _check_number("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 picks the most likely token)")
        top_p = _check_number("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]; use 1 to disable nucleus sampling")
        stop = cast(object, self.stop)
        if isinstance(stop, str):
            stop = (stop,)
        stops: tuple[object, ...] = tuple(cast(Sequence[object], stop)) if isinstance(stop, Sequence) else ()
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop={self.stop!r} must be a non-empty string or a sequence of them")
        object.__setattr__(self, "stop", stops)
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"seed={seed!r} must be a non-negative int, or None")


def _check_messages(messages: object) -> tuple[dict[str, str], ...]:
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} mappings")  # noqa: TRY004
    checked: list[dict[str, str]] = []
    for i, message in enumerate(messages):  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a mapping with 'role' and 'content', not {message!r}")  # noqa: TRY004
        entry = cast(Mapping[str, object], message)
        role = entry.get("role")
        content = entry.get("content")
        if role not in _ROLES:
            raise ValueError(f"messages[{i}]['role']={role!r} must be one of {sorted(_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a string, not {type(content).__name__}")  # noqa: TRY004
        checked.append({"role": str(role), "content": content})
    if not checked:
        raise ValueError("messages is empty: give at least one message")
    return tuple(checked)


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token, streamed as an event.

    ``text`` is the text this token adds; it is empty while a multi-byte
    character is incomplete, so joining the texts of all tokens gives exactly
    :attr:`Completion.text`.
    """

    text: str
    token_id: int

    def __reduce__(self) -> tuple[type[Token], tuple[str, int]]:
        # Several times faster both ways than the dataclass's slots state; a
        # fast stream pickles thousands of these a second.
        return (Token, (self.text, self.token_id))


@dataclass(frozen=True, slots=True)
class Completion:
    """The result of a :class:`Generate` task.

    Attributes:
        text: the generated text, without any stop string.
        finish_reason: ``"stop"`` (end-of-sequence token or a stop string) or
            ``"length"`` (``max_tokens`` or the model's context was reached).
        prompt_tokens: tokens in the prompt, after the chat template.
        generation_tokens: tokens generated; equal to the number of :class:`Token` events.
        prompt_tps: prompt processing speed, tokens per second.
        generation_tps: generation speed, tokens per second.
        time_to_first_token: seconds from the runner starting the task to its
            first token, measured in the runner (the parent adds its transport).
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    time_to_first_token: float
