"""A runner module that imports in the parent but raises when a child process imports it.

It stands for a runner whose module cannot load in a fresh interpreter (a
missing dependency, an environment the child lacks): nothing a restart can fix.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from trio_runner import Runner, TaskContext

if multiprocessing.parent_process() is not None:
    raise ImportError("child_import_fails refuses to load in a child process (an injected fault)")


class ImportFailsInChildRunner(Runner[Any, Any, Any]):
    def handle(self, request: Any, ctx: TaskContext[Any]) -> Any:
        return request
