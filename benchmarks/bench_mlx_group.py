"""MLX group benchmarks on the offline demo model: a 2-rank tensor-parallel group against one process.

Side by side in the same run:

- **tokens/s**: greedy generation of ``TOKENS`` tokens through a supervised
  2-rank group (``open_mlx_supervisor(ranks=2, parallel="tensor")``) against
  one supervised runner on the same single-stream path (``concurrency=1``),
  submit to result, in paired rounds (alternating which goes first); the
  ratio is the median of the rounds' ratios. Reported, not judged: on two
  cores the ranks share the cores the one process has to itself, and each
  token costs the group collectives over loopback (the tensor all-sums and
  the ranks' agreement on a cancel), so the group is not expected to be faster.
- **restart-to-ready**: SIGKILL of rank 1 to the group READY again with new
  processes (detection, stopping rank 0, reaping, a new generation on fresh
  ports, both ranks loading their shard and warming up), against a bare start
  of the same group (open to READY), with the same start method.

Run: ``python benchmarks/bench_mlx_group.py`` (or ``run.py --only mlx_group``).
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
from typing import Any

import trio

import trio_runner
from trio_runner.mlx import Generate, MlxLmRunner, open_mlx_supervisor, prepare_demo_model, start_options

TOKENS = 200
ROUNDS = 12
RESTARTS = 5
STARTS = 3
PROMPT = "The supervisor keeps the event loop free while"
RANKS = 2


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _open_group(path: str, **options: Any) -> Any:
    return open_mlx_supervisor(path, parallel="tensor", ranks=RANKS, name="group", **options)


async def _timed_tps(sup: Any, request: Generate) -> float:
    began = trio.current_time()
    completion = await sup.run(request)
    return completion.generation_tokens / (trio.current_time() - began)


async def _throughput(path: str, rounds: int) -> dict[str, Any]:
    request = Generate(prompt=PROMPT, max_tokens=TOKENS, temperature=0.0)
    group_tps: list[float] = []
    one_tps: list[float] = []
    ratios: list[float] = []
    single = trio_runner.open_supervisor(
        MlxLmRunner, path, kwargs={"concurrency": 1}, name="one", **start_options()
    )
    async with _open_group(path) as group, single as one:
        await group.run(request)  # warm up both
        await one.run(request)
        for round_ in range(rounds):
            for grouped in (True, False) if round_ % 2 == 0 else (False, True):
                if grouped:
                    group_tps.append(await _timed_tps(group, request))
                else:
                    one_tps.append(await _timed_tps(one, request))
            ratios.append(group_tps[-1] / one_tps[-1])
    return {
        "group_tps": statistics.median(group_tps),
        "one_tps": statistics.median(one_tps),
        "rounds": rounds,
        "tps_ratio": statistics.median(ratios),
        "tps_ratio_quartiles": statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else ratios * 2,
    }


async def _ready_with_new_pids(sup: Any, old: tuple[int | None, ...]) -> None:
    while True:
        await sup.wait_ready()
        pids = sup.statistics().pids
        if pids and None not in pids and not set(pids) & set(old):
            return
        await trio.sleep(0.002)


async def _restart_to_ready(path: str, restarts: int, starts: int) -> dict[str, Any]:
    policy = trio_runner.RestartPolicy(initial_delay=0.0, max_restarts=restarts + 2)
    bare: list[float] = []
    for _ in range(starts):
        began = trio.current_time()
        async with _open_group(path) as sup:
            await sup.wait_ready()
            bare.append(trio.current_time() - began)
    restart: list[float] = []
    async with _open_group(path, policy=policy) as sup:
        await sup.wait_ready()
        for _ in range(restarts):
            pids: tuple[int | None, ...] = sup.statistics().pids
            victim = pids[1]
            assert victim is not None
            killed = trio.current_time()
            os.kill(victim, signal.SIGKILL)
            await _ready_with_new_pids(sup, pids)
            restart.append(trio.current_time() - killed)
    return {
        "start_method": start_options()["start_method"],
        "bare_start_ms": _median_ms(bare),
        "restart_ms": _median_ms(restart),
        "restart_ratio": statistics.median(restart) / statistics.median(bare),
        "starts": starts,
        "restarts": restarts,
    }


async def _bench(smoke: bool) -> dict[str, Any]:
    path = str(await prepare_demo_model())
    return {
        "throughput": await _throughput(path, 2 if smoke else ROUNDS),
        "restart": await _restart_to_ready(path, 1 if smoke else RESTARTS, 1 if smoke else STARTS),
    }


def main(smoke: bool = False) -> dict[str, Any]:
    """Run the MLX group benchmarks, print a small table, and return the figures."""
    results = trio.run(_bench, smoke)
    t, r = results["throughput"], results["restart"]
    print(f"MLX demo model, {RANKS}-rank tensor group vs one process ({TOKENS} tokens, medians)")
    print(
        f"  tokens/s: group {t['group_tps']:.0f} vs one process {t['one_tps']:.0f}; "
        f"ratio {t['tps_ratio']:.3f} over {t['rounds']} paired rounds (reported, not judged)"
    )
    print(
        f"  restart-to-ready after a rank SIGKILL: {r['restart_ms']:.0f} ms vs a bare start "
        f"{r['bare_start_ms']:.0f} ms ({r['restart_ratio']:.2f}x; {r['start_method']})"
    )
    return results


if __name__ == "__main__":
    main(smoke="--smoke" in sys.argv)
    sys.exit(0)
