"""Tool calling for the MLX runner: a chat with tools, rendered by the model's template, and its parsing.

Child-side and trio-free (the runner imports it). The chat template decides
how tools and tool calls are written, and mlx-lm's tokenizer wrapper knows
which templates have a tool-call format (``has_tool_calling``, the start and
end markers, and a parser for what lies between). So the runner renders and
parses, and a template without that format refuses tools rather than
silently dropping them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, cast

from .._runner import TaskContext
from ._runner import MlxLmRunner
from ._types import Completion, Generate, Token

ToolParser = Callable[[str, Any], Any]


class ToolsUnsupported(ValueError):
    """The model's chat template has no tool-call format, so it cannot be given tools."""


@dataclass(frozen=True, slots=True)
class ToolChat(Generate):
    """A chat :class:`Generate` whose template also sees tools and the tool calls in the history.

    ``messages`` holds each message's role and text (what :class:`Generate`
    checks); ``chat`` holds the same messages whole, as the template gets them:
    an assistant's ``tool_calls`` (arguments as objects) and a tool result's
    ``tool_call_id``. ``tools`` are OpenAI function specs.
    """

    chat: tuple[Mapping[str, Any], ...] = ()
    tools: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class ToolCompletion(Completion):
    """A :class:`Completion` of a :class:`ToolChat` with tools: the text split into content and calls.

    ``text`` is still everything generated (as the tokens streamed it);
    ``content`` is the text outside the tool calls, and each of ``tool_calls``
    is ``{"id", "name", "arguments"}`` with the arguments as a JSON string.
    """

    content: str = ""
    tool_calls: tuple[Mapping[str, str], ...] = field(default=())


def split_tool_calls(
    text: str, start: str, end: str, parse: ToolParser, tools: Sequence[Mapping[str, Any]] | None
) -> tuple[str, list[dict[str, str]]]:
    """Split generated text into the content outside tool calls and the calls, parsed.

    A call is whatever lies between ``start`` and ``end`` (to the end of the
    text when ``end`` is empty or missing, as with a call cut off by
    ``max_tokens``). ``parse`` is the template's parser (mlx-lm's
    ``tool_parser``); a call it cannot parse stays in the content, so nothing
    generated is lost.
    """
    content: list[str] = []
    calls: list[dict[str, str]] = []
    rest = text
    while (at := rest.find(start)) >= 0:
        content.append(rest[:at])
        body_at = at + len(start)
        close = rest.find(end, body_at) if end else -1
        body = rest[body_at:] if close < 0 else rest[body_at:close]
        after = len(rest) if close < 0 else close + len(end)
        try:
            parsed = parse(body, tools)
            found = [
                _call(call) for call in cast(list[Any], parsed if isinstance(parsed, list) else [parsed])
            ]
        except (ValueError, KeyError, TypeError):  # malformed or cut off (JSONDecodeError is a ValueError)
            content.append(rest[at:after])
        else:
            calls.extend(found)
        rest = rest[after:]
    content.append(rest)
    return "".join(content), calls


def _call(parsed: Any) -> dict[str, str]:
    entry = cast(Mapping[str, Any], parsed)
    arguments = entry.get("arguments", {})
    return {
        "id": str(entry.get("id") or f"call_{uuid.uuid4().hex[:24]}"),
        "name": str(entry["name"]),
        "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
    }


class ToolMlxLmRunner(MlxLmRunner):
    """:class:`MlxLmRunner` that also serves :class:`ToolChat`: the server's runner.

    A :class:`ToolChat` is rendered with its whole messages and its tools,
    and its result is a :class:`ToolCompletion` (its text split into content
    and tool calls when it has tools). Tools for a model
    whose template has no tool-call format fail the task with
    :class:`ToolsUnsupported` (a ``ValueError``).
    """

    def encode(self, request: Generate) -> list[int]:
        if not isinstance(request, ToolChat):
            return super().encode(request)
        tokenizer = self.tokenizer
        if request.tools and not tokenizer.has_tool_calling:
            raise ToolsUnsupported(
                "this model's chat template has no tool-call format, so it cannot be given tools; "
                "leave 'tools' out"
            )
        text: str = tokenizer.apply_chat_template(
            [dict(m) for m in request.chat],
            tools=[dict(t) for t in request.tools] or None,
            add_generation_prompt=True,
            tokenize=False,
        )
        return list(tokenizer.encode(text, add_special_tokens=False))

    def handle(self, request: Generate, ctx: TaskContext[Token]) -> Completion:
        completion = super().handle(request, ctx)
        if not isinstance(request, ToolChat):
            return completion
        # Always a ToolCompletion for a ToolChat: the server tells by it that the runner rendered the tools.
        content, calls = completion.text, []
        if request.tools:
            tokenizer = self.tokenizer
            content, calls = split_tool_calls(
                completion.text,
                tokenizer.tool_call_start,
                tokenizer.tool_call_end or "",
                tokenizer.tool_parser,
                [dict(t) for t in request.tools],
            )
        values = {f.name: getattr(completion, f.name) for f in fields(completion)}
        return ToolCompletion(**values, content=content, tool_calls=tuple(calls))
