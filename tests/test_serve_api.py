"""``trio-runner serve``'s OpenAI surface, against one real server process shared by the module.

Contract tests: the command runs as a subprocess on an ephemeral 127.0.0.1
port over the offline demo model, and the tests talk to it with raw httpx and
the official ``openai`` client. Nothing here crashes the runner or stops the
server (tests/test_serve.py does, each with a server of its own), so one
server serves every test and the module stays fast.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .serve_process import BOUND, COMMAND, ServeProcess, serve_process

pytest.importorskip("mlx_lm", reason="the mlx extra is not installed")
pytest.importorskip("hypercorn", reason="the serve extra is not installed")

MODEL = "trio-runner-demo"
ALIASES = ("chat_model", "gpt-4o-mini")
KEY = "sk-test-0123456789"
ORIGIN = "https://app.example"
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(demo_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    args = [arg for alias in ALIASES for arg in ("--served-model-name", alias)]
    args += ["--allow-origin", ORIGIN]
    env = {**os.environ, "TRIO_RUNNER_API_KEY": KEY}  # the key from the environment, as documented
    with serve_process(args, tmp_path_factory.mktemp("serve"), env=env) as running:
        yield running


@pytest.fixture
def client(server: ServeProcess) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=BOUND, headers=headers) as http:
        yield http


@pytest.fixture
def anonymous(server: ServeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=BOUND) as http:
        yield http


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert error["message"]
    return error


def _requests_total(client: httpx.Client, endpoint: str, outcome: str) -> float:
    text = client.get("/metrics").text
    label = f'trio_runner_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}} '
    lines = [line for line in text.splitlines() if line.startswith(label)]
    return float(lines[0].split()[-1]) if lines else 0.0


# -- bad input never reaches the runner ---------------------------------------------------

BAD_INPUT = [
    pytest.param("/v1/chat/completions", b"{not json", 400, "invalid_json", id="invalid-json"),
    pytest.param("/v1/chat/completions", b"[1, 2]", 400, "invalid_type", id="not-an-object"),
    pytest.param(
        "/v1/chat/completions", {"model": MODEL}, 400, "missing_required_parameter", id="no-messages"
    ),
    pytest.param("/v1/completions", {"model": MODEL}, 400, "missing_required_parameter", id="no-prompt"),
    pytest.param("/v1/chat/completions", {"messages": "hi"}, 400, "invalid_type", id="messages-not-list"),
    pytest.param(
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        400,
        "invalid_value",
        id="role",
    ),
    pytest.param("/v1/completions", {"prompt": 5}, 400, "invalid_type", id="prompt-not-string"),
    pytest.param(
        "/v1/completions", {"prompt": "a", "max_tokens": "9"}, 400, "invalid_type", id="max-tokens-type"
    ),
    pytest.param("/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "invalid_type", id="stream-type"),
    pytest.param(
        "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "invalid_value", id="max-tokens-0"
    ),
    pytest.param(
        "/v1/completions", {"prompt": "a", "max_tokens": 10**9}, 400, "invalid_value", id="max-tokens-huge"
    ),
    pytest.param(
        "/v1/completions", {"prompt": "a", "temperature": 2.5}, 400, "invalid_value", id="temperature"
    ),
    pytest.param("/v1/completions", {"prompt": "a", "top_p": 0}, 400, "invalid_value", id="top-p"),
    pytest.param("/v1/completions", {"prompt": "a", "seed": -1}, 400, "invalid_value", id="seed"),
    pytest.param("/v1/completions", {"prompt": "a", "n": 17}, 400, "invalid_value", id="n"),
    pytest.param("/v1/completions", {"prompt": "a", "stop": ["a"] * 5}, 400, "invalid_value", id="stops"),
    pytest.param("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model_not_found", id="model"),
]


def _metric(client: httpx.Client, name: str) -> float:
    (line,) = [line for line in client.get("/metrics").text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[-1])


@pytest.mark.parametrize(("path", "body", "status", "code"), BAD_INPUT)
def test_bad_input_gets_an_openai_error_and_never_reaches_the_runner(
    client: httpx.Client, path: str, body: bytes | dict[str, Any], status: int, code: str
) -> None:
    tokens = _metric(client, "trio_runner_tokens_generated_total")
    endpoint = "chat" if "chat" in path else "completions"
    refused = _requests_total(client, endpoint, "bad_request")
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    error = _error(response, status)
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert _metric(client, "trio_runner_tokens_generated_total") == tokens
    assert _metric(client, "trio_runner_in_flight_tasks") == 0
    assert _requests_total(client, endpoint, "bad_request") == refused + 1


# -- what the server cannot honour, it refuses -------------------------------------------


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "xtc_probability", 0.5),
        ("/v1/chat/completions", "parallel_tool_calls", False),
        ("/v1/chat/completions", "some_future_field", True),
    ],
)
def test_a_field_the_server_cannot_honour_gets_400_unsupported_naming_it(
    client: httpx.Client, path: str, field: str, value: object
) -> None:
    body = {**CHAT} if "chat" in path else {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
    error = _error(client.post(path, json={**body, field: value}), 400)
    assert error["code"] == "unsupported" and error["param"] == field
    assert field in error["message"]


def test_a_stream_option_the_server_cannot_honour_gets_400_unsupported(client: httpx.Client) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    error = _error(client.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "unsupported" and error["param"] == "stream_options.continuous_usage_stats"


def test_a_prompt_longer_than_the_context_gets_400_invalid_prompt_and_is_counted(
    client: httpx.Client,
) -> None:
    before = _requests_total(client, "completions", "bad_request")
    body = {"model": MODEL, "prompt": "one two three four " * 2000, "max_tokens": 4}
    error = _error(client.post("/v1/completions", json=body), 400)
    assert error["code"] == "invalid_prompt" and "context" in error["message"]
    assert _requests_total(client, "completions", "bad_request") == before + 1


# -- sampling fields, n, logprobs and the prompt cache, mapped onto the runner's Generate ------

PROMPT = {"model": MODEL, "prompt": "Once upon a time there was", "max_tokens": 16}


def _completion(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/completions", json={**PROMPT, **fields})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _text(body: dict[str, Any]) -> str:
    text: str = body["choices"][0]["text"]
    return text


@pytest.mark.parametrize("narrowing", [{"top_k": 1}, {"min_p": 1.0}])
def test_top_k_1_or_min_p_1_sample_the_most_likely_token_like_greedy(
    client: httpx.Client, narrowing: dict[str, Any]
) -> None:
    greedy = _text(_completion(client, temperature=0))
    assert _text(_completion(client, temperature=1.5, seed=11, **narrowing)) == greedy
    assert _text(_completion(client, temperature=1.5, seed=11)) != greedy  # without it, sampling differs


def test_a_repetition_penalty_stops_the_greedy_text_repeating_its_tokens(client: httpx.Client) -> None:
    greedy = _completion(client, temperature=0, logprobs=0)["choices"][0]["logprobs"]["tokens"]
    penalised = _completion(
        client, temperature=0, logprobs=0, repetition_penalty=10, repetition_context_size=64
    )["choices"][0]["logprobs"]["tokens"]
    repeated = [token for token in greedy if token]
    assert len(set(repeated)) < len(repeated)  # the demo model repeats itself when greedy
    kept = [token for token in penalised if token]
    assert penalised != greedy and len(set(kept)) == len(kept)


def test_logit_bias_with_openai_s_string_keys_makes_the_biased_token_win_every_step(
    client: httpx.Client,
) -> None:
    greedy = _text(_completion(client, temperature=0))
    biased = _completion(client, temperature=0, logprobs=0, logit_bias={"100": 100})
    tokens = biased["choices"][0]["logprobs"]["tokens"]
    assert _text(biased) != greedy
    assert len(set(tokens[:-1])) == 1 and biased["usage"]["completion_tokens"] == 16


def test_n_gives_that_many_choices_and_usage_counts_every_choice_s_tokens(client: httpx.Client) -> None:
    body = _completion(client, n=3, max_tokens=4, temperature=1.0)
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 12  # 4 each: the demo model rarely stops early
    assert len({choice["text"] for choice in body["choices"]}) > 1


def test_a_streamed_chat_with_n_2_streams_both_choices_and_finishes_each(client: httpx.Client) -> None:
    body = {**CHAT, "n": 2, "max_tokens": 4, "temperature": 1.0, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event)["choices"][0] for event in events[:-1]]
    assert {chunk["index"] for chunk in chunks} == {0, 1}
    finishes = [chunk for chunk in chunks if chunk["finish_reason"]]
    assert sorted(chunk["index"] for chunk in finishes) == [0, 1]


def test_chat_logprobs_give_each_token_its_logprob_and_top_alternatives(client: httpx.Client) -> None:
    body = {**CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 3}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == response.json()["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        assert entry["bytes"] == list(entry["token"].encode())
        best = entry["top_logprobs"][0]["logprob"]
        assert all(alt["logprob"] <= best for alt in entry["top_logprobs"])


def test_completion_logprobs_are_openai_s_legacy_lists_of_equal_length(client: httpx.Client) -> None:
    logprobs = _completion(client, max_tokens=5, logprobs=2)["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 5
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0


def test_streamed_chat_logprobs_come_with_each_token_chunk(server: ServeProcess) -> None:
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            logprobs=True,
            top_logprobs=2,
            stream=True,
        )
        with_logprobs = [c for c in stream if c.choices and c.choices[0].logprobs]
    assert with_logprobs
    for chunk in with_logprobs:
        (entry,) = chunk.choices[0].logprobs.content or []  # pyright: ignore[reportOptionalMemberAccess]
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2


def test_a_repeated_long_prompt_reports_cached_tokens_from_the_prompt_cache(client: httpx.Client) -> None:
    prompt = "A system prompt that every request of this test repeats. " * 30
    first = _completion(client, prompt=prompt, max_tokens=2)["usage"]
    second = _completion(client, prompt=prompt + "And one more line.", max_tokens=2)["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] < first["prompt_tokens"]
    assert second["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"] // 2


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("logit_bias", {"a": 1}, "invalid_value"),
        ("logit_bias", {"5": 500}, "invalid_value"),
        ("n", 17, "invalid_value"),
        ("top_k", -1, "invalid_value"),
        ("min_p", 1.5, "invalid_value"),
        ("repetition_penalty", 0, "invalid_value"),
        ("logprobs", 21, "invalid_value"),
    ],
)
def test_sampling_fields_out_of_range_get_400_naming_them(
    client: httpx.Client, field: str, value: object, code: str
) -> None:
    error = _error(client.post("/v1/completions", json={**PROMPT, field: value}), 400)
    assert error["code"] == code and error["param"] == field


def test_top_logprobs_without_logprobs_gets_400(client: httpx.Client) -> None:
    error = _error(client.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 2}), 400)
    assert error["param"] == "top_logprobs"


# -- response_format and tools -------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
    ],
)
def test_a_json_response_format_gets_400_unsupported_as_there_is_no_constrained_decoding(
    client: httpx.Client, response_format: dict[str, Any]
) -> None:
    error = _error(
        client.post("/v1/chat/completions", json={**CHAT, "response_format": response_format}), 400
    )
    assert error["code"] == "unsupported" and error["param"] == "response_format"


def test_response_format_text_is_served(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json={**CHAT, "response_format": {"type": "text"}})
    assert response.status_code == 200, response.text


def test_tools_for_a_model_whose_template_has_no_tool_call_format_get_400_unsupported(
    client: httpx.Client,
) -> None:
    # The demo model's template renders role and content only.
    before = _requests_total(client, "chat", "bad_request")
    error = _error(client.post("/v1/chat/completions", json={**CHAT, "tools": [WEATHER]}), 400)
    assert error["code"] == "unsupported" and error["param"] == "tools"
    assert "tool-call format" in error["message"]
    assert _requests_total(client, "chat", "bad_request") == before + 1


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "weather"}}])
def test_a_tool_choice_that_forces_a_call_gets_400_unsupported(
    client: httpx.Client, tool_choice: object
) -> None:
    body = {**CHAT, "tools": [WEATHER], "tool_choice": tool_choice}
    error = _error(client.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "unsupported" and error["param"] == "tool_choice"


def test_tool_calls_and_tool_results_in_the_history_are_served_through_the_openai_client(
    server: ServeProcess,
) -> None:
    openai = pytest.importorskip("openai")
    messages: list[Any] = [
        {"role": "user", "content": "What is 2+3?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
        chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, stream=True)
        chunks = list(stream)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.choices[0].message.tool_calls is None
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_malformed_tool_call_in_the_history_gets_400(client: httpx.Client) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{not json"}}
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "user", "content": "x"},
    ]
    error = _error(client.post("/v1/chat/completions", json={**CHAT, "messages": messages}), 400)
    assert error["param"] == "messages[0].tool_calls[0]" and error["code"] == "invalid_value"


# -- model names -------------------------------------------------------------------------


def test_models_lists_the_model_default_model_and_every_served_model_name(client: httpx.Client) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    assert [model["id"] for model in response.json()["data"]] == [MODEL, "default_model", *ALIASES]


@pytest.mark.parametrize("name", [MODEL, "default_model", *ALIASES])
def test_a_request_under_any_served_name_is_served_and_answers_with_that_name(
    client: httpx.Client, name: str
) -> None:
    response = client.post("/v1/chat/completions", json={**CHAT, "model": name, "max_tokens": 1})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == name


def test_the_model_s_own_name_is_the_demo_s_a_directory_s_name_or_the_repo_id(tmp_path: Path) -> None:
    from trio_runner.serve import DEMO_MODEL_ID, model_id_for

    directory = tmp_path / "Qwen3-0.6B-4bit"
    directory.mkdir()
    assert model_id_for(None) == DEMO_MODEL_ID == MODEL
    assert model_id_for(str(directory)) == "Qwen3-0.6B-4bit"
    assert model_id_for("mlx-community/Qwen3-0.6B-4bit") == "mlx-community/Qwen3-0.6B-4bit"


def test_a_request_without_a_model_is_answered_with_the_model_s_own_name(client: httpx.Client) -> None:
    body = {"prompt": "Hi", "max_tokens": 1}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == MODEL


def test_an_unknown_model_name_gets_404_model_not_found_listing_the_served_names(
    client: httpx.Client,
) -> None:
    error = _error(client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-5"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert all(repr(name) in error["message"] for name in (MODEL, "default_model", *ALIASES))


def test_the_openai_client_lists_the_served_names_and_chats_under_an_alias(server: ServeProcess) -> None:
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
        names = [model.id for model in client.models.list()]
        chat = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
    assert names == [MODEL, "default_model", *ALIASES]
    assert chat.model == "gpt-4o-mini" and chat.choices[0].finish_reason in ("stop", "length")


# -- API key -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/metrics"),
    ],
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", KEY])
def test_without_the_api_key_every_route_but_health_gets_401_in_openai_s_shape(
    anonymous: httpx.Client, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = anonymous.request(method, path, json=CHAT, headers=headers)
    error = _error(response, 401)
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert response.headers["www-authenticate"] == "Bearer"
    assert KEY not in response.text


def test_health_stays_open_without_the_api_key(anonymous: httpx.Client) -> None:
    response = anonymous.get("/health")
    assert response.status_code == 200 and response.json()["state"] == "ready"


def test_the_openai_client_with_a_wrong_key_raises_authentication_error(server: ServeProcess) -> None:
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            client.models.list()
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"


# -- CORS ------------------------------------------------------------------------------------


def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(anonymous: httpx.Client) -> None:
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    response = anonymous.options("/v1/chat/completions", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


def test_responses_to_an_allowed_origin_carry_the_cors_header_even_a_401(anonymous: httpx.Client) -> None:
    ok = anonymous.post(
        "/v1/completions",
        json={"prompt": "Hi", "max_tokens": 1},
        headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"},
    )
    refused = anonymous.get("/v1/models", headers={"Origin": ORIGIN})
    assert ok.status_code == 200 and refused.status_code == 401
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert refused.headers["access-control-allow-origin"] == ORIGIN


def test_an_origin_that_is_not_allowed_gets_no_cors_headers(anonymous: httpx.Client) -> None:
    headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    preflight = anonymous.options("/v1/chat/completions", headers=headers)
    health = anonymous.get("/health", headers={"Origin": "https://evil.example"})
    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in health.headers


# -- the command ---------------------------------------------------------------------------


def test_serve_on_a_port_in_use_prints_one_line_and_exits_1_before_starting_a_runner() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*COMMAND, "--port", str(port)], capture_output=True, text=True, check=False, timeout=BOUND
        )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0]
    assert "runner" not in result.stdout  # it failed before starting one
