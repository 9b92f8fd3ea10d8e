"""MLX runner benchmarks on the offline demo model: throughput, time to first token, restart-to-ready.

Side by side in the same run, on the same model:

- **tokens/s**: greedy generation of ``TOKENS`` tokens through the supervisor
  (submit to result, timed in the parent) against ``mlx_lm.stream_generate``
  in this process (call to last response), once with the runner as
  ``open_mlx_supervisor`` starts it (batched, ``concurrency`` 32: what
  ``trio-runner serve`` runs; a request alone is decoded outside the batch,
  so this row measures that lone path) and once with ``concurrency=1`` (the
  single-stream path). Each round runs one of each, back
  to back; the ratio judged is the median of the rounds' ratios, which
  cancels the machine's slow drift in load (the ratio of the two medians is
  reported beside it). Goal: at least 0.97.
- **time to first token**: submit to first ``Token`` in the parent, against
  call to first response in process; the difference is the overhead.
- **restart-to-ready**: ``Ready.startup_seconds`` (spawn to READY: model
  loaded and warm) of restarted runners, with spawn and with the forkserver
  (mlx-lm preloaded). Goal for the forkserver: at most 0.05x the spawn
  restart measured in the same run.
- **tokens after cancel**: a consumer reads a few tokens of a long
  generation, calls ``cancel()``, and counts the tokens it still receives
  (goal: at most 1), against the tokens queued for it at that moment in the
  runner and in the parent (dropped instead; ``statistics().events_dropped``).

Each round runs the supervisor and in-process generation back to back, in
alternating order, so drift in the machine's load hits both. Run: ``python benchmarks/bench_mlx.py``.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import time
from typing import Any

import trio

import trio_runner
from trio_runner.mlx import Generate, MlxLmRunner, open_mlx_supervisor, prepare_demo_model, start_options

TOKENS = 400
ROUNDS = 40
RESTARTS = 8
CANCELS = 20
PROMPT = "The supervisor keeps the event loop free while"


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _in_process_round(model: Any, tokenizer: Any) -> tuple[float, float, int]:
    import mlx_lm

    began = time.perf_counter()
    first = 0.0
    count = 0
    for count, _ in enumerate(mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=TOKENS), 1):  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]
        if count == 1:
            first = time.perf_counter() - began
    return time.perf_counter() - began, first, count


def _open(path: str, concurrency: int | None) -> Any:
    if concurrency is None:
        return open_mlx_supervisor(path)
    return trio_runner.open_supervisor(
        MlxLmRunner, path, kwargs={"concurrency": concurrency}, name="mlx", **start_options()
    )


async def _throughput(path: str, concurrency: int | None = None) -> dict[str, Any]:
    import mlx_lm

    # Loading MLX here is safe: the forkserver was launched (by exec) before, and spawn is exec too.
    model, tokenizer = mlx_lm.load(path)  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    _in_process_round(model, tokenizer)  # warm up, like the runner's setup
    request = Generate(prompt=PROMPT, max_tokens=TOKENS)
    sup_tps: list[float] = []
    sup_ttft: list[float] = []
    own_tps: list[float] = []
    own_ttft: list[float] = []
    ratios: list[float] = []
    async with _open(path, concurrency) as sup:
        await sup.wait_ready()
        await sup.run(request)  # warm up
        for round_ in range(ROUNDS):
            # Alternate which goes first, so neither always follows the other.
            for supervised in (True, False) if round_ % 2 == 0 else (False, True):
                if supervised:
                    submitted = trio.current_time()
                    first = None
                    async with sup.stream(request) as task:
                        async for _token in task:
                            if first is None:
                                first = trio.current_time() - submitted
                    elapsed = trio.current_time() - submitted
                    sup_tps.append(task.result.generation_tokens / elapsed)
                    sup_ttft.append(first or 0.0)
                else:
                    elapsed, first_own, count = _in_process_round(model, tokenizer)
                    own_tps.append(count / elapsed)
                    own_ttft.append(first_own)
                    await trio.lowlevel.checkpoint()
            ratios.append(sup_tps[-1] / own_tps[-1])
    return {
        "supervised_tps": statistics.median(sup_tps),
        "in_process_tps": statistics.median(own_tps),
        "rounds": ROUNDS,
        "tps_ratio": statistics.median(ratios),
        "tps_ratio_quartiles": statistics.quantiles(ratios, n=4)[::2],
        "tps_ratio_of_medians": statistics.median(sup_tps) / statistics.median(own_tps),
        "supervised_ttft_ms": _median_ms(sup_ttft),
        "in_process_ttft_ms": _median_ms(own_ttft),
        "ttft_overhead_ms": _median_ms(sup_ttft) - _median_ms(own_ttft),
    }


async def _restart_to_ready(path: str, start_method: str) -> dict[str, float]:
    policy = trio_runner.RestartPolicy(initial_delay=0.0, max_restarts=RESTARTS + 2)
    startups: list[float] = []
    gaps: list[float] = []
    async with open_mlx_supervisor(path, start_method=start_method, policy=policy, name=start_method) as sup:
        changes = sup.watch()
        await sup.wait_ready()
        for _ in range(RESTARTS):
            pid = sup.statistics().pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            exited_at = None
            async for change in changes:
                if isinstance(change, trio_runner.Exited):
                    exited_at = trio.current_time()
                elif isinstance(change, trio_runner.Ready) and exited_at is not None:
                    gaps.append(trio.current_time() - exited_at)
                    startups.append(change.startup_seconds)
                    break
    return {"startup_ms": _median_ms(startups), "exit_to_ready_ms": _median_ms(gaps)}


async def _after_cancel(path: str) -> dict[str, Any]:
    """Tokens a consumer gets after ``cancel()`` returns, against those queued for it then (dropped)."""
    afters: list[int] = []
    dropped: list[int] = []
    async with open_mlx_supervisor(path) as sup:
        await sup.wait_ready()
        for round_ in range(CANCELS):
            before = sup.statistics().events_dropped
            after = 0
            async with sup.stream(Generate(prompt=PROMPT, max_tokens=2000)) as task:
                seen = 0
                async for _token in task:
                    seen += 1
                    if seen == 5 + 7 * round_ % 40:
                        break
                await task.cancel()
                try:
                    async for _token in task:
                        after += 1
                except trio_runner.TaskCancelled:
                    pass
            afters.append(after)
            dropped.append(sup.statistics().events_dropped - before)
    return {"after_cancel": afters, "dropped": dropped, "worst": max(afters)}


async def _bench() -> dict[str, Any]:
    path = str(await prepare_demo_model())
    results: dict[str, Any] = {}
    results["forkserver"] = await _restart_to_ready(path, "forkserver")
    results["spawn"] = await _restart_to_ready(path, "spawn")
    results["throughput"] = await _throughput(path)
    results["throughput_single"] = await _throughput(path, concurrency=1)
    results["cancel"] = await _after_cancel(path)
    return results


def main() -> dict[str, Any]:
    """Run the MLX benchmarks, print a small table, and return the figures."""
    results = trio.run(_bench)
    rows: list[tuple[str, str, str]] = []
    for key, label in (("throughput", "batched"), ("throughput_single", "concurrency=1")):
        t = results[key]
        rows += [
            (
                f"tokens/s, supervised ({label}) vs in-process",
                f"{t['supervised_tps']:.0f} vs {t['in_process_tps']:.0f}",
                f"ratio {t['tps_ratio']:.3f} (goal >= 0.97; quartiles {t['tps_ratio_quartiles'][0]:.3f}-"
                f"{t['tps_ratio_quartiles'][1]:.3f}; ratio of medians {t['tps_ratio_of_medians']:.3f})",
            ),
            (
                f"time to first token, supervised ({label}) vs in-process",
                f"{t['supervised_ttft_ms']:.2f} vs {t['in_process_ttft_ms']:.2f} ms",
                f"overhead {t['ttft_overhead_ms']:.2f} ms",
            ),
        ]
    for method in ("spawn", "forkserver"):
        r = results[method]
        goal = " (goal <= 0.05x spawn)" if method == "forkserver" else ""
        rows.append(
            (
                f"restart-to-ready, {method}",
                f"{r['startup_ms']:.1f} ms spawn->READY{goal}",
                f"{r['exit_to_ready_ms']:.1f} ms exit seen->READY",
            )
        )
    c = results["cancel"]
    rows.append(
        (
            "tokens after cancel() returns",
            f"worst {c['worst']} over {len(c['after_cancel'])} cancels (goal <= 1)",
            f"median {statistics.median(c['dropped']):.0f} queued for the consumer then, dropped",
        )
    )
    width = max(len(name) for name, _, _ in rows)
    print(f"MLX demo model, {TOKENS} tokens x {ROUNDS} rounds, {RESTARTS} restarts per method (medians)")
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:<32} {note}")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
