"""What the guardian process costs a restart: restart to ready with the guardian, against without.

Two supervisors of the same tiny runner are open side by side, one with the
guardian (the default) and one without it (``SpawnSpec.guardian=None``,
through a worker factory: it is no public option). Each round SIGKILLs
the runner of each in turn, in alternating order, and times ``Exited`` to
``Ready``, as bench_lifecycle does. The BASELINE is the supervisor without the
guardian, measured in the same rounds. The guardian is one per supervisor,
started with its first runner; what a restart pays for it is the new runner's
note (a write and a poll), the supervisor's ``-PID`` note, and the guardian's
reading of both, which competes for the CPU with the new runner's start.
Since that difference is within the noise of a loaded machine, the guardian's
own CPU time over the rounds (psutil, clock-tick resolution) is reported per
restart as well; it includes its scan of the process table once a second.

The verdict rests on the median of the paired rounds' differences (with
minus without, in the same round), not on the difference of the two medians:
a load spike from another process lands on both restarts of a round, so it
cancels in the pair, while the difference of medians moves with it (measured:
-1.7 to +4.7 ms between two runs whose paired medians were +1.3 and +2.4).
The first rounds are warm-up and dropped; each restart starts after a short
pause, so the last one's aftermath (reaping, the guardian's note) is not
measured as part of the next. Rounds run for a time budget (with a floor and
a ceiling on their count), so the fast forkserver restarts get more pairs
than spawn in about the same time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import _children
import psutil
import trio
from _common import MS, RESTART, Config, fmt_ms, percentile, restart_once, row, summary

from trio_runner._options import Options
from trio_runner._process import ProcessWorker, SpawnSpec, Worker, process_worker
from trio_runner._supervisor import _open, create_supervisor  # pyright: ignore[reportPrivateUsage]

GOAL_MS = 2.0
#: Rounds dropped before measuring: thread cache, lazy imports, the guardian's first notes.
WARM_UP = 3
#: Before each restart: the previous one's aftermath settles.
SETTLE = 0.01
#: Measured rounds per start method: at least MIN_ROUNDS, then more while the
#: budget (seconds) lasts, up to MAX_ROUNDS.
MIN_ROUNDS, MAX_ROUNDS, BUDGET = 40, 400, 10.0


def _without_guardian(spec: SpawnSpec, incarnation: int) -> Worker:
    return ProcessWorker(dataclasses.replace(spec, guardian=None), incarnation)


def _guardians() -> dict[int, Any]:
    """This process's guardians (a bare interpreter running ``_guardian.main()``, our pid last), by pid."""
    found: dict[int, Any] = {}
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            argv = proc.info["cmdline"] or []
            ours = argv[-1:] == [str(os.getpid())] and "_guardian.main()" in " ".join(argv)
            if ours and os.getsid(proc.pid) == proc.pid:
                found[proc.pid] = proc
    return found


def _cpu(proc: Any) -> float:
    times = proc.cpu_times()
    return times.user + times.system


async def restart_to_ready(cfg: Config, method: str) -> tuple[dict[str, list[float]], float | None]:
    """Restart times with and without the guardian; and the guardian's own CPU per restart, in seconds."""
    samples: dict[str, list[float]] = {"with guardian": [], "without guardian": []}
    before = set(_guardians())
    cpu_per_restart: float | None = None
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
        # The one guardian of the supervisor that has one (it may come a moment after READY).
        guardian = None
        for _ in range(200):
            new = [proc for pid, proc in _guardians().items() if pid not in before]
            if len(new) == 1:
                guardian = new[0]
                break
            await trio.sleep(0.01)
        labels = list(samples)
        cpu_start = 0.0
        warm_up = cfg.n(WARM_UP, 1)
        least, most = warm_up + cfg.n(MIN_ROUNDS, 2), warm_up + cfg.n(MAX_ROUNDS, 2)
        deadline = time.perf_counter() + (0.0 if cfg.smoke else BUDGET)
        i = 0
        while i < least or (i < most and time.perf_counter() < deadline):
            if i == warm_up and guardian is not None:
                cpu_start = _cpu(guardian)
            for label in labels if i % 2 else reversed(labels):
                sup, changes = sups[label]
                await trio.sleep(SETTLE)
                elapsed = await restart_once(sup, changes)
                if i >= warm_up:
                    samples[label].append(elapsed)
            i += 1
        if guardian is not None:
            await trio.sleep(0.05)  # its reading of the last notes
            with contextlib.suppress(psutil.Error):
                cpu_per_restart = (_cpu(guardian) - cpu_start) / len(samples["with guardian"])
    return samples, cpu_per_restart


# Runs as a process group leader, as a runner does; nothing reads the notes pipe
# but it is big enough for every note.
_REGISTER_COST = """
import json, os, sys, time
from trio_runner import _guardian
samples, lifelines = [], []
for _ in range(int(sys.argv[1])):
    notes_r, notes_w = os.pipe()
    lifeline_r, lifeline_w = os.pipe()
    lifelines.append((notes_r, lifeline_w))  # held open: a closed lifeline makes register() exit
    started = time.perf_counter()
    _guardian.register(notes_w, lifeline_r)
    samples.append(time.perf_counter() - started)
print(json.dumps(samples), flush=True)
"""


def runner_side_register_cost(cfg: Config) -> list[float]:
    proc = subprocess.run(
        [sys.executable, "-c", _REGISTER_COST, str(cfg.n(200, 2))],
        capture_output=True,
        text=True,
        check=True,
        process_group=0,
        timeout=120,
    )
    return json.loads(proc.stdout)


async def run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    for method in ("spawn", "forkserver"):
        samples, cpu_per_restart = await restart_to_ready(cfg, method)
        raw[f"guardian_{method}"] = samples
        cpu_ms = None if cpu_per_restart is None else cpu_per_restart * MS
        raw[f"guardian_{method}_cpu_per_restart_ms"] = cpu_ms
        stats = {name: summary(values, MS) for name, values in samples.items()}
        extra = stats["with guardian"]["median"] - stats["without guardian"]["median"]
        rounds = zip(samples["with guardian"], samples["without guardian"], strict=True)
        pairs = [(a - b) * MS for a, b in rounds]
        paired = statistics.median(pairs)
        low, high = percentile(pairs, 25), percentile(pairs, 75)
        rows.append(
            row(
                f"guardian_{method}",
                f"restart to ready with the guardian, {method} (median / p99)",
                fmt_ms(stats["with guardian"]),
                f"without the guardian {fmt_ms(stats['without guardian'])}",
                f"paired rounds: median {paired:+.2f} ms (quartiles {low:+.2f} / {high:+.2f}); "
                f"difference of medians {extra:+.2f} ms",
                f"≤ +{GOAL_MS:g} ms (median of paired rounds)",
                paired <= GOAL_MS,
                stats=stats,
                paired_difference_ms=paired,
                paired_quartiles_ms=[low, high],
                difference_of_medians_ms=extra,
            )
        )
        cpu_text = "not found" if cpu_ms is None else f"{cpu_ms:.3f} ms"
        rows.append(
            row(
                f"guardian_{method}_cpu",
                f"the guardian's own CPU per restart, {method} (the whole run / restarts)",
                cpu_text,
                "—",
                "—",
                "—",
                None,
                cpu_per_restart_ms=cpu_ms,
            )
        )
    start_cost = summary(runner_side_register_cost(cfg), MS)
    raw["guardian_register_in_runner"] = start_cost
    rows.append(
        row(
            "guardian_register",
            "the runner blocked registering with its guardian (median / p99)",
            fmt_ms(start_cost),
            "—",
            "—",
            "—",
            None,
            stats=start_cost,
        )
    )
    return rows, raw
