"""Run the trio-runner benchmarks and write RESULTS.md, results.json and latency.png.

Usage::

    python benchmarks/run.py            # the full suite (a few minutes), writes into benchmarks/
    python benchmarks/run.py --smoke    # tiny counts, no goals judged: checks the suite still works
    python benchmarks/run.py --only roundtrip,events

Every metric is measured in the same run as its baselines; see docs/benchmarks.md.

Next to nothing is imported at module level: the spawn start method re-runs
this script in every child it starts (as ``__mp_main__``), and so does the
forkserver on Python 3.13 and older (CPython gh-126631), so every import here
would inflate every start measured, ours and the baselines'. The rest is
imported where it is used.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, module): run in this order; bench_mlx is optional (another owner, needs mlx).
SUITES = [
    ("crash", "bench_crash"),
    ("lateness", "bench_lateness"),
    ("flood", "bench_flood"),
    ("payload", "bench_payload"),
    ("events", "bench_throughput"),
    ("roundtrip", "bench_roundtrip"),
    ("lifecycle", "bench_lifecycle"),
    ("groups", "bench_groups"),
    ("guardian", "bench_guardian"),
    ("scaling", "bench_scaling"),
    ("cancel", "bench_cancel"),
    ("mlx", "bench_mlx"),
    ("mlx_group", "bench_mlx_group"),
    ("serve", "bench_serve"),
]

# Suites that run in an interpreter of their own (see _run_isolated), with what they need.
ISOLATED = {
    "mlx": ("mlx", "mlx_lm"),
    "mlx_group": ("mlx", "mlx_lm"),
    "serve": ("mlx", "mlx_lm", "hypercorn", "starlette"),
}


def _isolated_available(name: str, module_name: str) -> tuple[bool, str]:
    import importlib.util

    if not os.path.exists(os.path.join(HERE, f"{module_name}.py")):
        return False, f"benchmarks/{module_name}.py does not exist"
    missing = [dep for dep in ISOLATED[name] if importlib.util.find_spec(dep) is None]
    if missing:
        return False, f"{', '.join(missing)} not installed (pip install -e '.[mlx,serve]')"
    return True, ""


def _run_isolated(module_name: str, smoke: bool = False) -> dict:
    """Run ``module.main()`` in a fresh interpreter and return the dict it returns.

    The forkserver is one per process, and its preload list is fixed when it
    starts: the MLX suite needs its own (mlx_lm preloaded), not the one the
    restart benchmark already started here.
    """
    import json
    import subprocess

    code = (
        f"import json, sys; sys.path.insert(0, sys.argv[1]); import {module_name}; "
        f"result = {module_name}.main({'smoke=True' if smoke else ''}); "
        "print('\\n@@RESULT@@' + json.dumps(result))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, HERE], capture_output=True, text=True, check=False, timeout=600
    )
    sys.stdout.write(proc.stdout.split("@@RESULT@@")[0])
    if proc.returncode != 0 or "@@RESULT@@" not in proc.stdout:
        raise RuntimeError(f"{module_name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.rsplit("@@RESULT@@", 1)[1])


def _mlx_rows(results: dict) -> tuple[list[dict], dict]:
    """Rows for bench_mlx.py's ``main()`` figures (that module runs its own trio loop and prints)."""
    import statistics

    import _common

    rows: list[dict] = []
    try:
        t = results["throughput"]
        rows.append(
            _common.row(
                "mlx_tps",
                "MLX demo model tokens/s, supervised",
                f"{t['supervised_tps']:.0f} tok/s (TTFT {t['supervised_ttft_ms']:.2f} ms)",
                f"mlx_lm.stream_generate in process {t['in_process_tps']:.0f} tok/s "
                f"(TTFT {t['in_process_ttft_ms']:.2f} ms)",
                f"{t['tps_ratio']:.3f}x in-process (median of {t.get('rounds', '?')} paired rounds; ratio of "
                f"medians {t['tps_ratio_of_medians']:.3f}); TTFT +{t['ttft_overhead_ms']:.2f} ms",
                ">= 0.97x in-process tokens/s",
                t["tps_ratio"] >= 0.97,
                **t,
            )
        )
        single = results.get("throughput_single")
        if single is not None:
            rows.append(
                _common.row(
                    "mlx_tps_single",
                    "MLX demo model tokens/s, supervised, concurrency=1 (single-stream path)",
                    f"{single['supervised_tps']:.0f} tok/s (TTFT {single['supervised_ttft_ms']:.2f} ms)",
                    f"mlx_lm.stream_generate in process {single['in_process_tps']:.0f} tok/s",
                    f"{single['tps_ratio']:.3f}x in-process (median of {single['rounds']} paired rounds)",
                    ">= 0.97x in-process tokens/s",
                    single["tps_ratio"] >= 0.97,
                    **single,
                )
            )
        for method in ("spawn", "forkserver"):
            r = results[method]
            rows.append(
                _common.row(
                    f"mlx_restart_{method}",
                    f"MLX runner restart to ready, {method} (median)",
                    f"{r['exit_to_ready_ms']:.1f} ms exit seen -> READY "
                    f"({r['startup_ms']:.1f} ms spawn -> READY)",
                    f"spawn {results['spawn']['exit_to_ready_ms']:.1f} ms" if method == "forkserver" else "—",
                    f"{r['exit_to_ready_ms'] / results['spawn']['exit_to_ready_ms']:.3f}x spawn"
                    if method == "forkserver"
                    else "—",
                    "≤ 0.05x the spawn restart (same run)" if method == "forkserver" else "—",
                    r["exit_to_ready_ms"] <= 0.05 * results["spawn"]["exit_to_ready_ms"]
                    if method == "forkserver"
                    else None,
                    **r,
                )
            )
        c = results["cancel"]
        rows.append(
            _common.row(
                "mlx_cancel_events_after",
                "MLX tokens received after cancel() returns (worst / median)",
                f"{c['worst']} / {statistics.median(c['after_cancel']):.0f} "
                f"over {len(c['after_cancel'])} cancels",
                f"queued for the consumer at that moment (dropped instead): median "
                f"{statistics.median(c['dropped']):.0f}, max {max(c['dropped'])}",
                "—",
                "≤ 1 token",
                c["worst"] <= 1,
                **c,
            )
        )
    except (KeyError, TypeError) as exc:
        rows.append(
            _common.row("mlx", "MLX benchmarks", "see results.json", "—", "—", "—", None, error=repr(exc))
        )
    return rows, {"mlx": results}


def _level_index(points: list[dict], clients: int) -> int:
    return next(i for i, p in enumerate(points) if p.get("clients") == clients)


def _serve_rows(results: dict) -> tuple[list[dict], dict]:
    """Rows for bench_serve.py's ``main()`` figures: availability under kills, and throughput."""
    import _common

    ours, theirs = "trio-runner serve", "mlx_lm.server"
    rows: list[dict] = []
    try:
        a = results["availability"]
        rows.append(
            _common.row(
                "serve_health",
                "/health while the runner is SIGKILLed once a second (p50 / p99)",
                f"{a[ours]['health_p50_ms']:.2f} / {a[ours]['health_p99_ms']:.2f} ms, "
                f"{a[ours]['answered_share']:.0%} answered",
                f"ours with no kills {results['idle']['health_p50_ms']:.2f} / "
                f"{results['idle']['health_p99_ms']:.2f} ms; "
                f"{theirs} {a[theirs]['health_p50_ms']:.2f} / {a[theirs]['health_p99_ms']:.2f} ms, "
                f"{a[theirs]['answered_share']:.0%} answered (refused while it restarts)",
                f"p99 {results['health_p99_ratio']:.2f}x ours idle",
                "p99 ≤ 2x idle p99 (same run)",
                bool(results.get("goal_met")),
            )
        )
        t = results["throughput"]
        for i, point in enumerate(t[ours]):
            base = t[theirs][i] if i < len(t[theirs]) else {}
            rows.append(
                _common.row(
                    f"serve_tps_{i}",
                    f"serve, {point.get('clients', '?')} streaming clients: tokens/s, requests/s",
                    f"{point['tokens_per_s']:.0f} tok/s, {point['requests_per_s']:.1f} req/s",
                    f"{theirs} {base.get('tokens_per_s', float('nan')):.0f} tok/s, "
                    f"{base.get('requests_per_s', float('nan')):.1f} req/s",
                    "—",
                    "—",
                    None,
                    **point,
                )
            )
        for r in results.get("scaling", []):
            n = r["clients"]
            mine, base = t[ours][_level_index(t[ours], n)], t[theirs][_level_index(t[theirs], n)]
            goals = []
            if r["tps_goal"] is not None:
                goals.append(f"tokens/s ≥ {r['tps_goal']}x")
            if r["ttft_goal_met"] is not None:
                goals.append("TTFT p50 ≤ 1x")
            met = [g for g in (r["tps_goal_met"], r["ttft_goal_met"]) if g is not None]
            rows.append(
                _common.row(
                    f"serve_scaling_{n}",
                    f"serve vs {theirs}, {n} streaming clients: tokens/s and TTFT p50 ratios",
                    f"{mine['tokens_per_s']:.0f} tok/s, TTFT p50 {mine['ttft_p50_ms']:.1f} ms",
                    f"{theirs} {base['tokens_per_s']:.0f} tok/s, TTFT p50 {base['ttft_p50_ms']:.1f} ms",
                    f"{r['tps_ratio']:.2f}x tokens/s, {r['ttft_ratio']:.2f}x TTFT "
                    f"(median of {len(r['tps_ratios'])} interleaved rounds)",
                    ", ".join(goals) or "—",
                    all(met) if met else None,
                    **r,
                )
            )
        for name, c in results.get("prompt_cache", {}).items():
            rows.append(
                _common.row(
                    f"serve_prompt_cache_{'ours' if name == ours else 'theirs'}",
                    f"{name}: repeated {c['prompt_tokens']}-token system prompt, TTFT of the 2nd chat",
                    f"{c['second_ttft_ms']:.1f} ms after {c['first_ttft_ms']:.1f} ms",
                    "the first chat, same run",
                    f"{c['ratio']:.2f}x",
                    "≤ 0.5x" if name == ours else "—",
                    c["ratio"] <= 0.5 if name == ours else None,
                    # row() has a ratio of its own (the text): the figure goes in as cache_ratio.
                    **{("cache_ratio" if k == "ratio" else k): v for k, v in c.items()},
                )
            )
    except (KeyError, TypeError, IndexError) as exc:
        rows.append(
            _common.row("serve", "serve benchmarks", "see results.json", "—", "—", "—", None, error=repr(exc))
        )
    return rows, {"serve": results}


def _mlx_group_rows(results: dict) -> tuple[list[dict], dict]:
    """Rows for bench_mlx_group.py: the 2-rank MLX group against one process (reported, not judged)."""
    import _common

    t, r = results["throughput"], results["restart"]
    rows = [
        _common.row(
            "mlx_group_tps",
            "MLX demo model tokens/s, 2-rank tensor group (supervised)",
            f"{t['group_tps']:.0f} tok/s",
            f"one supervised process, concurrency=1: {t['one_tps']:.0f} tok/s",
            f"{t['tps_ratio']:.3f}x one process (median of {t['rounds']} paired rounds)",
            "reported (on 2 cores the group is not expected to be faster)",
            None,
            **t,
        ),
        _common.row(
            "mlx_group_restart",
            f"MLX 2-rank group restart to ready after a rank SIGKILL ({r['start_method']}, median)",
            f"{r['restart_ms']:.0f} ms kill -> READY (new ranks)",
            f"bare start of the group {r['bare_start_ms']:.0f} ms open -> READY",
            f"{r['restart_ratio']:.2f}x a bare start",
            "reported",
            None,
            **r,
        ),
    ]
    return rows, {"mlx_group": results}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import importlib
    import logging
    import time

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny counts; checks the suite runs, judges nothing"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated suites: " + ",".join(n for n, _ in SUITES)
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output directory (default: benchmarks/, or build/bench-smoke with --smoke)",
    )
    args = parser.parse_args(argv)
    out = args.out or (os.path.join(HERE, os.pardir, "build", "bench-smoke") if args.smoke else HERE)
    os.makedirs(out, exist_ok=True)

    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import _common
    import _report
    import trio

    _common.ensure_child_import_path()
    # The supervisor logs every restart at WARNING; hundreds of them would only slow the loop down.
    logging.getLogger("trio_runner").setLevel(logging.CRITICAL)
    cfg = _common.Config(smoke=args.smoke)
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = wanted - {name for name, _ in SUITES}
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(sorted(unknown))}")

    rows: list[dict] = []
    raw: dict = {}
    notes: list[str] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for name, module_name in SUITES:
        if wanted and name not in wanted:
            continue
        if name in ISOLATED:
            ok, why = _isolated_available(name, module_name)
            if not ok:
                notes.append(f"MLX benchmark skipped: {why}.")
                print(f"[skip] {name}: {why}", flush=True)
                continue
        print(f"[run ] {name} ...", flush=True)
        begun = time.perf_counter()
        module = importlib.import_module(module_name) if name not in ISOLATED else None
        if module is not None:
            suite_rows, suite_raw = trio.run(module.run, cfg)
        elif name == "mlx" and args.smoke:
            notes.append("MLX benchmark not run in smoke mode (it has no smoke size).")
            print(f"[skip] {name}: no smoke mode", flush=True)
            continue
        elif name == "mlx":
            suite_rows, suite_raw = _mlx_rows(_run_isolated(module_name))
        elif name == "mlx_group":
            suite_rows, suite_raw = _mlx_group_rows(_run_isolated(module_name, smoke=args.smoke))
        else:
            suite_rows, suite_raw = _serve_rows(_run_isolated(module_name, smoke=args.smoke))
        timings[name] = time.perf_counter() - begun
        rows += suite_rows
        raw.update(suite_raw)
        for item in suite_rows:
            print(f"       {item['metric']}: {item['ours']}  [{item['ratio']}]", flush=True)
        print(f"[done] {name} in {timings[name]:.1f} s", flush=True)
    total = time.perf_counter() - started
    if args.smoke:
        for item in rows:
            item["met"] = None  # smoke counts are too small to judge a goal
    info = _common.machine_info()
    info["suite_seconds"] = round(total, 1)
    info["suite_timings"] = {name: round(seconds, 1) for name, seconds in timings.items()}
    info["smoke"] = args.smoke
    plot_note = _report.write_plot(os.path.join(out, "latency.png"), raw)
    if plot_note:
        notes.append(plot_note)
    _report.write_json(os.path.join(out, "results.json"), info, rows, raw, notes)
    _report.write_markdown(os.path.join(out, "RESULTS.md"), info, rows, notes)
    print(f"wrote {os.path.normpath(out)}/RESULTS.md, results.json, latency.png in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
