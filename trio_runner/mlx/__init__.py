"""``trio_runner.mlx``: LLM generation with mlx-lm in a supervised child process.

Importing this package imports neither mlx nor mlx-lm (about 1.2 s) nor trio:
the child loads it to find :class:`MlxLmRunner`, and the parent pays for
mlx-lm only where it builds the demo model. :func:`open_mlx_supervisor` and
:func:`prepare_demo_model` need trio and load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._model import DEMO_MODEL_ENV as DEMO_MODEL_ENV
from ._model import DEMO_QWEN2_MODEL_ENV as DEMO_QWEN2_MODEL_ENV
from ._model import demo_model as demo_model
from ._model import demo_model_location as demo_model_location
from ._runner import MlxLmRunner as MlxLmRunner
from ._runner import start_options as start_options
from ._tools import ToolChat as ToolChat
from ._tools import ToolCompletion as ToolCompletion
from ._tools import ToolMlxLmRunner as ToolMlxLmRunner
from ._types import Choice as Choice
from ._types import Completion as Completion
from ._types import FinishReason as FinishReason
from ._types import Generate as Generate
from ._types import Token as Token
from ._types import TopLogprob as TopLogprob

if TYPE_CHECKING:
    from ._supervise import open_mlx_supervisor as open_mlx_supervisor
    from ._supervise import prepare_demo_model as prepare_demo_model
    from ._supervise import warm_kernel_cache as warm_kernel_cache

_LAZY = frozenset({"open_mlx_supervisor", "prepare_demo_model", "warm_kernel_cache"})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import _supervise

        value = getattr(_supervise, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trio_runner.mlx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
