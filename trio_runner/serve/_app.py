"""The Starlette application: OpenAI routes, ``/health`` and ``/metrics`` over one supervisor.

It runs on trio (Starlette through anyio's trio backend), so the handlers use
trio directly. A request is checked in full before it can reach the runner;
then it waits, boundedly, for a READY runner; then it streams. Every way a task
can end (result, crash, failure, cancel, unavailable) maps to one HTTP answer
or one final SSE event, so no response is left hanging. The one decision worth
knowing: the streamed response is a plain ASGI callable, not an async
generator, so a client that leaves cancels the task in the runner at once,
in this task, rather than whenever a generator happens to be finalised.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, cast

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import _validate as check
from .._errors import RunnerCrashed, RunnerUnavailable, TaskCancelled, TaskFailed, TrioRunnerError
from .._state import RunnerState
from .._supervisor import Supervisor, TaskHandle
from ..mlx._tools import ToolChat, ToolCompletion, ToolsUnsupported
from ..mlx._types import Completion, Generate, Token
from ._metrics import ServeMetrics
from ._openai import (
    ApiError,
    ChunkWriter,
    Limits,
    ParsedRequest,
    dumps,
    parse_chat,
    parse_completion,
    parse_json,
    response_body,
)

logger = logging.getLogger("trio_runner.serve")

MAX_BODY_SIZE = 1024 * 1024
_TOOLS_UNSUPPORTED = f"{ToolsUnsupported.__module__}.{ToolsUnsupported.__qualname__}"
_WAITING = (RunnerState.STARTING, RunnerState.BACKING_OFF)
SHUTTING_DOWN = ApiError(
    503, "the server is shutting down; this request was cancelled", type="server_error", code="shutting_down"
)
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How the API behaves; set by :func:`trio_runner.serve.run_server`."""

    limits: Limits
    ready_wait: float = 5.0
    max_body_size: int = MAX_BODY_SIZE
    api_key: str | None = None
    #: Kept as a tuple; any sequence of origins is accepted (but not one string).
    allow_origins: Sequence[str] = ()

    def __post_init__(self) -> None:
        # Checked by hand: the shared checks quote the value, and a key must not reach a log.
        key = cast(object, self.api_key)
        if key is not None and not isinstance(key, str):
            raise TypeError(f"api_key must be a string or None, not {type(key).__name__}")
        if key is not None and (not key or not key.isprintable()):
            raise ValueError("api_key must be a non-empty string of printable characters, or None")
        origins = check.names("allow_origins", self.allow_origins, example="['https://a.example'] or ['*']")
        object.__setattr__(self, "allow_origins", origins)
        check.seconds("ready_wait", self.ready_wait)
        check.integer("max_body_size", self.max_body_size, minimum=1, what="an int number of bytes")


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status_code=status, headers=headers, media_type="application/json")


def _error_response(error: ApiError) -> Response:
    return _json(error.body(), error.status, error.headers())


def _exit_summary(exc: RunnerCrashed) -> str:
    return exc.exit.describe().splitlines()[0]


def task_error(exc: TrioRunnerError, metrics: ServeMetrics) -> tuple[ApiError, str]:
    """The API error for a task that did not produce a result, and its outcome label."""
    if isinstance(exc, RunnerCrashed):
        reason = exc.reason.value
        return (
            ApiError(
                503,
                f"the runner crashed during this request: {_exit_summary(exc)}; "
                "it is restarting, retry the request",
                type="runner_crashed",
                code=reason,
                retry_after=metrics.retry_after(),
            ),
            "crashed",
        )
    if isinstance(exc, TaskFailed):
        if exc.remote_type == _TOOLS_UNSUPPORTED:
            return ApiError(400, exc.remote_message, param="tools", code="unsupported"), "bad_request"
        # The runner's own checks (a prompt longer than the context, say) are the client's to fix.
        if exc.remote_type == "ValueError":
            return ApiError(400, exc.remote_message, code="invalid_prompt"), "bad_request"
        return ApiError(
            500,
            f"generation failed: {exc.remote_type}: {exc.remote_message}",
            type="server_error",
            code="task_failed",
        ), "failed"
    if isinstance(exc, TaskCancelled):
        return ApiError(
            503,
            "the request was cancelled: the server is shutting down",
            type="server_error",
            code="cancelled",
        ), "cancelled"
    if isinstance(exc, RunnerUnavailable):
        return unavailable(metrics), "unavailable"
    return ApiError(500, str(exc), type="server_error"), "failed"


def unavailable(metrics: ServeMetrics) -> ApiError:
    """The 503 for a runner that is not READY, saying why and for how long."""
    stats = metrics.supervisor.statistics()
    state = stats.state
    last = "" if stats.last_exit is None else f" after {stats.last_exit.describe().splitlines()[0]}"
    if state in _WAITING:
        wait = metrics.retry_after()
        doing = "backing off before a restart" if state is RunnerState.BACKING_OFF else "starting"
        return ApiError(
            503,
            f"the runner is {doing}{last}; retry in about {wait} s",
            type="runner_unavailable",
            code=state.value,
            retry_after=wait,
        )
    if state is RunnerState.FAILED:
        return ApiError(
            503,
            f"the runner gave up after {stats.restarts} restarts{last}; the server must be restarted",
            type="runner_unavailable",
            code="gave_up",
        )
    return ApiError(
        503,
        f"the runner is {state.value}: the server is shutting down",
        type="runner_unavailable",
        code=state.value,
    )


class Api:
    def __init__(
        self,
        supervisor: Supervisor[Generate, Token, Completion],
        metrics: ServeMetrics,
        options: ServeOptions,
    ) -> None:
        self.sup = supervisor
        self.metrics = metrics
        self.options = options
        self.limits = options.limits
        self.started = int(time.time())
        # Generation in flight, each under its own scope, so a shutdown can give it a deadline.
        self.active: set[trio.CancelScope] = set()
        self.drain_deadline = float("inf")

    def drain(self, grace: float) -> None:
        """Give every request in flight, and any that still arrives, ``grace`` seconds to finish."""
        self.drain_deadline = min(self.drain_deadline, trio.current_time() + grace)
        for scope in self.active:
            scope.deadline = min(scope.deadline, self.drain_deadline)

    def _generation_scope(self) -> trio.CancelScope:
        return trio.CancelScope(deadline=self.drain_deadline)

    # -- plain routes ------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        stats = self.sup.statistics()
        last = stats.last_exit
        body: dict[str, Any] = {
            "status": "ok" if stats.state is RunnerState.READY else "unavailable",
            "state": stats.state.value,
            "model": self.limits.model_id,
            "pid": stats.pid,
            "server_pid": os.getpid(),
            "incarnation": stats.incarnation,
            "restarts": stats.restarts,
            "in_flight": stats.in_flight,
            "pending": stats.pending,
            "uptime": round(stats.uptime, 3),
            "last_exit": None
            if last is None
            else {
                "reason": last.reason.value,
                "description": last.describe().splitlines()[0],
                "exitcode": last.exitcode,
                "signal": last.signal_name,
                "pid": last.pid,
                "incarnation": last.incarnation,
            },
        }
        if stats.state is RunnerState.FAILED:
            body["detail"] = (
                "the restart policy gave up; every request gets 503 until the server is restarted"
            )
        elif stats.state is RunnerState.BACKING_OFF:
            body["retry_after"] = self.metrics.retry_after()
        headers = {"Retry-After": str(self.metrics.retry_after())} if stats.state in _WAITING else None
        return _json(body, 200 if stats.state is RunnerState.READY else 503, headers)

    async def metrics_route(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: Request) -> Response:
        models = [
            {"id": name, "object": "model", "created": self.started, "owned_by": "trio-runner"}
            for name in self.limits.names
        ]
        return _json({"object": "list", "data": models})

    # -- generation --------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat", parse_chat)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions", parse_completion)

    async def _generate(
        self, request: Request, endpoint: str, parse: Callable[[dict[str, Any], Limits], ParsedRequest]
    ) -> Response:
        try:
            parsed = parse(parse_json(await self._read_body(request)), self.limits)
        except ApiError as error:
            self.metrics.requests[endpoint, "bad_request"] += 1
            return _error_response(error)
        try:
            await self._admit()
        except ApiError as error:
            self.metrics.requests[endpoint, "unavailable"] += 1
            return _error_response(error)
        if parsed.stream:
            return _StreamResponse(self, endpoint, parsed)
        return await self._complete(request, endpoint, parsed)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.options.max_body_size
        too_large = ApiError(
            413,
            f"the request body is larger than {limit} bytes; send a smaller request",
            code="request_too_large",
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large  # refused before reading a byte of it
        chunks: list[bytes] = []
        size = 0
        async with aclosing(request.stream()) as body:
            async for chunk in body:
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        return b"".join(chunks)

    async def _admit(self) -> None:
        """Return once the runner is READY; a bounded wait while it starts or backs off, else a 503."""
        if self.sup.state is RunnerState.READY:
            return
        if self.sup.state in _WAITING:
            with trio.move_on_after(self.options.ready_wait):
                try:
                    await self.sup.wait_ready()
                except RunnerUnavailable:
                    raise unavailable(self.metrics) from None
                return
        raise unavailable(self.metrics)

    async def _complete(self, request: Request, endpoint: str, parsed: ParsedRequest) -> Response:
        completion: Completion | None = None
        failure: TrioRunnerError | None = None
        # Kept only when the response reports logprobs; otherwise each token is just counted.
        tokens: list[Token] | None = None if parsed.generate.logprobs is None else []
        scope = self._generation_scope()
        self.active.add(scope)
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    # Starlette never notices a client that leaves a plain response under trio; this does.
                    nursery.start_soon(_cancel_on_disconnect, request.receive, nursery.cancel_scope)
                    # Caught in here: a nursery would wrap it in an ExceptionGroup on the way out.
                    try:
                        async with self.sup.stream(parsed.generate) as task:
                            async for token in task:
                                self.metrics.tokens_generated += 1
                                if tokens is not None:
                                    tokens.append(token)
                            completion = task.result
                    except TrioRunnerError as exc:
                        failure = exc
                    nursery.cancel_scope.cancel()
        finally:
            self.active.discard(scope)
        if failure is not None:
            error, outcome = task_error(failure, self.metrics)
            self.metrics.requests[endpoint, outcome] += 1
            return _error_response(error)
        if scope.cancelled_caught:
            self.metrics.requests[endpoint, "shutdown"] += 1
            return _error_response(SHUTTING_DOWN)
        if completion is None:
            self.metrics.requests[endpoint, "disconnected"] += 1
            return Response(status_code=499)  # nobody is listening any more
        if (wrong := _wrong_runner(parsed, completion)) is not None:
            self.metrics.requests[endpoint, "failed"] += 1
            return _error_response(wrong)
        self.metrics.requests[endpoint, "ok"] += 1
        return _json(response_body(parsed.kind, parsed.model, completion, tokens))


def _wrong_runner(parsed: ParsedRequest, completion: Completion) -> ApiError | None:
    """A 500 if a chat with tool parts was served by a runner that does not know them (it ignored them)."""
    if not isinstance(parsed.generate, ToolChat) or isinstance(completion, ToolCompletion):
        return None
    return ApiError(
        500,
        "this server's runner does not render tools or tool calls; serve with "
        "trio_runner.mlx.ToolMlxLmRunner (trio-runner serve does)",
        type="server_error",
        code="tools_not_served",
    )


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


class _StreamResponse(Response):
    """An SSE stream of one task: its chunks, then ``[DONE]``, or an error event that names why it ended."""

    def __init__(self, api: Api, endpoint: str, parsed: ParsedRequest) -> None:
        super().__init__(status_code=200)
        self.api = api
        self.endpoint = endpoint
        self.parsed = parsed
        self.outcome = "disconnected"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = self.api
        self.outcome = "disconnected"
        submitted = False
        generation = api._generation_scope()  # pyright: ignore[reportPrivateUsage]
        api.active.add(generation)
        try:
            # Submitted before the headers go out, so a runner that became unavailable is still a 503.
            async with api.sup.stream(self.parsed.generate) as task:
                submitted = True
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                    await self._stream(task, send, generation)
                    nursery.cancel_scope.cancel()
            # Leaving the stream block early (a client gone) cancelled the task in the runner.
        except RunnerUnavailable:
            if submitted:
                raise
            self.outcome = "unavailable"
            await _error_response(unavailable(api.metrics))(scope, receive, send)
        finally:
            api.active.discard(generation)
            api.metrics.requests[self.endpoint, self.outcome] += 1

    async def _stream(
        self, task: TaskHandle[Token, Completion], send: Send, generation: trio.CancelScope
    ) -> None:
        api = self.api
        generate = self.parsed.generate
        writer = ChunkWriter(self.parsed.kind, self.parsed.model, logprobs=generate.logprobs is not None)

        async def chunk(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        opening = writer.start(generate.n)
        if opening is not None:
            await chunk(opening)
        outcome = "ok"
        tail = writer.error(SHUTTING_DOWN)
        with generation:
            try:
                async for token in task:
                    api.metrics.tokens_generated += 1
                    if (token.text or writer.logprobs) and not self.parsed.buffered:
                        await chunk(writer.token(token))
                wrong = _wrong_runner(self.parsed, task.result)
                if wrong is None:
                    tail = writer.finish(task.result, self.parsed.include_usage)
                else:
                    outcome, tail = "failed", writer.error(wrong)
            except TrioRunnerError as exc:
                error, outcome = task_error(exc, api.metrics)
                tail = writer.error(error)
        if generation.cancelled_caught:
            outcome = "shutdown"
        # Settled before the last send: the client may hang up the moment it has the end.
        self.outcome = outcome
        await send({"type": "http.response.body", "body": tail, "more_body": False})


def build_app(
    supervisor: Supervisor[Generate, Token, Completion], metrics: ServeMetrics, options: ServeOptions
) -> tuple[Starlette, Api]:
    """The ASGI application for ``supervisor``, and its :class:`Api` (for draining on shutdown)."""
    api = Api(supervisor, metrics, options)
    routes = [
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics_route, methods=["GET"]),
    ]
    middleware: list[Middleware] = []
    if options.allow_origins:
        # Outermost, so a preflight is answered without a key and a 401 still carries the CORS headers.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=options.allow_origins,
                allow_methods=("GET", "POST"),
                allow_headers=("authorization", "content-type"),
            )
        )
    if options.api_key is not None:
        middleware.append(Middleware(_RequireKey, key=options.api_key))
    app = Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _http_error})
    return app, api


class _RequireKey:
    """Answer 401 to any request but ``/health`` without ``Authorization: Bearer <key>``."""

    OPEN = frozenset({"/health"})

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            await self.app(scope, receive, send)
            return
        given = dict(cast(list[tuple[bytes, bytes]], scope["headers"])).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):  # in constant time: no timing hint about the key
            await self.app(scope, receive, send)
            return
        why = "no API key was given" if not given else "the API key is not valid"
        error = ApiError(
            401,
            f"{why}: send the server's key as 'Authorization: Bearer <key>' (the openai client's api_key)",
            code="invalid_api_key",
        )
        headers = {"WWW-Authenticate": "Bearer"}
        await _json(error.body(), 401, headers)(scope, receive, send)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return _error_response(
        ApiError(status, f"{request.method} {request.url.path}: {detail}", code=str(status))
    )
