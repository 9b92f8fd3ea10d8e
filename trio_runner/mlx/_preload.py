"""Imports for the forkserver to preload, so a restarted MLX runner skips ``import mlx_lm`` (about 1 s).

Importing only: nothing here may *evaluate* MLX. MLX creates its CPU stream
thread at the first evaluation, and a thread does not survive ``fork``: every
child forked after that hangs in a futex. The runner checks in ``setup`` that
this module really was preloaded (preload errors are silent).
"""

from __future__ import annotations

import mlx.core  # noqa: F401  # pyright: ignore[reportUnusedImport]
import mlx_lm  # pyright: ignore[reportUnusedImport]
import mlx_lm.models.llama  # pyright: ignore[reportUnusedImport]
import mlx_lm.sample_utils  # pyright: ignore[reportUnusedImport]
import mlx_lm.tokenizer_utils  # noqa: F401  # pyright: ignore[reportUnusedImport]
import transformers  # pyright: ignore[reportUnusedImport]

# transformers loads its tokenizer classes lazily, on first use; touch the one
# mlx-lm's loader needs so the import happens here, once, rather than per child.
transformers.PreTrainedTokenizerFast  # noqa: B018  # pyright: ignore[reportUnusedExpression]
transformers.AutoTokenizer  # noqa: B018  # pyright: ignore[reportUnusedExpression]

import contextlib  # noqa: E402
import importlib  # noqa: E402

# What the first ``AutoTokenizer.from_pretrained`` imports besides (about 8 ms
# per child on the benchmark machine). Internals of transformers that move
# between versions: a name that is gone is skipped.
for _name in ("transformers.models.llama", "transformers.image_utils", "transformers.video_utils"):
    with contextlib.suppress(ImportError):
        importlib.import_module(_name)

import trio_runner.mlx._runner  # noqa: E402, F401  # pyright: ignore[reportUnusedImport]
