"""Continuous batching for :class:`MlxLmRunner`: one decoding thread owns mlx-lm's ``BatchGenerator``.

Each task's ``handle()`` thread prepares its request (tokens, limits),
submits it, and then only waits and emits: the decoding thread inserts the
request's ``n`` sequences at its next step, runs one forward pass for every
sequence in the batch per step, turns each sequence's token into
:class:`Token` events, and hands them to that task's thread. The handoff is
the flow-control decision: a task whose consumer is slow blocks in its own
``ctx.emit`` while the batch keeps decoding the others, and its tokens wait
in the runner (at most ``max_tokens`` of them) until its consumer catches up.
A cancelled task's sequences leave the batch at the next step.

This module imports mlx: the runner loads it in the child, in ``setup``.
"""

from __future__ import annotations

import copy
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator  # pyright: ignore[reportMissingTypeStubs]
from mlx_lm.sample_utils import (  # pyright: ignore[reportMissingTypeStubs]
    apply_min_p,  # pyright: ignore[reportUnknownVariableType]
    apply_top_k,  # pyright: ignore[reportUnknownVariableType]
    apply_top_p,  # pyright: ignore[reportUnknownVariableType]
    greedy_sampler,  # pyright: ignore[reportUnknownVariableType]
    make_logits_processors,  # pyright: ignore[reportUnknownVariableType]
    make_sampler,  # pyright: ignore[reportUnknownVariableType]
)

from .._runner import TaskContext
from ._batch_text import ChoiceText
from ._prompt_cache import PromptCache
from ._types import Completion, Generate, Token

# A task's thread sends its waiting tokens at most this often (the first at
# once): the child batches events for 50 ms anyway, and each wake-up of a
# handler thread costs the decoding thread the GIL.
HANDOFF_INTERVAL = 0.02


def make_samplers(request: Generate, vocab_size: int) -> list[Any]:
    """One sampler per choice, for ``request``'s sampling settings.

    Greedy choices share mlx-lm's one greedy sampler, so a batch of them
    samples in one call. A seeded request gets a random key per choice, split
    from its seed, so its text does not depend on what else is in the batch;
    an unseeded one uses MLX's random state (seeded per runner).
    """
    if request.temperature == 0:
        return [greedy_sampler] * request.n
    top_p = request.top_p if request.top_p < 1 else 0.0
    top_k = request.top_k if request.top_k < vocab_size else 0
    if request.seed is None:
        return [
            make_sampler(temp=request.temperature, top_p=top_p, min_p=request.min_p, top_k=top_k)
            for _ in range(request.n)
        ]
    keys = mx.random.split(mx.random.key(request.seed), request.n)
    return [_seeded_sampler(request, top_p, top_k, keys[i]) for i in range(request.n)]


def _seeded_sampler(request: Generate, top_p: float, top_k: int, key: Any) -> Callable[[Any], Any]:
    # The same truncations, in the same order, as mlx-lm's make_sampler; only
    # the draw takes its own key instead of the global random state.
    state = [key]
    scale = 1.0 / request.temperature
    min_p = request.min_p

    def sample(logprobs: Any) -> Any:
        if top_p:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p:
            logprobs = apply_min_p(logprobs, min_p)
        if top_k:
            logprobs = apply_top_k(logprobs, top_k)
        state[0], draw = mx.random.split(state[0])
        return mx.random.categorical(logprobs * scale, key=draw)

    return sample


def make_processors(request: Generate) -> list[Any]:
    """mlx-lm's logits processors for ``request``: logit bias and the three penalties."""
    size = request.repetition_context_size
    processors: list[Any] = make_logits_processors(
        logit_bias=dict(request.logit_bias) if request.logit_bias else None,
        repetition_penalty=request.repetition_penalty,
        repetition_context_size=size,
        presence_penalty=request.presence_penalty or None,
        presence_context_size=size,
        frequency_penalty=request.frequency_penalty or None,
        frequency_context_size=size,
    )
    return processors


@dataclass(eq=False)
class Job:
    """One task in the batch: what its thread waits on, and what the decoding thread fills in."""

    request: Generate
    ctx: TaskContext[Token]
    ids: list[int]
    max_tokens: int
    began: float
    piece: Callable[[int], str]
    wake: threading.Condition = field(default_factory=threading.Condition)
    outbox: list[Token] = field(default_factory=list[Token])
    done: bool = False
    abandoned: bool = False  # its thread stopped waiting (an emit raised): drop it from the batch
    error: BaseException | None = None
    choices: list[ChoiceText] = field(default_factory=list[ChoiceText])
    uids: dict[int, ChoiceText] = field(default_factory=dict[int, ChoiceText])
    detokenizers: dict[int, Any] = field(default_factory=dict[int, Any])
    cached_tokens: int = 0
    inserted_at: float = 0.0
    first_at: float | None = None
    finished_at: float = 0.0


class BatchEngine:
    """The decoding thread and its ``BatchGenerator``; :meth:`serve` runs in each task's thread.

    Args:
        model: the mlx-lm model.
        tokenizer: its ``TokenizerWrapper``.
        batch_size: the most sequences decoding at once (``completion_batch_size``).
        prefill_step_size: prompt tokens processed per step: the longest a new
            prompt holds up the sequences already decoding.
        prompt_cache: where finished sequences leave their KV state, and new
            requests look for a shared prefix.
        step: calls ``generator.next()``; a seam for tests that need a slower model.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int,
        prefill_step_size: int,
        prompt_cache: PromptCache,
        step: Callable[[Any], Any],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = prompt_cache
        self.step = step
        self._submitted: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}  # uid -> its job, for every sequence in the generator
        self._generator: Any = None
        self._thread = threading.Thread(target=self._run, name="trio-runner-mlx-decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._submitted.put(None)
        self._thread.join()

    # -- the task's thread ----------------------------------------------------------------

    def serve(self, job: Job) -> Completion:
        """Submit ``job``, emit its tokens as they come, and return its completion."""
        self._submitted.put(job)
        ctx = job.ctx
        try:
            while True:
                with job.wake:
                    while not job.outbox and not job.done:
                        job.wake.wait()
                    tokens, job.outbox = job.outbox, []
                    done = job.done
                if tokens:
                    ctx.emit_many(tokens)  # blocks this task only, while its consumer is behind
                if done:
                    break
                time.sleep(HANDOFF_INTERVAL)
        except BaseException:
            job.abandoned = True
            raise
        if job.error is not None:
            raise job.error
        ctx.raise_if_cancelled()
        return self._completion(job)

    def _completion(self, job: Job) -> Completion:
        first = job.choices[0]
        choices = tuple(choice.choice() for choice in job.choices)
        first_at = job.finished_at if job.first_at is None else job.first_at
        processed = len(job.ids) - job.cached_tokens
        generated = sum(c.generation_tokens for c in choices)
        return Completion(
            text=choices[0].text,
            finish_reason=first.finish,
            prompt_tokens=len(job.ids),
            generation_tokens=choices[0].generation_tokens,
            prompt_tps=processed / max(first_at - job.inserted_at, 1e-9),
            generation_tps=max(generated - 1, 0) / max(job.finished_at - first_at, 1e-9),
            time_to_first_token=first_at - job.began,
            cached_tokens=job.cached_tokens,
            choices=choices,
        )

    # -- the decoding thread --------------------------------------------------------------

    def _new_generator(self) -> Any:
        eos = [[token] for token in self.tokenizer.eos_token_ids]
        return BatchGenerator(
            self.model,
            stop_tokens=eos,
            completion_batch_size=self.batch_size,
            prefill_batch_size=min(self.batch_size, 8),
            prefill_step_size=self.prefill_step_size,
            stream=mx.default_stream(mx.default_device()),
        )

    def _run(self) -> None:
        try:
            # MLX's random state is per thread: seed this one, or every forked runner samples alike.
            mx.random.seed(int.from_bytes(os.urandom(8), "little"))
            self._generator = self._new_generator()
            while self._admit():
                self._drop_cancelled()
                if not self._jobs:
                    continue
                try:
                    _, responses = self.step(self._generator)
                except Exception as exc:  # a failed step fails the batch's tasks, not the runner
                    self._fail_all(exc)
                    continue
                ready: dict[Job, list[Token]] = {}
                for response in responses:
                    job = self._jobs.get(response.uid)
                    if job is not None:
                        ready.setdefault(job, []).extend(self._on_token(job, response))
                for job, tokens in ready.items():
                    self._hand_off(job, tokens)
        except BaseException:
            # A bug here leaves every task waiting forever: end the runner, the supervisor restarts it.
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            os._exit(70)

    def _admit(self) -> bool:
        """Insert the submitted jobs; wait for one while the batch is empty. False: close."""
        while True:
            try:
                job = self._submitted.get(block=not self._jobs)
            except queue.Empty:
                return True
            if job is None:
                return False
            try:
                self._insert(job)
            except Exception as exc:  # a request mlx-lm rejects fails its own task only
                self._finish(job, error=exc)

    def _insert(self, job: Job) -> None:
        request = job.request
        state, cached = self.prompt_cache.fetch(job.ids)
        states = [state] + [None if state is None else copy.deepcopy(state) for _ in range(1, request.n)]
        processors = make_processors(request)
        uids: list[int] = self._generator.insert(
            [job.ids[cached:]] * request.n,
            max_tokens=[job.max_tokens] * request.n,
            caches=states,
            all_tokens=[job.ids[:cached] for _ in range(request.n)],
            samplers=make_samplers(request, _vocab_size(self.model)),
            logits_processors=[processors] * request.n,
        )
        job.cached_tokens = cached
        job.inserted_at = time.perf_counter()
        for index, uid in enumerate(uids):
            choice = ChoiceText(index, request.stop, request.logprobs, job.piece)
            job.choices.append(choice)
            job.uids[uid] = choice
            job.detokenizers[uid] = self.tokenizer.detokenizer
            self._jobs[uid] = job

    def _drop_cancelled(self) -> None:
        cancelled = {job for job in self._jobs.values() if job.ctx.cancelled or job.abandoned}
        for job in cancelled:
            self._remove(job, list(job.uids))
            self._finish(job)

    def _on_token(self, job: Job, response: Any) -> list[Token]:
        """The events ``response`` (one sequence's new token) releases; ends its choice if it ended."""
        if job.first_at is None:
            job.first_at = time.perf_counter()
        choice = job.uids[response.uid]
        detokenizer = job.detokenizers[response.uid]
        reason: str | None = response.finish_reason
        token: int = response.token
        if reason != "stop":
            detokenizer.add_token(token)
        if reason is not None:
            detokenizer.finalize()
        text: str = detokenizer.last_segment
        ready: list[Token] = []
        cut = False
        if reason != "stop" or text:
            # An end-of-sequence token adds only what the detokenizer still held.
            ready, cut = choice.push(text, token, response.logprobs)
        if cut:
            if reason is None:
                self._remove(job, [response.uid])
            else:
                self._forget(response.uid)
        elif reason is not None:
            choice.finish = "stop" if reason == "stop" else "length"
            ready += choice.flush()
            self._forget(response.uid)
            if response.prompt_cache is not None and response.all_tokens:
                self.prompt_cache.insert(response.all_tokens, response.prompt_cache)
        return ready

    def _hand_off(self, job: Job, tokens: list[Token]) -> None:
        ended = all(c.ended for c in job.choices)
        with job.wake:
            job.outbox.extend(tokens)
            if ended:
                job.finished_at = time.perf_counter()
                job.done = True
            job.wake.notify()

    def _remove(self, job: Job, uids: Sequence[int]) -> None:
        self._generator.remove(list(uids))
        for uid in uids:
            self._forget(uid)
            choice = job.uids[uid]
            choice.ended = True

    def _forget(self, uid: int) -> None:
        self._jobs.pop(uid, None)

    def _finish(self, job: Job, error: BaseException | None = None) -> None:
        with job.wake:
            job.error = error
            job.finished_at = time.perf_counter()
            job.done = True
            job.wake.notify()

    def _fail_all(self, exc: Exception) -> None:
        jobs = set(self._jobs.values())
        self._jobs.clear()
        self._generator.close()
        self._generator = self._new_generator()
        for job in jobs:
            self._finish(job, error=exc)


def _vocab_size(model: Any) -> int:
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    return size if isinstance(size, int) else sys.maxsize
