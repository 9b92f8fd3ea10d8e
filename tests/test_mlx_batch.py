"""The batched MLX runner, against real runner processes on the demo model.

Contract tests. pytest-trio gives each test its own loop, so a supervisor
cannot outlive a test; instead each test checks several facts on the runners
it starts (a forkserver restart costs tens of milliseconds). The demo model
changes when it is retrained, so no test hard-codes a text: batched outputs
are compared with the single-stream path's (``concurrency=1``), or with each
other.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_runner
from trio_runner import RestartPolicy, RunnerCrashed, Supervisor, TaskCancelled, TaskFailed
from trio_runner.mlx import Completion, Generate, MlxLmRunner, Token, start_options

from .test_mlx import _collect  # pyright: ignore[reportPrivateUsage]
from .test_serve_runners import SlowMlxLmRunner

pytest.importorskip("mlx_lm", reason="the mlx extra is not installed")

BOUND = 60
FAST = RestartPolicy(initial_delay=0.05)
PROMPTS = ["Once upon a time", "The quick brown fox", "In the beginning", "It was a dark and stormy night"]

Sup = Supervisor[Generate, Token, Completion]


class BrokenPiecesRunner(MlxLmRunner):
    """Fails to decode the top alternatives of ``logprobs``, as a bug in the batch's token handling would."""

    def piece(self, token_id: int) -> str:
        raise RuntimeError("no piece for you")


@asynccontextmanager
async def _open(demo_dir: Path, runner: type[MlxLmRunner] = MlxLmRunner, **kwargs: Any) -> AsyncIterator[Sup]:
    async with trio_runner.open_supervisor(
        runner, str(demo_dir), kwargs=kwargs, policy=FAST, **start_options()
    ) as sup:
        await sup.wait_ready()
        yield sup


@pytest.fixture(params=[1, 32], ids=["single-stream", "batched"])
def concurrency(request: pytest.FixtureRequest) -> int:
    """The runner's concurrency, for tests that hold both paths to one behaviour."""
    return request.param


async def _together(sup: Sup, requests: list[Generate]) -> list[tuple[list[Token], Completion]]:
    results: list[Any] = [None] * len(requests)

    async def one(i: int) -> None:
        results[i] = await _collect(sup, requests[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(requests)):
            nursery.start_soon(one, i)
    return results


async def test_batched_greedy_and_seeded_outputs_equal_the_single_stream_outputs_token_for_token(
    demo_dir: Path,
) -> None:
    requests = [Generate(prompt=p, max_tokens=24 + 8 * i) for i, p in enumerate(PROMPTS)]
    requests.append(Generate(prompt=PROMPTS[0], max_tokens=30, temperature=0.9, top_p=0.95, seed=3))
    with trio.fail_after(BOUND):
        async with _open(demo_dir, concurrency=1) as single:
            alone = [await _collect(single, r) for r in requests]
        async with _open(demo_dir) as batched:
            together = await _together(batched, requests)
    assert sum(len(tokens) for tokens, _ in alone) > len(requests)  # the comparison has something to compare
    for (tokens, done), (want_tokens, want) in zip(together, alone, strict=True):
        assert [t.token_id for t in tokens] == [t.token_id for t in want_tokens]
        assert (done.text, done.finish_reason, done.generation_tokens) == (
            want.text,
            want.finish_reason,
            want.generation_tokens,
        )
        assert "".join(t.text for t in tokens) == done.text


@pytest.mark.parametrize(
    "request_",
    [
        Generate(prompt=PROMPTS[0], max_tokens=60),
        Generate(
            prompt=PROMPTS[1],
            max_tokens=60,
            temperature=1.0,
            top_k=40,
            seed=5,
            repetition_penalty=1.5,
            frequency_penalty=0.5,
            logprobs=2,
        ),
    ],
    ids=["greedy", "seeded-penalised"],
)
async def test_a_request_that_starts_alone_and_is_joined_midway_gives_the_tokens_it_gives_alone(
    demo_dir: Path, request_: Generate
) -> None:
    # A request alone is decoded outside the batch and moves into it when a
    # second arrives: its tokens must not depend on that.
    joiner = Generate(prompt=PROMPTS[2], max_tokens=10)
    with trio.fail_after(BOUND):
        async with _open(demo_dir, SlowMlxLmRunner) as sup:
            alone, _ = await _collect(sup, request_)
            joined: list[Token] = []
            tokens_when_joiner_done = -1

            async def join_after_five_tokens(five_seen: trio.Event) -> None:
                nonlocal tokens_when_joiner_done
                await five_seen.wait()
                await sup.run(joiner)
                tokens_when_joiner_done = len(joined)

            async with trio.open_nursery() as nursery:
                five_seen = trio.Event()
                nursery.start_soon(join_after_five_tokens, five_seen)
                async with sup.stream(request_) as task:
                    async for token in task:
                        joined.append(token)
                        if len(joined) == 5:
                            five_seen.set()
    # The joiner ran beside it (it is 10 steps, the rest of the request 55), not after it.
    assert 5 <= tokens_when_joiner_done < len(joined)
    assert [t.token_id for t in joined] == [t.token_id for t in alone]
    assert "".join(t.text for t in joined) == "".join(t.text for t in alone)


async def test_concurrent_requests_with_different_sampling_settings_each_get_their_own(
    demo_dir: Path,
) -> None:
    greedy = Generate(prompt=PROMPTS[0], max_tokens=20)
    seeded = Generate(prompt=PROMPTS[1], max_tokens=20, temperature=1.0, top_k=50, min_p=0.01, seed=7)
    with trio.fail_after(BOUND):
        async with _open(demo_dir) as sup:
            plain = await sup.run(greedy)
            forced_id = next(t.token_id for t in (await _collect(sup, greedy))[0] if t.text.strip())
            forced = Generate(prompt=PROMPTS[2], max_tokens=12, logit_bias={forced_id: 100.0})
            reseeded = Generate(
                prompt=PROMPTS[1], max_tokens=20, temperature=1.0, top_k=50, min_p=0.01, seed=8
            )
            # Strong penalties: the trained demo model is confident enough that
            # mild ones leave its greedy text as it is.
            penalised = Generate(
                prompt=PROMPTS[0], max_tokens=20, repetition_penalty=3.0, frequency_penalty=2.0
            )
            alone = await sup.run(seeded)
            results = await _together(sup, [greedy, seeded, forced, seeded, reseeded, penalised])
    (_, g), (_, s1), (forced_tokens, _), (_, s2), (_, other), (_, pen) = results
    assert g.text == plain.text  # the others' settings do not leak into a greedy request
    assert s1.text == s2.text == alone.text  # a seed gives its own text, whatever else is in the batch
    assert other.text != s1.text
    assert [t.token_id for t in forced_tokens] == [forced_id] * 12
    assert pen.text != plain.text or not plain.text


async def test_cancelling_one_request_mid_batch_leaves_the_others_outputs_unchanged(demo_dir: Path) -> None:
    others = [Generate(prompt=p, max_tokens=40) for p in PROMPTS[:3]]
    with trio.fail_after(BOUND):
        async with _open(demo_dir, SlowMlxLmRunner) as sup:
            want = [c for _, c in await _together(sup, others)]
            pid = sup.statistics().pid
            results: list[Any] = [None] * len(others)
            seen_after_cancel = -1

            async def cancelled_one() -> None:
                nonlocal seen_after_cancel
                seen = 0
                with pytest.raises(TaskCancelled):
                    async with sup.stream(Generate(prompt=PROMPTS[3], max_tokens=2000)) as task:
                        async for _ in task:
                            seen += 1
                            if seen == 5:
                                await task.cancel()
                                seen_after_cancel = 0
                            elif seen > 5:
                                seen_after_cancel += 1

            async def other(i: int) -> None:
                results[i] = (await _collect(sup, others[i]))[1]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancelled_one)
                for i in range(len(others)):
                    nursery.start_soon(other, i)
            assert sup.statistics().pid == pid
    assert seen_after_cancel == 0
    assert [c.text for c in results] == [c.text for c in want]


async def test_a_consumer_that_stops_reading_stalls_only_its_own_request(demo_dir: Path) -> None:
    others = [Generate(prompt=p, max_tokens=40) for p in PROMPTS[:3]]
    stalled = Generate(prompt=PROMPTS[3], max_tokens=120)
    with trio.fail_after(BOUND):
        async with trio_runner.open_supervisor(
            MlxLmRunner, str(demo_dir), window=4, policy=FAST, **start_options()
        ) as sup:
            await sup.wait_ready()
            want = await sup.run(stalled)
            others_done = trio.Event()
            finished: list[Completion] = []
            got: list[Token] = []

            async def slow_reader() -> None:
                async with sup.stream(stalled) as task:
                    async for token in task:
                        got.append(token)
                        if len(got) == 1:
                            await others_done.wait()  # its window fills; the runner must not wait for it
                assert task.result.text == want.text

            async def fast(request: Generate) -> None:
                finished.append(await sup.run(request))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_reader)
                async with trio.open_nursery() as fast_ones:
                    for request in others:
                        fast_ones.start_soon(fast, request)
                others_done.set()
    assert len(finished) == len(others)
    assert "".join(t.text for t in got) == want.text


async def test_sigkill_mid_batch_fails_every_request_once_and_the_next_batch_is_served(
    demo_dir: Path,
) -> None:
    with trio.fail_after(BOUND):
        async with _open(demo_dir, SlowMlxLmRunner) as sup:
            pid = sup.statistics().pid
            assert pid is not None
            outcomes: list[BaseException | Completion] = []
            streaming = [trio.Event() for _ in range(3)]
            retried: list[Completion] = []

            async def one(i: int) -> None:
                try:
                    async with sup.stream(Generate(prompt=PROMPTS[i], max_tokens=1000)) as task:
                        async for _ in task:
                            streaming[i].set()
                    outcomes.append(task.result)
                except RunnerCrashed as exc:
                    outcomes.append(exc)

            async def idempotent() -> None:
                retried.append(await sup.run(Generate(prompt=PROMPTS[3], max_tokens=300), retry=True))

            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(one, i)
                nursery.start_soon(idempotent)
                for event in streaming:
                    await event.wait()  # all three are in the batch, mid-generation
                os.kill(pid, signal.SIGKILL)
            assert len(outcomes) == 3 and all(isinstance(o, RunnerCrashed) for o in outcomes)
            assert (
                len(retried) == 1 and retried[0].generation_tokens >= 1
            )  # retry=True reran on the new runner
            after = await _together(sup, [Generate(prompt=p, max_tokens=8) for p in PROMPTS[:2]])
            assert all(c.generation_tokens >= 1 for _, c in after)
            assert sup.statistics().pid != pid


async def test_a_logit_bias_id_outside_the_vocabulary_fails_its_task_and_the_runner_serves_on(
    demo_dir: Path,
) -> None:
    with trio.fail_after(BOUND):
        async with _open(demo_dir) as sup:
            pid = sup.statistics().pid
            with pytest.raises(TaskFailed, match=r"outside the model's vocabulary.*remove them"):
                await sup.run(Generate(prompt="x", logit_bias={10**9: 1.0}))
            assert (await sup.run(Generate(prompt="x", max_tokens=3))).generation_tokens >= 1
            assert sup.statistics().pid == pid


async def test_a_request_whose_tokens_fail_to_convert_fails_alone_and_the_batch_serves_on(
    demo_dir: Path,
) -> None:
    plain = Generate(prompt=PROMPTS[0], max_tokens=40)
    with trio.fail_after(BOUND):
        async with _open(demo_dir, BrokenPiecesRunner) as sup:
            pid = sup.statistics().pid
            want = await sup.run(plain)
            outcomes: dict[str, object] = {}

            async def broken() -> None:
                with pytest.raises(TaskFailed, match="no piece for you") as failed:
                    await sup.run(Generate(prompt=PROMPTS[1], max_tokens=40, logprobs=2))
                outcomes["broken"] = failed.value

            async def fine() -> None:
                outcomes["fine"] = await sup.run(plain)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(broken)
                nursery.start_soon(fine)
            assert sup.statistics().pid == pid
    done = outcomes["fine"]
    assert isinstance(done, Completion) and done.text == want.text


async def test_logprobs_give_each_token_its_logprob_and_the_top_alternatives(
    demo_dir: Path, concurrency: int
) -> None:
    with trio.fail_after(BOUND):
        async with _open(demo_dir, concurrency=concurrency) as sup:
            tokens, done = await _collect(sup, Generate(prompt=PROMPTS[0], max_tokens=12, logprobs=3))
            bare, _ = await _collect(sup, Generate(prompt=PROMPTS[0], max_tokens=12, logprobs=0))
            plain, _ = await _collect(sup, Generate(prompt=PROMPTS[0], max_tokens=12))
    assert tokens and done.generation_tokens == len(tokens)
    for token in tokens:
        assert token.logprob is not None and token.logprob <= 0
        assert len(token.top_logprobs) == 3
        values = [value for _, _, value in token.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert token.top_logprobs[0][0] == token.token_id
        assert token.top_logprobs[0][2] == pytest.approx(token.logprob)
    assert all(t.logprob is not None and t.top_logprobs == () for t in bare)
    assert all(t.logprob is None and t.top_logprobs == () for t in plain)


async def test_a_repeated_prefix_is_served_from_the_prompt_cache_with_the_same_output(
    demo_dir: Path, concurrency: int
) -> None:
    system = "You are a helpful assistant who answers briefly. " * 8
    first = Generate(messages=[{"role": "system", "content": system}, {"role": "user", "content": "Hi"}])
    second = Generate(messages=[{"role": "system", "content": system}, {"role": "user", "content": "Bye"}])
    with trio.fail_after(BOUND):
        async with _open(demo_dir, concurrency=concurrency) as sup:
            one = await sup.run(Generate(**{**_fields(first), "max_tokens": 8}))
            two = await sup.run(Generate(**{**_fields(second), "max_tokens": 16}))
        async with _open(demo_dir, concurrency=concurrency, prompt_cache_bytes=0) as uncached:
            fresh = await uncached.run(Generate(**{**_fields(second), "max_tokens": 16}))
    assert one.cached_tokens == 0
    assert 0.5 * two.prompt_tokens < two.cached_tokens < two.prompt_tokens
    assert fresh.cached_tokens == 0
    assert two.text == fresh.text  # reused KV state gives what processing the prompt would


async def test_n_choices_stream_with_their_index_and_complete_as_choices(
    demo_dir: Path, concurrency: int
) -> None:
    with trio.fail_after(BOUND):
        async with _open(demo_dir, concurrency=concurrency) as sup:
            tokens, done = await _collect(
                sup, Generate(prompt=PROMPTS[0], max_tokens=16, n=3, temperature=1.5)
            )
            _, greedy = await _collect(sup, Generate(prompt=PROMPTS[0], max_tokens=16, n=2))
    assert [c.index for c in done.choices] == [0, 1, 2]
    for choice in done.choices:
        mine = [t for t in tokens if t.index == choice.index]
        assert "".join(t.text for t in mine) == choice.text
        assert len(mine) == choice.generation_tokens
    assert (done.text, done.finish_reason) == (done.choices[0].text, done.choices[0].finish_reason)
    assert len({c.text for c in done.choices}) > 1  # sampled: three sequences, not one copied
    assert greedy.choices[0].text == greedy.choices[1].text == greedy.text


def _fields(request: Generate) -> dict[str, Any]:
    return {name: getattr(request, name) for name in request.__dataclass_fields__}
