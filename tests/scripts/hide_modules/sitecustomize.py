"""Put this directory on PYTHONPATH to run Python as if some modules were not installed.

``HIDE_MODULES`` names them, comma-separated (``HIDE_MODULES=mlx,mlx_lm``).
Python imports ``sitecustomize`` at startup, so every process (the CLI and
each runner it spawns) finds those imports failing as the import system
reports a missing module.
"""

import os
import sys

_HIDDEN = frozenset(filter(None, os.environ.get("HIDE_MODULES", "").split(",")))


class _HideModules:
    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name.partition(".")[0] in _HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, _HideModules())  # type: ignore[arg-type]
