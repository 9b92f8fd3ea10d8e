"""Contract tests of the MLX runner on the offline demo model, in real child processes.

Each test opens its own supervisor: with the forkserver (mlx-lm preloaded) a
runner is ready in tens of milliseconds, so only the first start of the
session pays for launching the forkserver and compiling MLX's CPU kernels.
Timing bounds are generous; timing claims live in benchmarks/bench_mlx.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

import trio_runner
from trio_runner import RestartPolicy, RunnerCrashed, TaskCancelled, TaskFailed
from trio_runner.mlx import Completion, Generate, MlxLmRunner, Token, open_mlx_supervisor
from trio_runner.mlx._model import DEMO_MODEL_ENV, verify_demo_model

from .conftest import build_demo_model
from .test_serve_runners import SlowMlxLmRunner

pytest.importorskip("mlx_lm", reason="the mlx extra is not installed")

BOUND = 60
FAST = RestartPolicy(initial_delay=0.05)


async def _collect(sup: Any, request: Generate) -> tuple[list[Token], Completion]:
    tokens: list[Token] = []
    async with sup.stream(request) as task:
        async for token in task:
            tokens.append(token)
    return tokens, task.result


# -- the package stays light ---------------------------------------------------------


def test_importing_trio_runner_mlx_imports_neither_mlx_nor_trio() -> None:
    code = (
        "import sys, trio_runner, trio_runner.mlx; "
        "print(sorted(m for m in ('mlx', 'mlx_lm', 'transformers', 'trio') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# -- requests are validated where they are written ------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"prompt": "a", "max_tokens": 0},
        {"prompt": "a", "temperature": -0.1},
        {"prompt": "a", "temperature": float("nan")},
        {"prompt": "a", "top_p": 0.0},
        {"prompt": "a", "top_p": 1.5},
        {"prompt": "a", "stop": [""]},
        {"prompt": "a", "stop": ""},
        {"prompt": "a", "seed": -1},
        {"messages": []},
        {"messages": [{"role": "robot", "content": "hi"}]},
    ],
)
def test_an_invalid_generate_value_raises_value_error_that_names_the_field(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"prompt|messages|max_tokens|temperature|top_p|stop|seed"):
        Generate(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": 3}, "prompt"),
        ({"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "a", "max_tokens": "8"}, "max_tokens"),
        ({"prompt": "a", "temperature": "0.5"}, "temperature"),
        ({"prompt": "a", "top_p": None}, "top_p"),
        ({"prompt": "a", "stop": 5}, "stop"),
        ({"prompt": "a", "stop": ["a", 5]}, r"stop\[1\]"),
        ({"prompt": "a", "seed": 1.0}, "seed"),
        ({"messages": "hello"}, "messages"),
        ({"messages": ["hello"]}, r"messages\[0\]"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]\['content'\]"),
        ({"messages": [{"content": "hi"}]}, r"messages\[0\]\['role'\]"),
    ],
)
def test_a_generate_field_of_the_wrong_type_raises_type_error_that_names_it(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(TypeError, match=rf"^{field}[= ].*must be"):
        Generate(**kwargs)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", -1),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("repetition_context_size", 0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("frequency_penalty", float("nan")),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {12: float("nan")}),
        ("logprobs", 21),
        ("logprobs", -1),
        ("n", 0),
        ("n", 17),
    ],
)
def test_an_invalid_sampling_value_raises_value_error_that_says_the_allowed_range(
    field: str, value: object
) -> None:
    with pytest.raises(ValueError, match=rf"{field}.*must|{field}.*pass"):
        Generate(prompt="a", **{field: value})  # pyright: ignore[reportArgumentType]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k", 2.5),
        ("min_p", "0.1"),
        ("repetition_penalty", True),
        ("presence_penalty", None),
        ("logit_bias", {"12": 1.0}),
        ("logit_bias", {12: "1"}),
        ("logit_bias", [(12, 1.0)]),
        ("logprobs", 2.0),
        ("n", "2"),
    ],
)
def test_a_sampling_field_of_the_wrong_type_raises_type_error(field: str, value: object) -> None:
    with pytest.raises(TypeError, match=rf"^{field}.* must be"):
        Generate(prompt="a", **{field: value})  # pyright: ignore[reportArgumentType]


def test_the_sampling_surface_accepts_its_documented_bounds() -> None:
    request = Generate(
        prompt="a",
        top_k=1,
        min_p=1,
        repetition_penalty=1.3,
        repetition_context_size=1,
        presence_penalty=-2,
        frequency_penalty=2,
        logit_bias={0: -100, 7: 5},
        logprobs=20,
        n=16,
    )
    assert request.logit_bias == {0: -100.0, 7: 5.0}


def test_a_single_stop_string_is_accepted_as_a_one_element_tuple() -> None:
    assert Generate(prompt="a", stop="\n").stop == ("\n",)


# -- generation ----------------------------------------------------------------------------


async def test_tokens_stream_and_the_completion_counts_and_joins_them(demo_dir: Path) -> None:
    with trio.fail_after(BOUND):
        async with open_mlx_supervisor(demo_dir) as sup:
            tokens, completion = await _collect(sup, Generate(prompt="Hello, world", max_tokens=24))
    assert 1 <= len(tokens) <= 24
    assert completion.generation_tokens == len(tokens)
    assert completion.text == "".join(token.text for token in tokens)
    assert all(0 <= token.token_id < 512 for token in tokens)
    assert completion.finish_reason == ("length" if len(tokens) == 24 else "stop")
    assert completion.prompt_tokens > 0
    assert completion.generation_tps > 0 and completion.prompt_tps > 0
    assert 0 < completion.time_to_first_token < 10


async def test_the_same_seed_gives_the_same_text_and_another_seed_another(demo_dir: Path) -> None:
    def sampled(seed: int) -> Generate:
        return Generate(prompt="Once upon a time", max_tokens=40, temperature=1.0, seed=seed)

    with trio.fail_after(BOUND):
        async with open_mlx_supervisor(demo_dir) as sup:
            first = await sup.run(sampled(1))
            other = await sup.run(sampled(2))
            again = await sup.run(sampled(1))
        # A fresh process started another way gives the same text too.
        async with open_mlx_supervisor(demo_dir, start_method="spawn") as sup:
            spawned = await sup.run(sampled(1))
    assert first.text == again.text == spawned.text
    assert first.text != other.text


async def test_unseeded_sampling_differs_between_forked_runners(demo_dir: Path) -> None:
    # Forkserver children share MLX's random state unless each one is seeded.
    request = Generate(prompt="Once upon a time", max_tokens=40, temperature=1.0)
    with trio.fail_after(BOUND):
        async with open_mlx_supervisor(demo_dir, start_method="forkserver", policy=FAST) as sup:
            first = await sup.run(request)
            pid = sup.statistics().pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            changes = sup.watch()
            async for change in changes:
                if isinstance(change, trio_runner.Ready):
                    break
            second = await sup.run(request)
    assert first.text != second.text


async def test_chat_messages_go_through_the_chat_template(demo_dir: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    rendered = "<|system|>Be brief.<|end|><|user|>Hi there<|end|><|assistant|>"
    with trio.fail_after(BOUND):
        async with open_mlx_supervisor(demo_dir) as sup:
            chat = await sup.run(Generate(messages=messages, max_tokens=16))
            plain = await sup.run(Generate(prompt=rendered, max_tokens=16))
            bare = await sup.run(Generate(prompt="Hi there", max_tokens=16))
    assert chat.prompt_tokens == plain.prompt_tokens > bare.prompt_tokens
    assert chat.text == plain.text


async def test_a_stop_string_ends_generation_before_it_with_finish_reason_stop(demo_dir: Path) -> None:
    with trio.fail_after(BOUND):
        async with open_mlx_supervisor(demo_dir) as sup:
            free = await sup.run(Generate(prompt="The quick brown fox", max_tokens=64))
            assert len(free.text) >= 12, free
            stop = free.text[6:9]
            cut = free.text.find(stop)
            tokens, stopped = await _collect(
                sup, Generate(prompt="The quick brown fox", max_tokens=64, stop=["\x00never", stop])
            )
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:cut]
    assert "".join(token.text for token in tokens) == stopped.text
    assert stopped.generation_tokens == len(tokens)


@pytest.mark.parametrize(
    "runner",
    [SlowMlxLmRunner, MlxLmRunner],
    ids=["each-token-at-once", "batched-50ms-linger"],
)
async def test_after_cancel_returns_no_more_tokens_arrive_and_the_runner_serves_on(
    demo_dir: Path, runner: type[MlxLmRunner]
) -> None:
    # The real runner lingers 50 ms to batch tokens: dozens are queued in the
    # child or in flight when the consumer cancels. Cancel means stop, batched
    # or not; the slow runner (50 tok/s, no linger) checks the per-token cancel.
    with trio.fail_after(BOUND):
        async with trio_runner.open_supervisor(
            runner, str(demo_dir), **trio_runner.mlx.start_options()
        ) as sup:
            await sup.wait_ready()
            pid = sup.statistics().pid
            after_cancel = 0
            seen = 0
            with pytest.raises(TaskCancelled):
                async with sup.stream(Generate(prompt="Count", max_tokens=2000)) as task:
                    async for _ in task:
                        seen += 1
                        if seen == 5:
                            await task.cancel()
                        elif seen > 5:
                            after_cancel += 1
            assert (seen, after_cancel) == (5, 0)
            # The runner survives the cancel and serves the next request.
            assert (await sup.run(Generate(prompt="Next", max_tokens=3))).generation_tokens >= 1
            assert sup.statistics().pid == pid


async def test_invalid_requests_fail_at_the_call_and_leave_the_runner_untouched(demo_dir: Path) -> None:
    with trio.fail_after(BOUND):
        async with open_mlx_supervisor(demo_dir) as sup:
            await sup.wait_ready()
            before = sup.statistics()
            with pytest.raises(ValueError, match="max_tokens"):
                await sup.run(Generate(prompt="x", max_tokens=0))
            with pytest.raises(ValueError, match="top_p"):
                await sup.run(Generate(prompt="x", top_p=2))
            after = sup.statistics()
            assert after.pid == before.pid and after.incarnation == before.incarnation
            assert after.tasks_completed == before.tasks_completed  # nothing reached the runner
            assert (await sup.run(Generate(prompt="x", max_tokens=2))).generation_tokens >= 1


async def test_a_request_of_another_type_fails_its_task_only(demo_dir: Path) -> None:
    with trio.fail_after(BOUND):
        async with open_mlx_supervisor(demo_dir) as sup:
            await sup.wait_ready()
            pid = sup.statistics().pid
            with pytest.raises(TaskFailed, match="Generate"):
                await sup.run("not a Generate")  # type: ignore[arg-type]
            assert sup.statistics().pid == pid


async def test_a_prompt_longer_than_the_context_fails_its_task_with_a_clear_message(demo_dir: Path) -> None:
    with trio.fail_after(BOUND):
        async with open_mlx_supervisor(demo_dir) as sup:
            await sup.wait_ready()
            pid = sup.statistics().pid
            with pytest.raises(
                TaskFailed, match=r"the prompt is \d+ tokens, but the model's context is 2048"
            ):
                await sup.run(Generate(prompt="zq " * 3000, max_tokens=4))
            assert sup.statistics().pid == pid
            assert (await sup.run(Generate(prompt="ok", max_tokens=2))).generation_tokens >= 1


async def test_sigkill_mid_generation_fails_with_runner_crashed_then_the_restart_serves(
    demo_dir: Path,
) -> None:
    with trio.fail_after(BOUND):
        async with trio_runner.open_supervisor(
            SlowMlxLmRunner, str(demo_dir), policy=FAST, **trio_runner.mlx.start_options()
        ) as sup:
            await sup.wait_ready()
            pid = sup.statistics().pid
            assert pid is not None
            seen = 0
            with pytest.raises(RunnerCrashed) as crashed:
                async with sup.stream(Generate(prompt="Long", max_tokens=500)) as task:
                    async for _ in task:
                        seen += 1
                        if seen == 3:
                            os.kill(pid, signal.SIGKILL)
            assert crashed.value.exit.signal_name == "SIGKILL"
            completion = await sup.run(Generate(prompt="After", max_tokens=5))
            assert completion.generation_tokens >= 1
            assert sup.statistics().pid != pid
            assert sup.statistics().restarts == 1


# -- the demo model ------------------------------------------------------------------


def test_the_cached_demo_model_verifies(demo_dir: Path) -> None:
    assert verify_demo_model(demo_dir) is None
    names = {path.name for path in demo_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


async def test_greedy_generation_on_the_demo_model_is_mostly_words_of_its_training_text(
    demo_dir: Path,
) -> None:
    from trio_runner.mlx._model import training_text

    with trio.fail_after(BOUND):
        async with open_mlx_supervisor(demo_dir) as sup:
            completion = await sup.run(Generate(prompt="Once upon a time", max_tokens=200))
    assert completion.generation_tokens == 200
    words = completion.text.split()
    known = [word for word in words if word in set(training_text().split())]
    assert len(known) >= 0.6 * len(words), completion.text


def test_a_corrupt_demo_model_is_detected_and_rebuilt_with_a_warning(demo_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(demo_dir, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "model.safetensors" in (verify_demo_model(copy) or "")
    result = build_demo_model({**os.environ, DEMO_MODEL_ENV: str(copy)})
    assert result.returncode == 0, result.stderr
    assert "is unusable (model.safetensors does not match its recorded hash); rebuilding it" in result.stderr
    assert verify_demo_model(copy) is None
    # The rebuild is the same model (training is seeded), and nothing is left beside it.
    assert weights.read_bytes() == (demo_dir / "model.safetensors").read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def test_a_partial_demo_model_without_its_manifest_is_reported(demo_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert verify_demo_model(tmp_path) == "trio-runner-demo.json is missing"


@pytest.mark.skipif(sys.platform != "linux", reason="MLX compiles CPU kernels to a disk cache on Linux only")
async def test_a_cold_kernel_cache_is_warmed_once_in_a_throwaway_process(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trio_runner.mlx import warm_kernel_cache
    from trio_runner.mlx._supervise import kernel_cache_cold, kernel_cache_dir

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # a machine that never ran MLX
    cache = kernel_cache_dir()
    assert cache is not None and str(cache).startswith(str(tmp_path))
    assert kernel_cache_cold()
    with trio.fail_after(BOUND):
        assert await warm_kernel_cache(demo_dir) is True
    # Compiled by a process that is gone: the kernels are on disk, and no
    # process is left behind (the autouse fixture checks that too).
    assert any(cache.glob("*.so"))
    assert not kernel_cache_cold()
    # Warm now: no throwaway process is started (instead of a timing bound).
    import trio_parallel

    def no_worker_process(*args: object, **kwargs: object) -> None:
        raise AssertionError("a warm cache started a worker process")

    monkeypatch.setattr(trio_parallel, "open_worker_context", no_worker_process)
    assert await warm_kernel_cache(demo_dir) is False
