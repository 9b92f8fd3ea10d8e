"""What the guardian process costs a restart: restart to ready with the guardian, against without.

Two supervisors of the same tiny runner are open side by side, one with the
guardian (the default) and one without it (the private ``SpawnSpec.guardian``
switch, through a worker factory: it is no public option). Each round SIGKILLs
the runner of each in turn, in alternating order, and times ``Exited`` to
``Ready``, as bench_lifecycle does. The BASELINE is the supervisor without the
guardian, measured in the same rounds. The cost includes both halves of the
guardian's work around a restart: forking the new one, and the old one's
final sweep, which competes for the CPU with the new runner's start.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from contextlib import AsyncExitStack
from typing import Any

import _children
from _common import MS, RESTART, Config, fmt_ms, restart_once, row, summary

from trio_runner._options import Options
from trio_runner._process import ProcessWorker, SpawnSpec, Worker, process_worker
from trio_runner._supervisor import _open, create_supervisor  # pyright: ignore[reportPrivateUsage]

GOAL_MS = 2.0


def _without_guardian(spec: SpawnSpec, incarnation: int) -> Worker:
    return ProcessWorker(dataclasses.replace(spec, guardian=False), incarnation)


async def restart_to_ready(cfg: Config, method: str) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"with guardian": [], "without guardian": []}
    async with AsyncExitStack() as stack:
        sups: dict[str, Any] = {}
        for label in samples:
            factory = _without_guardian if label == "without guardian" else None
            options = Options(policy=RESTART, start_method=method, name=f"bench-guardian-{method}")
            sup = create_supervisor(_children.BenchRunner, (), None, options, factory or process_worker)
            await stack.enter_async_context(_open(sup))
            sups[label] = (sup, sup.watch())
        for sup, _ in sups.values():
            await sup.wait_ready()
        labels = list(samples)
        for i in range(cfg.n(60, 2) + 1):
            for label in labels if i % 2 else reversed(labels):
                sup, changes = sups[label]
                elapsed = await restart_once(sup, changes)
                if i:  # the first round warms up both: thread cache, lazy imports
                    samples[label].append(elapsed)
    return samples


# Runs in a session of its own, as a runner does; its guardians sweep it when it exits.
_START_COST = """
import json, os, sys, time
from trio_runner import _guardian
samples, lifelines = [], []
for _ in range(int(sys.argv[1])):
    r, w = os.pipe()
    lifelines.append(w)  # held open: a closed lifeline would have the guardian kill this process
    started = time.perf_counter()
    _guardian.start(r)
    samples.append(time.perf_counter() - started)
    time.sleep(0.05)
print(json.dumps(samples), flush=True)
os._exit(0)
"""


def runner_side_start_cost(cfg: Config) -> list[float]:
    proc = subprocess.run(
        [sys.executable, "-c", _START_COST, str(cfg.n(40, 2))],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=True,
        timeout=120,
    )
    return json.loads(proc.stdout)


async def run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    for method in ("spawn", "forkserver"):
        samples = await restart_to_ready(cfg, method)
        raw[f"guardian_{method}"] = samples
        stats = {name: summary(values, MS) for name, values in samples.items()}
        extra = stats["with guardian"]["median"] - stats["without guardian"]["median"]
        paired = statistics.median(
            (a - b) * MS for a, b in zip(samples["with guardian"], samples["without guardian"], strict=True)
        )
        rows.append(
            row(
                f"guardian_{method}",
                f"restart to ready with the guardian, {method} (median / p99)",
                fmt_ms(stats["with guardian"]),
                f"without the guardian {fmt_ms(stats['without guardian'])}",
                f"{extra:+.2f} ms (median of paired rounds {paired:+.2f} ms)",
                f"≤ +{GOAL_MS:g} ms",
                extra <= GOAL_MS,
                stats=stats,
                paired_difference_ms=paired,
            )
        )
    start_cost = summary(runner_side_start_cost(cfg), MS)
    raw["guardian_start_in_runner"] = start_cost
    rows.append(
        row(
            "guardian_start",
            "the runner blocked starting its guardian (median / p99)",
            fmt_ms(start_cost),
            "—",
            "—",
            "—",
            None,
            stats=start_cost,
        )
    )
    return rows, raw
