"""Runner classes for the MLX and serve tests, in a module of their own: no tests here.

The runner process imports the module that defines its runner class. This one
imports only what the child needs, so a restart does not pay for httpx, the
openai client and the server stack that the test module itself imports.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from trio_runner.mlx import MlxLmRunner


class SlowMlxLmRunner(MlxLmRunner):
    """The demo model at about 50 tokens/s, batched or not, so a test can act between two tokens.

    Every token is sent the moment it exists (no linger), so what a test sees
    after acting is the runner's doing, not a batch already on its way.
    """

    linger = 0.0

    def responses(self, prompt: Sequence[int], max_tokens: int, sampler: Any) -> Iterator[Any]:
        for response in super().responses(prompt, max_tokens, sampler):
            time.sleep(0.02)
            yield response

    def batch_step(self, generator: Any) -> Any:
        # The batched path (concurrency > 1, the default) steps here instead of responses().
        time.sleep(0.02)
        return super().batch_step(generator)
