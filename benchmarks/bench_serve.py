"""``trio-runner serve`` against ``mlx_lm.server``, on the same demo model, in the same run.

Both servers run as subprocesses on 127.0.0.1 and are measured by the same
clients in this process (which never imports MLX):

- **availability**: ``GET /health`` back to back, on a keep-alive connection,
  for ``AVAILABILITY_SECONDS`` while "the runner" is SIGKILLed once a second
  and one streaming client keeps generating. For trio-runner that is the
  supervised runner process (its pid comes from ``/health``); the server stays
  up. ``mlx_lm.server`` runs inference in its own process, so the kill takes
  the whole server down, and a process manager's immediate restart is
  simulated. Reported: /health p50/p99 over the answers, the share of probes
  answered at all, and what the streaming client saw. BASELINE in the same
  run: trio-runner's /health with the same streaming client and no kills.
  Goal: /health p99 during the kills at most 2x that idle p99.
- **throughput and time to first token**: requests/s, tokens/s and TTFT
  p50 with 1, 4 and 16 concurrent streaming clients (``MAX_TOKENS`` tokens
  each, unseeded, greedy), for ``THROUGHPUT_SECONDS`` per level. Both servers
  run at once and are measured in ``ROUNDS`` interleaved rounds (which server
  goes first alternates), and the ratio judged is the median of the rounds'
  ratios. Tokens are counted from the ``usage`` in the last chunk
  (``stream_options.include_usage``), which both servers send. Goals (issue
  13): at 16 clients tokens/s >= 1.2x ``mlx_lm.server`` and TTFT p50 <= its
  own; at 4 clients >= 1.0x.
- **prompt cache**: a chat with a fresh system prompt of about
  ``SYSTEM_TOKENS`` tokens, then another chat with the same system prompt
  and another question; the TTFT of the second against the first (median
  over ``CACHE_ROUNDS``). Goal: at most 0.5x.

Run: ``python benchmarks/bench_serve.py`` (``--smoke`` for tiny counts). It
needs the mlx and serve extras. ``main()`` returns the figures as a dict.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import trio

AVAILABILITY_SECONDS = 10.0
KILL_EVERY = 1.0
THROUGHPUT_SECONDS = 4.0
CONCURRENCY = (1, 4, 16)
ROUNDS = 3
MAX_TOKENS = 64
CACHE_ROUNDS = 5
SYSTEM_WORDS = 180  # about 500 tokens of the demo model's tokenizer
GOAL_TPS_RATIO = {16: 1.2, 4: 1.0}  # tokens/s against mlx_lm.server, same run
GOAL_TTFT_RATIO_16 = 1.0
GOAL_CACHED_TTFT_RATIO = 0.5
START_BOUND = 120.0
GOAL_HEALTH_P99_RATIO = 2.0  # crash-loop /health p99 against the idle p99, same run
CHAT = {"messages": [{"role": "user", "content": "Tell me a story"}], "temperature": 0.0}


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _demo_model() -> str:
    # Built in a subprocess: building evaluates MLX, and this process stays free of it.
    code = "from trio_runner.mlx import demo_model; print(demo_model())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return out.stdout.strip().splitlines()[-1]


class Server:
    """One server subprocess on a loopback port; ``restart()`` brings a killed one back."""

    def __init__(self, name: str, command: list[str], port: int) -> None:
        self.name = name
        self.command = command
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def wait_serving(self, bound: float = START_BOUND) -> float:
        """Wait until a completion succeeds (mlx_lm.server's /health answers before its model loads)."""
        began = time.perf_counter()
        deadline = began + bound
        body = {**CHAT, "max_tokens": 2}
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while time.perf_counter() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if client.post("/v1/chat/completions", json=body).status_code == 200:
                        return time.perf_counter() - began
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not serve within {bound} s")

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()


# -- availability ----------------------------------------------------------------------


def _probe_health(url: str, until: float, latencies: list[float], seen: Counter[str]) -> None:
    with httpx.Client(base_url=url, timeout=2.0) as client:
        while time.perf_counter() < until:
            began = time.perf_counter()
            try:
                status = client.get("/health").status_code
            except httpx.ConnectError:
                seen["connection refused"] += 1
                time.sleep(0.005)  # nothing listens: do not spin
                continue
            except httpx.HTTPError as exc:
                seen[type(exc).__name__] += 1
                continue
            latencies.append(time.perf_counter() - began)
            seen[f"HTTP {status}"] += 1


def _stream_once(client: httpx.Client, max_tokens: int) -> str:
    """One streamed chat; what the client saw, in a few words."""
    body = {**CHAT, "max_tokens": max_tokens, "stream": True}
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}"
            last = ""
            for line in response.iter_lines():
                if line.startswith("data: "):
                    last = line[6:]
            if last == "[DONE]":
                return "completed with [DONE]"
            with contextlib.suppress(ValueError):
                if "error" in json.loads(last):
                    return "ended with an error event"
            return "ended without [DONE]"
    except httpx.ConnectError:
        time.sleep(0.05)
        return "connection refused"
    except httpx.HTTPError as exc:
        return f"cut off ({type(exc).__name__})"


def _stream_load(url: str, until: float, seen: Counter[str]) -> None:
    with httpx.Client(base_url=url, timeout=10.0) as client:
        while time.perf_counter() < until:
            seen[_stream_once(client, 200)] += 1


def _runner_pid(url: str) -> int | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        pid = httpx.get(f"{url}/health", timeout=1.0).json().get("pid")
        return pid if isinstance(pid, int) else None
    return None


def availability(
    server: Server, *, seconds: float, kill_whole_server: bool, kill: bool = True
) -> dict[str, Any]:
    """Probe /health while the runner (or, for the baseline, the whole server) is SIGKILLed every second.

    With ``kill=False``, the same probes and streaming load with no kills (the idle baseline).
    """
    latencies: list[float] = []
    health: Counter[str] = Counter()
    streams: Counter[str] = Counter()
    until = time.perf_counter() + seconds
    threads = [
        threading.Thread(target=_probe_health, args=(server.url, until, latencies, health)),
        threading.Thread(target=_stream_load, args=(server.url, until, streams)),
    ]
    for thread in threads:
        thread.start()
    kills = 0
    next_kill = time.perf_counter() + KILL_EVERY
    while kill and next_kill < until:
        time.sleep(max(0.0, next_kill - time.perf_counter()))
        next_kill += KILL_EVERY
        if kill_whole_server:
            assert server.proc is not None
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()
                kills += 1
            server.start()  # a process manager restarting it at once
        else:
            pid = _runner_pid(server.url)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
    for thread in threads:
        thread.join()
    probes = sum(health.values())
    answered = len(latencies)
    return {
        "kills": kills,
        "probes": probes,
        "answered_share": answered / probes if probes else 0.0,
        "health_p50_ms": percentile(latencies, 50) * 1e3,
        "health_p99_ms": percentile(latencies, 99) * 1e3,
        "health_max_ms": max(latencies, default=math.nan) * 1e3,
        "health_seen": dict(health),
        "streams_seen": dict(streams),
    }


# -- throughput ------------------------------------------------------------------------


async def _stream_counting(
    client: httpx.AsyncClient, body: dict[str, Any], ttfts: list[float] | None = None
) -> tuple[bool, dict[str, int] | None, int]:
    """One streamed chat: whether it ended with [DONE], its usage, and its content chunks.

    The time from sending the request to its first content chunk goes to ``ttfts``.
    """
    usage = None
    chunks = 0
    done = False
    began = trio.current_time()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            elif event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                if chunks == 0 and ttfts is not None:
                    ttfts.append(trio.current_time() - began)
                chunks += 1
    return done, usage, chunks


async def _throughput(url: str, clients: int, seconds: float) -> dict[str, float]:
    requests = 0
    tokens = 0
    failures = 0
    ttfts: list[float] = []
    body = {**CHAT, "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def one_client(client: httpx.AsyncClient, until: float) -> None:
        nonlocal requests, tokens, failures
        while trio.current_time() < until:
            try:
                done, usage, chunks = await _stream_counting(client, body, ttfts)
            except httpx.HTTPError:
                done, usage, chunks = False, None, 0  # e.g. a full listen backlog resets the connection
            if not done:
                failures += 1
                continue
            requests += 1
            tokens += usage["completion_tokens"] if usage else chunks

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        began = trio.current_time()
        until = began + seconds
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(one_client, client, until)
        elapsed = trio.current_time() - began
    return {
        "clients": clients,
        "requests_per_s": requests / elapsed,
        "tokens_per_s": tokens / elapsed,
        "ttft_p50_ms": percentile(ttfts, 50) * 1e3,
        "failures": failures,
    }


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def scaling(ours: Server, theirs: Server, seconds: float, rounds: int) -> dict[str, Any]:
    """Both servers at each client count, in interleaved rounds; per-level medians and per-round ratios."""
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        s.name: {c: [] for c in CONCURRENCY} for s in (ours, theirs)
    }
    for round_ in range(rounds):
        for clients in CONCURRENCY:
            order = (ours, theirs) if round_ % 2 == 0 else (theirs, ours)
            for server in order:
                runs[server.name][clients].append(trio.run(_throughput, server.url, clients, seconds))
    table: dict[str, list[dict[str, float]]] = {}
    for name, levels in runs.items():
        table[name] = [
            {
                "clients": clients,
                "requests_per_s": _median([r["requests_per_s"] for r in rs]),
                "tokens_per_s": _median([r["tokens_per_s"] for r in rs]),
                "ttft_p50_ms": _median([r["ttft_p50_ms"] for r in rs]),
                "failures": sum(r["failures"] for r in rs),
            }
            for clients, rs in levels.items()
        ]
    ratios = []
    for clients in CONCURRENCY:
        mine, base = runs[ours.name][clients], runs[theirs.name][clients]
        tps = [
            a["tokens_per_s"] / b["tokens_per_s"]
            for a, b in zip(mine, base, strict=True)
            if b["tokens_per_s"]
        ]
        ttft = [
            a["ttft_p50_ms"] / b["ttft_p50_ms"] for a, b in zip(mine, base, strict=True) if b["ttft_p50_ms"]
        ]
        goal = GOAL_TPS_RATIO.get(clients)
        ratios.append(
            {
                "clients": clients,
                "tps_ratio": _median(tps),
                "tps_ratios": tps,
                "ttft_ratio": _median(ttft),
                "ttft_ratios": ttft,
                "tps_goal": goal,
                "tps_goal_met": None if goal is None else _median(tps) >= goal,
                "ttft_goal_met": _median(ttft) <= GOAL_TTFT_RATIO_16 if clients == 16 else None,
            }
        )
    return {"throughput": table, "scaling": ratios, "rounds": rounds}


_SYSTEM_TEXT = (
    "the supervisor keeps every runner alive and restarts it when it crashes "
    "so that clients see one error and then carry on"
)


def _system_prompt(nonce: str) -> str:
    words = _SYSTEM_TEXT.split(" ")
    return f"{nonce}: " + " ".join(words[i % len(words)] for i in range(SYSTEM_WORDS))


async def _cached_ttft(url: str, rounds: int) -> dict[str, Any]:
    firsts: list[float] = []
    seconds: list[float] = []
    prompt_tokens = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for round_ in range(rounds):
            system = _system_prompt(f"session {os.getpid()}-{time.monotonic_ns()}-{round_}")
            for question, into in (("Tell me a story", firsts), ("And another one", seconds)):
                body = {
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": question},
                    ],
                    "temperature": 0.0,
                    "max_tokens": 4,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                ttfts: list[float] = []
                _, usage, _ = await _stream_counting(client, body, ttfts)
                into.append(ttfts[0] if ttfts else math.nan)
                if usage:
                    prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
    ratios = [b / a for a, b in zip(firsts, seconds, strict=True) if a]
    return {
        "prompt_tokens": prompt_tokens,
        "first_ttft_ms": _median(firsts) * 1e3,
        "second_ttft_ms": _median(seconds) * 1e3,
        "ratio": _median(ratios),
        "ratios": ratios,
    }


# -- the run ---------------------------------------------------------------------------


def _servers(model: str) -> tuple[Server, Server]:
    ours_port, theirs_port = _free_port(), _free_port()
    ours = Server(
        "trio-runner serve",
        [
            *(sys.executable, "-m", "trio_runner", "serve", "--model", model),
            *(
                "--port",
                str(ours_port),
                "--backoff",
                "0.05",
                "--max-backoff",
                "0.05",
                "--max-restarts",
                "1000",
                "--ready-wait",
                "5",
            ),
        ],
        ours_port,
    )
    theirs = Server(
        "mlx_lm.server",
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(theirs_port),
        ],
        theirs_port,
    )
    return ours, theirs


def _print_table(results: dict[str, Any]) -> None:
    print("\n/health while the runner is SIGKILLed once a second (one streaming client generating)")
    print(
        f"{'server':<20} {'kills':>5} {'answered':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  client saw"
    )
    for name, a in results["availability"].items():
        print(
            f"{name:<20} {a['kills']:>5} {a['answered_share']:>8.1%} {a['health_p50_ms']:>8.2f} "
            f"{a['health_p99_ms']:>8.2f} {a['health_max_ms']:>8.1f}  "
            f"health {a['health_seen']}; streams {a['streams_seen']}"
        )
    idle = results["idle"]
    print(
        f"goal: trio-runner /health p99 during the kills <= {GOAL_HEALTH_P99_RATIO}x its idle p99 "
        f"({idle['health_p50_ms']:.2f} / {idle['health_p99_ms']:.2f} ms): "
        f"{results['health_p99_ratio']:.2f}x, {results['goal_met']}"
    )
    print(
        f"\nstreaming throughput, {MAX_TOKENS} tokens per request "
        f"(greedy; medians of {results['rounds']} rounds)"
    )
    print(f"{'server':<20} {'clients':>7} {'req/s':>8} {'tokens/s':>9} {'TTFT p50':>9} {'failed':>6}")
    for name, rows in results["throughput"].items():
        for r in rows:
            print(
                f"{name:<20} {r['clients']:>7} {r['requests_per_s']:>8.1f} {r['tokens_per_s']:>9.0f} "
                f"{r['ttft_p50_ms']:>7.1f}ms {r['failures']:>6}"
            )
    for r in results["scaling"]:
        goal = f" (goal >= {r['tps_goal']}x: {r['tps_goal_met']})" if r["tps_goal"] else ""
        ttft_goal = f" (goal <= 1x: {r['ttft_goal_met']})" if r["ttft_goal_met"] is not None else ""
        print(
            f"ours/theirs at {r['clients']:>2} clients: tokens/s {r['tps_ratio']:.2f}x{goal}, "
            f"TTFT p50 {r['ttft_ratio']:.2f}x{ttft_goal}"
        )
    print(
        "\nrepeated system prompt: TTFT of the second chat against the first "
        f"(goal <= {GOAL_CACHED_TTFT_RATIO}x)"
    )
    for name, c in results["prompt_cache"].items():
        print(
            f"{name:<20} {c['prompt_tokens']:>4} prompt tokens: {c['first_ttft_ms']:.1f} ms then "
            f"{c['second_ttft_ms']:.1f} ms, {c['ratio']:.2f}x"
        )


def main(smoke: bool = False) -> dict[str, Any]:
    """Run both comparisons and print a table; returns the figures."""
    seconds = 2.0 if smoke else AVAILABILITY_SECONDS
    tp_seconds = 1.0 if smoke else THROUGHPUT_SECONDS
    model = _demo_model()
    ours, theirs = _servers(model)
    results: dict[str, Any] = {"model": model, "availability": {}, "prompt_cache": {}}
    with running(ours), running(theirs):
        results.update(scaling(ours, theirs, tp_seconds, 1 if smoke else ROUNDS))
        for server in (ours, theirs):
            results["prompt_cache"][server.name] = trio.run(
                _cached_ttft, server.url, 2 if smoke else CACHE_ROUNDS
            )
    cached = results["prompt_cache"][ours.name]["ratio"]
    results["prompt_cache_goal_met"] = cached <= GOAL_CACHED_TTFT_RATIO
    for server, whole in ((ours, False), (theirs, True)):
        with running(server):
            if server is ours:
                results["idle"] = availability(server, seconds=seconds, kill_whole_server=False, kill=False)
            results["availability"][server.name] = availability(
                server, seconds=seconds, kill_whole_server=whole
            )
    idle_p99 = results["idle"]["health_p99_ms"]
    results["health_p99_ratio"] = results["availability"][ours.name]["health_p99_ms"] / idle_p99
    results["goal_met"] = results["health_p99_ratio"] <= GOAL_HEALTH_P99_RATIO
    _print_table(results)
    return results


if __name__ == "__main__":
    main(smoke="--smoke" in sys.argv)
