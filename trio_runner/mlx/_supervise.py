"""Parent side: :func:`open_mlx_supervisor`, and building the demo model off the event loop."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from .._supervisor import Supervisor, open_supervisor
from ._model import demo_model, demo_model_location, verify_demo_model
from ._runner import MlxLmRunner, check_model_argument, start_options
from ._types import Completion, Generate, Token


async def prepare_demo_model() -> Path:
    """:func:`demo_model`, built in a worker process if it is not cached yet.

    The loop stays responsive while it builds, and cancelling stops the build
    at once (``trio_parallel.run_sync(..., kill_on_cancel=True)``); the atomic
    build leaves nothing half-written behind.
    """
    location = demo_model_location()
    if await trio.to_thread.run_sync(verify_demo_model, location) is None:
        return location
    import trio_parallel  # pyright: ignore[reportMissingTypeStubs]

    # A context of our own, so its worker process is gone when this returns.
    async with trio_parallel.open_worker_context() as workers:  # pyright: ignore[reportUnknownMemberType]
        path: Path = await workers.run_sync(demo_model, kill_on_cancel=True)  # pyright: ignore[reportUnknownMemberType]
    return path


@asynccontextmanager
async def open_mlx_supervisor(
    model: str | os.PathLike[str] | None = None,
    *,
    start_method: str = "auto",
    warmup: bool = True,
    name: str = "mlx",
    **supervisor_options: Any,
) -> AsyncGenerator[Supervisor[Generate, Token, Completion]]:
    """Supervise an :class:`MlxLmRunner`: ``async with open_mlx_supervisor() as sup``.

    Args:
        model: a model directory or a Hugging Face repo id; ``None`` is the demo
            model, built first (off the event loop) if it is not cached.
        start_method: see :func:`start_options`; ``"auto"`` uses the forkserver
            with mlx-lm preloaded on Linux, so a restart takes tens of
            milliseconds instead of about a second.
        warmup: passed to :class:`MlxLmRunner`.
        name: the supervisor's name, for logs.
        supervisor_options: any other :func:`trio_runner.open_supervisor`
            argument: ``policy``, ``timeouts``, ``window`` ...

    Raises:
        ValueError: ``model`` is a path that does not exist, or a bad option.
    """
    checked = check_model_argument(model)
    if checked is None:
        checked = str(await prepare_demo_model())
    options = start_options(start_method)
    preloaded = options["start_method"] == "forkserver"
    async with open_supervisor(
        MlxLmRunner,
        checked,
        kwargs={"warmup": warmup, "preloaded": preloaded},
        name=name,
        **options,
        **supervisor_options,
    ) as sup:
        yield sup
