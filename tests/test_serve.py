"""``trio-runner serve``: the OpenAI-compatible API, against a real server on loopback.

Contract tests: each test runs the server in its own trio loop, in process,
on an ephemeral 127.0.0.1 port, over a real supervised MLX runner on the
offline demo model, and talks to it with real clients (httpx, and the official
``openai`` client). The SIGTERM tests run the command itself in a subprocess.
Timing bounds are generous; timing claims live in benchmarks/bench_serve.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio

from trio_runner import RestartPolicy, RunnerState, Supervisor, open_supervisor
from trio_runner.mlx import Completion, Generate, MlxLmRunner, Token, start_options

from .conftest import process_gone
from .test_serve_runners import SlowMlxLmRunner

pytest.importorskip("mlx_lm", reason="the mlx extra is not installed")
pytest.importorskip("hypercorn", reason="the serve extra is not installed")

from trio_runner.serve import OpenAIServer, run_server
from trio_runner.serve._openai import ApiError, Limits, parse_completion

pytestmark = [
    pytest.mark.usefixtures("demo_dir"),
    # trio warns when an async generator is garbage collected unexhausted. The HTTP clients'
    # own generators nested inside a response stream are, when a test stops reading early
    # (closing the response closes the connection but not those generators): not our code.
    pytest.mark.filterwarnings(
        r"ignore:Async generator '(httpx2?|httpcore2?|openai)\.[\w.]+' was garbage collected:ResourceWarning"
    ),
]

BOUND = 60
MODEL = "trio-runner-demo"
FAST = RestartPolicy(initial_delay=0.05)
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "seed": 1}

Sup = Supervisor[Generate, Token, Completion]


@asynccontextmanager
async def serving(
    runner: type[MlxLmRunner] = MlxLmRunner,
    *,
    policy: RestartPolicy = FAST,
    ready_wait: float = 5.0,
    grace: float = 5.0,
) -> AsyncIterator[tuple[OpenAIServer, Sup, httpx.AsyncClient]]:
    """A server on an ephemeral loopback port over a READY runner, and an httpx client for it."""
    options = start_options()
    model = os.environ["TRIO_RUNNER_DEMO_MODEL"]
    with trio.fail_after(BOUND):
        async with open_supervisor(
            runner,
            model,
            kwargs={"preloaded": options["start_method"] == "forkserver"},
            policy=policy,
            raise_on_give_up=False,
            name="serve-test",
            **options,
        ) as sup:
            await sup.wait_ready()
            async with trio.open_nursery() as nursery:
                server: OpenAIServer = await nursery.start(
                    functools.partial(
                        run_server, sup, model_id=MODEL, port=0, ready_wait=ready_wait, grace=grace
                    )
                )
                async with httpx.AsyncClient(base_url=server.url, timeout=BOUND) as client:
                    yield server, sup, client
                server.shutdown()


def _events(lines: list[str]) -> list[Any]:
    """The ``data:`` payloads of an SSE body, JSON-decoded (``[DONE]`` stays a string)."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def _sse(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[Any]:
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async with aclosing(response.aiter_lines()) as lines:
            return _events([line async for line in lines])


async def _wait_until(predicate: Any, what: str, bound: float = 10.0) -> None:
    with trio.fail_after(bound):
        while not predicate():  # noqa: ASYNC110 - supervisor statistics have no event to wait on
            await trio.sleep(0.01)


# -- the routes ------------------------------------------------------------------------


async def test_health_reports_state_pid_incarnation_restarts_and_last_exit() -> None:
    async with serving() as (_, sup, client):
        response = await client.get("/health")
        pid = sup.statistics().pid
    assert response.status_code == 200
    health = response.json()
    assert health["state"] == "ready" and health["status"] == "ok"
    assert health["pid"] == pid is not None
    assert health["incarnation"] == 1 and health["restarts"] == 0 and health["last_exit"] is None
    assert health["server_pid"] == os.getpid()


async def test_models_lists_the_served_model() -> None:
    async with serving() as (_, _sup, client):
        response = await client.get("/v1/models")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [MODEL, "default_model"]
    assert response.json()["object"] == "list"


async def test_by_default_no_api_key_is_needed_and_no_origin_is_allowed() -> None:
    preflight_headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    async with serving() as (_, _sup, client):
        models = await client.get("/v1/models", headers={"Origin": "https://app.example"})
        preflight = await client.options("/v1/chat/completions", headers=preflight_headers)
    assert models.status_code == 200
    assert "access-control-allow-origin" not in models.headers
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers


async def test_a_runner_that_does_not_know_tool_chats_gets_500_rather_than_dropping_the_tool_calls() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    async with serving() as (server, _sup, client):  # a plain MlxLmRunner, not ToolMlxLmRunner
        response = await client.post("/v1/chat/completions", json={**CHAT, "messages": messages})
        failed = server.metrics.requests["chat", "failed"]
    assert response.status_code == 500, response.text
    assert response.json()["error"]["code"] == "tools_not_served"
    assert failed == 1


async def test_chat_completion_is_openai_shaped_and_includes_usage() -> None:
    async with serving() as (_, _sup, client):
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 8 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_completion_with_the_same_seed_gives_the_same_text() -> None:
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 12, "seed": 7, "temperature": 0.8}
    async with serving() as (_, _sup, client):
        first = await client.post("/v1/completions", json=body)
        second = await client.post("/v1/completions", json=body)
    assert first.status_code == second.status_code == 200
    assert first.json()["object"] == "text_completion"
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]
    assert first.json()["usage"]["completion_tokens"] > 0


async def test_streamed_chat_is_sse_chunks_ending_with_done_and_usage_when_asked() -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with serving() as (_, _sup, client):
        events = await _sse(client, "/v1/chat/completions", body)
        plain = (await client.post("/v1/chat/completions", json=CHAT)).json()
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]  # seeded: the same text either way
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] in ("stop", "length")
    # The same counts; cached_tokens differ, as the second request finds the first's prompt cached.
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert chunks[-1]["choices"] == []
    assert [chunks[-1]["usage"][k] for k in counts] == [plain["usage"][k] for k in counts]


async def test_streamed_completion_ends_with_done() -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 5, "stream": True}
    async with serving() as (_, _sup, client):
        events = await _sse(client, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" not in events[-2]


async def test_the_official_openai_client_chats_streams_and_lists_models() -> None:
    openai = pytest.importorskip("openai")
    async with serving() as (server, _sup, _client):
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        async with client:
            models = await client.models.list()
            chat = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, seed=3
            )
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Hello"}],
                max_tokens=8,
                seed=3,
                stream=True,
            )
            async with stream:
                pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert [m.id for m in models.data] == [MODEL, "default_model"]
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    assert "".join(pieces) == chat.choices[0].message.content


async def test_metrics_are_prometheus_text_with_restarts_crashes_in_flight_tokens_and_lateness() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async with serving() as (_, _sup, client):
        await client.post("/v1/chat/completions", json=CHAT)
        response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert samples["trio_runner_restarts_total", ()] == 0
    assert samples["trio_runner_crashes_total", (("reason", "signaled"),)] == 0
    assert samples["trio_runner_in_flight_tasks", ()] == 0
    assert 0 < samples["trio_runner_tokens_generated_total", ()] <= 8
    assert samples["trio_runner_loop_lateness_max_seconds", ()] >= 0
    assert samples["trio_runner_requests_total", (("endpoint", "chat"), ("outcome", "ok"))] == 1
    assert samples["trio_runner_up", ()] == 1


# -- a client that leaves --------------------------------------------------------------


async def test_a_streaming_client_that_disconnects_cancels_its_task_in_the_runner() -> None:
    body = {**CHAT, "max_tokens": 1000, "stream": True}  # about 20 s at the slow runner's speed
    async with serving(SlowMlxLmRunner) as (server, sup, client):
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async with aclosing(response.aiter_lines()) as lines:
                async for line in lines:
                    if line.startswith('data: {"id"'):
                        break
            assert sup.statistics().in_flight == 1
        left = trio.current_time()
        await _wait_until(lambda: sup.statistics().in_flight == 0, "the task to be cancelled", bound=5)
        cancelled_after = trio.current_time() - left
        metrics = server.metrics
        await _wait_until(lambda: metrics.requests["chat", "disconnected"] == 1, "the outcome")
        assert sup.statistics().tasks_completed == 1
    assert cancelled_after < 10.0  # a runner finishing the request would take about 20 s
    assert metrics.tokens_generated < 100


async def test_a_non_streaming_client_that_disconnects_cancels_its_task_in_the_runner() -> None:
    body = {**CHAT, "max_tokens": 1000}
    async with serving(SlowMlxLmRunner) as (server, sup, client):
        with trio.move_on_after(0.5):
            await client.post("/v1/chat/completions", json=body)
        assert sup.statistics().in_flight == 1 or sup.statistics().pending == 1
        await _wait_until(lambda: sup.statistics().in_flight == 0, "the task to be cancelled", bound=5)
        await _wait_until(lambda: server.metrics.requests["chat", "disconnected"] == 1, "the outcome")
    assert server.metrics.tokens_generated < 100


# -- a runner that crashes -------------------------------------------------------------


async def test_sigkill_mid_stream_ends_the_stream_with_an_error_event_and_the_next_request_is_served() -> (
    None
):
    body = {**CHAT, "max_tokens": 1000, "stream": True}
    async with serving(SlowMlxLmRunner) as (_server, sup, client):
        pid = sup.statistics().pid
        assert pid is not None
        lines: list[str] = []
        with trio.fail_after(BOUND):
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async with aclosing(response.aiter_lines()) as stream:
                    async for line in stream:
                        lines.append(line)
                        if line.startswith("data: ") and len(_events(lines)) == 3:
                            os.kill(pid, signal.SIGKILL)
        events = _events(lines)
        assert "[DONE]" not in events
        error = events[-1]["error"]
        assert error["type"] == "runner_crashed" and error["code"] == "signaled"
        assert "SIGKILL" in error["message"]
        after = await client.post("/v1/chat/completions", json=CHAT)
        assert after.status_code == 200, after.text
        health = (await client.get("/health")).json()
    assert health["restarts"] == 1 and health["pid"] != pid
    assert health["last_exit"]["reason"] == "signaled" and health["last_exit"]["signal"] == "SIGKILL"


async def test_sigkill_during_a_non_streamed_request_gets_503_runner_crashed_json_and_is_counted() -> None:
    body = {**CHAT, "max_tokens": 1000}
    async with serving(SlowMlxLmRunner) as (server, sup, client):
        pid = sup.statistics().pid
        assert pid is not None
        async with trio.open_nursery() as nursery:
            responses: list[httpx.Response] = []

            async def post() -> None:
                responses.append(await client.post("/v1/chat/completions", json=body))

            nursery.start_soon(post)
            await _wait_until(lambda: server.metrics.tokens_generated > 0, "the first token")
            os.kill(pid, signal.SIGKILL)
        (response,) = responses
        crashed = server.metrics.requests["chat", "crashed"]
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "runner_crashed" and error["code"] == "signaled"
    assert crashed == 1


async def test_requests_during_backoff_wait_a_bounded_time_then_get_503_with_retry_after() -> None:
    policy = RestartPolicy(initial_delay=5.0)
    async with serving(policy=policy, ready_wait=0.3) as (server, sup, client):
        pid = sup.statistics().pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await _wait_until(lambda: sup.state is RunnerState.BACKING_OFF, "the backoff")
        began = trio.current_time()
        response = await client.post("/v1/chat/completions", json=CHAT)
        waited = trio.current_time() - began
        health = await client.get("/health")
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 503
    assert 1 <= int(response.headers["retry-after"]) <= 5
    assert response.json()["error"]["code"] == "backing_off"
    assert "SIGKILL" in response.json()["error"]["message"]
    assert 0.25 <= waited < 3.0
    assert health.status_code == 503 and health.json()["state"] == "backing_off"
    assert 'trio_runner_crashes_total{reason="signaled"} 1.0' in metrics
    assert server.metrics.requests["chat", "unavailable"] == 1


async def test_a_request_during_a_short_backoff_is_served_after_the_restart() -> None:
    policy = RestartPolicy(initial_delay=0.3)
    async with serving(policy=policy, ready_wait=10.0) as (_server, sup, client):
        pid = sup.statistics().pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await _wait_until(lambda: sup.state is RunnerState.BACKING_OFF, "the backoff")
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text


async def test_after_the_policy_gives_up_every_request_gets_503_and_health_says_failed() -> None:
    policy = RestartPolicy(max_restarts=0)
    async with serving(policy=policy, ready_wait=0.3) as (_server, sup, client):
        pid = sup.statistics().pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await _wait_until(lambda: sup.state is RunnerState.FAILED, "the give-up")
        chat = await client.post("/v1/chat/completions", json=CHAT)
        stream = await client.post("/v1/completions", json={"prompt": "a", "stream": True})
        health = await client.get("/health")
    for response in (chat, stream):
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "gave_up"
    assert health.status_code == 503
    assert health.json()["state"] == "failed" and "gave up" in health.json()["detail"]


# -- bad input never reaches the runner (the field checks: tests/test_serve_api.py) ------


async def test_a_body_declared_over_the_limit_gets_413_before_it_is_read() -> None:
    # In process, with the async client: a server that answers before reading can race a
    # client still writing the body, which then sees the connection close instead of the 413.
    async with serving() as (_server, sup, client):
        response = await client.post(
            "/v1/completions", content=b"x" * (1024 * 1024 + 1), headers={"content-type": "application/json"}
        )
        assert sup.statistics().tasks_completed == 0
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


async def test_a_chunked_body_over_the_limit_gets_413() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 65536

    async with serving() as (_server, sup, client):
        response = await client.post("/v1/completions", content=chunks())
        assert sup.statistics().tasks_completed == 0
    assert response.status_code == 413


# -- shutting down ---------------------------------------------------------------------


async def test_shutdown_gives_a_stream_in_flight_the_grace_period_then_ends_it_with_an_error_event() -> None:
    body = {**CHAT, "max_tokens": 1000, "stream": True}
    async with serving(SlowMlxLmRunner, grace=0.5) as (server, sup, client):
        lines: list[str] = []
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async with aclosing(response.aiter_lines()) as stream:
                async for line in stream:
                    lines.append(line)
                    if line.startswith("data: ") and len(_events(lines)) == 2:
                        began = trio.current_time()
                        server.shutdown()
        took = trio.current_time() - began
        await _wait_until(lambda: sup.statistics().in_flight == 0, "the task to be cancelled", bound=5)
    events = _events(lines)
    assert events[-1]["error"]["code"] == "shutting_down"
    assert 0.4 <= took < 5.0


COMMAND = [sys.executable, "-m", "trio_runner"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_the_command_gracefully_exit_0_and_no_process_left(signum: int) -> None:
    # Its output is read through trio.to_thread.
    with _serve_process("--grace", "1") as proc:
        code, err, lines, runner_pid = await _serve_until_signal(proc, signum)
    assert code == 0, err
    assert "Traceback" not in err
    assert f"{signal.Signals(signum).name} received, shutting down gracefully" in err
    assert "received again" not in err
    events = _events(lines)
    assert events[-1] == "[DONE]" or events[-1]["error"]["code"] == "shutting_down"
    assert process_gone(runner_pid)


def _serve_process(*args: str) -> subprocess.Popen[str]:
    """``trio-runner serve --port 0 ARGS``, its output piped; starting it does not block."""
    return subprocess.Popen(
        [*COMMAND, "serve", "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


async def _serve_until_signal(proc: subprocess.Popen[str], signum: int) -> tuple[int, str, list[str], int]:
    """Wait for the server and its runner, stream a chat, signal the server mid-stream; let it exit."""
    try:
        url, runner_pid = await _wait_for_server(proc)
        body = {**CHAT, "max_tokens": 100000 // 100, "stream": True}
        lines: list[str] = []
        async with httpx.AsyncClient(base_url=url, timeout=BOUND) as client:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async with aclosing(response.aiter_lines()) as stream:
                    async for line in stream:
                        lines.append(line)
                        if line.startswith("data: ") and len(_events(lines)) == 2:
                            proc.send_signal(signum)
        code = await trio.to_thread.run_sync(functools.partial(proc.wait, timeout=BOUND))
        _, err = proc.communicate()
        return code, err, lines, runner_pid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _wait_for_server(proc: subprocess.Popen[str]) -> tuple[str, int]:
    """The URL of a ``serve`` command started with ``--port 0``, and its runner's pid, once it is ready."""
    assert proc.stdout is not None
    url = None
    runner_pid = None
    with trio.fail_after(BOUND):
        while url is None or runner_pid is None:
            line = await trio.to_thread.run_sync(proc.stdout.readline)
            assert line, proc.stderr.read() if proc.stderr else ""
            if found := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line):
                url = found[1]
            if found := re.search(r"runner ready: pid (\d+)", line):
                runner_pid = int(found[1])
    return url, runner_pid


async def test_serve_with_batch_size_1_serves_one_request_at_a_time(demo_dir: Path) -> None:
    eos = json.loads((demo_dir / "config.json").read_text())["eos_token_id"]
    # The long request cannot end early: its end-of-sequence token is banned.
    long = {**CHAT, "max_tokens": 400, "stream": True, "logit_bias": {str(eos): -100}}
    long_seen = 0
    long_seen_at_short_start = -1

    async def short(client: httpx.AsyncClient) -> None:
        nonlocal long_seen_at_short_start
        body = {**CHAT, "max_tokens": 4, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async with aclosing(response.aiter_lines()) as stream:
                async for line in stream:
                    if _has_content(line) and long_seen_at_short_start < 0:
                        long_seen_at_short_start = long_seen

    with _serve_process("--batch-size", "1") as proc:
        try:
            url, _ = await _wait_for_server(proc)
            async with (
                httpx.AsyncClient(base_url=url, timeout=BOUND) as client,
                trio.open_nursery() as nursery,
            ):
                async with client.stream("POST", "/v1/chat/completions", json=long) as response:
                    async with aclosing(response.aiter_lines()) as stream:
                        async for line in stream:
                            if _has_content(line):
                                long_seen += 1
                                if long_seen == 1:
                                    nursery.start_soon(short, client)
        finally:
            proc.terminate()
            proc.communicate(timeout=BOUND)
    # Batched, the short request's first token comes a few steps after it is
    # sent, while the long one streams on; one at a time, only after the long one ended.
    assert long_seen > 100
    assert long_seen_at_short_start > long_seen // 2


def _has_content(line: str) -> bool:
    """Whether an SSE line of a streamed chat carries generated text (not the opening role chunk)."""
    events = _events([line])
    return bool(events) and events[0] != "[DONE]" and bool(events[0]["choices"][0]["delta"].get("content"))


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_serve_batch_size_must_be_an_integer_of_1_or_more(value: str) -> None:
    result = subprocess.run(
        [*COMMAND, "serve", "--batch-size", value], capture_output=True, text=True, check=False, timeout=BOUND
    )
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "argument --batch-size:" in result.stderr and "Traceback" not in result.stderr


# -- packaging -------------------------------------------------------------------------


def test_importing_trio_runner_does_not_import_the_server_stack() -> None:
    code = (
        "import sys, trio_runner, trio_runner.mlx; "
        "print(sorted(m for m in ('hypercorn', 'starlette', 'prometheus_client', 'trio_runner.serve') "
        "if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_serve_usage_errors_are_one_line_and_exit_2() -> None:
    result = subprocess.run(
        [*COMMAND, "serve", "--port", "70000"], capture_output=True, text=True, check=False, timeout=BOUND
    )
    assert result.returncode == 2
    assert "must be a port number" in result.stderr and "Traceback" not in result.stderr


# -- options are checked at the call, by the shared checks ---------------------------------


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("grace", "5", TypeError),
        ("grace", -1, ValueError),
        ("ready_wait", None, TypeError),
        ("ready_wait", float("nan"), ValueError),
        ("max_body_size", 1.5, TypeError),
        ("max_body_size", 0, ValueError),
        ("port", "8000", TypeError),
        ("port", 70_000, ValueError),
        ("default_max_tokens", "512", TypeError),
        ("default_max_tokens", 0, ValueError),
        ("served_model_names", "gpt", TypeError),
        ("served_model_names", [""], ValueError),
        ("allow_origins", "https://a.example", TypeError),
        ("allow_origins", [None], TypeError),
        ("api_key", 5, TypeError),
        ("api_key", "", ValueError),
    ],
)
async def test_a_bad_server_option_raises_at_the_call_naming_it_wrong_type_type_error_wrong_value_value_error(
    option: str, value: object, error: type[Exception]
) -> None:
    # Nothing is served: the checks come before the supervisor is used or a socket is bound.
    with pytest.raises(error, match=rf"^{option}\b"):
        await run_server(cast(Any, None), **{"model_id": MODEL, "port": 0, option: value})


async def test_a_bad_api_key_is_refused_without_its_value_in_the_message() -> None:
    with pytest.raises(ValueError, match=r"^api_key") as raised:
        await run_server(cast(Any, None), model_id=MODEL, api_key="s3cret\n")
    assert "s3cret" not in str(raised.value)


def test_a_field_generate_refuses_for_its_type_is_a_400_naming_it_like_a_bad_value() -> None:
    # The server checks each JSON field itself first; whatever still reaches Generate
    # and fails its checks, TypeError or ValueError, is the client's 400, never a 500.
    limits = Limits(MODEL, default_max_tokens=cast(Any, "9"))
    with pytest.raises(ApiError) as raised:
        parse_completion({"model": MODEL, "prompt": "Hi"}, limits)
    assert raised.value.status == 400 and raised.value.message.startswith("max_tokens=")


_ = Path
