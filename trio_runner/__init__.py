"""trio-runner: run crash-prone, blocking work in a supervised child process from trio.

The child-side names (``Runner``, ``TaskContext``, the errors, the policy) load
without trio, so ``from trio_runner import Runner`` in a runner module keeps
every spawn cheap. The parent-side names that need trio load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import ExitReason as ExitReason
from ._errors import ExitRecord as ExitRecord
from ._errors import RestartLimitExceeded as RestartLimitExceeded
from ._errors import RunnerCrashed as RunnerCrashed
from ._errors import RunnerUnavailable as RunnerUnavailable
from ._errors import StoppedBy as StoppedBy
from ._errors import TaskCancelled as TaskCancelled
from ._errors import TaskError as TaskError
from ._errors import TaskFailed as TaskFailed
from ._errors import TrioRunnerError as TrioRunnerError
from ._policy import RestartPolicy as RestartPolicy
from ._runner import GroupInfo as GroupInfo
from ._runner import Runner as Runner
from ._runner import TaskContext as TaskContext
from ._state import BackingOff as BackingOff
from ._state import Exited as Exited
from ._state import GaveUp as GaveUp
from ._state import LifecycleChange as LifecycleChange
from ._state import Ready as Ready
from ._state import RunnerState as RunnerState
from ._state import Spawned as Spawned
from ._state import Stopped as Stopped
from ._state import SupervisorStatistics as SupervisorStatistics
from ._timeouts import Timeouts as Timeouts

if TYPE_CHECKING:
    from ._supervisor import Supervisor as Supervisor
    from ._supervisor import TaskHandle as TaskHandle
    from ._supervisor import open_supervisor as open_supervisor
    from ._supervisor import run_supervisor as run_supervisor

_LAZY = frozenset({"Supervisor", "TaskHandle", "open_supervisor", "run_supervisor"})

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Loaded on first use: importing trio here would add ~130 ms to every spawn.
    if name in _LAZY:
        from . import _supervisor

        value = getattr(_supervisor, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trio_runner' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
