"""The OpenAI wire format: request bodies checked into a :class:`Generate`, and responses as JSON.

Pure functions with no trio and no I/O: every check happens here, before a
request can reach the runner, and each failure is a :class:`ApiError` that
already knows its HTTP status and its OpenAI-style error body.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from ..mlx._tools import ToolChat, ToolCompletion
from ..mlx._types import MAX_LOGPROBS, MAX_N, MAX_PENALTY, Choice, Completion, Generate, Token

Kind = Literal["chat", "completion"]
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# OpenAI's own ranges, so a client that works against OpenAI gets the same answers here.
_MAX_TEMPERATURE = 2.0
_MAX_STOPS = 4
_MAX_REPETITION_PENALTY = 10.0
# Every field a request may carry. Any other, including mlx-lm's extras (top_k, min_p, ...),
# gets 400 unsupported: a field this server accepted and then ignored would change nothing silently.
_COMMON_FIELDS = frozenset(
    {
        "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed", "n",
        "presence_penalty", "frequency_penalty", "logit_bias", "user",
        # mlx-lm's own sampling fields, which its clients send:
        "top_k", "min_p", "repetition_penalty", "repetition_context_size",
    }
)  # fmt: skip
_CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
    "functions", "audio", "prediction", "response_format",
}  # fmt: skip
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "suffix", "logprobs", "best_of"}


class ApiError(Exception):
    """An error answered with an OpenAI-style error body: ``{"error": {message, type, param, code}}``.

    Args:
        status: the HTTP status.
        message: one sentence that says what is wrong and how to fix it.
        type: OpenAI's error type, e.g. ``"invalid_request_error"``.
        param: the request field at fault, if any.
        code: a short machine-readable code, e.g. ``"model_not_found"``.
        retry_after: seconds for a ``Retry-After`` header (503 only).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


def error_body(
    message: str,
    *,
    type: str,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _invalid(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A checked request: what to generate, and how to answer."""

    kind: Kind
    generate: Generate
    stream: bool
    include_usage: bool
    model: str  # the name the request used, echoed in the response

    @property
    def buffered(self) -> bool:
        """A chat with tools: its text is sent when it ends, split into content and tool calls."""
        return isinstance(self.generate, ToolChat) and bool(self.generate.tools)


# mlx-lm's server answers to this name whatever it serves, and its clients and tests send it.
DEFAULT_MODEL_ALIAS = "default_model"


@dataclass(frozen=True, slots=True)
class Limits:
    """What the server accepts: the model's names and the token bounds.

    ``model_id`` is the model's own name; it also answers to ``default_model``
    and to each of ``aliases``. ``names`` lists them all, ``model_id`` first.
    """

    model_id: str
    default_max_tokens: int = 512
    max_tokens: int = 32768
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.model_id, DEFAULT_MODEL_ALIAS, *self.aliases)))


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(
            400, f"the request body is not valid JSON ({exc}); send a JSON object", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ApiError(
            400, f"the request body must be a JSON object, not {_json_type(body)}", code="invalid_type"
        )
    return cast(dict[str, Any], body)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _optional(body: Mapping[str, Any], name: str) -> Any:
    return body.get(name)


def _int(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = _optional(body, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"'{name}' must be an integer, not {_json_type(value)}", name, "invalid_type")
    if not low <= value <= high:
        raise _invalid(f"'{name}' is {value}; it must be between {low} and {high}", name)
    return value


def _number(
    body: Mapping[str, Any], name: str, low: float, high: float, *, open_low: bool = False
) -> float | None:
    value = _optional(body, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(f"'{name}' must be a number, not {_json_type(value)}", name, "invalid_type")
    number = float(value)
    if number > high or number < low or (open_low and number == low):
        bracket = "(" if open_low else "["
        raise _invalid(f"'{name}' is {value}; it must be in {bracket}{low:g}, {high:g}]", name)
    return number


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = _optional(body, name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(f"'{name}' must be true or false, not {_json_type(value)}", name, "invalid_type")
    return value


def _unsupported(param: str, why: str) -> ApiError:
    return _invalid(f"'{param}' {why} is not supported by this server; leave it out", param, "unsupported")


def _check_fields(body: Mapping[str, Any], known: frozenset[str]) -> None:
    for name in body:
        if name not in known:
            raise _invalid(
                f"'{name}' is not supported by this server; leave it out (docs/serve.md lists every field)",
                name,
                "unsupported",
            )


def _check_common(body: Mapping[str, Any], limits: Limits, known: frozenset[str]) -> str:
    """Check what both endpoints share; return the model name to answer with."""
    _check_fields(body, known)
    model = _optional(body, "model")
    if model is None:
        model = limits.model_id
    if not isinstance(model, str):
        raise _invalid(f"'model' must be a string, not {_json_type(model)}", "model", "invalid_type")
    if model not in limits.names:
        served = ", ".join(repr(name) for name in limits.names)
        raise ApiError(
            404,
            f"the model {model!r} does not exist here; this server answers to {served} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    return model


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = _optional(body, "stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _invalid(
            f"'stop' must be a string or an array of strings, not {_json_type(value)}", "stop", "invalid_type"
        )
    stops = cast(list[object], value)
    if len(stops) > _MAX_STOPS:
        raise _invalid(f"'stop' has {len(stops)} strings; give at most {_MAX_STOPS}", "stop")
    if not all(isinstance(s, str) and s for s in stops):
        raise _invalid("'stop' must hold non-empty strings", "stop", "invalid_type")
    return tuple(cast(list[str], stops))


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    options = _optional(body, "stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _invalid(
            f"'stream_options' must be an object, not {_json_type(options)}", "stream_options", "invalid_type"
        )
    if not stream:
        raise _invalid("'stream_options' is only allowed with \"stream\": true", "stream_options")
    checked = cast(dict[str, Any], options)
    for key in checked:
        if key != "include_usage":
            raise _unsupported(f"stream_options.{key}", "")
    return _bool(checked, "include_usage")


def _sampling(body: Mapping[str, Any], limits: Limits, max_tokens_names: Sequence[str]) -> dict[str, Any]:
    max_tokens: int | None = None
    for name in max_tokens_names:
        value = _int(body, name, 1, limits.max_tokens)
        if value is not None:
            max_tokens = value
    temperature = _number(body, "temperature", 0.0, _MAX_TEMPERATURE)
    top_p = _number(body, "top_p", 0.0, 1.0, open_low=True)
    seed = _int(body, "seed", 0, 2**63 - 1)
    fields: dict[str, Any] = {
        "max_tokens": limits.default_max_tokens if max_tokens is None else max_tokens,
        "temperature": 1.0 if temperature is None else temperature,
        "top_p": 1.0 if top_p is None else top_p,
        "stop": _stop(body),
        "seed": seed,
        "n": _int(body, "n", 1, MAX_N),
        "presence_penalty": _number(body, "presence_penalty", -MAX_PENALTY, MAX_PENALTY),
        "frequency_penalty": _number(body, "frequency_penalty", -MAX_PENALTY, MAX_PENALTY),
        "logit_bias": _logit_bias(body),
        "top_k": _int(body, "top_k", 0, 2**31 - 1),
        "min_p": _number(body, "min_p", 0.0, 1.0),
        "repetition_penalty": _number(
            body, "repetition_penalty", 0.0, _MAX_REPETITION_PENALTY, open_low=True
        ),
        "repetition_context_size": _int(body, "repetition_context_size", 1, limits.max_tokens),
    }
    # Absent fields keep Generate's defaults, so Generate stays the one source of them.
    return {name: value for name, value in fields.items() if value is not None or name == "seed"}


def _logit_bias(body: Mapping[str, Any]) -> dict[int, float] | None:
    """OpenAI's ``{"token id": bias}``, with string keys, as Generate's ``{id: bias}``."""
    value = _optional(body, "logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(
            f"'logit_bias' must be an object of token ids to biases, not {_json_type(value)}",
            "logit_bias",
            "invalid_type",
        )
    biases: dict[int, float] = {}
    for key, bias in cast(dict[str, object], value).items():
        if not key.isdigit():
            raise _invalid(f"'logit_bias' key {key!r} must be a token id (digits)", "logit_bias")
        if (
            isinstance(bias, bool)
            or not isinstance(bias, int | float)
            or not -100 <= bias <= 100  # NaN fails this too
        ):
            raise _invalid(
                f"'logit_bias[{key}]' is {bias!r}; it must be a number from -100 to 100", "logit_bias"
            )
        biases[int(key)] = float(bias)
    return biases


def _content(message: Mapping[str, Any], i: int) -> str:
    content = message.get("content")
    param = f"messages[{i}].content"
    if content is None:
        if message.get("role") == "assistant":
            return ""
        raise _invalid(f"'{param}' is missing", param, "missing_required_parameter")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in cast(list[object], content):
            if not isinstance(part, dict):
                raise _invalid(f"'{param}' parts must be objects", param, "invalid_type")
            entry = cast(dict[str, Any], part)
            if entry.get("type") != "text" or not isinstance(entry.get("text"), str):
                raise _unsupported(param, f"with a part of type {entry.get('type')!r} (only text)")
            texts.append(entry["text"])
        return "".join(texts)
    raise _invalid(f"'{param}' must be a string or an array of text parts", param, "invalid_type")


def _messages(body: Mapping[str, Any]) -> tuple[tuple[dict[str, str], ...], tuple[dict[str, Any], ...]]:
    """Each message's role and text, and each message whole (tool calls, tool call ids, names)."""
    messages = _optional(body, "messages")
    if messages is None:
        raise _invalid(
            "'messages' is required: an array of {role, content} objects",
            "messages",
            "missing_required_parameter",
        )
    if not isinstance(messages, list) or not messages:
        raise _invalid(
            "'messages' must be a non-empty array of {role, content} objects", "messages", "invalid_type"
        )
    checked: list[dict[str, str]] = []
    whole: list[dict[str, Any]] = []
    for i, message in enumerate(cast(list[object], messages)):
        if not isinstance(message, dict):
            raise _invalid(
                f"'messages[{i}]' must be an object with 'role' and 'content'",
                f"messages[{i}]",
                "invalid_type",
            )
        entry = cast(dict[str, Any], message)
        role = entry.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise _invalid(
                f"'messages[{i}].role' is {role!r}; it must be one of {sorted(_ROLES)}", f"messages[{i}].role"
            )
        checked.append({"role": _ROLES[role], "content": _content(entry, i)})
        whole.append(_whole_message(entry, i, checked[-1]))
    return tuple(checked), tuple(whole)


def _whole_message(entry: Mapping[str, Any], i: int, simple: dict[str, str]) -> dict[str, Any]:
    """The message as the chat template gets it; a part the server cannot pass on is refused."""
    whole: dict[str, Any] = dict(simple)
    for key, value in entry.items():
        param = f"messages[{i}].{key}"
        if key in ("role", "content") or value is None:
            continue  # a null field says nothing (clients echo "refusal": null, say)
        if key == "name" and isinstance(value, str):
            whole["name"] = value
        elif key == "tool_call_id" and simple["role"] == "tool" and isinstance(value, str):
            whole["tool_call_id"] = value
        elif key == "tool_calls" and simple["role"] == "assistant":
            whole["tool_calls"] = _history_tool_calls(value, param)
        else:
            raise _unsupported(param, f"on a {simple['role']} message")
    return whole


def _history_tool_calls(value: object, param: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _invalid(f"'{param}' must be an array of tool calls", param, "invalid_type")
    calls: list[dict[str, Any]] = []
    for j, call in enumerate(cast(list[object], value)):
        entry = cast(dict[str, Any], call) if isinstance(call, dict) else {}
        found = entry.get("function")
        function = cast(dict[str, Any], found if isinstance(found, dict) else {})
        name = function.get("name")
        if not isinstance(name, str):
            raise _invalid(
                f"'{param}[{j}]' must be {{id, type: function, function: {{name, arguments}}}}",
                f"{param}[{j}]",
                "invalid_type",
            )
        arguments = function.get("arguments") or "{}"
        try:
            # Templates index the arguments (tool_call.arguments.city), so they get an object.
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            raise _invalid(
                f"'{param}[{j}].function.arguments' is not valid JSON", f"{param}[{j}]", "invalid_value"
            ) from None
        calls.append(
            {
                "id": entry.get("id") or f"call_{j}",
                "type": "function",
                "function": {"name": name, "arguments": parsed},
            }
        )
    return calls


def _tools(body: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """The request's function tools, checked; none when ``tool_choice`` is ``"none"``."""
    tools = _optional(body, "tools")
    tool_choice = _optional(body, "tool_choice")
    if tool_choice not in (None, "none", "auto"):
        # Forcing a call ("required", or a named function) needs constrained decoding.
        raise _unsupported("tool_choice", f"= {tool_choice!r} (only 'auto' and 'none')")
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise _invalid(f"'tools' must be an array, not {_json_type(tools)}", "tools", "invalid_type")
    checked: list[dict[str, Any]] = []
    for i, tool in enumerate(cast(list[object], tools)):
        entry = cast(dict[str, Any], tool) if isinstance(tool, dict) else {}
        function = entry.get("function")
        if entry.get("type") != "function" or not isinstance(function, dict):
            raise _unsupported(f"tools[{i}]", "other than {type: function, function: {...}}")
        if not isinstance(cast(dict[str, Any], function).get("name"), str):
            raise _invalid(f"'tools[{i}].function.name' must be a string", f"tools[{i}]", "invalid_type")
        checked.append(entry)
    return () if tool_choice == "none" else tuple(checked)


def _build(
    kind: Kind,
    body: Mapping[str, Any],
    model: str,
    fields: dict[str, Any],
    request: type[Generate] = Generate,
) -> ParsedRequest:
    stream = _bool(body, "stream")
    include_usage = _stream_options(body, stream)
    try:
        generate = request(**fields)
    except (TypeError, ValueError) as exc:  # Generate's own checks: the last word on what the runner accepts
        raise _invalid(str(exc), None) from None
    return ParsedRequest(kind, generate, stream, include_usage, model)


def parse_chat(body: Mapping[str, Any], limits: Limits) -> ParsedRequest:
    """Check a ``POST /v1/chat/completions`` body."""
    model = _check_common(body, limits, _CHAT_FIELDS)
    logprobs = _bool(body, "logprobs")
    top_logprobs = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise _invalid("'top_logprobs' needs \"logprobs\": true", "top_logprobs")
    for name in ("functions", "audio", "prediction"):
        if _optional(body, name):
            raise _unsupported(name, "")
    response_format = _optional(body, "response_format")
    if response_format is not None and response_format != {"type": "text"}:
        # json_object and json_schema need constrained decoding, which this server does not do.
        raise _unsupported("response_format", 'other than {"type": "text"}')
    fields = _sampling(body, limits, ("max_tokens", "max_completion_tokens"))
    if logprobs:
        fields["logprobs"] = top_logprobs or 0
    simple, whole = _messages(body)
    tools = _tools(body)
    if not tools and whole == simple:
        return _build("chat", body, model, {"messages": simple, **fields})
    if tools and fields.get("n", 1) != 1:
        raise _unsupported("n", "with tools")
    return _build(
        "chat", body, model, {"messages": simple, "chat": whole, "tools": tools, **fields}, ToolChat
    )


def parse_completion(body: Mapping[str, Any], limits: Limits) -> ParsedRequest:
    """Check a ``POST /v1/completions`` body."""
    model = _check_common(body, limits, _COMPLETION_FIELDS)
    prompt = _optional(body, "prompt")
    if prompt is None:
        raise _invalid("'prompt' is required: a string", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(cast(list[object], prompt)) == 1:
        prompt = cast(list[object], prompt)[0]
    if not isinstance(prompt, str):
        raise _invalid(
            "'prompt' must be a string (or an array of exactly one string)", "prompt", "invalid_type"
        )
    if _bool(body, "echo"):
        raise _unsupported("echo", "= true")
    if _optional(body, "suffix") is not None:
        raise _unsupported("suffix", "")
    logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
    best_of = _int(body, "best_of", 1, 128)
    if best_of is not None and best_of != 1:
        raise _unsupported("best_of", f"= {best_of}")
    fields = _sampling(body, limits, ("max_tokens",))
    if logprobs is not None:
        fields["logprobs"] = logprobs
    return _build("completion", body, model, {"prompt": prompt, **fields})


# -- responses ------------------------------------------------------------------------


def dumps(obj: object) -> bytes:
    # ASCII-escaped: a token's text is whatever the tokenizer decoded, and this never fails to encode.
    return json.dumps(obj, separators=(",", ":")).encode()


def new_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def choices_of(completion: Completion) -> tuple[Choice, ...]:
    """Every choice of a completion (one built by hand may leave ``choices`` empty)."""
    if completion.choices:
        return completion.choices
    return (Choice(0, completion.text, completion.finish_reason, completion.generation_tokens),)


def usage(completion: Completion) -> dict[str, Any]:
    generated = sum(choice.generation_tokens for choice in choices_of(completion))
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": completion.prompt_tokens + generated,
        "prompt_tokens_details": {"cached_tokens": completion.cached_tokens},
    }


def _chat_logprob(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def logprobs_of(kind: Kind, tokens: Sequence[Token], offset: int = 0) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object for these tokens of one choice (``offset``: its text so far)."""
    if kind == "chat":
        content = [
            {
                **_chat_logprob(token.text, token.logprob or 0.0),
                "top_logprobs": [_chat_logprob(text, lp) for _id, text, lp in token.top_logprobs],
            }
            for token in tokens
        ]
        return {"content": content, "refusal": None}
    offsets: list[int] = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {
        "tokens": [token.text for token in tokens],
        "token_logprobs": [token.logprob for token in tokens],
        "top_logprobs": [{text: lp for _id, text, lp in token.top_logprobs} for token in tokens],
        "text_offset": offsets,
    }


def chat_message(completion: Completion) -> tuple[dict[str, Any], str]:
    """The assistant message's ``content`` (and ``tool_calls``), and the finish reason.

    A completion with tool calls finishes with ``"tool_calls"``, and its
    content is the text outside them (null when there is none), as OpenAI's.
    """
    if not isinstance(completion, ToolCompletion):
        return {"content": completion.text}, completion.finish_reason
    if not completion.tool_calls:
        return {"content": completion.content}, completion.finish_reason
    calls = [
        {
            "id": call["id"],
            "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]},
        }
        for call in completion.tool_calls
    ]
    return {"content": completion.content or None, "tool_calls": calls}, "tool_calls"


def response_body(
    kind: Kind, model: str, completion: Completion, tokens: Sequence[Token] | None = None
) -> dict[str, Any]:
    """A whole non-streamed response, with ``usage``; ``tokens`` for ``logprobs``, when asked."""
    choices: list[dict[str, Any]] = []
    for choice in choices_of(completion):
        logprobs = None
        if tokens is not None:
            logprobs = logprobs_of(kind, [token for token in tokens if token.index == choice.index])
        if kind == "chat":
            # Tools come with one choice only, so a ToolCompletion's split is choice 0's.
            message, finish = (
                chat_message(completion)
                if choice.index == 0
                else ({"content": choice.text}, choice.finish_reason)
            )
            entry: dict[str, Any] = {"index": choice.index, "message": {"role": "assistant", **message}}
        else:
            finish = choice.finish_reason
            entry = {"index": choice.index, "text": choice.text}
        choices.append({**entry, "logprobs": logprobs, "finish_reason": finish})
    return {
        "id": new_id(kind),
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(completion),
    }


class ChunkWriter:
    """The SSE events of one streamed response, each ``data: <json>\\n\\n`` bytes."""

    def __init__(self, kind: Kind, model: str, logprobs: bool = False) -> None:
        self.kind: Kind = kind
        self.logprobs = logprobs
        self.offsets: dict[int, int] = {}  # completions: each choice's text so far, for text_offset
        self.head = {
            "id": new_id(kind),
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + dumps({**self.head, "choices": choices, **extra}) + b"\n\n"

    def _choice(
        self,
        text: str | None,
        finish: str | None,
        index: int = 0,
        role: bool = False,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, str] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def start(self, n: int = 1) -> bytes | None:
        """The opening chunks (chat: the assistant role, one per choice), or None."""
        if self.kind != "chat":
            return None
        return b"".join(self._event([self._choice("", None, index, role=True)]) for index in range(n))

    def text(self, text: str, index: int = 0) -> bytes:
        return self._event([self._choice(text, None, index)])

    def token(self, token: Token) -> bytes:
        """A token's chunk, with its ``logprobs`` when the request asked for them."""
        logprobs = None
        if self.logprobs:
            offset = self.offsets.get(token.index, 0)
            logprobs = logprobs_of(self.kind, [token], offset)
            self.offsets[token.index] = offset + len(token.text)
        return self._event([self._choice(token.text, None, token.index, logprobs=logprobs)])

    def finish(self, completion: Completion, include_usage: bool) -> bytes:
        """The closing chunk of each choice with its finish reason, the usage chunk if asked, ``[DONE]``.

        A chat with tools streams nothing until it ends (a tool call is only
        known whole), so its content and tool calls come here, before the end.
        """
        out = b""
        finishes = {choice.index: str(choice.finish_reason) for choice in choices_of(completion)}
        if isinstance(completion, ToolCompletion):
            message, finishes[0] = chat_message(completion)
            if message["content"]:
                out += self.text(message["content"])
            calls = cast(list[dict[str, Any]], message.get("tool_calls", []))
            if calls:
                deltas = [{"index": i, **call} for i, call in enumerate(calls)]
                choice = {
                    "index": 0,
                    "delta": {"tool_calls": deltas},
                    "logprobs": None,
                    "finish_reason": None,
                }
                out += self._event([choice])
        for index, finish in finishes.items():
            out += self._event([self._choice(None if self.kind == "chat" else "", finish, index)])
        if include_usage:
            out += self._event([], usage=usage(completion))
        return out + b"data: [DONE]\n\n"

    @staticmethod
    def error(error: ApiError) -> bytes:
        """An OpenAI-style error event; the stream ends after it, without ``[DONE]``."""
        return b"data: " + dumps(error.body()) + b"\n\n"
