"""Put this directory on PYTHONPATH to run Python as if mlx-lm were not installed.

Python imports ``sitecustomize`` at startup, so every process (the CLI and
each runner it spawns) finds ``import mlx_lm`` failing as the import system
reports a missing module.
"""

import sys


class _HideMlxLm:
    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name.partition(".")[0] == "mlx_lm":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, _HideMlxLm())  # type: ignore[arg-type]
