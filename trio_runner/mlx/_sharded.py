"""One rank of a sharded MLX model: the ring group, ``sharded_load``, and the ranks' agreement on each step.

Each forward pass of a sharded model is a chain of collectives that pairs
with the same pass on every other rank, so every rank must run the same steps
in the same order. What could make them differ is what reaches each rank at a
different moment: a cancel. A task cancelled before it started on one rank is
skipped there and started on another; a cancel mid-generation reaches each rank
at a different token. So the ranks agree, with one small collective, on the
task they start and, at each token, on whether it goes on (it stops on every
rank once any rank has seen the cancel).

mlx and mlx-lm are imported in the functions; no trio here (the child imports
this module).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar, cast

from .. import _validate as check
from .._errors import TaskCancelled
from .._runner import GroupInfo, TaskContext
from ._types import Token

PARALLEL_MODES = ("tensor", "pipeline")
#: How a rank exits when its ring is broken or it fell out of step (the ``os._exit`` status).
LOST_GROUP_EXIT = 75
ResultT = TypeVar("ResultT")


def check_parallel(parallel: object) -> str | None:
    """``parallel`` if it is None, ``"tensor"`` or ``"pipeline"``."""
    if parallel is None:
        return None
    return check.one_of("parallel", parallel, PARALLEL_MODES, fix="or None for a runner on its own")


def check_sharded_concurrency(parallel: str | None, concurrency: object) -> None:
    """A ValueError for a batch size (``concurrency``) other than 1 on a sharded runner."""
    if parallel is not None and concurrency not in (None, 1):
        raise ValueError(
            f"concurrency={concurrency!r} with parallel={parallel!r}: a sharded model serves "
            "one request at a time (every rank must run the same steps in the same order); "
            "pass concurrency=1 or leave it out"
        )


def check_group(parallel: str | None, group: GroupInfo | None) -> GroupInfo | None:
    """The group to shard over, or a ValueError when ``parallel`` and the group do not go together."""
    if parallel is not None and (group is None or group.size < 2):
        raise ValueError(
            f"parallel={parallel!r} shards the model over the ranks of a group, but this runner has "
            "none: supervise it with ranks=2 or more (trio-runner --ranks 2), or drop parallel"
        )
    if parallel is None and group is not None and group.size > 1:
        raise ValueError(
            f"this runner is rank {group.rank} of a group of {group.size}, but parallel is None, so "
            "every rank would load the whole model: pass parallel='tensor' or parallel='pipeline'"
        )
    return group if parallel is not None else None


def _generation_stream() -> Any:
    # The stream mlx-lm generates on: collectives on one stream keep one order on every rank.
    from mlx_lm.generate import generation_stream  # pyright: ignore[reportMissingTypeStubs]

    return generation_stream  # pyright: ignore[reportUnknownVariableType]


def join_group(group: GroupInfo) -> Any:
    """``mx.distributed.init(backend="ring", strict=True)`` for ``group``; returns the MLX group.

    The ring backend reads its place from ``MLX_RANK`` and ``MLX_HOSTFILE``
    (a JSON list with one list of ``"ip:port"`` per rank). The hostfile is
    written to a temporary file and removed once the ring is formed. Rank 0
    waits for the others as long as it takes: the supervisor's
    ``Timeouts.startup`` bounds it.
    """
    import mlx.core as mx

    hosts = [[address] for address in group.addresses]
    descriptor, hostfile = tempfile.mkstemp(prefix=f"trio-runner-ring-{group.rank}-", suffix=".json")
    try:
        with os.fdopen(descriptor, "w") as out:
            json.dump(hosts, out)
        os.environ["MLX_RANK"] = str(group.rank)
        os.environ["MLX_HOSTFILE"] = hostfile
        world: Any = mx.distributed.init(backend="ring", strict=True)  # pyright: ignore[reportUnknownMemberType]
    finally:
        os.unlink(hostfile)
    if (world.rank(), world.size()) != (group.rank, group.size):
        raise RuntimeError(
            f"mx.distributed.init formed rank {world.rank()} of {world.size()}, "
            f"not rank {group.rank} of {group.size}"
        )
    return world


def load_sharded(path: str, parallel: str, world: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``mlx_lm.utils.sharded_load`` over ``world``, split by ``parallel``; returns model, tokenizer, config.

    Raises:
        ValueError: the model's architecture cannot be split that way (the
            message names the architecture and what would work).
    """
    from mlx_lm.utils import sharded_load  # pyright: ignore[reportUnknownVariableType]

    pipeline = world if parallel == "pipeline" else None
    tensor = world if parallel == "tensor" else None
    try:
        loaded: Any = sharded_load(path, pipeline, tensor, return_config=True)  # pyright: ignore[reportUnknownVariableType]
    except ValueError as exc:
        if "does not support" not in str(exc):
            raise
        kind = _model_type(path)
        other = "tensor" if parallel == "pipeline" else "pipeline"
        raise ValueError(
            f"parallel={parallel!r}: mlx-lm cannot split a {kind} model that way ({exc}); "
            f"try parallel={other!r}, or a model whose architecture supports it (the demo "
            "model 'demo-qwen2' supports both)"
        ) from exc
    return loaded


def _model_type(path: str) -> str:
    try:
        with open(os.path.join(path, "config.json")) as config:
            return str(json.load(config).get("model_type", "this"))
    except (OSError, ValueError, AttributeError):
        return "this"


def _all_sum(values: list[int]) -> list[int]:
    import mlx.core as mx

    total = mx.distributed.all_sum(mx.array(values, dtype=mx.int32), stream=_generation_stream())  # pyright: ignore[reportUnknownMemberType]
    mx.eval(total)  # pyright: ignore[reportUnknownMemberType]
    return [int(x) for x in total.tolist()]  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType, reportUnknownArgumentType, reportGeneralTypeIssues]


def shared_seed(rank: int) -> int:
    """A random seed drawn by rank 0 and shared with every rank: sampling must pick the same tokens."""
    drawn = [int.from_bytes(os.urandom(3), "little") for _ in range(2)] if rank == 0 else [0, 0]
    high, low = _all_sum(drawn)
    return high << 24 | low


class RankSync:
    """The ranks' agreement on the task they run and on when it stops (see the module docstring)."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank = rank
        self.size = size

    def serve(
        self,
        ctx: TaskContext[Token],
        handle: Callable[[TaskContext[Token]], ResultT],
    ) -> ResultT:
        """Run ``handle`` with the agreed context, once every rank is about to run this task.

        A rank whose ring is broken (a peer died: MLX raises ``RuntimeError:
        [ring] ...``) exits at once, instead of failing this task and every
        later one: ``init`` in the same process returns the broken group, so
        only a new group of processes recovers, which the supervisor starts.

        An error raised before the first token's agreement (the request's
        checks) is raised alike by every rank, and fails the task as usual.
        One raised later may be this rank's alone, while the others wait in
        the next collective for ever: the rank exits, and the group restarts.
        """
        agreed: AgreedContext | None = None
        try:
            agreed = self.begin(ctx)
            return handle(cast(TaskContext[Token], agreed))
        except TaskCancelled:
            raise
        except Exception as exc:
            if isinstance(exc, RuntimeError) and "[ring]" in str(exc):
                lost_the_group(self.rank, exc)
            if agreed is None or agreed.checks == 0:
                raise
            left_the_group(self.rank, exc)

    @staticmethod
    def agreed(ctx: object) -> bool:
        """True for the context :meth:`serve` hands ``handle``."""
        return isinstance(ctx, AgreedContext)

    def begin(self, ctx: TaskContext[Token]) -> AgreedContext:
        """Wait until every rank is about to run this task; returns the context ``handle`` uses.

        Task ids rise in the order the supervisor sends tasks. A rank that
        holds a lower id than another rank is running a task that the other
        skipped, cancelled before it started there: it drops it too.

        Raises:
            TaskCancelled: another rank skipped this task.
        """
        task_id = ctx.task_id
        while True:
            mine = [0] * self.size
            mine[self.rank] = task_id
            ids = _all_sum(mine)
            if min(ids) == max(ids):
                return AgreedContext(ctx)
            if task_id == min(ids):
                raise TaskCancelled(f"task {task_id} was cancelled on another rank before it started there")


def lost_the_group(rank: int, exc: BaseException) -> NoReturn:
    """Exit this rank at once, saying why on stderr: its ring is broken for good."""
    _exit(
        f"rank {rank} lost its group ({exc}); exiting, as a broken ring cannot be joined "
        "again in this process"
    )


def left_the_group(rank: int, exc: BaseException) -> NoReturn:
    """Exit this rank at once, saying why on stderr: it failed mid-generation, out of step with the others."""
    _exit(
        f"rank {rank} failed mid-generation ({type(exc).__name__}: {exc}); exiting, as the other ranks "
        "wait in a collective this rank will never join"
    )


def _exit(why: str) -> NoReturn:
    print(f"trio_runner.mlx: {why}", file=sys.stderr, flush=True)
    os._exit(LOST_GROUP_EXIT)


class AgreedContext:
    """A task's context on one rank of a group: cancels are agreed with every rank at each token.

    ``raise_if_cancelled`` is a collective (called once per token by the
    generation loop, the same number of times on every rank), and an emit
    never raises: a rank that sees the cancel first goes on to the next
    agreement, where every rank stops together. (The supervisor forwards only
    rank 0's events; on the other ranks an emit sends nothing but a sign of
    progress, and never blocks.)
    """

    def __init__(self, ctx: TaskContext[Token]) -> None:
        self._ctx = ctx
        self.checks = 0  # agreements made: the same count on every rank

    @property
    def task_id(self) -> int:
        return self._ctx.task_id

    @property
    def cancelled(self) -> bool:
        return self._ctx.cancelled

    def emit(self, event: Token) -> None:
        self.emit_many((event,))

    def emit_many(self, events: Iterable[Token]) -> None:
        # Dropped, as the cancel drops them; the next agreement stops every rank together.
        with contextlib.suppress(TaskCancelled):
            self._ctx.emit_many(events)

    def raise_if_cancelled(self) -> None:
        self.checks += 1
        (seen,) = _all_sum([int(self._ctx.cancelled)])
        if seen:
            raise TaskCancelled(f"task {self._ctx.task_id} was cancelled")
