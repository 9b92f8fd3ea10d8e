"""Continuous batching for :class:`MlxLmRunner`: one decoding thread owns mlx-lm's ``BatchGenerator``.

Each task's ``handle()`` thread prepares its request (tokens, limits),
submits it, and then only waits and emits: the decoding thread inserts the
request's ``n`` sequences at its next step, runs one forward pass for every
sequence in the batch per step, turns each sequence's token into
:class:`Token` events, and hands them to that task's thread. The handoff is
the flow-control decision: a task whose consumer is slow blocks in its own
``ctx.emit`` while the batch keeps decoding the others, and its tokens wait
in the runner (at most ``max_tokens`` of them) until its consumer catches up.
A cancelled task's sequences leave the batch at the next step. A request
that finds the runner idle is decoded alone, outside the batch, until a
second one arrives (:mod:`._lone`).

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
from mlx_lm.models.cache import make_prompt_cache  # pyright: ignore[reportMissingTypeStubs]
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
from ._lone import LoneSequence
from ._prompt_cache import PromptCache
from ._types import Completion, Generate, Token

# A task's thread sends its waiting tokens at most this often (the first at
# once), or as often as the runner's ``linger`` if that is shorter: the child
# batches events for ``linger`` anyway, and each wake-up of a handler thread
# costs the decoding thread the GIL.
HANDOFF_INTERVAL = 0.02


def make_samplers(request: Generate, vocab_size: int) -> list[Any]:
    """One sampler per choice, for ``request``'s sampling settings.

    Greedy choices share mlx-lm's one greedy sampler, so a batch of them
    samples in one call. A seeded request gets a random key per choice, from
    its seed, so its text does not depend on what else is in the batch; an
    unseeded one uses MLX's random state (seeded per runner and thread).
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
    # Choice 0 draws from key(seed) exactly as MLX's global state does after
    # mx.random.seed(seed), so a seeded request gives the text it gave before
    # sampling moved to per-request keys. The other choices start from keys
    # split off by a path choice 0's chain never takes (counters 4.. of a 3-way split).
    root = mx.random.key(request.seed)
    others = mx.random.split(mx.random.split(root, 3)[2], max(request.n - 1, 1))
    keys = [root] + [others[i] for i in range(request.n - 1)]
    return [_seeded_sampler(request, top_p, top_k, key) for key in keys]


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
    pausing: bool = False  # its thread lets tokens gather (see BatchEngine._pause)
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
        handoff: the shortest time between two sends of one task's tokens.
        warmup_prompt: the prompt of the batch warm-up, which the decoding
            thread runs while no request is waiting (``None``: no warm-up).
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
        handoff: float = HANDOFF_INTERVAL,
        warmup_prompt: list[int] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.prefill_step_size = prefill_step_size
        self.prompt_cache = prompt_cache
        self.step = step
        self.handoff = handoff
        self._submitted: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}  # uid -> its job, for every sequence in the generator
        self._generator: Any = None
        self._lone: LoneSequence | None = None  # the request decoded alone, outside the batch
        self._lone_uids = 0  # the lone sequences' uids count down from -1, clear of the batch's
        self._thread = threading.Thread(target=self._run, name="trio-runner-mlx-decode", daemon=True)
        self.warm = threading.Event()
        """Set once the batch warm-up has run (at once, without a warm-up prompt)."""
        self._warmup_prompt = warmup_prompt
        # Greedy rows share one sampler call, sampled rows each have their own: different kernels.
        self._warmup_rounds: list[list[Any]] = [
            [greedy_sampler] * 2,
            [make_sampler(temp=1.0) for _ in range(2)],
        ]
        self._warming: tuple[Any, int] | None = None  # the warm-up's generator, and its sequences left
        if warmup_prompt is None:
            self.warm.set()

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
                if self.handoff:
                    self._pause(job)
        except BaseException:
            job.abandoned = True
            raise
        if job.error is not None:
            raise job.error
        ctx.raise_if_cancelled()
        return self._completion(job)

    def _pause(self, job: Job) -> None:
        """Let ``job``'s tokens gather for ``handoff`` seconds, but return the moment it is done.

        A plain sleep here kept a finished request waiting for the rest of the
        pause (10 ms on average at 20 ms): a few percent of a short request's time.
        """
        with job.wake:
            job.pausing = True
            try:
                job.wake.wait_for(lambda: job.done, self.handoff)
            finally:
                job.pausing = False

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
                    _, responses = self.step(self._generator if self._lone is None else self._lone)
                except Exception as exc:  # a failed step fails the batch's tasks, not the runner
                    self._fail_all(exc)
                    continue
                self._deliver(responses)
        except BaseException:
            # A bug here leaves every task waiting forever: end the runner, the supervisor restarts it.
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            os._exit(70)

    def _deliver(self, responses: Sequence[Any]) -> None:
        """Turn a step's responses into each task's events, and hand them to the tasks' threads."""
        ready: dict[Job, list[Token]] = {}
        failed: dict[Job, Exception] = {}
        for response in responses:
            job = self._jobs.get(response.uid)
            if job is None or job in failed:
                continue
            try:
                ready.setdefault(job, []).extend(self._on_token(job, response))
            except Exception as exc:  # turning one token into events fails that task alone
                failed[job] = exc
        for job, exc in failed.items():
            ready.pop(job, None)
            self._remove(job, list(job.uids))
            self._finish(job, error=exc)
        for job, tokens in ready.items():
            self._hand_off(job, tokens)

    def _admit(self) -> bool:
        """Insert the submitted jobs; wait for one while the batch is empty. False: close.

        A job that finds the runner empty, with nothing else submitted, is
        decoded alone (:class:`LoneSequence`); the next job to arrive moves it
        into the batch first.
        """
        while True:
            if not self._jobs and not self.warm.is_set() and self._submitted.empty():
                self._warm_up_step()
                continue
            try:
                job = self._submitted.get(block=not self._jobs)
            except queue.Empty:
                return True
            if job is None:
                return False
            if self._lone is not None:
                self._hand_over(self._lone)
            try:
                if not self._jobs and job.request.n == 1 and self._submitted.empty():
                    self._start_lone(job)
                else:
                    self._insert(job)
            except Exception as exc:  # a request mlx-lm rejects fails its own task only
                self._finish(job, error=exc)

    def _warm_up_step(self) -> None:
        """One step of the batch warm-up: a throwaway batch of two sequences, greedy then sampled.

        It runs only while no request waits, one step at a time, so it keeps
        ``setup`` (and a restart) short without delaying a request by more
        than a step. Batched shapes and per-row sampling compile kernels of
        their own; a request alone needs only the ones ``setup`` warmed.
        """
        assert self._warmup_prompt is not None
        try:
            if self._warming is None:
                generator = self._new_generator()
                samplers = self._warmup_rounds.pop(0)
                generator.insert(
                    [self._warmup_prompt] * len(samplers), max_tokens=[2] * len(samplers), samplers=samplers
                )
                self._warming = (generator, len(samplers))
            generator, left = self._warming
            _, responses = generator.next()
            left -= sum(response.finish_reason is not None for response in responses)
            self._warming = (generator, left) if left else None
        except Exception:  # only a warm-up: the first batch compiles what it needs instead
            traceback.print_exc(file=sys.stderr)
            self._warmup_rounds.clear()
            self._warming = None
        if self._warming is None and not self._warmup_rounds:
            self.warm.set()

    def _start_lone(self, job: Job) -> None:
        request = job.request
        state, cached = self.prompt_cache.fetch(job.ids)
        self._lone_uids -= 1
        self._lone = LoneSequence(
            self.model,
            self._lone_uids,
            prompt=job.ids[cached:],
            cache=make_prompt_cache(self.model) if state is None else state,
            tokens=job.ids[:cached],
            sampler=make_samplers(request, _vocab_size(self.model))[0],
            processors=make_processors(request),
            max_tokens=job.max_tokens,
            eos=set(self.tokenizer.eos_token_ids),
            prefill_step_size=self.prefill_step_size,
            stream=self._generator.stream,
        )
        self._register(job, cached, [self._lone.uid])

    def _hand_over(self, lone: LoneSequence) -> None:
        """Move the lone sequence into the batch: first the token it has already sampled, then the rest."""
        job = self._jobs[lone.uid]
        try:
            pending = lone.take_pending()
            if pending is not None:
                self._deliver([pending])  # it may end the sequence: then there is nothing to move
            if lone.uid in self._jobs:
                uid = lone.move_into(self._generator)
                self._lone = None
                job.uids[uid] = job.uids.pop(lone.uid)
                job.detokenizers[uid] = job.detokenizers.pop(lone.uid)
                self._jobs[uid] = self._jobs.pop(lone.uid)
        except Exception as exc:  # as a failed step, but only this sequence was in it
            self._remove(job, list(job.uids))
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
        self._register(job, cached, uids)

    def _register(self, job: Job, cached: int, uids: list[int]) -> None:
        """Give each of ``job``'s sequences its choice and detokenizer."""
        request = job.request
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
            if ended or not job.pausing:  # a pausing thread wakes only to finish: each wake-up costs the GIL
                job.wake.notify()

    def _remove(self, job: Job, uids: Sequence[int]) -> None:
        self._generator.remove([uid for uid in uids if uid >= 0])  # the lone sequence's is negative
        for uid in uids:
            self._forget(uid)
            choice = job.uids[uid]
            choice.ended = True

    def _forget(self, uid: int) -> None:
        self._jobs.pop(uid, None)
        if self._lone is not None and self._lone.uid == uid:
            self._lone = None

    def _finish(self, job: Job, error: BaseException | None = None) -> None:
        with job.wake:
            job.error = error
            job.finished_at = time.perf_counter()
            job.done = True
            job.wake.notify()

    def _fail_all(self, exc: Exception) -> None:
        jobs = set(self._jobs.values())
        self._jobs.clear()
        self._lone = None
        self._generator.close()
        self._generator = self._new_generator()
        for job in jobs:
            self._finish(job, error=exc)


def _vocab_size(model: Any) -> int:
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    return size if isinstance(size, int) else sys.maxsize
