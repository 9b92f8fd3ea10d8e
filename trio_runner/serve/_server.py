"""Running the API: hypercorn's trio worker in the caller's nursery, and a graceful, bounded shutdown.

:func:`run_server` serves one supervisor; :func:`serve_mlx` is the whole
``trio-runner serve`` command (an MLX supervisor plus the server). The design
point: a shutdown first gives in-flight generation ``grace`` seconds, then
cancels it with an error event, then lets hypercorn close connections, and
finally cancels hypercorn itself after a hard deadline, because its socket
writes cannot be cancelled and a client that stops reading would otherwise
hold the drain forever.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app  # pyright: ignore[reportUnknownVariableType]

from .. import _validate as check
from .._errors import ExitReason
from .._options import ForwardedOptions
from .._policy import RestartPolicy
from .._state import Exited, Ready
from .._supervisor import Supervisor
from ..mlx._types import Completion, Generate, Token
from ._app import MAX_BODY_SIZE, Api, ServeOptions, build_app
from ._metrics import ServeMetrics
from ._openai import Limits

logger = logging.getLogger("trio_runner.serve")

DEMO_MODEL_ID = "trio-runner-demo"
# After the grace period: hypercorn's own drain, then the hard stop.
_CLOSE_MARGIN = 1.0
_HARD_MARGIN = 2.0
_MAX_PORT = 65535


class OpenAIServer:
    """A running server, from ``await nursery.start(run_server, ...)``.

    Attributes:
        host: the address it listens on.
        port: the port it listens on (the real one, when 0 was asked for).
        metrics: its :class:`ServeMetrics`.
    """

    def __init__(self, host: str, metrics: ServeMetrics, api: Api, grace: float) -> None:
        self.host = host
        self.port = 0
        self.metrics = metrics
        self._api = api
        self._grace = grace
        self._shutdown = trio.Event()

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8000``; the OpenAI base URL is this plus ``/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def shutdown(self) -> None:
        """Begin a graceful shutdown; :func:`run_server` returns when it is done. Idempotent.

        The server stops accepting connections at once. Requests in flight get
        the grace period to finish; then their tasks are cancelled in the
        runner, and a stream ends with an error event.
        """
        if not self._shutdown.is_set():
            self._api.drain(self._grace)
            self._shutdown.set()

    async def _hard_stop(self, hypercorn: trio.CancelScope) -> None:
        await self._shutdown.wait()
        bound = self._grace + _CLOSE_MARGIN + _HARD_MARGIN
        await trio.sleep(bound)
        logger.warning("connections still open %.1f s after the shutdown began; closing them", bound)
        hypercorn.cancel()


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run_server(
    supervisor: Supervisor[Generate, Token, Completion],
    *,
    model_id: str,
    served_model_names: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 8000,
    ready_wait: float = 5.0,
    grace: float = 5.0,
    max_body_size: int = MAX_BODY_SIZE,
    default_max_tokens: int = 512,
    api_key: str | None = None,
    allow_origins: Sequence[str] = (),
    task_status: trio.TaskStatus[OpenAIServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an OpenAI-compatible API for ``supervisor`` until :meth:`OpenAIServer.shutdown`.

    Use it under ``nursery.start`` (``functools.partial`` for the keyword
    arguments); that returns the :class:`OpenAIServer` once it listens.

    Args:
        supervisor: a supervisor of :class:`~trio_runner.mlx.ToolMlxLmRunner`
            (``open_mlx_supervisor(runner=ToolMlxLmRunner)``), or of any runner
            serving :class:`~trio_runner.mlx.Generate`; a runner that does not
            know :class:`~trio_runner.mlx.ToolChat` answers chats with tools
            or tool calls with 500 ``tools_not_served``. Open it with
            ``raise_on_give_up=False`` so the server keeps answering 503 after
            the policy gives up.
        model_id: the model's name in ``/v1/models``. The server also answers
            to ``default_model`` (mlx-lm's convention) and to each of
            ``served_model_names``; a request naming any other model gets 404.
        served_model_names: more names for the model, for clients that
            hard-code one.
        host: the address to listen on; keep to loopback unless ``api_key``
            is set or a proxy in front authenticates.
        port: the port; 0 picks a free one.
        ready_wait: how long a request waits for a runner that is starting or
            backing off before it gets 503 with ``Retry-After``.
        grace: how long a shutdown waits for requests in flight.
        max_body_size: larger request bodies get 413.
        default_max_tokens: ``max_tokens`` when a request does not say.
        api_key: if set, every route but ``/health`` needs
            ``Authorization: Bearer <api_key>``; others get 401.
        allow_origins: browser origins allowed by CORS (``"*"`` for any);
            none by default, so browsers refuse cross-origin calls.

    Raises:
        TypeError: an option of the wrong type (at the call).
        ValueError: an option out of range (at the call).
        OSError: the address cannot be bound.

    **Cancellation:** cancelling this task stops the server at once, without
    the grace period; :meth:`OpenAIServer.shutdown` is the graceful way.
    """
    check.integer("default_max_tokens", default_max_tokens, minimum=1)
    limits = Limits(model_id, default_max_tokens=default_max_tokens, aliases=_names(served_model_names))
    options = ServeOptions(
        limits,
        ready_wait=ready_wait,
        max_body_size=max_body_size,
        api_key=api_key,
        allow_origins=allow_origins,
    )
    config = _config(host, port, grace)
    sockets = listen(config)
    try:
        await _serve(supervisor, options, config, sockets, host, grace, task_status=task_status)
    finally:
        _close(sockets)


def _names(names: Sequence[str]) -> tuple[str, ...]:
    return check.names("served_model_names", names, example="['gpt-4o-mini']")


def _config(host: str, port: int, grace: float) -> Config:
    check.text("host", host)
    check.integer("port", port, minimum=0, maximum=_MAX_PORT, fix="0 picks a free port")
    check.seconds("grace", grace)
    config = Config()
    config.bind = [_bind(host, port)]
    config.graceful_timeout = grace + _CLOSE_MARGIN
    config.accesslog = None
    config.errorlog = logger
    return config


def listen(config: Config) -> Sockets:
    """The listening sockets, bound at the call, so an address in use fails before anything starts.

    Raises:
        OSError: the address cannot be bound; the message names it.
    """
    try:
        sockets = config.create_sockets()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {config.bind[0]}: {exc.strerror or exc}") from None
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
    return sockets


def _close(sockets: Sockets) -> None:
    # Idempotent: hypercorn's listeners close the same socket objects when they were served.
    for sock in sockets.insecure_sockets:
        sock.close()


async def _serve(
    supervisor: Supervisor[Generate, Token, Completion],
    options: ServeOptions,
    config: Config,
    sockets: Sockets,
    host: str,
    grace: float,
    *,
    task_status: trio.TaskStatus[OpenAIServer],
) -> None:
    metrics = ServeMetrics(supervisor)
    app, api = build_app(supervisor, metrics, options)
    server = OpenAIServer(host, metrics, api, grace)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(metrics.follow_lifecycle)
        nursery.start_soon(metrics.measure_lateness)
        hypercorn = trio.CancelScope()
        nursery.start_soon(server._hard_stop, hypercorn)  # pyright: ignore[reportPrivateUsage]

        async def serve(task_status: trio.TaskStatus[list[str]]) -> None:
            with hypercorn:
                await worker_serve(
                    wrap_app(app, config.wsgi_max_body_size, None),  # pyright: ignore[reportArgumentType]
                    config,
                    sockets=sockets,
                    shutdown_trigger=server._shutdown.wait,  # pyright: ignore[reportPrivateUsage]
                    task_status=task_status,
                )
            nursery.cancel_scope.cancel()

        binds: list[str] = await nursery.start(serve)
        server.port = int(binds[0].rsplit(":", 1)[1])
        logger.info("serving %s at %s", options.limits.model_id, server.url)
        task_status.started(server)


def model_id_for(model: str | None) -> str:
    """The name ``/v1/models`` gives a model: the demo's, a directory's name, or the repo id."""
    if model is None or model == "demo":
        return DEMO_MODEL_ID
    path = Path(model)
    return path.name if path.is_dir() else model


async def serve_mlx(
    model: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_names: Sequence[str] = (),
    api_key: str | None = None,
    allow_origins: Sequence[str] = (),
    start_method: str = "auto",
    concurrency: int | None = None,
    policy: RestartPolicy | None = None,
    ready_wait: float = 5.0,
    grace: float = 5.0,
    stop: trio.Event,
    say: Callable[[str], None] = print,
    parallel: str | None = None,
    ranks: int = 1,
) -> None:
    """``trio-runner serve``: supervise an MLX runner and serve it until ``stop`` is set.

    The server listens at once (``/health`` says ``starting`` while the model
    loads). Leaving shuts the server down gracefully, then the runner.
    ``concurrency`` is the runner's batch size (``None``: the runner's default, 32).
    With ``ranks`` of 2 or more, the model is sharded over a group of that many
    runners (``parallel``, see :func:`~trio_runner.mlx.open_mlx_supervisor`).
    """
    from ..mlx._supervise import open_mlx_supervisor
    from ..mlx._tools import ToolMlxLmRunner

    model_id = model_id_for(model)
    options = ServeOptions(
        Limits(model_id, aliases=_names(served_model_names)),
        ready_wait=ready_wait,
        api_key=api_key,
        allow_origins=allow_origins,
    )
    config = _config(host, port, grace)
    sockets = listen(config)  # before the runner starts: an address in use fails at once
    # None keeps the default policy. The server answers 503 after a give-up instead of ending.
    supervisor_options: ForwardedOptions = {"policy": policy, "raise_on_give_up": False, "ranks": ranks}
    try:
        async with open_mlx_supervisor(
            model,
            start_method=start_method,
            name="serve",
            runner=ToolMlxLmRunner,
            concurrency=concurrency,
            parallel=parallel,
            **supervisor_options,
        ) as sup:
            async with trio.open_nursery() as nursery:
                server: OpenAIServer = await nursery.start(
                    functools.partial(_serve, sup, options, config, sockets, host, grace)
                )
                also = ", ".join(repr(name) for name in options.limits.names[1:])
                say(
                    f"serving {model_id!r} (also as {also}) at {server.url}/v1 (OpenAI-compatible); "
                    f"also {server.url}/health and /metrics"
                )
                reporter = trio.CancelScope()
                nursery.start_soon(_report_runner, sup, say, reporter)
                await stop.wait()
                say(f"shutting down: requests in flight get {grace:g} s")
                reporter.cancel()
                server.shutdown()
            # The server is closed; leaving open_mlx_supervisor shuts the runner down.
    finally:
        _close(sockets)


async def _report_runner(
    sup: Supervisor[Generate, Token, Completion], say: Callable[[str], None], scope: trio.CancelScope
) -> None:
    with scope:
        async for change in sup.watch(replay=True):
            if isinstance(change, Ready):
                ranks = len(sup.statistics().pids)
                place = f"rank {change.rank} of {ranks}, " if ranks > 1 else ""
                say(
                    f"runner ready: pid {change.pid} ({place}incarnation {change.incarnation}), "
                    f"{change.startup_seconds * 1000:.0f} ms after spawn"
                )
            elif isinstance(change, Exited) and change.exit.reason is not ExitReason.REQUESTED:
                say(f"runner exited: {change.exit.describe().splitlines()[0]}")
