"""What the child needs to rebuild the runner, checked at the call: its import path and arguments.

Spawn starts a fresh interpreter, which imports the runner class by its
module path and unpickles its arguments. Whatever would make that fail in the
child is caught here, in the caller's frame, as a TypeError or ValueError that
says how to fix it, instead of a STARTUP_FAILED a moment later.

No trio here.
"""

from __future__ import annotations

import multiprocessing.process
import pickle
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from . import _protocol as proto
from ._runner import Runner, check_serving


def unpicklable(what: str, exc: Exception) -> TypeError:
    """The error for ``what`` (a request, the runner's arguments) that pickle refused with ``exc``."""
    return TypeError(
        f"{what} cannot be pickled for the child process ({type(exc).__name__}: {exc}); "
        "pass plain data, or instances of classes defined at module level"
    )


def runner_path(cls: object) -> tuple[str, str]:
    """(module, qualname) of a runner class the child can import, or a TypeError that says why not."""
    if not (isinstance(cls, type) and issubclass(cls, Runner)):
        raise TypeError(
            f"the runner must be a subclass of trio_runner.Runner, not {cls!r}: "
            "define 'class MyRunner(trio_runner.Runner)' in a module and pass the class"
        )
    module, qualname = cls.__module__, cls.__qualname__
    if "<locals>" in qualname:
        raise TypeError(
            f"runner class {qualname} is defined inside a function; the child imports the "
            "class by its module path, so define it at module level"
        )
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not cls:
        raise TypeError(
            f"runner class {qualname} is not importable as {module}.{qualname}; the child "
            "imports it by that path, so define it at module level under its own name"
        )
    check_serving(qualname, cls.concurrency, cls.linger)
    if module == "__main__" and not getattr(sys.modules["__main__"], "__file__", None):
        raise TypeError(
            f"runner class {qualname} is defined in an interactive session, which the child "
            "cannot import; move it into a module (a .py file) and import it from there"
        )
    return module, qualname


def runner_arguments(args: Sequence[Any], kwargs: Mapping[str, Any] | None) -> bytes:
    """The runner's constructor arguments, pickled for the child."""
    try:
        return pickle.dumps((tuple(args), dict(kwargs or {})), protocol=proto.PICKLE_PROTOCOL)
    except Exception as exc:  # the arguments' own classes run here: anything goes
        raise unpicklable("the runner's arguments", exc) from exc


def check_not_bootstrapping() -> None:
    """Fail if this process is a spawned child re-running a script that has no main guard."""
    if getattr(multiprocessing.process.current_process(), "_inheriting", False):
        raise RuntimeError(
            "trio-runner was started while a child process was still bootstrapping: the "
            "script that starts the supervisor has no 'if __name__ == \"__main__\":' guard, "
            "so the spawn start method re-ran it in the child. Add the guard."
        )


def check_main_script(start_method: str) -> None:
    """Fail at once if the runner process cannot re-run the main script, as spawn and forkserver do.

    A program fed on standard input (``python - < script.py``) has
    ``__main__.__file__ == "<stdin>"``: multiprocessing would tell the child to
    run a file of that name, and every runner would die of ``FileNotFoundError``
    before loading, which reads like a missing main guard.
    """
    main = sys.modules.get("__main__")
    if getattr(main, "__spec__", None) is None and getattr(main, "__file__", None) == "<stdin>":
        raise RuntimeError(
            f"this program was read from standard input ('python -'), and the {start_method} start "
            "method re-runs the main script from its file in every runner process: save the script "
            "to a file and run that file, or move the code into a module and call it from 'python -c'"
        )
