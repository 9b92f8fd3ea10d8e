"""The MLX runner's messages: the :class:`Generate` request, :class:`Token` events, the :class:`Completion`.

Plain frozen dataclasses with no third-party imports: the parent builds and
validates them without importing mlx, and the child unpickles them cheaply.
Validation happens at construction (through ``trio_runner._validate``), so a
bad request raises where it is written, before anything reaches the runner: a
field of the wrong type ``TypeError``, a bad value ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from .. import _validate as check

FinishReason = Literal["stop", "length"]
_ROLES = ("system", "user", "assistant", "tool")
MAX_LOGPROBS = 20
"""The most top alternatives a :class:`Generate` may ask for per token (OpenAI's limit)."""
MAX_N = 16
"""The most choices one :class:`Generate` may ask for (each is a sequence in the batch)."""
MAX_PENALTY = 2.0
"""The bound on presence and frequency penalties either way (OpenAI's range)."""


def _check_logit_bias(value: object) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(
            f"logit_bias={value!r} must be a mapping of token ids to biases, or None, "
            f"not {type(value).__name__}"
        )
    return {
        check.integer(
            "logit_bias key",
            key,
            minimum=0,
            what="a token id (an int)",
            fix="convert the string keys of an OpenAI request with int()",
        ): check.number(f"logit_bias[{key}]", bias, minimum=None)
        for key, bias in cast(Mapping[object, object], value).items()
    }


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
        top_k: sample only among the ``top_k`` most likely tokens; 0 (the
            default) disables it, as does a value at least the vocabulary size.
            Used only when sampling.
        min_p: drop tokens less likely than ``min_p`` times the most likely
            one, in [0, 1]; 0 disables it. Used only when sampling.
        repetition_penalty: divide the logits of the tokens among the last
            ``repetition_context_size`` (multiply the negative ones), > 0;
            ``None`` disables it (1.0 has no effect either).
        repetition_context_size: how many of the latest tokens (prompt and
            generated) the repetition, presence and frequency penalties look
            at, >= 1.
        presence_penalty: subtracted once from the logit of every token seen
            in that window, in [-2, 2] as in OpenAI's API; 0 disables it.
        frequency_penalty: subtracted from a token's logit once per time it
            appears in that window, in [-2, 2]; 0 disables it.
        logit_bias: added to the logits of the given token ids (ints >= 0)
            before sampling, also at temperature 0. An id beyond the model's
            vocabulary fails the task with ``ValueError`` in the runner (the
            vocabulary is known only there); the runner serves on.
        logprobs: ``None`` (the default) reports no log-probabilities; an int
            in [0, 20] gives each :class:`Token` its ``logprob`` and that many
            most likely alternatives in ``top_logprobs``. They are the model's
            log-probabilities after the logits processors (penalties, bias),
            before temperature and truncation.
        n: how many independent choices to generate, in [1, 16]; each runs as
            its own sequence in the batch. Tokens say which choice they belong
            to (:attr:`Token.index`) and :attr:`Completion.choices` holds every
            choice. With ``temperature=0`` every choice is the same text.

    Raises:
        TypeError: a field of the wrong type (a string ``max_tokens``, say).
        ValueError: a field out of range, or neither or both of ``prompt`` and
            ``messages``; each with a sentence that says how to fix it.
    """

    prompt: str | None = None
    messages: Sequence[Mapping[str, str]] | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = field(default=())
    seed: int | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    logprobs: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt= (a string) and messages= (chat messages)")
        if self.prompt is not None:
            check.text("prompt", self.prompt, empty=True)
        if self.messages is not None:
            object.__setattr__(self, "messages", _check_messages(self.messages))
        check.integer("max_tokens", self.max_tokens, minimum=1)
        check.number("temperature", self.temperature, fix="0 picks the most likely token")
        check.number("top_p", self.top_p, above=True, maximum=1, fix="use 1 to disable nucleus sampling")
        stop = cast(object, self.stop)
        if isinstance(stop, str):
            stops = (check.text("stop", stop),)
        else:
            stops = check.names("stop", stop, example="['\\n\\n']")
        object.__setattr__(self, "stop", stops)
        if self.seed is not None:
            check.integer("seed", self.seed, minimum=0, fix="None draws from the runner's random state")
        self._check_sampling()

    def _check_sampling(self) -> None:
        check.integer("top_k", self.top_k, minimum=0, fix="give 0 to disable top-k sampling")
        check.number("min_p", self.min_p, maximum=1, fix="use 0 to disable min-p sampling")
        if self.repetition_penalty is not None:
            check.number(
                "repetition_penalty",
                self.repetition_penalty,
                above=True,
                fix="above 1 discourages repeats; use None to disable it",
            )
        check.integer(
            "repetition_context_size", self.repetition_context_size, minimum=1, fix="how many latest tokens"
        )
        for name in ("presence_penalty", "frequency_penalty"):
            check.number(
                name,
                getattr(self, name),
                minimum=-MAX_PENALTY,
                maximum=MAX_PENALTY,
                fix="as in OpenAI's API; 0 disables it",
            )
        object.__setattr__(self, "logit_bias", _check_logit_bias(self.logit_bias))
        if self.logprobs is not None:
            check.integer(
                "logprobs",
                self.logprobs,
                minimum=0,
                maximum=MAX_LOGPROBS,
                fix="the number of top alternatives per token, or None",
            )
        check.integer(
            "n", self.n, minimum=1, maximum=MAX_N, fix="the number of choices; send more requests for more"
        )


def _check_messages(messages: object) -> tuple[dict[str, str], ...]:
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise TypeError(
            "messages must be a list of {'role': ..., 'content': ...} mappings, "
            f"not {type(cast(object, messages)).__name__}"
        )
    checked: list[dict[str, str]] = []
    for i, message in enumerate(cast(Sequence[object], messages)):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a mapping with 'role' and 'content', not {message!r}")
        entry = cast(Mapping[str, object], message)
        role = check.one_of(f"messages[{i}]['role']", entry.get("role"), _ROLES)
        content = check.text(f"messages[{i}]['content']", entry.get("content"), empty=True)
        checked.append({"role": role, "content": content})
    if not checked:
        raise ValueError("messages is empty: give at least one message")
    return tuple(checked)


TopLogprob = tuple[int, str, float]
"""One alternative in :attr:`Token.top_logprobs`: ``(token_id, text, logprob)``."""


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token, streamed as an event.

    ``text`` is the text this token adds; it is empty while a multi-byte
    character is incomplete, so joining the texts of all tokens gives exactly
    :attr:`Completion.text` (per choice, when ``n > 1``).

    Attributes:
        text: the text this token adds.
        token_id: the token's id in the model's vocabulary.
        logprob: the token's log-probability, when the request asked for
            ``logprobs``; otherwise ``None``.
        top_logprobs: the ``logprobs`` most likely tokens at this step, most
            likely first, as ``(token_id, text, logprob)``; ``text`` is the
            token decoded on its own (a part of a multi-byte character decodes
            to U+FFFD).
        index: which choice this token belongs to, ``0 .. n - 1``.
    """

    text: str
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()
    index: int = 0

    def __reduce__(self) -> tuple[type[Token], tuple[Any, ...]]:
        # Several times faster both ways than the dataclass's slots state; a
        # fast stream pickles thousands of these a second, most with only the
        # first two fields set.
        if self.logprob is None and not self.top_logprobs and not self.index:
            return (Token, (self.text, self.token_id))
        return (Token, (self.text, self.token_id, self.logprob, self.top_logprobs, self.index))


@dataclass(frozen=True, slots=True)
class Choice:
    """One of the ``n`` choices of a :class:`Generate` in :attr:`Completion.choices`.

    Attributes:
        index: the choice's number, ``0 .. n - 1``, as in :attr:`Token.index`.
        text: its generated text, without any stop string.
        finish_reason: as :attr:`Completion.finish_reason`, for this choice.
        generation_tokens: its tokens; equal to its number of :class:`Token` events.
    """

    index: int
    text: str
    finish_reason: FinishReason
    generation_tokens: int


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
        cached_tokens: how many of the ``prompt_tokens`` came from the prompt
            cache (the KV state of a prefix an earlier request computed)
            instead of being processed again.
        choices: every choice in index order, ``n`` of them; the first is the
            same as ``text``, ``finish_reason`` and ``generation_tokens``
            (which count choice 0 only). The runner always fills it; empty in a
            ``Completion`` built by hand means the one choice is the
            ``Completion`` itself.
    """

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    time_to_first_token: float
    cached_tokens: int = 0
    choices: tuple[Choice, ...] = ()
