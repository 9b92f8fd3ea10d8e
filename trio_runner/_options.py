"""Every supervisor option, its type and its default, each written once.

``Options`` is a frozen, validated record of the options one supervisor runs
with, and ``DEFAULT`` (``Options()``) is the only place their defaults live, as
trio-parallel's ``DEFAULT_CONTEXT`` is for its workers. Functions that take or
forward options (``open_supervisor``, ``run_supervisor``,
``open_mlx_supervisor``) declare ``**options: Unpack[SupervisorOptions]``:
pyright checks each keyword at every call, and no signature repeats a default.

No trio here: this is plain data, checked by ``_validate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypedDict

from . import _protocol as proto
from . import _validate as check
from ._policy import RestartPolicy
from ._timeouts import Timeouts

START_METHODS = ("spawn", "forkserver")


class ForwardedOptions(TypedDict, total=False):
    """The options a wrapper forwards untouched (``open_mlx_supervisor`` takes these).

    See :func:`trio_runner.open_supervisor` for what each one means; the
    defaults are those of :data:`DEFAULT`.
    """

    policy: RestartPolicy | None
    timeouts: Timeouts | None
    window: int
    max_frame_size: int
    raise_on_give_up: bool
    ranks: int


class SupervisorOptions(ForwardedOptions, total=False):
    """Every keyword option of :func:`trio_runner.open_supervisor` and :func:`trio_runner.run_supervisor`.

    Beyond :class:`ForwardedOptions`, the ones that say how the runner starts
    and what it is called, which a wrapper like ``open_mlx_supervisor`` decides itself.
    """

    name: str | None
    start_method: str
    preload: Sequence[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """The options of one supervisor, validated when made. See :func:`trio_runner.open_supervisor`."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    timeouts: Timeouts = field(default_factory=Timeouts)
    #: None names the supervisor after the runner class.
    name: str | None = None
    start_method: str = "spawn"
    preload: tuple[str, ...] = ()
    #: Events in flight per task before the runner's ``emit`` blocks.
    window: int = 8192
    max_frame_size: int = proto.DEFAULT_MAX_FRAME
    raise_on_give_up: bool = True
    #: Processes of the runner class run as one group (see docs/groups.md); 1 is a lone runner.
    ranks: int = 1

    def __post_init__(self) -> None:
        check.instance_of("policy", self.policy, RestartPolicy)
        check.instance_of("timeouts", self.timeouts, Timeouts)
        if self.name is not None:
            check.text("name", self.name)
        check.one_of(
            "start_method",
            self.start_method,
            START_METHODS,
            fix="'fork' is unsafe in a process that runs threads",
        )
        # Any sequence of names is accepted; the record keeps a tuple.
        object.__setattr__(self, "preload", check.names("preload", self.preload))
        if self.preload and self.start_method != "forkserver":
            raise ValueError("preload only applies to start_method='forkserver'; drop it or switch method")
        check.integer("window", self.window, minimum=2, fix="it counts the events in flight per task")
        check.frame_size(
            self.max_frame_size,
            minimum=proto.MIN_FRAME_SIZE,
            maximum=proto.MAX_FRAME_SIZE,
            default=proto.DEFAULT_MAX_FRAME,
        )
        check.boolean("raise_on_give_up", self.raise_on_give_up)
        check.integer("ranks", self.ranks, minimum=1, fix="it counts the processes of the group")

    @classmethod
    def from_keywords(cls, caller: str, options: SupervisorOptions) -> Options:
        """The options given as keywords to ``caller``, over the defaults.

        ``policy=None`` and ``timeouts=None`` mean the default. An unknown
        keyword is a TypeError here, since ``**options`` accepts any at run time.
        """
        unknown = options.keys() - _NAMES
        if unknown:
            raise TypeError(
                f"{caller}() got unexpected keyword argument(s) {', '.join(map(repr, sorted(unknown)))}; "
                f"its options are {', '.join(sorted(_NAMES))}"
            )
        given = {k: v for k, v in options.items() if v is not None or k not in _NONE_MEANS_DEFAULT}
        return dataclasses.replace(DEFAULT, **given)


_NAMES = frozenset(SupervisorOptions.__optional_keys__)
_NONE_MEANS_DEFAULT = frozenset({"policy", "timeouts"})

#: The one source of every option's default.
DEFAULT = Options()
