"""Parent side: :func:`open_mlx_supervisor`, and building the demo model off the event loop."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Unpack

import trio

from .. import _validate as check
from .._options import ForwardedOptions
from .._supervisor import Supervisor, open_supervisor
from ._model import (
    DEMO_MODEL_NAMES,
    demo_model,
    demo_model_location,
    demo_model_with_progress,
    verify_demo_model,
)
from ._runner import MlxLmRunner, check_model_argument, start_options, warm_up_once
from ._sharded import check_parallel, check_sharded_concurrency
from ._types import Completion, Generate, Token


async def prepare_demo_model(architecture: str = "llama", *, progress: bool = False) -> Path:
    """:func:`demo_model`, built in a worker process if it is not cached yet.

    The loop stays responsive while it builds, and cancelling stops the build
    at once (``trio_parallel.run_sync(..., kill_on_cancel=True)``); the atomic
    build leaves nothing half-written behind.

    Args:
        architecture: ``"llama"`` (the default) or ``"qwen2"``, its twin that
            can be split into pipeline stages.
        progress: write one line per build stage (tokenizer, training) on
            stderr, from the worker process, as the CLI does.
    """
    location = demo_model_location(architecture)
    if await trio.to_thread.run_sync(verify_demo_model, location, architecture) is None:
        return location
    import trio_parallel  # pyright: ignore[reportMissingTypeStubs]

    # A context of our own, so its worker process is gone when this returns.
    async with trio_parallel.open_worker_context() as workers:  # pyright: ignore[reportUnknownMemberType]
        build = demo_model_with_progress if progress else demo_model
        path: Path = await workers.run_sync(build, architecture, kill_on_cancel=True)  # pyright: ignore[reportUnknownMemberType]
    return path


async def resolve_model(model: str | os.PathLike[str] | None) -> str:
    """The model directory or repo id to load; a demo model (None, "demo", "demo-qwen2") is built first.

    A directory named like a demo model comes back as an absolute path, so it wins.

    Raises:
        ValueError: ``model`` is a path that does not exist.
    """
    checked = check_model_argument(model)
    name = "demo" if checked is None else checked
    if name in DEMO_MODEL_NAMES:
        return str(await prepare_demo_model(DEMO_MODEL_NAMES[name]))
    return name


# Cache directories this process has warmed already: if MLX's layout ever
# stops matching kernel_cache_dir(), they are not warmed again on every open.
_warmed: set[Path] = set()


def kernel_cache_dir() -> Path | None:
    """Where MLX caches its compiled CPU kernels (``$TMPDIR/mlx/<version>/cpu``); None off Linux.

    On macOS, Metal's kernels ship with MLX: there is nothing to compile.
    """
    if sys.platform != "linux":
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        mlx_version = version("mlx")
    except PackageNotFoundError:
        return None
    return Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / "mlx" / mlx_version / "cpu"


def kernel_cache_cold(cache: Path | None = None) -> bool:
    """True if MLX has a CPU kernel cache (``cache``, default :func:`kernel_cache_dir`) with no kernel yet."""
    cache = cache or kernel_cache_dir()
    return cache is not None and cache not in _warmed and not any(cache.glob("*.so"))


async def warm_kernel_cache(model: str | os.PathLike[str] | None = None) -> bool:
    """Compile MLX's CPU kernels once, in a throwaway process, if their disk cache is cold.

    On Linux, MLX compiles some CPU kernels with g++ the first time they are
    used and caches them on disk; without a lock, runners that start
    together on a cold cache would each compile (0.6-2.5 s). This loads
    ``model`` (``None``: the demo model, built if needed) in a worker
    process that generates a few tokens, greedy and sampled, and exits, so
    every runner finds the kernels on disk. The loop stays responsive, and
    cancelling kills the worker at once.

    Returns:
        True if it compiled, False if the cache was warm already (or there
        is no CPU kernel cache: macOS).
    """
    cache = kernel_cache_dir()
    if cache is None or not await trio.to_thread.run_sync(kernel_cache_cold, cache):
        return False
    checked = await resolve_model(model)
    import trio_parallel  # pyright: ignore[reportMissingTypeStubs]

    async with trio_parallel.open_worker_context() as workers:  # pyright: ignore[reportUnknownMemberType]
        await workers.run_sync(warm_up_once, checked, kill_on_cancel=True)  # pyright: ignore[reportUnknownMemberType]
    _warmed.add(cache)
    return True


@asynccontextmanager
async def open_mlx_supervisor(
    model: str | os.PathLike[str] | None = None,
    *,
    start_method: str = "auto",
    warmup: bool = True,
    name: str = "mlx",
    runner: type[MlxLmRunner] = MlxLmRunner,
    concurrency: int | None = None,
    parallel: str | None = None,
    **supervisor_options: Unpack[ForwardedOptions],
) -> AsyncGenerator[Supervisor[Generate, Token, Completion]]:
    """Supervise an :class:`MlxLmRunner`: ``async with open_mlx_supervisor() as sup``.

    Args:
        model: a model directory or a Hugging Face repo id; ``None`` (or
            ``"demo"``) is the demo model and ``"demo-qwen2"`` its Qwen2 twin,
            built first (off the event loop) if not cached.
        start_method: see :func:`start_options`; ``"auto"`` uses the forkserver
            with mlx-lm preloaded on Linux, so a restart takes tens of
            milliseconds instead of about a second.
        warmup: passed to :class:`MlxLmRunner`; also, on a machine whose MLX
            kernel cache is cold, compile the kernels first in a throwaway
            process (:func:`warm_kernel_cache`), never in the forkserver.
        name: the supervisor's name, for logs.
        runner: :class:`MlxLmRunner` or a subclass, such as
            :class:`~trio_runner.mlx.ToolMlxLmRunner` (what ``trio-runner serve`` runs).
        concurrency: the runner's batch size (:class:`MlxLmRunner`'s
            ``concurrency``); ``None`` keeps the runner class's (32 for
            :class:`MlxLmRunner`); 1 serves one request at a time on the
            single-stream path.
        parallel: with ``ranks=N`` (N >= 2), how the ranks share the model:
            ``"tensor"`` or ``"pipeline"`` (see :class:`MlxLmRunner`).
        supervisor_options: the other :func:`trio_runner.open_supervisor`
            options: ``policy``, ``timeouts``, ``window``, ``max_frame_size``,
            ``raise_on_give_up``, ``ranks`` (``start_method``, ``preload`` and the
            runner's ``kwargs`` are this function's to decide).

    Raises:
        ValueError: ``model`` is a path that does not exist, a bad option, or
            ``parallel`` and ``ranks`` that do not go together.
    """
    runner_kwargs: dict[str, object] = {}
    if concurrency is not None:
        runner_kwargs["concurrency"] = check.integer(
            "concurrency", concurrency, minimum=1, fix="the batch size"
        )
    parallel = check_parallel(parallel)
    check_parallel_ranks(parallel, supervisor_options.get("ranks", 1))
    check_sharded_concurrency(parallel, concurrency)  # at the call, not in every rank's startup
    if parallel is not None:
        runner_kwargs["parallel"] = parallel
    checked = await resolve_model(model)
    if warmup:
        await warm_kernel_cache(checked)
    options = start_options(start_method)
    preloaded = options["start_method"] == "forkserver"
    async with open_supervisor(
        runner,
        checked,
        kwargs={"warmup": warmup, "preloaded": preloaded, **runner_kwargs},
        name=name,
        **options,
        **supervisor_options,
    ) as sup:
        yield sup


def check_parallel_ranks(parallel: str | None, ranks: object) -> None:
    """A ValueError unless ``parallel`` is given exactly when ``ranks`` is 2 or more.

    A group's ranks must share the model (each would load all of it otherwise),
    and sharding needs other ranks.
    """
    grouped = isinstance(ranks, int) and ranks >= 2
    if parallel is not None and not grouped:
        raise ValueError(
            f"parallel={parallel!r} shards the model over the ranks of a group: pass ranks=2 or more "
            f"(not ranks={ranks!r}), or drop parallel"
        )
    if parallel is None and grouped:
        raise ValueError(
            f"ranks={ranks!r} runs the model in {ranks} processes: pass parallel='tensor' or "
            "parallel='pipeline' to say how they share it"
        )
