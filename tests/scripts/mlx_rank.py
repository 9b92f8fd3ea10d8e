"""One rank of a hand-made MLX group (no supervisor): shard the demo models, generate, print JSON lines.

Usage: ``mlx_rank.py RANK ADDRESSES_JSON`` for a rank of a group (the
addresses as ``GroupInfo.addresses``), or ``mlx_rank.py single`` for the same
generations in one process. Each scenario prints one line,
``{"scenario": ..., "outcome": "completed" | "cancelled" | "error", "tokens": [...]}``.

Scenarios, in order (every rank runs them in the same order):

- ``tensor``: the Llama demo model, tensor-sharded, greedy.
- ``pipeline``: the Qwen2 demo model, split into pipeline stages, greedy.
- ``cancel``: the Qwen2 pipeline, where only the last rank sees a cancel,
  at its sixth token (``generated`` counts the tokens checked).
- ``skipped``: task 10 runs on rank 0 only (the others skipped it, as a
  task cancelled before it started there), then task 11 on every rank.
- ``refused``: a request every rank refuses before generating (a
  ``logit_bias`` outside the vocabulary): each rank raises, and goes on.
- ``lost``: task 13, where the last rank's context raises at its third
  token; that rank exits (status 75, ``LOST_GROUP_EXIT``), then rank 0 finds
  its ring broken and exits too, neither printing.

``single`` also prints ``{"scenario": "round-trip", "text": ...}``, the Qwen2
demo tokenizer's decoding of its encoding of ``ROUND_TRIP``, and
``{"scenario": "refused", "error": ...}``, what loading the Llama demo model
in pipeline stages raises.
"""

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trio_runner import GroupInfo, TaskCancelled
from trio_runner.mlx import Generate, MlxLmRunner, Token

PROMPT = "Beautiful is better than"
MAX_TOKENS = 40
ROUND_TRIP = "Beautiful is better than ugly: ünïcode ✓, tabs\tand\nnewlines"
CANCEL_AFTER = 5


class Context:
    """A task's context for a runner driven by hand: cancelled once ``cancel_after`` tokens were checked.

    Counted where the flag is read (once per token, on every rank).
    """

    def __init__(self, task_id: int, cancel_after: int | None = None, fail_after: int | None = None) -> None:
        self.task_id = task_id
        self.cancel_after = cancel_after
        self.fail_after = fail_after
        self.checks = 0
        self.tokens: list[int] = []

    @property
    def cancelled(self) -> bool:
        self.checks += 1
        if self.fail_after is not None and self.checks > self.fail_after:
            raise OSError("this rank alone fails")
        return self.cancel_after is not None and self.checks > self.cancel_after

    def emit_many(self, events: Any) -> None:
        tokens: list[Token] = list(events)
        self.tokens.extend(token.token_id for token in tokens)

    def emit(self, event: Token) -> None:
        self.emit_many([event])

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise TaskCancelled(f"task {self.task_id} was cancelled")


def run(scenario: str, runner: MlxLmRunner, ctx: Context, request: Generate | None = None) -> None:
    request = request or Generate(prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0)
    try:
        completion = runner.handle(request, ctx)  # type: ignore[arg-type]
        outcome, tokens = "completed", completion.generation_tokens
    except TaskCancelled:
        outcome, tokens = "cancelled", ctx.checks
    except ValueError:
        outcome, tokens = "error", ctx.checks
    line = {"scenario": scenario, "outcome": outcome, "tokens": ctx.tokens, "generated": tokens}
    print(json.dumps(line), flush=True)


def main() -> None:
    group: GroupInfo | None = None
    if sys.argv[1] != "single":
        addresses = tuple(json.loads(sys.argv[2]))
        group = GroupInfo(rank=int(sys.argv[1]), size=len(addresses), generation=1, addresses=addresses)
    rank = 0 if group is None else group.rank
    last = group is None or group.rank == group.size - 1
    for scenario, model, parallel in (("tensor", "demo", "tensor"), ("pipeline", "demo-qwen2", "pipeline")):
        runner = MlxLmRunner(model, concurrency=1, parallel=None if group is None else parallel)
        runner.group = group
        runner.setup()
        run(scenario, runner, Context(1))
    if group is None:
        ids = runner.tokenizer.encode(ROUND_TRIP, add_special_tokens=False)
        print(json.dumps({"scenario": "round-trip", "text": runner.tokenizer.decode(ids)}), flush=True)
        from trio_runner.mlx import demo_model
        from trio_runner.mlx._sharded import load_sharded

        try:
            # mlx-lm checks the architecture before it uses the group: a placeholder will do.
            load_sharded(str(demo_model()), "pipeline", object())
        except ValueError as exc:
            print(json.dumps({"scenario": "refused", "error": str(exc)}), flush=True)
        return
    # The Qwen2 pipeline runner serves the rest.
    run("cancel", runner, Context(2, cancel_after=CANCEL_AFTER if last else None))
    if rank == 0:
        run("skipped", runner, Context(10))
    run("skipped", runner, Context(11))
    run("refused", runner, Context(12), Generate(prompt=PROMPT, logit_bias={100_000: 1.0}))
    run("lost", runner, Context(13, fail_after=3 if last else None))


if __name__ == "__main__":
    main()
