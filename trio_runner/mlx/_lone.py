"""A request alone in the runner, decoded outside the batch, and its hand-over into the batch.

With one sequence in it, a step of mlx-lm's ``BatchGenerator`` still does
the work of a batch (the batched cache and its masks, per-row lists, the
split of the step's log-probabilities), which costs a small model 12-18% of
its tokens/s against ``mlx_lm.stream_generate``. So the decoding thread
serves a request that finds the runner empty as a :class:`LoneSequence`: one
forward pass per token on a plain mlx-lm cache, pipelined like
``mlx_lm.generate_step``. The step a second request arrives, the lone one
moves into the batch with everything the batch would have had, had it been
batched from the start: its KV state (a plain cache, as the prompt cache
hands out), the tokens in it, its own sampler (a seeded one carries its key
chain on) and its logits processors. So its tokens do not depend on whether
it was alone.

This module imports mlx: the decoding thread loads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch  # pyright: ignore[reportMissingTypeStubs]

# As mlx_lm.generate_step: free MLX's buffer cache now and then during a long generation.
_CLEAR_CACHE_EVERY = 256


class LoneSequence:
    """One choice of one request, decoded on its own; :meth:`next` has ``BatchGenerator.next``'s shape.

    Args:
        model: the mlx-lm model.
        uid: the sequence's id in the engine (negative: never one of the batch's).
        prompt: the prompt tokens still to process (at least one).
        cache: the KV state holding ``tokens`` (fresh, or from the prompt cache).
        tokens: the tokens in ``cache``; extended as they are processed.
        sampler: the choice's sampler.
        processors: its logits processors.
        max_tokens: the most tokens to generate.
        eos: the tokens that end the sequence.
        prefill_step_size: prompt tokens processed per step.
        stream: the MLX stream the batch runs on.
    """

    def __init__(
        self,
        model: Any,
        uid: int,
        *,
        prompt: list[int],
        cache: list[Any],
        tokens: list[int],
        sampler: Callable[[Any], Any],
        processors: Sequence[Callable[[Any, Any], Any]],
        max_tokens: int,
        eos: set[int],
        prefill_step_size: int,
        stream: Any,
    ) -> None:
        if not prompt:
            raise ValueError("the prompt has no tokens: give a prompt or messages with text")
        self.model = model
        self.uid = uid
        self.prompt = prompt
        self.cache = cache
        self.tokens = tokens
        self.sampler = sampler
        self.processors = list(processors)
        self.max_tokens = max_tokens
        self.eos = eos
        self.prefill_step_size = prefill_step_size
        self.stream = stream
        self.generated = 0
        self._context: Any = None  # every token the model has seen, for the logits processors
        self._pending: tuple[Any, Any] | None = None  # the next token and its log-probabilities, sampled

    def next(self) -> tuple[list[Any], list[Any]]:
        """One step: a chunk of the prompt (no token), or one new token (its response)."""
        with mx.stream(self.stream):
            if len(self.prompt) > 1:
                chunk = self.prompt[: min(self.prefill_step_size, len(self.prompt) - 1)]
                self.model(mx.array(chunk)[None], cache=self.cache)
                mx.eval([c.state for c in self.cache])  # pyright: ignore[reportUnknownMemberType]
                self.tokens += chunk
                del self.prompt[: len(chunk)]
                return [], []
            if self._pending is None:
                if self.processors:
                    self._context = mx.array(self.tokens + self.prompt)
                self._pending = self._forward(mx.array(self.prompt), seen=True)
                self.tokens += self.prompt
                self.prompt = []
            token, logprobs = self._pending
            # Queue the next token's forward pass before reading this one, so the two overlap.
            self._pending = self._forward(token, seen=False)
            mx.async_eval(*self._pending)  # pyright: ignore[reportUnknownMemberType]
            return [], [self._response(token, logprobs)]

    def take_pending(self) -> Any:
        """The response for the token already sampled but not yet given, without a further step.

        ``None`` while the prompt is still being processed (no token sampled yet).
        """
        if self._pending is None:
            return None
        token, logprobs = self._pending
        self._pending = None
        with mx.stream(self.stream):
            response = self._response(token, logprobs, in_cache=False)
        self.prompt = [response.token]  # the batch's first step processes it
        return response

    def move_into(self, generator: Any) -> int:
        """Insert the rest of this sequence into ``generator``; its uid there."""
        uids: list[int] = generator.insert(
            [self.prompt],
            max_tokens=[self.max_tokens - self.generated],
            caches=[self.cache],
            all_tokens=[self.tokens],
            samplers=[self.sampler],
            logits_processors=[self.processors],
        )
        return uids[0]

    def _forward(self, inputs: Any, *, seen: bool) -> tuple[Any, Any]:
        """Process ``inputs``; sample the next token. ``seen``: the processors' context has them."""
        logits = self.model(inputs[None], cache=self.cache)[:, -1, :]
        if self.processors:
            if not seen:
                self._context = mx.concatenate([self._context, inputs])
            for processor in self.processors:
                logits = processor(self._context, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self.sampler(logprobs), logprobs

    def _response(self, token_array: Any, logprobs: Any, *, in_cache: bool = True) -> Any:
        """The response for a sampled token; ``in_cache``: its forward pass is queued (the cache holds it)."""
        token = int(token_array.item())
        if in_cache:
            self.tokens.append(token)
        self.generated += 1
        if self.generated % _CLEAR_CACHE_EVERY == 0:
            mx.clear_cache()
        reason = "length" if self.generated >= self.max_tokens else None
        if token in self.eos:
            reason = "stop"
        ended = reason is not None
        return GenerationBatch.Response(
            uid=self.uid,
            token=token,
            logprobs=logprobs[0],
            finish_reason=reason,
            prompt_cache=self.cache if ended else None,
            all_tokens=self.tokens if ended else None,
        )
