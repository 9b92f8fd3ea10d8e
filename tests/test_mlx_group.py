"""A 2-rank MLX group under the supervisor: ``open_mlx_supervisor(..., ranks=2, parallel="tensor")``.

Contract tests against real processes. ``import mlx_lm`` in two ranks at once
takes 12-19 s on two cores, so one module-scoped story runs the group once
(in a trio run of its own, from a sync fixture) and the tests each check one
part of what it recorded: the greedy output against a single process, then a
SIGKILL of rank 1 mid-generation and the request after it. Last, ``trio-runner
serve --ranks 2 --parallel tensor`` answers a completion.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

from trio_runner import ExitReason, RestartPolicy, RunnerCrashed, open_supervisor
from trio_runner.mlx import Generate, MlxLmRunner, open_mlx_supervisor, start_options

from .serve_process import serve_process

pytest.importorskip("mlx_lm", reason="the mlx extra is not installed")

# Generous: two ranks loading mlx-lm on a loaded 2-core machine, twice; only a hang breaks it.
BOUND = 300
FAST = RestartPolicy(initial_delay=0.05, max_delay=0.2, max_restarts=5)
GREEDY = Generate(prompt="Beautiful is better than", max_tokens=40, temperature=0.0)
# Long enough to be mid-generation when the kill lands (the context is 2048 tokens).
LONG = Generate(prompt="Beautiful is", max_tokens=1500, temperature=0.0)
KILL_AFTER_EVENTS = 2


@dataclass
class Story:
    single: list[int] = field(default_factory=list[int])
    group: list[int] = field(default_factory=list[int])
    pids_before: tuple[int | None, ...] = ()
    crash: RunnerCrashed | None = None
    events_before_crash: int = 0
    after: list[int] = field(default_factory=list[int])
    pids_after: tuple[int | None, ...] = ()
    failed_rank: int | None = None
    restarts: int = 0


async def _tokens(sup: object, request: Generate) -> list[int]:
    ids: list[int] = []
    async with sup.stream(request) as task:  # type: ignore[attr-defined]
        async for token in task:
            ids.append(token.token_id)
    return ids


async def _tell(demo_dir: Path) -> Story:
    story = Story()
    with trio.fail_after(BOUND):
        # The single-stream path, as the group's ranks run it.
        async with open_supervisor(
            MlxLmRunner, str(demo_dir), kwargs={"concurrency": 1}, **start_options()
        ) as sup:
            story.single = await _tokens(sup, GREEDY)
        async with open_mlx_supervisor(demo_dir, parallel="tensor", ranks=2, policy=FAST) as sup:
            story.group = await _tokens(sup, GREEDY)
            story.pids_before = sup.statistics().pids
            victim = story.pids_before[1]
            assert victim is not None
            try:
                async with sup.stream(LONG) as task:
                    async for _ in task:
                        story.events_before_crash += 1
                        if story.events_before_crash == KILL_AFTER_EVENTS:
                            os.kill(victim, signal.SIGKILL)
            except RunnerCrashed as exc:
                story.crash = exc
            story.after = await _tokens(sup, GREEDY)
            stats = sup.statistics()
            story.pids_after = stats.pids
            story.failed_rank = stats.failed_rank
            story.restarts = stats.restarts
    return story


@pytest.fixture(scope="module")
def story(demo_dir: Path) -> Story:
    return trio.run(_tell, demo_dir)


def test_a_two_rank_tensor_group_generates_the_single_process_tokens(story: Story) -> None:
    assert len(story.single) == 40
    assert story.group == story.single


def test_sigkill_of_rank_1_mid_generation_fails_the_request_with_runner_crashed_naming_it(
    story: Story,
) -> None:
    assert story.crash is not None, "the request completed although rank 1 was killed"
    assert story.events_before_crash >= KILL_AFTER_EVENTS
    record = story.crash.exit
    assert (record.rank, record.reason, record.signal) == (1, ExitReason.SIGNALED, signal.SIGKILL)
    assert story.failed_rank == 1


def test_after_a_rank_is_killed_the_group_restarts_whole_and_serves_the_next_request(story: Story) -> None:
    assert story.restarts == 1
    assert len(story.pids_after) == 2 and None not in story.pids_after
    assert not set(story.pids_after) & set(story.pids_before)
    assert story.after == story.single


def test_serve_with_two_tensor_ranks_answers_a_completion(demo_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(demo_dir), "--ranks", "2", "--parallel", "tensor"]
    body = {
        "model": "default_model",
        "prompt": "Beautiful is better than",
        "max_tokens": 12,
        "temperature": 0,
    }
    with serve_process(args, tmp_path) as server:
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=BOUND)
        health = httpx.get(f"{server.url}/health", timeout=BOUND).json()
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["usage"]["completion_tokens"] >= 1 and completion["choices"][0]["text"]
    assert health["state"] == "ready"
    said = server.output()
    assert "(rank 0 of 2, incarnation 1)" in said and "(rank 1 of 2, incarnation 1)" in said, said
